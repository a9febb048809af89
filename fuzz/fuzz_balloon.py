"""Fuzz target: virtio-balloon (crosvm/devices/virtio/balloon.py) fed by a hostile driver.

Inflate buffers of PFNs (in RAM, in the hole between regions, past the end, any u32,
partial), stats buffers of any bytes, and the VMM's stats/adjust requests in between.
Invariants: nothing escapes the worker's handlers; a canary page is released only when
a buffer naming it had every PFN in RAM; every chain comes back used with length 0.
"""

from __future__ import annotations

import struct

import atheris

from crosvm.devices import control as C
from crosvm.devices.virtio.balloon import Balloon
from crosvm.devices.virtio.balloon_parse import PAGE_SHIFT
from crosvm.devices.virtio.virtio_device import Interrupt

from fuzz import guest

CANARY_PAGES = range(0x50, 0x60)  # the second RAM region
MARK = b"\xab" * (1 << PAGE_SHIFT)


def _in_ram(pfn: int) -> bool:
    return any(a <= pfn << PAGE_SHIFT < a + n for a, n in guest.RAM_RANGES)


def _pfn(fdp: atheris.FuzzedDataProvider) -> int:
    # Never below 0x40: a driver that balloons its own rings breaks them (QueueError,
    # the device's right answer), which would hide everything after it.
    if fdp.ConsumeIntInRange(0, 7) == 0:
        return fdp.ConsumeIntInRange(0x40, (1 << 32) - 1)
    return fdp.ConsumeIntInRange(0x40, 0x68)  # the hole, the canaries, past the end


def one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    mem = guest.clean_memory()
    for page in CANARY_PAGES:
        mem.write(page << PAGE_SHIFT, MARK)
    dev = Balloon()
    dev.ack_features(dev.features())
    inflate = guest.Driver(mem, 16, base=0x1000, start=0x8000, end=0x20000)
    stats = guest.Driver(mem, 4, base=0x20000, start=0x28000, end=0x40000)
    deflate = guest.Driver(mem, 4, base=0x30000, start=0x38000, end=0x3C000)
    handle, extra = guest.activate_sync(dev, mem, Interrupt(None, None),
                                        [(0, inflate.q.queue, None), (1, deflate.q.queue, None),
                                         (2, stats.q.queue, None)])
    named_ok: set[int] = set()
    for _ in range(fdp.ConsumeIntInRange(1, 6)):
        choice = fdp.ConsumeIntInRange(0, 3)
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
        else:
            deflate.post([fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 40))], [], False)
            while handle(1):
                pass
    for head, length, _ in inflate.used() + deflate.used():
        assert length == 0, (head, length)
    for page in CANARY_PAGES:
        if mem.read(page << PAGE_SHIFT, len(MARK)) != MARK:
            assert page in named_ok, f"page {page:#x} released without a valid request"
