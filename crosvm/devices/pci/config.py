"""A PCI function's configuration space: type 0 header, BARs and capabilities.

Registers are kept as 32-bit words with a mask of the bits the guest may write; every
guest write goes through that mask, so read-only fields cannot be changed.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

CONFIG_SPACE_SIZE = 4096  # PCIe extended space (ECAM); only the first 256 bytes are used
NUM_BARS = 6
BAR0_REG = 4
CAPABILITY_LIST_HEAD = 0x34
FIRST_CAPABILITY = 0x40
STATUS_CAP_LIST = 1 << 4

COMMAND_IO = 1 << 0
COMMAND_MEMORY = 1 << 1
COMMAND_BUS_MASTER = 1 << 2
COMMAND_INTX_DISABLE = 1 << 10

INTERRUPT_LINE_REG = 15  # 0x3c: line (rw), pin (ro)

CAP_ID_MSIX = 0x11
CAP_ID_VENDOR = 0x09


class PciConfigError(ValueError):
    """A configuration-space layout mistake (a VMM bug, never guest input)."""


class BarType(enum.Enum):
    MEM32 = 0b000
    MEM64 = 0b100
    IO = 0b1


@dataclass
class PciBar:
    """One base address register: its size, kind and the address the VMM gave it."""

    index: int
    size: int
    type: BarType = BarType.MEM64
    prefetchable: bool = False
    address: int = 0

    def flag_bits(self) -> int:
        if self.type is BarType.IO:
            return 0b1
        return self.type.value | (0b1000 if self.prefetchable else 0)


class PciConfiguration:
    """Configuration space of one function (header type 0)."""

    def __init__(self, vendor_id: int, device_id: int, class_code: int, subclass: int,
                 prog_if: int = 0, revision: int = 0, subsystem_vendor_id: int = 0,
                 subsystem_id: int = 0, header_type: int = 0) -> None:
        self.regs = [0] * (CONFIG_SPACE_SIZE // 4)
        self.writable = [0] * (CONFIG_SPACE_SIZE // 4)
        self.regs[0] = device_id << 16 | vendor_id
        self.regs[2] = class_code << 24 | subclass << 16 | prog_if << 8 | revision
        self.regs[3] = header_type << 16
        self.regs[11] = subsystem_id << 16 | subsystem_vendor_id
        self.writable[1] = COMMAND_IO | COMMAND_MEMORY | COMMAND_BUS_MASTER | COMMAND_INTX_DISABLE
        self.writable[INTERRUPT_LINE_REG] = 0xFF
        self.bars: dict[int, PciBar] = {}
        self._next_cap = FIRST_CAPABILITY
        self._last_cap_next_ptr: int | None = None
        self.capabilities: list[tuple[int, int]] = []  # (offset, length)

    # -- identity ---------------------------------------------------------------
    @property
    def vendor_id(self) -> int:
        return self.regs[0] & 0xFFFF

    @property
    def device_id(self) -> int:
        return self.regs[0] >> 16

    @property
    def command(self) -> int:
        return self.regs[1] & 0xFFFF

    def set_interrupt_pin(self, pin: int, line: int) -> None:
        """pin 1..4 = INTA..INTD; `line` is the IRQ the firmware routed it to."""
        self.regs[INTERRUPT_LINE_REG] = (self.regs[INTERRUPT_LINE_REG] & ~0xFFFF) | pin << 8 | line

    # -- BARs -------------------------------------------------------------------
    def add_bar(self, bar: PciBar) -> None:
        if bar.size < 16 or bar.size & (bar.size - 1):
            raise PciConfigError(f"BAR {bar.index}: size {bar.size:#x} is not a power of two >= 16")
        if not 0 <= bar.index < NUM_BARS or bar.index in self.bars or (
                bar.type is BarType.MEM64 and (bar.index + 1 >= NUM_BARS or bar.index + 1 in self.bars)):
            raise PciConfigError(f"BAR {bar.index} is taken or out of range")
        if bar.address % bar.size:
            raise PciConfigError(f"BAR {bar.index} address {bar.address:#x} is not size-aligned")
        reg = BAR0_REG + bar.index
        mask = ~(bar.size - 1) & 0xFFFF_FFFF
        self.regs[reg] = (bar.address & mask & ~0xF) | bar.flag_bits()
        self.writable[reg] = mask & ~(0x3 if bar.type is BarType.IO else 0xF)
        self.bars[bar.index] = bar
        if bar.type is BarType.MEM64:
            self.regs[reg + 1] = bar.address >> 32
            self.writable[reg + 1] = (~(bar.size - 1) >> 32) & 0xFFFF_FFFF
            self.bars[bar.index + 1] = bar  # the upper half belongs to the same BAR

    def bar_address(self, index: int) -> int:
        """The address the guest currently has in BAR `index`."""
        bar = self.bars[index]
        reg = BAR0_REG + index
        low = self.regs[reg] & (~0x3 if bar.type is BarType.IO else ~0xF) & 0xFFFF_FFFF
        if bar.type is BarType.MEM64:
            return self.regs[reg + 1] << 32 | low
        return low

    # -- capabilities -----------------------------------------------------------
    def add_capability(self, cap_id: int, body: bytes, writable: dict[int, int] | None = None) -> int:
        """Append a capability (id, next pointer, then `body`); returns its offset.

        `writable` maps dword index within the capability to guest-writable bits.
        """
        length = 2 + len(body)
        offset = self._next_cap
        if offset + length > 256:
            raise PciConfigError("capabilities do not fit in config space")
        raw = bytes([cap_id, 0]) + body
        self._write_bytes(offset, raw)
        if self._last_cap_next_ptr is None:
            self.regs[CAPABILITY_LIST_HEAD // 4] = offset
            self.regs[1] |= STATUS_CAP_LIST << 16
        else:
            self._write_bytes(self._last_cap_next_ptr, bytes([offset]))
        self._last_cap_next_ptr = offset + 1
        for dword, bits in (writable or {}).items():
            assert offset % 4 == 0
            self.writable[offset // 4 + dword] |= bits
        self.capabilities.append((offset, length))
        self._next_cap = (offset + length + 3) & ~3
        return offset

    def _write_bytes(self, offset: int, data: bytes) -> None:
        for i, b in enumerate(data):
            reg, shift = divmod(offset + i, 4)
            shift *= 8
            self.regs[reg] = (self.regs[reg] & ~(0xFF << shift)) | b << shift

    # -- guest access -----------------------------------------------------------
    def read_reg(self, reg: int) -> int:
        if not 0 <= reg < len(self.regs):
            return 0xFFFF_FFFF
        return self.regs[reg]

    def write_reg(self, reg: int, offset: int, data: bytes | memoryview) -> None:
        """A guest write of 1, 2 or 4 bytes at byte `offset` within register `reg`."""
        if not 0 <= reg < len(self.regs) or offset + len(data) > 4 or len(data) not in (1, 2, 4):
            return
        shift = offset * 8
        width_mask = ((1 << (8 * len(data))) - 1) << shift
        mask = self.writable[reg] & width_mask
        value = int.from_bytes(data, "little") << shift
        self.regs[reg] = (self.regs[reg] & ~mask) | (value & mask)


def read_sub(value: int, offset: int, data: memoryview) -> None:
    """Fill `data` with bytes of the 32-bit `value` starting at byte `offset`."""
    n = len(data)
    if offset + n > 4:
        data[:] = b"\xff" * n
        return
    data[:] = ((value >> (offset * 8)) & ((1 << (8 * n)) - 1)).to_bytes(n, "little")
