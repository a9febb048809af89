"""FUSE's wire format (include/uapi/linux/fuse.h, protocol 7.31 and later), as virtio-fs
carries it: each request is a fuse_in_header and the op's arguments in the readable
part of a chain, each reply a fuse_out_header and the op's reply in the writable part.

Pure: struct layouts, constants and a bounded argument decoder. Every decode is
checked against the bytes actually present and raises `FuseError` (never IndexError
or struct.error) so the server can answer a malformed request with EINVAL.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

KERNEL_VERSION = 7
# The minor version this server speaks; it answers older kernels down to MIN_MINOR
# with their own minor (7.31 is what Linux 5.4, the first with virtio-fs, sends).
KERNEL_MINOR_VERSION = 31
MIN_MINOR_VERSION = 31
ROOT_ID = 1

# -- opcodes ---------------------------------------------------------------------------
LOOKUP = 1
FORGET = 2
GETATTR = 3
SETATTR = 4
READLINK = 5
SYMLINK = 6
MKNOD = 8
MKDIR = 9
UNLINK = 10
RMDIR = 11
RENAME = 12
LINK = 13
OPEN = 14
READ = 15
WRITE = 16
STATFS = 17
RELEASE = 18
FSYNC = 20
SETXATTR = 21
GETXATTR = 22
LISTXATTR = 23
REMOVEXATTR = 24
FLUSH = 25
INIT = 26
OPENDIR = 27
READDIR = 28
RELEASEDIR = 29
FSYNCDIR = 30
GETLK = 31
SETLK = 32
SETLKW = 33
ACCESS = 34
CREATE = 35
INTERRUPT = 36
BMAP = 37
DESTROY = 38
IOCTL = 39
POLL = 40
NOTIFY_REPLY = 41
BATCH_FORGET = 42
FALLOCATE = 43
READDIRPLUS = 44
RENAME2 = 45
LSEEK = 46
COPY_FILE_RANGE = 47
SETUPMAPPING = 48
REMOVEMAPPING = 49
SYNCFS = 50
TMPFILE = 51

OP_NAMES = {globals()[n]: n for n in (
    "LOOKUP", "FORGET", "GETATTR", "SETATTR", "READLINK", "SYMLINK", "MKNOD", "MKDIR",
    "UNLINK", "RMDIR", "RENAME", "LINK", "OPEN", "READ", "WRITE", "STATFS", "RELEASE",
    "FSYNC", "SETXATTR", "GETXATTR", "LISTXATTR", "REMOVEXATTR", "FLUSH", "INIT",
    "OPENDIR", "READDIR", "RELEASEDIR", "FSYNCDIR", "GETLK", "SETLK", "SETLKW", "ACCESS",
    "CREATE", "INTERRUPT", "BMAP", "DESTROY", "IOCTL", "POLL", "NOTIFY_REPLY",
    "BATCH_FORGET", "FALLOCATE", "READDIRPLUS", "RENAME2", "LSEEK", "COPY_FILE_RANGE",
    "SETUPMAPPING", "REMOVEMAPPING", "SYNCFS", "TMPFILE")}
# Requests the kernel sends without waiting for a reply: the server must not write one.
NO_REPLY = frozenset({FORGET, BATCH_FORGET, INTERRUPT})

# -- INIT flags (fuse_init_in.flags / fuse_init_out.flags) -------------------------------
ASYNC_READ = 1 << 0
POSIX_LOCKS = 1 << 1
FILE_OPS = 1 << 2
ATOMIC_O_TRUNC = 1 << 3
EXPORT_SUPPORT = 1 << 4
BIG_WRITES = 1 << 5
DONT_MASK = 1 << 6
SPLICE_WRITE = 1 << 7
SPLICE_MOVE = 1 << 8
SPLICE_READ = 1 << 9
FLOCK_LOCKS = 1 << 10
HAS_IOCTL_DIR = 1 << 11
AUTO_INVAL_DATA = 1 << 12
DO_READDIRPLUS = 1 << 13
READDIRPLUS_AUTO = 1 << 14
ASYNC_DIO = 1 << 15
WRITEBACK_CACHE = 1 << 16
NO_OPEN_SUPPORT = 1 << 17
PARALLEL_DIROPS = 1 << 18
HANDLE_KILLPRIV = 1 << 19
POSIX_ACL = 1 << 20
ABORT_ERROR = 1 << 21
MAX_PAGES = 1 << 22
CACHE_SYMLINKS = 1 << 23
NO_OPENDIR_SUPPORT = 1 << 24
EXPLICIT_INVAL_DATA = 1 << 25
MAP_ALIGNMENT = 1 << 26
SUBMOUNTS = 1 << 27
HANDLE_KILLPRIV_V2 = 1 << 28
SETXATTR_EXT = 1 << 29
INIT_EXT = 1 << 30

# -- other flags -------------------------------------------------------------------------
# fuse_setattr_in.valid
FATTR_MODE = 1 << 0
FATTR_UID = 1 << 1
FATTR_GID = 1 << 2
FATTR_SIZE = 1 << 3
FATTR_ATIME = 1 << 4
FATTR_MTIME = 1 << 5
FATTR_FH = 1 << 6
FATTR_ATIME_NOW = 1 << 7
FATTR_MTIME_NOW = 1 << 8
FATTR_LOCKOWNER = 1 << 9
FATTR_CTIME = 1 << 10
FATTR_KILL_SUIDGID = 1 << 11
# fuse_open_out.open_flags
FOPEN_DIRECT_IO = 1 << 0
FOPEN_KEEP_CACHE = 1 << 1
FOPEN_NONSEEKABLE = 1 << 2
FOPEN_CACHE_DIR = 1 << 3
FOPEN_STREAM = 1 << 4
# fuse_getattr_in.getattr_flags
GETATTR_FH = 1 << 0
# fuse_write_in.write_flags
WRITE_CACHE = 1 << 0
WRITE_LOCKOWNER = 1 << 1
WRITE_KILL_PRIV = 1 << 2  # FUSE_WRITE_KILL_SUIDGID since 7.33, same bit
# fuse_fsync_in.fsync_flags
FSYNC_FDATASYNC = 1 << 0
# fuse_release_in.release_flags
RELEASE_FLUSH = 1 << 0
# renameat2 flags in fuse_rename2_in.flags
RENAME_NOREPLACE = 1 << 0
RENAME_EXCHANGE = 1 << 1
RENAME_WHITEOUT = 1 << 2

# -- structs (all little-endian, 64-bit aligned as the kernel lays them out) -------------
IN_HEADER = struct.Struct("<IIQQIIIHH")   # fuse_in_header, 40
OUT_HEADER = struct.Struct("<IiQ")         # fuse_out_header, 16
_ATTR_FMT = "QQQQQQIIIIIIIIII"
ATTR = struct.Struct("<" + _ATTR_FMT)      # fuse_attr, 88
ENTRY_OUT = struct.Struct("<QQQQII" + _ATTR_FMT)   # fuse_entry_out, 128
ATTR_OUT = struct.Struct("<QII" + _ATTR_FMT)        # fuse_attr_out, 104
FORGET_IN = struct.Struct("<Q")                # nlookup
FORGET_ONE = struct.Struct("<QQ")              # nodeid, nlookup
BATCH_FORGET_IN = struct.Struct("<II")         # count, dummy
GETATTR_IN = struct.Struct("<IIQ")             # getattr_flags, dummy, fh
MKNOD_IN = struct.Struct("<IIII")              # mode, rdev, umask, padding
MKDIR_IN = struct.Struct("<II")                # mode, umask
RENAME_IN = struct.Struct("<Q")                # newdir
RENAME2_IN = struct.Struct("<QII")             # newdir, flags, padding
LINK_IN = struct.Struct("<Q")                  # oldnodeid
SETATTR_IN = struct.Struct("<IIQQQQQQIIIIIIII")  # fuse_setattr_in, 88
OPEN_IN = struct.Struct("<II")                 # flags, open_flags
CREATE_IN = struct.Struct("<IIII")             # flags, mode, umask, open_flags
OPEN_OUT = struct.Struct("<QII")               # fh, open_flags, padding
RELEASE_IN = struct.Struct("<QIIQ")            # fh, flags, release_flags, lock_owner
FLUSH_IN = struct.Struct("<QIIQ")              # fh, unused, padding, lock_owner
READ_IN = struct.Struct("<QQIIQII")            # fh, offset, size, read_flags, lock_owner, flags, pad
WRITE_IN = struct.Struct("<QQIIQII")           # fh, offset, size, write_flags, lock_owner, flags, pad
WRITE_OUT = struct.Struct("<II")               # size, padding
KSTATFS = struct.Struct("<QQQQQIIII24x")       # fuse_kstatfs (statfs_out), 80
FSYNC_IN = struct.Struct("<QII")               # fh, fsync_flags, padding
SETXATTR_IN = struct.Struct("<II")             # size, flags (no FUSE_SETXATTR_EXT)
GETXATTR_IN = struct.Struct("<II")             # size, padding
GETXATTR_OUT = struct.Struct("<II")            # size, padding
ACCESS_IN = struct.Struct("<II")               # mask, padding
INIT_IN = struct.Struct("<IIII")               # major, minor, max_readahead, flags (+ flags2...)
INIT_OUT = struct.Struct("<IIIIHHIIHHI28x")    # fuse_init_out, 64
INTERRUPT_IN = struct.Struct("<Q")             # unique
FALLOCATE_IN = struct.Struct("<QQQII")         # fh, offset, length, mode, padding
LSEEK_IN = struct.Struct("<QQII")              # fh, offset, whence, padding
LSEEK_OUT = struct.Struct("<Q")                # offset
DIRENT = struct.Struct("<QQII")                # ino, off, namelen, type (name follows)

assert (IN_HEADER.size, ATTR.size, ENTRY_OUT.size, ATTR_OUT.size, SETATTR_IN.size,
        KSTATFS.size, INIT_OUT.size, READ_IN.size) == (40, 88, 128, 104, 88, 80, 64, 40)

XATTR_NAME_MAX = 255
XATTR_SIZE_MAX = 64 << 10


class FuseError(ValueError):
    """A request that does not decode (too short, no NUL after a name, ...)."""


@dataclass(frozen=True)
class InHeader:
    """One fuse_in_header."""

    len: int
    opcode: int
    unique: int
    nodeid: int
    uid: int
    gid: int
    pid: int
    total_extlen: int = 0

    @classmethod
    def unpack(cls, raw: bytes) -> "InHeader":
        if len(raw) < IN_HEADER.size:
            raise FuseError(f"a fuse_in_header is {IN_HEADER.size} bytes, not {len(raw)}")
        f = IN_HEADER.unpack_from(raw)
        return cls(*f[:8])

    def pack(self) -> bytes:
        return IN_HEADER.pack(self.len, self.opcode, self.unique, self.nodeid, self.uid,
                              self.gid, self.pid, self.total_extlen, 0)


class Args:
    """A bounded cursor over one request's argument bytes."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    @property
    def remaining(self) -> int:
        return len(self.data) - self.pos

    def take(self, st: struct.Struct) -> tuple:
        """The next struct `st`, or FuseError if fewer bytes remain."""
        if self.remaining < st.size:
            raise FuseError(f"{st.size}-byte argument struct, only {self.remaining} bytes left")
        out = st.unpack_from(self.data, self.pos)
        self.pos += st.size
        return out

    def take_bytes(self, count: int) -> bytes:
        """The next `count` bytes exactly."""
        if count < 0 or self.remaining < count:
            raise FuseError(f"{count} bytes wanted, only {self.remaining} left")
        out = self.data[self.pos:self.pos + count]
        self.pos += count
        return out

    def name(self) -> bytes:
        """The next NUL-terminated string (without its NUL)."""
        end = self.data.find(b"\0", self.pos)
        if end < 0:
            raise FuseError("a name without its terminating NUL")
        out = self.data[self.pos:end]
        self.pos = end + 1
        return out

    def rest(self) -> bytes:
        out = self.data[self.pos:]
        self.pos = len(self.data)
        return out


def out_header(length: int, error: int, unique: int) -> bytes:
    """A fuse_out_header; `error` is 0 or a negative errno."""
    return OUT_HEADER.pack(length, error, unique)


def dirent_size(namelen: int) -> int:
    """Bytes one fuse_dirent with a `namelen`-byte name takes (8-byte aligned)."""
    return (DIRENT.size + namelen + 7) & ~7


def direntplus_size(namelen: int) -> int:
    """Bytes one fuse_direntplus takes (entry_out, then the dirent, aligned)."""
    return ENTRY_OUT.size + dirent_size(namelen)


def pack_dirent(ino: int, off: int, type_: int, name: bytes) -> bytes:
    """One fuse_dirent, padded with zeros to its aligned size."""
    raw = DIRENT.pack(ino, off, len(name), type_) + name
    return raw.ljust(dirent_size(len(name)), b"\0")
