"""GuestMemory: guest RAM backed by one memfd, mapped once, accessed with bounds checks.

The memfd lets device processes map the same RAM later; every access from a device
goes through `slice()`, which refuses ranges that are not wholly inside one region.
"""

from __future__ import annotations

import ctypes
import fcntl
import mmap
import os
import stat
from dataclasses import dataclass


class GuestMemoryError(Exception):
    """An access outside guest RAM, or a failure to create it."""


@dataclass
class MemoryRegion:
    """One contiguous range of guest physical addresses."""

    guest_addr: int
    size: int
    shm_offset: int
    mapping: mmap.mmap

    def __post_init__(self) -> None:
        self.end = self.guest_addr + self.size
        self.view = memoryview(self.mapping)  # sliced per access: no copy, no new export

    def host_address(self) -> int:
        """The userspace address of the mapping, for KVM_SET_USER_MEMORY_REGION."""
        return ctypes.addressof(ctypes.c_char.from_buffer(self.mapping))


class GuestMemory:
    """Guest RAM as a list of non-overlapping regions sharing one memfd."""

    def __init__(self, ranges: list[tuple[int, int]]) -> None:
        """`ranges` is a list of (guest address, size) pairs, page-aligned."""
        ranges = sorted(ranges)
        for (a, sa), (b, _) in zip(ranges, ranges[1:]):
            if a + sa > b:
                raise GuestMemoryError(f"memory regions overlap at {b:#x}")
        total = sum(size for _, size in ranges)
        try:
            self.memfd = os.memfd_create("crosvm_guest", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
            os.ftruncate(self.memfd, total)
            # Nobody holding the fd (a device process, say) can shrink RAM under the
            # guest (SIGBUS in every mapping) or grow it.
            fcntl.fcntl(self.memfd, fcntl.F_ADD_SEALS,
                        fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL)
        except OSError as e:
            raise GuestMemoryError(f"failed to create guest memory: {e.strerror}") from e
        self.regions: list[MemoryRegion] = []
        offset = 0
        for addr, size in ranges:
            if addr % mmap.PAGESIZE or size % mmap.PAGESIZE or size == 0:
                raise GuestMemoryError(f"region {addr:#x}+{size:#x} is not page-aligned")
            mapping = mmap.mmap(self.memfd, size, mmap.MAP_SHARED,
                                mmap.PROT_READ | mmap.PROT_WRITE, offset=offset)
            mapping.madvise(mmap.MADV_DONTDUMP)  # a VMM core dump must not hold guest RAM
            self.regions.append(MemoryRegion(addr, size, offset, mapping))
            offset += size

    @classmethod
    def from_fds(cls, regions: list[tuple[int, int, int, int]]) -> "GuestMemory":
        """Guest memory another process made and shares (a vhost-user front-end's
        table): each (guest address, size, fd, file offset) mapped shared, read-write.
        The fds may be closed afterwards; this object has no memfd of its own."""
        self = cls.__new__(cls)
        self.memfd = None
        self.regions = []
        try:
            for addr, size, fd, offset in sorted(regions, key=lambda r: r[0]):
                if addr % mmap.PAGESIZE or size % mmap.PAGESIZE or offset % mmap.PAGESIZE \
                        or size == 0:
                    raise GuestMemoryError(f"region {addr:#x}+{size:#x} (file offset "
                                           f"{offset:#x}) is not page-aligned")
                if self.regions and self.regions[-1].end > addr:
                    raise GuestMemoryError(f"memory regions overlap at {addr:#x}")
                # A mapping past the end of the file would fault (SIGBUS) on first use.
                st = os.fstat(fd)
                if stat.S_ISREG(st.st_mode) and st.st_size < offset + size:
                    raise GuestMemoryError(f"region {addr:#x}+{size:#x} lies past the end "
                                           f"of its file ({st.st_size:#x} bytes)")
                try:
                    mapping = mmap.mmap(fd, size, mmap.MAP_SHARED,
                                        mmap.PROT_READ | mmap.PROT_WRITE, offset=offset)
                except (OSError, ValueError, OverflowError) as e:
                    raise GuestMemoryError(f"cannot map region {addr:#x}+{size:#x}: {e}") from e
                self.regions.append(MemoryRegion(addr, size, offset, mapping))
        except BaseException:
            self.close()
            raise
        return self

    @property
    def size(self) -> int:
        return sum(r.size for r in self.regions)

    def end_addr(self) -> int:
        return self.regions[-1].end

    def _find(self, addr: int, length: int) -> tuple[MemoryRegion, int]:
        first = self.regions[0]  # fast path: nearly every access is in low RAM
        if first.guest_addr <= addr and 0 <= length and addr + length <= first.end:
            return first, addr - first.guest_addr
        if addr < 0 or length < 0:
            raise GuestMemoryError(f"invalid guest range {addr:#x}+{length:#x}")
        for region in self.regions:
            if region.guest_addr <= addr < region.end or (length == 0 and addr == region.end):
                if addr + length > region.end:
                    break
                return region, addr - region.guest_addr
        raise GuestMemoryError(f"guest range {addr:#x}+{length:#x} is not in RAM")

    def is_valid_range(self, addr: int, length: int) -> bool:
        try:
            self._find(addr, length)
        except GuestMemoryError:
            return False
        return True

    def slice(self, addr: int, length: int) -> memoryview:
        """A zero-copy view of [addr, addr+length); raises if it is not all RAM."""
        region, off = self._find(addr, length)
        return region.view[off:off + length]

    def read(self, addr: int, length: int) -> bytes:
        return bytes(self.slice(addr, length))

    def write(self, addr: int, data: bytes | bytearray | memoryview) -> None:
        self.slice(addr, len(data))[:] = data

    def read_int(self, addr: int, size: int) -> int:
        return int.from_bytes(self.slice(addr, size), "little")

    def write_int(self, addr: int, value: int, size: int) -> None:
        self.slice(addr, size)[:] = value.to_bytes(size, "little")

    def write_from_file(self, addr: int, fd: int, length: int, file_offset: int) -> None:
        """Copy `length` bytes of a file straight into guest RAM (no Python copy)."""
        view = self.slice(addr, length)
        done = 0
        while done < length:
            n = os.preadv(fd, [view[done:]], file_offset + done)
            if n == 0:
                raise GuestMemoryError("unexpected end of file while loading into guest RAM")
            done += n

    def close(self) -> None:
        for region in self.regions:
            region.view.release()
            try:
                region.mapping.close()
            except BufferError:
                pass  # still exported to KVM; the process exit unmaps it
        if self.memfd is not None:
            os.close(self.memfd)
