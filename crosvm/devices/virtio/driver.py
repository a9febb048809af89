"""A virtqueue *driver* on plain guest memory, for tests and benchmarks (no KVM).

It plays the guest's part: lays out a split queue, writes descriptor chains and the
available ring, and reads back the used ring, so a device's request handling can be
driven exactly as a kernel driver would drive it (or as a hostile one would).
"""

from __future__ import annotations

import struct

from crosvm.devices.virtio.queue import (VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT,
                                         VIRTQ_DESC_F_WRITE, Queue)
from crosvm.vm_memory import GuestMemory


class QueueDriver:
    """Owns one queue's rings at `base` and a bump allocator for buffers after them."""

    def __init__(self, mem: GuestMemory, size: int = 256, base: int = 0x10000,
                 event_idx: bool = False) -> None:
        self.mem = mem
        self.size = size
        avail_ring = base + 16 * size
        used_ring = (avail_ring + 6 + 2 * size + 4095) & ~4095
        self.queue = Queue(size, base, avail_ring, used_ring, event_idx=event_idx)
        q = self.queue
        self.next_free = (q.used_ring + 6 + 8 * size + 4095) & ~4095
        self.data_start = self.next_free
        self.avail_idx = 0
        self.used_seen = 0
        self.next_desc = 0

    def alloc(self, length: int, align: int = 8) -> int:
        addr = (self.next_free + align - 1) & ~(align - 1)
        if not self.mem.is_valid_range(addr, length):
            self.next_free = self.data_start  # wrap: tests reuse buffers they are done with
            addr = self.next_free
        self.next_free = addr + length
        return addr

    def write_desc(self, index: int, addr: int, length: int, flags: int, next_index: int,
                   table: int | None = None) -> None:
        table = self.queue.desc_table if table is None else table
        self.mem.write(table + 16 * index, struct.pack("<QIHH", addr, length, flags, next_index))

    def publish(self, head: int) -> None:
        """Put `head` in the available ring and bump the index."""
        q = self.queue
        self.mem.write_int(q.avail_ring + 4 + 2 * (self.avail_idx % self.size), head, 2)
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.mem.write_int(q.avail_ring + 2, self.avail_idx, 2)

    def add_buffers(self, readable: list[bytes], writable: list[int],
                    indirect: bool = False) -> tuple[int, list[int]]:
        """Post a chain of readable buffers (their contents) then writable ones (their
        sizes). Returns (head, addresses of the writable buffers)."""
        bufs = []
        for data in readable:
            addr = self.alloc(len(data))
            self.mem.write(addr, data)
            bufs.append((addr, len(data), 0))
        out_addrs = []
        for n in writable:
            addr = self.alloc(n)
            out_addrs.append(addr)
            bufs.append((addr, n, VIRTQ_DESC_F_WRITE))
        if indirect:
            table = self.alloc(16 * len(bufs), 16)
            for i, (addr, n, flags) in enumerate(bufs):
                more = VIRTQ_DESC_F_NEXT if i + 1 < len(bufs) else 0
                self.write_desc(i, addr, n, flags | more, i + 1, table=table)
            bufs = [(table, 16 * len(bufs), VIRTQ_DESC_F_INDIRECT)]
        return self.add_descriptors(bufs), out_addrs

    def add_descriptors(self, descs: list[tuple[int, int, int]]) -> int:
        """Post (address, length, flags) descriptors as one chain (NEXT links added),
        at whatever addresses, overlapping or not, as a hostile driver may. Returns
        the head."""
        head = self.next_desc
        for i, (addr, n, flags) in enumerate(descs):
            index = (head + i) % self.size
            more = VIRTQ_DESC_F_NEXT if i + 1 < len(descs) else 0
            self.write_desc(index, addr, n, flags | more, (index + 1) % self.size)
        self.next_desc = (head + len(descs)) % self.size
        self.publish(head)
        return head

    def used(self) -> list[tuple[int, int]]:
        """Used elements (id, len) the device added since the last call."""
        q = self.queue
        idx = self.mem.read_int(q.used_ring + 2, 2)
        out = []
        while self.used_seen != idx:
            slot = self.used_seen % self.size
            out.append(struct.unpack("<II", self.mem.read(q.used_ring + 4 + 8 * slot, 8)))
            self.used_seen = (self.used_seen + 1) & 0xFFFF
        return out

    def set_used_event(self, value: int) -> None:
        self.mem.write_int(self.queue.avail_ring + 4 + 2 * self.size, value, 2)
