"""Boot-time vCPU state: identity page tables, GDT, segments, control registers, MSRs."""

from __future__ import annotations

from crosvm.arch.x86_64 import layout as L
from crosvm.hypervisor.kvm import bindings as B
from crosvm.hypervisor.kvm.kvm import KvmVcpu
from crosvm.vm_memory import GuestMemory

X86_CR0_PE = 0x1
X86_CR0_ET = 0x10
X86_CR0_PG = 0x8000_0000
X86_CR4_PAE = 0x20
EFER_LME = 0x100
EFER_LMA = 0x400

# GDT entries (flags, base, limit) as crosvm: null, 64-bit code, data, TSS.
GDT_ENTRIES = [(0, 0, 0), (0xA09B, 0, 0xFFFFF), (0xC093, 0, 0xFFFFF), (0x808B, 0, 0xFFFFF)]
CODE_SELECTOR = 0x8
DATA_SELECTOR = 0x10
TSS_SELECTOR = 0x18


def gdt_entry(flags: int, base: int, limit: int) -> int:
    """A 64-bit descriptor from the packed flags word (access byte | flags nibble << 12)."""
    return (((base & 0xFF00_0000) << 32) | ((flags & 0xF0FF) << 40)
            | ((limit & 0xF_0000) << 32) | ((base & 0x00FF_FFFF) << 16) | (limit & 0xFFFF))


def segment_from_gdt(entry: int, selector: int) -> B.kvm_segment:
    """The kvm_segment that loading `selector` with descriptor `entry` would give."""
    base = ((entry >> 16) & 0xFF_FFFF) | (((entry >> 56) & 0xFF) << 24)
    limit = (entry & 0xFFFF) | (((entry >> 48) & 0xF) << 16)
    g = (entry >> 55) & 1
    return B.kvm_segment(
        base=base,
        limit=(limit << 12) | 0xFFF if g else limit,
        selector=selector,
        type=(entry >> 40) & 0xF,
        present=(entry >> 47) & 1,
        dpl=(entry >> 45) & 3,
        db=(entry >> 54) & 1,
        s=(entry >> 44) & 1,
        l=(entry >> 53) & 1,
        g=g,
        avl=(entry >> 52) & 1,
        unusable=0 if (entry >> 47) & 1 else 1,
    )


def write_gdt_idt(mem: GuestMemory) -> list[int]:
    entries = [gdt_entry(*e) for e in GDT_ENTRIES]
    for i, entry in enumerate(entries):
        mem.write_int(L.GDT_ADDR + 8 * i, entry, 8)
    mem.write_int(L.IDT_ADDR, 0, 8)
    return entries


def write_page_tables(mem: GuestMemory) -> None:
    """Identity-map the low 4 GiB with 2 MiB pages (PML4 -> PDPT -> 4 PDs)."""
    mem.write_int(L.PML4_ADDR, L.PDPTE_ADDR | 0x3, 8)
    for i in range(4):
        mem.write_int(L.PDPTE_ADDR + 8 * i, (L.PDE_ADDR + 0x1000 * i) | 0x3, 8)
    pd = bytearray()
    for i in range(512 * 4):
        pd += ((i << 21) | 0x83).to_bytes(8, "little")  # present, writable, 2 MiB page
    mem.write(L.PDE_ADDR, pd)


def setup_sregs(mem: GuestMemory, vcpu: KvmVcpu) -> None:
    """Long mode with paging from the first instruction, as crosvm boots Linux."""
    gdt = write_gdt_idt(mem)
    write_page_tables(mem)
    sregs = vcpu.get_sregs()
    sregs.gdt.base = L.GDT_ADDR
    sregs.gdt.limit = 8 * len(gdt) - 1
    sregs.idt.base = L.IDT_ADDR
    sregs.idt.limit = 7
    code = segment_from_gdt(gdt[1], CODE_SELECTOR)
    data = segment_from_gdt(gdt[2], DATA_SELECTOR)
    sregs.cs = code
    sregs.ds = sregs.es = sregs.fs = sregs.gs = sregs.ss = data
    sregs.tr = segment_from_gdt(gdt[3], TSS_SELECTOR)
    sregs.cr0 |= X86_CR0_PE | X86_CR0_PG | X86_CR0_ET
    sregs.cr3 = L.PML4_ADDR
    sregs.cr4 |= X86_CR4_PAE
    sregs.efer |= EFER_LME | EFER_LMA
    vcpu.set_sregs(sregs)


def setup_regs(vcpu: KvmVcpu, entry: int) -> None:
    regs = B.kvm_regs(rip=entry, rsp=L.BOOT_STACK_POINTER, rbp=L.BOOT_STACK_POINTER,
                      rsi=L.ZERO_PAGE_ADDR, rflags=0x2)
    vcpu.set_regs(regs)


def setup_fpu(vcpu: KvmVcpu) -> None:
    fpu = B.kvm_fpu(fcw=0x37F, mxcsr=0x1F80)
    vcpu.set_fpu(fpu)


MSR_IA32_TSC = 0x10
MSR_IA32_SYSENTER_CS = 0x174
MSR_IA32_SYSENTER_ESP = 0x175
MSR_IA32_SYSENTER_EIP = 0x176
MSR_IA32_MISC_ENABLE = 0x1A0
MSR_MTRR_DEF_TYPE = 0x2FF
MSR_MTRR_PHYS_BASE0 = 0x200
MSR_STAR = 0xC000_0081
MSR_LSTAR = 0xC000_0082
MSR_CSTAR = 0xC000_0083
MSR_SYSCALL_MASK = 0xC000_0084
MSR_KERNEL_GS_BASE = 0xC000_0102
MISC_ENABLE_FAST_STRING = 1
MTRR_ENABLE = 1 << 11
MTRR_TYPE_UC = 0
MTRR_TYPE_WB = 6


def mtrr_ranges(start: int, end: int) -> list[tuple[int, int]]:
    """Split [start, end) into naturally aligned power-of-two blocks (variable MTRRs)."""
    out = []
    while start < end:
        size = start & -start if start else 1 << 63
        while size > end - start:
            size >>= 1
        out.append((start, size))
        start += size
    return out


def boot_msrs(phys_bits: int, pci_start: int = L.END_ADDR_BEFORE_32BITS,
              var_mtrrs: int = 8) -> list[tuple[int, int]]:
    """Long-mode MSRs zeroed, fast strings on, WB by default with the PCI hole UC."""
    msrs = [(MSR_IA32_SYSENTER_CS, 0), (MSR_IA32_SYSENTER_ESP, 0), (MSR_IA32_SYSENTER_EIP, 0),
            (MSR_STAR, 0), (MSR_CSTAR, 0), (MSR_KERNEL_GS_BASE, 0), (MSR_SYSCALL_MASK, 0),
            (MSR_LSTAR, 0), (MSR_IA32_TSC, 0),
            (MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING)]
    holes = mtrr_ranges(pci_start, L.FIRST_ADDR_PAST_32BITS)
    if len(holes) <= var_mtrrs:
        phys_mask = (1 << phys_bits) - 1
        for i, (base, size) in enumerate(holes):
            msrs.append((MSR_MTRR_PHYS_BASE0 + 2 * i, base | MTRR_TYPE_UC))
            msrs.append((MSR_MTRR_PHYS_BASE0 + 2 * i + 1, (~(size - 1) & phys_mask) | MTRR_ENABLE))
    msrs.append((MSR_MTRR_DEF_TYPE, MTRR_ENABLE | MTRR_TYPE_WB))
    return msrs


APIC_LVT0 = 0x350
APIC_LVT1 = 0x360
APIC_MODE_NMI = 0x4
APIC_MODE_EXTINT = 0x7


def _set_apic_delivery_mode(reg: int, mode: int) -> int:
    return (reg & ~0x700) | (mode << 8)


def setup_lint(vcpu: KvmVcpu) -> None:
    """LINT0 as ExtINT (the PIC) and LINT1 as NMI, as on a PC."""
    lapic = vcpu.get_lapic()
    regs = bytearray(lapic.regs)
    for offset, mode in ((APIC_LVT0, APIC_MODE_EXTINT), (APIC_LVT1, APIC_MODE_NMI)):
        value = int.from_bytes(regs[offset:offset + 4], "little")
        regs[offset:offset + 4] = _set_apic_delivery_mode(value, mode).to_bytes(4, "little")
    lapic.regs[:] = regs
    vcpu.set_lapic(lapic)
