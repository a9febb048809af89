"""Fuzz target: PCI config space (crosvm/devices/pci/) through 0xCF8/0xCFC, ECAM and
directly, and an MSI-X table and PBA, with any offset and size.

Invariants: nothing escapes; a register changes only in its guest-writable bits (so
vendor, device, class, header type, BAR type bits and the capability list never
change); reads give exactly the bytes asked for; a BAR reads back size-aligned; MSI-X
routes name only existing vectors; the reset port sees only 1-byte accesses at 0xCF9.
"""

from __future__ import annotations

import atheris

from crosvm.base import Event
from crosvm.devices.bus import BusDevice
from crosvm.devices.pci import (BarType, MsixConfig, PciBar, PciConfigIo, PciConfigMmio,
                                PciConfiguration, PciDevice, PciRoot)
from crosvm.devices.pci.config import CAP_ID_MSIX, CAP_ID_VENDOR

NUM_VECTORS = 5
_events = [Event() for _ in range(NUM_VECTORS)]  # reused: eventfds are not free


class Device(PciDevice):
    """A function with every BAR kind, two capabilities and MSI-X."""

    def __init__(self, routes: list) -> None:
        self.config = PciConfiguration(0x1AF4, 0x1044, 0xFF, 0x01, prog_if=2, revision=3,
                                       subsystem_vendor_id=0x1AF4, subsystem_id=0x1100)
        self.msix = MsixConfig(NUM_VECTORS, _events, lambda *a: routes.append(a))
        self.config.add_capability(CAP_ID_VENDOR, bytes(range(14)))
        self.msix_cap = self.config.add_capability(
            CAP_ID_MSIX, self.msix.capability_body(0, 0x6000, 0, 0x7000), writable={0: 0xC000_0000})
        self.assign_bars([PciBar(0, 0x8000, BarType.MEM64, address=0x1_0000_8000),
                          PciBar(2, 0x1000, BarType.MEM32, prefetchable=True, address=0xD000_0000),
                          PciBar(3, 0x20, BarType.IO, address=0xC020)])

    def write_config_register(self, reg, offset, data) -> None:
        super().write_config_register(reg, offset, data)
        if reg == self.msix_cap // 4:
            self.msix.write_message_control(self.config.regs[reg] >> 16)


class ResetPort(BusDevice):
    def __init__(self) -> None:
        self.accesses: list[tuple[int, int]] = []

    def read(self, offset, address, data) -> None:
        self.accesses.append((offset, len(data)))
        data[:] = bytes(len(data))

    def write(self, offset, address, data) -> None:
        self.accesses.append((offset, len(data)))


def _size(fdp: atheris.FuzzedDataProvider) -> int:
    return (1, 2, 4)[fdp.ConsumeIntInRange(0, 2)] if fdp.ConsumeIntInRange(0, 7) else fdp.ConsumeIntInRange(0, 8)


def one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    routes: list[tuple[int, int, int]] = []
    root = PciRoot()
    dev = Device(routes)
    root.add_device(dev)
    reset = ResetPort()
    io, ecam = PciConfigIo(root, reset), PciConfigMmio(root)
    configs = [d.config for d in root.devices.values()]
    for config in configs:
        config.initial = list(config.regs)
    for _ in range(fdp.ConsumeIntInRange(1, 48)):
        op = fdp.ConsumeIntInRange(0, 7)
        n = _size(fdp)
        buf = memoryview(bytearray(n))
        payload = fdp.ConsumeBytes(n).ljust(n, b"\0")
        if op == 0:
            io.read(fdp.ConsumeIntInRange(0, 7), 0xCF8, buf)
        elif op == 1:
            if fdp.ConsumeBool():  # an address a driver would use
                payload = (1 << 31 | fdp.ConsumeIntInRange(0, 2) << 11 | fdp.ConsumeIntInRange(0, 63) << 2).to_bytes(4, "little")
                io.write(0, 0xCF8, payload)
            else:
                io.write(fdp.ConsumeIntInRange(0, 7), 0xCF8, payload)
        elif op in (2, 3):
            offset = fdp.ConsumeIntInRange(0, 2) << 15 | fdp.ConsumeIntInRange(0, 0xFFF) if fdp.ConsumeIntInRange(0, 7) else fdp.ConsumeIntInRange(0, (1 << 28) - 1)
            if op == 2:
                ecam.read(offset, 0xE000_0000 + offset, buf)
            else:
                ecam.write(offset, 0xE000_0000 + offset, payload)
        elif op == 4:
            dev.write_config_register(fdp.ConsumeIntInRange(-4, 1100), fdp.ConsumeIntInRange(0, 5), payload)
        elif op == 5:
            dev.msix.read_table(fdp.ConsumeIntInRange(0, 0x60), buf)
        elif op == 6:
            dev.msix.write_table(fdp.ConsumeIntInRange(0, 0x60), payload)
        else:
            dev.msix.read_pba(fdp.ConsumeIntInRange(0, 0x10), buf)
            dev.msix.trigger(fdp.ConsumeIntInRange(-1, NUM_VECTORS + 1))
        assert len(buf) == n
        _check_registers(configs, 64)  # the header and capabilities, after every access
        for index, bar in dev.config.bars.items():
            if bar.index == index:
                assert dev.config.bar_address(index) % bar.size == 0, "BAR not size-aligned"
        for vector, _, _ in routes:
            assert 0 <= vector < NUM_VECTORS, vector
        assert all(a == (0, 1) for a in reset.accesses), reset.accesses
        assert len(dev.msix.table) == NUM_VECTORS and len(dev.msix.pending) == NUM_VECTORS
    _check_registers(configs, None)
    for e in _events:
        e.drain()


def _check_registers(configs: list[PciConfiguration], count: int | None) -> None:
    for config in configs:
        for reg, (old, new) in enumerate(zip(config.initial[:count], config.regs[:count])):
            if old != new:
                assert (old ^ new) & ~config.writable[reg] == 0, \
                    f"register {reg:#x} changed outside its writable bits: {old:#x} -> {new:#x}"
                assert 0 <= new <= 0xFFFF_FFFF, (reg, new)
