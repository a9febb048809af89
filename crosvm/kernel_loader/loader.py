"""Loads a Linux kernel into guest RAM for the 64-bit boot protocol.

Images are untrusted files: every header field used to index the file or guest RAM
is bounds-checked, and a bad one raises `KernelLoaderError` naming the problem.
"""

from __future__ import annotations

import ctypes
import os
import struct
from dataclasses import dataclass

from crosvm.arch.x86_64 import bootparam as BP
from crosvm.base.hostfile import HostFileError, open_host_file
from crosvm.arch.x86_64 import layout as L
from crosvm.vm_memory import GuestMemory, GuestMemoryError


class KernelLoaderError(Exception):
    """The kernel (or initrd) image cannot be loaded; the message says why."""


@dataclass
class LoadedKernel:
    entry: int
    end: int                               # first guest address past the loaded image
    setup_header: BP.setup_header | None   # from a bzImage; None for ELF


ELF_MAGIC = b"\x7fELF"
EM_X86_64 = 62
PT_LOAD = 1
_EHDR = struct.Struct("<16sHHIQQQIHHHHHH")
_PHDR = struct.Struct("<IIQQQQQQ")
MAX_PHDRS = 512


def _read_exact(fd: int, offset: int, length: int, what: str) -> bytes:
    data = os.pread(fd, length, offset)
    if len(data) != length:
        raise KernelLoaderError(f"{what}: file too short (need {length} bytes at {offset:#x})")
    return data


def load_elf(mem: GuestMemory, fd: int) -> LoadedKernel:
    """Load the PT_LOAD segments of an x86_64 ELF64 kernel at their physical addresses."""
    size = os.fstat(fd).st_size
    ehdr = _EHDR.unpack(_read_exact(fd, 0, _EHDR.size, "ELF header"))
    ident, _type, machine, _ver, entry, phoff, _shoff, _flags, _ehsize, phentsize, phnum = ehdr[:11]
    if ident[:4] != ELF_MAGIC:
        raise KernelLoaderError("not an ELF file")
    if ident[4] != 2 or ident[5] != 1:
        raise KernelLoaderError("ELF kernel is not 64-bit little-endian")
    if machine != EM_X86_64:
        raise KernelLoaderError(f"ELF kernel is for machine {machine}, not x86_64")
    if phentsize != _PHDR.size or phnum == 0 or phnum > MAX_PHDRS:
        raise KernelLoaderError(f"bad ELF program headers (size {phentsize}, count {phnum})")
    if phoff + phnum * phentsize > size:
        raise KernelLoaderError("ELF program headers lie past the end of the file")
    end = 0
    loaded = 0
    for i in range(phnum):
        (p_type, _f, p_offset, _vaddr, p_paddr, p_filesz, p_memsz, _align) = _PHDR.unpack(
            _read_exact(fd, phoff + i * phentsize, _PHDR.size, "ELF program header"))
        if p_type != PT_LOAD:
            continue
        if p_filesz > p_memsz:
            raise KernelLoaderError(f"ELF segment {i}: file size exceeds memory size")
        if p_offset + p_filesz > size:
            raise KernelLoaderError(f"ELF segment {i} lies past the end of the file")
        if p_paddr < L.BIOS_END:
            raise KernelLoaderError(f"ELF segment {i} loads below 1 MiB ({p_paddr:#x})")
        if not mem.is_valid_range(p_paddr, p_memsz):
            raise KernelLoaderError(
                f"ELF segment {i} ({p_paddr:#x}+{p_memsz:#x}) does not fit in guest memory")
        mem.write_from_file(p_paddr, fd, p_filesz, p_offset)
        mem.slice(p_paddr + p_filesz, p_memsz - p_filesz)[:] = bytes(p_memsz - p_filesz)
        end = max(end, p_paddr + p_memsz)
        loaded += 1
    if not loaded:
        raise KernelLoaderError("ELF kernel has no loadable segments")
    if not mem.is_valid_range(entry, 1):
        raise KernelLoaderError(f"ELF entry point {entry:#x} is outside guest memory")
    return LoadedKernel(entry=entry, end=end, setup_header=None)


BZIMAGE_MIN_VERSION = 0x20C  # xloadflags (64-bit entry) appeared in 2.12


def load_bzimage(mem: GuestMemory, fd: int) -> LoadedKernel:
    """Load a bzImage's protected-mode part at 2 MiB; enter at its 64-bit entry (+0x200)."""
    size = os.fstat(fd).st_size
    hdr_end = BP.SETUP_HEADER_OFFSET + ctypes.sizeof(BP.setup_header)
    raw = _read_exact(fd, BP.SETUP_HEADER_OFFSET, hdr_end - BP.SETUP_HEADER_OFFSET,
                      "bzImage header")
    hdr = BP.setup_header.from_buffer_copy(raw)
    if hdr.boot_flag != BP.BOOT_FLAG_MAGIC or hdr.header != BP.HDRS_MAGIC:
        raise KernelLoaderError("not a bzImage (no boot flag or HdrS magic)")
    if hdr.version < BZIMAGE_MIN_VERSION:
        raise KernelLoaderError(f"bzImage boot protocol {hdr.version >> 8}.{hdr.version & 0xff} "
                                "is too old (need 2.12)")
    if not hdr.xloadflags & BP.XLF_KERNEL_64:
        raise KernelLoaderError("bzImage has no 64-bit entry point")
    if not hdr.loadflags & BP.LOADFLAGS_LOADED_HIGH:
        raise KernelLoaderError("bzImage is not a high-loaded (bzImage) kernel")
    setup_sects = hdr.setup_sects or 4
    kernel_offset = (setup_sects + 1) * 512
    if kernel_offset >= size:
        raise KernelLoaderError("bzImage setup size exceeds the file size")
    kernel_size = size - kernel_offset
    footprint = max(kernel_size, hdr.init_size)
    if not mem.is_valid_range(L.KERNEL_START, footprint):
        raise KernelLoaderError(
            f"bzImage needs {footprint:#x} bytes at {L.KERNEL_START:#x}; guest memory is too small")
    mem.write_from_file(L.KERNEL_START, fd, kernel_size, kernel_offset)
    return LoadedKernel(entry=L.KERNEL_START + 0x200, end=L.KERNEL_START + footprint,
                        setup_header=hdr)


def load_kernel(mem: GuestMemory, path: str) -> LoadedKernel:
    """Load an ELF vmlinux or a bzImage, choosing by the file's magic."""
    fd = _open_image(path, "kernel image")
    try:
        head = os.pread(fd, 0x206, 0)
        is_elf = head[:4] == ELF_MAGIC
        if not is_elf and (head[0x1FE:0x200] != b"\x55\xaa" or head[0x202:0x206] != b"HdrS"):
            raise KernelLoaderError(f"kernel image {path} is neither an ELF vmlinux nor a bzImage")
        try:
            return load_elf(mem, fd) if is_elf else load_bzimage(mem, fd)
        except (GuestMemoryError, KernelLoaderError) as e:
            raise KernelLoaderError(f"kernel image {path}: {e}") from e
    finally:
        os.close(fd)


def _open_image(path: str, what: str) -> int:
    """A kernel or initrd must be a regular file: its size is what gets loaded, and
    open() must not wait on a FIFO."""
    try:
        return open_host_file(path, what)
    except HostFileError as e:
        raise KernelLoaderError(str(e)) from None


def load_initrd(mem: GuestMemory, path: str, kernel_end: int, max_addr: int) -> tuple[int, int]:
    """Place the initrd at the highest page-aligned address below `max_addr` and RAM end.

    Returns (address, size).
    """
    fd = _open_image(path, "initrd")
    try:
        size = os.fstat(fd).st_size
        low_end = min(mem.regions[0].end, max_addr + 1)
        addr = (low_end - size) & ~0xFFF
        if size == 0 or addr < kernel_end:
            raise KernelLoaderError(
                f"initrd {path} ({size} bytes) does not fit in guest memory after the kernel")
        mem.write_from_file(addr, fd, size, 0)
        return addr, size
    finally:
        os.close(fd)
