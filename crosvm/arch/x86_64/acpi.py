"""ACPI tables for direct kernel boot: RSDP, XSDT, FADT, FACS, DSDT, MADT.

Layout follows crosvm (OEM id "CROSVM", tables from 0xE0000); the values come from
the ACPI 6.x specification.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from crosvm.arch.x86_64 import aml
from crosvm.arch.x86_64 import layout as L
from crosvm.arch.x86_64.mptable import checksum

OEM_ID = b"CROSVM"
OEM_TABLE_ID = b"CROSVMDT"
OEM_REVISION = 1
CREATOR_ID = b"CROS"
CREATOR_REVISION = 1
SDT_HEADER_LEN = 36

# Sleep type written to PM1_CNT.SLP_TYP for S5 (soft off); the DSDT's \_S5 says so.
SLP_TYP_S5 = 5


@dataclass(frozen=True)
class PmPorts:
    """I/O ports of the fixed ACPI PM hardware."""

    pm1_evt: int = 0x600   # PM1a status (2) + enable (2)
    pm1_cnt: int = 0x604   # PM1a control (2)
    gpe0: int = 0x620      # GPE0 status (2) + enable (2)
    reset: int = 0xCF9
    reset_value: int = 0x6
    sci_irq: int = 5


def sdt(signature: bytes, revision: int, body: bytes) -> bytes:
    """A System Description Table: standard header + body, checksummed."""
    header = struct.pack("<4sIBB6s8sI4sI", signature, SDT_HEADER_LEN + len(body), revision, 0,
                         OEM_ID, OEM_TABLE_ID, OEM_REVISION, CREATOR_ID, CREATOR_REVISION)
    table = bytearray(header + body)
    table[9] = checksum(bytes(table))
    return bytes(table)


def gas_io(port: int, width_bits: int) -> bytes:
    """Generic Address Structure for a system I/O register."""
    access = {8: 1, 16: 2, 32: 3}[width_bits]
    return struct.pack("<BBBBQ", 1, width_bits, 0, access, port)


def gas_none() -> bytes:
    return bytes(12)


@dataclass(frozen=True)
class PciLayout:
    """What the firmware tables say about PCI: ECAM, the MMIO windows, INTx routing."""

    ecam_base: int = L.PCIE_ECAM_START
    ecam_size: int = L.PCIE_ECAM_SIZE
    low_mmio: tuple[int, int] = (L.END_ADDR_BEFORE_32BITS,
                                 L.PCIE_ECAM_START - L.END_ADDR_BEFORE_32BITS)
    high_mmio: tuple[int, int] | None = None
    intx: tuple[tuple[int, int, int], ...] = ()  # (slot, pin 0=INTA, GSI)

    @property
    def last_bus(self) -> int:
        return self.ecam_size // (1 << 20) - 1


PCI_CONFIG_IO_PORT = 0xCF8


def _pci_root_bridge(pci: PciLayout) -> bytes:
    windows = [aml.word_bus_number(0, pci.last_bus), aml.io_port(PCI_CONFIG_IO_PORT, 8),
               aml.dword_memory(*pci.low_mmio)]
    if pci.high_mmio is not None:
        windows.append(aml.qword_memory(*pci.high_mmio))
    routes = [aml.package([aml.integer(slot << 16 | 0xFFFF), aml.integer(pin), aml.integer(0),
                           aml.integer(gsi)]) for slot, pin, gsi in pci.intx]
    return aml.device(b"PC00", [
        aml.name(b"_HID", aml.eisa_id("PNP0A08")),
        aml.name(b"_CID", aml.eisa_id("PNP0A03")),
        aml.name(b"_ADR", aml.integer(0)),
        aml.name(b"_SEG", aml.integer(0)),
        aml.name(b"_UID", aml.integer(0)),
        aml.name(b"_CRS", aml.resource_template(windows)),
        aml.name(b"_PRT", aml.package(routes)),
    ])


def _motherboard_resources(pci: PciLayout) -> bytes:
    """PNP0C02 reserving ECAM, which Linux wants before it trusts MCFG."""
    return aml.device(b"MB00", [
        aml.name(b"_HID", aml.eisa_id("PNP0C02")),
        aml.name(b"_UID", aml.integer(0)),
        aml.name(b"_CRS", aml.resource_template(
            [aml.memory32_fixed(pci.ecam_base, pci.ecam_size)])),
    ])


def build_dsdt(pci: PciLayout | None = None) -> bytes:
    terms = [aml.name(b"_S5_", aml.package([aml.integer(SLP_TYP_S5)] * 2
                                           + [aml.integer(0)] * 2))]
    if pci is not None:
        terms.append(aml.scope(b"\\_SB_", [_pci_root_bridge(pci), _motherboard_resources(pci)]))
    return sdt(b"DSDT", 6, b"".join(terms))


def build_mcfg(pci: PciLayout) -> bytes:
    """One ECAM allocation: segment 0, buses 0..last."""
    return sdt(b"MCFG", 1, bytes(8) + struct.pack("<QHBBI", pci.ecam_base, 0, 0,
                                                  pci.last_bus, 0))


FADT_WBINVD = 1 << 0
FADT_SLP_BUTTON = 1 << 5  # set: no fixed sleep button (we have one: `crosvm sleepbtn`)
FADT_RESET_REG_SUP = 1 << 10
IAPC_BOOT_ARCH_LEGACY_DEVICES = 1 << 0
IAPC_BOOT_ARCH_8042 = 1 << 1
IAPC_BOOT_ARCH_NO_CMOS_RTC = 1 << 5
RTC_CENTURY_REG = 0x32


def build_fadt(dsdt_addr: int, facs_addr: int, ports: PmPorts, i8042: bool, rtc: bool) -> bytes:
    boot_arch = IAPC_BOOT_ARCH_LEGACY_DEVICES
    if i8042:
        boot_arch |= IAPC_BOOT_ARCH_8042
    if not rtc:
        boot_arch |= IAPC_BOOT_ARCH_NO_CMOS_RTC
    body = b"".join([
        struct.pack("<IIBBHIBBBB", 0, dsdt_addr, 0, 0, ports.sci_irq, 0, 0, 0, 0, 0),
        struct.pack("<IIIIIIII", ports.pm1_evt, 0, ports.pm1_cnt, 0, 0, 0, ports.gpe0, 0),
        struct.pack("<BBBBBBBB", 4, 2, 0, 0, 4, 0, 0, 0),
        struct.pack("<HHHHBBBBBHB", 0, 0, 0, 0, 0, 0, 0, 0, RTC_CENTURY_REG if rtc else 0,
                    boot_arch, 0),
        struct.pack("<I", FADT_WBINVD | FADT_RESET_REG_SUP),
        gas_io(ports.reset, 8),
        struct.pack("<BHB", ports.reset_value, 0, 3),   # reset value, ARM flags, minor 3
        struct.pack("<QQ", facs_addr, dsdt_addr),
        gas_io(ports.pm1_evt, 32), gas_none(),
        gas_io(ports.pm1_cnt, 16), gas_none(),
        gas_none(), gas_none(),
        gas_io(ports.gpe0, 32), gas_none(),
        gas_none(), gas_none(),
        b"CROSVM\x00\x00",
    ])
    return sdt(b"FACP", 6, body)


def build_facs() -> bytes:
    return struct.pack("<4sIIIIIQB3sI24s", b"FACS", 64, 0, 0, 0, 0, 0, 2, bytes(3), 0, bytes(24))


MADT_PCAT_COMPAT = 1
MADT_LAPIC_ENABLED = 1


MADT_LEVEL_ACTIVE_LOW = 0b1111


def build_madt(num_cpus: int, ports: PmPorts, pci_irqs: tuple[int, ...] = ()) -> bytes:
    entries = [struct.pack("<II", L.LAPIC_ADDR, MADT_PCAT_COMPAT)]
    for cpu in range(num_cpus):
        entries.append(struct.pack("<BBBBI", 0, 8, cpu, cpu, MADT_LAPIC_ENABLED))
    entries.append(struct.pack("<BBBBII", 1, 12, num_cpus, 0, L.IOAPIC_ADDR, 0))
    # The SCI is level triggered, active high.
    entries.append(struct.pack("<BBBBIH", 2, 10, 0, ports.sci_irq, ports.sci_irq, 0b1101))
    # PCI INTx lines below 16 would otherwise be taken for edge-triggered ISA IRQs.
    for irq in sorted(set(pci_irqs)):
        if irq < 16:
            entries.append(struct.pack("<BBBBIH", 2, 10, 0, irq, irq, MADT_LEVEL_ACTIVE_LOW))
    return sdt(b"APIC", 5, b"".join(entries))


def build_rsdp(xsdt_addr: int) -> bytes:
    rsdp = bytearray(struct.pack("<8sB6sBIIQB3s", b"RSD PTR ", 0, OEM_ID, 2, 0, 36, xsdt_addr,
                                 0, bytes(3)))
    rsdp[8] = checksum(bytes(rsdp[:20]))
    rsdp[32] = checksum(bytes(rsdp))
    return bytes(rsdp)


def _align(addr: int, align: int = 16) -> int:
    return (addr + align - 1) & ~(align - 1)


def build_acpi_tables(num_cpus: int, ports: PmPorts, i8042: bool = True,
                      rtc: bool = True, base: int = L.ACPI_START,
                      pci: PciLayout | None = None) -> tuple[bytes, int]:
    """All tables as one blob to place at `base`; returns (blob, RSDP address)."""
    rsdp_addr = base
    addr = _align(rsdp_addr + 36)
    placed: list[tuple[int, bytes]] = []

    def place(table: bytes, align: int = 16) -> int:
        nonlocal addr
        at = _align(addr, align)
        placed.append((at, table))
        addr = _align(at + len(table))
        return at

    facs_addr = place(build_facs(), align=64)  # the spec requires 64-byte alignment
    dsdt_addr = place(build_dsdt(pci))
    fadt_addr = place(build_fadt(dsdt_addr, facs_addr, ports, i8042, rtc))
    pci_irqs = tuple(gsi for _, _, gsi in pci.intx) if pci else ()
    pointers = [fadt_addr, place(build_madt(num_cpus, ports, pci_irqs))]
    if pci is not None:
        pointers.append(place(build_mcfg(pci)))
    xsdt_addr = place(sdt(b"XSDT", 1, struct.pack(f"<{len(pointers)}Q", *pointers)))
    blob = bytearray(addr - base)
    blob[0:36] = build_rsdp(xsdt_addr)
    for at, table in placed:
        blob[at - base:at - base + len(table)] = table
    if base + len(blob) > L.BIOS_END:
        raise ValueError("ACPI tables do not fit below 1 MiB")
    return bytes(blob), rsdp_addr
