"""Fuzz target: the virtio-pci transport (crosvm/devices/virtio/virtio_pci.py) around Rng.

A sequence of BAR0 reads and writes (common config, ISR, device config, notify,
MSI-X table and PBA), config-space accesses, and a few macros a driver would do
(lay out the selected queue, negotiate features, post buffers and kick) runs against
a device whose worker thread is live. Invariants: nothing escapes the transport
(WorkerStuck included); queue registers do not change while the device is active;
status bits are cleared only by a reset; NEEDS_RESET is the device's alone and reads
back exactly when the device set it; MSI-X routes name only the device's vectors; no
worker thread outlives the device.
"""

from __future__ import annotations

import struct
import threading

import atheris

from crosvm.base import Event
from crosvm.devices.virtio import virtio_device as V
from crosvm.devices.virtio import virtio_pci as VP
from crosvm.devices.virtio.queue import VIRTQ_DESC_F_WRITE
from crosvm.devices.virtio.rng import Rng

from fuzz import guest

WINDOWS = [(VP.COMMON_OFFSET, VP.COMMON_SIZE), (VP.ISR_OFFSET, 4), (VP.DEVICE_OFFSET, 0x20),
           (VP.NOTIFY_OFFSET, 0x10), (VP.MSIX_TABLE_OFFSET, 0x40), (VP.MSIX_PBA_OFFSET, 0x10),
           (0, VP.BAR_SIZE)]
FIELDS = list(VP.COMMON_FIELDS.items())
QUEUE_REGS = ("size", "ready", "vector", "desc_table", "avail_ring", "used_ring")


def _offset(fdp: atheris.FuzzedDataProvider) -> int:
    base, size = WINDOWS[fdp.ConsumeIntInRange(0, len(WINDOWS) - 1)]
    return base + fdp.ConsumeIntInRange(0, size - 1)


def _size(fdp: atheris.FuzzedDataProvider) -> int:
    return (1, 2, 4, 8)[fdp.ConsumeIntInRange(0, 3)] if fdp.ConsumeIntInRange(0, 7) else fdp.ConsumeIntInRange(0, 9)


def _write_field(dev: VP.VirtioPciDevice, name: str, value: int) -> None:
    off, size = VP.COMMON_FIELDS[name]
    dev.write_bar(0, off, (value & ((1 << 8 * size) - 1)).to_bytes(size, "little"))


def _read_status(dev: VP.VirtioPciDevice) -> int:
    data = memoryview(bytearray(1))
    dev.read_bar(0, VP.COMMON_FIELDS["device_status"][0], data)
    return data[0]


def one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    mem = guest.clean_memory()
    threads_before = threading.active_count()
    routes: list[tuple[int, int, int]] = []
    irqfds = [Event(), Event()]
    dev = VP.VirtioPciDevice(Rng(), mem, irqfds, lambda *a: routes.append(a))
    try:
        _run(fdp, dev, routes)
        _write_field(dev, "device_status", 0)
        assert dev.device.worker is None and not dev.activated
    finally:
        dev.close()
        for e in irqfds + dev.queue_events:
            e.close()
    assert threading.active_count() == threads_before, "a worker thread outlived its device"


def _run(fdp: atheris.FuzzedDataProvider, dev: VP.VirtioPciDevice, routes: list) -> None:
    mem = dev.mem
    frozen = None
    next_buf = 0x20000
    for _ in range(fdp.ConsumeIntInRange(1, 40)):
        old_status = dev.status
        reset = False
        op = fdp.ConsumeIntInRange(0, 9)
        if op == 0:
            n = _size(fdp)
            buf = memoryview(bytearray(n))
            dev.read_bar(0, _offset(fdp), buf)
            assert len(buf) == n
        elif op == 1:
            off, n = _offset(fdp), _size(fdp)
            payload = fdp.ConsumeBytes(n).ljust(n, b"\0")
            reset = (off <= VP.COMMON_FIELDS["device_status"][0] < off + n
                     and payload[VP.COMMON_FIELDS["device_status"][0] - off] == 0)
            dev.write_bar(0, off, payload)
        elif op == 2:
            name, _ = FIELDS[fdp.ConsumeIntInRange(0, len(FIELDS) - 1)]
            value = fdp.ConsumeIntInRange(0, 0xFF) if fdp.ConsumeBool() else fdp.ConsumeIntInRange(0, (1 << 64) - 1)
            reset = name == "device_status" and value & 0xFF == 0
            _write_field(dev, name, value)
        elif op == 3:
            reg = fdp.ConsumeIntInRange(0, 70) if fdp.ConsumeIntInRange(0, 7) else fdp.ConsumeIntInRange(-2, 2000)
            off, n = fdp.ConsumeIntInRange(0, 4), (1, 2, 4)[fdp.ConsumeIntInRange(0, 2)]
            dev.write_config_register(reg, off, fdp.ConsumeBytes(n).ljust(n, b"\0"))
        elif op == 4:
            value = dev.read_config_register(fdp.ConsumeIntInRange(-2, 1100))
            assert 0 <= value <= 0xFFFF_FFFF
        elif op == 5:  # lay out the selected queue somewhere in RAM and enable it
            size = 1 << fdp.ConsumeIntInRange(0, 8)
            base = fdp.ConsumeIntInRange(0, 0x1F) << 12
            _write_field(dev, "queue_size", size)
            _write_field(dev, "queue_desc", base)
            _write_field(dev, "queue_driver", base + 16 * size)
            _write_field(dev, "queue_device", (base + 16 * size + 6 + 2 * size + 4095) & ~4095)
            _write_field(dev, "queue_msix_vector", fdp.ConsumeIntInRange(0, 2))
            _write_field(dev, "queue_enable", 1)
        elif op == 6:  # negotiate features and go
            features = dev.device.features() & fdp.ConsumeIntInRange(0, (1 << 64) - 1) | 1 << V.VIRTIO_F_VERSION_1
            for sel in (0, 1):
                _write_field(dev, "driver_feature_select", sel)
                _write_field(dev, "driver_feature", features >> 32 * sel)
            for status in (1, 3, 11, 15):
                _write_field(dev, "device_status", status | (old_status if fdp.ConsumeBool() else 0))
        elif op == 7:  # post a buffer on the live ring (if any) and kick
            q = dev.queues[0]
            n = fdp.ConsumeIntInRange(1, 512)
            if q.ready and mem.is_valid_range(q.avail_ring, 6 + 2 * q.size) and q.size and not q.size & (q.size - 1) and next_buf + n < 0x40000:
                idx = mem.read_int(q.avail_ring + 2, 2)
                slot = idx % q.size
                mem.write(q.desc_table + 16 * slot if mem.is_valid_range(q.desc_table + 16 * slot, 16) else 0,
                          struct.pack("<QIHH", next_buf, n, VIRTQ_DESC_F_WRITE, 0))
                mem.write_int(q.avail_ring + 4 + 2 * slot, slot, 2)
                mem.write_int(q.avail_ring + 2, (idx + 1) & 0xFFFF, 2)
                next_buf += n
            dev.write_bar(0, VP.NOTIFY_OFFSET + fdp.ConsumeIntInRange(0, 8), b"\0\0")
        elif op == 8:  # MSI-X enable / function mask
            dev.write_config_register(dev.msix_cap // 4, 2,
                                      struct.pack("<H", fdp.ConsumeIntInRange(0, 3) << 14))
        else:
            reset = True
            _write_field(dev, "device_status", 0)

        # -- invariants ---------------------------------------------------------------
        assert not dev.status & V.STATUS_NEEDS_RESET, "the driver set NEEDS_RESET"
        if reset:
            assert dev.status == 0 and not dev.activated and dev.device.worker is None
        else:
            assert dev.status & old_status == old_status, \
                f"status bits cleared without a reset ({old_status:#x} -> {dev.status:#x})"
        status = _read_status(dev)
        assert bool(status & V.STATUS_NEEDS_RESET) == dev.broken
        for vector, _, _ in routes:
            assert 0 <= vector < dev.msix.num_vectors, vector
        if dev.activated:
            regs = [tuple(getattr(q, r) for r in QUEUE_REGS) for q in dev.queues]
            if frozen is None:
                frozen = regs
            assert regs == frozen, "queue registers changed while the device is active"
        else:
            frozen = None
