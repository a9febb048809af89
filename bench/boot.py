"""Boot time: pycrosvm vs. QEMU microvm on the same kernel, initramfs and command line.

Measures wall time from launch to the first line the guest's init prints (the demo
banner) and to the VMM's exit after the guest powers off.

    python3 bench/boot.py [KERNEL]     (needs qemu-system-x86_64 for the peer column)
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(REPO, "guest"))
sys.path.insert(0, REPO)

import initramfs  # noqa: E402

from tests.guest_vm import HOST_CMDLINE, test_kernel  # noqa: E402

BANNER = b"=== pycrosvm demo guest ==="
MEM = "256"
TIMEOUT = 300


def timed(args: list[str]) -> tuple[float, float, int]:
    """(seconds to the init banner, seconds to exit, exit status)."""
    start = time.monotonic()
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            stdin=subprocess.DEVNULL, cwd=REPO)
    seen = b""
    t_init = float("nan")
    deadline = start + TIMEOUT
    for chunk in iter(lambda: proc.stdout.read1(4096), b""):
        seen += chunk
        if t_init != t_init and BANNER in seen:
            t_init = time.monotonic() - start
        if time.monotonic() > deadline:
            break
    try:
        status = proc.wait(TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return t_init, float("nan"), -9
    return t_init, time.monotonic() - start, status


def main() -> int:
    kernel = sys.argv[1] if len(sys.argv) > 1 else test_kernel()
    if not kernel:
        print("no kernel: pass one or set CROSVM_TEST_KERNEL", file=sys.stderr)
        return 1
    os.makedirs(os.path.join(REPO, ".cache"), exist_ok=True)
    rd = initramfs.build(os.path.join(REPO, ".cache", "bench-initramfs.cpio"))
    cmdline = f"{HOST_CMDLINE} pycrosvm.mode=demo"
    # QEMU's plain -cpu host fails here (it cannot set MSR 0x10a, ARCH_CAPABILITIES), and
    # with its default model the guest hits an emulation failure (fnclex) at /init.
    rows = []
    rows.append(("pycrosvm", *timed([sys.executable, "-m", "crosvm", "run", "--mem", MEM,
                                      "--initrd", rd, "--serial", "type=stdout,console",
                                      "-p", cmdline, kernel])))
    qemu = shutil.which("qemu-system-x86_64")
    if qemu:
        rows.append(("qemu -M microvm", *timed([
            qemu, "-M", "microvm", "-enable-kvm", "-cpu", "host,-arch-capabilities", "-m", MEM, "-smp", "1",
            "-nographic", "-nodefaults", "-no-user-config", "-serial", "stdio",
            "-kernel", kernel, "-initrd", rd, "-append", cmdline.replace(
                "console=ttyS0", "console=ttyS0 reboot=t"), "-no-reboot"])))
    else:
        print("qemu-system-x86_64 not found (apt-get install qemu-system-x86): "
              "no peer column", file=sys.stderr)
    print(f"{'VMM':<18}{'to init (s)':>12}{'to exit (s)':>13}{'status':>8}{'exit vs pycrosvm':>18}")
    base = rows[0][2]
    for name, t_init, t_exit, status in rows:
        print(f"{name:<18}{t_init:>12.1f}{t_exit:>13.1f}{status:>8}{t_exit / base:>18.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
