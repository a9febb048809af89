"""Android sparse images (read-only, as in crosvm), from AOSP's sparse_format.h layout.

A 28-byte file header, then chunks: RAW (data follows), FILL (a 4-byte pattern),
DONT_CARE (reads as zeroes) and CRC32 (a checksum, covering nothing of the disk).
"""

from __future__ import annotations

import bisect
import os
import struct

from crosvm.disk.disk_file import DiskError, DiskFile
from crosvm.disk.raw import open_locked, pread_full

MAGIC = 0xED26FF3A
MAGIC_BYTES = struct.pack("<I", MAGIC)
FILE_HEADER = struct.Struct("<IHHHHIIII")   # 28 bytes
CHUNK_HEADER = struct.Struct("<HHII")       # 12 bytes
CHUNK_RAW, CHUNK_FILL, CHUNK_DONT_CARE, CHUNK_CRC32 = 0xCAC1, 0xCAC2, 0xCAC3, 0xCAC4


class AndroidSparseDisk(DiskFile):
    """A read-only view of an Android sparse image as the disk it describes."""

    def __init__(self, path: str, fd: int | None = None) -> None:
        self.path = path
        self.read_only = True
        self.fd = open_locked(path, True) if fd is None else fd
        try:
            self._parse()
        except BaseException:
            os.close(self.fd)
            raise

    def _err(self, why: str) -> DiskError:
        return DiskError(f"android sparse image {self.path}: {why}")

    def _parse(self) -> None:
        file_size = os.fstat(self.fd).st_size
        head = os.pread(self.fd, FILE_HEADER.size, 0)
        if len(head) != FILE_HEADER.size:
            raise self._err("truncated header")
        (magic, major, _minor, hdr_size, chunk_hdr_size, blk_size, total_blocks,
         total_chunks, _checksum) = FILE_HEADER.unpack(head)
        if magic != MAGIC:
            raise self._err("bad magic")
        if major != 1:
            raise self._err(f"major version {major} is not supported")
        if hdr_size < FILE_HEADER.size or chunk_hdr_size < CHUNK_HEADER.size:
            raise self._err("header sizes are too small")
        if blk_size == 0 or blk_size % 4:
            raise self._err(f"block size {blk_size} is not a multiple of 4")
        # Each chunk is (disk start, length, kind, file offset or fill pattern).
        self.starts: list[int] = []
        self.chunks: list[tuple[int, int, int, bytes | int]] = []
        pos, disk_pos = hdr_size, 0
        for _ in range(total_chunks):
            raw = os.pread(self.fd, CHUNK_HEADER.size, pos)
            if len(raw) != CHUNK_HEADER.size:
                raise self._err(f"chunk header at {pos} is outside the file")
            kind, _, blocks, total_size = CHUNK_HEADER.unpack(raw)
            body = pos + chunk_hdr_size
            length = blocks * blk_size
            body_size = total_size - chunk_hdr_size
            if body_size < 0 or pos + total_size > file_size:
                raise self._err(f"chunk at {pos} runs past the end of the file")
            if kind == CHUNK_RAW:
                if body_size != length:
                    raise self._err(f"raw chunk at {pos} has {body_size} bytes for {length}")
                self._add(disk_pos, length, kind, body)
            elif kind == CHUNK_FILL:
                if body_size != 4:
                    raise self._err(f"fill chunk at {pos} is not 4 bytes")
                self._add(disk_pos, length, kind, os.pread(self.fd, 4, body))
            elif kind == CHUNK_DONT_CARE:
                self._add(disk_pos, length, kind, 0)
            elif kind == CHUNK_CRC32:
                length = 0
            else:
                raise self._err(f"unknown chunk type {kind:#x} at {pos}")
            disk_pos += length
            pos += total_size
        if disk_pos != total_blocks * blk_size:
            raise self._err(f"chunks cover {disk_pos} bytes, the header says "
                            f"{total_blocks * blk_size}")
        self.size = disk_pos

    def _add(self, start: int, length: int, kind: int, where: bytes | int) -> None:
        if length:
            self.starts.append(start)
            self.chunks.append((start, length, kind, where))

    def fds(self) -> list[int]:
        return [self.fd]

    def read_at(self, offset: int, buf: memoryview) -> None:
        self.check_range(offset, len(buf))
        done = 0
        i = bisect.bisect_right(self.starts, offset) - 1
        while done < len(buf):
            start, length, kind, where = self.chunks[i]
            within = offset + done - start
            n = min(length - within, len(buf) - done)
            part = buf[done:done + n]
            if kind == CHUNK_RAW:
                if pread_full(self.fd, part, where + within) != n:
                    raise self._err("raw chunk is outside the file")
            elif kind == CHUNK_FILL:
                rot = within % 4
                pattern = where[rot:] + where[:rot]
                part[:] = (pattern * (n // 4 + 1))[:n]
            else:
                part[:] = bytes(n)
            done += n
            i += 1

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
