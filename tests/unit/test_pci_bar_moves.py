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


@pytest.fixture
def setup():
    mem = GuestMemory([(0, 1 << 20)])
    vm = RecordingVm()
    pci = PciSetup(vm, mem, Bus(), Bus(), 1 << 20, 40, reset_port=None)
    pci.add_virtio(Rng())
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


def test_bar_written_while_decoding_is_off_is_not_moved_yet(setup):
    pci, _ = setup
    old = pci.devices[0].config.bar_address(0)
    command = pci.root.config_read(0, 1, 0, 1) & 0xFFFF
    write_reg(pci, 1, command & ~COMMAND_MEMORY)

    write_reg(pci, 4, 0xFFFF_FFFF)  # BAR sizing
    write_reg(pci, 5, 0xFFFF_FFFF)

    assert pci.mmio_bus.get_device(old) is not None


def test_bar_moved_outside_the_pci_windows_stays_where_it_was(setup):
    pci, vm = setup
    old = pci.devices[0].config.bar_address(0)

    move_bar0(pci, 0x8000)  # guest RAM

    assert (pci.mmio_bus.get_device(old) is not None, pci.mmio_bus.get_device(0x8000),
            vm.ioevents) == (True, None, {old + NOTIFY_OFFSET})
