"""PCI config space, config access mechanisms, MSI-X and the virtio-pci transport."""

from __future__ import annotations

import struct

import pytest

from crosvm.base import Event
from crosvm.devices.pci import BarType, MsixConfig, PciBar, PciConfigIo, PciConfigMmio, PciRoot
from crosvm.devices.pci.config import PciConfigError, PciConfiguration
from crosvm.devices.pvpanic import PvPanic
from crosvm.devices.virtio import virtio_device as V
from crosvm.devices.virtio import virtio_pci as VP
from crosvm.devices.virtio.rng import Rng
from crosvm.vm_memory import GuestMemory


def cfg_read(io: PciConfigIo, dev: int, reg: int, size: int = 4) -> int:
    io.write(0, 0xCF8, struct.pack("<I", 1 << 31 | dev << 11 | reg & ~3))
    data = memoryview(bytearray(size))
    io.read(4 + (reg & 3), 0xCFC + (reg & 3), data)
    return int.from_bytes(data, "little")


def cfg_write(io: PciConfigIo, dev: int, reg: int, value: int, size: int = 4) -> None:
    io.write(0, 0xCF8, struct.pack("<I", 1 << 31 | dev << 11 | reg & ~3))
    io.write(4 + (reg & 3), 0xCFC + (reg & 3), value.to_bytes(size, "little"))


@pytest.fixture
def root_with_pvpanic():
    root = PciRoot()
    dev = PvPanic(lambda: None)
    root.add_device(dev)
    bar = dev.bar_specs()[0]
    bar.address = 0xD000_0000
    dev.assign_bars([bar])
    return root, dev


def test_host_bridge_answers_at_00_0():
    io = PciConfigIo(PciRoot())
    assert cfg_read(io, 0, 0) == 0x0D57_8086


def test_empty_slot_reads_all_ones():
    io = PciConfigIo(PciRoot())
    assert cfg_read(io, 7, 0) == 0xFFFF_FFFF


def test_config_address_disabled_reads_all_ones(root_with_pvpanic):
    io = PciConfigIo(root_with_pvpanic[0])
    io.write(0, 0xCF8, struct.pack("<I", 1 << 11))  # enable bit clear
    data = memoryview(bytearray(4))
    io.read(4, 0xCFC, data)
    assert bytes(data) == b"\xff" * 4


def test_slots_are_assigned_in_order():
    root = PciRoot()
    slots = [root.add_device(PvPanic(lambda: None)).dev for _ in range(3)]
    assert slots == [1, 2, 3]


def test_bar_sizing_returns_size_mask(root_with_pvpanic):
    io = PciConfigIo(root_with_pvpanic[0])
    cfg_write(io, 1, 0x10, 0xFFFF_FFFF)
    assert cfg_read(io, 1, 0x10) == 0xFFFF_FFF0   # 16-byte 32-bit memory BAR


def test_bar_keeps_programmed_address(root_with_pvpanic):
    io = PciConfigIo(root_with_pvpanic[0])
    assert cfg_read(io, 1, 0x10) == 0xD000_0000


def test_64bit_bar_reports_type_and_upper_half():
    config = PciConfiguration(1, 2, 3, 4)
    config.add_bar(PciBar(0, 0x8000, BarType.MEM64, address=0x1_0000_8000))
    assert (config.read_reg(4), config.read_reg(5)) == (0x8004, 1)


def test_misaligned_bar_is_a_setup_error():
    with pytest.raises(PciConfigError):
        PciConfiguration(1, 2, 3, 4).add_bar(PciBar(0, 0x1000, address=0x800))


def test_vendor_id_is_read_only(root_with_pvpanic):
    io = PciConfigIo(root_with_pvpanic[0])
    cfg_write(io, 1, 0, 0x1234_5678)
    assert cfg_read(io, 1, 0) == 0x0011_1B36


def test_command_register_accepts_memory_enable(root_with_pvpanic):
    io = PciConfigIo(root_with_pvpanic[0])
    cfg_write(io, 1, 0x04, 0x0006, size=2)
    assert cfg_read(io, 1, 0x04, size=2) == 0x0006


def test_ecam_reads_same_register_as_port_io(root_with_pvpanic):
    ecam = PciConfigMmio(root_with_pvpanic[0])
    data = memoryview(bytearray(4))
    ecam.read(1 << 15, 0, data)
    assert int.from_bytes(data, "little") == 0x0011_1B36


def test_ecam_byte_read_of_class():
    ecam = PciConfigMmio(PciRoot())
    data = memoryview(bytearray(1))
    ecam.read(0x0B, 0, data)  # host bridge class code byte
    assert data[0] == 0x06


def test_reset_port_byte_write_is_forwarded():
    seen = []
    port = type("Port", (), {"write": lambda self, o, a, d: seen.append(bytes(d)),
                             "read": lambda self, o, a, d: None})()
    io = PciConfigIo(PciRoot(), port)
    io.write(1, 0xCF9, b"\x06")
    assert seen == [b"\x06"]


def capability_ids(config: PciConfiguration) -> list[int]:
    ids, ptr = [], config.read_reg(0x34 // 4) & 0xFF
    while ptr:
        word = config.read_reg(ptr // 4) >> (8 * (ptr % 4))
        ids.append(word & 0xFF)
        ptr = (word >> 8) & 0xFF
    return ids


@pytest.fixture
def mem():
    m = GuestMemory([(0, 1 << 20)])
    yield m
    m.close()


@pytest.fixture
def rng_pci(mem):
    routes = []
    dev = VP.VirtioPciDevice(Rng(), mem, [Event(), Event()], lambda *a: routes.append(a))
    dev.routes = routes
    yield dev
    dev.close()


def test_virtio_pci_ids(rng_pci):
    c = rng_pci.config
    assert (c.vendor_id, c.device_id, c.read_reg(2) & 0xFF) == (0x1AF4, 0x1044, 1)


def test_virtio_pci_capability_list(rng_pci):
    assert capability_ids(rng_pci.config) == [0x09] * 5 + [0x11]


def bar_read(dev, offset, size):
    data = memoryview(bytearray(size))
    dev.read_bar(0, offset, data)
    return int.from_bytes(data, "little")


def bar_write(dev, offset, value, size):
    dev.write_bar(0, offset, value.to_bytes(size, "little"))


def test_device_features_high_word_has_version_1(rng_pci):
    bar_write(rng_pci, 0x00, 1, 4)
    assert bar_read(rng_pci, 0x04, 4) & 1


def test_features_ok_refused_without_version_1(rng_pci):
    bar_write(rng_pci, 0x14, V.STATUS_ACKNOWLEDGE | V.STATUS_DRIVER, 1)
    bar_write(rng_pci, 0x14, V.STATUS_ACKNOWLEDGE | V.STATUS_DRIVER | V.STATUS_FEATURES_OK, 1)
    assert not bar_read(rng_pci, 0x14, 1) & V.STATUS_FEATURES_OK


def negotiate(dev):
    bar_write(dev, 0x14, V.STATUS_ACKNOWLEDGE | V.STATUS_DRIVER, 1)
    bar_write(dev, 0x08, 1, 4)
    bar_write(dev, 0x0C, 1, 4)  # VERSION_1
    bar_write(dev, 0x14, V.STATUS_ACKNOWLEDGE | V.STATUS_DRIVER | V.STATUS_FEATURES_OK, 1)


def test_features_ok_accepted_with_version_1(rng_pci):
    negotiate(rng_pci)
    assert bar_read(rng_pci, 0x14, 1) & V.STATUS_FEATURES_OK


def test_driver_features_frozen_after_features_ok(rng_pci):
    negotiate(rng_pci)
    bar_write(rng_pci, 0x0C, 0, 4)
    assert bar_read(rng_pci, 0x0C, 4) == 1


def test_queue_size_reads_max(rng_pci):
    bar_write(rng_pci, 0x16, 0, 2)
    assert bar_read(rng_pci, 0x18, 2) == 256


def test_queue_select_out_of_range_reads_size_zero(rng_pci):
    bar_write(rng_pci, 0x16, 5, 2)
    assert bar_read(rng_pci, 0x18, 2) == 0


def test_queue_address_written_in_two_halves(rng_pci):
    bar_write(rng_pci, 0x20, 0x1234_0000, 4)
    bar_write(rng_pci, 0x24, 0x1, 4)
    assert bar_read(rng_pci, 0x20, 8) == 0x1_1234_0000


def setup_queue(dev):
    bar_write(dev, 0x16, 0, 2)
    bar_write(dev, 0x18, 16, 2)
    bar_write(dev, 0x20, 0x1000, 8)
    bar_write(dev, 0x28, 0x2000, 8)
    bar_write(dev, 0x30, 0x3000, 8)
    bar_write(dev, 0x1C, 1, 2)


DRIVER_OK_STATUS = (V.STATUS_ACKNOWLEDGE | V.STATUS_DRIVER | V.STATUS_FEATURES_OK
                    | V.STATUS_DRIVER_OK)


def test_driver_ok_activates_device(rng_pci):
    negotiate(rng_pci)
    setup_queue(rng_pci)
    bar_write(rng_pci, 0x14, DRIVER_OK_STATUS, 1)
    assert rng_pci.device.worker is not None


def test_invalid_queue_sets_needs_reset(rng_pci):
    negotiate(rng_pci)
    setup_queue(rng_pci)
    bar_write(rng_pci, 0x20, 0xFFFF_0000, 8)   # descriptor table outside RAM
    bar_write(rng_pci, 0x14, DRIVER_OK_STATUS, 1)
    assert bar_read(rng_pci, 0x14, 1) & V.STATUS_NEEDS_RESET


def test_status_zero_resets_device(rng_pci):
    negotiate(rng_pci)
    setup_queue(rng_pci)
    bar_write(rng_pci, 0x14, DRIVER_OK_STATUS, 1)
    bar_write(rng_pci, 0x14, 0, 1)
    assert (bar_read(rng_pci, 0x14, 1), rng_pci.device.worker, bar_read(rng_pci, 0x1C, 2)) == (
        0, None, 0)


def test_status_write_of_needs_reset_alone_does_not_reset(rng_pci):
    # Found by fuzz/fuzz_virtio_pci.py: 0x40 was masked to 0 and taken as a reset.
    negotiate(rng_pci)
    setup_queue(rng_pci)
    bar_write(rng_pci, 0x14, DRIVER_OK_STATUS, 1)
    bar_write(rng_pci, 0x14, V.STATUS_NEEDS_RESET, 1)
    assert (bar_read(rng_pci, 0x14, 1), rng_pci.activated) == (DRIVER_OK_STATUS, True)


def test_queue_fields_frozen_after_driver_ok(rng_pci):
    negotiate(rng_pci)
    setup_queue(rng_pci)
    bar_write(rng_pci, 0x14, DRIVER_OK_STATUS, 1)
    bar_write(rng_pci, 0x20, 0x5000, 8)
    assert bar_read(rng_pci, 0x20, 8) == 0x1000


def test_isr_read_clears_it(rng_pci):
    rng_pci.interrupt.signal_config_changed()
    assert (bar_read(rng_pci, 0x1000, 1), bar_read(rng_pci, 0x1000, 1)) == (V.ISR_CONFIG, 0)


def test_notify_write_signals_queue_event(rng_pci):
    bar_write(rng_pci, 0x3000, 0, 4)   # a 4-byte kick misses the 2-byte ioeventfd
    assert rng_pci.queue_events[0].drain() == 1


def test_msix_enable_through_config_space(rng_pci):
    reg = rng_pci.msix_cap // 4
    rng_pci.write_config_register(reg, 2, (1 << 15).to_bytes(2, "little"))
    assert rng_pci.msix.enabled


def make_msix():
    events = [Event(), Event()]
    routes = []
    return MsixConfig(2, events, lambda *a: routes.append(a)), events, routes


def test_msix_entry_write_updates_route():
    msix, _, routes = make_msix()
    msix.write_table(16, struct.pack("<Q", 0xFEE0_0000))
    msix.write_table(24, struct.pack("<I", 0x41))
    assert routes[-1] == (1, 0xFEE0_0000, 0x41)


def test_msix_masked_vector_goes_pending_then_fires_on_unmask():
    msix, events, _ = make_msix()
    msix.write_message_control(1 << 15)
    msix.trigger(0)
    pending = msix.pending[0]
    msix.write_table(12, struct.pack("<I", 0))   # unmask vector 0
    assert (pending, msix.pending[0], events[0].drain()) == (True, False, 1)


def test_msix_trigger_of_unmasked_vector_signals_irqfd():
    msix, events, _ = make_msix()
    msix.write_message_control(1 << 15)
    msix.write_table(28, struct.pack("<I", 0))   # unmask vector 1
    msix.trigger(1)
    assert events[1].drain() == 1


def test_msix_misaligned_access_is_ignored():
    msix, _, routes = make_msix()
    msix.write_table(2, b"\x01\x02\x03\x04")
    assert routes == []


def test_msix_unknown_vector_is_dropped():
    msix, events, _ = make_msix()
    msix.trigger(7)
    assert [e.drain() for e in events] == [0, 0]


def test_pvpanic_panicked_write_calls_back():
    seen = []
    dev = PvPanic(lambda: seen.append("panic"))
    dev.write_bar(0, 0, b"\x01")
    assert seen == ["panic"]


def test_pvpanic_reports_supported_events():
    data = memoryview(bytearray(1))
    PvPanic(lambda: None).read_bar(0, 0, data)
    assert data[0] == 0b11


def activate_rng(dev):
    negotiate(dev)
    setup_queue(dev)
    bar_write(dev, 0x14, DRIVER_OK_STATUS, 1)


def wait_for(predicate, timeout=5.0):
    import time
    deadline = time.monotonic() + timeout
    while not predicate() and time.monotonic() < deadline:
        time.sleep(0.01)
    return predicate()


def test_avail_index_jump_puts_device_in_needs_reset_and_ends_worker(rng_pci, mem):
    activate_rng(rng_pci)
    worker = rng_pci.device.worker
    mem.write_int(0x2000 + 2, 17, 2)   # avail idx 17 ahead on a 16-entry queue

    rng_pci.queue_events[0].signal()

    assert wait_for(lambda: bar_read(rng_pci, 0x14, 1) & V.STATUS_NEEDS_RESET)
    assert wait_for(lambda: not worker._thread.is_alive())


def test_needs_reset_device_recovers_after_a_reset(rng_pci, mem):
    activate_rng(rng_pci)
    mem.write_int(0x2000 + 2, 17, 2)
    rng_pci.queue_events[0].signal()
    wait_for(lambda: bar_read(rng_pci, 0x14, 1) & V.STATUS_NEEDS_RESET)

    bar_write(rng_pci, 0x14, 0, 1)
    mem.write_int(0x2000 + 2, 0, 2)
    activate_rng(rng_pci)

    assert bar_read(rng_pci, 0x14, 1) == DRIVER_OK_STATUS
    assert rng_pci.device.worker._thread.is_alive()


def test_status_write_clearing_driver_ok_is_ignored_and_queues_stay_frozen(rng_pci):
    activate_rng(rng_pci)

    bar_write(rng_pci, 0x14, V.STATUS_ACKNOWLEDGE | V.STATUS_DRIVER, 1)
    bar_write(rng_pci, 0x20, 0x5000, 8)

    assert (bar_read(rng_pci, 0x14, 1), bar_read(rng_pci, 0x20, 8)) == (DRIVER_OK_STATUS, 0x1000)


def test_driver_cannot_set_needs_reset_itself(rng_pci):
    activate_rng(rng_pci)

    bar_write(rng_pci, 0x14, DRIVER_OK_STATUS | V.STATUS_NEEDS_RESET, 1)

    assert bar_read(rng_pci, 0x14, 1) == DRIVER_OK_STATUS


def test_reset_with_a_stuck_worker_fails_instead_of_starting_a_second(rng_pci, monkeypatch):
    import threading
    monkeypatch.setattr(V, "STOP_TIMEOUT", 0.2)
    stuck = threading.Event()
    rng_pci.device.activate = lambda mem, irq, queues: setattr(
        rng_pci.device, "worker", V.QueueWorker("stuck", irq, [(0, queues[0][2])],
                                                lambda i: stuck.wait()))
    activate_rng(rng_pci)
    rng_pci.queue_events[0].signal()

    with pytest.raises(V.WorkerStuck):
        bar_write(rng_pci, 0x14, 0, 1)

    stuck.set()
    assert rng_pci.activated  # still owned by the old worker: nothing was re-armed
