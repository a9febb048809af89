"""pvpanic (PCI, 1b36:0011): the guest kernel reports a panic; the VM exits with 34.

BAR0 holds one byte register: reads give the events supported, and the guest's
panic notifier writes the event that happened.
"""

from __future__ import annotations

import logging
from typing import Callable

from crosvm.devices.pci.config import BarType, PciBar, PciConfiguration
from crosvm.devices.pci.device import PciDevice

log = logging.getLogger(__name__)

PVPANIC_VENDOR_ID = 0x1B36  # Red Hat
PVPANIC_DEVICE_ID = 0x0011
CLASS_SYSTEM_PERIPHERAL = 0x08
SUBCLASS_OTHER = 0x80
PVPANIC_PANICKED = 1 << 0
PVPANIC_CRASH_LOADED = 1 << 1
BAR_SIZE = 0x10


class PvPanic(PciDevice):
    """Calls `on_panic()` when the guest writes PANICKED."""

    seccomp_policy = "pvpanic"

    def __init__(self, on_panic: Callable[[], None]) -> None:
        self.on_panic = on_panic
        self.config = PciConfiguration(PVPANIC_VENDOR_ID, PVPANIC_DEVICE_ID,
                                       CLASS_SYSTEM_PERIPHERAL, SUBCLASS_OTHER)

    def debug_label(self) -> str:
        return "pvpanic"

    def wants_intx(self) -> bool:
        return False

    def bar_specs(self) -> list[PciBar]:
        return [PciBar(0, BAR_SIZE, BarType.MEM32)]

    def read_bar(self, index: int, offset: int, data: memoryview) -> None:
        data[:] = bytes(len(data))
        if offset == 0:
            data[0] = PVPANIC_PANICKED | PVPANIC_CRASH_LOADED

    def write_bar(self, index: int, offset: int, data: bytes | memoryview) -> None:
        if offset != 0 or not len(data):
            return
        event = data[0]
        if event & PVPANIC_PANICKED:
            log.error("the guest kernel panicked")
            self.on_panic()
        elif event & PVPANIC_CRASH_LOADED:
            log.info("the guest kernel loaded its crash kernel")
