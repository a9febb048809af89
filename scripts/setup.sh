#!/usr/bin/env bash
# Installs what pycrosvm needs on a fresh Debian machine: busybox-static (the test
# guest's userspace), e2fsprogs (mkfs.ext4/debugfs for the disk tests) and the package
# itself with its test dependencies (atheris is the coverage-guided fuzzer tests/fuzz
# runs); libseccomp2 compiles the devices' seccomp filters;
# qemu-utils (qemu-img/qemu-io), android-sdk-libsparse-utils (img2simg) and fdisk
# (sfdisk) make and check the images of the disk-format tests; pyroute2 (a package
# dependency) configures the host side of `--net host-ip=` TAPs; passt gives
# `--net passt` its user-mode network; gcc and libc6-dev build the guest's static vsock
# tool (guest/vsock.c, /bin/vsock in the initramfs); qemu-system-common has
# qemu-storage-daemon and virtiofsd, the real vhost-user back-ends the e2e tests use,
# and qemu-system-x86 is the real front-end of `crosvm device` (and the benches' peer).
set -euo pipefail
cd "$(dirname "$0")/.."

# The initramfs needs a static busybox (Debian's busybox-static puts it at /bin/busybox).
missing=()
for pkg in busybox-static gcc libc6-dev e2fsprogs libseccomp2 qemu-utils android-sdk-libsparse-utils fdisk passt qemu-system-common qemu-system-x86; do
    dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done
if [ "${#missing[@]}" -gt 0 ]; then
    if [ "$(id -u)" != 0 ]; then
        echo "setup: missing ${missing[*]}; run as root or: apt-get install ${missing[*]}" >&2
        exit 1
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# Install the package (editable, from this checkout) unless it is already installed from here.
here=$PWD
if ! (cd / && python3 -c 'import os, sys, crosvm, pytest, hypothesis, atheris, pyroute2
sys.exit(os.path.dirname(os.path.dirname(crosvm.__file__)) != sys.argv[1])' "$here") 2>/dev/null; then
    python3 -m pip install -q -e '.[test]'
fi

# Byte-compile the package (incremental: only changed files). An editable install
# compiles nothing, and where PYTHONDONTWRITEBYTECODE is set no .pyc is ever written, so
# every `crosvm run` would compile its ~90 modules again: 83 ms of a 167 ms start here.
python3 -m compileall -q crosvm >/dev/null
