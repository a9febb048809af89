"""The interface every PCI function implements, and the adapter that puts a BAR on a bus."""

from __future__ import annotations

from crosvm.base import IrqLevelEvent
from crosvm.devices.bus import BusDevice
from crosvm.devices.pci.config import PciBar, PciConfiguration
from crosvm.jail.jail import JailConfig


class PciDevice:
    """A PCI function: config space plus BAR regions.

    Subclasses build `self.config`, declare BARs with `bar_specs()`, and serve BAR
    accesses; config accesses go through the mask-checked `PciConfiguration` unless
    a subclass needs to observe them (MSI-X enable, for example).
    """

    config: PciConfiguration
    # The seccomp policy file (seccomp/x86_64/<name>.policy) for its sandboxed process.
    seccomp_policy: str | None = None

    def debug_label(self) -> str:
        return type(self).__name__

    def jail_config(self) -> JailConfig:
        """What its jail must give it beyond the defaults; most devices need nothing."""
        return JailConfig()

    def bar_specs(self) -> list[PciBar]:
        """BARs to allocate (addresses are filled in by the allocator)."""
        return []

    def assign_bars(self, bars: list[PciBar]) -> None:
        for bar in bars:
            self.config.add_bar(bar)

    def assign_irq(self, line: IrqLevelEvent, pin: int, irq: int) -> None:
        """INTx: `pin` (1 = INTA) is wired to IOAPIC input `irq` through `line`."""
        self.intx = line
        self.config.set_interrupt_pin(pin, irq)

    def wants_intx(self) -> bool:
        return True

    def read_config_register(self, reg: int) -> int:
        return self.config.read_reg(reg)

    def write_config_register(self, reg: int, offset: int, data: bytes | memoryview) -> None:
        self.config.write_reg(reg, offset, data)

    def read_bar(self, index: int, offset: int, data: memoryview) -> None:
        data[:] = b"\xff" * len(data)

    def write_bar(self, index: int, offset: int, data: bytes | memoryview) -> None:
        pass

    def on_setup(self) -> None:
        """Called once BARs and IRQs are assigned, before the guest runs."""

    def close(self) -> None:
        pass


class PciBarRegion(BusDevice):
    """One BAR of a PCI device, as seen on the MMIO bus."""

    def __init__(self, device: PciDevice, bar: PciBar) -> None:
        self.device = device
        self.bar = bar

    def debug_label(self) -> str:
        return f"{self.device.debug_label()} BAR{self.bar.index}"

    def read(self, offset: int, address: int, data: memoryview) -> None:
        self.device.read_bar(self.bar.index, offset, data)

    def write(self, offset: int, address: int, data: bytes | memoryview) -> None:
        self.device.write_bar(self.bar.index, offset, data)
