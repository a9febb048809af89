"""Putting PCI devices into a VM: slots, BARs, INTx lines, MSI-X GSIs and ioeventfds."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable

from crosvm.arch.x86_64 import layout as L
from crosvm.arch.x86_64.acpi import PciLayout
from crosvm.base import Event, IrqLevelEvent
from crosvm.base.ratelimit import RateLimitedLog
from crosvm.devices.bus import Bus, BusDevice, BusError
from crosvm.devices.pci import BarType, PciBarRegion, PciConfigIo, PciConfigMmio, PciDevice, PciRoot
from crosvm.devices.pci.config import BAR0_REG, COMMAND_MEMORY, NUM_BARS, PciBar
from crosvm.devices.proxy import HostRequests
from crosvm.devices.virtio.virtio_device import VirtioDevice
from crosvm.devices.virtio.virtio_pci import VirtioPciDevice
from crosvm.hypervisor.kvm import KvmError, KvmVm
from crosvm.vm_memory import GuestMemory

log = logging.getLogger(__name__)
_guest_log = RateLimitedLog(log)

PCI_CONFIG_IO_PORT = 0xCF8
FIRST_PCI_IRQ = 9
LAST_IOAPIC_PIN = 23
FIRST_MSI_GSI = 24
HIGH_MMIO_ALIGN = 1 << 30
MAX_PHYS_BITS = 46


class AddressAllocator:
    """Hands out size-aligned ranges from [base, base+size), lowest first."""

    def __init__(self, base: int, size: int) -> None:
        self.base, self.end = base, base + size
        self.next = base

    def allocate(self, size: int, align: int | None = None) -> int:
        """`size` bytes aligned to `align` (a power of two; `size` by default)."""
        align = align or size
        addr = (self.next + align - 1) & ~(align - 1)
        if addr + size > self.end:
            raise ValueError(f"no room for {size:#x} bytes in {self.base:#x}-{self.end:#x}")
        self.next = addr + size
        return addr


def high_mmio_range(mem_size: int, phys_bits: int) -> tuple[int, int]:
    """From the first GiB boundary above RAM to the end of the physical address space."""
    ram_end = L.FIRST_ADDR_PAST_32BITS + max(0, mem_size - L.END_ADDR_BEFORE_32BITS)
    start = (ram_end + HIGH_MMIO_ALIGN - 1) & ~(HIGH_MMIO_ALIGN - 1)
    end = 1 << min(phys_bits, MAX_PHYS_BITS)
    return start, end - start


@dataclass
class BarMapping:
    """Where one BAR is on the MMIO bus now, and the ioeventfds inside it."""

    bar: PciBar
    region: PciBarRegion
    address: int | None  # None: off the bus (decoding off, or nowhere valid to go)
    ioevents: list[tuple[Event, int]] = field(default_factory=list)  # (event, offset)


# spawn(device, name, keep_fds, host, start) -> the proxy that replaces the device.
SpawnFn = Callable[[PciDevice, str, list[int], HostRequests, Callable[[], None] | None],
                   PciDevice]


class PciSetup:
    """Builds bus 0 for one VM, wiring each device to KVM as it is added.

    With `spawn`, each device is moved into its own process once its BARs and
    interrupts are set up, and a proxy takes its place on the buses.
    """

    def __init__(self, vm: KvmVm, mem: GuestMemory, io_bus: Bus, mmio_bus: Bus,
                 mem_size: int, phys_bits: int, reset_port: BusDevice | None,
                 spawn: SpawnFn | None = None) -> None:
        self.vm = vm
        self.spawn = spawn
        self.mem = mem
        self.mmio_bus = mmio_bus
        self.root = PciRoot()
        self.low = AddressAllocator(L.END_ADDR_BEFORE_32BITS,
                                    L.PCIE_ECAM_START - L.END_ADDR_BEFORE_32BITS)
        self.high_range = high_mmio_range(mem_size, phys_bits)
        self.high = AddressAllocator(*self.high_range)
        self.next_irq = FIRST_PCI_IRQ
        self.next_gsi = FIRST_MSI_GSI
        self.intx: list[tuple[int, int, int]] = []
        self.devices: list[PciDevice] = []
        self._events: list = []
        self._bar_maps: dict[int, list[BarMapping]] = {}  # id(bus-side device) -> its BARs
        self._reserved: list[tuple[int, int]] = []  # [start, end) of non-BAR memory (pmem)
        self.root.on_config_write = self._config_written
        io_bus.insert(PciConfigIo(self.root, reset_port), PCI_CONFIG_IO_PORT, 8)
        mmio_bus.insert(PciConfigMmio(self.root), L.PCIE_ECAM_START, L.PCIE_ECAM_SIZE)

    def layout(self) -> PciLayout:
        return PciLayout(high_mmio=self.high_range, intx=tuple(self.intx))

    def allocate_high(self, size: int, align: int) -> int:
        """Guest addresses in the high MMIO window for memory that is not a BAR (a pmem
        region, as crosvm places them): inside the root bridge's window, never RAM."""
        address = self.high.allocate(size, align)
        self._reserved.append((address, address + size))  # no BAR may be moved over it
        return address

    def _allocate_irq(self) -> int:
        # Round-robin over IOAPIC pins 9-23; lines are shared beyond 15 devices.
        irq = self.next_irq
        self.next_irq = FIRST_PCI_IRQ if irq >= LAST_IOAPIC_PIN else irq + 1
        return irq

    def add_virtio(self, device: VirtioDevice, keep_fds: list[int] | None = None,
                   start: Callable[[], None] | None = None) -> VirtioPciDevice:
        """Wrap a virtio device in the PCI transport and add it. `start` runs where the
        device runs (its process, when sandboxed) before it serves the guest."""
        num = VirtioPciDevice.num_msix_vectors(device)
        gsis = list(range(self.next_gsi, self.next_gsi + num))
        self.next_gsi += num
        irqfds = []
        for gsi in gsis:
            event = Event()
            self.vm.register_irqfd(event.fd, gsi)
            irqfds.append(event)
            self._events.append(event)

        def route(vector: int, address: int, data: int) -> None:
            if 0 <= vector < len(gsis):  # the request may come from an untrusted process
                self.vm.set_msi_route(gsis[vector], address, data)

        host = HostRequests(route=route)
        pci_dev = VirtioPciDevice(device, self.mem, irqfds, host.set_msi_route)
        fds = [e.fd for e in pci_dev.queue_events] + [e.fd for e in irqfds]
        fds += device.keep_fds() + list(keep_fds or [])
        target = self.add(pci_dev, host, fds, start)
        bar0 = self._bar_maps[id(target)][0]
        for event, addr in pci_dev.notify_addresses():
            # Linux kicks with a 16-bit write of the queue index.
            self.vm.register_ioevent(event.fd, addr, 2, pio=False)
            bar0.ioevents.append((event, addr - bar0.address))
        return pci_dev

    def add(self, device: PciDevice, host: HostRequests | None = None,
            keep_fds: list[int] | None = None,
            start: Callable[[], None] | None = None) -> PciDevice:
        """Add `device` to bus 0; returns what sits on the bus for it (a proxy when
        sandboxed)."""
        address = self.root.add_device(device)
        bars = device.bar_specs()
        for bar in bars:
            allocator = self.high if bar.type is BarType.MEM64 else self.low
            bar.address = allocator.allocate(bar.size)
        device.assign_bars(bars)
        # Not the memfd: the child's inherited mapping is all it needs of guest RAM.
        fds = list(keep_fds or [])
        if device.wants_intx():
            irq = self._allocate_irq()
            line = IrqLevelEvent()
            self.vm.register_irqfd(line.trigger.fd, irq, line.resample.fd)
            self._events.append(line)
            device.assign_irq(line, 1, irq)
            self.intx.append((address.dev, 0, irq))
            fds += [line.trigger.fd, line.resample.fd]
        device.on_setup()
        target = device
        if self.spawn is not None:
            inner = device.device if isinstance(device, VirtioPciDevice) else device
            name = f"pci{address.dev:02x}_{type(inner).__name__.lower()}"  # the comm
            target = self.spawn(device, name, fds, host or HostRequests(), start)
            self.root.devices[address] = target
        elif start is not None:
            start()
        maps = []
        for bar in bars:
            region = PciBarRegion(target, bar)
            self.mmio_bus.insert(region, bar.address, bar.size)
            maps.append(BarMapping(bar, region, bar.address))
        self._bar_maps[id(target)] = maps
        self.devices.append(device)
        log.debug("pci %s: %s, BARs %s", address, device.debug_label(),
                  ", ".join(f"{b.index}@{b.address:#x}+{b.size:#x}" for b in bars))
        return target

    # -- BARs the guest moves -----------------------------------------------------
    def _config_written(self, device: PciDevice, reg: int) -> None:
        """After a write to a command register or a BAR: map BARs where the guest has
        them, as hardware decodes them.

        Called under the root's config-write lock. A BAR is on the bus while its
        function's memory decoding is on, at the address in its register, if that range
        lies in the root bridge's MMIO windows and is free; otherwise it is off the bus
        (and retried at the next write: two BARs the guest swaps both land). Linux
        turns decoding off while it sizes or reprograms BARs, so half-written addresses
        are never mapped."""
        if reg != 1 and not BAR0_REG <= reg < BAR0_REG + NUM_BARS:
            return
        for target in self.root.devices.values():
            maps = self._bar_maps.get(id(target))
            if not maps:
                continue
            decoding = bool(target.config.command & COMMAND_MEMORY)
            for m in maps:
                want = target.config.bar_address(m.bar.index) if decoding else None
                if want != m.address:
                    self._remap(target, m, want)

    def _bar_window_ok(self, bar: PciBar, address: int) -> bool:
        """Only inside the MMIO windows the DSDT gives the root bridge, and never over
        memory the VMM placed there (a pmem region's KVM slot would shadow the BAR)."""
        end = address + bar.size
        low_ok = self.low.base <= address and end <= self.low.end
        high_ok = self.high.base <= address and end <= self.high.end
        if any(start < end and address < stop for start, stop in self._reserved):
            return False
        return low_ok or (bar.type is BarType.MEM64 and high_ok)

    def _remap(self, device: PciDevice, m: BarMapping, want: int | None) -> None:
        label = f"{device.debug_label()} BAR{m.bar.index}"
        if want is not None and not self._bar_window_ok(m.bar, want):
            _guest_log.warning("%s: guest put it at %#x, outside the PCI windows; not mapped",
                               label, want)
            want = None
        if m.address is not None:
            self.mmio_bus.remove(m.address)
            self._set_ioevents(m.ioevents, m.address, register=False)
            m.address = None
        if want is None:
            return
        try:
            self.mmio_bus.insert(m.region, want, m.bar.size)
        except BusError as e:
            _guest_log.warning("%s: %#x is taken (%s); not mapped until it is free", label,
                               want, e)
            return
        self._set_ioevents(m.ioevents, want, register=True)
        moved = want != m.bar.address  # not where the VMM first put it
        _guest_log(logging.INFO if moved else logging.DEBUG, "%s mapped by the guest at %#x",
                   label, want)
        m.address = want

    def _set_ioevents(self, ioevents: list[tuple[Event, int]], base: int,
                      register: bool) -> None:
        for event, offset in ioevents:
            try:
                if register:
                    self.vm.register_ioevent(event.fd, base + offset, 2, pio=False)
                else:
                    self.vm.unregister_ioevent(event.fd, base + offset, 2, pio=False)
            except KvmError as e:  # the access still reaches the device through the bus
                _guest_log.warning("ioeventfd at %#x: %s", base + offset, e)

    def close(self) -> None:
        for device in self.devices:
            device.close()
