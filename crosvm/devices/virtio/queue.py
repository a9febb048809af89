"""Split virtqueues (virtio 1.x, 2.7) with crosvm's defences against a hostile driver.

Everything read from guest memory is untrusted: indices are bounded by the queue
size, chains by a length cap, regions must lie in guest RAM, and a readable buffer
may not follow a writable one. A bad chain is returned to the driver as used with
length 0 and logged (rate-limited); the queue and the VMM carry on. A driver that breaks
the ring itself gets `QueueError`, which puts the device in NEEDS_RESET.
"""

from __future__ import annotations

import logging
import struct
from dataclasses import dataclass, field

from crosvm.base.ratelimit import RateLimitedLog
from crosvm.vm_memory import GuestMemory

log = logging.getLogger(__name__)
_guest_log = RateLimitedLog(log)

VIRTQ_DESC_F_NEXT = 1
VIRTQ_DESC_F_WRITE = 2
VIRTQ_DESC_F_INDIRECT = 4
VIRTQ_AVAIL_F_NO_INTERRUPT = 1
VIRTQ_USED_F_NO_NOTIFY = 1
DESC_SIZE = 16
MAX_QUEUE_SIZE = 32768
MAX_CHAIN_BYTES = 0xFFFF_FFFF  # total length must fit the used ring's u32


class DescriptorError(ValueError):
    """A descriptor chain the device refuses; only that request fails."""


@dataclass
class DescriptorChain:
    """A validated chain: the head index and its buffers, copied out of the table once."""

    index: int
    readable: list[tuple[int, int]] = field(default_factory=list)  # (guest addr, len)
    writable: list[tuple[int, int]] = field(default_factory=list)

    def readable_len(self) -> int:
        return sum(n for _, n in self.readable)

    def writable_len(self) -> int:
        return sum(n for _, n in self.writable)


_DESC = struct.Struct("<QIHH")
_USED_ELEM = struct.Struct("<II")


def parse_chain(mem: GuestMemory, desc_table: int, queue_size: int, head: int,
                indirect_allowed: bool = True,
                table_view: memoryview | None = None) -> DescriptorChain:
    """Walk the chain starting at `head`, validating every descriptor.

    A chain has at most `queue_size` buffer descriptors, those of an indirect table
    included (virtio 1.x, 2.7.5.3.1): that bounds the walk (and catches loops) even when an indirect table is
    far larger than the queue, so one kick cannot cost the worker seconds.
    `table_view`, when given, is the descriptor table already mapped (a live queue
    keeps one, so each descriptor is one unpack, not a guest-memory lookup).
    """
    chain = DescriptorChain(head)
    total = 0
    table_size = queue_size
    view = mem.slice(desc_table, DESC_SIZE * queue_size) if table_view is None else table_view
    index = head
    seen = 0
    in_indirect = False
    while True:
        if index >= table_size:
            raise DescriptorError(f"descriptor index {index} out of range ({table_size})")
        seen += 1
        if seen > queue_size:
            raise DescriptorError(
                f"descriptor chain is longer than the queue size {queue_size} (loop?)")
        addr, length, flags, next_index = _DESC.unpack_from(view, index * DESC_SIZE)
        if flags & ~(VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_INDIRECT):
            raise DescriptorError(f"unknown descriptor flags {flags:#x}")
        if flags & VIRTQ_DESC_F_INDIRECT:
            if not indirect_allowed or in_indirect:
                raise DescriptorError("indirect descriptor not allowed here")
            if flags & VIRTQ_DESC_F_NEXT:
                raise DescriptorError("indirect descriptor with NEXT set")
            if length == 0 or length % DESC_SIZE or length // DESC_SIZE > MAX_QUEUE_SIZE:
                raise DescriptorError(f"bad indirect table length {length}")
            if not mem.is_valid_range(addr, length):
                raise DescriptorError(f"indirect table {addr:#x}+{length:#x} outside guest memory")
            view, table_size = mem.slice(addr, length), length // DESC_SIZE
            index, in_indirect = 0, True
            seen -= 1  # the indirect descriptor itself carries no buffer
            continue
        if length == 0:
            raise DescriptorError("zero-length descriptor")
        if not mem.is_valid_range(addr, length):
            raise DescriptorError(f"buffer {addr:#x}+{length:#x} outside guest memory")
        total += length
        if total > MAX_CHAIN_BYTES:
            raise DescriptorError("descriptor chain longer than 4 GiB")
        if flags & VIRTQ_DESC_F_WRITE:
            chain.writable.append((addr, length))
        else:
            if chain.writable:
                raise DescriptorError("readable descriptor after a writable one")
            chain.readable.append((addr, length))
        if not flags & VIRTQ_DESC_F_NEXT:
            return chain
        index = next_index


class QueueError(Exception):
    """The driver broke the ring protocol; the device must be reset (NEEDS_RESET)."""


class QueueConfig:
    """The registers a driver programs for one queue through the transport.

    The transport owns these. At activation `activate()` hands the worker a new `Queue`
    built from them, so nothing the transport does afterwards can reach a live ring.
    """

    def __init__(self, max_size: int) -> None:
        _check_size(max_size)
        self.max_size = max_size
        self.reset()

    def reset(self) -> None:
        self.size = self.max_size
        self.ready = False
        self.vector = 0xFFFF
        self.desc_table = 0
        self.avail_ring = 0
        self.used_ring = 0

    def is_valid(self, mem: GuestMemory, event_idx: bool) -> bool:
        """Layout checks the device does at activation (virtio 2.7)."""
        n = self.size
        if not self.ready:
            return False
        if n == 0 or n > self.max_size or n & (n - 1):
            _guest_log.warning("queue size %d is not a power of two <= %d", n,
                                   self.max_size)
            return False
        extra = 2 if event_idx else 0
        for name, addr, length, align in (("descriptor table", self.desc_table, 16 * n, 16),
                                          ("available ring", self.avail_ring, 6 + 2 * n + extra, 2),
                                          ("used ring", self.used_ring, 6 + 8 * n + extra, 4)):
            if addr % align or not mem.is_valid_range(addr, length):
                _guest_log.warning("virtqueue %s at %#x+%#x is misaligned or outside RAM",
                                       name, addr, length)
                return False
        return True

    def activate(self, event_idx: bool) -> "Queue":
        return Queue(self.size, self.desc_table, self.avail_ring, self.used_ring,
                     vector=self.vector, event_idx=event_idx)


def _check_size(size: int) -> None:
    if size < 1 or size > MAX_QUEUE_SIZE or size & (size - 1):
        raise ValueError(f"queue size {size} is not a power of two <= {MAX_QUEUE_SIZE}")


class Queue:
    """A live split virtqueue: its (validated, frozen) layout and the device's ring
    positions. Owned by exactly one worker."""

    def __init__(self, size: int, desc_table: int = 0, avail_ring: int = 0, used_ring: int = 0,
                 vector: int = 0xFFFF, event_idx: bool = False) -> None:
        _check_size(size)
        self.size = size
        self.desc_table = desc_table
        self.avail_ring = avail_ring
        self.used_ring = used_ring
        self.vector = vector
        self.event_idx = event_idx
        self.next_avail = 0
        self.next_used = 0
        self.signalled_used: int | None = None
        self.used_since_signal = 0  # elements added since the driver was last interrupted
        self._bound: GuestMemory | None = None
        self._views: tuple[memoryview, memoryview, memoryview] | None = None

    def _rings(self, mem: GuestMemory) -> tuple[memoryview, memoryview, memoryview]:
        """The descriptor table and both rings, mapped once per memory (the layout is
        frozen at activation), so the per-chain work is struct unpacks. The rings are
        u16 views: an index the other side reads or writes concurrently must move as
        one 16-bit access (struct packs a byte at a time, after zeroing the field)."""
        if self._bound is not mem:
            n, extra = self.size, (2 if self.event_idx else 0)
            self._views = (mem.slice(self.desc_table, DESC_SIZE * n),
                           mem.slice(self.avail_ring, 4 + 2 * n + extra).cast("H"),
                           mem.slice(self.used_ring, 4 + 8 * n + extra).cast("H"))
            self._bound = mem
        return self._views

    # -- driver → device --------------------------------------------------------
    def avail_idx(self, mem: GuestMemory) -> int:
        return self._rings(mem)[1][1]

    def has_available(self, mem: GuestMemory) -> bool:
        return self.avail_idx(mem) != self.next_avail

    def pop(self, mem: GuestMemory) -> DescriptorChain | None:
        """The next available chain, or None.

        A bad chain is completed with length 0 (the driver gets it back and is
        interrupted) and the next one is tried. A driver that breaks the ring itself
        (an index jump beyond the queue size, a head outside the table) raises
        `QueueError`: the queue cannot be trusted any more.
        """
        desc, avail, _ = self._rings(mem)
        for _ in range(self.size):  # at most a ring's worth of bad chains per call
            pending = (avail[1] - self.next_avail) & 0xFFFF
            if pending == 0:
                return None
            if pending > self.size:
                raise QueueError(f"available index jumped by {pending} (queue size {self.size})")
            head = avail[2 + self.next_avail % self.size]
            if head >= self.size:
                raise QueueError(f"available ring entry {head} is outside the table ({self.size})")
            self.next_avail = (self.next_avail + 1) & 0xFFFF
            try:
                return parse_chain(mem, self.desc_table, self.size, head, table_view=desc)
            except DescriptorError as e:
                _guest_log.warning("dropping bad descriptor chain (head %d): %s", head, e)
                self.add_used(mem, head, 0)
        return None

    def set_avail_event(self, mem: GuestMemory) -> None:
        """With EVENT_IDX, ask for a kick when the driver makes the next buffer available."""
        if self.event_idx:
            self._rings(mem)[2][2 + 4 * self.size] = self.next_avail

    # -- device → driver --------------------------------------------------------
    def add_used(self, mem: GuestMemory, head: int, length: int) -> None:
        used = self._rings(mem)[2]
        slot = 2 + 4 * (self.next_used % self.size)  # in u16 units
        used[slot:slot + 4] = memoryview(_USED_ELEM.pack(head, length)).cast("H")
        self.next_used = (self.next_used + 1) & 0xFFFF
        self.used_since_signal += 1
        # The element is written before the index (x86 does not reorder stores), and
        # the index in one 16-bit store.
        used[1] = self.next_used

    def needs_interrupt(self, mem: GuestMemory) -> bool:
        """Whether the driver wants an interrupt for what was used since the last one."""
        self.used_since_signal = 0
        if self.event_idx:
            used_event = self._rings(mem)[1][2 + self.size]
            old = self.signalled_used
            new = self.next_used
            self.signalled_used = new
            if old is None:
                return True
            # vring_need_event: did the new used index pass used_event?
            return ((new - used_event - 1) & 0xFFFF) < ((new - old) & 0xFFFF)
        flags = self._rings(mem)[1][0]
        return not flags & VIRTQ_AVAIL_F_NO_INTERRUPT
