#!/usr/bin/env bash
# Runs the whole test suite: unit tests and end-to-end tests that boot the test kernel.
# Extra arguments go to pytest (e.g. `scripts/test.sh -k serial`).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
set +e
python3 -m pytest -v -rs --durations=15 tests "$@"
status=$?
set -e
if [ "$status" = 5 ]; then
    echo "test.sh: pytest collected no tests; that is a failure" >&2
    exit 1
fi
exit "$status"
