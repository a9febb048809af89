"""x86_64 boot data: zero page layout, e820, page tables, GDT, MP and ACPI tables."""

import ctypes
import struct

import pytest

from crosvm.arch.x86_64 import acpi as A
from crosvm.arch.x86_64 import aml
from crosvm.arch.x86_64 import bootparam as BP
from crosvm.arch.x86_64 import layout as L
from crosvm.arch.x86_64 import regs as R
from crosvm.arch.x86_64.boot import BootError, build_zero_page, check_cmdline
from crosvm.arch.x86_64.mptable import build_mptable
from crosvm.kernel_loader import LoadedKernel

ELF_KERNEL = LoadedKernel(entry=0x1000000, end=0x2000000, setup_header=None)


def test_boot_params_layout_matches_bootparam_h():
    assert ctypes.sizeof(BP.boot_params) == 4096
    assert BP.boot_params.acpi_rsdp_addr.offset == 0x070
    assert BP.boot_params.ext_ramdisk_image.offset == 0x0C0
    assert BP.boot_params.e820_entries.offset == 0x1E8
    assert BP.boot_params.hdr.offset == 0x1F1
    assert BP.boot_params.e820_table.offset == 0x2D0
    assert BP.setup_header.header.offset == 0x202 - 0x1F1
    assert BP.setup_header.cmd_line_ptr.offset == 0x228 - 0x1F1
    assert BP.setup_header.init_size.offset == 0x260 - 0x1F1


def test_ram_below_hole_only_for_small_memory():
    assert L.ram_ranges(256 << 20) == [(0, 256 << 20)]


def test_large_memory_continues_above_4g():
    assert L.ram_ranges(4 << 30) == [(0, 0xD000_0000), (1 << 32, (4 << 30) - 0xD000_0000)]


def test_e820_matches_ram_layout_for_large_memory():
    ram = [(a, s) for a, s, t in L.e820_entries(4 << 30) if t == L.E820_RAM]

    assert ram == [(0, L.EBDA_START), (L.BIOS_END, 0xD000_0000 - L.BIOS_END),
                   (1 << 32, (4 << 30) - 0xD000_0000)]


def test_e820_reserves_tss_and_identity_map():
    reserved = [(a, s) for a, s, t in L.e820_entries(256 << 20) if t == L.E820_RESERVED]

    assert (L.IDENTITY_MAP_ADDR, 0x4000) in reserved


def test_zero_page_fields():
    params = build_zero_page(ELF_KERNEL, 10, 256 << 20, (0x800000, 0x1234), 0xE0000)

    assert params.hdr.boot_flag == 0xAA55
    assert params.hdr.header == BP.HDRS_MAGIC
    assert params.hdr.type_of_loader == 0xFF
    assert params.hdr.cmd_line_ptr == L.CMDLINE_ADDR
    assert (params.hdr.ramdisk_image, params.hdr.ramdisk_size) == (0x800000, 0x1234)
    assert params.acpi_rsdp_addr == 0xE0000
    assert params.e820_entries == len(L.e820_entries(256 << 20))
    assert params.e820_table[1].addr == L.BIOS_END


def test_cmdline_too_long_is_rejected():
    with pytest.raises(BootError, match="limit is 2048"):
        check_cmdline("x" * 2048, ELF_KERNEL)


def test_cmdline_respects_kernel_cmdline_size():
    hdr = BP.setup_header(version=0x20F, cmdline_size=100)
    kernel = LoadedKernel(entry=0, end=0, setup_header=hdr)

    with pytest.raises(BootError, match="limit is 101"):
        check_cmdline("y" * 101, kernel)


def test_cmdline_is_nul_terminated():
    assert check_cmdline("console=ttyS0", ELF_KERNEL) == b"console=ttyS0\x00"


def test_gdt_code_segment_is_64bit_flat():
    seg = R.segment_from_gdt(R.gdt_entry(0xA09B, 0, 0xFFFFF), 0x8)

    assert (seg.l, seg.db, seg.g, seg.present, seg.s, seg.type) == (1, 0, 1, 1, 1, 0xB)
    assert seg.limit == 0xFFFF_FFFF


def test_gdt_entry_encoding():
    assert R.gdt_entry(0xA09B, 0, 0xFFFFF) == 0x00AF_9B00_0000_FFFF


def test_mtrr_ranges_split_pci_hole_into_aligned_blocks():
    assert R.mtrr_ranges(0xD000_0000, 1 << 32) == [(0xD000_0000, 0x1000_0000),
                                                    (0xE000_0000, 0x2000_0000)]


def test_boot_msrs_mark_hole_uncacheable_and_default_writeback():
    msrs = dict(R.boot_msrs(phys_bits=40))

    assert msrs[R.MSR_MTRR_DEF_TYPE] == R.MTRR_ENABLE | R.MTRR_TYPE_WB
    assert msrs[R.MSR_MTRR_PHYS_BASE0] == 0xD000_0000
    assert msrs[R.MSR_MTRR_PHYS_BASE0 + 1] == (0xFF_F000_0000 | R.MTRR_ENABLE)


def test_mptable_checksums_and_cpu_entries():
    table = build_mptable(3)

    assert table[:4] == b"_MP_"
    assert sum(table[:16]) % 256 == 0
    length = struct.unpack_from("<H", table, 16 + 4)[0]
    assert table[16:20] == b"PCMP"
    assert sum(table[16:16 + length]) % 256 == 0
    cpu_entries = [e for e in range(3) if table[16 + 44 + 20 * e] == 0]
    assert len(cpu_entries) == 3


def tables_by_signature(blob, base=L.ACPI_START):
    rsdp = blob[:36]
    xsdt_addr = struct.unpack_from("<Q", rsdp, 24)[0]
    found = {}

    def table_at(addr):
        length = struct.unpack_from("<I", blob, addr - base + 4)[0]
        return blob[addr - base:addr - base + length]

    xsdt = table_at(xsdt_addr)
    found["XSDT"] = xsdt
    for i in range((len(xsdt) - 36) // 8):
        t = table_at(struct.unpack_from("<Q", xsdt, 36 + 8 * i)[0])
        found[t[:4].decode()] = t
    dsdt_addr = struct.unpack_from("<Q", found["FACP"], 140)[0]
    found["DSDT"] = table_at(dsdt_addr)
    return rsdp, found


def test_rsdp_checksums():
    blob, _ = A.build_acpi_tables(2, A.PmPorts())

    assert blob[:8] == b"RSD PTR "
    assert sum(blob[:20]) % 256 == 0
    assert sum(blob[:36]) % 256 == 0


def test_every_acpi_table_checksums_to_zero():
    blob, _ = A.build_acpi_tables(2, A.PmPorts())
    _, tables = tables_by_signature(blob)

    assert set(tables) == {"XSDT", "FACP", "APIC", "DSDT"}
    for sig, table in tables.items():
        assert sum(table) % 256 == 0, sig


def test_fadt_is_276_bytes_with_pm_and_reset_registers():
    ports = A.PmPorts()
    blob, _ = A.build_acpi_tables(1, ports)
    fadt = tables_by_signature(blob)[1]["FACP"]

    assert len(fadt) == 276
    assert struct.unpack_from("<H", fadt, 46)[0] == ports.sci_irq
    assert struct.unpack_from("<I", fadt, 64)[0] == ports.pm1_cnt
    assert struct.unpack_from("<Q", fadt, 116 + 4)[0] == ports.reset
    assert fadt[128] == ports.reset_value


def test_madt_has_one_lapic_per_cpu():
    blob, _ = A.build_acpi_tables(4, A.PmPorts())
    madt = tables_by_signature(blob)[1]["APIC"]
    entries, pos = [], 44
    while pos < len(madt):
        entries.append(madt[pos])
        pos += madt[pos + 1]

    assert entries.count(0) == 4
    assert entries.count(1) == 1


def test_facs_is_64_byte_aligned():
    blob, _ = A.build_acpi_tables(1, A.PmPorts())
    fadt = tables_by_signature(blob)[1]["FACP"]

    assert struct.unpack_from("<Q", fadt, 132)[0] % 64 == 0


def test_dsdt_declares_s5():
    blob, _ = A.build_acpi_tables(1, A.PmPorts())
    dsdt = tables_by_signature(blob)[1]["DSDT"]

    assert b"\x08_S5_\x12" in dsdt


def test_aml_pkglength_multi_byte():
    assert aml.pkglength(0x3E) == bytes([0x3F])
    assert aml.pkglength(0x3F) == bytes([0x41, 0x04])   # total 0x41 with both bytes


def test_aml_eisa_id_pnp0a08():
    assert aml.eisa_id("PNP0A08") == b"\x0C\x41\xD0\x0A\x08"


def test_aml_name_string_dual_segment():
    assert aml.name_string(b"\\_SB_.PC00") == b"\\\x2E_SB_PC00"


def test_mcfg_describes_ecam_for_buses_0_to_63():
    mcfg = A.build_mcfg(A.PciLayout())
    base, segment, first, last = struct.unpack_from("<QHBB", mcfg, 44)
    assert (mcfg[:4], base, segment, first, last) == (b"MCFG", L.PCIE_ECAM_START, 0, 0, 63)


def test_dsdt_routes_each_intx_slot():
    dsdt = A.build_dsdt(A.PciLayout(intx=((1, 0, 9), (2, 0, 10))))
    route = aml.package([aml.integer(2 << 16 | 0xFFFF), aml.integer(0), aml.integer(0),
                         aml.integer(10)])
    assert b"PC00" in dsdt and route in dsdt


def test_madt_marks_pci_irq_level_triggered():
    madt = A.build_madt(1, A.PmPorts(), pci_irqs=(9,))
    override = struct.pack("<BBBBIH", 2, 10, 0, 9, 9, A.MADT_LEVEL_ACTIVE_LOW)
    assert override in madt


def test_xsdt_lists_mcfg_when_pci_present():
    blob, _ = A.build_acpi_tables(1, A.PmPorts(), pci=A.PciLayout())
    assert b"MCFG" in blob


def test_guest_memory_is_sealed_against_shrink_and_grow():
    import errno as E
    import os as O

    from crosvm.vm_memory import GuestMemory
    mem = GuestMemory([(0, 1 << 20)])
    results = []
    for size in (1 << 19, 1 << 21):
        try:
            O.ftruncate(mem.memfd, size)
            results.append("allowed")
        except OSError as e:
            results.append(e.errno)
    mem.close()

    assert results == [E.EPERM, E.EPERM]
