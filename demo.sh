#!/usr/bin/env bash
# Sets up pycrosvm and boots the test guest with its console on this terminal.
# Interactive shell when stdin is a terminal; otherwise a short script that shows the
# guest's kernel, CPUs and memory, then powers off (exit code 0).
set -euo pipefail
cd "$(dirname "$0")"
scripts/setup.sh
mkdir -p .cache
python3 guest/initramfs.py .cache/initramfs.cpio >/dev/null

kernel=${CROSVM_TEST_KERNEL:-../shared/guest/vmlinux}
if [ ! -e "$kernel" ]; then
    echo "demo: no kernel at $kernel (set CROSVM_TEST_KERNEL; see ../shared/guest/README.md)" >&2
    exit 1
fi
cmdline="console=ttyS0 panic=-1 noxsave clearcpuid=cx16,smap,popcnt nokaslr no_int3_selftest tsc=reliable noreplace-smp quiet"
if [ -t 0 ]; then mode=shell; else mode=demo; fi
echo "demo: booting $kernel (takes about a minute on hosts that emulate the guest kernel)" >&2
exec python3 -m crosvm run --mem 256 --cpus 2 --initrd .cache/initramfs.cpio \
    --serial type=stdout,console,stdin \
    -p "$cmdline pycrosvm.mode=$mode" "$kernel"
