"""MC146818 CMOS RTC + NVRAM at ports 0x70/0x71, reading the host's clock (UTC)."""

from __future__ import annotations

import threading
import time
from typing import Callable

from crosvm.devices.bus import BusDevice

INDEX_MASK = 0x7F
DATA_LEN = 128

RTC_SECONDS = 0x00
RTC_MINUTES = 0x02
RTC_HOURS = 0x04
RTC_WEEKDAY = 0x06
RTC_DAY = 0x07
RTC_MONTH = 0x08
RTC_YEAR = 0x09
RTC_REG_A = 0x0A
RTC_REG_B = 0x0B
RTC_REG_C = 0x0C
RTC_REG_D = 0x0D
RTC_CENTURY = 0x32

REG_A_UIP = 0x80
REG_A_DEFAULT = 0x26          # 32.768 kHz time base, 1024 Hz periodic rate
REG_B_24H = 0x02
REG_B_BINARY = 0x04
REG_D_VRT = 0x80              # valid RAM and time
# The update cycle: UIP is set for the last 244 us before each second ticks over.
UPDATE_IN_PROGRESS_S = 244e-6


def to_bcd(value: int) -> int:
    return ((value // 10) << 4) | (value % 10)


class Cmos(BusDevice):
    """Index port at offset 0, data port at offset 1."""

    def __init__(self, mem_below_4g: int, mem_above_4g: int,
                 clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self.index = 0
        self.data = bytearray(DATA_LEN)
        self.data[RTC_REG_A] = REG_A_DEFAULT
        self.data[RTC_REG_B] = REG_B_24H
        self.data[RTC_REG_D] = REG_D_VRT
        # Memory size as a PC BIOS reports it: 64 KiB units above 16 MiB and above 4 GiB.
        high = min(max(mem_below_4g - (16 << 20), 0) >> 16, 0xFFFF)
        self.data[0x34], self.data[0x35] = high & 0xFF, high >> 8
        above = min(mem_above_4g >> 16, 0xFF_FFFF)
        self.data[0x5B], self.data[0x5C], self.data[0x5D] = (
            above & 0xFF, (above >> 8) & 0xFF, above >> 16)

    def _time_register(self, reg: int) -> int:
        now = self._clock()
        t = time.gmtime(now)
        binary = self.data[RTC_REG_B] & REG_B_BINARY
        if reg == RTC_REG_A:
            uip = REG_A_UIP if now % 1.0 >= 1.0 - UPDATE_IN_PROGRESS_S else 0
            return (self.data[RTC_REG_A] & ~REG_A_UIP & 0xFF) | uip
        value = {
            RTC_SECONDS: t.tm_sec if t.tm_sec < 60 else 59,
            RTC_MINUTES: t.tm_min,
            RTC_HOURS: t.tm_hour,
            RTC_WEEKDAY: (t.tm_wday + 1) % 7 + 1,   # Sunday = 1
            RTC_DAY: t.tm_mday,
            RTC_MONTH: t.tm_mon,
            RTC_YEAR: t.tm_year % 100,
            RTC_CENTURY: t.tm_year // 100,
        }[reg]
        if reg == RTC_HOURS and not self.data[RTC_REG_B] & REG_B_24H:
            pm = value >= 12
            value = value % 12 or 12
            return (value if binary else to_bcd(value)) | (0x80 if pm else 0)
        return value if binary else to_bcd(value)

    def read(self, offset: int, address: int, data: memoryview) -> None:
        if len(data) != 1:
            return
        with self._lock:
            if offset == 0:
                data[0] = self.index
                return
            reg = self.index
            if reg in (RTC_SECONDS, RTC_MINUTES, RTC_HOURS, RTC_WEEKDAY, RTC_DAY, RTC_MONTH,
                       RTC_YEAR, RTC_CENTURY, RTC_REG_A):
                data[0] = self._time_register(reg)
            elif reg == RTC_REG_C:
                data[0] = self.data[RTC_REG_C]
                self.data[RTC_REG_C] = 0   # reading acknowledges the interrupt flags
            else:
                data[0] = self.data[reg]

    def write(self, offset: int, address: int, data: bytes | memoryview) -> None:
        if len(data) != 1:
            return
        with self._lock:
            if offset == 0:
                self.index = data[0] & INDEX_MASK   # bit 7 is the NMI mask
                return
            reg = self.index
            if reg in (RTC_REG_C, RTC_REG_D):
                return                              # read-only
            if reg == RTC_REG_A:
                self.data[reg] = data[0] & ~REG_A_UIP & 0xFF
            else:
                # Writes to the time registers are kept in NVRAM but the clock stays the
                # host's: the guest cannot move host-derived time.
                self.data[reg] = data[0]
