"""virtio-blk (virtio 1.x, 5.2) over a disk image of any format (crosvm.disk).

Requests: IN, OUT, FLUSH, GET_ID, DISCARD and WRITE_ZEROES. Every request is checked
against the disk size and the limits advertised in config space before any I/O; a
bad one gets an error status and the queue carries on.
"""

from __future__ import annotations

import logging
import struct

from crosvm.base import Event
from crosvm.base.ratelimit import RateLimitedLog
from crosvm.devices.virtio import virtio_device as V
from crosvm.devices.virtio.descriptor_utils import Reader, ShortBuffer, Writer
from crosvm.devices.virtio.queue import DescriptorChain, Queue
from crosvm.disk import DiskFile
from crosvm.vm_memory import GuestMemory

log = logging.getLogger(__name__)
_guest_log = RateLimitedLog(log)

SECTOR_SHIFT = 9
SECTOR_SIZE = 1 << SECTOR_SHIFT
QUEUE_SIZE = 256
ID_BYTES = 20
MAX_DISCARD_SECTORS = 0xFFFF_FFFF
MAX_WRITE_ZEROES_SECTORS = 0xFFFF_FFFF
MAX_DISCARD_SEG = 32
MAX_WRITE_ZEROES_SEG = 32
DISCARD_SECTOR_ALIGNMENT = 128

# Request types and statuses.
T_IN, T_OUT, T_FLUSH, T_GET_ID, T_DISCARD, T_WRITE_ZEROES = 0, 1, 4, 8, 11, 13
S_OK, S_IOERR, S_UNSUPP = 0, 1, 2
WRITE_ZEROES_FLAG_UNMAP = 1
# The largest size `disk resize` accepts: off_t (a signed 64-bit file offset) holds it.
MAX_DISK_SIZE = (1 << 63) - (1 << 20)

# Feature bits.
F_SEG_MAX, F_RO, F_BLK_SIZE, F_FLUSH, F_DISCARD, F_WRITE_ZEROES = 2, 5, 6, 9, 13, 14

HEADER = struct.Struct("<IIQ")
SEGMENT = struct.Struct("<QII")


class RequestError(Exception):
    """A request that fails with `status`."""

    def __init__(self, status: int, why: str) -> None:
        super().__init__(why)
        self.status = status


class Block(V.VirtioDevice):
    """A virtio block device backed by a `DiskFile` (raw, qcow2, sparse, composite)."""

    device_type = V.TYPE_BLOCK
    seccomp_policy = "block_device"

    def __init__(self, disk: DiskFile, block_size: int = SECTOR_SIZE, id: bytes | None = None,
                 queue_size: int = QUEUE_SIZE) -> None:
        if block_size < SECTOR_SIZE or block_size & (block_size - 1):
            raise ValueError(f"block size {block_size} is not a power of two >= 512")
        if id is not None and len(id) > ID_BYTES:
            raise ValueError(f"block id is longer than {ID_BYTES} bytes")
        self.disk = disk
        self.block_size = block_size
        self.id = id
        self.queue_size = queue_size

    def debug_label(self) -> str:
        return f"block {self.disk.path}"

    def queue_max_sizes(self) -> list[int]:
        return [self.queue_size]

    def keep_fds(self) -> list[int]:
        return self.disk.fds()

    def features(self) -> int:
        bits = V.BASE_FEATURES | 1 << F_SEG_MAX | 1 << F_BLK_SIZE
        if self.disk.read_only:
            bits |= 1 << F_RO
        else:
            bits |= 1 << F_FLUSH | 1 << F_WRITE_ZEROES
            if self.disk.sparse:
                bits |= 1 << F_DISCARD
        return bits

    def config_bytes(self) -> bytes:
        capacity = self.disk.size >> SECTOR_SHIFT
        seg_max = self.queue_size - 2
        return struct.pack(
            "<QII4sIBBHIBBHIIIIIB3x",
            capacity, 0, seg_max, bytes(4), self.block_size,
            0, 0, 0, 0,          # topology
            0, 0, 1,             # writeback, unused, num_queues
            MAX_DISCARD_SECTORS, MAX_DISCARD_SEG, DISCARD_SECTOR_ALIGNMENT,
            MAX_WRITE_ZEROES_SECTORS, MAX_WRITE_ZEROES_SEG, 1)

    # -- requests ---------------------------------------------------------------
    def process_chain(self, mem: GuestMemory, chain: DescriptorChain) -> int:
        """Execute one request; returns the bytes written to the driver's buffers."""
        reader = Reader(mem, chain)
        writer = Writer(mem, chain)
        try:
            status_writer = writer.split_end_writer(1)
        except ShortBuffer:
            _guest_log.warning("block: request without a status byte")
            return 0
        try:
            type_, _, sector = reader.read_struct(HEADER.format)
            status = self.execute(type_, sector, reader, writer)
        except ShortBuffer as e:
            _guest_log.warning("block: malformed request: %s", e)
            status = S_IOERR
        except RequestError as e:
            log.debug("block: request failed: %s", e)
            status = e.status
        except OSError as e:
            _guest_log.warning("block: I/O error on %s: %s", self.disk.path, e)
            status = S_IOERR
        status_writer.write(bytes([status]))
        return writer.bytes_written + 1

    def _range(self, sector: int, length: int) -> int:
        """Byte offset of `sector`, checked so [offset, offset+length) is on the disk."""
        offset = sector << SECTOR_SHIFT
        if sector >= 1 << (64 - SECTOR_SHIFT) or offset + length > self.disk.size:
            raise RequestError(S_IOERR, f"sector {sector} + {length} bytes is past the end")
        return offset

    def execute(self, type_: int, sector: int, reader: Reader, writer: Writer) -> int:
        disk = self.disk
        if disk.read_only and type_ not in (T_IN, T_GET_ID):
            raise RequestError(S_IOERR, f"request {type_} on a read-only disk")
        if type_ == T_IN:
            length = writer.available_bytes()
            if length % SECTOR_SIZE:
                raise RequestError(S_IOERR, f"read of {length} bytes is not sector-sized")
            offset = self._range(sector, length)
            read = writer.transfer(length, lambda views, done: disk.read_vectored(offset + done,
                                                                                 views))
            if read != length:
                raise RequestError(S_IOERR, "short read from the image")
        elif type_ == T_OUT:
            length = reader.available_bytes()
            if length % SECTOR_SIZE:
                raise RequestError(S_IOERR, f"write of {length} bytes is not sector-sized")
            offset = self._range(sector, length)
            reader.transfer(length, lambda views, done: disk.write_vectored(offset + done, views))
        elif type_ == T_FLUSH:
            disk.flush()
        elif type_ == T_GET_ID:
            if self.id is None:
                raise RequestError(S_UNSUPP, "no id")
            data = self.id.ljust(ID_BYTES, b"\0")
            writer.write(data[:min(ID_BYTES, writer.available_bytes())])
        elif type_ in (T_DISCARD, T_WRITE_ZEROES):
            self._discard_or_zero(type_, reader)
        else:
            raise RequestError(S_UNSUPP, f"unsupported request type {type_}")
        return S_OK

    def _discard_or_zero(self, type_: int, reader: Reader) -> None:
        count, rest = divmod(reader.available_bytes(), SEGMENT.size)
        max_seg = MAX_DISCARD_SEG if type_ == T_DISCARD else MAX_WRITE_ZEROES_SEG
        if rest or count == 0 or count > max_seg:
            raise RequestError(S_IOERR, f"bad segment list ({reader.available_bytes()} bytes)")
        segments = []
        # Every segment is checked before any is applied: a request that fails leaves
        # the disk as it was.
        for sector, num_sectors, flags in (reader.read_struct(SEGMENT.format)
                                           for _ in range(count)):
            if type_ == T_DISCARD and flags:
                raise RequestError(S_UNSUPP, f"discard flags {flags:#x}")
            if type_ == T_WRITE_ZEROES and flags & ~WRITE_ZEROES_FLAG_UNMAP:
                raise RequestError(S_UNSUPP, f"write-zeroes flags {flags:#x}")
            length = num_sectors << SECTOR_SHIFT
            segments.append((self._range(sector, length), length, flags))
        for offset, length, flags in segments:
            if length == 0:
                continue  # nothing to do (and fallocate refuses a zero length)
            if type_ == T_DISCARD:
                if self.disk.sparse:
                    try:
                        self.disk.punch_hole(offset, length)
                    except OSError as e:  # discard is a hint: crosvm ignores failures too
                        log.debug("block: discard failed: %s", e)
            elif flags & WRITE_ZEROES_FLAG_UNMAP and self.disk.sparse:
                self.disk.punch_hole(offset, length)
            else:
                self.disk.write_zeroes(offset, length)

    # -- run-time requests ------------------------------------------------------
    def control(self, code: int, arg: int) -> tuple[bytes, bool]:
        """`crosvm disk resize`: the image grows or shrinks to `arg` bytes (a multiple
        of 512), with the worker paused so no request sees the disk half resized."""
        from crosvm.devices.control import CTRL_RESIZE, DeviceControlError
        if code != CTRL_RESIZE:
            return super().control(code, arg)
        if self.disk.read_only:
            raise DeviceControlError(f"{self.disk.path}: the disk is read-only")
        if arg == 0 or arg % self.block_size:
            raise DeviceControlError(f"size {arg} is not a positive multiple of "
                                     f"{self.block_size} (the block size)")
        if arg > MAX_DISK_SIZE:
            raise DeviceControlError(f"size {arg} is too large (at most {MAX_DISK_SIZE})")
        worker = self.worker
        if worker is not None and not worker.pause():
            raise DeviceControlError(f"{self.disk.path}: the worker did not stop in time")
        try:
            self.disk.set_len(arg)
        except OSError as e:
            raise DeviceControlError(f"cannot resize {self.disk.path}: "
                                     f"{e.strerror or e}") from None
        finally:
            if worker is not None:
                worker.resume()
        return b"", True

    # -- lifecycle --------------------------------------------------------------
    def activate(self, mem: GuestMemory, interrupt: V.Interrupt,
                 queues: list[tuple[int, Queue, Event]]) -> None:
        self.serve_single_queue("v_block", mem, interrupt, queues,
                                lambda chain: self.process_chain(mem, chain))

    def close(self) -> None:
        super().close()
        self.disk.close()
