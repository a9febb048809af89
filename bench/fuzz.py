"""Fuzzing throughput: every fuzz target (or those named) for SECONDS each, one after
the other, each in its own subprocess under atheris (see fuzz/runner.py).

    python3 bench/fuzz.py [SECONDS] [TARGET...]

Prints, per target: inputs executed, inputs per second, and failures (crashing
inputs, saved under $TMPDIR/crosvm-fuzz-crashes/<target>/).
"""

from __future__ import annotations

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from fuzz import runner  # noqa: E402


def main(argv: list[str]) -> int:
    seconds = float(argv[0]) if argv else 60.0
    names = argv[1:] or runner.targets()
    unknown = set(names) - set(runner.targets())
    if unknown:
        print(f"unknown targets: {', '.join(sorted(unknown))}; have: {', '.join(runner.targets())}",
              file=sys.stderr)
        return 2
    print(f"{'target':<14} {'inputs':>10} {'inputs/s':>10} {'failures':>9}")
    total_inputs = total_failures = 0
    for name in names:
        r = runner.run_target(name, seconds=seconds)
        total_inputs += r.inputs
        total_failures += len(r.failures)
        print(f"{name:<14} {r.inputs:>10} {r.rate:>10.0f} {len(r.failures):>9}", flush=True)
        for f in r.failures:
            print(f"    {f}", flush=True)
    print(f"{'total':<14} {total_inputs:>10} {'':>10} {total_failures:>9}")
    return 1 if total_failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
