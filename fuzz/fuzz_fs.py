"""Fuzz target: the virtio-fs FUSE passthrough server (crosvm/devices/virtio/fs/
passthrough.py) on a small shared directory, driven by a hostile guest.

Each input makes a share in /dev/shm (a file, a directory, a fifo, a symlink to a
sentinel file outside the share, a symlink to the share's parent) next to that
sentinel, then sends up to 24 requests: any opcode (mostly known ones, sometimes
INIT again or none at all), a nodeid or fh the server handed out or any other value,
argument structs of plausible fields with one from anywhere now and then, names from
a hostile list ('..', 'a/b', 300 bytes, no NUL, the symlinks' names), lying len
fields, raw bytes; each request split over up to three readable buffers, with a reply
buffer of any size (smaller than a header too). The server's answers feed the ids of
later requests.

Invariants: `handle` never raises; FORGET/BATCH_FORGET/INTERRUPT are never answered;
any other request is answered (unless its reply buffer cannot hold a header) with an
out header whose len is what was written, fits the buffer, echoes the request's
unique, and carries 0 or a negative errno (and nothing else with an error); nothing
outside the share changes (the sentinel's bytes and mode, its directory's listing);
the share holds no set-id file (but set-gid directories), no device node and no
socket; the server holds no more than MAX_HANDLES handles, nor more fds than its fd
budget (a small one, 4 to 40, so that the ENFILE paths run too), and every fd it holds
between requests is counted there; after `close` the process has the fds it had
before and the budget is back to 0.
"""

from __future__ import annotations

import atexit
import os
import shutil
import stat
import struct
import tempfile

import atheris

from crosvm.devices.virtio.descriptor_utils import Reader, Writer
from crosvm.devices.virtio.fs import fuse as F
from crosvm.devices.virtio.fs import passthrough as PT
from crosvm.devices.virtio.fs.fdbudget import FdBudget
from crosvm.devices.virtio.fs.idmap import IdMap
from crosvm.devices.virtio.fs.reopen import open_proc_self_fd
from crosvm.devices.virtio.queue import DescriptorChain

from fuzz import guest

SHM = "/dev/shm" if os.path.isdir("/dev/shm") else None
SENTINEL = b"outside the share\n"
NAMES = [b"f", b"d", b"p", b"out", b"up", b"new", b"g", b"..", b".", b"a/b", b"", b"x" * 300,
         b"user.k", b"system.posix_acl_access", b"security.capability", b"F"]
OPCODES = sorted(F.OP_NAMES)
REQUEST_AT = 0x1000      # readable buffers from here
REPLY_AT = 0x20000       # writable buffers from here (RAM is [0, 0x40000) and a hole)
MAX_REPLY = 0x1F000
U32, U64 = (1 << 32) - 1, (1 << 64) - 1
_dir: str | None = None


class Finding(BaseException):
    """An invariant broke."""


def expect(ok: bool, message) -> None:
    if not ok:
        raise Finding(message() if callable(message) else message)


def _base() -> str:
    """A directory made once per process; each input's share and sentinel go in it."""
    global _dir
    if _dir is None:
        _dir = tempfile.mkdtemp(prefix="crosvm-fuzz-fs-", dir=SHM)
        atexit.register(shutil.rmtree, _dir, True)
    return _dir


def _make_share(top: str) -> str:
    os.mkdir(top)
    share = os.path.join(top, "share")
    os.mkdir(share)
    sentinel = os.path.join(top, "sentinel")
    with open(sentinel, "wb") as f:
        f.write(SENTINEL)
    os.chmod(sentinel, 0o644)
    with open(os.path.join(share, "f"), "wb") as f:
        f.write(bytes(range(256)) * 8)
    os.mkdir(os.path.join(share, "d"))
    os.mkfifo(os.path.join(share, "p"))
    os.symlink(sentinel, os.path.join(share, "out"))
    os.symlink("..", os.path.join(share, "up"))
    return share


class Guest:
    """Builds requests from fuzzer bytes, remembering the ids the server gave."""

    def __init__(self, fdp: atheris.FuzzedDataProvider) -> None:
        self.fdp = fdp
        self.nodeids = [F.ROOT_ID]
        self.fhs = [0]
        self.unique = 0

    def pick(self, known: list[int]) -> int:
        if self.fdp.ConsumeIntInRange(0, 7):
            return known[self.fdp.ConsumeIntInRange(0, len(known) - 1)]
        return self.fdp.ConsumeIntInRange(0, U64)

    def u32(self, small: int = 16) -> int:
        return self.fdp.ConsumeIntInRange(0, small) if self.fdp.ConsumeIntInRange(0, 7) else \
            self.fdp.ConsumeIntInRange(0, U32)

    def u64(self, small: int = 8192) -> int:
        return self.fdp.ConsumeIntInRange(0, small) if self.fdp.ConsumeIntInRange(0, 7) else \
            self.fdp.ConsumeIntInRange(0, U64)

    def name(self) -> bytes:
        if self.fdp.ConsumeIntInRange(0, 15) == 0:
            return self.fdp.ConsumeBytes(self.fdp.ConsumeIntInRange(0, 12))  # maybe no NUL
        return NAMES[self.fdp.ConsumeIntInRange(0, len(NAMES) - 1)] + b"\0"

    def mode(self) -> int:
        kinds = [stat.S_IFREG, stat.S_IFIFO, stat.S_IFDIR, stat.S_IFCHR, stat.S_IFBLK,
                 stat.S_IFSOCK, stat.S_IFLNK, 0]
        return kinds[self.fdp.ConsumeIntInRange(0, len(kinds) - 1)] | self.fdp.ConsumeIntInRange(0, 0o7777)

    def args(self, opcode: int) -> bytes:
        fdp, fh = self.fdp, (lambda: self.pick(self.fhs))
        if opcode == F.INIT:
            return F.INIT_IN.pack(7 if fdp.ConsumeIntInRange(0, 7) else self.u32(),
                                  fdp.ConsumeIntInRange(25, 40), self.u32(1 << 20), self.u32(U32))
        if opcode in (F.LOOKUP, F.UNLINK, F.RMDIR, F.REMOVEXATTR):
            return self.name()
        if opcode == F.FORGET:
            return F.FORGET_IN.pack(self.u64(3))
        if opcode == F.BATCH_FORGET:
            n = fdp.ConsumeIntInRange(0, 4)
            return F.BATCH_FORGET_IN.pack(n if fdp.ConsumeBool() else self.u32(), 0) + b"".join(
                F.FORGET_ONE.pack(self.pick(self.nodeids), self.u64(3)) for _ in range(n))
        if opcode == F.GETATTR:
            return F.GETATTR_IN.pack(fdp.ConsumeIntInRange(0, 1), 0, fh())
        if opcode == F.SETATTR:
            return F.SETATTR_IN.pack(self.u32(0xFFF), 0, fh(), self.u64(), 0, self.u64(),
                                     self.u64(), 0, self.u32(10**9), self.u32(10**9), 0,
                                     self.mode(), 0, self.u32(70000), self.u32(70000), 0)
        if opcode == F.SYMLINK:
            return self.name() + self.name()
        if opcode == F.MKNOD:
            return F.MKNOD_IN.pack(self.mode(), self.u32(), self.u32(0o777), 0) + self.name()
        if opcode == F.MKDIR:
            return F.MKDIR_IN.pack(self.mode(), self.u32(0o777)) + self.name()
        if opcode in (F.RENAME, F.RENAME2):
            head = F.RENAME_IN.pack(self.pick(self.nodeids)) if opcode == F.RENAME else \
                F.RENAME2_IN.pack(self.pick(self.nodeids), self.u32(7), 0)
            return head + self.name() + self.name()
        if opcode == F.LINK:
            return F.LINK_IN.pack(self.pick(self.nodeids)) + self.name()
        if opcode in (F.OPEN, F.OPENDIR):
            return F.OPEN_IN.pack(self.u32(0o7777777), 0)
        if opcode == F.CREATE:
            return F.CREATE_IN.pack(self.u32(0o7777777), self.mode(), self.u32(0o777), 0) + self.name()
        if opcode in (F.READ, F.READDIR, F.READDIRPLUS):
            return F.READ_IN.pack(fh(), self.u64(), self.u32(1 << 16), 0, 0, 0, 0)
        if opcode == F.WRITE:
            data = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 512))
            size = len(data) if fdp.ConsumeIntInRange(0, 3) else self.u32(1 << 12)
            return F.WRITE_IN.pack(fh(), self.u64(), size, self.u32(7), 0, 0, 0) + data
        if opcode in (F.RELEASE, F.RELEASEDIR, F.FLUSH):
            return F.RELEASE_IN.pack(fh(), 0, 0, 0)
        if opcode in (F.FSYNC, F.FSYNCDIR):
            return F.FSYNC_IN.pack(fh(), self.u32(1), 0)
        if opcode in (F.GETXATTR, F.LISTXATTR):
            return F.GETXATTR_IN.pack(self.u32(1 << 17), 0) + (self.name() if opcode == F.GETXATTR else b"")
        if opcode == F.SETXATTR:
            value = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 64))
            size = len(value) if fdp.ConsumeIntInRange(0, 3) else self.u32(1 << 17)
            return F.SETXATTR_IN.pack(size, self.u32(3)) + self.name() + value
        if opcode == F.ACCESS:
            return F.ACCESS_IN.pack(self.u32(7), 0)
        if opcode == F.FALLOCATE:
            return F.FALLOCATE_IN.pack(fh(), self.u64(), self.u64(), self.u32(0x7F), 0)
        if opcode == F.LSEEK:
            return F.LSEEK_IN.pack(fh(), self.u64(), self.u32(5), 0)
        return fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 64))

    def request(self) -> tuple[bytes, int | None, int]:
        """Bytes for the readable buffers, the opcode, the unique."""
        fdp = self.fdp
        if fdp.ConsumeIntInRange(0, 31) == 0:
            raw = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 64))
            if len(raw) < F.IN_HEADER.size:
                return raw, None, 0
            return raw, struct.unpack_from("<I", raw, 4)[0], struct.unpack_from("<Q", raw, 8)[0]
        if fdp.ConsumeIntInRange(0, 15):
            opcode = OPCODES[fdp.ConsumeIntInRange(0, len(OPCODES) - 1)]
        else:
            opcode = fdp.ConsumeIntInRange(0, U32)
        body = self.args(opcode)
        length = F.IN_HEADER.size + len(body)
        if fdp.ConsumeIntInRange(0, 7) == 0:
            length = fdp.ConsumeIntInRange(0, U32)
        self.unique += 1
        hdr = F.InHeader(length, opcode, self.unique, self.pick(self.nodeids),
                         self.u32(70000), self.u32(70000), 1)
        return hdr.pack() + body, opcode, self.unique

    def learn(self, opcode: int, reply: bytes) -> None:
        """Remember the nodeids and fhs a successful reply hands out."""
        body = reply[F.OUT_HEADER.size:]
        if opcode in (F.LOOKUP, F.MKNOD, F.MKDIR, F.SYMLINK, F.LINK, F.CREATE) and \
                len(body) >= F.ENTRY_OUT.size:
            self.nodeids.append(F.ENTRY_OUT.unpack_from(body)[0])
        if opcode in (F.OPEN, F.OPENDIR) and len(body) >= F.OPEN_OUT.size:
            self.fhs.append(F.OPEN_OUT.unpack_from(body)[0])
        if opcode == F.CREATE and len(body) >= F.ENTRY_OUT.size + F.OPEN_OUT.size:
            self.fhs.append(F.OPEN_OUT.unpack_from(body, F.ENTRY_OUT.size)[0])


def _split(fdp: atheris.FuzzedDataProvider, start: int, total: int) -> list[tuple[int, int]]:
    """`total` bytes from `start` as up to three non-empty buffers."""
    regions, addr = [], start
    for i in range(fdp.ConsumeIntInRange(1, 3)):
        n = total if i == 2 else fdp.ConsumeIntInRange(0, total)
        if n:
            regions.append((addr, n))
            addr += n + 16  # a gap, so buffers are not one piece
            total -= n
        if not total:
            break
    if total:
        regions.append((addr, total))
    return regions


def one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    mem = guest.clean_memory()
    top = tempfile.mkdtemp(dir=_base())
    os.rmdir(top)
    share = _make_share(top)
    fds_before = len(os.listdir("/proc/self/fd"))
    root_fd = os.open(share, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    proc_fd = open_proc_self_fd()
    options = PT.FsOptions(cache=["never", "auto", "always"][fdp.ConsumeIntInRange(0, 2)],
                           negative_timeout=float(fdp.ConsumeIntInRange(0, 1)),
                           writeback=fdp.ConsumeBool(), posix_acl=fdp.ConsumeBool(),
                           ascii_casefold=fdp.ConsumeBool())
    ids = IdMap.parse(f"0 {os.getuid()} 1, 1000 100000 1")  # 1000: another host id
    budget = FdBudget(limit=fdp.ConsumeIntInRange(4, 40))
    fs = PT.PassthroughFs(root_fd, proc_fd, options, ids, ids, budget)
    try:
        g = Guest(fdp)
        if fdp.ConsumeIntInRange(0, 15):
            _send(fs, mem, fdp, g, F.InHeader(F.IN_HEADER.size + 64, F.INIT, 0, 0, 0, 0, 0).pack()
                  + F.INIT_IN.pack(7, 38, 1 << 17, U32) + bytes(48), F.INIT, 0, 4096)
        for _ in range(fdp.ConsumeIntInRange(1, 24)):
            request, opcode, unique = g.request()
            reply_len = fdp.ConsumeIntInRange(0, 64) if fdp.ConsumeIntInRange(0, 7) == 0 else \
                fdp.ConsumeIntInRange(F.OUT_HEADER.size, 0x3000)
            _send(fs, mem, fdp, g, request, opcode, unique, reply_len)
            expect(fs.handle_count() <= PT.MAX_HANDLES, "handles beyond the bound")
            expect(budget.held <= budget.limit, "fds beyond the budget")
            held = len(os.listdir("/proc/self/fd")) - fds_before - 2  # root_fd, proc_fd
            expect(held == budget.held, lambda: f"{held} fds held, {budget.held} counted")
    finally:
        fs.close()
        os.close(root_fd)
        os.close(proc_fd)
    try:
        expect(len(os.listdir("/proc/self/fd")) == fds_before, "fds left open after close")
        expect(budget.held == 0, f"{budget.held} fds still counted in the budget after close")
        _check_contained(top, share)
    finally:
        shutil.rmtree(top, ignore_errors=True)


def _send(fs, mem, fdp, g: Guest, request: bytes, opcode: int | None, unique: int,
          reply_len: int) -> None:
    readable = _split(fdp, REQUEST_AT, len(request)) if request else []
    writable = _split(fdp, REPLY_AT, reply_len) if reply_len else []
    pos = 0
    for addr, n in readable:
        mem.write(addr, request[pos:pos + n])
        pos += n
    for addr, n in writable:
        mem.write(addr, bytes(n))
    chain = DescriptorChain(0, readable, writable)
    written = fs.handle(Reader(mem, chain), Writer(mem, chain))
    if opcode in F.NO_REPLY and len(request) >= F.IN_HEADER.size:
        expect(written == 0, f"{F.OP_NAMES[opcode]} answered with {written} bytes")
        return
    if reply_len < F.OUT_HEADER.size:
        expect(written == 0, f"{written} bytes written into a {reply_len}-byte buffer")
        return
    expect(F.OUT_HEADER.size <= written <= reply_len,
           f"{written} bytes written, the buffer holds {reply_len}")
    reply = guest.gather(mem, writable, written)
    length, error, got_unique = F.OUT_HEADER.unpack_from(reply)
    expect(length == written, f"out header says {length}, {written} written")
    expect(got_unique == unique or len(request) < F.IN_HEADER.size,
           f"unique {got_unique} answers {unique}")
    expect(-4095 <= error <= 0 and (error == 0 or written == F.OUT_HEADER.size),
           f"error {error} with {written} bytes")
    if error == 0 and opcode is not None:
        g.learn(opcode, reply)


def _check_contained(top: str, share: str) -> None:
    sentinel = os.path.join(top, "sentinel")
    expect(sorted(os.listdir(top)) == ["sentinel", "share"],
           lambda: f"the share's parent now holds {sorted(os.listdir(top))}")
    st = os.lstat(sentinel)
    expect(stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o644,
           f"the sentinel outside the share changed mode: {st.st_mode:o}")
    with open(sentinel, "rb") as f:
        expect(f.read() == SENTINEL, "the sentinel outside the share changed")
    for dirpath, dirnames, filenames in os.walk(share):
        for name in dirnames + filenames:
            mode = os.lstat(os.path.join(dirpath, name)).st_mode
            expect(not (stat.S_ISCHR(mode) or stat.S_ISBLK(mode) or stat.S_ISSOCK(mode)),
                   f"{name!r} in the share is a device or socket ({mode:o})")
            expect(not mode & stat.S_ISUID and not (mode & stat.S_ISGID and not stat.S_ISDIR(mode)),
                   f"{name!r} in the share is set-id ({mode:o})")

