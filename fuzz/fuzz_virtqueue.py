"""Fuzz target: split virtqueues (crosvm/devices/virtio/queue.py) against a hostile driver.

The input lays out one queue (its size and the three ring addresses, checked by
`QueueConfig.is_valid` as at activation), writes the descriptor table, extra
(indirect) tables and the available ring, then kicks `process_queue` a few times,
moving the available index between kicks. Invariants:
  * only DescriptorError (inside pop) and QueueError come out of the queue code;
  * every chain handed to the device has its head in the table and its buffers in RAM;
  * process_queue returns, and every used element names a head in the table.
"""

from __future__ import annotations

import atheris

from crosvm.devices.virtio.queue import QueueConfig, QueueError
from crosvm.devices.virtio.virtio_device import Interrupt, process_queue

from fuzz import guest


def _layout(fdp: atheris.FuzzedDataProvider, cfg: QueueConfig) -> None:
    n = cfg.size
    if fdp.ConsumeIntInRange(0, 3):  # the layout Linux uses, somewhere in RAM
        base = fdp.ConsumeIntInRange(0, guest.RAM_END) & ~0xFFF
        cfg.desc_table = base
        cfg.avail_ring = base + 16 * n
        cfg.used_ring = (cfg.avail_ring + 6 + 2 * n + 4095) & ~4095
    else:
        cfg.desc_table = guest.guest_addr(fdp)
        cfg.avail_ring = guest.guest_addr(fdp)
        cfg.used_ring = guest.guest_addr(fdp)


def one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    mem = guest.clean_memory()
    cfg = QueueConfig(256)
    cfg.size = 1 << fdp.ConsumeIntInRange(0, 8) if fdp.ConsumeIntInRange(0, 15) else fdp.ConsumeIntInRange(0, 0xFFFF)
    cfg.ready = True
    event_idx = fdp.ConsumeBool()
    _layout(fdp, cfg)
    if not cfg.is_valid(mem, event_idx):
        return
    queue = cfg.activate(event_idx)
    size = queue.size

    guest.write_table(mem, fdp, queue.desc_table, size)
    for _ in range(fdp.ConsumeIntInRange(0, 3)):
        if fdp.ConsumeBool():
            guest.write_pattern_table(mem, fdp)
        else:
            guest.write_table(mem, fdp, fdp.ConsumeIntInRange(0, guest.RAM_END) & ~0xF,
                              fdp.ConsumeIntInRange(1, 64))
    mem.write_int(queue.avail_ring, fdp.ConsumeIntInRange(0, 1), 2)  # flags
    for slot in range(size):
        head = fdp.ConsumeIntInRange(0, size - 1) if fdp.ConsumeIntInRange(0, 15) else fdp.ConsumeIntInRange(0, 0xFFFF)
        mem.write_int(queue.avail_ring + 4 + 2 * slot, head, 2)
    if event_idx:
        mem.write_int(queue.avail_ring + 4 + 2 * size, fdp.ConsumeIntInRange(0, 0xFFFF), 2)

    served: dict[int, int] = {}
    add_used = queue.add_used

    def checked_add_used(m, head: int, length: int) -> None:
        assert 0 <= head < size, f"used element names head {head} (queue size {size})"
        expected = served.pop(head, 0)
        assert length == expected, (head, length, expected)
        add_used(m, head, length)

    queue.add_used = checked_add_used

    def handle_chain(chain) -> int:
        guest.check_chain(mem, chain, size)
        written = fdp.ConsumeIntInRange(0, chain.writable_len())
        served[chain.index] = written
        return written

    interrupt = Interrupt(None, None)
    avail = 0
    for _ in range(fdp.ConsumeIntInRange(1, 4)):
        step = fdp.ConsumeIntInRange(0, size) if fdp.ConsumeIntInRange(0, 7) else fdp.ConsumeIntInRange(0, 0xFFFF)
        avail = (avail + step) & 0xFFFF
        mem.write_int(queue.avail_ring + 2, avail, 2)
        budget = None if fdp.ConsumeBool() else fdp.ConsumeIntInRange(0, 4 * size)
        try:
            more = process_queue(mem, queue, interrupt, handle_chain, budget=budget)
        except QueueError:
            return  # the device goes NEEDS_RESET; the worker ends
        assert isinstance(more, bool)
