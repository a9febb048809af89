"""Fuzz target: virtio-balloon (crosvm/devices/virtio/balloon.py) fed by a hostile driver.

Inflate buffers of PFNs (in RAM, in the hole between regions, past the end, any u32,
partial), inflate chains naming one PFN buffer many times over (past the PFN bound),
free-page reports of any mix of readable and writable, aligned and unaligned ranges,
stats buffers of any bytes, and the VMM's stats/adjust requests in between.
Invariants: nothing escapes the worker's handlers; a canary page is released only when
a buffer within the bound named it and had every PFN in RAM, or a writable whole-page
range on the reporting queue covered it; every chain comes back used with length 0.
"""

from __future__ import annotations

import struct

import atheris

from crosvm.devices import control as C
from crosvm.devices.virtio.balloon import Balloon
from crosvm.devices.virtio.balloon_parse import MAX_PFN_BYTES, PAGE_SHIFT, PAGE_SIZE
from crosvm.devices.virtio.queue import VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE
from crosvm.devices.virtio.virtio_device import Interrupt

from fuzz import guest

CANARY_PAGES = range(0x50, 0x60)  # the second RAM region
MARK = b"\xab" * (1 << PAGE_SHIFT)
SCRATCH = 0x8000  # inflate's data area: free whenever a chain has been handled


def _in_ram(pfn: int) -> bool:
    return any(a <= pfn << PAGE_SHIFT < a + n for a, n in guest.RAM_RANGES)


def _pfn(fdp: atheris.FuzzedDataProvider) -> int:
    # Never below 0x40: a driver that balloons its own rings breaks them (QueueError,
    # the device's right answer), which would hide everything after it.
    if fdp.ConsumeIntInRange(0, 7) == 0:
        return fdp.ConsumeIntInRange(0x40, (1 << 32) - 1)
    return fdp.ConsumeIntInRange(0x40, 0x68)  # the hole, the canaries, past the end


def _post_raw(drv: guest.Driver, descs: list[tuple[int, int, int]]) -> int | None:
    """Post (address, length, flags) descriptors as one chain, whatever they overlap;
    None if the queue has no room."""
    if not descs or drv.in_flight_descs + len(descs) > drv.q.size:
        return None
    head = drv.q.next_desc
    for i, (addr, length, flags) in enumerate(descs):
        index = (head + i) % drv.q.size
        more = VIRTQ_DESC_F_NEXT if i + 1 < len(descs) else 0
        drv.q.write_desc(index, addr, length, flags | more, (index + 1) % drv.q.size)
    drv.q.next_desc = (head + len(descs)) % drv.q.size
    drv.q.publish(head)
    drv.outstanding[head] = (len(descs), [])
    drv.in_flight_descs += len(descs)
    return head


def _repeated_inflate(fdp: atheris.FuzzedDataProvider, inflate: guest.Driver) -> set[int]:
    """One PFN buffer named by up to 16 descriptors; the pages it may release."""
    pfns = [_pfn(fdp) for _ in range(fdp.ConsumeIntInRange(1, 8))]
    length = fdp.ConsumeIntInRange(1, 0x2000) * 4  # up to 32 KiB: 16 of them pass the bound
    count = fdp.ConsumeIntInRange(1, 16)
    raw = struct.pack(f"<{len(pfns)}I", *pfns) * (length // (4 * len(pfns)) + 1)
    inflate.q.mem.write(SCRATCH, raw[:length])
    named = set(struct.unpack(f"<{length // 4}I", raw[:length]))
    if _post_raw(inflate, [(SCRATCH, length, 0)] * count) is None:
        return set()
    if length * count <= MAX_PFN_BYTES and all(_in_ram(p) for p in named):
        return named
    return set()


def _report(fdp: atheris.FuzzedDataProvider, report: guest.Driver) -> set[int]:
    """A reporting chain of ranges over the canaries; the pages it may release."""
    descs = []
    for _ in range(fdp.ConsumeIntInRange(1, 4)):
        page = fdp.ConsumeIntInRange(CANARY_PAGES.start, CANARY_PAGES.stop - 1)
        addr = (page << PAGE_SHIFT) + (fdp.ConsumeIntInRange(1, PAGE_SIZE - 1)
                                       if fdp.ConsumeIntInRange(0, 7) == 0 else 0)
        room = (CANARY_PAGES.stop << PAGE_SHIFT) - addr
        length = min(room, fdp.ConsumeIntInRange(1, 4) * PAGE_SIZE
                     - (fdp.ConsumeIntInRange(1, 64) if fdp.ConsumeIntInRange(0, 7) == 0 else 0))
        descs.append((addr, length, VIRTQ_DESC_F_WRITE if fdp.ConsumeIntInRange(0, 3) else 0))
    descs.sort(key=lambda d: d[2])  # readable first, as a chain must have them
    if _post_raw(report, descs) is None:
        return set()
    return {addr + off >> PAGE_SHIFT for addr, length, flags in descs
            if flags and not addr % PAGE_SIZE and not length % PAGE_SIZE
            for off in range(0, length, PAGE_SIZE)}


def one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    mem = guest.clean_memory()
    for page in CANARY_PAGES:
        mem.write(page << PAGE_SHIFT, MARK)
    dev = Balloon(page_reporting=True)
    dev.ack_features(dev.features())
    inflate = guest.Driver(mem, 16, base=0x1000, start=0x8000, end=0x20000)
    stats = guest.Driver(mem, 4, base=0x20000, start=0x28000, end=0x30000)
    deflate = guest.Driver(mem, 4, base=0x30000, start=0x38000, end=0x3C000)
    report = guest.Driver(mem, 4, base=0x3C000, start=0x3E000, end=0x3E000)
    handle, extra = guest.activate_sync(dev, mem, Interrupt(None, None),
                                        [(0, inflate.q.queue, None), (1, deflate.q.queue, None),
                                         (2, stats.q.queue, None), (3, report.q.queue, None)])
    named_ok: set[int] = set()
    for _ in range(fdp.ConsumeIntInRange(1, 6)):
        choice = fdp.ConsumeIntInRange(0, 5)
        if choice == 0:
            pfns = [_pfn(fdp) for _ in range(fdp.ConsumeIntInRange(0, 8))]
            raw = struct.pack(f"<{len(pfns)}I", *pfns)
            if fdp.ConsumeBool():
                raw += fdp.ConsumeBytes(3)
            if inflate.post([raw], [], fdp.ConsumeBool()) is not None:
                if raw and len(raw) % 4 == 0 and all(_in_ram(p) for p in pfns):
                    named_ok.update(pfns)
            while handle(0):
                pass
        elif choice == 1:
            stats.post([fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 120))], [], False)
            handle(2)
        elif choice == 2:
            payload, _ = dev.control(C.CTRL_BALLOON_STATS, int(fdp.ConsumeBool()))
            assert len(payload) == C.STATS.size
            for callback in extra.values():
                callback()
        elif choice == 3:
            deflate.post([fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 40))], [], False)
            while handle(1):
                pass
        elif choice == 4:
            named_ok |= _repeated_inflate(fdp, inflate)
            while handle(0):
                pass
        else:
            named_ok |= _report(fdp, report)
            while handle(3):
                pass
    for head, length, _ in inflate.used() + deflate.used() + report.used():
        assert length == 0, (head, length)
    for page in CANARY_PAGES:
        if mem.read(page << PAGE_SHIFT, len(MARK)) != MARK:
            assert page in named_ok, f"page {page:#x} released without a valid request"
