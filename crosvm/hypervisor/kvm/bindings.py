"""KVM ABI: ctypes mirrors of <linux/kvm.h> structures and ioctl numbers (x86_64).

Every size and offset comes from ctypes; nothing here is a hand-counted byte offset.
"""

from __future__ import annotations

import ctypes as C

from crosvm.base.ioctl import io, ior, iow, iowr

KVMIO = 0xAE
KVM_API_VERSION = 12


class kvm_userspace_memory_region(C.Structure):
    _fields_ = [
        ("slot", C.c_uint32),
        ("flags", C.c_uint32),
        ("guest_phys_addr", C.c_uint64),
        ("memory_size", C.c_uint64),
        ("userspace_addr", C.c_uint64),
    ]


class kvm_regs(C.Structure):
    _fields_ = [(name, C.c_uint64) for name in (
        "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
        "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "rip", "rflags")]


class kvm_segment(C.Structure):
    _fields_ = [
        ("base", C.c_uint64),
        ("limit", C.c_uint32),
        ("selector", C.c_uint16),
        ("type", C.c_uint8),
        ("present", C.c_uint8),
        ("dpl", C.c_uint8),
        ("db", C.c_uint8),
        ("s", C.c_uint8),
        ("l", C.c_uint8),
        ("g", C.c_uint8),
        ("avl", C.c_uint8),
        ("unusable", C.c_uint8),
        ("padding", C.c_uint8),
    ]


class kvm_dtable(C.Structure):
    _fields_ = [("base", C.c_uint64), ("limit", C.c_uint16), ("padding", C.c_uint16 * 3)]


KVM_NR_INTERRUPTS = 256


class kvm_sregs(C.Structure):
    _fields_ = [
        ("cs", kvm_segment), ("ds", kvm_segment), ("es", kvm_segment), ("fs", kvm_segment),
        ("gs", kvm_segment), ("ss", kvm_segment), ("tr", kvm_segment), ("ldt", kvm_segment),
        ("gdt", kvm_dtable), ("idt", kvm_dtable),
        ("cr0", C.c_uint64), ("cr2", C.c_uint64), ("cr3", C.c_uint64), ("cr4", C.c_uint64),
        ("cr8", C.c_uint64), ("efer", C.c_uint64), ("apic_base", C.c_uint64),
        ("interrupt_bitmap", C.c_uint64 * ((KVM_NR_INTERRUPTS + 63) // 64)),
    ]


class kvm_fpu(C.Structure):
    _fields_ = [
        ("fpr", (C.c_uint8 * 16) * 8),
        ("fcw", C.c_uint16),
        ("fsw", C.c_uint16),
        ("ftwx", C.c_uint8),
        ("pad1", C.c_uint8),
        ("last_opcode", C.c_uint16),
        ("last_ip", C.c_uint64),
        ("last_dp", C.c_uint64),
        ("xmm", (C.c_uint8 * 16) * 16),
        ("mxcsr", C.c_uint32),
        ("pad2", C.c_uint32),
    ]


class kvm_msr_entry(C.Structure):
    _fields_ = [("index", C.c_uint32), ("reserved", C.c_uint32), ("data", C.c_uint64)]


class kvm_msrs(C.Structure):
    """Header only; the entries follow it (see `msrs_type`)."""
    _fields_ = [("nmsrs", C.c_uint32), ("pad", C.c_uint32)]


def msrs_type(n: int) -> type:
    """A kvm_msrs with room for n entries."""
    return type(f"kvm_msrs_{n}", (C.Structure,), {
        "_fields_": [("nmsrs", C.c_uint32), ("pad", C.c_uint32), ("entries", kvm_msr_entry * n)]})


class kvm_msr_list(C.Structure):
    _fields_ = [("nmsrs", C.c_uint32)]


class kvm_cpuid_entry2(C.Structure):
    _fields_ = [
        ("function", C.c_uint32),
        ("index", C.c_uint32),
        ("flags", C.c_uint32),
        ("eax", C.c_uint32),
        ("ebx", C.c_uint32),
        ("ecx", C.c_uint32),
        ("edx", C.c_uint32),
        ("padding", C.c_uint32 * 3),
    ]


KVM_CPUID_FLAG_SIGNIFCANT_INDEX = 1


class kvm_cpuid2(C.Structure):
    """Header only; the entries follow it (see `cpuid2_type`)."""
    _fields_ = [("nent", C.c_uint32), ("padding", C.c_uint32)]


def cpuid2_type(n: int) -> type:
    """A kvm_cpuid2 with room for n entries."""
    return type(f"kvm_cpuid2_{n}", (C.Structure,), {
        "_fields_": [("nent", C.c_uint32), ("padding", C.c_uint32),
                     ("entries", kvm_cpuid_entry2 * n)]})


KVM_APIC_REG_SIZE = 0x400


class kvm_lapic_state(C.Structure):
    _fields_ = [("regs", C.c_uint8 * KVM_APIC_REG_SIZE)]


class kvm_pit_config(C.Structure):
    _fields_ = [("flags", C.c_uint32), ("pad", C.c_uint32 * 15)]


KVM_PIT_SPEAKER_DUMMY = 1


class kvm_irq_level(C.Structure):
    _fields_ = [("irq", C.c_uint32), ("level", C.c_uint32)]


class kvm_irqfd(C.Structure):
    _fields_ = [
        ("fd", C.c_uint32),
        ("gsi", C.c_uint32),
        ("flags", C.c_uint32),
        ("resamplefd", C.c_uint32),
        ("pad", C.c_uint8 * 16),
    ]


KVM_IRQFD_FLAG_DEASSIGN = 1


class kvm_ioeventfd(C.Structure):
    _fields_ = [
        ("datamatch", C.c_uint64),
        ("addr", C.c_uint64),
        ("len", C.c_uint32),
        ("fd", C.c_int32),
        ("flags", C.c_uint32),
        ("pad", C.c_uint8 * 36),
    ]


KVM_IOEVENTFD_FLAG_DATAMATCH = 1 << 0
KVM_IOEVENTFD_FLAG_PIO = 1 << 1
KVM_IOEVENTFD_FLAG_DEASSIGN = 1 << 2

KVM_IRQFD_FLAG_DEASSIGN = 1 << 0
KVM_IRQFD_FLAG_RESAMPLE = 1 << 1


class kvm_irq_routing_irqchip(C.Structure):
    _fields_ = [("irqchip", C.c_uint32), ("pin", C.c_uint32)]


class kvm_irq_routing_msi(C.Structure):
    _fields_ = [("address_lo", C.c_uint32), ("address_hi", C.c_uint32),
                ("data", C.c_uint32), ("devid", C.c_uint32)]


class _kvm_irq_routing_u(C.Union):
    _fields_ = [("irqchip", kvm_irq_routing_irqchip), ("msi", kvm_irq_routing_msi),
                ("pad", C.c_uint32 * 8)]


class kvm_irq_routing_entry(C.Structure):
    _anonymous_ = ("u",)
    _fields_ = [("gsi", C.c_uint32), ("type", C.c_uint32), ("flags", C.c_uint32),
                ("pad", C.c_uint32), ("u", _kvm_irq_routing_u)]


class kvm_irq_routing(C.Structure):
    _fields_ = [("nr", C.c_uint32), ("flags", C.c_uint32)]


def irq_routing_type(n: int) -> type:
    """`struct kvm_irq_routing` with room for `n` entries."""
    return type(f"kvm_irq_routing_{n}", (C.Structure,), {
        "_fields_": [("nr", C.c_uint32), ("flags", C.c_uint32),
                     ("entries", kvm_irq_routing_entry * n)]})


KVM_IRQ_ROUTING_IRQCHIP = 1
KVM_IRQ_ROUTING_MSI = 2
KVM_IRQCHIP_PIC_MASTER = 0
KVM_IRQCHIP_PIC_SLAVE = 1
KVM_IRQCHIP_IOAPIC = 2


class kvm_mp_state(C.Structure):
    _fields_ = [("mp_state", C.c_uint32)]


# --- struct kvm_run (the shared page mmapped from the vCPU fd) ---
class _kvm_run_io(C.Structure):
    _fields_ = [
        ("direction", C.c_uint8),
        ("size", C.c_uint8),
        ("port", C.c_uint16),
        ("count", C.c_uint32),
        ("data_offset", C.c_uint64),
    ]


class _kvm_run_mmio(C.Structure):
    _fields_ = [
        ("phys_addr", C.c_uint64),
        ("data", C.c_uint8 * 8),
        ("len", C.c_uint32),
        ("is_write", C.c_uint8),
    ]


class _kvm_run_internal(C.Structure):
    _fields_ = [("suberror", C.c_uint32), ("ndata", C.c_uint32), ("data", C.c_uint64 * 16)]


class _kvm_run_system_event(C.Structure):
    _fields_ = [("type", C.c_uint32), ("ndata", C.c_uint32), ("data", C.c_uint64 * 16)]


class _kvm_run_fail_entry(C.Structure):
    _fields_ = [("hardware_entry_failure_reason", C.c_uint64), ("cpu", C.c_uint32)]


class _kvm_run_ex(C.Structure):
    _fields_ = [("exception", C.c_uint32), ("error_code", C.c_uint32)]


class _kvm_run_exit(C.Union):
    _fields_ = [
        ("io", _kvm_run_io),
        ("mmio", _kvm_run_mmio),
        ("internal", _kvm_run_internal),
        ("system_event", _kvm_run_system_event),
        ("fail_entry", _kvm_run_fail_entry),
        ("ex", _kvm_run_ex),
        ("padding", C.c_char * 256),
    ]


class kvm_run(C.Structure):
    _fields_ = [
        ("request_interrupt_window", C.c_uint8),
        ("immediate_exit", C.c_uint8),
        ("padding1", C.c_uint8 * 6),
        ("exit_reason", C.c_uint32),
        ("ready_for_interrupt_injection", C.c_uint8),
        ("if_flag", C.c_uint8),
        ("flags", C.c_uint16),
        ("cr8", C.c_uint64),
        ("apic_base", C.c_uint64),
        ("exit", _kvm_run_exit),
    ]


# Exit reasons.
KVM_EXIT_UNKNOWN = 0
KVM_EXIT_EXCEPTION = 1
KVM_EXIT_IO = 2
KVM_EXIT_HYPERCALL = 3
KVM_EXIT_DEBUG = 4
KVM_EXIT_HLT = 5
KVM_EXIT_MMIO = 6
KVM_EXIT_IRQ_WINDOW_OPEN = 7
KVM_EXIT_SHUTDOWN = 8
KVM_EXIT_FAIL_ENTRY = 9
KVM_EXIT_INTR = 10
KVM_EXIT_INTERNAL_ERROR = 17
KVM_EXIT_SYSTEM_EVENT = 24

KVM_EXIT_IO_IN = 0
KVM_EXIT_IO_OUT = 1

KVM_SYSTEM_EVENT_SHUTDOWN = 1
KVM_SYSTEM_EVENT_RESET = 2
KVM_SYSTEM_EVENT_CRASH = 3

KVM_INTERNAL_ERROR_EMULATION = 1

# Capabilities.
KVM_CAP_IRQCHIP = 0
KVM_CAP_USER_MEMORY = 3
KVM_CAP_SET_TSS_ADDR = 4
KVM_CAP_EXT_CPUID = 7
KVM_CAP_IOEVENTFD = 36
KVM_CAP_PIT2 = 33
KVM_CAP_IRQFD = 32
KVM_CAP_NR_MEMSLOTS = 10
KVM_CAP_IMMEDIATE_EXIT = 136

# ioctls on /dev/kvm.
KVM_GET_API_VERSION = io(KVMIO, 0x00)
KVM_CREATE_VM = io(KVMIO, 0x01)
KVM_GET_MSR_INDEX_LIST = iowr(KVMIO, 0x02, kvm_msr_list)
KVM_CHECK_EXTENSION = io(KVMIO, 0x03)
KVM_GET_VCPU_MMAP_SIZE = io(KVMIO, 0x04)
KVM_GET_SUPPORTED_CPUID = iowr(KVMIO, 0x05, kvm_cpuid2)

# ioctls on a VM fd.
KVM_CREATE_VCPU = io(KVMIO, 0x41)
KVM_SET_USER_MEMORY_REGION = iow(KVMIO, 0x46, kvm_userspace_memory_region)
KVM_SET_TSS_ADDR = io(KVMIO, 0x47)
KVM_SET_IDENTITY_MAP_ADDR = iow(KVMIO, 0x48, C.c_uint64)
KVM_CREATE_IRQCHIP = io(KVMIO, 0x60)
KVM_IRQ_LINE = iow(KVMIO, 0x61, kvm_irq_level)
KVM_IRQFD = iow(KVMIO, 0x76, kvm_irqfd)
KVM_CREATE_PIT2 = iow(KVMIO, 0x77, kvm_pit_config)
KVM_IOEVENTFD = iow(KVMIO, 0x79, kvm_ioeventfd)
KVM_SET_GSI_ROUTING = iow(KVMIO, 0x6A, kvm_irq_routing)

# ioctls on a vCPU fd.
KVM_RUN = io(KVMIO, 0x80)
KVM_GET_REGS = ior(KVMIO, 0x81, kvm_regs)
KVM_SET_REGS = iow(KVMIO, 0x82, kvm_regs)
KVM_GET_SREGS = ior(KVMIO, 0x83, kvm_sregs)
KVM_SET_SREGS = iow(KVMIO, 0x84, kvm_sregs)
KVM_SET_MSRS = iow(KVMIO, 0x89, kvm_msrs)
KVM_GET_MSRS = iowr(KVMIO, 0x88, kvm_msrs)
KVM_GET_FPU = ior(KVMIO, 0x8C, kvm_fpu)
KVM_SET_FPU = iow(KVMIO, 0x8D, kvm_fpu)
KVM_GET_LAPIC = ior(KVMIO, 0x8E, kvm_lapic_state)
KVM_SET_LAPIC = iow(KVMIO, 0x8F, kvm_lapic_state)
KVM_SET_CPUID2 = iow(KVMIO, 0x90, kvm_cpuid2)
KVM_GET_MP_STATE = ior(KVMIO, 0x98, kvm_mp_state)
