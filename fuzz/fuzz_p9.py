"""Fuzz target: the 9P2000.L server (crosvm/p9/server.py) fed requests by a hostile guest.

Each input gets a server over a fresh small tree (a file, a directory, a fifo, and
symlinks leading out of it, relative and absolute) next to an `outside` directory the
guest must never reach. The guest sends a few messages: mostly plausible ones (a
known type, fids from a small set, names from a list that includes '..', '/', '.',
empty and over-long ones, flags, modes and offsets from interesting values or
anywhere), sometimes raw bytes; size fields may lie and messages may be cut short;
requests and replies are split over several descriptors, and reply buffers can be of
any size, an error's 11 bytes or less included.

Invariants: nothing escapes `handle`; it writes no more than the writable buffers
hold; with a readable header and room for an Rlerror a reply always comes, framed
(its size field is the length written), with the request's tag and a type that is
Rlerror or the request's own R-type (nothing at all otherwise); an Rread's count is
what follows it; nothing outside the share changes (the outside directory's names,
a file's bytes, mode, owner, times and xattrs); after `close` the server holds no fd,
and has given every fd back to its budget (a small one, often reached: ENFILE).
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
from crosvm.devices.virtio.fs.fdbudget import FdBudget
from crosvm.devices.virtio.fs.idmap import IdMap
from crosvm.devices.virtio.fs.reopen import open_proc_self_fd
from crosvm.devices.virtio.queue import DescriptorChain
from crosvm.p9 import protocol as P
from crosvm.p9.server import P9Server

from fuzz import guest

NAMES = [b"f", b"d", b"g", b"..", b".", b"out", b"abs", b"fifo", b"new", b"a/b", b"",
         b"x" * 256, b"secret", b"outside", b"sock", b"suid", b"user.x",
         b"system.posix_acl_access", b"trusted.x", b"security.capability"]
SUID_DATA = b"#!/bin/sh\n"
TYPES = sorted(P.T_FORMATS) + [P.TWALK, P.TFSYNC]
U32_VALUES = [0, 1, 2, 3, 4, 5, P.NOFID, 0o100644, 0o40755, 0o10600, 0o20666, 0o4755,
              P.DOTL_RDWR | P.DOTL_TRUNC, P.DOTL_WRONLY | P.DOTL_APPEND, P.AT_REMOVEDIR,
              P.SETATTR_SIZE | P.SETATTR_MODE, 0x1FF, 4096, 0xFFFF]
U64_VALUES = [0, 1, 2, 5, 4096, 1 << 40, (1 << 63) - 1, 1 << 63, (1 << 64) - 1]
# Which u32 fields are fids (by position in T_FORMATS; the first one for the rest).
FID_FIELDS = {P.TVERSION: (), P.TXATTRWALK: (0, 1), P.TLINK: (0, 1), P.TRENAME: (0, 1),
              P.TRENAMEAT: (0, 2), P.TATTACH: (0, 1)}
REQUEST_AT = 0x1000     # readable pieces from here
REPLY_AT = 0x20000      # writable pieces from here, up to the first RAM region's end
_dirs: dict[str, str] = {}


def _base() -> str:
    """A directory made once per process: `share` (rebuilt per input) and `outside`."""
    if not _dirs:
        base = tempfile.mkdtemp(prefix="crosvm-fuzz-p9-")
        atexit.register(shutil.rmtree, base, True)
        os.mkdir(os.path.join(base, "outside"))
        with open(os.path.join(base, "outside", "secret"), "wb") as f:
            f.write(b"not for the guest")
        _dirs["base"] = base
    return _dirs["base"]


def _outside_state(base: str) -> tuple:
    out = os.path.join(base, "outside")
    secret = os.path.join(out, "secret")
    st = os.lstat(secret)
    with open(secret, "rb") as f:
        data = f.read()
    return (sorted(os.listdir(base)), sorted(os.listdir(out)), data, st.st_mode, st.st_uid,
            st.st_gid, st.st_mtime_ns, st.st_nlink, sorted(os.listxattr(secret)))


def _remove_tree(path: str) -> None:
    """rmtree, after giving back the permissions a guest may have taken away."""
    if not os.path.lexists(path):
        return
    os.chmod(path, 0o700)
    for top, dirs, _ in os.walk(path):  # top-down: a directory is opened after its chmod
        for d in dirs:
            p = os.path.join(top, d)
            if not os.path.islink(p):
                os.chmod(p, 0o700)
    shutil.rmtree(path)


def _make_share(base: str) -> str:
    share = os.path.join(base, "share")
    _remove_tree(share)
    os.mkdir(share)
    with open(os.path.join(share, "f"), "wb") as f:
        f.write(b"0123456789" * 50)
    os.mkdir(os.path.join(share, "d"))
    with open(os.path.join(share, "d", "g"), "wb") as f:
        f.write(b"g")
    os.mkfifo(os.path.join(share, "fifo"))
    os.mknod(os.path.join(share, "sock"), stat.S_IFSOCK | 0o600)
    suid = os.path.join(share, "suid")  # a setuid program the host keeps in the share
    with open(suid, "wb") as f:
        f.write(SUID_DATA)
    os.chmod(suid, 0o6755)
    os.symlink("../outside", os.path.join(share, "out"))
    os.symlink(os.path.join(base, "outside", "secret"), os.path.join(share, "abs"))
    return share


def _setid_files(share: str, planted: tuple[int, int]) -> list[str]:
    """Non-directories in the share with S_ISUID (or S_ISGID and group-execute) that
    are not the planted program, unchanged."""
    bad = []
    for top, dirs, files in os.walk(share):
        for name in files + [d for d in dirs if os.path.islink(os.path.join(top, d))]:
            path = os.path.join(top, name)
            st = os.lstat(path)
            setid = st.st_mode & stat.S_ISUID or (
                st.st_mode & stat.S_ISGID and st.st_mode & stat.S_IXGRP)
            if not setid or stat.S_ISDIR(st.st_mode):
                continue
            with open(path, "rb") as f:
                same = (st.st_dev, st.st_ino) == planted and f.read() == SUID_DATA
            if not same:
                bad.append(path)
    return bad


def _u32(fdp: atheris.FuzzedDataProvider) -> int:
    if fdp.ConsumeIntInRange(0, 3):
        return U32_VALUES[fdp.ConsumeIntInRange(0, len(U32_VALUES) - 1)]
    return fdp.ConsumeIntInRange(0, 0xFFFF_FFFF)


def _u64(fdp: atheris.FuzzedDataProvider) -> int:
    if fdp.ConsumeIntInRange(0, 3):
        return U64_VALUES[fdp.ConsumeIntInRange(0, len(U64_VALUES) - 1)]
    return fdp.ConsumeIntInRange(0, (1 << 64) - 1)


def _name(fdp: atheris.FuzzedDataProvider) -> bytes:
    if fdp.ConsumeIntInRange(0, 7):
        return NAMES[fdp.ConsumeIntInRange(0, len(NAMES) - 1)]
    return fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 300))


def _fid(fdp: atheris.FuzzedDataProvider) -> int:
    """Mostly one of the few fids a session uses (the attach is fid 0)."""
    pick = fdp.ConsumeIntInRange(0, 15)
    return 0 if pick < 8 else pick - 7 if pick < 12 else _u32(fdp)


def _fields(fdp: atheris.FuzzedDataProvider, fmt: str, fids: tuple[int, ...] = (0,)) -> bytes:
    out = bytearray()
    for i, code in enumerate(fmt):
        if code == "i" and i in fids:
            out += struct.pack("<I", _fid(fdp))
        elif code == "s":
            raw = _name(fdp)
            out += struct.pack("<H", len(raw)) + raw
        elif code == "i":
            out += struct.pack("<I", _u32(fdp))
        elif code == "q":
            out += struct.pack("<Q", _u64(fdp))
        elif code == "h":
            out += struct.pack("<H", fdp.ConsumeIntInRange(0, 0xFFFF))
        else:
            out += struct.pack("<B", fdp.ConsumeIntInRange(0, 3))
    return bytes(out)


def _request(fdp: atheris.FuzzedDataProvider) -> bytes:
    """One message: plausible fields for a known type, or raw bytes; sizes that lie."""
    tag = fdp.ConsumeIntInRange(0, 0xFFFF)
    if fdp.ConsumeIntInRange(0, 15) == 0:
        return fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 64))
    msg_type = TYPES[fdp.ConsumeIntInRange(0, len(TYPES) - 1)] if fdp.ConsumeIntInRange(0, 15) \
        else fdp.ConsumeIntInRange(0, 255)
    if msg_type == P.TWALK:
        names = [_name(fdp) for _ in range(fdp.ConsumeIntInRange(0, 17))]
        body = struct.pack("<IIH", _fid(fdp), _fid(fdp), len(names)) + b"".join(
            struct.pack("<H", len(n)) + n for n in names)
    elif msg_type == P.TWRITE:
        data = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 600))
        count = len(data) if fdp.ConsumeIntInRange(0, 3) else _u32(fdp)
        body = struct.pack("<IQI", _fid(fdp), _u64(fdp), count) + data
    elif msg_type == P.TVERSION and fdp.ConsumeBool():
        body = struct.pack("<I", fdp.ConsumeIntInRange(0, 1 << 20)) + _fields_s(b"9P2000.L")
    else:
        body = _fields(fdp, P.T_FORMATS.get(msg_type, "ii"), FID_FIELDS.get(msg_type, (0,)))
    if fdp.ConsumeIntInRange(0, 15) == 0:
        body += fdp.ConsumeBytes(fdp.ConsumeIntInRange(1, 8))  # trailing bytes
    size = P.HEADER_LEN + len(body)
    if fdp.ConsumeIntInRange(0, 15) == 0:
        size = fdp.ConsumeIntInRange(0, 0xFFFF_FFFF)
    raw = struct.pack("<IBH", size, msg_type, tag) + body
    if fdp.ConsumeIntInRange(0, 15) == 0:
        raw = raw[:fdp.ConsumeIntInRange(0, len(raw))]
    return raw


def _fields_s(value: bytes) -> bytes:
    return struct.pack("<H", len(value)) + value


def _split(fdp: atheris.FuzzedDataProvider, total: int) -> list[int]:
    """`total` bytes as 1-3 non-empty pieces (or none for 0)."""
    sizes = []
    while total > 0 and len(sizes) < 2 and fdp.ConsumeBool():
        n = fdp.ConsumeIntInRange(1, total)
        sizes.append(n)
        total -= n
    if total:
        sizes.append(total)
    return sizes


def _serve(fdp, server: P9Server, mem, request: bytes) -> None:
    readable, addr = [], REQUEST_AT
    start = 0
    for n in _split(fdp, len(request)):
        mem.write(addr, request[start:start + n])
        readable.append((addr, n))
        start += n
        addr += n + fdp.ConsumeIntInRange(0, 64)
    if fdp.ConsumeIntInRange(0, 3):
        reply_len = 0x2000
    else:
        reply_len = fdp.ConsumeIntInRange(0, 0x12000)
    writable, addr = [], REPLY_AT
    for n in _split(fdp, reply_len):
        writable.append((addr, n))
        addr += n
    chain = DescriptorChain(0, readable, writable)
    n = server.handle(Reader(mem, chain), Writer(mem, chain))
    assert 0 <= n <= reply_len, f"wrote {n} bytes into {reply_len}"
    if len(request) < P.HEADER_LEN or reply_len < P.RLERROR_LEN:
        assert n == 0, f"a reply of {n} bytes to what cannot be answered"
        return
    assert n >= P.HEADER_LEN, f"no reply ({n} bytes) to a readable header"
    reply = guest.gather(mem, writable, n)
    size, rtype, tag = P.HEADER.unpack(reply[:P.HEADER_LEN])
    req_type, req_tag = request[4], struct.unpack_from("<H", request, 5)[0]
    assert size == n, f"reply size field {size}, {n} bytes written"
    assert tag == req_tag, f"reply tag {tag} to request tag {req_tag}"
    assert rtype in (P.RLERROR, req_type + 1), f"reply type {rtype} to request type {req_type}"
    if rtype == P.RLERROR:
        assert n == P.RLERROR_LEN, f"an Rlerror of {n} bytes"
    if rtype == P.RREAD:
        count = struct.unpack_from("<I", reply, P.HEADER_LEN)[0]
        assert count + P.IOHDR_LEN == n, f"Rread count {count} in {n} bytes"
    assert n <= server.msize, f"a reply of {n} bytes over the msize {server.msize}"


def one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    base = _base()
    share = _make_share(base)
    outside = _outside_state(base)
    planted = os.lstat(os.path.join(share, "suid"))
    mem = guest.clean_memory()
    fds = set(os.listdir("/proc/self/fd"))
    root_fd = os.open(share, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    proc_fd = open_proc_self_fd()
    server = None
    budget = FdBudget(limit=fdp.ConsumeIntInRange(1, 24))
    try:
        server = P9Server(root_fd, proc_fd, IdMap.parse(f"0 {os.getuid()} 1000"),
                          IdMap.parse(f"0 {os.getgid()} 1000"),
                          max_msize=fdp.ConsumeIntInRange(P.MIN_MSIZE, 0x10000),
                          max_fids=fdp.ConsumeIntInRange(1, 8), budget=budget)
        if fdp.ConsumeIntInRange(0, 7):  # mostly a mounted session, as the client starts
            _serve(fdp, server, mem, P.tmessage(P.TVERSION, P.NOTAG, 0x10000, b"9P2000.L"))
            _serve(fdp, server, mem, P.tmessage(P.TATTACH, 1, 0, P.NOFID, b"", b"", 0))
        for _ in range(fdp.ConsumeIntInRange(1, 12)):
            _serve(fdp, server, mem, _request(fdp))
            assert budget.held <= budget.limit, f"{budget.held} fds over a budget of {budget.limit}"
        server.close()
        server = None
    finally:
        if server is not None:
            server.close()
        os.close(root_fd)
        os.close(proc_fd)
    assert set(os.listdir("/proc/self/fd")) == fds, "the server left fds open"
    assert budget.held == 0, f"{budget.held} fds not given back to the budget"
    bad = _setid_files(share, (planted.st_dev, planted.st_ino))
    assert not bad, f"setuid/setgid files the guest made or wrote: {bad}"
    assert _outside_state(base) == outside, "something outside the share changed"
    mode = os.lstat(share).st_mode
    assert stat.S_ISDIR(mode), "the share's root is no longer a directory"
