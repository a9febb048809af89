"""The x86_64 guest physical memory map, as in crosvm's x86_64 crate."""

from __future__ import annotations

MB = 1 << 20
GB = 1 << 30

GDT_ADDR = 0x500
IDT_ADDR = 0x520
ZERO_PAGE_ADDR = 0x7000
BOOT_STACK_POINTER = 0x8000
PML4_ADDR = 0x9000
PDPTE_ADDR = 0xA000
PDE_ADDR = 0xB000  # four pages: 2 MiB pages identity-mapping the low 4 GiB
CMDLINE_ADDR = 0x20000
CMDLINE_MAX_SIZE = 0x800
EBDA_START = 0x9FC00
MPTABLE_ADDR = EBDA_START
ACPI_START = 0xE0000
BIOS_END = 0x100000
KERNEL_START = 0x200000

END_ADDR_BEFORE_32BITS = 0xD000_0000  # start of the 32-bit MMIO hole (--pci-start)
PCIE_ECAM_START = 0xF400_0000
PCIE_ECAM_SIZE = 64 * MB
RESERVED_START = 0xF800_0000  # LAPIC, IOAPIC, ... up to 4 GiB
FIRST_ADDR_PAST_32BITS = 1 << 32

IDENTITY_MAP_ADDR = 0xFFFB_C000
TSS_ADDR = 0xFFFB_D000  # three pages

IOAPIC_ADDR = 0xFEC0_0000
LAPIC_ADDR = 0xFEE0_0000


def ram_ranges(mem_size: int) -> list[tuple[int, int]]:
    """Guest RAM as (address, size): below the 32-bit hole, then from 4 GiB up."""
    if mem_size <= END_ADDR_BEFORE_32BITS:
        return [(0, mem_size)]
    return [(0, END_ADDR_BEFORE_32BITS),
            (FIRST_ADDR_PAST_32BITS, mem_size - END_ADDR_BEFORE_32BITS)]


E820_RAM = 1
E820_RESERVED = 2


def e820_entries(mem_size: int) -> list[tuple[int, int, int]]:
    """The e820 map as (address, size, type), matching `ram_ranges`."""
    entries = [(0, EBDA_START, E820_RAM)]
    low_end = min(mem_size, END_ADDR_BEFORE_32BITS)
    entries.append((BIOS_END, low_end - BIOS_END, E820_RAM))
    if mem_size > END_ADDR_BEFORE_32BITS:
        entries.append((FIRST_ADDR_PAST_32BITS, mem_size - END_ADDR_BEFORE_32BITS, E820_RAM))
    entries.append((PCIE_ECAM_START, PCIE_ECAM_SIZE, E820_RESERVED))
    entries.append((IDENTITY_MAP_ADDR, TSS_ADDR + 3 * 0x1000 - IDENTITY_MAP_ADDR, E820_RESERVED))
    return entries
