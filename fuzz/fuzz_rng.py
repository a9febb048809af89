"""Fuzz target: virtio-rng (crosvm/devices/virtio/rng.py) fed chains by a hostile driver.

Chains of readable and writable buffers (zero-length ones, indirect tables, up to a
queue's worth of descriptors) are posted and the queue kicked, as the worker does.
Invariants: nothing escapes the worker's handler; a good chain comes back with every
writable byte filled (urandom is never short) and its readable buffers untouched; a
bad chain comes back with length 0.
"""

from __future__ import annotations

import atheris

from crosvm.devices.virtio.rng import Rng
from crosvm.devices.virtio.virtio_device import Interrupt

from fuzz import guest

_rng: Rng | None = None


def one_input(data: bytes) -> None:
    global _rng
    if _rng is None:
        _rng = Rng()  # one urandom fd per process
    fdp = atheris.FuzzedDataProvider(data)
    mem = guest.clean_memory()
    size = 1 << fdp.ConsumeIntInRange(0, 8)
    drv = guest.Driver(mem, size, base=0x1000, start=0x8000, end=0x40000)
    handle, _ = guest.activate_sync(_rng, mem, Interrupt(None, None), [(0, drv.q.queue, None)])
    posted: dict[int, tuple[list[tuple[int, bytes]], int, bool]] = {}
    for _ in range(fdp.ConsumeIntInRange(1, 6)):
        for _ in range(fdp.ConsumeIntInRange(0, 4)):
            readable = [fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 32))
                        for _ in range(fdp.ConsumeIntInRange(0, 2))]
            big = fdp.ConsumeBool()
            writable = [fdp.ConsumeIntInRange(0, 0x2000 if big else 64)
                        for _ in range(fdp.ConsumeIntInRange(0, 300 if not big else 8))]
            indirect = fdp.ConsumeBool()
            head = drv.post(readable, writable, indirect)
            if head is None:
                continue
            # Bad: a zero-length buffer, or more buffers than the queue size (indirect).
            good = all(readable) and all(writable) and len(readable) + len(writable) <= size
            read_addrs = [(desc_addr, b) for desc_addr, b in _readable_addrs(drv, head, readable, indirect)]
            posted[head] = (read_addrs, sum(writable), good)
        while handle(0):
            pass
        for head, length, _ in drv.used():
            read_addrs, want, good = posted.pop(head)
            assert length == (want if good else 0), (head, length, want, good)
            for addr, content in read_addrs:
                assert mem.read(addr, len(content)) == content, "rng wrote a readable buffer"


def _readable_addrs(drv: guest.Driver, head: int, readable: list[bytes],
                    indirect: bool) -> list[tuple[int, bytes]]:
    """Where the driver put the chain's readable buffers (from its descriptors)."""
    mem = drv.q.mem
    table, index = drv.q.queue.desc_table, head
    if indirect:
        table = mem.read_int(table + 16 * head, 8)
        index = 0
    out = []
    for i, content in enumerate(readable):
        slot = index + i if indirect else (head + i) % drv.q.size
        out.append((mem.read_int(table + 16 * slot, 8), content))
    return out
