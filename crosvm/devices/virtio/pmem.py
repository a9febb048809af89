"""virtio-pmem (virtio 1.2, 5.19): a raw image file the guest maps as persistent memory.

The VMM maps the file and gives it to the guest as its own KVM memory slot (read-only
for `ro`) above RAM, in the high MMIO window; config space tells the driver where
(`start`) and how big (`size`). The guest then reads and writes the file's pages
directly; the device itself only answers the one request the driver sends on its
single queue, FLUSH, by syncing the file to storage.

Only raw images can be mapped (crosvm book, "Pmem"): a qcow2, sparse or composite
image is refused. A file whose size is not a multiple of `SIZE_ALIGN` is padded with
anonymous zero pages the guest may use but that never reach the file.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import os
import stat
import struct
from typing import Callable

from crosvm.base import Event
from crosvm.base.ratelimit import RateLimitedLog
from crosvm.devices.virtio import virtio_device as V
from crosvm.devices.virtio.descriptor_utils import Reader, Writer
from crosvm.devices.virtio.queue import DescriptorChain, Queue
from crosvm.disk import DiskError, detect_format
from crosvm.disk.raw import open_locked
from crosvm.vm_memory import GuestMemory

log = logging.getLogger(__name__)
_guest_log = RateLimitedLog(log)

TYPE_PMEM = 27
QUEUE_SIZE = 256
REQ_TYPE_FLUSH = 0
RESP_OK = 0
RESP_EIO = 1
REQUEST = struct.Struct("<I")    # struct virtio_pmem_req: le32 type
RESPONSE = struct.Struct("<I")   # struct virtio_pmem_resp: le32 ret
CONFIG = struct.Struct("<QQ")    # struct virtio_pmem_config: le64 start, le64 size

SIZE_ALIGN = 2 << 20     # the guest's device size: whole 2 MiB pages (a DAX mapping unit)
ADDRESS_ALIGN = 128 << 20  # the guest address: a memory section, as Linux's DAX wants
MAX_SIZE = 1 << 46       # no guest physical address space is larger


class PmemRequestError(ValueError):
    """A request the device cannot parse."""


def parse_request(data: bytes) -> int:
    """The request type from the start of the driver's readable bytes.

    Pure: the bytes in, the type out, or `PmemRequestError` when there are fewer than
    the four bytes of `struct virtio_pmem_req` (more are ignored)."""
    if len(data) < REQUEST.size:
        raise PmemRequestError(f"request of {len(data)} bytes, need {REQUEST.size}")
    return REQUEST.unpack_from(data)[0]


def execute(data: bytes, flush: Callable[[], None]) -> int:
    """The response (`RESP_OK` or `RESP_EIO`) to one request; `flush` syncs the file
    and raises OSError when it cannot."""
    try:
        type_ = parse_request(data)
    except PmemRequestError as e:
        _guest_log.warning("pmem: malformed request: %s", e)
        return RESP_EIO
    if type_ != REQ_TYPE_FLUSH:
        _guest_log.warning("pmem: unsupported request type %d", type_)
        return RESP_EIO
    try:
        flush()
    except OSError as e:
        _guest_log.error("pmem: flush failed: %s", e)
        return RESP_EIO
    return RESP_OK


# -- the mapping --------------------------------------------------------------------
_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                       ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_MAP_FAILED = ctypes.c_void_p(-1).value
_MAP_FIXED = 0x10
_MAP_NORESERVE = 0x4000


def _mmap(addr: int | None, length: int, prot: int, flags: int, fd: int) -> int:
    result = _libc.mmap(addr, length, prot, flags, fd, 0)
    if result in (None, _MAP_FAILED):
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return result


def _round_up(value: int, align: int) -> int:
    return (value + align - 1) // align * align


class PmemFile:
    """A raw image opened (and locked, as disks are) and mapped shared into the VMM.

    `host_address` and `size` are what KVM's memory slot needs. The mapping is one
    reservation of `size` bytes: the file over its start, anonymous zero pages after it.
    """

    def __init__(self, path: str, read_only: bool) -> None:
        self.path = path
        self.read_only = read_only
        self.fd = open_locked(path, read_only)
        self.host_address = 0
        try:
            self.file_size = self._file_size()
            kind = detect_format(os.pread(self.fd, 64, 0))
            if kind != "raw":
                raise DiskError(f"pmem {path}: a {kind} image cannot be mapped; pmem needs "
                                "a raw image (use --block for other formats)")
            self.size = _round_up(self.file_size, SIZE_ALIGN)
            self._map()
        except BaseException:
            self.close()
            raise

    def _file_size(self) -> int:
        st = os.fstat(self.fd)
        if stat.S_ISBLK(st.st_mode):
            size = os.lseek(self.fd, 0, os.SEEK_END)
        elif stat.S_ISREG(st.st_mode):
            size = st.st_size
        else:
            raise DiskError(f"pmem {self.path}: not a regular file or block device")
        if size == 0:
            raise DiskError(f"pmem {self.path}: the file is empty")
        if size > MAX_SIZE:
            raise DiskError(f"pmem {self.path}: {size} bytes is too large to map")
        return size

    def _map(self) -> None:
        prot = mmap.PROT_READ | (0 if self.read_only else mmap.PROT_WRITE)
        try:
            base = _mmap(None, self.size, prot,
                         mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_NORESERVE, -1)
            self.host_address = base
            _mmap(base, _round_up(self.file_size, mmap.PAGESIZE), prot,
                  mmap.MAP_SHARED | _MAP_FIXED, self.fd)
        except OSError as e:
            raise DiskError(f"pmem {self.path}: cannot map the file: {e.strerror}") from e

    def sync(self) -> None:
        """Write the guest's stores to storage (shared mappings live in the page cache,
        which fsync writes back)."""
        if not self.read_only:
            os.fsync(self.fd)

    def view(self) -> memoryview:
        """The mapping as bytes (for tests and tools in the VMM process)."""
        array = (ctypes.c_char * self.size).from_address(self.host_address)
        return memoryview(array).cast("B")

    def close(self) -> None:
        if self.host_address:
            _libc.munmap(self.host_address, self.size)
            self.host_address = 0
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class Pmem(V.VirtioDevice):
    """The device: config space (where the memory is) and the flush queue."""

    device_type = TYPE_PMEM
    seccomp_policy = "pmem_device"

    def __init__(self, file: PmemFile, guest_address: int) -> None:
        self.file = file
        self.guest_address = guest_address

    def debug_label(self) -> str:
        return f"pmem {self.file.path}"

    def queue_max_sizes(self) -> list[int]:
        return [QUEUE_SIZE]

    def keep_fds(self) -> list[int]:
        return [self.file.fd]

    def config_bytes(self) -> bytes:
        return CONFIG.pack(self.guest_address, self.file.size)

    def process_chain(self, mem: GuestMemory, chain: DescriptorChain) -> int:
        """Answer one request; returns the bytes written to the driver's buffers."""
        reader = Reader(mem, chain)
        writer = Writer(mem, chain)
        if writer.available_bytes() < RESPONSE.size:
            _guest_log.warning("pmem: request without room for a response (%d bytes)",
                               writer.available_bytes())
            return 0
        request = reader.read(min(reader.available_bytes(), REQUEST.size))
        writer.write(RESPONSE.pack(execute(request, self.file.sync)))
        return RESPONSE.size

    def activate(self, mem: GuestMemory, interrupt: V.Interrupt,
                 queues: list[tuple[int, Queue, Event]]) -> None:
        self.serve_single_queue("v_pmem", mem, interrupt, queues,
                                lambda chain: self.process_chain(mem, chain))

    def close(self) -> None:
        super().close()
        self.file.close()
