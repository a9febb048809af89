#!/usr/bin/env bash
# Installs what pycrosvm needs on a fresh Debian machine: busybox-static (the test
# guest's userspace) and the package itself with its test dependencies.
set -euo pipefail
cd "$(dirname "$0")/.."

# The initramfs needs a static busybox (Debian's busybox-static puts it at /bin/busybox).
need_busybox=0
dpkg -s busybox-static >/dev/null 2>&1 || need_busybox=1
if [ "$need_busybox" = 1 ]; then
    if [ "$(id -u)" != 0 ]; then
        echo "setup: busybox-static is missing; run as root or: apt-get install busybox-static" >&2
        exit 1
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq busybox-static >/dev/null
fi

# Install the package (editable, from this checkout) unless it is already installed from here.
here=$PWD
if ! (cd / && python3 -c 'import os, sys, crosvm, pytest, hypothesis
sys.exit(os.path.dirname(os.path.dirname(crosvm.__file__)) != sys.argv[1])' "$here") 2>/dev/null; then
    python3 -m pip install -q -e '.[test]'
fi
