"""BARs the guest reprograms are moved on the MMIO bus and for their ioeventfds (no KVM:
the VM is a recorder)."""

from __future__ import annotations

import struct

import pytest

from crosvm.devices.bus import Bus
from crosvm.devices.pci.config import COMMAND_MEMORY
from crosvm.devices.virtio.rng import Rng
from crosvm.devices.virtio.virtio_pci import NOTIFY_OFFSET
from crosvm.vm_memory import GuestMemory
from crosvm.vmm.pci import PciSetup


class RecordingVm:
    def __init__(self) -> None:
        self.ioevents: set[int] = set()

    def register_irqfd(self, fd, gsi, resample_fd=None) -> None:
        pass

    def register_ioevent(self, fd, addr, length, pio) -> None:
        self.ioevents.add(addr)

    def unregister_ioevent(self, fd, addr, length, pio) -> None:
        self.ioevents.remove(addr)

    def set_msi_route(self, gsi, address, data) -> None:
        pass


def enable_decoding(pci: PciSetup, dev: int) -> None:
    """As Linux does when it enables the device for its driver."""
    command = pci.root.config_read(0, dev, 0, 1) & 0xFFFF
    pci.root.config_write(0, dev, 0, 1, 0, struct.pack("<I", command | COMMAND_MEMORY))


@pytest.fixture
def setup():
    mem = GuestMemory([(0, 1 << 20)])
    vm = RecordingVm()
    pci = PciSetup(vm, mem, Bus(), Bus(), 1 << 20, 40, reset_port=None)
    pci.add_virtio(Rng())
    enable_decoding(pci, 1)
    yield pci, vm
    pci.close()
    mem.close()


def write_reg(pci: PciSetup, reg: int, value: int) -> None:
    pci.root.config_write(0, 1, 0, reg, 0, struct.pack("<I", value))


def move_bar0(pci: PciSetup, new: int) -> None:
    command = pci.root.config_read(0, 1, 0, 1) & 0xFFFF
    write_reg(pci, 1, command & ~COMMAND_MEMORY)   # as Linux does: decode off first
    write_reg(pci, 4, (new & 0xFFFF_FFFF) | 0b100)
    write_reg(pci, 5, new >> 32)
    write_reg(pci, 1, command | COMMAND_MEMORY)


def test_moved_bar_is_served_at_its_new_address_only(setup):
    pci, _ = setup
    old = pci.devices[0].config.bar_address(0)
    new = old + 0x10_0000

    move_bar0(pci, new)

    assert pci.mmio_bus.get_device(new) is not None
    assert pci.mmio_bus.get_device(old) is None


def test_moved_bar_takes_its_queue_notify_ioeventfd_along(setup):
    pci, vm = setup
    old = pci.devices[0].config.bar_address(0)
    new = old + 0x10_0000

    move_bar0(pci, new)

    assert vm.ioevents == {new + NOTIFY_OFFSET}


def test_bar_is_off_the_bus_while_decoding_is_off(setup):
    pci, vm = setup
    old = pci.devices[0].config.bar_address(0)
    command = pci.root.config_read(0, 1, 0, 1) & 0xFFFF

    write_reg(pci, 1, command & ~COMMAND_MEMORY)
    write_reg(pci, 4, 0xFFFF_FFFF)  # BAR sizing
    write_reg(pci, 5, 0xFFFF_FFFF)

    assert (pci.mmio_bus.get_device(old), vm.ioevents) == (None, set())


def test_bar_sized_then_restored_is_mapped_again_when_decoding_resumes(setup):
    pci, vm = setup
    old = pci.devices[0].config.bar_address(0)

    move_bar0(pci, old)  # decoding off, the same address written back, decoding on

    assert pci.mmio_bus.get_device(old) is not None
    assert vm.ioevents == {old + NOTIFY_OFFSET}


def test_bar_put_outside_the_pci_windows_is_not_mapped_anywhere(setup):
    pci, vm = setup
    old = pci.devices[0].config.bar_address(0)

    move_bar0(pci, 0x8000)  # guest RAM

    assert (pci.mmio_bus.get_device(old), pci.mmio_bus.get_device(0x8000), vm.ioevents) == (
        None, None, set())


def test_bus_lookups_during_moves_always_find_the_right_device():
    import threading
    from crosvm.devices.bus import BusDevice

    class Named(BusDevice):
        pass

    bus, mover, neighbour = Bus(), Named(), Named()
    bus.insert(neighbour, 0x2000, 0x1000)
    bus.insert(mover, 0x1000, 0x1000)
    stop = threading.Event()

    def keep_moving():
        while not stop.is_set():
            bus.move(0x1000, 0x5000)
            bus.move(0x5000, 0x1000)

    thread = threading.Thread(target=keep_moving)
    thread.start()
    wrong = 0
    try:
        for _ in range(200_000):
            found = bus.get_device(0x2800)
            if found is None or found[0] is not neighbour or found[1] != 0x800:
                wrong += 1
    finally:
        stop.set()
        thread.join()

    assert wrong == 0


def test_two_bars_the_guest_swaps_both_end_up_moved():
    mem = GuestMemory([(0, 1 << 20)])
    vm = RecordingVm()
    pci = PciSetup(vm, mem, Bus(), Bus(), 1 << 20, 40, reset_port=None)
    pci.add_virtio(Rng())
    pci.add_virtio(Rng())
    enable_decoding(pci, 1)
    enable_decoding(pci, 2)
    a = pci.devices[0].config.bar_address(0)
    b = pci.devices[1].config.bar_address(0)
    try:
        for dev, new in ((1, b), (2, a)):  # the first move is refused until b moves away
            command = pci.root.config_read(0, dev, 0, 1) & 0xFFFF
            pci.root.config_write(0, dev, 0, 1, 0, struct.pack("<I", command & ~COMMAND_MEMORY))
            pci.root.config_write(0, dev, 0, 4, 0, struct.pack("<I", (new & 0xFFFF_FFFF) | 4))
            pci.root.config_write(0, dev, 0, 5, 0, struct.pack("<I", new >> 32))
            pci.root.config_write(0, dev, 0, 1, 0, struct.pack("<I", command | COMMAND_MEMORY))

        assert pci.mmio_bus.get_device(a)[0].device is pci.devices[1]
        assert pci.mmio_bus.get_device(b)[0].device is pci.devices[0]
        assert vm.ioevents == {a + NOTIFY_OFFSET, b + NOTIFY_OFFSET}
    finally:
        pci.close()
        mem.close()


def test_bar_moved_onto_another_device_does_not_take_its_place(setup):
    pci, _ = setup
    pci.add_virtio(Rng())
    enable_decoding(pci, 2)
    old = pci.devices[0].config.bar_address(0)
    taken = pci.devices[1].config.bar_address(0)

    move_bar0(pci, taken)

    assert pci.mmio_bus.get_device(old) is None
    assert pci.mmio_bus.get_device(taken)[0].device is pci.devices[1]


def test_bar_moved_over_a_pmem_region_is_not_mapped(setup):
    pci, _ = setup
    pmem = pci.allocate_high(2 << 20, 2 << 20)

    move_bar0(pci, pmem)

    assert pci.mmio_bus.get_device(pmem) is None
