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
# Fixed events (ACPI 6.x, 4.8.3.1): PM1 status and enable bits.
PM1_PWRBTN = 1 << 8
PM1_SLPBTN = 1 << 9
NUM_GPES = 16  # GPE0 here is 2 bytes of status and 2 of enable


def _get(data: bytes | memoryview) -> int:
    return int.from_bytes(bytes(data), "little")


class AcpiPm(BusDevice):
    """PM1a event (4 bytes), PM1a control (2), GPE0 (4) and the 0xCF9 reset port."""

    def __init__(self, ports: PmPorts, poweroff: Callable[[], None],
                 reset: Callable[[], None],
                 sci: Callable[[bool], None] | None = None) -> None:
        """`sci(level)` drives the SCI line: asserted while an enabled event is pending."""
        self.ports = ports
        self._sci = sci
        self._sci_level = False
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
            self._update_sci()
        if action is not None:
            action()

    # -- events from the host (`crosvm powerbtn`, `sleepbtn`, `gpe N`) ---------------
    def power_button(self) -> None:
        """Press the fixed power button: PWRBTN_STS, and an SCI if the OS enabled it."""
        self._raise_pm1(PM1_PWRBTN)

    def sleep_button(self) -> None:
        """Press the fixed sleep button."""
        self._raise_pm1(PM1_SLPBTN)

    def gpe(self, number: int) -> None:
        """Set general-purpose event `number`'s status bit; ValueError if out of range."""
        if not 0 <= number < NUM_GPES:
            raise ValueError(f"GPE {number} is out of range (0..{NUM_GPES - 1})")
        with self._lock:
            self.gpe0[number // 8] |= 1 << (number % 8)
            self._update_sci()

    def _raise_pm1(self, bit: int) -> None:
        with self._lock:
            status = int.from_bytes(self.regs[0:2], "little") | bit
            self.regs[0:2] = status.to_bytes(2, "little")
            self._update_sci()

    def _pending(self) -> bool:
        pm1 = int.from_bytes(self.regs[0:2], "little") & int.from_bytes(self.regs[2:4], "little")
        gpe = int.from_bytes(self.gpe0[0:2], "little") & int.from_bytes(self.gpe0[2:4], "little")
        return bool(pm1 or gpe)

    def _update_sci(self) -> None:
        """Called with the lock held: the SCI follows (status & enable), level-triggered."""
        level = self._pending()
        if level != self._sci_level and self._sci is not None:
            self._sci(level)
        self._sci_level = level
