"""virtio-balloon (virtio 1.x, 5.5; device type 5), as crosvm offers it.

The VMM sets a target (`crosvm balloon SIZE`) in config space and interrupts the
driver; the driver gives pages on the inflate queue (they are punched out of the
guest-memory memfd, so the host gets the memory back) and takes them back on the
deflate queue (they come back as zero pages on first touch). The stats queue carries
the guest's memory statistics; the reporting queue, free pages the guest reports.
Every page is checked before anything is released: it must be RAM in the e820 map
the guest booted with (not the MP or ACPI tables in low memory) and backed by a
guest-memory region.
"""

from __future__ import annotations

import logging
import mmap
import struct
import threading

from crosvm.arch.x86_64 import layout as L
from crosvm.base import Event
from crosvm.base.ratelimit import RateLimitedLog
from crosvm.devices import control as C
from crosvm.devices.virtio import virtio_device as V
from crosvm.devices.virtio.balloon_parse import (MAX_PFN_BYTES, MAX_STATS_BYTES, PAGE_SIZE,
                                                 STAT_FIELDS, containing, page_ranges,
                                                 parse_pfns, parse_stats, usable_ram)
from crosvm.devices.virtio.descriptor_utils import Reader
from crosvm.devices.virtio.queue import DescriptorChain, Queue
from crosvm.vm_memory import GuestMemory

log = logging.getLogger(__name__)
_guest_log = RateLimitedLog(log)

TYPE_BALLOON = 5
QUEUE_SIZE = 128
F_MUST_TELL_HOST, F_STATS_VQ, F_DEFLATE_ON_OOM, F_FREE_PAGE_HINT, F_PAGE_POISON, \
    F_PAGE_REPORTING = range(6)
CONFIG = struct.Struct("<IIII")  # num_pages, actual, free_page_hint_cmd_id, poison_val


def guest_ram(mem: GuestMemory) -> list[tuple[int, int]]:
    """The pages a driver may give back: RAM in the guest's e820 map (for memory of
    `mem`'s size) that `mem` backs, as sorted (address, length) ranges."""
    listed = [(addr, size) for addr, size, kind in L.e820_entries(mem.size)
              if kind == L.E820_RAM and size > 0]
    return usable_ram(listed, [(r.guest_addr, r.size) for r in mem.regions])


def release(mem: GuestMemory, ram: list[tuple[int, int]], addr: int, length: int) -> None:
    """Give guest pages back to the host: punch them out of the memfd (MADV_REMOVE on
    the shared mapping), so every process mapping them sees zero pages next time.
    ValueError, and nothing released, unless the range is page-aligned and wholly
    inside one range of `ram` (from guest_ram)."""
    if addr % PAGE_SIZE or length % PAGE_SIZE or length == 0:
        raise ValueError(f"{addr:#x}+{length:#x} is not whole pages")
    if containing(ram, addr, length) is None:
        raise ValueError(f"{addr:#x}+{length:#x} is not guest RAM")
    for region in mem.regions:
        if region.guest_addr <= addr and addr + length <= region.end:
            region.mapping.madvise(mmap.MADV_REMOVE, addr - region.guest_addr, length)
            return
    raise ValueError(f"{addr:#x}+{length:#x} is not guest RAM")


def read_bounded(mem: GuestMemory, chain: DescriptorChain, limit: int,
                 truncate: bool = False) -> bytes:
    """The readable part of `chain`, never copying more than `limit` bytes: a longer
    one is cut to `limit` if `truncate`, else a ValueError. A chain may name the same
    guest memory many times over (up to 4 GiB), so its length is no bound."""
    length = chain.readable_len()
    if length > limit and not truncate:
        raise ValueError(f"buffer of {length} bytes is longer than {limit}")
    return Reader(mem, chain).read(min(length, limit))


class Balloon(V.VirtioDevice):
    """Inflate, deflate, stats and (optionally) free-page reporting queues."""

    device_type = TYPE_BALLOON
    seccomp_policy = "balloon_device"

    def __init__(self, page_reporting: bool = False, deflate_on_oom: bool = True) -> None:
        self.page_reporting = page_reporting
        self.deflate_on_oom = deflate_on_oom
        self.acked_features = 0
        self.num_pages = 0      # the target the VMM set
        self.actual = 0         # what the driver says it holds
        self.stats: dict[str, int] = {}
        self.stats_generation = 0
        self._stats_chain: DescriptorChain | None = None
        self._stats_wanted = Event()  # the VMM asked for fresh stats
        self._lock = threading.Lock()
        self.released_bytes = 0
        self._ram: list[tuple[int, int]] = []  # guest_ram(), set on activation

    def debug_label(self) -> str:
        return "balloon"

    def queue_max_sizes(self) -> list[int]:
        return [QUEUE_SIZE] * (4 if self.page_reporting else 3)

    def keep_fds(self) -> list[int]:
        return [self._stats_wanted.fd]

    def features(self) -> int:
        bits = V.BASE_FEATURES | 1 << F_STATS_VQ
        if self.deflate_on_oom:
            bits |= 1 << F_DEFLATE_ON_OOM
        if self.page_reporting:
            bits |= 1 << F_PAGE_REPORTING
        return bits

    def config_bytes(self) -> bytes:
        return CONFIG.pack(self.num_pages, self.actual, 0, 0)

    def write_config(self, offset: int, data: bytes | memoryview) -> None:
        # Only `actual` (offset 4) is the driver's to write.
        if offset == 4 and len(data) == 4:
            self.actual = int.from_bytes(bytes(data), "little")
        else:
            _guest_log.warning("balloon: ignored config write at %#x (%d bytes)", offset,
                               len(data))

    # -- requests from the VMM ----------------------------------------------------------
    def control(self, code: int, arg: int) -> tuple[bytes, bool]:
        if code == C.CTRL_BALLOON_ADJUST:
            if arg >= 1 << 32:
                raise C.DeviceControlError(f"balloon target of {arg} pages is too large")
            self.num_pages = arg
            return b"", True
        if code == C.CTRL_BALLOON_ACTUAL:
            return C.ACTUAL.pack(self.actual), False
        if code == C.CTRL_BALLOON_STATS:
            if arg:
                self._stats_wanted.signal()
            with self._lock:
                mask = 0
                values = []
                for i, name in enumerate(STAT_FIELDS):
                    if name in self.stats:
                        mask |= 1 << i
                    values.append(self.stats.get(name, 0) & ((1 << 64) - 1))
                values += [0] * (C.NUM_STATS - len(values))
                return C.STATS.pack(self.stats_generation, self.actual, mask, *values), False
        return super().control(code, arg)

    # -- queues -------------------------------------------------------------------------
    def _inflate(self, mem: GuestMemory, chain: DescriptorChain) -> int:
        try:
            pfns = parse_pfns(read_bounded(mem, chain, MAX_PFN_BYTES))
            # All or nothing: page_ranges checks every page before any is released.
            for addr, length in page_ranges(pfns, self._ram):
                release(mem, self._ram, addr, length)
                self.released_bytes += length
        except ValueError as e:
            _guest_log.warning("balloon: bad inflate buffer: %s", e)
        return 0

    def _deflate(self, mem: GuestMemory, chain: DescriptorChain) -> int:
        # Nothing to do: a released page reads as zeroes when the guest touches it.
        try:
            parse_pfns(read_bounded(mem, chain, MAX_PFN_BYTES))
        except ValueError as e:
            _guest_log.warning("balloon: bad deflate buffer: %s", e)
        return 0

    def _report(self, mem: GuestMemory, chain: DescriptorChain) -> int:
        # Each device-writable descriptor (Linux adds the reported pages as in-buffers)
        # is a free range the guest will not touch until the chain is used. Ranges are
        # released one by one: a bad one costs only itself.
        for addr, length in chain.writable:
            try:
                release(mem, self._ram, addr, length)
                self.released_bytes += length
            except ValueError as e:
                _guest_log.warning("balloon: bad reported range: %s", e)
        return 0

    def _take_stats(self, mem: GuestMemory, queue: Queue, interrupt: V.Interrupt) -> None:
        chain = queue.pop(mem)
        if chain is None:
            return
        if self._stats_chain is not None:  # a driver that sends two: give back the old
            queue.add_used(mem, self._stats_chain.index, 0)
        try:
            stats = parse_stats(read_bounded(mem, chain, MAX_STATS_BYTES, truncate=True))
        except ValueError as e:
            _guest_log.warning("balloon: bad stats buffer: %s", e)
            stats = {}
        with self._lock:
            self.stats = stats
            self.stats_generation += 1
        self._stats_chain = chain
        V.signal_used(mem, queue, interrupt)

    def _request_stats(self, mem: GuestMemory, queue: Queue, interrupt: V.Interrupt) -> None:
        self._stats_wanted.drain()
        if self._stats_chain is not None:
            # Handing the buffer back is the request: the driver refills and re-adds it.
            queue.add_used(mem, self._stats_chain.index, 0)
            self._stats_chain = None
            interrupt.signal_used_queue(queue.vector)

    def activate(self, mem: GuestMemory, interrupt: V.Interrupt,
                 queues: list[tuple[int, Queue, Event]]) -> None:
        self._ram = guest_ram(mem)
        # Queue roles follow the negotiated features (5.5.2): the stats and reporting
        # queues exist only when their feature is on.
        roles = ["inflate", "deflate"]
        if self.acked_features >> F_STATS_VQ & 1:
            roles.append("stats")
        if self.acked_features >> F_PAGE_REPORTING & 1:
            roles.append("report")
        by_role = {roles[i]: (q, e) for i, q, e in queues if i < len(roles)}
        handlers = {"inflate": self._inflate, "deflate": self._deflate,
                    "report": self._report}
        events = []
        serve = {}
        for index, (role, (queue, event)) in enumerate(by_role.items()):
            events.append((index, event))
            if role == "stats":
                serve[index] = lambda q=queue: self._take_stats(mem, q, interrupt)
            else:
                serve[index] = (lambda q=queue, h=handlers[role]:
                                V.process_queue(mem, q, interrupt, lambda c: h(mem, c)))
        extra = []
        if "stats" in by_role:
            stats_queue = by_role["stats"][0]
            extra.append((self._stats_wanted.fd,
                          lambda: self._request_stats(mem, stats_queue, interrupt)))
        self.worker = V.QueueWorker("v_balloon", interrupt, events,
                                    lambda i: serve[i](), extra)

    def reset(self) -> bool:
        super().reset()
        self._stats_chain = None
        self.actual = 0
        return True
