"""Per-vCPU CPUID: KVM's supported leaves with APIC IDs, topology and the hypervisor bit."""

from __future__ import annotations

from crosvm.hypervisor.kvm import bindings as B

EBX_CLFLUSH_CACHELINE = 8
EBX_CLFLUSH_SHIFT = 8
EBX_CPU_COUNT_SHIFT = 16
EBX_CPUID_SHIFT = 24
ECX_EPB_SHIFT = 3
ECX_X2APIC_SHIFT = 21
ECX_TSC_DEADLINE_SHIFT = 24
ECX_HYPERVISOR_SHIFT = 31
EDX_HTT_SHIFT = 28


def adjust_cpuid(entries: list[B.kvm_cpuid_entry2], vcpu_id: int,
                 cpu_count: int) -> list[B.kvm_cpuid_entry2]:
    """Copies of `entries` fixed up for one vCPU, the way crosvm does per vCPU."""
    out = []
    for src in entries:
        e = B.kvm_cpuid_entry2.from_buffer_copy(src)
        if e.function == 1:
            e.ebx = ((vcpu_id << EBX_CPUID_SHIFT) | (EBX_CLFLUSH_CACHELINE << EBX_CLFLUSH_SHIFT)
                     | ((cpu_count if cpu_count > 1 else 0) << EBX_CPU_COUNT_SHIFT))
            if cpu_count > 1:
                e.edx |= 1 << EDX_HTT_SHIFT
            else:
                e.edx &= ~(1 << EDX_HTT_SHIFT)
            e.ecx |= 1 << ECX_HYPERVISOR_SHIFT
        elif e.function == 4:
            # One core per package slot as far as caches go; the count comes from leaf 0xB.
            e.eax &= ~(0x3F << 26)
        elif e.function == 6:
            e.ecx &= ~(1 << ECX_EPB_SHIFT)
        elif e.function == 0xB:
            # Topology: level 0 is SMT (one thread per core), level 1 cores in the package.
            e.edx = vcpu_id
            if e.index == 0:
                e.eax, e.ebx, e.ecx = 0, 1, (1 << 8) | e.index
            elif e.index == 1:
                shift = max(cpu_count - 1, 0).bit_length()
                e.eax, e.ebx, e.ecx = shift, cpu_count, (2 << 8) | e.index
            else:
                e.eax, e.ebx, e.ecx = 0, 0, e.index
        out.append(e)
    return out


def phys_address_bits(entries: list[B.kvm_cpuid_entry2]) -> int:
    """Guest physical address width from leaf 0x8000_0008 (36 if absent)."""
    for e in entries:
        if e.function == 0x8000_0008:
            return e.eax & 0xFF
    return 36
