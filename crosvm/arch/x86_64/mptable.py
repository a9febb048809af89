"""Intel MultiProcessor Specification 1.4 table, placed in the EBDA."""

from __future__ import annotations

import struct

from crosvm.arch.x86_64 import layout as L

MPC_SPEC = 4
APIC_VERSION = 0x14
IOAPIC_VERSION = 0x11
CPU_ENABLED = 1
CPU_BOOTPROCESSOR = 2
MP_IRQ_INT = 0
MP_IRQ_NMI = 1
MP_IRQ_EXTINT = 3
ISA_BUS_ID = 0
PCI_BUS_ID = 1
MAX_CPUS = 254


def checksum(data: bytes) -> int:
    """The byte that makes `data` (with it in place of a zero) sum to 0 mod 256."""
    return (-sum(data)) & 0xFF


def build_mptable(num_cpus: int, base: int = L.MPTABLE_ADDR) -> bytes:
    """Floating pointer + configuration table for `num_cpus` CPUs, one IOAPIC, ISA IRQs."""
    if not 1 <= num_cpus <= MAX_CPUS:
        raise ValueError(f"MP table supports 1..{MAX_CPUS} CPUs, not {num_cpus}")
    ioapic_id = num_cpus
    entries = []
    for cpu in range(num_cpus):
        flags = CPU_ENABLED | (CPU_BOOTPROCESSOR if cpu == 0 else 0)
        # signature: family 6, model 0xf, stepping... like a modern part; features FPU|APIC.
        entries.append(struct.pack("<BBBBII8x", 0, cpu, APIC_VERSION, flags, 0x600, 0x201))
    entries.append(struct.pack("<BB6s", 1, ISA_BUS_ID, b"ISA   "))
    entries.append(struct.pack("<BB6s", 1, PCI_BUS_ID, b"PCI   "))
    entries.append(struct.pack("<BBBBI", 2, ioapic_id, IOAPIC_VERSION, 1, L.IOAPIC_ADDR))
    entries.append(struct.pack("<BBHBBBB", 3, MP_IRQ_EXTINT, 0, ISA_BUS_ID, 0, ioapic_id, 0))
    for irq in range(1, 16):
        entries.append(struct.pack("<BBHBBBB", 3, MP_IRQ_INT, 0, ISA_BUS_ID, irq, ioapic_id, irq))
    entries.append(struct.pack("<BBHBBBB", 4, MP_IRQ_EXTINT, 0, ISA_BUS_ID, 0, 0xFF, 0))
    entries.append(struct.pack("<BBHBBBB", 4, MP_IRQ_NMI, 0, ISA_BUS_ID, 0, 0xFF, 1))
    body = b"".join(entries)
    header_len = 44
    table_addr = base + 16
    header = bytearray(struct.pack("<4sHBB8s12sIHHIHBB", b"PCMP", header_len + len(body),
                                   MPC_SPEC, 0, b"CROSVM  ", b"000000000000", 0, 0,
                                   len(entries), L.LAPIC_ADDR, 0, 0, 0))
    header[7] = checksum(bytes(header) + body)
    floating = bytearray(struct.pack("<4sIBBB5s", b"_MP_", table_addr, 1, MPC_SPEC, 0, bytes(5)))
    floating[10] = checksum(bytes(floating))
    return bytes(floating) + bytes(header) + body
