"""Raw disk images: a plain file (or block device) addressed by byte offset."""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
from typing import Sequence

from crosvm.base.hostfile import REGULAR_OR_BLOCK, HostFileError, open_host_file
from crosvm.disk.disk_file import DiskError, DiskFile

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

__all__ = ["DiskError", "RawDisk", "fallocate", "open_locked"]


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    if _libc.fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def open_locked(path: str, read_only: bool, direct: bool = False) -> int:
    """Open an image file and lock it as crosvm does: exclusive when writable, shared when
    read-only (flock), so two VMs cannot write the same disk."""
    flags = os.O_RDONLY if read_only else os.O_RDWR
    if direct:
        flags |= os.O_DIRECT
    try:  # a regular file or a block device; a FIFO or directory is named as such
        fd = open_host_file(path, "disk image", flags, REGULAR_OR_BLOCK)
    except HostFileError as e:
        raise DiskError(str(e)) from None
    try:
        fcntl.flock(fd, (fcntl.LOCK_SH if read_only else fcntl.LOCK_EX) | fcntl.LOCK_NB)
    except OSError as e:
        os.close(fd)
        raise DiskError(f"disk image {path} is locked by another process") from e
    return fd


def pread_full(fd: int, buf: memoryview, offset: int) -> int:
    """preadv until `buf` is full or the file ends; returns the bytes read."""
    done = 0
    while done < len(buf):
        n = os.preadv(fd, [buf[done:]], offset + done)
        if n == 0:
            break
        done += n
    return done


def pwrite_full(fd: int, buf: memoryview | bytes, offset: int) -> None:
    view = memoryview(buf)
    done = 0
    while done < len(view):
        n = os.pwritev(fd, [view[done:]], offset + done)
        if n <= 0:
            raise DiskError("short write")
        done += n


class RawDisk(DiskFile):
    """An opened, locked raw image."""

    def __init__(self, path: str, read_only: bool = False, direct: bool = False,
                 sparse: bool = True, fd: int | None = None) -> None:
        self.fd = open_locked(path, read_only, direct) if fd is None else fd
        self.path = path
        self.read_only = read_only
        self.sparse = sparse
        self.size = os.lseek(self.fd, 0, os.SEEK_END)

    def fds(self) -> list[int]:
        return [self.fd]

    def read_at(self, offset: int, buf: memoryview) -> None:
        self.read_vectored(offset, [buf])

    def write_at(self, offset: int, buf: memoryview) -> None:
        self.write_vectored(offset, [buf])

    def read_vectored(self, offset: int, views: Sequence[memoryview]) -> int:
        views = list(views)
        count = sum(len(v) for v in views)
        done = 0
        while done < count:
            n = os.preadv(self.fd, views, offset + done)
            if n == 0:
                raise DiskError(f"{self.path}: short read at {offset + done}")
            done += n
            views = _advance(views, n)
        return done

    def write_vectored(self, offset: int, views: Sequence[memoryview]) -> int:
        if self.read_only:
            raise DiskError(f"{self.path}: the disk is read-only")
        views = list(views)
        count = sum(len(v) for v in views)
        done = 0
        while done < count:
            n = os.pwritev(self.fd, views, offset + done)
            if n <= 0:
                raise DiskError(f"{self.path}: short write at {offset + done}")
            done += n
            views = _advance(views, n)
        return done

    def flush(self) -> None:
        os.fdatasync(self.fd)

    def punch_hole(self, offset: int, length: int) -> None:
        fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)

    def write_zeroes(self, offset: int, length: int) -> None:
        try:
            fallocate(self.fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, offset, length)
            return
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.ENODEV, errno.EINVAL):
                raise
        zeros = bytes(min(length, 1 << 20))
        done = 0
        while done < length:
            done += os.pwrite(self.fd, zeros[:length - done], offset + done)

    def set_len(self, size: int) -> None:
        if self.read_only:
            raise DiskError(f"{self.path}: the disk is read-only")
        os.ftruncate(self.fd, size)
        if not self.sparse and size > self.size:
            try:
                fallocate(self.fd, 0, self.size, size - self.size)
            except OSError:
                os.ftruncate(self.fd, self.size)  # as it was: the size the guest knows
                raise
        self.size = size

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _advance(views: list[memoryview], n: int) -> list[memoryview]:
    while n and views:
        if n >= len(views[0]):
            n -= len(views[0])
            views.pop(0)
        else:
            views[0] = views[0][n:]
            n = 0
    return views
