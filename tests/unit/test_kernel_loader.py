"""ELF and bzImage parsing, including hostile headers."""

import struct

import pytest

from crosvm.arch.x86_64 import layout as L
from crosvm.kernel_loader import KernelLoaderError, load_initrd, load_kernel
from crosvm.vm_memory import GuestMemory, GuestMemoryError

MEM = 64 << 20


@pytest.fixture
def mem():
    m = GuestMemory([(0, MEM)])
    yield m
    m.close()


def elf(segments, entry=0x1000000, machine=62, phentsize=56):
    """A minimal ELF64: segments are (paddr, data, memsz)."""
    phoff = 64
    data_off = phoff + 56 * len(segments)
    ehdr = struct.pack("<16sHHIQQQIHHHHHH", b"\x7fELF\x02\x01\x01" + bytes(9), 2, machine, 1,
                       entry, phoff, 0, 0, 64, phentsize, len(segments), 0, 0, 0)
    phdrs, blobs = b"", b""
    for paddr, data, memsz in segments:
        phdrs += struct.pack("<IIQQQQQQ", 1, 5, data_off + len(blobs), paddr, paddr, len(data),
                             memsz, 0x1000)
        blobs += data
    return ehdr + phdrs + blobs


def bzimage(version=0x20F, xloadflags=1, loadflags=1, setup_sects=1, payload=b"K" * 1024,
            init_size=0x1000):
    setup = bytearray((setup_sects + 1) * 512)
    struct.pack_into("<B", setup, 0x1F1, setup_sects)
    struct.pack_into("<H", setup, 0x1FE, 0xAA55)
    setup[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", setup, 0x206, version)
    struct.pack_into("<B", setup, 0x211, loadflags)
    struct.pack_into("<H", setup, 0x236, xloadflags)
    struct.pack_into("<I", setup, 0x260, init_size)
    return bytes(setup) + payload


def write(tmp_path, data, name="kernel"):
    p = tmp_path / name
    p.write_bytes(data)
    return str(p)


def test_elf_segments_load_at_physical_address_and_bss_is_zeroed(mem, tmp_path):
    mem.write(0x1000000 + 4, b"\xff" * 4)
    path = write(tmp_path, elf([(0x1000000, b"CODE", 8)]))

    k = load_kernel(mem, path)

    assert (k.entry, k.end, k.setup_header) == (0x1000000, 0x1000008, None)
    assert mem.read(0x1000000, 8) == b"CODE\x00\x00\x00\x00"


def test_elf_for_other_machine_is_rejected(mem, tmp_path):
    with pytest.raises(KernelLoaderError, match="not x86_64"):
        load_kernel(mem, write(tmp_path, elf([(0x1000000, b"x", 1)], machine=183)))


def test_elf_segment_outside_memory_is_rejected(mem, tmp_path):
    with pytest.raises(KernelLoaderError, match="does not fit in guest memory"):
        load_kernel(mem, write(tmp_path, elf([(MEM - 2, b"abcd", 4)])))


def test_elf_segment_below_1mib_is_rejected(mem, tmp_path):
    with pytest.raises(KernelLoaderError, match="below 1 MiB"):
        load_kernel(mem, write(tmp_path, elf([(0x1000, b"abcd", 4)])))


def test_elf_segment_past_end_of_file_is_rejected(mem, tmp_path):
    data = elf([(0x1000000, b"abcd", 4)])[:-2]

    with pytest.raises(KernelLoaderError, match="past the end of the file"):
        load_kernel(mem, write(tmp_path, data))


def test_elf_filesz_larger_than_memsz_is_rejected(mem, tmp_path):
    with pytest.raises(KernelLoaderError, match="file size exceeds memory size"):
        load_kernel(mem, write(tmp_path, elf([(0x1000000, b"abcd", 2)])))


def test_elf_bad_phentsize_is_rejected(mem, tmp_path):
    with pytest.raises(KernelLoaderError, match="bad ELF program headers"):
        load_kernel(mem, write(tmp_path, elf([(0x1000000, b"x", 1)], phentsize=32)))


def test_elf_entry_outside_memory_is_rejected(mem, tmp_path):
    with pytest.raises(KernelLoaderError, match="entry point"):
        load_kernel(mem, write(tmp_path, elf([(0x1000000, b"x", 1)], entry=1 << 40)))


def test_truncated_elf_header_is_rejected(mem, tmp_path):
    with pytest.raises(KernelLoaderError, match="file too short"):
        load_kernel(mem, write(tmp_path, b"\x7fELF\x02\x01"))


def test_bzimage_loads_protected_mode_part_at_2mib(mem, tmp_path):
    path = write(tmp_path, bzimage(payload=b"PMODE" + bytes(1019)))

    k = load_kernel(mem, path)

    assert k.entry == L.KERNEL_START + 0x200
    assert mem.read(L.KERNEL_START, 5) == b"PMODE"
    assert k.setup_header.version == 0x20F


def test_bzimage_without_64bit_entry_is_rejected(mem, tmp_path):
    with pytest.raises(KernelLoaderError, match="no 64-bit entry"):
        load_kernel(mem, write(tmp_path, bzimage(xloadflags=0)))


def test_old_boot_protocol_is_rejected(mem, tmp_path):
    with pytest.raises(KernelLoaderError, match="too old"):
        load_kernel(mem, write(tmp_path, bzimage(version=0x202)))


def test_bzimage_init_size_larger_than_memory_is_rejected(mem, tmp_path):
    with pytest.raises(KernelLoaderError, match="guest memory is too small"):
        load_kernel(mem, write(tmp_path, bzimage(init_size=MEM)))


def test_bzimage_setup_larger_than_file_is_rejected(mem, tmp_path):
    with pytest.raises(KernelLoaderError, match="setup size exceeds"):
        load_kernel(mem, write(tmp_path, bzimage(setup_sects=40, payload=b"")))


def test_random_bytes_are_neither_format(mem, tmp_path):
    with pytest.raises(KernelLoaderError, match="neither an ELF vmlinux nor a bzImage"):
        load_kernel(mem, write(tmp_path, b"\x00" * 4096))


def test_missing_kernel_file(mem, tmp_path):
    with pytest.raises(KernelLoaderError, match="failed to open kernel image"):
        load_kernel(mem, str(tmp_path / "absent"))


def test_initrd_goes_at_top_of_low_memory_page_aligned(mem, tmp_path):
    path = write(tmp_path, b"R" * 5000, "initrd")

    addr, size = load_initrd(mem, path, kernel_end=0x400000, max_addr=0xFFFF_FFFF)

    assert (addr, size) == ((MEM - 5000) & ~0xFFF, 5000)
    assert mem.read(addr, 5000) == b"R" * 5000


def test_initrd_respects_max_address(mem, tmp_path):
    path = write(tmp_path, b"R" * 100, "initrd")

    addr, _ = load_initrd(mem, path, kernel_end=0x400000, max_addr=0x7FFFFF)

    assert addr + 100 <= 0x800000


def test_initrd_that_would_overlap_kernel_is_rejected(mem, tmp_path):
    path = write(tmp_path, b"R" * (MEM // 2), "initrd")

    with pytest.raises(KernelLoaderError, match="does not fit"):
        load_initrd(mem, path, kernel_end=MEM // 2 + 0x1000, max_addr=0xFFFF_FFFF)


def test_guest_memory_rejects_access_across_region_end(mem):
    with pytest.raises(GuestMemoryError, match="not in RAM"):
        mem.slice(MEM - 4, 8)


def test_guest_memory_rejects_negative_address(mem):
    with pytest.raises(GuestMemoryError):
        mem.read(-1, 1)
