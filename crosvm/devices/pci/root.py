"""The PCI root: bus 0 with a host bridge, and the two ways the guest reaches config space.

`PciConfigIo` is the legacy 0xCF8/0xCFC mechanism (it also carries the 0xCF9 reset
register, as crosvm's does); `PciConfigMmio` is PCIe ECAM, 1 MiB per bus.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Callable

from crosvm.devices.bus import BusDevice
from crosvm.devices.pci.config import PciConfiguration, read_sub
from crosvm.devices.pci.device import PciDevice

log = logging.getLogger(__name__)

MAX_SLOTS = 32
HOST_BRIDGE_VENDOR = 0x8086
HOST_BRIDGE_DEVICE = 0x0D57
CLASS_BRIDGE = 0x06
SUBCLASS_HOST_BRIDGE = 0x00


@dataclass(frozen=True, order=True)
class PciAddress:
    bus: int
    dev: int
    func: int

    def __str__(self) -> str:
        return f"{self.bus:02x}:{self.dev:02x}.{self.func}"


class PciHostBridge(PciDevice):
    """00:00.0, so the guest finds a host bridge first, as on real hardware."""

    def __init__(self) -> None:
        self.config = PciConfiguration(HOST_BRIDGE_VENDOR, HOST_BRIDGE_DEVICE, CLASS_BRIDGE,
                                       SUBCLASS_HOST_BRIDGE)

    def wants_intx(self) -> bool:
        return False


class PciRoot:
    """Devices on bus 0 by address; unpopulated functions read as all ones."""

    def __init__(self) -> None:
        self.devices: dict[PciAddress, PciDevice] = {PciAddress(0, 0, 0): PciHostBridge()}
        # Called after every config write, with the device and the register written
        # (the VMM moves BARs the guest reprograms).
        self.on_config_write: Callable[[PciDevice, int], None] | None = None
        # Config writes (and what follows them: shadow copies, BAR moves) one at a time.
        self._write_lock = threading.Lock()

    def add_device(self, device: PciDevice, slot: int | None = None) -> PciAddress:
        """Put `device` in `slot`, or in the lowest free slot (stable for one command line)."""
        if slot is None:
            used = {a.dev for a in self.devices}
            free = [s for s in range(1, MAX_SLOTS) if s not in used]
            if not free:
                raise ValueError("no free PCI slot on bus 0")
            slot = free[0]
        address = PciAddress(0, slot, 0)
        if not 0 <= slot < MAX_SLOTS or address in self.devices:
            raise ValueError(f"PCI address {address} is taken or invalid")
        self.devices[address] = device
        return address

    def config_read(self, bus: int, dev: int, func: int, reg: int) -> int:
        device = self.devices.get(PciAddress(bus, dev, func))
        if device is None:
            return 0xFFFF_FFFF
        return device.read_config_register(reg)

    def config_write(self, bus: int, dev: int, func: int, reg: int, offset: int,
                     data: bytes | memoryview) -> None:
        device = self.devices.get(PciAddress(bus, dev, func))
        if device is not None:
            with self._write_lock:
                device.write_config_register(reg, offset, data)
                if self.on_config_write is not None:
                    self.on_config_write(device, reg)


CONFIG_ADDRESS_ENABLE = 1 << 31
RESET_PORT_OFFSET = 1  # 0xCF9 sits inside the 0xCF8 address register


class PciConfigIo(BusDevice):
    """0xCF8 (address) and 0xCFC-0xCFF (data); byte writes to 0xCF9 go to `reset_port`."""

    def __init__(self, root: PciRoot, reset_port: BusDevice | None = None) -> None:
        self.root = root
        self.reset_port = reset_port
        self.address = 0

    def debug_label(self) -> str:
        return "pci config io"

    def _target(self) -> tuple[int, int, int, int] | None:
        if not self.address & CONFIG_ADDRESS_ENABLE:
            return None
        a = self.address
        return (a >> 16) & 0xFF, (a >> 11) & 0x1F, (a >> 8) & 0x7, (a >> 2) & 0x3F

    def read(self, offset: int, address: int, data: memoryview) -> None:
        n = len(data)
        if offset < 4:
            if offset == RESET_PORT_OFFSET and n == 1 and self.reset_port is not None:
                self.reset_port.read(0, address, data)
            else:
                read_sub(self.address, offset, data)
            return
        target = self._target()
        value = 0xFFFF_FFFF if target is None else self.root.config_read(*target)
        read_sub(value, offset - 4, data)

    def write(self, offset: int, address: int, data: bytes | memoryview) -> None:
        n = len(data)
        if offset < 4:
            if offset == RESET_PORT_OFFSET and n == 1:
                if self.reset_port is not None:
                    self.reset_port.write(0, address, data)
                return
            if offset + n <= 4:
                shift = offset * 8
                mask = ((1 << (8 * n)) - 1) << shift
                value = int.from_bytes(data, "little") << shift
                self.address = (self.address & ~mask) | (value & mask)
            return
        target = self._target()
        if target is not None and offset - 4 + n <= 4:
            self.root.config_write(*target, offset - 4, data)


class PciConfigMmio(BusDevice):
    """PCIe ECAM: bus << 20 | device << 15 | function << 12 | register."""

    def __init__(self, root: PciRoot) -> None:
        self.root = root

    def debug_label(self) -> str:
        return "pcie ecam"

    @staticmethod
    def _decode(offset: int) -> tuple[int, int, int, int, int]:
        return ((offset >> 20) & 0xFF, (offset >> 15) & 0x1F, (offset >> 12) & 0x7,
                (offset & 0xFFF) >> 2, offset & 3)

    def read(self, offset: int, address: int, data: memoryview) -> None:
        bus, dev, func, reg, sub = self._decode(offset)
        if sub + len(data) > 4:
            data[:] = b"\xff" * len(data)
            return
        read_sub(self.root.config_read(bus, dev, func, reg), sub, data)

    def write(self, offset: int, address: int, data: bytes | memoryview) -> None:
        bus, dev, func, reg, sub = self._decode(offset)
        if sub + len(data) <= 4:
            self.root.config_write(bus, dev, func, reg, sub, data)
