"""Writes everything the kernel reads at boot: zero page, command line, MP and ACPI tables."""

from __future__ import annotations

import ctypes

from crosvm.arch.x86_64 import bootparam as BP
from crosvm.arch.x86_64 import layout as L
from crosvm.arch.x86_64.acpi import PciLayout, PmPorts, build_acpi_tables
from crosvm.arch.x86_64.mptable import build_mptable
from crosvm.kernel_loader import LoadedKernel
from crosvm.vm_memory import GuestMemory


class BootError(Exception):
    """The boot data does not fit (command line too long, too many e820 entries)."""


DEFAULT_INITRD_ADDR_MAX = 0x37FF_FFFF   # boot protocol < 2.03
BASE_CMDLINE = "panic=-1"


def check_cmdline(cmdline: str, kernel: LoadedKernel) -> bytes:
    """The NUL-terminated command line; raises if it exceeds our or the kernel's limit."""
    raw = cmdline.encode()
    if b"\x00" in raw:
        raise BootError("kernel command line contains a NUL byte")
    limit = L.CMDLINE_MAX_SIZE
    hdr = kernel.setup_header
    if hdr is not None and hdr.version >= 0x206 and hdr.cmdline_size:
        limit = min(limit, hdr.cmdline_size + 1)
    if len(raw) + 1 > limit:
        raise BootError(f"kernel command line is {len(raw) + 1} bytes with its NUL; "
                        f"the limit is {limit}")
    return raw + b"\x00"


def initrd_addr_max(kernel: LoadedKernel) -> int:
    hdr = kernel.setup_header
    if hdr is None:
        return L.END_ADDR_BEFORE_32BITS - 1
    if hdr.version >= 0x203 and hdr.initrd_addr_max:
        return hdr.initrd_addr_max
    return DEFAULT_INITRD_ADDR_MAX


def build_zero_page(kernel: LoadedKernel, cmdline_len: int, mem_size: int,
                    initrd: tuple[int, int] | None, rsdp_addr: int) -> BP.boot_params:
    params = BP.boot_params()
    if kernel.setup_header is not None:
        params.hdr = kernel.setup_header
    hdr = params.hdr
    hdr.type_of_loader = BP.LOADER_TYPE_UNDEFINED
    hdr.boot_flag = BP.BOOT_FLAG_MAGIC
    hdr.header = BP.HDRS_MAGIC
    hdr.cmd_line_ptr = L.CMDLINE_ADDR
    hdr.cmdline_size = cmdline_len
    hdr.kernel_alignment = BP.KERNEL_ALIGNMENT
    hdr.loadflags |= BP.LOADFLAGS_LOADED_HIGH
    if initrd is not None:
        addr, size = initrd
        hdr.ramdisk_image = addr & 0xFFFF_FFFF
        hdr.ramdisk_size = size & 0xFFFF_FFFF
        params.ext_ramdisk_image = addr >> 32
        params.ext_ramdisk_size = size >> 32
    params.acpi_rsdp_addr = rsdp_addr
    entries = L.e820_entries(mem_size)
    if len(entries) > BP.E820_MAX_ENTRIES_ZEROPAGE:
        raise BootError("too many e820 entries")
    for i, (addr, size, kind) in enumerate(entries):
        params.e820_table[i] = BP.boot_e820_entry(addr, size, kind)
    params.e820_entries = len(entries)
    return params


def write_boot_data(mem: GuestMemory, kernel: LoadedKernel, cmdline: str, mem_size: int,
                    initrd: tuple[int, int] | None, num_cpus: int, pm_ports: PmPorts,
                    i8042: bool, rtc: bool, pci: PciLayout | None = None) -> None:
    raw = check_cmdline(cmdline, kernel)
    mem.write(L.CMDLINE_ADDR, raw)
    mem.write(L.MPTABLE_ADDR, build_mptable(num_cpus))
    tables, rsdp = build_acpi_tables(num_cpus, pm_ports, i8042=i8042, rtc=rtc, pci=pci)
    mem.write(L.ACPI_START, tables)
    params = build_zero_page(kernel, len(raw) - 1, mem_size, initrd, rsdp)
    mem.write(L.ZERO_PAGE_ADDR, bytes(params))
    assert ctypes.sizeof(params) == 0x1000
