"""Start-up time and memory: pycrosvm (sandboxed and not) vs. QEMU microvm.

The guest is a few instructions that write one byte to COM1 and halt: it touches no
guest RAM, so the figures are the VMM's own. For each VMM, rounds are interleaved (one
launch of each per round) and medians are printed:

* start: spawn → the guest's byte read from the VMM's stdout (the first guest
  instruction runs a few hundred ns before it);
* PSS: the whole process tree's proportional set size (``/proc/PID/smaps_rollup``),
  read right after the byte, with the number of processes;
* the ratio of each to QEMU's.

    python3 bench/start.py [--rounds N] [--mem MIB]

QEMU gets the guest as its firmware (``-bios``, entered in real mode at the reset
vector): QEMU's own firmware would run thousands of emulated instructions on these
hosts before the guest, and pycrosvm runs no firmware either.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import sysconfig
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)

TIMEOUT = 30.0
# mov dx, 0x3f8; mov al, 'X'; out dx, al; hlt; jmp $-1 (the jmp re-halts after an
# interrupt). 0x66 makes `mov dx` 16-bit in 64-bit mode; without it, the same bytes in
# real mode.
CODE_64 = b"\x66\xba\xf8\x03\xb0X\xee\xf4\xeb\xfd"
CODE_16 = b"\xba\xf8\x03\xb0X\xee\xf4\xeb\xfd"
LOAD_ADDR = 0x100000


def tiny_elf(path: str) -> None:
    """An ELF64 x86_64 'kernel': one PT_LOAD segment at 1 MiB, entered in 64-bit mode."""
    ehdr_size, phdr_size = 64, 56
    offset = ehdr_size + phdr_size
    ident = b"\x7fELF" + bytes([2, 1, 1]) + bytes(9)
    ehdr = struct.pack("<16sHHIQQQIHHHHHH", ident, 2, 62, 1, LOAD_ADDR, ehdr_size, 0, 0,
                       ehdr_size, phdr_size, 1, 0, 0, 0)
    phdr = struct.pack("<IIQQQQQQ", 1, 5, offset, LOAD_ADDR, LOAD_ADDR, len(CODE_64),
                       len(CODE_64), 0x1000)
    with open(path, "wb") as f:
        f.write(ehdr + phdr + CODE_64)


def tiny_bios(path: str) -> None:
    """A 64 KiB firmware image whose reset vector (its last 16 bytes) is the guest."""
    image = bytearray(0x10000)
    image[0xFFF0:0xFFF0 + len(CODE_16)] = CODE_16
    with open(path, "wb") as f:
        f.write(image)


def crosvm_command() -> list[str]:
    """How a user starts pycrosvm: its console script, without a version-manager shim."""
    script = os.path.join(sysconfig.get_path("scripts"), "crosvm")
    if os.path.exists(script):
        return [script]
    return [sys.executable, "-m", "crosvm"]


def tree(root: int) -> list[int]:
    """`root` and all its descendants (by parent pid)."""
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def pss_kib(pids: list[int]) -> int:
    """Summed Pss of `pids` in KiB (processes that vanished count 0)."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Pss:"):
                        total += int(line.split()[1])
                        break
        except OSError:
            pass
    return total


def launch(args: list[str]) -> tuple[float, int, int]:
    """(seconds to the guest's byte, tree PSS in KiB, process count); kills the tree."""
    start = time.monotonic()
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        os.set_blocking(proc.stdout.fileno(), True)
        seen = b""
        deadline = start + TIMEOUT
        while b"X" not in seen:
            chunk = proc.stdout.read1(4096)
            if not chunk or time.monotonic() > deadline:
                err = proc.stderr.read1(4096) if proc.poll() is not None else b""
                raise RuntimeError(f"{args[0]}: no guest output (exit {proc.poll()}): "
                                   f"{err.decode(errors='replace').strip()}")
            seen += chunk
        elapsed = time.monotonic() - start
        pids = tree(proc.pid)
        return elapsed, pss_kib(pids), len(pids)
    finally:
        for pid in tree(proc.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait()
        proc.stdout.close()
        proc.stderr.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--mem", type=int, default=256, help="guest MiB (both VMMs)")
    opts = parser.parse_args()
    work = tempfile.mkdtemp(prefix="bench-start-")
    elf, bios = os.path.join(work, "tiny.elf"), os.path.join(work, "tiny.bios")
    tiny_elf(elf)
    tiny_bios(bios)
    crosvm = crosvm_command() + ["run", "--mem", str(opts.mem)]
    vmms = {
        "pycrosvm sandboxed": crosvm + [elf],
        "pycrosvm --disable-sandbox": crosvm + ["--disable-sandbox", elf],
    }
    qemu = shutil.which("qemu-system-x86_64")
    if qemu:
        vmms["qemu -M microvm"] = [
            qemu, "-M", "microvm", "-enable-kvm", "-cpu", "host,-arch-capabilities",
            "-m", str(opts.mem), "-smp", "1", "-nodefaults", "-no-user-config",
            "-display", "none", "-serial", "stdio", "-bios", bios]
    else:
        print("qemu-system-x86_64 not found (apt-get install qemu-system-x86): "
              "no peer column", file=sys.stderr)
    results: dict[str, list[tuple[float, int, int]]] = {name: [] for name in vmms}
    try:
        for _ in range(opts.rounds):
            for name, args in vmms.items():
                results[name].append(launch(args))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    medians = {name: (statistics.median(r[0] for r in rs) * 1000,
                      statistics.median(r[1] for r in rs) / 1024,
                      statistics.median(r[2] for r in rs)) for name, rs in results.items()}
    peer = medians.get("qemu -M microvm")
    print(f"{opts.rounds} rounds, medians; guest {opts.mem} MiB")
    print(f"{'VMM':<28}{'start ms':>10}{'PSS MiB':>10}{'procs':>7}"
          f"{'start/qemu':>12}{'PSS/qemu':>10}")
    for name, (ms, mib, procs) in medians.items():
        ratio_t = f"{ms / peer[0]:.2f}" if peer else "-"
        ratio_m = f"{mib / peer[1]:.2f}" if peer else "-"
        print(f"{name:<28}{ms:>10.1f}{mib:>10.1f}{procs:>7.0f}{ratio_t:>12}{ratio_m:>10}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
