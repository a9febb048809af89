"""ACPI fixed hardware: PM1 event/control, GPE0 and the reset register (0xCF9).

Writing SLP_EN with the S5 sleep type powers the VM off; the reset register reboots it.
"""

from __future__ import annotations

import threading
from typing import Callable

from crosvm.arch.x86_64.acpi import SLP_TYP_S5, PmPorts
from crosvm.devices.bus import BusDevice

PM1_STATUS = 0
PM1_ENABLE = 2
PM1_CNT_SCI_EN = 1 << 0
PM1_CNT_SLP_TYP_SHIFT = 10
PM1_CNT_SLP_TYP_MASK = 0x7 << PM1_CNT_SLP_TYP_SHIFT
PM1_CNT_SLP_EN = 1 << 13
RESET_CPU = 0x04


def _get(data: bytes | memoryview) -> int:
    return int.from_bytes(bytes(data), "little")


class AcpiPm(BusDevice):
    """PM1a event (4 bytes), PM1a control (2), GPE0 (4) and the 0xCF9 reset port."""

    def __init__(self, ports: PmPorts, poweroff: Callable[[], None],
                 reset: Callable[[], None]) -> None:
        self.ports = ports
        self._poweroff = poweroff
        self._reset = reset
        self._lock = threading.Lock()
        self.regs = bytearray(4)       # PM1 status | PM1 enable
        self.gpe0 = bytearray(4)       # GPE0 status | GPE0 enable
        self.pm1_cnt = PM1_CNT_SCI_EN  # no SMI command port: always in ACPI mode
        self.reset_reg = 0

    def ranges(self) -> list[tuple[int, int]]:
        p = self.ports
        # The reset port (0xCF9) is inside PCI's 0xCF8 range; PciConfigIo forwards it.
        return [(p.pm1_evt, 4), (p.pm1_cnt, 2), (p.gpe0, 4)]

    def read(self, offset: int, address: int, data: memoryview) -> None:
        p = self.ports
        with self._lock:
            if address == p.pm1_cnt:
                src = self.pm1_cnt.to_bytes(2, "little")
            elif address == p.reset:
                src = bytes([self.reset_reg])
            else:
                src = bytes(self.regs if p.pm1_evt <= address < p.pm1_evt + 4 else self.gpe0)
        data[:] = (src[offset:] + bytes(8))[:len(data)]

    def write(self, offset: int, address: int, data: bytes | memoryview) -> None:
        p = self.ports
        value = _get(data)
        action = None
        with self._lock:
            if address == p.pm1_cnt:
                self.pm1_cnt = (value & ~PM1_CNT_SLP_EN) | PM1_CNT_SCI_EN
                slp_typ = (value & PM1_CNT_SLP_TYP_MASK) >> PM1_CNT_SLP_TYP_SHIFT
                if value & PM1_CNT_SLP_EN and slp_typ == SLP_TYP_S5:
                    action = self._poweroff
            elif address == p.reset:
                self.reset_reg = value & 0xFF
                if value & RESET_CPU or value == p.reset_value:
                    action = self._reset
            else:
                regs = self.regs if p.pm1_evt <= address < p.pm1_evt + 4 else self.gpe0
                for i, byte in enumerate(bytes(data)):
                    pos = offset + i
                    if pos >= 4:
                        break
                    if pos < 2:
                        regs[pos] &= ~byte & 0xFF   # status bits are write-1-to-clear
                    else:
                        regs[pos] = byte
        if action is not None:
            action()
