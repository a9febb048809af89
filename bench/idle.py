"""Idle cost: CPU used by the VMM while its guest idles, pycrosvm vs. QEMU microvm.

Each VMM boots the test kernel and initramfs with 2 vCPUs into the guest shell (which
waits on the console), settles, then its whole process tree's CPU time is read from
/proc over a window (default 30 s). Printed per VMM, in % of one core:

* vCPU threads: KVM running or halting the guest, in-kernel exits included (of which
  "guest" is time in guest mode, as the kernel counts it);
* VMM own: every other thread and process (device processes, the main thread, I/O
  threads) — the VMM's own idle overhead, the figure to keep under 1%.

    python3 bench/idle.py [--window S] [KERNEL]   (QEMU column needs qemu-system-x86_64)
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(REPO, "guest"))
sys.path.insert(0, REPO)

import initramfs  # noqa: E402

from bench.start import crosvm_command, tree  # noqa: E402
from tests.guest_vm import HOST_CMDLINE, test_kernel  # noqa: E402

READY = b"pycrosvm guest shell;"
BOOT_TIMEOUT = 300
SETTLE = 5.0
TICK = os.sysconf("SC_CLK_TCK")
VCPU_THREAD = re.compile(r"crosvm_vcpu\d+|CPU \d+/KVM")


def thread_times(pids: list[int]) -> dict[tuple[int, int], tuple[str, int, int]]:
    """(pid, tid) -> (thread name, utime+stime ticks, guest ticks) for every thread."""
    out = {}
    for pid in pids:
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                with open(f"/proc/{pid}/task/{tid}/stat") as f:
                    stat = f.read()
            except OSError:
                continue
            name = stat[stat.index("(") + 1:stat.rindex(")")]
            fields = stat[stat.rindex(")") + 2:].split()
            # fields[0] is field 3 (state): utime 14, stime 15, guest_time 43.
            out[(pid, int(tid))] = (name, int(fields[11]) + int(fields[12]), int(fields[40]))
    return out


def measure(name: str, args: list[str], window: float) -> dict[str, float]:
    """Boot, wait for the guest shell, and measure the tree's CPU over `window`."""
    proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, start_new_session=True, cwd=REPO)
    try:
        seen = b""
        deadline = time.monotonic() + BOOT_TIMEOUT
        while READY not in seen:
            chunk = proc.stdout.read1(4096)
            if not chunk or time.monotonic() > deadline:
                raise RuntimeError(f"{name}: the guest shell did not start "
                                   f"(last output: {seen[-300:]!r})")
            seen = seen[-4096:] + chunk
        # Keep draining the console so the VMM never blocks on it.
        os.set_blocking(proc.stdout.fileno(), False)
        time.sleep(SETTLE)
        pids = tree(proc.pid)
        before = thread_times(pids)
        start = time.monotonic()
        time.sleep(window)
        after = thread_times(tree(proc.pid))
        elapsed = time.monotonic() - start
        try:
            proc.stdout.read()
        except (BlockingIOError, TypeError):
            pass
    finally:
        for pid in tree(proc.pid):
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass
        proc.wait()
    vcpu = guest = own = 0
    for key, (thread, cpu, guest_ticks) in after.items():
        cpu0, guest0 = before.get(key, (thread, 0, 0))[1:]
        if VCPU_THREAD.fullmatch(thread):
            vcpu += cpu - cpu0
            guest += guest_ticks - guest0
        else:
            own += cpu - cpu0
    pct = 100.0 / (elapsed * TICK)
    return {"vcpu": vcpu * pct, "guest": guest * pct, "own": own * pct,
            "threads": len(after), "processes": len({pid for pid, _ in after})}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--window", type=float, default=30.0, help="seconds measured")
    parser.add_argument("kernel", nargs="?")
    opts = parser.parse_args()
    kernel = opts.kernel or test_kernel()
    if not kernel:
        print("no kernel: pass one or set CROSVM_TEST_KERNEL", file=sys.stderr)
        return 1
    os.makedirs(os.path.join(REPO, ".cache"), exist_ok=True)
    rd = initramfs.build(os.path.join(REPO, ".cache", "bench-initramfs.cpio"))
    crosvm = crosvm_command() + ["run", "--mem", "256", "--cpus", "2", "--initrd", rd,
                                 "-p", HOST_CMDLINE]
    vmms = {"pycrosvm sandboxed": crosvm + [kernel],
            "pycrosvm --disable-sandbox": crosvm + ["--disable-sandbox", kernel]}
    qemu = shutil.which("qemu-system-x86_64")
    if qemu:
        # -cpu host fails here without -arch-capabilities (MSR 0x10a).
        vmms["qemu -M microvm"] = [
            qemu, "-name", "idle,debug-threads=on",  # names its vCPU threads
            "-M", "microvm", "-enable-kvm", "-cpu", "host,-arch-capabilities",
            "-m", "256", "-smp", "2", "-nographic", "-nodefaults", "-no-user-config",
            "-serial", "stdio", "-kernel", kernel, "-initrd", rd, "-append", HOST_CMDLINE]
    else:
        print("qemu-system-x86_64 not found (apt-get install qemu-system-x86): "
              "no peer column", file=sys.stderr)
    rows = {name: measure(name, args, opts.window) for name, args in vmms.items()}
    print(f"idle guest shell, 2 vCPUs, {opts.window:.0f} s window; % of one core")
    print(f"{'VMM':<28}{'vCPU thr':>10}{'(guest)':>9}{'VMM own':>9}{'procs':>7}{'threads':>9}")
    for name, r in rows.items():
        print(f"{name:<28}{r['vcpu']:>10.2f}{r['guest']:>9.2f}{r['own']:>9.2f}"
              f"{r['processes']:>7}{r['threads']:>9}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
