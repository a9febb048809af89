"""9P2000.L's wire format: message numbers, a bounded decoder and the R-message encoders.

Pure: no fds, no guest memory. Every message is `size[4] type[1] tag[2]` and a body,
all little-endian; a string is `len[2]` and that many bytes (not NUL-terminated); a
qid is `type[1] version[4] path[8]`. Message layouts follow the 9P2000.L description
(the Linux client's include/net/9p/9p.h and net/9p/client.c, and diod's protocol
notes): the T-message bodies are described by `T_FORMATS`, one letter per field.

The decoder reads only the body it was given and raises `ProtocolError` on anything
short, overlong (bytes left over) or beyond a bound, so a server acting on what it
returns never reads outside the message the guest sent.
"""

from __future__ import annotations

import errno
import struct
from typing import NamedTuple

HEADER = struct.Struct("<IBH")  # size, type, tag
HEADER_LEN = HEADER.size        # 7
QID = struct.Struct("<BIQ")     # type, version, path
QID_LEN = QID.size              # 13

NOTAG = 0xFFFF
NOFID = 0xFFFF_FFFF
NONUNAME = 0xFFFF_FFFF          # n_uname when the client gives no numeric uid
MAX_WELEM = 16                  # names in one Twalk (P9_MAXWELEM)
MIN_MSIZE = 4096                # below this not even a directory entry and a qid fit
VERSION_9P2000_L = "9P2000.L"
VERSION_UNKNOWN = "unknown"

RLERROR_LEN = HEADER_LEN + 4    # an Rlerror is always 11 bytes
IOHDR_LEN = HEADER_LEN + 4      # Rread/Rreaddir: header and count[4] before the data
WRITE_FIXED_LEN = 16            # Twrite's fid[4] offset[8] count[4] before its data

# Message types (include/net/9p/9p.h). T-messages are even, their R-message is T+1.
TLERROR, RLERROR = 6, 7
TSTATFS, RSTATFS = 8, 9
TLOPEN, RLOPEN = 12, 13
TLCREATE, RLCREATE = 14, 15
TSYMLINK, RSYMLINK = 16, 17
TMKNOD, RMKNOD = 18, 19
TRENAME, RRENAME = 20, 21
TREADLINK, RREADLINK = 22, 23
TGETATTR, RGETATTR = 24, 25
TSETATTR, RSETATTR = 26, 27
TXATTRWALK, RXATTRWALK = 30, 31
TXATTRCREATE, RXATTRCREATE = 32, 33
TREADDIR, RREADDIR = 40, 41
TFSYNC, RFSYNC = 50, 51
TLOCK, RLOCK = 52, 53
TGETLOCK, RGETLOCK = 54, 55
TLINK, RLINK = 70, 71
TMKDIR, RMKDIR = 72, 73
TRENAMEAT, RRENAMEAT = 74, 75
TUNLINKAT, RUNLINKAT = 76, 77
TVERSION, RVERSION = 100, 101
TAUTH, RAUTH = 102, 103
TATTACH, RATTACH = 104, 105
TERROR, RERROR = 106, 107        # 9P2000 only; 9P2000.L uses Rlerror
TFLUSH, RFLUSH = 108, 109
TWALK, RWALK = 110, 111
TOPEN, ROPEN = 112, 113          # 9P2000 only
TCREATE, RCREATE = 114, 115      # 9P2000 only
TREAD, RREAD = 116, 117
TWRITE, RWRITE = 118, 119
TCLUNK, RCLUNK = 120, 121
TREMOVE, RREMOVE = 122, 123
TSTAT, RSTAT = 124, 125          # 9P2000 only
TWSTAT, RWSTAT = 126, 127        # 9P2000 only

# Fields of each T-message body: b u8, h u16, i u32, q u64, s string. Twalk's names
# and Twrite's data are not here (see `decode_walk` and `decode`'s Twrite note).
T_FORMATS: dict[int, str] = {
    TVERSION: "is",           # msize version
    TAUTH: "issi",            # afid uname aname n_uname
    TATTACH: "iissi",         # fid afid uname aname n_uname
    TFLUSH: "h",              # oldtag
    TREAD: "iqi",             # fid offset count
    TWRITE: "iqi",            # fid offset count (data[count] follows)
    TCLUNK: "i",              # fid
    TREMOVE: "i",             # fid
    TSTATFS: "i",             # fid
    TLOPEN: "ii",             # fid flags
    TLCREATE: "isiii",        # fid name flags mode gid
    TSYMLINK: "issi",         # fid name symtgt gid
    TMKNOD: "isiiii",         # dfid name mode major minor gid
    TRENAME: "iis",           # fid dfid name
    TREADLINK: "i",           # fid
    TGETATTR: "iq",           # fid request_mask
    TSETATTR: "iiiiiqqqqq",   # fid valid mode uid gid size atime(s,ns) mtime(s,ns)
    TXATTRWALK: "iis",        # fid newfid name
    TXATTRCREATE: "isqi",     # fid name attr_size flags
    TREADDIR: "iqi",          # fid offset count
    TLOCK: "ibiqqis",         # fid type flags start length proc_id client_id
    TGETLOCK: "ibqqis",       # fid type start length proc_id client_id
    TLINK: "iis",             # dfid fid name
    TMKDIR: "isii",           # dfid name mode gid
    TRENAMEAT: "isis",        # olddirfid oldname newdirfid newname
    TUNLINKAT: "isi",         # dirfid name flags
}

MESSAGE_NAMES: dict[int, str] = {
    value: name for name, value in globals().items()
    if name[:1] in "TR" and name[1:].isalpha() and name.isupper() and isinstance(value, int)
    and 6 <= value <= 127
}

# Qid types (the top bits of a 9P mode).
QTDIR = 0x80
QTAPPEND = 0x40
QTEXCL = 0x20
QTMOUNT = 0x10
QTAUTH = 0x08
QTTMP = 0x04
QTSYMLINK = 0x02
QTFILE = 0x00

# Tgetattr request_mask / Rgetattr valid.
GETATTR_MODE = 0x0001
GETATTR_NLINK = 0x0002
GETATTR_UID = 0x0004
GETATTR_GID = 0x0008
GETATTR_RDEV = 0x0010
GETATTR_ATIME = 0x0020
GETATTR_MTIME = 0x0040
GETATTR_CTIME = 0x0080
GETATTR_INO = 0x0100
GETATTR_SIZE = 0x0200
GETATTR_BLOCKS = 0x0400
GETATTR_BTIME = 0x0800
GETATTR_GEN = 0x1000
GETATTR_DATA_VERSION = 0x2000
GETATTR_BASIC = 0x07FF
GETATTR_ALL = 0x3FFF

# Tsetattr valid.
SETATTR_MODE = 0x0001
SETATTR_UID = 0x0002
SETATTR_GID = 0x0004
SETATTR_SIZE = 0x0008
SETATTR_ATIME = 0x0010
SETATTR_MTIME = 0x0020
SETATTR_CTIME = 0x0040
SETATTR_ATIME_SET = 0x0080
SETATTR_MTIME_SET = 0x0100

# Tlopen/Tlcreate flags (P9_DOTL_*: Linux's generic open flags, as on x86_64).
DOTL_RDONLY = 0o0
DOTL_WRONLY = 0o1
DOTL_RDWR = 0o2
DOTL_NOACCESS = 0o3
DOTL_ACCMODE = 0o3
DOTL_CREATE = 0o100
DOTL_EXCL = 0o200
DOTL_NOCTTY = 0o400
DOTL_TRUNC = 0o1000
DOTL_APPEND = 0o2000
DOTL_NONBLOCK = 0o4000
DOTL_DSYNC = 0o10000
DOTL_FASYNC = 0o20000
DOTL_DIRECT = 0o40000
DOTL_LARGEFILE = 0o100000
DOTL_DIRECTORY = 0o200000
DOTL_NOFOLLOW = 0o400000
DOTL_NOATIME = 0o1000000
DOTL_CLOEXEC = 0o2000000
DOTL_SYNC = 0o4000000

# Tunlinkat flags.
AT_REMOVEDIR = 0x200

# Tlock/Tgetlock.
LOCK_TYPE_RDLCK = 0
LOCK_TYPE_WRLCK = 1
LOCK_TYPE_UNLCK = 2
LOCK_FLAGS_BLOCK = 1
LOCK_FLAGS_RECLAIM = 2
LOCK_SUCCESS = 0
LOCK_BLOCKED = 1
LOCK_ERROR = 2
LOCK_GRACE = 3

# Txattrcreate flags (setxattr(2)'s).
XATTR_CREATE = 1
XATTR_REPLACE = 2

# Rstatfs type: what the Linux client's statfs shows for a 9p mount.
V9FS_MAGIC = 0x01021997

_SCALARS = {"b": struct.Struct("<B"), "h": struct.Struct("<H"), "i": struct.Struct("<I"),
            "q": struct.Struct("<Q")}


class ProtocolError(ValueError):
    """A message the server cannot act on. `errno` is what its Rlerror carries."""

    def __init__(self, message: str, code: int = errno.EINVAL) -> None:
        super().__init__(message)
        self.errno = code


class Qid(NamedTuple):
    """A server's unique identity for a file: type (QT*), version, path."""

    type: int
    version: int
    path: int


def pack_qid(qid: Qid) -> bytes:
    """The 13 wire bytes of `qid`."""
    return QID.pack(qid.type & 0xFF, qid.version & 0xFFFF_FFFF, qid.path & 0xFFFF_FFFF_FFFF_FFFF)


def unpack_qid(raw: bytes) -> Qid:
    """A qid from its 13 wire bytes."""
    if len(raw) != QID_LEN:
        raise ProtocolError(f"a qid is {QID_LEN} bytes, not {len(raw)}")
    return Qid(*QID.unpack(raw))


class Decoder:
    """Reads the fields of one message body, never past its end."""

    def __init__(self, data: bytes | bytearray | memoryview) -> None:
        self.data = memoryview(bytes(data))
        self.pos = 0

    def remaining(self) -> int:
        """Bytes not read yet."""
        return len(self.data) - self.pos

    def _take(self, count: int) -> memoryview:
        if count > self.remaining():
            raise ProtocolError(f"field of {count} bytes at offset {self.pos}, "
                                f"only {self.remaining()} left in the message")
        out = self.data[self.pos:self.pos + count]
        self.pos += count
        return out

    def scalar(self, code: str) -> int:
        """One little-endian unsigned field: b u8, h u16, i u32, q u64."""
        s = _SCALARS[code]
        return s.unpack(self._take(s.size))[0]

    def u8(self) -> int:
        return self.scalar("b")

    def u16(self) -> int:
        return self.scalar("h")

    def u32(self) -> int:
        return self.scalar("i")

    def u64(self) -> int:
        return self.scalar("q")

    def string(self) -> bytes:
        """A `len[2]` string's bytes (the length is checked against what is left)."""
        return bytes(self._take(self.u16()))

    def qid(self) -> Qid:
        """A 13-byte qid."""
        return unpack_qid(bytes(self._take(QID_LEN)))

    def fields(self, fmt: str) -> tuple:
        """Fields in `fmt`'s letters (b h i q s), in order."""
        return tuple(self.string() if c == "s" else self.scalar(c) for c in fmt)

    def finish(self) -> None:
        """The message must have been read to its last byte."""
        if self.remaining():
            raise ProtocolError(f"{self.remaining()} bytes after the last field")


def decode(msg_type: int, body: bytes | bytearray | memoryview) -> tuple:
    """The fields of T-message `msg_type` (see T_FORMATS), all of `body` consumed.

    Twrite: `body` is only the 16 fixed bytes (its data is moved separately).
    Tfsync: fid, datasync (0 when an older client sends only the fid).
    Twalk: see `decode_walk`."""
    if msg_type == TWALK:
        return decode_walk(body)
    d = Decoder(body)
    if msg_type == TFSYNC:
        fid = d.u32()
        datasync = d.u32() if d.remaining() else 0
        d.finish()
        return fid, datasync
    fmt = T_FORMATS.get(msg_type)
    if fmt is None:
        raise ProtocolError(f"message type {msg_type} is not a 9P2000.L request",
                            errno.EOPNOTSUPP)
    out = d.fields(fmt)
    d.finish()
    return out


def decode_walk(body: bytes | bytearray | memoryview) -> tuple[int, int, list[bytes]]:
    """Twalk: fid, newfid and at most MAX_WELEM names."""
    d = Decoder(body)
    fid, newfid, count = d.u32(), d.u32(), d.u16()
    if count > MAX_WELEM:
        raise ProtocolError(f"walk of {count} names (at most {MAX_WELEM})")
    names = [d.string() for _ in range(count)]
    d.finish()
    return fid, newfid, names


def parse_header(raw: bytes) -> tuple[int, int, int]:
    """size, type, tag of a message's first 7 bytes."""
    if len(raw) != HEADER_LEN:
        raise ProtocolError(f"a header is {HEADER_LEN} bytes, not {len(raw)}")
    return HEADER.unpack(raw)


def check_size(size: int, available: int, msize: int) -> None:
    """A header's size field against the bytes the request holds and the msize."""
    if size < HEADER_LEN:
        raise ProtocolError(f"message size {size} is below the header's {HEADER_LEN}")
    if size > available:
        raise ProtocolError(f"message size {size}, but the request holds {available} bytes")
    if size > msize:
        raise ProtocolError(f"message size {size} is over the msize {msize}", errno.EMSGSIZE)


# -- encoders ------------------------------------------------------------------------------

def _encode_fields(fmt: str, values: tuple) -> bytes:
    if len(fmt) != len(values):
        raise ValueError(f"format {fmt!r} has {len(fmt)} fields, given {len(values)}")
    out = bytearray()
    for code, value in zip(fmt, values):
        if code == "s":
            raw = value.encode() if isinstance(value, str) else bytes(value)
            if len(raw) > 0xFFFF:
                raise ProtocolError(f"a string of {len(raw)} bytes does not fit len[2]",
                                    errno.ENAMETOOLONG)
            out += _SCALARS["h"].pack(len(raw)) + raw
        elif code == "Q":
            out += pack_qid(value)
        else:
            out += _SCALARS[code].pack(value)
    return bytes(out)


def message(msg_type: int, tag: int, payload: bytes = b"") -> bytes:
    """A whole message: the header (its size counting itself) and `payload`."""
    return HEADER.pack(HEADER_LEN + len(payload), msg_type, tag) + payload


def _r(msg_type: int, tag: int, fmt: str = "", *values) -> bytes:
    return message(msg_type, tag, _encode_fields(fmt, values))


def rlerror(tag: int, ecode: int) -> bytes:
    """Rlerror: ecode[4], a Linux errno."""
    return _r(RLERROR, tag, "i", ecode)


def rversion(tag: int, msize: int, version: str) -> bytes:
    """Rversion: msize[4] version[s]."""
    return _r(RVERSION, tag, "is", msize, version)


def rauth(tag: int, aqid: Qid) -> bytes:
    """Rauth: aqid[13]."""
    return _r(RAUTH, tag, "Q", aqid)


def rattach(tag: int, qid: Qid) -> bytes:
    """Rattach: qid[13] of the root."""
    return _r(RATTACH, tag, "Q", qid)


def rflush(tag: int) -> bytes:
    """Rflush: no body."""
    return _r(RFLUSH, tag)


def rwalk(tag: int, qids: list[Qid]) -> bytes:
    """Rwalk: nwqid[2] and a qid per name walked."""
    return message(RWALK, tag, _SCALARS["h"].pack(len(qids)) + b"".join(map(pack_qid, qids)))


def rread_header(tag: int, count: int) -> bytes:
    """Rread's first 11 bytes; `count` data bytes follow (written separately)."""
    return HEADER.pack(IOHDR_LEN + count, RREAD, tag) + _SCALARS["i"].pack(count)


def rread(tag: int, data: bytes) -> bytes:
    """Rread: count[4] data[count]."""
    return rread_header(tag, len(data)) + data


def rwrite(tag: int, count: int) -> bytes:
    """Rwrite: count[4] written."""
    return _r(RWRITE, tag, "i", count)


def rclunk(tag: int) -> bytes:
    """Rclunk: no body."""
    return _r(RCLUNK, tag)


def rremove(tag: int) -> bytes:
    """Rremove: no body."""
    return _r(RREMOVE, tag)


def rstatfs(tag: int, fs_type: int, bsize: int, blocks: int, bfree: int, bavail: int,
            files: int, ffree: int, fsid: int, namelen: int) -> bytes:
    """Rstatfs: type[4] bsize[4] blocks[8] bfree[8] bavail[8] files[8] ffree[8] fsid[8]
    namelen[4]."""
    return _r(RSTATFS, tag, "iiqqqqqqi", fs_type, bsize, blocks, bfree, bavail, files, ffree,
              fsid, namelen)


def rlopen(tag: int, qid: Qid, iounit: int) -> bytes:
    """Rlopen: qid[13] iounit[4]."""
    return _r(RLOPEN, tag, "Qi", qid, iounit)


def rlcreate(tag: int, qid: Qid, iounit: int) -> bytes:
    """Rlcreate: qid[13] iounit[4]."""
    return _r(RLCREATE, tag, "Qi", qid, iounit)


def rsymlink(tag: int, qid: Qid) -> bytes:
    """Rsymlink: qid[13]."""
    return _r(RSYMLINK, tag, "Q", qid)


def rmknod(tag: int, qid: Qid) -> bytes:
    """Rmknod: qid[13]."""
    return _r(RMKNOD, tag, "Q", qid)


def rrename(tag: int) -> bytes:
    """Rrename: no body."""
    return _r(RRENAME, tag)


def rreadlink(tag: int, target: bytes) -> bytes:
    """Rreadlink: target[s]."""
    return _r(RREADLINK, tag, "s", target)


class Attr(NamedTuple):
    """Rgetattr's fields after `valid` and the qid; times are (seconds, nanoseconds)."""

    mode: int
    uid: int
    gid: int
    nlink: int
    rdev: int
    size: int
    blksize: int
    blocks: int
    atime: tuple[int, int]
    mtime: tuple[int, int]
    ctime: tuple[int, int]
    btime: tuple[int, int] = (0, 0)
    gen: int = 0
    data_version: int = 0


def rgetattr(tag: int, valid: int, qid: Qid, a: Attr) -> bytes:
    """Rgetattr: valid[8] qid[13] and `a`'s fields (u32 mode, uid, gid; u64 the rest)."""
    return _r(RGETATTR, tag, "qQiiiqqqqq" + "qq" * 4 + "qq", valid, qid, a.mode, a.uid, a.gid,
              a.nlink, a.rdev, a.size, a.blksize, a.blocks, *a.atime, *a.mtime, *a.ctime,
              *a.btime, a.gen, a.data_version)


def rsetattr(tag: int) -> bytes:
    """Rsetattr: no body."""
    return _r(RSETATTR, tag)


def rxattrwalk(tag: int, size: int) -> bytes:
    """Rxattrwalk: size[8] of the value (or the name list)."""
    return _r(RXATTRWALK, tag, "q", size)


def rxattrcreate(tag: int) -> bytes:
    """Rxattrcreate: no body."""
    return _r(RXATTRCREATE, tag)


def dirent(qid: Qid, offset: int, d_type: int, name: bytes) -> bytes:
    """One Rreaddir entry: qid[13] offset[8] type[1] name[s]."""
    return _encode_fields("Qqbs", (qid, offset, d_type, name))


def dirent_len(name: bytes) -> int:
    """The wire size of a `dirent` named `name`."""
    return QID_LEN + 8 + 1 + 2 + len(name)


def rreaddir(tag: int, data: bytes) -> bytes:
    """Rreaddir: count[4] and `data`, a run of `dirent`s."""
    return message(RREADDIR, tag, _SCALARS["i"].pack(len(data)) + data)


def rfsync(tag: int) -> bytes:
    """Rfsync: no body."""
    return _r(RFSYNC, tag)


def rlock(tag: int, status: int) -> bytes:
    """Rlock: status[1]."""
    return _r(RLOCK, tag, "b", status)


def rgetlock(tag: int, lock_type: int, start: int, length: int, proc_id: int,
             client_id: bytes) -> bytes:
    """Rgetlock: type[1] start[8] length[8] proc_id[4] client_id[s]."""
    return _r(RGETLOCK, tag, "bqqis", lock_type, start, length, proc_id, client_id)


def rlink(tag: int) -> bytes:
    """Rlink: no body."""
    return _r(RLINK, tag)


def rmkdir(tag: int, qid: Qid) -> bytes:
    """Rmkdir: qid[13]."""
    return _r(RMKDIR, tag, "Q", qid)


def rrenameat(tag: int) -> bytes:
    """Rrenameat: no body."""
    return _r(RRENAMEAT, tag)


def runlinkat(tag: int) -> bytes:
    """Runlinkat: no body."""
    return _r(RUNLINKAT, tag)


def tmessage(msg_type: int, tag: int, *values) -> bytes:
    """A T-message from its fields in T_FORMATS order (Twalk: fid, newfid, names;
    Twrite: fid, offset, data; Tfsync: fid, datasync). For clients and tests."""
    if msg_type == TWALK:
        fid, newfid, names = values
        return message(msg_type, tag, _encode_fields("iih", (fid, newfid, len(names)))
                       + b"".join(_encode_fields("s", (n,)) for n in names))
    if msg_type == TWRITE:
        fid, offset, data = values
        return message(msg_type, tag, _encode_fields("iqi", (fid, offset, len(data))) + data)
    if msg_type == TFSYNC:
        return message(msg_type, tag, _encode_fields("ii", values))
    return message(msg_type, tag, _encode_fields(T_FORMATS[msg_type], values))
