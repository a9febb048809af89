"""The 9P2000.L server (crosvm/p9) against a real directory, through descriptor chains
in guest memory, as the virtio-9p device would drive it; and its wire codec."""

from __future__ import annotations

import errno
import os
import stat
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from crosvm.devices.virtio.descriptor_utils import Reader, Writer
from crosvm.devices.virtio.fs.fdbudget import PROCESS_BUDGET, FdBudget
from crosvm.devices.virtio.fs.idmap import OVERFLOW_ID, IdMap
from crosvm.devices.virtio.fs.reopen import open_proc_self_fd
from crosvm.devices.virtio.queue import DescriptorChain
from crosvm.p9 import protocol as P
from crosvm.p9.server import P9Server
from crosvm.vm_memory import GuestMemory
from tests.support.chains import chain_io

ROOT = 1     # the attached fid
TAG = 7
MSIZE = 64 * 1024
IS_ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not IS_ROOT, reason="chown to another id needs root")
# Without CAP_FSETID the kernel itself clears setuid on a write: only as root does a
# test of the server's own clearing tell anything.
needs_fsetid = pytest.mark.skipif(not IS_ROOT, reason="the kernel clears setuid for non-root")
needs_mknod = pytest.mark.skipif(not IS_ROOT, reason="the kernel refuses device nodes to non-root")
needs_sys_admin = pytest.mark.skipif(not IS_ROOT, reason="trusted.* xattrs need CAP_SYS_ADMIN")


class Client:
    """Sends one T-message per chain to a P9Server and returns the reply's type and body.
    Asserts nothing: tests look at what comes back."""

    def __init__(self, server: P9Server, mem: GuestMemory) -> None:
        self.server = server
        self.mem = mem

    def raw(self, request: bytes, reply_len: int = MSIZE) -> bytes:
        reader, writer, addr = chain_io(self.mem, request, reply_len)
        n = self.server.handle(reader, writer)
        return self.mem.read(addr, n)

    def call(self, msg_type: int, *fields, reply_len: int = MSIZE) -> tuple[int, P.Decoder]:
        reply = self.raw(P.tmessage(msg_type, TAG, *fields), reply_len)
        _size, rtype, _tag = P.parse_header(reply[:P.HEADER_LEN])
        return rtype, P.Decoder(reply[P.HEADER_LEN:])

    def error(self, msg_type: int, *fields) -> int | None:
        """The Rlerror errno of a request, or None if it succeeded."""
        rtype, body = self.call(msg_type, *fields)
        return body.u32() if rtype == P.RLERROR else None

    def walk(self, fid: int, newfid: int, *names: bytes) -> tuple[int, P.Decoder]:
        return self.call(P.TWALK, fid, newfid, [*names])

    def qids(self, fid: int, newfid: int, *names: bytes) -> list[P.Qid]:
        rtype, body = self.walk(fid, newfid, *names)
        if rtype != P.RWALK:
            return []
        return [body.qid() for _ in range(body.u16())]

    def read(self, fid: int, offset: int, count: int, reply_len: int = MSIZE) -> bytes:
        rtype, body = self.call(P.TREAD, fid, offset, count, reply_len=reply_len)
        return body.data[4:].tobytes() if rtype == P.RREAD else b"<error>"

    def getattr(self, fid: int) -> tuple[P.Qid, P.Attr]:
        rtype, body = self.call(P.TGETATTR, fid, P.GETATTR_ALL)
        _valid, qid = body.u64(), body.qid()
        f = body.fields("iii" + "q" * 15)
        return qid, P.Attr(*f[:8], (f[8], f[9]), (f[10], f[11]), (f[12], f[13]),
                           (f[14], f[15]), f[16], f[17])


class Share:
    """A shared directory, the server over it and guest memory for the chains."""

    def __init__(self, path, uid_map: IdMap | None = None, gid_map: IdMap | None = None,
                 **kw) -> None:
        self.path = path
        path.mkdir()
        self.root_fd = os.open(path, os.O_PATH | os.O_DIRECTORY)
        self.proc_fd = open_proc_self_fd()
        self.mem = GuestMemory([(0, 8 << 20)])
        self.server = P9Server(self.root_fd, self.proc_fd, uid_map or IdMap.identity(),
                               gid_map or IdMap.identity(), **kw)
        self.client = Client(self.server, self.mem)

    def mount(self, n_uname: int = 0) -> Client:
        """Tversion and Tattach of fid ROOT, as the Linux client starts."""
        self.client.call(P.TVERSION, MSIZE, b"9P2000.L")
        self.client.call(P.TATTACH, ROOT, P.NOFID, b"root", b"", n_uname)
        return self.client

    def close(self) -> None:
        self.server.close()
        os.close(self.root_fd)
        os.close(self.proc_fd)
        self.mem.close()


@pytest.fixture
def share(tmp_path):
    s = Share(tmp_path / "share")
    yield s
    s.close()


@pytest.fixture
def c(share) -> Client:
    return share.mount()


def _open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


# -- the codec --------------------------------------------------------------------------------

def test_qid_packs_to_13_little_endian_bytes():
    raw = P.pack_qid(P.Qid(P.QTDIR, 1, 0x0102030405060708))

    assert raw == b"\x80\x01\x00\x00\x00\x08\x07\x06\x05\x04\x03\x02\x01"


def test_rlerror_is_11_bytes_with_the_errno():
    assert P.rlerror(3, errno.ENOENT) == struct.pack("<IBHI", 11, P.RLERROR, 3, errno.ENOENT)


def test_decode_string_longer_than_the_message_raises():
    body = struct.pack("<IIH", 1, 2, 50) + b"abc"  # Txattrwalk: a 50-byte name holding 3

    with pytest.raises(P.ProtocolError):
        P.decode(P.TXATTRWALK, body)


def test_decode_short_field_raises():
    with pytest.raises(P.ProtocolError):
        P.decode(P.TGETATTR, struct.pack("<IH", 1, 0))  # request_mask cut short


def test_decode_trailing_bytes_raise():
    with pytest.raises(P.ProtocolError):
        P.decode(P.TCLUNK, struct.pack("<II", 1, 2))


def test_decode_walk_of_17_names_raises():
    body = struct.pack("<IIH", 1, 2, 17) + struct.pack("<H", 1) * 17 + b""

    with pytest.raises(P.ProtocolError):
        P.decode(P.TWALK, body)


def test_decode_9p2000_only_type_raises_eopnotsupp():
    with pytest.raises(P.ProtocolError) as e:
        P.decode(P.TSTAT, struct.pack("<I", 1))

    assert e.value.errno == errno.EOPNOTSUPP


def test_check_size_over_msize_is_emsgsize():
    with pytest.raises(P.ProtocolError) as e:
        P.check_size(5000, 8192, 4096)

    assert e.value.errno == errno.EMSGSIZE


# -- version and attach -------------------------------------------------------------------------

def test_reply_carries_its_length_and_the_requests_tag(c):
    reply = c.raw(P.tmessage(P.TGETATTR, 0x1234, ROOT, P.GETATTR_ALL))

    assert (P.parse_header(reply[:P.HEADER_LEN]), len(reply)) == ((160, P.RGETATTR, 0x1234), 160)


def test_version_negotiates_the_smaller_msize(share):
    rtype, body = share.client.call(P.TVERSION, 1 << 20, b"9P2000.L")

    assert (rtype, body.u32(), body.string()) == (P.RVERSION, 512 * 1024, b"9P2000.L")


def test_version_keeps_a_client_msize_below_the_maximum(share):
    rtype, body = share.client.call(P.TVERSION, 8192, b"9P2000.L")

    assert (rtype, body.u32()) == (P.RVERSION, 8192)


def test_version_below_4096_is_refused(share):
    assert share.client.error(P.TVERSION, 1024, b"9P2000.L") == errno.EINVAL


def test_version_9p2000u_is_answered_unknown(share):
    rtype, body = share.client.call(P.TVERSION, MSIZE, b"9P2000.u")

    assert (rtype, body.u32(), body.string()) == (P.RVERSION, MSIZE, b"unknown")


def test_version_clunks_every_fid(c):
    c.call(P.TVERSION, MSIZE, b"9P2000.L")

    assert c.error(P.TGETATTR, ROOT, P.GETATTR_ALL) == errno.EBADF


def test_attach_gives_the_roots_directory_qid(share):
    share.client.call(P.TVERSION, MSIZE, b"9P2000.L")

    rtype, body = share.client.call(P.TATTACH, ROOT, P.NOFID, b"u", b"", 0)

    assert (rtype, body.qid()) == (P.RATTACH, P.Qid(P.QTDIR, 0, os.stat(share.path).st_ino))


def test_attach_to_a_fid_in_use_is_eexist(c):
    assert c.error(P.TATTACH, ROOT, P.NOFID, b"u", b"", 0) == errno.EEXIST


def test_auth_is_refused(share):
    assert share.client.error(P.TAUTH, 5, b"u", b"", 0) == errno.EOPNOTSUPP


# -- walk -------------------------------------------------------------------------------------

def test_walk_to_a_file_gives_its_qid(share, c):
    (share.path / "f").write_bytes(b"x")

    assert c.qids(ROOT, 2, b"f") == [P.Qid(P.QTFILE, 0, os.stat(share.path / "f").st_ino)]


def test_walk_of_no_names_clones_the_fid(c):
    c.walk(ROOT, 2)

    assert c.getattr(2)[0].type == P.QTDIR


def test_walk_partial_returns_the_qids_before_the_missing_name(share, c):
    (share.path / "d").mkdir()

    qids = c.qids(ROOT, 2, b"d", b"missing", b"x")

    assert [q.type for q in qids] == [P.QTDIR]


def test_walk_partial_does_not_create_newfid(share, c):
    (share.path / "d").mkdir()
    c.walk(ROOT, 2, b"d", b"missing")

    assert c.error(P.TGETATTR, 2, P.GETATTR_ALL) == errno.EBADF


def test_walk_first_name_missing_is_enoent(c):
    rtype, body = c.walk(ROOT, 2, b"missing")

    assert (rtype, body.u32()) == (P.RLERROR, errno.ENOENT)


def test_walk_to_same_fid_moves_it(share, c):
    (share.path / "d").mkdir()
    c.walk(ROOT, 2)

    c.walk(2, 2, b"d")

    assert c.getattr(2)[0].path == os.stat(share.path / "d").st_ino


def test_walk_dotdot_at_root_stays_at_root(share, c):
    qids = c.qids(ROOT, 2, b"..", b"..")

    assert [q.path for q in qids] == [os.stat(share.path).st_ino] * 2


def test_walk_dotdot_from_a_subdirectory_reaches_the_root(share, c):
    (share.path / "a" / "b").mkdir(parents=True)

    qids = c.qids(ROOT, 2, b"a", b"b", b"..", b"..")

    assert qids[-1].path == os.stat(share.path).st_ino


def test_walk_dotdot_from_a_directory_moved_out_of_the_share_is_eacces(share, c, tmp_path):
    (share.path / "a" / "b").mkdir(parents=True)
    c.walk(ROOT, 2, b"a", b"b")
    os.rename(share.path / "a", tmp_path / "outside")  # the host moves it away

    rtype, body = c.walk(2, 3, b"..")

    assert (rtype, body.u32()) == (P.RLERROR, errno.EACCES)


@pytest.mark.parametrize("name", [b"a/b", b"", b".", b"a\0b"], ids=["slash", "empty", "dot", "nul"])
def test_walk_name_that_is_not_one_component_is_einval(share, c, name):
    (share.path / "a").mkdir()
    (share.path / "a" / "b").write_bytes(b"")

    rtype, body = c.walk(ROOT, 2, name)

    assert (rtype, body.u32()) == (P.RLERROR, errno.EINVAL)


def test_walk_of_17_names_is_einval(share, c):
    assert c.error(P.TWALK, ROOT, 2, [b"a"] * 17) == errno.EINVAL


def test_walk_to_a_newfid_in_use_is_eexist(c):
    c.walk(ROOT, 2)

    assert c.error(P.TWALK, ROOT, 2, []) == errno.EEXIST


def test_walk_into_a_host_symlink_gives_a_symlink_qid(share, c):
    os.symlink("/etc/passwd", share.path / "passwd")

    assert [q.type for q in c.qids(ROOT, 2, b"passwd")] == [P.QTSYMLINK]


def test_lopen_of_a_symlink_to_etc_passwd_fails(share, c):
    os.symlink("/etc/passwd", share.path / "passwd")
    c.walk(ROOT, 2, b"passwd")

    assert c.error(P.TLOPEN, 2, P.DOTL_RDONLY) == errno.ELOOP


def test_walk_through_a_symlink_to_etc_stops_at_the_symlink(share, c):
    os.symlink("/etc", share.path / "etc")

    qids = c.qids(ROOT, 2, b"etc", b"passwd")

    assert [q.type for q in qids] == [P.QTSYMLINK]


def test_fid_limit_is_enforced(tmp_path):
    s = Share(tmp_path / "share", max_fids=2)
    try:
        c = s.mount()
        c.walk(ROOT, 2)

        assert c.error(P.TWALK, ROOT, 3, []) == errno.EMFILE
    finally:
        s.close()


# -- read and write -------------------------------------------------------------------------------

def test_read_returns_the_files_bytes(share, c):
    (share.path / "f").write_bytes(b"hello, world")
    c.walk(ROOT, 2, b"f")
    c.call(P.TLOPEN, 2, P.DOTL_RDONLY)

    assert c.read(2, 7, 100) == b"world"


def test_read_before_lopen_is_ebadf(share, c):
    (share.path / "f").write_bytes(b"hello")
    c.walk(ROOT, 2, b"f")

    assert c.error(P.TREAD, 2, 0, 5) == errno.EBADF


def test_read_count_is_clamped_to_msize(share):
    (share.path / "big").write_bytes(bytes(range(256)) * 64)
    c = share.client
    c.call(P.TVERSION, 4096, b"9P2000.L")
    c.call(P.TATTACH, ROOT, P.NOFID, b"u", b"", 0)
    c.walk(ROOT, 2, b"big")
    c.call(P.TLOPEN, 2, P.DOTL_RDONLY)

    assert len(c.read(2, 0, 1 << 20)) == 4096 - 11


def test_read_count_is_clamped_to_the_writer(share, c):
    (share.path / "big").write_bytes(b"z" * 10000)
    c.walk(ROOT, 2, b"big")
    c.call(P.TLOPEN, 2, P.DOTL_RDONLY)

    assert len(c.read(2, 0, 10000, reply_len=1000)) == 1000 - 11


def test_write_then_read_back(share, c):
    (share.path / "f").write_bytes(b"")
    c.walk(ROOT, 2, b"f")
    c.call(P.TLOPEN, 2, P.DOTL_RDWR)

    rtype, body = c.call(P.TWRITE, 2, 3, b"abc")

    assert (rtype, body.u32(), c.read(2, 0, 10)) == (P.RWRITE, 3, b"\0\0\0abc")


def test_write_split_over_descriptors_reaches_the_file(share, c):
    (share.path / "f").write_bytes(b"")
    c.walk(ROOT, 2, b"f")
    c.call(P.TLOPEN, 2, P.DOTL_WRONLY)
    msg = P.tmessage(P.TWRITE, TAG, 2, 0, b"0123456789" * 1000)
    # The Linux client's zero-copy layout: the 23-byte header, then data pages.
    pieces = [(0x1000, 23), (0x3000, 4096), (0x6000, len(msg) - 23 - 4096)]
    start = 0
    for addr, n in pieces:
        share.mem.write(addr, msg[start:start + n])
        start += n
    chain = DescriptorChain(0, pieces, [(0x10000, 64)])

    share.server.handle(Reader(share.mem, chain), Writer(share.mem, chain))

    assert (share.path / "f").read_bytes() == b"0123456789" * 1000


def test_write_count_beyond_the_data_is_clamped_to_the_data(share, c):
    (share.path / "f").write_bytes(b"")
    c.walk(ROOT, 2, b"f")
    c.call(P.TLOPEN, 2, P.DOTL_WRONLY)
    msg = bytearray(P.tmessage(P.TWRITE, TAG, 2, 0, b"abcd"))
    struct.pack_into("<I", msg, P.HEADER_LEN + 12, 1 << 20)  # count says 1 MiB

    reply = c.raw(bytes(msg))

    assert (reply[4], reply[7:11], (share.path / "f").read_bytes()) == (
        P.RWRITE, struct.pack("<I", 4), b"abcd")


def test_write_to_a_file_opened_read_only_is_ebadf(share, c):
    (share.path / "f").write_bytes(b"")
    c.walk(ROOT, 2, b"f")
    c.call(P.TLOPEN, 2, P.DOTL_RDONLY)

    assert c.error(P.TWRITE, 2, 0, b"x") == errno.EBADF


def test_lopen_with_trunc_empties_the_file(share, c):
    (share.path / "f").write_bytes(b"old contents")
    c.walk(ROOT, 2, b"f")

    c.call(P.TLOPEN, 2, P.DOTL_WRONLY | P.DOTL_TRUNC)

    assert (share.path / "f").read_bytes() == b""


def test_lopen_of_a_fifo_is_eperm_without_blocking(share, c):
    os.mkfifo(share.path / "fifo")
    c.walk(ROOT, 2, b"fifo")

    assert c.error(P.TLOPEN, 2, P.DOTL_RDONLY) == errno.EPERM


def test_lopen_twice_is_einval(share, c):
    (share.path / "f").write_bytes(b"")
    c.walk(ROOT, 2, b"f")
    c.call(P.TLOPEN, 2, P.DOTL_RDONLY)

    assert c.error(P.TLOPEN, 2, P.DOTL_RDONLY) == errno.EINVAL


# -- creating and removing ------------------------------------------------------------------------

def test_lcreate_makes_the_file_with_the_exact_mode(share, c):
    c.walk(ROOT, 2)

    c.call(P.TLCREATE, 2, b"new", P.DOTL_RDWR, 0o640, 0)

    assert stat.S_IMODE(os.stat(share.path / "new").st_mode) == 0o640


def test_lcreate_leaves_the_fid_open_on_the_new_file(share, c):
    c.walk(ROOT, 2)
    c.call(P.TLCREATE, 2, b"new", P.DOTL_RDWR, 0o600, 0)

    c.call(P.TWRITE, 2, 0, b"data")

    assert (share.path / "new").read_bytes() == b"data"


def test_lcreate_strips_setuid_and_setgid(share, c):
    c.walk(ROOT, 2)

    c.call(P.TLCREATE, 2, b"new", P.DOTL_RDWR, 0o6755, 0)

    assert stat.S_IMODE(os.stat(share.path / "new").st_mode) == 0o755


def test_lcreate_over_an_existing_name_is_eexist(share, c):
    os.symlink("/etc/passwd", share.path / "x")
    c.walk(ROOT, 2)

    assert c.error(P.TLCREATE, 2, b"x", P.DOTL_RDWR, 0o600, 0) == errno.EEXIST


def test_mkdir_makes_a_directory_on_the_host(share, c):
    rtype, body = c.call(P.TMKDIR, ROOT, b"sub", 0o750, 0)

    assert (rtype, body.qid().type, stat.S_IMODE(os.stat(share.path / "sub").st_mode)) == (
        P.RMKDIR, P.QTDIR, 0o750)


def test_mkdir_in_a_setgid_directory_keeps_the_inherited_setgid(share, c):
    (share.path / "d").mkdir()
    os.chmod(share.path / "d", 0o2775)
    c.walk(ROOT, 2, b"d")

    c.call(P.TMKDIR, 2, b"sub", 0o755, os.getgid())

    assert stat.S_IMODE(os.stat(share.path / "d" / "sub").st_mode) == 0o2755


def test_mknod_makes_a_fifo_on_the_host(share, c):
    c.call(P.TMKNOD, ROOT, b"fifo", stat.S_IFIFO | 0o600, 0, 0, 0)

    assert stat.S_ISFIFO(os.lstat(share.path / "fifo").st_mode)


@pytest.mark.parametrize("kind", [pytest.param(stat.S_IFCHR, marks=needs_mknod, id="chr"),
                                  pytest.param(stat.S_IFBLK, marks=needs_mknod, id="blk"),
                                  pytest.param(stat.S_IFSOCK, id="sock")])
def test_mknod_of_anything_but_a_file_or_fifo_is_eperm(share, c, kind):
    err = c.error(P.TMKNOD, ROOT, b"dev", kind | 0o666, 1, 3, 0)

    assert (err, os.path.lexists(share.path / "dev")) == (errno.EPERM, False)


def test_mknod_strips_setuid_and_setgid(share, c):
    c.call(P.TMKNOD, ROOT, b"f", stat.S_IFREG | 0o6644, 0, 0, 0)

    assert stat.S_IMODE(os.stat(share.path / "f").st_mode) == 0o644


def test_mkdir_strips_setuid_and_keeps_setgid(share, c):
    c.call(P.TMKDIR, ROOT, b"d", 0o6755, 0)

    assert stat.S_IMODE(os.stat(share.path / "d").st_mode) == 0o2755


def test_symlink_makes_a_link_whose_target_readlink_returns(share, c):
    c.call(P.TSYMLINK, ROOT, b"ln", b"../../etc/shadow", 0)
    c.walk(ROOT, 2, b"ln")

    rtype, body = c.call(P.TREADLINK, 2)

    assert (rtype, body.string(), os.readlink(share.path / "ln")) == (
        P.RREADLINK, b"../../etc/shadow", "../../etc/shadow")


def test_readlink_of_a_file_is_einval(share, c):
    (share.path / "f").write_bytes(b"")
    c.walk(ROOT, 2, b"f")

    assert c.error(P.TREADLINK, 2) == errno.EINVAL


def test_link_makes_a_second_name(share, c):
    (share.path / "f").write_bytes(b"x")
    c.walk(ROOT, 2, b"f")

    c.call(P.TLINK, ROOT, 2, b"g")

    assert os.stat(share.path / "g").st_ino == os.stat(share.path / "f").st_ino


def test_renameat_moves_the_file_on_the_host(share, c):
    (share.path / "f").write_bytes(b"x")
    (share.path / "d").mkdir()
    c.walk(ROOT, 2, b"d")

    c.call(P.TRENAMEAT, ROOT, b"f", 2, b"g")

    assert (os.path.exists(share.path / "f"), (share.path / "d" / "g").read_bytes()) == (
        False, b"x")


def test_renameat_to_a_name_with_a_slash_is_einval(share, c):
    (share.path / "f").write_bytes(b"x")

    assert c.error(P.TRENAMEAT, ROOT, b"f", ROOT, b"../escaped") == errno.EINVAL


def test_unlinkat_removes_a_file(share, c):
    (share.path / "f").write_bytes(b"x")

    c.call(P.TUNLINKAT, ROOT, b"f", 0)

    assert not os.path.exists(share.path / "f")


def test_unlinkat_removedir_removes_a_directory(share, c):
    (share.path / "d").mkdir()

    c.call(P.TUNLINKAT, ROOT, b"d", P.AT_REMOVEDIR)

    assert not os.path.exists(share.path / "d")


def test_unlinkat_of_a_directory_without_removedir_fails(share, c):
    (share.path / "d").mkdir()

    assert c.error(P.TUNLINKAT, ROOT, b"d", 0) in (errno.EISDIR, errno.EPERM)


def test_remove_clunks_the_fid_even_though_it_is_not_supported(share, c):
    c.walk(ROOT, 2)
    c.call(P.TREMOVE, 2)

    assert c.error(P.TCLUNK, 2) == errno.EBADF


# -- attributes -----------------------------------------------------------------------------

def test_getattr_reports_mode_and_size(share, c):
    (share.path / "f").write_bytes(b"12345")
    os.chmod(share.path / "f", 0o604)
    c.walk(ROOT, 2, b"f")

    _, attr = c.getattr(2)

    assert (attr.mode, attr.size) == (stat.S_IFREG | 0o604, 5)


def test_setattr_size_truncates(share, c):
    (share.path / "f").write_bytes(b"12345")
    c.walk(ROOT, 2, b"f")

    c.call(P.TSETATTR, 2, P.SETATTR_SIZE, 0, 0, 0, 2, 0, 0, 0, 0)

    assert (share.path / "f").read_bytes() == b"12"


def test_setattr_mode_changes_permissions(share, c):
    (share.path / "f").write_bytes(b"")
    c.walk(ROOT, 2, b"f")

    c.call(P.TSETATTR, 2, P.SETATTR_MODE, 0o4711, 0, 0, 0, 0, 0, 0, 0)

    assert stat.S_IMODE(os.stat(share.path / "f").st_mode) == 0o711  # setuid stripped


def test_setattr_mode_strips_setgid_from_a_file(share, c):
    (share.path / "f").write_bytes(b"")
    c.walk(ROOT, 2, b"f")

    c.call(P.TSETATTR, 2, P.SETATTR_MODE, 0o2755, 0, 0, 0, 0, 0, 0, 0)

    assert stat.S_IMODE(os.stat(share.path / "f").st_mode) == 0o755


def test_setattr_mode_keeps_setgid_on_a_directory(share, c):
    (share.path / "d").mkdir()
    c.walk(ROOT, 2, b"d")

    c.call(P.TSETATTR, 2, P.SETATTR_MODE, 0o2750, 0, 0, 0, 0, 0, 0, 0)

    assert stat.S_IMODE(os.stat(share.path / "d").st_mode) == 0o2750


@needs_fsetid
def test_write_clears_setuid_and_setgid_of_a_host_file(share, c):
    (share.path / "f").write_bytes(b"#!/bin/sh\n")
    os.chmod(share.path / "f", 0o6755)
    c.walk(ROOT, 2, b"f")
    c.call(P.TLOPEN, 2, P.DOTL_WRONLY)

    c.call(P.TWRITE, 2, 0, b"#!/bin/sh -x")

    assert stat.S_IMODE(os.stat(share.path / "f").st_mode) == 0o755


@needs_fsetid
def test_write_keeps_setgid_without_group_execute(share, c):
    (share.path / "f").write_bytes(b"")
    os.chmod(share.path / "f", 0o2640)  # not a setgid program: a mandatory-lock mark
    c.walk(ROOT, 2, b"f")
    c.call(P.TLOPEN, 2, P.DOTL_WRONLY)

    c.call(P.TWRITE, 2, 0, b"x")

    assert stat.S_IMODE(os.stat(share.path / "f").st_mode) == 0o2640


def test_write_through_a_read_only_fid_keeps_setuid(share, c):
    (share.path / "f").write_bytes(b"")
    os.chmod(share.path / "f", 0o4755)
    c.walk(ROOT, 2, b"f")
    c.call(P.TLOPEN, 2, P.DOTL_RDONLY)

    err = c.error(P.TWRITE, 2, 0, b"x")

    assert (err, stat.S_IMODE(os.stat(share.path / "f").st_mode)) == (errno.EBADF, 0o4755)


@needs_fsetid
def test_setattr_size_clears_setuid_of_a_host_file(share, c):
    (share.path / "f").write_bytes(b"12345")
    os.chmod(share.path / "f", 0o4755)
    c.walk(ROOT, 2, b"f")

    c.call(P.TSETATTR, 2, P.SETATTR_SIZE, 0, 0, 0, 1, 0, 0, 0, 0)

    assert stat.S_IMODE(os.stat(share.path / "f").st_mode) == 0o755


@needs_fsetid
def test_lopen_with_trunc_clears_setuid_of_a_host_file(share, c):
    (share.path / "f").write_bytes(b"12345")
    os.chmod(share.path / "f", 0o4755)
    c.walk(ROOT, 2, b"f")

    c.call(P.TLOPEN, 2, P.DOTL_WRONLY | P.DOTL_TRUNC)

    assert stat.S_IMODE(os.stat(share.path / "f").st_mode) == 0o755


def test_lopen_for_reading_keeps_setuid(share, c):
    (share.path / "f").write_bytes(b"")
    os.chmod(share.path / "f", 0o4755)
    c.walk(ROOT, 2, b"f")

    c.call(P.TLOPEN, 2, P.DOTL_RDWR)

    assert stat.S_IMODE(os.stat(share.path / "f").st_mode) == 0o4755


def test_getattr_of_a_file_deleted_on_the_host_reports_no_links(share, c):
    (share.path / "f").write_bytes(b"12345")
    c.walk(ROOT, 2, b"f")
    os.unlink(share.path / "f")

    _, attr = c.getattr(2)

    assert (attr.nlink, attr.size) == (0, 5)


def test_setattr_mtime_set_sets_that_time(share, c):
    (share.path / "f").write_bytes(b"")
    c.walk(ROOT, 2, b"f")

    c.call(P.TSETATTR, 2, P.SETATTR_MTIME | P.SETATTR_MTIME_SET, 0, 0, 0, 0, 0, 0, 1234, 5)

    assert os.stat(share.path / "f").st_mtime_ns == 1234 * 10**9 + 5


def test_setattr_atime_now_leaves_mtime(share, c):
    (share.path / "f").write_bytes(b"")
    os.utime(share.path / "f", ns=(10**9, 2 * 10**9))
    c.walk(ROOT, 2, b"f")

    c.call(P.TSETATTR, 2, P.SETATTR_ATIME, 0, 0, 0, 0, 0, 0, 0, 0)

    st_ = os.stat(share.path / "f")
    assert (st_.st_atime_ns > 2 * 10**9, st_.st_mtime_ns) == (True, 2 * 10**9)


def test_statfs_reports_the_hosts_counts(share, c):
    rtype, body = c.call(P.TSTATFS, ROOT)

    fields = body.fields("iiqqqqqqi")
    assert (rtype, fields[0], fields[1], fields[2], fields[8]) == (
        P.RSTATFS, P.V9FS_MAGIC, os.statvfs(share.path).f_frsize, os.statvfs(share.path).f_blocks,
        os.statvfs(share.path).f_namemax)


def test_fsync_of_an_open_file_succeeds(share, c):
    (share.path / "f").write_bytes(b"")
    c.walk(ROOT, 2, b"f")
    c.call(P.TLOPEN, 2, P.DOTL_WRONLY)

    assert c.error(P.TFSYNC, 2, 0) is None


def test_lock_reports_success(share, c):
    c.walk(ROOT, 2)

    rtype, body = c.call(P.TLOCK, 2, P.LOCK_TYPE_WRLCK, 0, 0, 0, 42, b"guest")

    assert (rtype, body.u8()) == (P.RLOCK, P.LOCK_SUCCESS)


def test_getlock_reports_unlocked(share, c):
    rtype, body = c.call(P.TGETLOCK, ROOT, P.LOCK_TYPE_RDLCK, 5, 10, 42, b"guest")

    assert (rtype, body.fields("bqqis")) == (P.RGETLOCK, (P.LOCK_TYPE_UNLCK, 5, 10, 42, b"guest"))


def test_flush_answers_rflush(c):
    rtype, _ = c.call(P.TFLUSH, 3)

    assert rtype == P.RFLUSH


# -- readdir ---------------------------------------------------------------------------------------

def _readdir_all(c: Client, fid: int, count: int) -> tuple[list[bytes], int]:
    """Every entry name, reading from each reply's last offset, and the call count."""
    names, offset, calls = [], 0, 0
    while True:
        rtype, body = c.call(P.TREADDIR, fid, offset, count)
        calls += 1
        if rtype != P.RREADDIR or body.u32() == 0:
            return names, calls
        while body.remaining():
            _qid, offset, _type, name = body.qid(), body.u64(), body.u8(), body.string()
            names.append(name)


def _dirent_names(body: P.Decoder) -> list[bytes]:
    """The names in an Rreaddir's body."""
    body.u32()
    names = []
    while body.remaining():
        body.qid(), body.u64(), body.u8()
        names.append(body.string())
    return names


def test_readdir_lists_1000_files_across_several_calls(share, c):
    for i in range(1000):
        (share.path / f"file{i:04}").write_bytes(b"")
    c.walk(ROOT, 2)
    c.call(P.TLOPEN, 2, P.DOTL_RDONLY)

    names, calls = _readdir_all(c, 2, 4096)

    assert (sorted(names), calls > 5) == (
        sorted([b".", b".."] + [f"file{i:04}".encode() for i in range(1000)]), True)


def test_readdir_from_an_earlier_offset_repeats_entries(share, c):
    for name in "abc":
        (share.path / name).write_bytes(b"")
    c.walk(ROOT, 2)
    c.call(P.TLOPEN, 2, P.DOTL_RDONLY)
    first, _ = _readdir_all(c, 2, 4096)

    again, _ = _readdir_all(c, 2, 4096)

    assert again == first


def test_readdir_entry_types_follow_the_files(share, c):
    (share.path / "d").mkdir()
    os.symlink("d", share.path / "l")
    c.walk(ROOT, 2)
    c.call(P.TLOPEN, 2, P.DOTL_RDONLY)
    _, body = c.call(P.TREADDIR, 2, 2, 4096)  # after '.' and '..'
    body.u32()

    types = {}
    while body.remaining():
        qid, _off, d_type, name = body.qid(), body.u64(), body.u8(), body.string()
        types[name] = (qid.type, d_type)

    assert types == {b"d": (P.QTDIR, 4), b"l": (P.QTSYMLINK, 10)}


def test_readdir_of_an_unopened_fid_is_ebadf(c):
    assert c.error(P.TREADDIR, ROOT, 0, 4096) == errno.EBADF


# -- xattrs ----------------------------------------------------------------------------------------

def _set_xattr(c: Client, fid: int, name: bytes, value: bytes) -> int | None:
    """Txattrcreate, Twrite, Tclunk on a clone of `fid`: the clunk's error or None."""
    c.walk(fid, 50)
    c.call(P.TXATTRCREATE, 50, name, len(value), 0)
    if value:
        c.call(P.TWRITE, 50, 0, value)
    return c.error(P.TCLUNK, 50)


def test_xattr_set_through_a_fid_is_on_the_host(share, c):
    (share.path / "f").write_bytes(b"")
    c.walk(ROOT, 2, b"f")

    _set_xattr(c, 2, b"user.color", b"blue")

    assert os.getxattr(share.path / "f", "user.color") == b"blue"


def test_xattrwalk_reads_a_value(share, c):
    (share.path / "f").write_bytes(b"")
    os.setxattr(share.path / "f", "user.color", b"green")
    c.walk(ROOT, 2, b"f")

    rtype, body = c.call(P.TXATTRWALK, 2, 3, b"user.color")

    assert (rtype, body.u64(), c.read(3, 0, 100)) == (P.RXATTRWALK, 5, b"green")


def test_xattrwalk_with_an_empty_name_lists_the_names(share, c):
    (share.path / "f").write_bytes(b"")
    os.setxattr(share.path / "f", "user.a", b"1")
    os.setxattr(share.path / "f", "user.b", b"2")
    c.walk(ROOT, 2, b"f")
    c.call(P.TXATTRWALK, 2, 3, b"")

    listing = c.read(3, 0, 1000)

    assert sorted(listing.split(b"\0")[:-1]) == [b"user.a", b"user.b"]


def test_xattrwalk_of_a_missing_name_is_enodata(share, c):
    (share.path / "f").write_bytes(b"")
    c.walk(ROOT, 2, b"f")

    assert c.error(P.TXATTRWALK, 2, 3, b"user.none") == errno.ENODATA


def test_xattr_size_zero_with_replace_removes_it(share, c):
    (share.path / "f").write_bytes(b"")
    os.setxattr(share.path / "f", "user.gone", b"1")
    c.walk(ROOT, 2, b"f")
    c.walk(2, 3)
    c.call(P.TXATTRCREATE, 3, b"user.gone", 0, P.XATTR_REPLACE)

    c.call(P.TCLUNK, 3)

    assert os.listxattr(share.path / "f") == []


def test_xattrcreate_over_64k_is_e2big(share, c):
    assert c.error(P.TXATTRCREATE, ROOT, b"user.big", (64 << 10) + 1, 0) == errno.E2BIG


@pytest.mark.parametrize("name", [b"security.capability", b"security.selinux",
                                  b"trusted.overlay.redirect", b"system.nfs4_acl",
                                  b"btrfs.compression"],
                         ids=["capability", "selinux", "trusted", "system", "btrfs"])
def test_xattrcreate_of_a_host_reserved_xattr_is_eperm(share, c, name):
    (share.path / "f").write_bytes(b"")
    c.walk(ROOT, 2, b"f")

    assert c.error(P.TXATTRCREATE, 2, name, 4, 0) == errno.EPERM


@needs_sys_admin
def test_xattr_removal_of_a_trusted_xattr_is_eperm_and_keeps_it(share, c):
    (share.path / "f").write_bytes(b"")
    os.setxattr(share.path / "f", "trusted.keep", b"1")
    c.walk(ROOT, 2, b"f")

    err = c.error(P.TXATTRCREATE, 2, b"trusted.keep", 0, P.XATTR_REPLACE)
    c.call(P.TCLUNK, 2)

    assert (err, os.listxattr(share.path / "f")) == (errno.EPERM, ["trusted.keep"])


def test_xattrwalk_can_read_a_trusted_xattr_the_guest_cannot_set(share, c):
    (share.path / "f").write_bytes(b"")
    try:
        os.setxattr(share.path / "f", "trusted.seen", b"yes")
    except PermissionError:
        pytest.skip("trusted.* xattrs need CAP_SYS_ADMIN")
    c.walk(ROOT, 2, b"f")

    c.call(P.TXATTRWALK, 2, 3, b"trusted.seen")

    assert c.read(3, 0, 100) == b"yes"


def test_posix_acl_ids_are_translated_to_the_host(tmp_path):
    s = Share(tmp_path / "share", IdMap.parse(f"5000 {os.getuid()} 1"),
              IdMap.parse(f"5000 {os.getgid()} 1"))
    try:
        c = s.mount(n_uname=5000)
        (s.path / "f").write_bytes(b"")
        c.walk(ROOT, 2, b"f")
        # user::rw-, user:5000:r--, group::r--, mask::r--, other::---
        acl = struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *e) for e in [
            (0x01, 6, 0xFFFF_FFFF), (0x02, 4, 5000), (0x04, 4, 0xFFFF_FFFF),
            (0x10, 4, 0xFFFF_FFFF), (0x20, 0, 0xFFFF_FFFF)])

        err = _set_xattr(c, 2, b"system.posix_acl_access", acl)
        if err == errno.EOPNOTSUPP:
            pytest.skip("no POSIX ACLs on this filesystem")

        host = os.getxattr(s.path / "f", "system.posix_acl_access")
        assert struct.unpack_from("<HHI", host, 4 + 8) == (0x02, 4, os.getuid())
    finally:
        s.close()


def test_xattr_value_not_completely_written_fails_at_clunk(share, c):
    (share.path / "f").write_bytes(b"")
    c.walk(ROOT, 2, b"f")
    c.walk(2, 3)
    c.call(P.TXATTRCREATE, 3, b"user.half", 10, 0)
    c.call(P.TWRITE, 3, 0, b"12345")

    assert (c.error(P.TCLUNK, 3), os.listxattr(share.path / "f")) == (errno.EINVAL, [])


# -- uid/gid maps ---------------------------------------------------------------------------------

@pytest.fixture
def mapped(tmp_path):
    """A share whose guest id 5000 is the test's own uid/gid on the host."""
    s = Share(tmp_path / "share", IdMap.parse(f"5000 {os.getuid()} 1"),
              IdMap.parse(f"5000 {os.getgid()} 1"))
    yield s
    s.close()


def test_getattr_maps_the_host_owner_to_the_guest(mapped):
    c = mapped.mount(n_uname=5000)

    _, attr = c.getattr(ROOT)

    assert (attr.uid, attr.gid) == (5000, 5000)


def test_getattr_of_an_unmapped_owner_is_the_overflow_id(tmp_path):
    s = Share(tmp_path / "share", IdMap.parse(f"0 {os.getuid() + 1} 1"),
              IdMap.parse(f"0 {os.getgid() + 1} 1"))
    try:
        _, attr = s.mount().getattr(ROOT)

        assert (attr.uid, attr.gid) == (OVERFLOW_ID, OVERFLOW_ID)
    finally:
        s.close()


def test_setattr_to_an_unmapped_uid_is_einval(mapped):
    c = mapped.mount(n_uname=5000)

    assert c.error(P.TSETATTR, ROOT, P.SETATTR_UID, 0, 1234, 0, 0, 0, 0, 0, 0) == errno.EINVAL


@needs_root
def test_lcreate_gives_the_file_the_attach_uid_and_message_gid_through_the_maps(tmp_path):
    s = Share(tmp_path / "share", IdMap.parse("5000 1234 1"), IdMap.parse("6000 4321 1"))
    try:
        c = s.mount(n_uname=5000)
        c.walk(ROOT, 2)

        c.call(P.TLCREATE, 2, b"new", P.DOTL_RDWR, 0o644, 6000)

        st_ = os.stat(s.path / "new")
        assert (st_.st_uid, st_.st_gid) == (1234, 4321)
    finally:
        s.close()


@needs_root
def test_mkdir_with_an_unmapped_gid_keeps_the_servers_gid(tmp_path):
    s = Share(tmp_path / "share", IdMap.parse("5000 1234 1"), IdMap.parse("6000 4321 1"))
    try:
        c = s.mount(n_uname=5000)

        c.call(P.TMKDIR, ROOT, b"d", 0o755, 7)

        st_ = os.stat(s.path / "d")
        assert (st_.st_uid, st_.st_gid) == (1234, os.getegid())
    finally:
        s.close()


@needs_root
def test_setattr_uid_translates_guest_to_host(tmp_path):
    s = Share(tmp_path / "share", IdMap.parse("5000 1234 1"), IdMap.parse("6000 4321 1"))
    try:
        c = s.mount()
        (s.path / "f").write_bytes(b"")
        c.walk(ROOT, 2, b"f")

        c.call(P.TSETATTR, 2, P.SETATTR_UID | P.SETATTR_GID, 0, 5000, 6000, 0, 0, 0, 0, 0)

        st_ = os.stat(s.path / "f")
        assert (st_.st_uid, st_.st_gid) == (1234, 4321)
    finally:
        s.close()


# -- a hostile guest ------------------------------------------------------------------------------

def test_link_of_a_symlink_fid_links_the_symlink_not_its_target(share, c, tmp_path):
    (tmp_path / "secret").write_bytes(b"host")
    os.symlink(tmp_path / "secret", share.path / "ln")
    c.walk(ROOT, 2, b"ln")

    c.call(P.TLINK, ROOT, 2, b"hard")

    assert (os.path.islink(share.path / "hard"), os.stat(tmp_path / "secret").st_nlink) == (
        True, 1)


def test_walk_dotdot_at_root_does_not_reach_the_shares_siblings(share, c, tmp_path):
    (tmp_path / "share-sibling").mkdir()  # what '..' of the share's root would reach

    qids = c.qids(ROOT, 2, b"..", b"share-sibling")

    assert [q.path for q in qids] == [os.stat(share.path).st_ino]  # a partial walk


def test_lopen_of_a_host_socket_is_eperm(share, c):
    os.mknod(share.path / "sock", stat.S_IFSOCK | 0o600)
    c.walk(ROOT, 2, b"sock")

    assert c.error(P.TLOPEN, 2, P.DOTL_RDWR) == errno.EPERM


def test_read_at_an_offset_beyond_2_63_is_einval(share, c):
    (share.path / "f").write_bytes(b"x")
    c.walk(ROOT, 2, b"f")
    c.call(P.TLOPEN, 2, P.DOTL_RDONLY)

    assert c.error(P.TREAD, 2, 1 << 63, 10) == errno.EINVAL


def test_write_at_an_offset_beyond_2_63_is_einval(share, c):
    (share.path / "f").write_bytes(b"x")
    c.walk(ROOT, 2, b"f")
    c.call(P.TLOPEN, 2, P.DOTL_WRONLY)

    err = c.error(P.TWRITE, 2, (1 << 64) - 1, b"y")

    assert (err, (share.path / "f").read_bytes()) == (errno.EINVAL, b"x")


def test_readdir_at_the_largest_offset_is_empty(share, c):
    (share.path / "f").write_bytes(b"")
    c.walk(ROOT, 2)
    c.call(P.TLOPEN, 2, P.DOTL_RDONLY)

    rtype, body = c.call(P.TREADDIR, 2, (1 << 64) - 1, 0xFFFF_FFFF)

    assert (rtype, body.u32()) == (P.RREADDIR, 0)


def test_walk_to_nofid_is_einval(c):
    assert c.error(P.TWALK, ROOT, P.NOFID, []) == errno.EINVAL


def test_attach_to_nofid_is_einval(share):
    share.client.call(P.TVERSION, MSIZE, b"9P2000.L")

    assert share.client.error(P.TATTACH, P.NOFID, P.NOFID, b"u", b"", 0) == errno.EINVAL


def test_xattrwalk_to_nofid_is_einval(c):
    assert c.error(P.TXATTRWALK, ROOT, P.NOFID, b"") == errno.EINVAL


def test_version_with_a_maximal_msize_negotiates_the_servers(share):
    rtype, body = share.client.call(P.TVERSION, 0xFFFF_FFFF, b"9P2000.L")

    assert (rtype, body.u32()) == (P.RVERSION, 512 * 1024)


def test_lcreate_with_no_room_for_its_reply_makes_no_file(share, c):
    c.walk(ROOT, 2)

    reply = c.raw(P.tmessage(P.TLCREATE, TAG, 2, b"new", P.DOTL_RDWR, 0o644, 0), reply_len=20)

    assert (reply, os.path.exists(share.path / "new")) == (
        P.rlerror(TAG, errno.ENOBUFS), False)


def test_version_with_no_room_for_its_reply_keeps_the_session(c):
    c.raw(P.tmessage(P.TVERSION, TAG, MSIZE, b"9P2000.L"), reply_len=16)

    rtype, _ = c.call(P.TGETATTR, ROOT, P.GETATTR_ALL)

    assert rtype == P.RGETATTR


# -- the fd budget --------------------------------------------------------------------------------

@pytest.fixture
def budget() -> FdBudget:
    return FdBudget(limit=3)


@pytest.fixture
def tight(tmp_path, budget):
    """A share whose server may hold 3 fds: the attached fid and two more."""
    s = Share(tmp_path / "share", budget=budget)
    (s.path / "f").write_bytes(b"")
    yield s
    s.close()


def test_walk_beyond_the_fd_budget_is_enfile(tight):
    c = tight.mount()
    c.walk(ROOT, 2)
    c.walk(ROOT, 3)

    assert c.error(P.TWALK, ROOT, 4, []) == errno.ENFILE


def test_walk_after_a_clunk_at_the_fd_budget_succeeds(tight):
    c = tight.mount()
    c.walk(ROOT, 2)
    c.walk(ROOT, 3)
    c.call(P.TCLUNK, 3)

    assert c.error(P.TWALK, ROOT, 4, []) is None


def test_lopen_beyond_the_fd_budget_is_enfile(tight):
    c = tight.mount()
    c.walk(ROOT, 2, b"f")
    c.walk(ROOT, 3)

    assert c.error(P.TLOPEN, 2, P.DOTL_RDONLY) == errno.ENFILE


def test_lcreate_beyond_the_fd_budget_is_enfile_and_makes_no_file(tight):
    c = tight.mount()
    c.walk(ROOT, 2)  # 2 fds held; a create needs 2 more

    err = c.error(P.TLCREATE, 2, b"new", P.DOTL_RDWR, 0o644, 0)

    assert (err, os.path.exists(tight.path / "new")) == (errno.ENFILE, False)


def test_mkdir_beyond_the_fd_budget_is_enfile_and_makes_no_directory(tight):
    c = tight.mount()
    c.walk(ROOT, 2)
    c.walk(ROOT, 3)

    err = c.error(P.TMKDIR, ROOT, b"d", 0o755, 0)

    assert (err, os.path.exists(tight.path / "d")) == (errno.ENFILE, False)


def test_readdir_after_an_enfile_lists_from_the_same_offset(tight):
    c = tight.mount()
    c.walk(ROOT, 2)
    c.call(P.TLOPEN, 2, P.DOTL_RDONLY)  # 3 fds: no room for the stream's own
    c.call(P.TREADDIR, 2, 0, 4096)      # ENFILE after '.' and '..'
    c.call(P.TCLUNK, ROOT)

    _, body = c.call(P.TREADDIR, 2, 2, 4096)

    assert _dirent_names(body) == [b"f"]


def test_budget_counts_each_fd_a_fid_holds(tight, budget):
    c = tight.mount()
    c.walk(ROOT, 2)
    c.call(P.TLOPEN, 2, P.DOTL_RDONLY)

    assert budget.held == 3


def test_clunk_gives_the_fids_fds_back_to_the_budget(tight, budget):
    c = tight.mount()
    c.walk(ROOT, 2)
    c.call(P.TLOPEN, 2, P.DOTL_RDONLY)

    c.call(P.TCLUNK, 2)

    assert budget.held == 1




def _busy_session(c: Client) -> None:
    """Fids holding every kind of fd: path fds, open files, a directory stream part
    read, an xattr value."""
    c.walk(ROOT, 2, b"f")
    c.call(P.TLOPEN, 2, P.DOTL_RDWR)
    c.walk(ROOT, 3)
    c.call(P.TLOPEN, 3, P.DOTL_RDONLY)
    c.call(P.TREADDIR, 3, 0, 60)  # '.', '..', then 'f' does not fit: the stream stays
    c.call(P.TXATTRWALK, 2, 4, b"")
    c.walk(ROOT, 5)
    c.call(P.TLCREATE, 5, b"new", P.DOTL_WRONLY, 0o600, 0)


@pytest.fixture
def roomy(tmp_path):
    s = Share(tmp_path / "share", budget=FdBudget(limit=100))
    (s.path / "f").write_bytes(b"")
    yield s
    s.close()


def test_busy_session_holds_fds_in_the_budget(roomy):
    _busy_session(roomy.mount())

    # ROOT 1; fid 2: path and file 2; fid 3: path, directory and stream 3; fid 5: 2
    assert roomy.server.budget.held == 8


def test_walk_to_the_same_fid_keeps_its_one_fd(roomy):
    (roomy.path / "d").mkdir()
    c = roomy.mount()
    c.walk(ROOT, 2)

    c.walk(2, 2, b"d")

    assert (c.getattr(2)[0].path, roomy.server.budget.held) == (
        os.stat(roomy.path / "d").st_ino, 2)


def test_version_gives_every_fd_back_to_the_budget(roomy):
    c = roomy.mount()
    _busy_session(c)

    c.call(P.TVERSION, MSIZE, b"9P2000.L")

    assert roomy.server.budget.held == 0


def test_close_gives_every_fd_back_to_the_budget(roomy):
    _busy_session(roomy.mount())

    roomy.server.close()

    assert roomy.server.budget.held == 0


def test_version_closes_every_fd(roomy):
    before = _open_fds()
    c = roomy.mount()
    _busy_session(c)

    c.call(P.TVERSION, MSIZE, b"9P2000.L")

    assert _open_fds() == before


def test_server_uses_the_process_budget_by_default(share):
    assert share.server.budget is PROCESS_BUDGET


# -- malformed requests ---------------------------------------------------------------------------

def test_unknown_message_type_gets_rlerror(c):
    reply = c.raw(P.message(200, TAG, b"\0" * 8))

    assert reply == P.rlerror(TAG, errno.EOPNOTSUPP)


def test_truncated_message_gets_rlerror(c):
    msg = P.tmessage(P.TGETATTR, TAG, ROOT, P.GETATTR_ALL)

    reply = c.raw(msg[:-3])  # the size field still says the whole message

    assert reply == P.rlerror(TAG, errno.EINVAL)


def test_next_message_works_after_a_truncated_one(c):
    c.raw(P.tmessage(P.TGETATTR, TAG, ROOT, P.GETATTR_ALL)[:-3])

    rtype, _ = c.call(P.TGETATTR, ROOT, P.GETATTR_ALL)

    assert rtype == P.RGETATTR


def test_message_over_msize_is_emsgsize(share):
    c = share.client
    c.call(P.TVERSION, 4096, b"9P2000.L")

    reply = c.raw(P.tmessage(P.TWRITE, TAG, 1, 0, bytes(5000)))

    assert reply == P.rlerror(TAG, errno.EMSGSIZE)


def test_header_shorter_than_7_bytes_gets_no_reply(c):
    assert c.raw(b"\x07\0\0\0\x18") == b""


def test_reply_that_does_not_fit_the_writer_is_enobufs(c):
    reply = c.raw(P.tmessage(P.TGETATTR, TAG, ROOT, P.GETATTR_ALL), reply_len=40)

    assert reply == P.rlerror(TAG, errno.ENOBUFS)


def test_writer_too_small_for_an_error_gets_no_reply_and_no_action(share, c):
    reply = c.raw(P.tmessage(P.TMKDIR, TAG, ROOT, b"d", 0o755, 0), reply_len=8)

    assert (reply, os.path.exists(share.path / "d")) == (b"", False)


def test_clunk_of_an_unknown_fid_is_ebadf(c):
    assert c.error(P.TCLUNK, 99) == errno.EBADF


def test_close_releases_every_fd(tmp_path):
    s = Share(tmp_path / "share")
    (s.path / "f").write_bytes(b"")
    before = _open_fds()
    c = s.mount()
    c.walk(ROOT, 2, b"f")
    c.call(P.TLOPEN, 2, P.DOTL_RDONLY)
    c.walk(ROOT, 3)
    c.call(P.TLOPEN, 3, P.DOTL_RDONLY)
    c.call(P.TREADDIR, 3, 0, 60)  # '.' and '..' fit, 'f' does not: the stream stays open

    try:
        s.server.close()

        assert _open_fds() == before
    finally:
        s.close()


_TYPES = sorted(P.T_FORMATS) + [P.TWALK, P.TFSYNC, 0, 6, 106, 112, 124, 255]


@st.composite
def _malformed(draw) -> bytes:
    """A message as a hostile driver writes it: a plausible header (or none) over any
    body, a size field that may lie, fids that may not exist, counts that may be huge."""
    msg_type = draw(st.sampled_from(_TYPES))
    fid = draw(st.sampled_from([ROOT, 2, 3, P.NOFID, 0x7FFF_FFFF]))
    u64 = st.sampled_from([0, 1, 4096, (1 << 63), (1 << 64) - 1])
    body = draw(st.one_of(
        st.binary(max_size=64),
        st.builds(lambda off, cnt, rest: struct.pack("<IQI", fid, off, cnt) + rest,
                  u64, st.sampled_from([0, 1, 1 << 20, 0xFFFF_FFFF]), st.binary(max_size=16)),
        st.builds(lambda n, rest: struct.pack("<IIH", fid, 2, n) + rest,
                  st.integers(0, 0xFFFF), st.binary(max_size=32)),
        st.builds(lambda n, rest: struct.pack("<IH", fid, n) + rest,
                  st.integers(0, 0xFFFF), st.binary(max_size=32)),
    ))
    size = draw(st.one_of(st.just(P.HEADER_LEN + len(body)), st.integers(0, 0xFFFF_FFFF)))
    raw = struct.pack("<IBH", size, msg_type, TAG) + body
    return raw[:draw(st.integers(0, len(raw)))] if draw(st.booleans()) else raw


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(request=_malformed())
def test_malformed_message_gets_an_error_and_the_server_keeps_working(share, request):
    c = share.client
    c.call(P.TVERSION, MSIZE, b"9P2000.L")
    c.call(P.TATTACH, ROOT, P.NOFID, b"u", b"", 0)

    reply = c.raw(request, reply_len=4096)

    rtype, _ = c.call(P.TGETATTR, ROOT, P.GETATTR_ALL)
    if len(request) < P.HEADER_LEN:
        assert (reply, rtype) == (b"", P.RGETATTR)
    else:
        size, reply_type, tag = P.parse_header(reply[:P.HEADER_LEN])
        assert (size, tag, reply_type in (P.RLERROR, request[4] + 1), rtype) == (
            len(reply), TAG, True, P.RGETATTR)
