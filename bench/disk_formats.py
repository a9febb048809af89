#!/usr/bin/env python3
"""Our qcow2 layer vs QEMU's (`qemu-img bench`) on the same image, and vs raw.

Each row runs the same access pattern (queue depth 1, through the page cache) on one
image made by qemu-img: 4 KiB reads and writes, sequential and at a random-looking
stride, and 128 KiB sequential reads. qemu-img bench only walks offsets with a fixed
step, so the "random" rows use a large prime stride (wrapping) for both sides.

    python3 bench/disk_formats.py [--mib 64] [--count 20000]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from crosvm.disk import open_disk  # noqa: E402

STRIDE = 4096 * 7919   # a prime number of 4 KiB blocks


def qemu_bench(image: str, fmt: str, size: int, count: int, step: int, write: bool) -> float:
    """ops/s from `qemu-img bench` (its offsets wrap at the image size)."""
    cmd = ["qemu-img", "bench", "-f", fmt, "-d", "1", "-c", str(count), "-s", str(size),
           "-S", str(step)]
    if write:
        cmd += ["-w", "--no-drain"]
    out = subprocess.run(cmd + [image], check=True, capture_output=True, text=True).stdout
    seconds = float(re.search(r"Run completed in ([\d.]+) seconds", out).group(1))
    return count / seconds


def ours(image: str, size: int, count: int, step: int, write: bool) -> float:
    disk = open_disk(image, read_only=not write)
    buf = memoryview(bytearray(os.urandom(size)))
    span = disk.size - disk.size % size
    offset = 0
    op = disk.write_at if write else disk.read_at
    start = time.perf_counter()
    for _ in range(count):
        op(offset, buf)
        offset = (offset + step) % span
    if write:
        disk.flush()
    elapsed = time.perf_counter() - start
    disk.close()
    return count / elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, default=64)
    ap.add_argument("--count", type=int, default=20000)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        raw = os.path.join(d, "img.raw")
        with open(raw, "wb") as f:
            f.write(os.urandom(a.mib << 20))
        qcow = os.path.join(d, "img.qcow2")
        subprocess.run(["qemu-img", "convert", "-O", "qcow2", raw, qcow], check=True)
        rows = [("4K seq read", 4096, 4096, False), ("4K stride read", 4096, STRIDE, False),
                ("128K seq read", 128 << 10, 128 << 10, False),
                ("4K seq write", 4096, 4096, True), ("4K stride write", 4096, STRIDE, True)]
        print(f"{a.mib} MiB image, {a.count} ops per row, queue depth 1, ops/s")
        print(f"{'pattern':<16} {'qemu-img':>10} {'ours qcow2':>11} {'ours raw':>10} "
              f"{'qcow2/qemu':>11} {'qcow2/raw':>10}")
        for name, size, step, write in rows:
            count = a.count if size == 4096 else a.count // 8
            q = qemu_bench(qcow, "qcow2", size, count, step, write)
            o = ours(qcow, size, count, step, write)
            r = ours(raw, size, count, step, write)
            print(f"{name:<16} {q:>10.0f} {o:>11.0f} {r:>10.0f} {o / q:>10.2f}x {o / r:>9.2f}x")


if __name__ == "__main__":
    main()
