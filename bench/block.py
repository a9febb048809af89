"""virtio-blk backend throughput: the device worker vs. the host's own preadv/pwritev.

No guest kernel: a virtqueue driver (crosvm.devices.virtio.driver) plays the guest
in this process, and the block device's worker runs in a forked child that shares
guest memory through the memfd mapping: once jailed as in the sandbox (namespaces,
pivot_root, no capabilities, and the block_device seccomp filter), once not, as with
--disable-sandbox. The unjailed worker also runs in its own process: in crosvm's VMM
the vCPU threads sit in KVM_RUN with the interpreter released, but here the driver
playing the guest is Python too, and sharing one interpreter with it would measure the
bench's own contention, not the sandbox. Requests:

  * 4 KiB random reads, queue depth 32
  * 128 KiB sequential reads and writes, queue depth 8

against a raw file in the page cache. The limit is a single-threaded host loop of
os.preadv/os.pwritev with the same sizes on the same file.

    python3 bench/block.py [SECONDS_PER_CASE]
"""

from __future__ import annotations

import os
import random
import select
import struct
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from crosvm.base import Event  # noqa: E402
from crosvm.devices.virtio import block as B  # noqa: E402
from crosvm.devices.virtio.driver import QueueDriver  # noqa: E402
from crosvm.devices.virtio.queue import VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE  # noqa: E402
from crosvm.devices.virtio.virtio_device import Interrupt  # noqa: E402
from crosvm.disk import RawDisk  # noqa: E402
from crosvm.jail import DEFAULT_PIVOT_ROOT, Jail, ensure_pivot_root  # noqa: E402
from crosvm.vm_memory import GuestMemory  # noqa: E402

FILE_SIZE = 256 << 20
MEM_SIZE = 64 << 20


class Line:
    def __init__(self) -> None:
        self.trigger = Event()
        self.resample = Event()


def start_device(path: str, mem: GuestMemory, drv: QueueDriver, kick: Event, line: Line,
                 jailed: bool) -> tuple[int, int]:
    """Fork the block worker into a child process (jailed, or just forked). Returns its
    pid and the fd that stops it when closed (a read on a pipe: within its policy)."""
    jail = Jail() if jailed else None
    seccomp = jail.filter_for(B.Block.seccomp_policy) if jail else None
    stop_r, stop_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(stop_w)
            block = B.Block(RawDisk(path), queue_size=drv.size)
            if jail is not None:
                ensure_pivot_root(DEFAULT_PIVOT_ROOT)
                jail.enter(seccomp)
            block.activate(mem, Interrupt(None, line), [(0, drv.queue, kick)])
            os.read(stop_r, 1)
        finally:
            os._exit(0)
    os.close(stop_r)
    return pid, stop_w


def run_device_case(path: str, req_size: int, depth: int, write: bool, sequential: bool,
                    seconds: float, jailed: bool = False) -> tuple[float, float]:
    """(IOPS, MB/s) with `depth` requests always in flight."""
    mem = GuestMemory([(0, MEM_SIZE)])
    drv = QueueDriver(mem, size=256)
    kick, line = Event(), Line()
    pid, stop = start_device(path, mem, drv, kick, line, jailed)
    slots = []
    for i in range(depth):
        header = drv.alloc(16)
        data = drv.alloc(req_size, 4096)
        status = drv.alloc(1)
        flags = 0 if write else VIRTQ_DESC_F_WRITE
        drv.write_desc(3 * i, header, 16, VIRTQ_DESC_F_NEXT, 3 * i + 1)
        drv.write_desc(3 * i + 1, data, req_size, flags | VIRTQ_DESC_F_NEXT, 3 * i + 2)
        drv.write_desc(3 * i + 2, status, 1, VIRTQ_DESC_F_WRITE, 0)
        slots.append(header)
    sectors = FILE_SIZE // 512
    step = req_size // 512
    position = 0
    rng = random.Random(1)

    def submit(slot: int) -> None:
        nonlocal position
        if sequential:
            sector = position
            position = (position + step) % sectors
        else:
            sector = rng.randrange(0, sectors // step) * step
        mem.write(slots[slot], struct.pack("<IIQ", B.T_OUT if write else B.T_IN, 0, sector))
        drv.publish(3 * slot)

    for i in range(depth):
        submit(i)
    kick.signal()
    done = 0
    start = time.perf_counter()
    end = start + seconds
    while time.perf_counter() < end:
        if not select.select([line.trigger.fd], [], [], 1.0)[0]:
            raise SystemExit("the block worker stopped answering")
        line.trigger.wait()
        completed = drv.used()
        for head, _ in completed:
            submit(head // 3)
        done += len(completed)
        if completed:
            kick.signal()
    elapsed = time.perf_counter() - start
    os.close(stop)
    _, status = os.waitpid(pid, 0)
    if status != 0:
        raise SystemExit(f"the block device process ended with status {status:#x}")
    mem.close()
    return done / elapsed, done * req_size / elapsed / 1e6


def run_host_case(path: str, req_size: int, write: bool, sequential: bool,
                  seconds: float) -> tuple[float, float]:
    fd = os.open(path, os.O_RDWR)
    buf = memoryview(bytearray(req_size))
    blocks = FILE_SIZE // req_size
    rng = random.Random(1)
    done, position = 0, 0
    start = time.perf_counter()
    end = start + seconds
    while time.perf_counter() < end:
        for _ in range(64):
            if sequential:
                offset = position * req_size
                position = (position + 1) % blocks
            else:
                offset = rng.randrange(0, blocks) * req_size
            if write:
                os.pwritev(fd, [buf], offset)
            else:
                os.preadv(fd, [buf], offset)
        done += 64
    elapsed = time.perf_counter() - start
    os.close(fd)
    return done / elapsed, done * req_size / elapsed / 1e6


CASES = [("4 KiB random read, QD32", 4096, 32, False, False),
         ("128 KiB sequential read, QD8", 128 << 10, 8, False, True),
         ("128 KiB sequential write, QD8", 128 << 10, 8, True, True)]


def main() -> int:
    seconds = float(sys.argv[1]) if len(sys.argv) > 1 else 5.0
    with tempfile.TemporaryDirectory(dir="/var/tmp") as tmp:
        path = os.path.join(tmp, "bench.img")
        with open(path, "wb") as f:
            chunk = os.urandom(1 << 20)
            for _ in range(FILE_SIZE >> 20):
                f.write(chunk)
        print(f"raw image {FILE_SIZE >> 20} MiB in the page cache, {seconds:.0f} s per case\n")
        print("jailed: namespaces, pivot_root, no caps, seccomp block_device policy; "
              "unjailed: as --disable-sandbox\n")
        print(f"{'case':<30} {'jailed IOPS':>11} {'MB/s':>7} {'unjailed IOPS':>13} "
              f"{'MB/s':>7} {'host IOPS':>10} {'MB/s':>7} {'jail/host':>9} {'jail/unjail':>11}")
        for name, size, depth, write, seq in CASES:
            jail_iops, jail_mbs = run_device_case(path, size, depth, write, seq, seconds, True)
            dev_iops, dev_mbs = run_device_case(path, size, depth, write, seq, seconds)
            host_iops, host_mbs = run_host_case(path, size, write, seq, seconds)
            print(f"{name:<30} {jail_iops:>11,.0f} {jail_mbs:>7,.0f} {dev_iops:>13,.0f} "
                  f"{dev_mbs:>7,.0f} {host_iops:>10,.0f} {host_mbs:>7,.0f} "
                  f"{jail_iops / host_iops:>9.2f} {jail_iops / dev_iops:>11.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
