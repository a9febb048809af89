"""Raw disk images: a plain file (or block device) addressed by byte offset."""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import os

from crosvm.base.hostfile import REGULAR_OR_BLOCK, HostFileError, open_host_file

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10


class DiskError(Exception):
    """The disk image cannot be used; the message names it."""


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    if _libc.fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


class RawDisk:
    """An opened, locked raw image.

    Like crosvm, a writable image is locked exclusively and a read-only one shared
    (flock), so two VMs cannot write the same disk.
    """

    def __init__(self, path: str, read_only: bool = False, direct: bool = False,
                 sparse: bool = True) -> None:
        flags = os.O_RDONLY if read_only else os.O_RDWR
        if direct:
            flags |= os.O_DIRECT
        try:  # a regular file or a block device; a FIFO or directory is named as such
            self.fd = open_host_file(path, "disk image", flags, REGULAR_OR_BLOCK)
        except HostFileError as e:
            raise DiskError(str(e)) from None
        try:
            fcntl.flock(self.fd, (fcntl.LOCK_SH if read_only else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except OSError as e:
            os.close(self.fd)
            raise DiskError(f"disk image {path} is locked by another process") from e
        self.path = path
        self.read_only = read_only
        self.sparse = sparse
        self.size = os.lseek(self.fd, 0, os.SEEK_END)

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

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
