"""Typed wrappers over the KVM ioctls used by the VMM."""

from __future__ import annotations

import ctypes as C
import errno
import mmap
import os
import threading

from crosvm.base.ioctl import ioctl_ref, ioctl_val
from crosvm.hypervisor.kvm import bindings as B


class KvmError(Exception):
    """A KVM call failed; the message names the call."""


def _call(what: str, fn, *args) -> int:
    try:
        return fn(*args)
    except OSError as e:
        raise KvmError(f"{what} failed: {os.strerror(e.errno)}") from e


class Kvm:
    """The /dev/kvm system handle."""

    def __init__(self, device: str = "/dev/kvm") -> None:
        try:
            self.fd = os.open(device, os.O_RDWR | os.O_CLOEXEC)
        except OSError as e:
            raise KvmError(f"failed to open {device}: {os.strerror(e.errno)}") from e
        version = _call("KVM_GET_API_VERSION", ioctl_val, self.fd, B.KVM_GET_API_VERSION)
        if version != B.KVM_API_VERSION:
            os.close(self.fd)
            raise KvmError(f"unsupported KVM API version {version}")
        self.vcpu_mmap_size = _call("KVM_GET_VCPU_MMAP_SIZE", ioctl_val, self.fd,
                                    B.KVM_GET_VCPU_MMAP_SIZE)

    def check_extension(self, cap: int) -> int:
        return ioctl_val(self.fd, B.KVM_CHECK_EXTENSION, cap)

    def supported_cpuid(self) -> list[B.kvm_cpuid_entry2]:
        """KVM_GET_SUPPORTED_CPUID, growing the buffer until it fits."""
        n = 64
        while True:
            buf = B.cpuid2_type(n)()
            buf.nent = n
            try:
                ioctl_ref(self.fd, B.KVM_GET_SUPPORTED_CPUID, buf)
            except OSError as e:
                if e.errno == errno.E2BIG and n < 4096:
                    n *= 2
                    continue
                raise KvmError(f"KVM_GET_SUPPORTED_CPUID failed: {os.strerror(e.errno)}") from e
            return [B.kvm_cpuid_entry2.from_buffer_copy(buf.entries[i]) for i in range(buf.nent)]

    def close(self) -> None:
        os.close(self.fd)


class KvmVm:
    """A VM: memory slots, in-kernel irqchip and PIT, irqfds and ioeventfds."""

    def __init__(self, kvm: Kvm) -> None:
        self.kvm = kvm
        self.fd = _call("KVM_CREATE_VM", ioctl_val, kvm.fd, B.KVM_CREATE_VM, 0)
        self._next_slot = 0
        # GSI -> routing entry; KVM_SET_GSI_ROUTING replaces the whole table, so the
        # irqchip's default pins are kept here alongside the MSI routes.
        self._routes: dict[int, list[B.kvm_irq_routing_entry]] = {}
        # One lock for the whole table: two vCPUs programming MSI-X at once must not
        # commit each other's half-updated table (ctypes releases the GIL in the ioctl).
        self._routes_lock = threading.Lock()

    def add_memory_region(self, guest_addr: int, size: int, host_addr: int,
                          read_only: bool = False) -> int:
        region = B.kvm_userspace_memory_region(
            slot=self._next_slot, flags=2 if read_only else 0, guest_phys_addr=guest_addr,
            memory_size=size, userspace_addr=host_addr)
        _call("KVM_SET_USER_MEMORY_REGION", ioctl_ref, self.fd, B.KVM_SET_USER_MEMORY_REGION,
              region)
        self._next_slot += 1
        return region.slot

    def set_tss_addr(self, addr: int) -> None:
        _call("KVM_SET_TSS_ADDR", ioctl_val, self.fd, B.KVM_SET_TSS_ADDR, addr)

    def set_identity_map_addr(self, addr: int) -> None:
        value = C.c_uint64(addr)
        _call("KVM_SET_IDENTITY_MAP_ADDR", ioctl_ref, self.fd, B.KVM_SET_IDENTITY_MAP_ADDR, value)

    def create_irq_chip(self) -> None:
        _call("KVM_CREATE_IRQCHIP", ioctl_val, self.fd, B.KVM_CREATE_IRQCHIP, 0)
        # KVM's default routing: GSIs 0-15 go to both PICs and the IOAPIC, 16-23 to
        # the IOAPIC only.
        for gsi in range(24):
            entries = [self._irqchip_route(gsi, B.KVM_IRQCHIP_IOAPIC, gsi)]
            if gsi < 16:
                chip = B.KVM_IRQCHIP_PIC_MASTER if gsi < 8 else B.KVM_IRQCHIP_PIC_SLAVE
                entries.append(self._irqchip_route(gsi, chip, gsi % 8))
            self._routes[gsi] = entries

    @staticmethod
    def _irqchip_route(gsi: int, chip: int, pin: int) -> B.kvm_irq_routing_entry:
        entry = B.kvm_irq_routing_entry(gsi=gsi, type=B.KVM_IRQ_ROUTING_IRQCHIP)
        entry.irqchip.irqchip = chip
        entry.irqchip.pin = pin
        return entry

    def set_msi_route(self, gsi: int, address: int, data: int) -> None:
        """Route `gsi` to the MSI message (address, data); irqfds on it deliver it."""
        entry = B.kvm_irq_routing_entry(gsi=gsi, type=B.KVM_IRQ_ROUTING_MSI)
        entry.msi.address_lo = address & 0xFFFF_FFFF
        entry.msi.address_hi = address >> 32
        entry.msi.data = data
        with self._routes_lock:
            self._routes[gsi] = [entry]
            self._commit_routes_locked()

    def _commit_routes_locked(self) -> None:
        entries = [e for gsi in sorted(self._routes) for e in self._routes[gsi]]
        table = B.irq_routing_type(len(entries))(nr=len(entries))
        for i, entry in enumerate(entries):
            table.entries[i] = entry
        _call("KVM_SET_GSI_ROUTING", ioctl_ref, self.fd, B.KVM_SET_GSI_ROUTING, table)

    def create_pit(self) -> None:
        config = B.kvm_pit_config(flags=B.KVM_PIT_SPEAKER_DUMMY)
        _call("KVM_CREATE_PIT2", ioctl_ref, self.fd, B.KVM_CREATE_PIT2, config)

    def set_irq_line(self, irq: int, level: bool) -> None:
        arg = B.kvm_irq_level(irq=irq, level=int(level))
        _call("KVM_IRQ_LINE", ioctl_ref, self.fd, B.KVM_IRQ_LINE, arg)

    def register_irqfd(self, fd: int, gsi: int, resample_fd: int | None = None) -> None:
        """Signalling `fd` pulses interrupt `gsi` without leaving the kernel.

        With `resample_fd` the line is level-triggered: it stays asserted until the
        guest's EOI, when KVM lowers it and signals `resample_fd`.
        """
        arg = B.kvm_irqfd(fd=fd, gsi=gsi)
        if resample_fd is not None:
            arg.flags = B.KVM_IRQFD_FLAG_RESAMPLE
            arg.resamplefd = resample_fd
        _call("KVM_IRQFD", ioctl_ref, self.fd, B.KVM_IRQFD, arg)

    def unregister_irqfd(self, fd: int, gsi: int) -> None:
        arg = B.kvm_irqfd(fd=fd, gsi=gsi, flags=B.KVM_IRQFD_FLAG_DEASSIGN)
        _call("KVM_IRQFD(deassign)", ioctl_ref, self.fd, B.KVM_IRQFD, arg)

    def register_ioevent(self, fd: int, addr: int, length: int, pio: bool,
                         datamatch: int | None = None) -> None:
        """A guest write to `addr` signals `fd` in the kernel; the vCPU does not exit."""
        flags = B.KVM_IOEVENTFD_FLAG_PIO if pio else 0
        if datamatch is not None:
            flags |= B.KVM_IOEVENTFD_FLAG_DATAMATCH
        arg = B.kvm_ioeventfd(datamatch=datamatch or 0, addr=addr, len=length, fd=fd,
                              flags=flags)
        _call("KVM_IOEVENTFD", ioctl_ref, self.fd, B.KVM_IOEVENTFD, arg)

    def unregister_ioevent(self, fd: int, addr: int, length: int, pio: bool) -> None:
        flags = B.KVM_IOEVENTFD_FLAG_DEASSIGN | (B.KVM_IOEVENTFD_FLAG_PIO if pio else 0)
        arg = B.kvm_ioeventfd(addr=addr, len=length, fd=fd, flags=flags)
        _call("KVM_IOEVENTFD(deassign)", ioctl_ref, self.fd, B.KVM_IOEVENTFD, arg)

    def create_vcpu(self, vcpu_id: int) -> "KvmVcpu":
        fd = _call("KVM_CREATE_VCPU", ioctl_val, self.fd, B.KVM_CREATE_VCPU, vcpu_id)
        return KvmVcpu(self, vcpu_id, fd)

    def close(self) -> None:
        os.close(self.fd)


class KvmVcpu:
    """One vCPU: registers, CPUID, MSRs, LAPIC and the shared kvm_run page."""

    def __init__(self, vm: KvmVm, vcpu_id: int, fd: int) -> None:
        self.vm = vm
        self.id = vcpu_id
        self.fd = fd
        self._run_map = mmap.mmap(fd, vm.kvm.vcpu_mmap_size, mmap.MAP_SHARED,
                                  mmap.PROT_READ | mmap.PROT_WRITE)
        self.run_page = B.kvm_run.from_buffer(self._run_map)

    @property
    def run_mmap(self) -> mmap.mmap:
        """The whole kvm_run mapping (PIO data lives at io.data_offset inside it)."""
        return self._run_map

    def get_regs(self) -> B.kvm_regs:
        regs = B.kvm_regs()
        _call("KVM_GET_REGS", ioctl_ref, self.fd, B.KVM_GET_REGS, regs)
        return regs

    def set_regs(self, regs: B.kvm_regs) -> None:
        _call("KVM_SET_REGS", ioctl_ref, self.fd, B.KVM_SET_REGS, regs)

    def get_sregs(self) -> B.kvm_sregs:
        sregs = B.kvm_sregs()
        _call("KVM_GET_SREGS", ioctl_ref, self.fd, B.KVM_GET_SREGS, sregs)
        return sregs

    def set_sregs(self, sregs: B.kvm_sregs) -> None:
        _call("KVM_SET_SREGS", ioctl_ref, self.fd, B.KVM_SET_SREGS, sregs)

    def get_fpu(self) -> B.kvm_fpu:
        fpu = B.kvm_fpu()
        _call("KVM_GET_FPU", ioctl_ref, self.fd, B.KVM_GET_FPU, fpu)
        return fpu

    def set_fpu(self, fpu: B.kvm_fpu) -> None:
        _call("KVM_SET_FPU", ioctl_ref, self.fd, B.KVM_SET_FPU, fpu)

    def set_msrs(self, msrs: list[tuple[int, int]]) -> None:
        buf = B.msrs_type(len(msrs))()
        buf.nmsrs = len(msrs)
        for i, (index, data) in enumerate(msrs):
            buf.entries[i].index = index
            buf.entries[i].data = data
        n = _call("KVM_SET_MSRS", ioctl_ref, self.fd, B.KVM_SET_MSRS, buf)
        if n != len(msrs):
            raise KvmError(f"KVM_SET_MSRS set {n} of {len(msrs)} MSRs "
                           f"(first rejected: {buf.entries[n].index:#x})")

    def get_msrs(self, indices: list[int]) -> dict[int, int]:
        buf = B.msrs_type(len(indices))()
        buf.nmsrs = len(indices)
        for i, index in enumerate(indices):
            buf.entries[i].index = index
        n = _call("KVM_GET_MSRS", ioctl_ref, self.fd, B.KVM_GET_MSRS, buf)
        return {buf.entries[i].index: buf.entries[i].data for i in range(n)}

    def set_cpuid(self, entries: list[B.kvm_cpuid_entry2]) -> None:
        buf = B.cpuid2_type(len(entries))()
        buf.nent = len(entries)
        for i, entry in enumerate(entries):
            buf.entries[i] = entry
        _call("KVM_SET_CPUID2", ioctl_ref, self.fd, B.KVM_SET_CPUID2, buf)

    def get_lapic(self) -> B.kvm_lapic_state:
        state = B.kvm_lapic_state()
        _call("KVM_GET_LAPIC", ioctl_ref, self.fd, B.KVM_GET_LAPIC, state)
        return state

    def set_lapic(self, state: B.kvm_lapic_state) -> None:
        _call("KVM_SET_LAPIC", ioctl_ref, self.fd, B.KVM_SET_LAPIC, state)

    def close(self) -> None:
        del self.run_page
        self._run_map.close()
        os.close(self.fd)
