"""What the virtio fuzz targets share: one guest RAM per process, and a hostile driver
that writes descriptor tables and rings from fuzzer bytes.

Not a target (targets are fuzz_*.py).
"""

from __future__ import annotations

import struct

import atheris

from crosvm.devices.virtio.queue import DESC_SIZE, MAX_CHAIN_BYTES, DescriptorChain
from crosvm.vm_memory import GuestMemory

# Two regions with a hole, so "in RAM" means more than "below the end".
RAM_RANGES = [(0, 0x40000), (0x50000, 0x10000)]
RAM_END = 0x60000
_mem: GuestMemory | None = None
_zeros = {size: bytes(size) for _, size in RAM_RANGES}


def clean_memory() -> GuestMemory:
    """The process's guest RAM (created once: memfds are not free), zeroed."""
    global _mem
    if _mem is None:
        _mem = GuestMemory(RAM_RANGES)
    for addr, size in RAM_RANGES:
        _mem.write(addr, _zeros[size])
    return _mem


def guest_addr(fdp: atheris.FuzzedDataProvider) -> int:
    """Mostly near RAM, sometimes any 64-bit value."""
    if fdp.ConsumeIntInRange(0, 7) == 0:
        return fdp.ConsumeIntInRange(0, (1 << 64) - 1)
    return fdp.ConsumeIntInRange(0, RAM_END + 0x1000)


def descriptor(fdp: atheris.FuzzedDataProvider, table_size: int) -> bytes:
    """One descriptor: raw bytes, or plausible fields a fuzzer reaches easily."""
    if fdp.ConsumeIntInRange(0, 7) == 0:
        return fdp.ConsumeBytes(DESC_SIZE).ljust(DESC_SIZE, b"\0")
    addr = guest_addr(fdp)
    length = fdp.ConsumeIntInRange(0, 0x11000) if fdp.ConsumeBool() else fdp.ConsumeIntInRange(0, 64)
    flags = fdp.ConsumeIntInRange(0, 7) if fdp.ConsumeIntInRange(0, 15) else fdp.ConsumeIntInRange(0, 0xFFFF)
    next_index = fdp.ConsumeIntInRange(0, table_size)
    return struct.pack("<QIHH", addr, length, flags, next_index)


def write_table(mem: GuestMemory, fdp: atheris.FuzzedDataProvider, addr: int,
                count: int) -> None:
    """`count` descriptors at `addr` (as far as RAM goes)."""
    for i in range(count):
        d = descriptor(fdp, count)
        if not mem.is_valid_range(addr + i * DESC_SIZE, DESC_SIZE):
            return
        mem.write(addr + i * DESC_SIZE, d)


def write_pattern_table(mem: GuestMemory, fdp: atheris.FuzzedDataProvider) -> None:
    """A large table of one descriptor repeated, each linked to the next (or in a
    loop): how a hostile driver makes chains long cheaply."""
    addr = fdp.ConsumeIntInRange(0, RAM_END) & ~0xF
    count = fdp.ConsumeIntInRange(1, 0x4000)
    buf_addr, length, flags = guest_addr(fdp), fdp.ConsumeIntInRange(0, 0x1000), fdp.ConsumeIntInRange(0, 7)
    loop = fdp.ConsumeBool()
    if not mem.is_valid_range(addr, count * DESC_SIZE):
        return
    table = bytearray(count * DESC_SIZE)
    for i in range(count):
        nxt = (i + 1) % count if loop else i + 1
        struct.pack_into("<QIHH", table, i * DESC_SIZE, buf_addr, length, flags, nxt)
    mem.write(addr, table)


def check_chain(mem: GuestMemory, chain: DescriptorChain, queue_size: int) -> None:
    """What parse_chain promises: a head in the table, non-empty buffers wholly in RAM,
    a total that fits the used ring's u32."""
    assert 0 <= chain.index < queue_size, chain.index
    total = 0
    for addr, n in chain.readable + chain.writable:
        assert n > 0, (addr, n)
        assert mem.is_valid_range(addr, n), f"buffer {addr:#x}+{n:#x} is not in RAM"
        total += n
    assert total <= MAX_CHAIN_BYTES, total


class _Recorder:
    """Stands in for QueueWorker during `activate_sync`: keeps the callbacks, no thread.

    `extra` is the live {fd: callback} table: the fds the worker started with, plus
    those `watch(..., callback=)` adds at run time (a new connection), less those
    `forget` drops. `watched` is what each fd waits for (the start's fds wait for
    input until told otherwise)."""

    def __init__(self, name, interrupt, queue_events, handle, extra=None,
                 on_start=None) -> None:
        self.handle = handle
        self.extra = dict(extra or [])
        self.watched: dict[int, tuple[bool, bool]] = {}
        if on_start is not None:
            on_start(self)

    def watch(self, fd: int, readable: bool, writable: bool = False,
              callback=None) -> None:
        if callback is not None:
            self.extra[fd] = callback
        self.watched[fd] = (readable, writable)

    def forget(self, fd: int) -> None:
        self.watched.pop(fd, None)
        self.extra.pop(fd, None)

    def stop(self) -> None:
        pass


def activate_sync(device, mem: GuestMemory, interrupt, queues):
    """Activate `device` without its worker thread; returns the worker's `handle(i)` and
    its extra {fd: callback} (live: fds watched at run time come and go), so a target
    drives the device in its own thread."""
    from crosvm.devices.virtio import virtio_device as V
    real = V.QueueWorker
    V.QueueWorker = _Recorder
    try:
        device.activate(mem, interrupt, queues)
    finally:
        V.QueueWorker = real
    worker = device.worker
    device.worker = None
    return worker.handle, worker.extra


class Driver:
    """A QueueDriver with its own data area [start, end) that never wraps onto buffers
    still in flight, and never reuses descriptors the device has not returned."""

    def __init__(self, mem: GuestMemory, size: int, base: int, start: int, end: int) -> None:
        from crosvm.devices.virtio.driver import QueueDriver
        self.q = QueueDriver(mem, size=size, base=base)
        assert self.q.data_start <= start
        self.q.next_free = self.q.data_start = start
        self.end = end
        self.outstanding: dict[int, tuple[int, list[tuple[int, int]]]] = {}  # head -> (ndesc, writable)
        self.in_flight_descs = 0

    def room(self, ndesc: int, nbytes: int) -> bool:
        return (self.in_flight_descs + ndesc <= self.q.size and ndesc <= self.q.size
                and self.q.next_free + nbytes + 64 * (ndesc + 1) <= self.end)

    def post(self, readable: list[bytes], writable: list[int], indirect: bool) -> int | None:
        ndesc = 1 if indirect else len(readable) + len(writable)
        nbytes = sum(map(len, readable)) + sum(writable) + (16 * (len(readable) + len(writable)) if indirect else 0)
        if ndesc == 0 or not self.room(ndesc, nbytes):
            return None
        head, addrs = self.q.add_buffers(readable, writable, indirect=indirect)
        self.outstanding[head] = (ndesc, list(zip(addrs, writable)))
        self.in_flight_descs += ndesc
        return head

    def used(self) -> list[tuple[int, int, list[tuple[int, int]]]]:
        """(head, length, writable buffers) for each returned chain."""
        out = []
        for head, length in self.q.used():
            ndesc, writable = self.outstanding.pop(head)
            self.in_flight_descs -= ndesc
            out.append((head, length, writable))
        if not self.outstanding:
            self.q.next_free = self.q.data_start  # everything is back: reuse the area
        return out


def gather(mem: GuestMemory, regions: list[tuple[int, int]], length: int) -> bytes:
    """The first `length` bytes of `regions`."""
    out = bytearray()
    for addr, n in regions:
        take = min(n, length - len(out))
        out += mem.read(addr, take)
    return bytes(out)
