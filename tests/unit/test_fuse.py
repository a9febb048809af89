"""The virtio-fs FUSE passthrough server (crosvm/devices/virtio/fs/passthrough.py) and
its wire format (fuse.py), driven with requests in guest memory against a tmp_path
directory, as the device's request queue would."""

from __future__ import annotations

import errno
import os
import stat
import struct
import tempfile
from collections import namedtuple

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from crosvm.devices.virtio.fs import fuse as F
from crosvm.devices.virtio.fs import passthrough as PT
from crosvm.devices.virtio.fs.fdbudget import FdBudget
from crosvm.devices.virtio.fs.idmap import OVERFLOW_ID, IdMap
from crosvm.devices.virtio.fs.passthrough import FsOptions, PassthroughFs
from crosvm.devices.virtio.fs.reopen import open_proc_self_fd
from crosvm.vm_memory import GuestMemory
from tests.support.chains import chain_io

ROOT = F.ROOT_ID
IS_ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not IS_ROOT, reason="chown to other ids needs root")

Reply = namedtuple("Reply", "error body written")
Entry = namedtuple("Entry", "nodeid generation entry_valid attr_valid entry_valid_nsec "
                   "attr_valid_nsec ino size blocks atime mtime ctime atimensec mtimensec "
                   "ctimensec mode nlink uid gid rdev blksize flags")
InitOut = namedtuple("InitOut", "major minor max_readahead flags max_background "
                     "congestion_threshold max_write time_gran max_pages map_alignment flags2")
ALL_INIT_FLAGS = 0xFFFF_FFFF


def header(opcode: int, nodeid: int, body: bytes, unique: int = 7, uid: int | None = None,
           gid: int | None = None, length: int | None = None) -> bytes:
    """A fuse_in_header and `body`; `length` overrides the header's len field."""
    total = F.IN_HEADER.size + len(body) if length is None else length
    return F.InHeader(total, opcode, unique, nodeid, os.getuid() if uid is None else uid,
                      os.getgid() if gid is None else gid, 1).pack() + body


def init_body(major: int = 7, minor: int = 38, flags: int = ALL_INIT_FLAGS) -> bytes:
    return F.INIT_IN.pack(major, minor, 128 << 10, flags) + bytes(48)


def read_in(fh: int, offset: int, size: int) -> bytes:
    return F.READ_IN.pack(fh, offset, size, 0, 0, 0, 0)


def setattr_in(valid: int, fh: int = 0, size: int = 0, atime: int = 0, mtime: int = 0,
               atime_ns: int = 0, mtime_ns: int = 0, mode: int = 0, uid: int = 0,
               gid: int = 0) -> bytes:
    return F.SETATTR_IN.pack(valid, 0, fh, size, 0, atime, mtime, 0, atime_ns, mtime_ns, 0,
                             mode, 0, uid, gid, 0)


def dirents(body: bytes, plus: bool) -> list[tuple[bytes, int, int]]:
    """(name, off, nodeid) of each entry of a READDIR(PLUS) reply."""
    out, pos = [], 0
    while pos < len(body):
        nodeid = F.ENTRY_OUT.unpack_from(body, pos)[0] if plus else 0
        if plus:
            pos += F.ENTRY_OUT.size
        _, off, namelen, _ = F.DIRENT.unpack_from(body, pos)
        out.append((body[pos + F.DIRENT.size:pos + F.DIRENT.size + namelen], off, nodeid))
        pos += F.dirent_size(namelen)
    return out


def open_fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


class Rig:
    """A PassthroughFs on `root` and guest memory to pass it requests in."""

    def __init__(self, root, options: FsOptions | None = None, uid_map: IdMap | None = None,
                 gid_map: IdMap | None = None, budget: FdBudget | None = None) -> None:
        self.root = str(root)
        self.root_fd = os.open(self.root, os.O_PATH | os.O_DIRECTORY)
        self.proc_fd = open_proc_self_fd()
        self.budget = budget or FdBudget(limit=1 << 16)  # its own: tests see its count
        self.fs = PassthroughFs(self.root_fd, self.proc_fd, options or FsOptions(),
                                uid_map or IdMap.identity(), gid_map or IdMap.identity(),
                                self.budget)
        self.mem = GuestMemory([(0, 8 << 20)])

    def raw(self, request: bytes, reply_len: int = 4096) -> tuple[int, bytes]:
        """Bytes written and the reply buffer."""
        reader, writer, at = chain_io(self.mem, request, reply_len)
        written = self.fs.handle(reader, writer)
        return written, self.mem.read(at, reply_len)

    def call(self, opcode: int, nodeid: int = ROOT, body: bytes = b"",
             reply_len: int = 4096, **kw) -> Reply:
        written, raw = self.raw(header(opcode, nodeid, body, **kw), reply_len)
        if written == 0:
            return Reply(None, b"", 0)
        length, error, _ = F.OUT_HEADER.unpack_from(raw)
        return Reply(error, raw[F.OUT_HEADER.size:length], written)

    def init(self, flags: int = ALL_INIT_FLAGS) -> InitOut:
        r = self.call(F.INIT, body=init_body(flags=flags))
        return InitOut(*F.INIT_OUT.unpack(r.body))

    def lookup(self, name: bytes, parent: int = ROOT) -> Reply:
        return self.call(F.LOOKUP, parent, name + b"\0")

    def entry(self, name: bytes, parent: int = ROOT) -> Entry:
        return Entry(*F.ENTRY_OUT.unpack(self.lookup(name, parent).body))

    def open(self, nodeid: int, flags: int = os.O_RDONLY) -> Reply:
        return self.call(F.OPEN, nodeid, F.OPEN_IN.pack(flags, 0))

    def fh(self, nodeid: int, flags: int = os.O_RDONLY) -> int:
        return F.OPEN_OUT.unpack(self.open(nodeid, flags).body)[0]

    def dir_fh(self, nodeid: int = ROOT) -> int:
        return F.OPEN_OUT.unpack(self.call(F.OPENDIR, nodeid, F.OPEN_IN.pack(0, 0)).body)[0]

    def close(self) -> None:
        self.fs.close()
        os.close(self.root_fd)
        os.close(self.proc_fd)
        self.mem.close()


@pytest.fixture
def fresh(tmp_path):
    (tmp_path / "share").mkdir()
    rig = Rig(tmp_path / "share")
    yield rig
    rig.close()


@pytest.fixture
def rig(fresh):
    fresh.init()
    return fresh


@pytest.fixture
def share(fresh):
    return fresh.root


def make_rig(tmp_path, **options) -> Rig:
    (tmp_path / "share").mkdir(exist_ok=True)
    rig = Rig(tmp_path / "share", FsOptions(**options))
    rig.init()
    return rig


# -- fuse.py ------------------------------------------------------------------------------

def test_args_name_without_nul_is_a_fuse_error():
    args = F.Args(b"file")

    with pytest.raises(F.FuseError):
        args.name()


def test_args_take_of_a_short_struct_is_a_fuse_error():
    args = F.Args(b"\0" * 7)

    with pytest.raises(F.FuseError):
        args.take(F.FORGET_IN)


def test_dirent_is_padded_to_8_bytes():
    raw = F.pack_dirent(5, 1, 8, b"abc")

    assert (len(raw), raw[24:27], raw[27:]) == (32, b"abc", b"\0" * 5)


# -- INIT ----------------------------------------------------------------------------------

def test_init_answers_7_31_with_1_mib_max_write_and_256_pages(fresh):
    out = fresh.init()

    assert (out.major, out.minor, out.max_write, out.max_pages) == (7, 31, 1 << 20, 256)


def test_init_accepts_only_the_flags_the_server_wants(fresh):
    out = fresh.init()

    wanted = (F.ASYNC_READ | F.ATOMIC_O_TRUNC | F.BIG_WRITES | F.DO_READDIRPLUS
              | F.READDIRPLUS_AUTO | F.PARALLEL_DIROPS | F.MAX_PAGES | F.AUTO_INVAL_DATA
              | F.POSIX_ACL)
    assert out.flags == wanted


def test_init_takes_writeback_cache_when_the_option_is_on(tmp_path):
    rig = make_rig(tmp_path, writeback=True)
    try:
        assert rig.fs.flags & F.WRITEBACK_CACHE
    finally:
        rig.close()


def test_init_never_accepts_a_flag_the_kernel_did_not_offer(fresh):
    out = fresh.init(flags=F.ASYNC_READ)

    assert out.flags == F.ASYNC_READ


def test_init_of_minor_30_is_refused_eproto(fresh):
    r = fresh.call(F.INIT, body=init_body(minor=30))

    assert r.error == -errno.EPROTO


def test_init_from_major_8_answers_7_and_waits_for_another_init(fresh):
    r = fresh.call(F.INIT, body=init_body(major=8))

    assert (F.INIT_OUT.unpack(r.body)[:2], fresh.fs.initialized) == ((7, 31), False)


def test_getattr_before_init_fails_eio(fresh):
    r = fresh.call(F.GETATTR, ROOT, F.GETATTR_IN.pack(0, 0, 0))

    assert r.error == -errno.EIO


def test_second_init_fails_eio(rig):
    r = rig.call(F.INIT, body=init_body())

    assert r.error == -errno.EIO


def test_destroy_drops_the_session_until_the_next_init(rig):
    rig.call(F.DESTROY)

    r = rig.call(F.GETATTR, ROOT, F.GETATTR_IN.pack(0, 0, 0))
    assert r.error == -errno.EIO


# -- lookup and attributes --------------------------------------------------------------------

def test_lookup_of_file_reports_its_size_mode_and_a_new_nodeid(rig):
    with open(os.path.join(rig.root, "f"), "wb") as f:
        f.write(b"12345")
    os.chmod(os.path.join(rig.root, "f"), 0o640)

    e = rig.entry(b"f")

    assert (e.size, e.mode, e.nodeid > ROOT) == (5, stat.S_IFREG | 0o640, True)


def test_lookup_reports_the_configured_timeouts(tmp_path):
    rig = make_rig(tmp_path, timeout=2.5)
    open(os.path.join(rig.root, "f"), "w").close()
    try:
        e = rig.entry(b"f")

        assert (e.entry_valid, e.entry_valid_nsec, e.attr_valid) == (2, 500_000_000, 2)
    finally:
        rig.close()


def test_two_lookups_of_one_file_give_one_nodeid(rig):
    open(os.path.join(rig.root, "f"), "w").close()

    first, second = rig.entry(b"f"), rig.entry(b"f")

    assert first.nodeid == second.nodeid


def test_getattr_of_root_reports_a_directory(rig):
    r = rig.call(F.GETATTR, ROOT, F.GETATTR_IN.pack(0, 0, 0))

    attr = F.ATTR_OUT.unpack(r.body)
    assert (r.error, stat.S_ISDIR(attr[3 + 9])) == (0, True)


def test_lookup_of_missing_name_fails_enoent(rig):
    r = rig.lookup(b"nothing")

    assert r.error == -errno.ENOENT


def test_negative_timeout_answers_missing_name_with_nodeid_0_entry(tmp_path):
    rig = make_rig(tmp_path, negative_timeout=3.0)
    try:
        r = rig.lookup(b"nothing")

        e = Entry(*F.ENTRY_OUT.unpack(r.body))
        assert (r.error, e.nodeid, e.entry_valid) == (0, 0, 3)
    finally:
        rig.close()


def test_ascii_casefold_lookup_finds_a_name_in_other_case(tmp_path):
    rig = make_rig(tmp_path, ascii_casefold=True)
    open(os.path.join(rig.root, "ReadMe.TXT"), "w").close()
    try:
        r = rig.lookup(b"readme.txt")

        assert r.error == 0
    finally:
        rig.close()


def test_lookup_without_casefold_is_case_sensitive(rig):
    open(os.path.join(rig.root, "ReadMe.TXT"), "w").close()

    r = rig.lookup(b"readme.txt")

    assert r.error == -errno.ENOENT


# -- escapes -------------------------------------------------------------------------------

def test_lookup_of_symlink_to_etc_passwd_returns_the_link_not_the_target(rig):
    os.symlink("/etc/passwd", os.path.join(rig.root, "pw"))

    e = rig.entry(b"pw")

    assert (stat.S_ISLNK(e.mode), e.size) == (True, len("/etc/passwd"))


def test_open_of_symlink_to_etc_passwd_fails_eloop(rig):
    os.symlink("/etc/passwd", os.path.join(rig.root, "pw"))
    nodeid = rig.entry(b"pw").nodeid

    r = rig.open(nodeid)

    assert r.error == -errno.ELOOP


def test_lookup_through_symlink_to_directory_outside_fails_enotdir(rig):
    os.symlink("/etc", os.path.join(rig.root, "etc"))
    link = rig.entry(b"etc").nodeid

    r = rig.lookup(b"passwd", parent=link)

    assert r.error == -errno.ENOTDIR


@pytest.mark.parametrize("name", [b"..", b".", b"../etc", b"a/b", b"/etc/passwd", b""],
                         ids=["dotdot", "dot", "dotdot-slash", "slash", "absolute", "empty"])
def test_lookup_of_name_that_is_not_one_component_fails_einval(rig, name):
    r = rig.lookup(name)

    assert r.error == -errno.EINVAL


def test_lookup_of_name_longer_than_255_fails_enametoolong(rig):
    r = rig.lookup(b"a" * 256)

    assert r.error == -errno.ENAMETOOLONG


def test_create_through_dangling_symlink_does_not_create_the_target(rig, tmp_path):
    target = tmp_path / "outside"
    os.symlink(target, os.path.join(rig.root, "dangling"))

    r = rig.call(F.CREATE, ROOT, F.CREATE_IN.pack(os.O_WRONLY, 0o644, 0, 0) + b"dangling\0")

    assert (r.error, target.exists()) == (-errno.EPERM, False)


def test_open_of_fifo_fails_enxio_without_blocking(rig):
    os.mkfifo(os.path.join(rig.root, "fifo"))
    nodeid = rig.entry(b"fifo").nodeid

    r = rig.open(nodeid)

    assert r.error == -errno.ENXIO


# -- files ---------------------------------------------------------------------------------

def test_read_returns_the_host_bytes(rig):
    with open(os.path.join(rig.root, "f"), "wb") as f:
        f.write(b"hello, guest")
    fh = rig.fh(rig.entry(b"f").nodeid)

    r = rig.call(F.READ, body=read_in(fh, 7, 100))

    assert (r.error, r.body) == (0, b"guest")


def test_one_mib_read_lands_in_guest_memory(rig):
    data = os.urandom(1 << 20)
    with open(os.path.join(rig.root, "big"), "wb") as f:
        f.write(data)
    fh = rig.fh(rig.entry(b"big").nodeid)

    r = rig.call(F.READ, body=read_in(fh, 0, 1 << 20), reply_len=F.OUT_HEADER.size + (1 << 20))

    assert (r.error, r.written, r.body == data) == (0, F.OUT_HEADER.size + (1 << 20), True)


def test_read_larger_than_the_reply_buffer_returns_only_what_fits(rig):
    with open(os.path.join(rig.root, "f"), "wb") as f:
        f.write(b"x" * 1000)
    fh = rig.fh(rig.entry(b"f").nodeid)

    r = rig.call(F.READ, body=read_in(fh, 0, 1000), reply_len=F.OUT_HEADER.size + 10)

    assert (r.error, r.body) == (0, b"x" * 10)


def test_read_of_unknown_fh_fails_ebadf(rig):
    r = rig.call(F.READ, body=read_in(999, 0, 10))

    assert r.error == -errno.EBADF


def test_create_then_write_lands_on_the_host(rig):
    r = rig.call(F.CREATE, ROOT, F.CREATE_IN.pack(os.O_WRONLY, 0o644, 0, 0) + b"new\0")
    fh = F.OPEN_OUT.unpack(r.body[F.ENTRY_OUT.size:])[0]

    w = rig.call(F.WRITE, body=F.WRITE_IN.pack(fh, 3, 5, 0, 0, 0, 0) + b"abcde")

    with open(os.path.join(rig.root, "new"), "rb") as f:
        assert (w.error, F.WRITE_OUT.unpack(w.body)[0], f.read()) == (0, 5, b"\0\0\0abcde")


def test_create_gives_the_guest_mode_despite_the_process_umask(rig):
    old = os.umask(0o077)
    try:
        rig.call(F.CREATE, ROOT, F.CREATE_IN.pack(os.O_WRONLY, 0o644, 0o022, 0) + b"new\0")
    finally:
        os.umask(old)

    assert stat.S_IMODE(os.stat(os.path.join(rig.root, "new")).st_mode) == 0o644


def test_create_strips_setuid_and_setgid_from_the_mode(rig):
    rig.call(F.CREATE, ROOT, F.CREATE_IN.pack(os.O_WRONLY, 0o6755, 0, 0) + b"suid\0")

    assert stat.S_IMODE(os.stat(os.path.join(rig.root, "suid")).st_mode) == 0o755


def test_create_with_o_excl_of_existing_file_fails_eexist(rig):
    open(os.path.join(rig.root, "f"), "w").close()

    r = rig.call(F.CREATE, ROOT,
                 F.CREATE_IN.pack(os.O_WRONLY | os.O_EXCL, 0o644, 0, 0) + b"f\0")

    assert r.error == -errno.EEXIST


def test_write_with_kill_priv_clears_setuid(rig):
    path = os.path.join(rig.root, "prog")
    open(path, "w").close()
    os.chmod(path, 0o4755)
    fh = rig.fh(rig.entry(b"prog").nodeid, os.O_WRONLY)

    rig.call(F.WRITE, body=F.WRITE_IN.pack(fh, 0, 1, F.WRITE_KILL_PRIV, 0, 0, 0) + b"x")

    assert stat.S_IMODE(os.stat(path).st_mode) == 0o755


def test_write_with_kill_priv_on_a_read_only_handle_keeps_setuid_and_fails_ebadf(rig):
    path = os.path.join(rig.root, "prog")
    open(path, "w").close()
    os.chmod(path, 0o4755)
    fh = rig.fh(rig.entry(b"prog").nodeid, os.O_RDONLY)

    r = rig.call(F.WRITE, body=F.WRITE_IN.pack(fh, 0, 1, F.WRITE_KILL_PRIV, 0, 0, 0) + b"x")

    assert (r.error, stat.S_IMODE(os.stat(path).st_mode)) == (-errno.EBADF, 0o4755)


def test_write_whose_size_exceeds_the_data_sent_fails_einval(rig):
    open(os.path.join(rig.root, "f"), "w").close()
    fh = rig.fh(rig.entry(b"f").nodeid, os.O_WRONLY)

    r = rig.call(F.WRITE, body=F.WRITE_IN.pack(fh, 0, 100, 0, 0, 0, 0) + b"abc")

    assert (r.error, os.path.getsize(os.path.join(rig.root, "f"))) == (-errno.EINVAL, 0)


def test_release_closes_the_handle(rig):
    open(os.path.join(rig.root, "f"), "w").close()
    fh = rig.fh(rig.entry(b"f").nodeid)

    rig.call(F.RELEASE, body=F.RELEASE_IN.pack(fh, 0, 0, 0))

    assert (rig.fs.handle_count(), rig.call(F.READ, body=read_in(fh, 0, 1)).error) == (
        0, -errno.EBADF)


def test_open_beyond_the_handle_limit_fails_emfile(rig, monkeypatch):
    monkeypatch.setattr(PT, "MAX_HANDLES", 2)
    open(os.path.join(rig.root, "f"), "w").close()
    nodeid = rig.entry(b"f").nodeid
    rig.open(nodeid)
    rig.open(nodeid)

    r = rig.open(nodeid)

    assert r.error == -errno.EMFILE


def test_fsync_flush_and_fdatasync_of_an_open_file_succeed(rig):
    open(os.path.join(rig.root, "f"), "w").close()
    fh = rig.fh(rig.entry(b"f").nodeid, os.O_WRONLY)

    errors = [rig.call(F.FSYNC, body=F.FSYNC_IN.pack(fh, 0, 0)).error,
              rig.call(F.FSYNC, body=F.FSYNC_IN.pack(fh, F.FSYNC_FDATASYNC, 0)).error,
              rig.call(F.FLUSH, body=F.FLUSH_IN.pack(fh, 0, 0, 0)).error]

    assert errors == [0, 0, 0]


def test_fallocate_extends_the_host_file(rig):
    open(os.path.join(rig.root, "f"), "w").close()
    fh = rig.fh(rig.entry(b"f").nodeid, os.O_RDWR)

    r = rig.call(F.FALLOCATE, body=F.FALLOCATE_IN.pack(fh, 0, 8192, 0, 0))

    assert (r.error, os.path.getsize(os.path.join(rig.root, "f"))) == (0, 8192)


def test_lseek_seek_data_finds_data_after_a_hole(rig):
    with open(os.path.join(rig.root, "sparse"), "wb") as f:
        f.seek(1 << 20)
        f.write(b"data")
        f.flush()
        if os.lseek(f.fileno(), 0, os.SEEK_DATA) != 1 << 20:
            pytest.skip("the host filesystem does not report holes")
    fh = rig.fh(rig.entry(b"sparse").nodeid)

    r = rig.call(F.LSEEK, body=F.LSEEK_IN.pack(fh, 0, os.SEEK_DATA, 0))

    assert (r.error, F.LSEEK_OUT.unpack(r.body)[0]) == (0, 1 << 20)


def test_cache_always_keeps_the_page_cache_and_caches_directories(tmp_path):
    rig = make_rig(tmp_path, cache="always")
    open(os.path.join(rig.root, "f"), "w").close()
    try:
        file_flags = F.OPEN_OUT.unpack(rig.open(rig.entry(b"f").nodeid).body)[1]
        dir_flags = F.OPEN_OUT.unpack(rig.call(F.OPENDIR, ROOT, F.OPEN_IN.pack(0, 0)).body)[1]

        assert (file_flags, dir_flags) == (F.FOPEN_KEEP_CACHE, F.FOPEN_CACHE_DIR)
    finally:
        rig.close()


def test_cache_never_opens_files_for_direct_io(tmp_path):
    rig = make_rig(tmp_path, cache="never")
    open(os.path.join(rig.root, "f"), "w").close()
    try:
        flags = F.OPEN_OUT.unpack(rig.open(rig.entry(b"f").nodeid).body)[1]

        assert flags == F.FOPEN_DIRECT_IO
    finally:
        rig.close()


# -- namespace -----------------------------------------------------------------------------

def test_mkdir_makes_a_host_directory_with_the_guest_mode(rig):
    r = rig.call(F.MKDIR, ROOT, F.MKDIR_IN.pack(0o750, 0) + b"d\0")

    e = Entry(*F.ENTRY_OUT.unpack(r.body))
    assert (e.mode, stat.S_IMODE(os.stat(os.path.join(rig.root, "d")).st_mode)) == (
        stat.S_IFDIR | 0o750, 0o750)


def test_rmdir_removes_the_host_directory(rig):
    os.mkdir(os.path.join(rig.root, "d"))

    r = rig.call(F.RMDIR, ROOT, b"d\0")

    assert (r.error, os.path.exists(os.path.join(rig.root, "d"))) == (0, False)


def test_unlink_removes_the_host_file(rig):
    open(os.path.join(rig.root, "f"), "w").close()

    r = rig.call(F.UNLINK, ROOT, b"f\0")

    assert (r.error, os.path.exists(os.path.join(rig.root, "f"))) == (0, False)


def test_rename_moves_the_host_file_into_another_directory(rig):
    open(os.path.join(rig.root, "f"), "w").close()
    os.mkdir(os.path.join(rig.root, "d"))
    d = rig.entry(b"d").nodeid

    r = rig.call(F.RENAME, ROOT, F.RENAME_IN.pack(d) + b"f\0g\0")

    assert (r.error, os.listdir(os.path.join(rig.root, "d"))) == (0, ["g"])


def test_rename2_noreplace_onto_an_existing_name_fails_eexist(rig):
    for name in ("a", "b"):
        open(os.path.join(rig.root, name), "w").close()

    r = rig.call(F.RENAME2, ROOT, F.RENAME2_IN.pack(ROOT, F.RENAME_NOREPLACE, 0) + b"a\0b\0")

    assert (r.error, sorted(os.listdir(rig.root))) == (-errno.EEXIST, ["a", "b"])


def test_rename2_exchange_swaps_two_files(rig):
    for name in ("a", "b"):
        with open(os.path.join(rig.root, name), "w") as f:
            f.write(name)

    rig.call(F.RENAME2, ROOT, F.RENAME2_IN.pack(ROOT, F.RENAME_EXCHANGE, 0) + b"a\0b\0")

    with open(os.path.join(rig.root, "a")) as f:
        assert f.read() == "b"


def test_rename2_whiteout_is_refused_einval(rig):
    open(os.path.join(rig.root, "a"), "w").close()

    r = rig.call(F.RENAME2, ROOT, F.RENAME2_IN.pack(ROOT, F.RENAME_WHITEOUT, 0) + b"a\0b\0")

    assert r.error == -errno.EINVAL


def test_link_gives_a_second_name_for_the_same_nodeid(rig):
    open(os.path.join(rig.root, "f"), "w").close()
    nodeid = rig.entry(b"f").nodeid

    r = rig.call(F.LINK, ROOT, F.LINK_IN.pack(nodeid) + b"g\0")

    e = Entry(*F.ENTRY_OUT.unpack(r.body))
    assert (e.nodeid, e.nlink, os.stat(os.path.join(rig.root, "g")).st_nlink) == (nodeid, 2, 2)


def test_symlink_then_readlink_returns_the_target_text(rig):
    r = rig.call(F.SYMLINK, ROOT, b"ln\0../../outside\0")
    nodeid = Entry(*F.ENTRY_OUT.unpack(r.body)).nodeid

    target = rig.call(F.READLINK, nodeid)

    assert (os.readlink(os.path.join(rig.root, "ln")), target.body) == (
        "../../outside", b"../../outside")


def test_readlink_of_a_regular_file_fails_einval(rig):
    open(os.path.join(rig.root, "f"), "w").close()

    r = rig.call(F.READLINK, rig.entry(b"f").nodeid)

    assert r.error == -errno.EINVAL


def test_mknod_makes_a_fifo(rig):
    r = rig.call(F.MKNOD, ROOT, F.MKNOD_IN.pack(stat.S_IFIFO | 0o600, 0, 0, 0) + b"p\0")

    assert (r.error, stat.S_ISFIFO(os.lstat(os.path.join(rig.root, "p")).st_mode)) == (0, True)


@pytest.mark.parametrize("kind", [stat.S_IFCHR, stat.S_IFBLK, stat.S_IFSOCK],
                         ids=["char", "block", "socket"])
def test_mknod_of_device_or_socket_is_refused_eperm(rig, kind):
    r = rig.call(F.MKNOD, ROOT, F.MKNOD_IN.pack(kind | 0o666, os.makedev(1, 3), 0, 0) + b"n\0")

    assert (r.error, os.path.lexists(os.path.join(rig.root, "n"))) == (-errno.EPERM, False)


# -- setattr -------------------------------------------------------------------------------

def test_setattr_size_truncates_the_host_file(rig):
    with open(os.path.join(rig.root, "f"), "wb") as f:
        f.write(b"0123456789")
    nodeid = rig.entry(b"f").nodeid

    r = rig.call(F.SETATTR, nodeid, setattr_in(F.FATTR_SIZE, size=4))

    assert (r.error, os.path.getsize(os.path.join(rig.root, "f"))) == (0, 4)


def test_setattr_size_through_an_open_handle_truncates_the_host_file(rig):
    with open(os.path.join(rig.root, "f"), "wb") as f:
        f.write(b"0123456789")
    nodeid = rig.entry(b"f").nodeid
    fh = rig.fh(nodeid, os.O_WRONLY)

    rig.call(F.SETATTR, nodeid, setattr_in(F.FATTR_SIZE | F.FATTR_FH, fh=fh, size=2))

    assert os.path.getsize(os.path.join(rig.root, "f")) == 2


def test_setattr_mode_changes_the_host_mode(rig):
    open(os.path.join(rig.root, "f"), "w").close()
    nodeid = rig.entry(b"f").nodeid

    r = rig.call(F.SETATTR, nodeid, setattr_in(F.FATTR_MODE, mode=0o600))

    assert stat.S_IMODE(os.stat(os.path.join(rig.root, "f")).st_mode) == 0o600
    assert F.ATTR_OUT.unpack(r.body)[3 + 9] == stat.S_IFREG | 0o600


def test_setattr_mode_never_sets_setuid(rig):
    open(os.path.join(rig.root, "f"), "w").close()
    nodeid = rig.entry(b"f").nodeid

    rig.call(F.SETATTR, nodeid, setattr_in(F.FATTR_MODE, mode=0o4755))

    assert stat.S_IMODE(os.stat(os.path.join(rig.root, "f")).st_mode) == 0o755


def test_setattr_mode_keeps_setgid_on_a_directory(rig):
    os.mkdir(os.path.join(rig.root, "d"))
    nodeid = rig.entry(b"d").nodeid

    r = rig.call(F.SETATTR, nodeid, setattr_in(F.FATTR_MODE, mode=0o2775))

    assert (r.error, stat.S_IMODE(os.stat(os.path.join(rig.root, "d")).st_mode)) == (0, 0o2775)


def test_setattr_mode_never_sets_setuid_on_a_directory(rig):
    os.mkdir(os.path.join(rig.root, "d"))
    nodeid = rig.entry(b"d").nodeid

    rig.call(F.SETATTR, nodeid, setattr_in(F.FATTR_MODE, mode=0o6775))

    assert stat.S_IMODE(os.stat(os.path.join(rig.root, "d")).st_mode) == 0o2775


def test_setattr_mode_never_sets_setgid_on_a_file(rig):
    open(os.path.join(rig.root, "f"), "w").close()
    nodeid = rig.entry(b"f").nodeid

    rig.call(F.SETATTR, nodeid, setattr_in(F.FATTR_MODE, mode=0o2755))

    assert stat.S_IMODE(os.stat(os.path.join(rig.root, "f")).st_mode) == 0o755


def test_setattr_times_sets_atime_and_mtime(rig):
    open(os.path.join(rig.root, "f"), "w").close()
    nodeid = rig.entry(b"f").nodeid

    rig.call(F.SETATTR, nodeid, setattr_in(F.FATTR_ATIME | F.FATTR_MTIME, atime=1000,
                                            mtime=2000, mtime_ns=5))

    st_ = os.stat(os.path.join(rig.root, "f"))
    assert (st_.st_atime_ns, st_.st_mtime_ns) == (1000 * 10**9, 2000 * 10**9 + 5)


def test_setattr_mtime_now_leaves_atime_alone(rig):
    path = os.path.join(rig.root, "f")
    open(path, "w").close()
    os.utime(path, ns=(10**9, 10**9))
    nodeid = rig.entry(b"f").nodeid

    rig.call(F.SETATTR, nodeid, setattr_in(F.FATTR_MTIME | F.FATTR_MTIME_NOW))

    st_ = os.stat(path)
    assert (st_.st_atime_ns, st_.st_mtime_ns > 10**9) == (10**9, True)


def test_setattr_of_symlink_mode_fails_without_touching_the_target(rig, tmp_path):
    target = tmp_path / "outside"
    target.write_text("x")
    os.chmod(target, 0o644)
    os.symlink(target, os.path.join(rig.root, "ln"))
    nodeid = rig.entry(b"ln").nodeid

    r = rig.call(F.SETATTR, nodeid, setattr_in(F.FATTR_MODE, mode=0o777))

    assert (r.error, stat.S_IMODE(target.stat().st_mode)) == (-errno.EOPNOTSUPP, 0o644)


def test_setattr_size_of_symlink_does_not_truncate_the_target(rig, tmp_path):
    target = tmp_path / "outside"
    target.write_text("keep me")
    os.symlink(target, os.path.join(rig.root, "ln"))
    nodeid = rig.entry(b"ln").nodeid

    r = rig.call(F.SETATTR, nodeid, setattr_in(F.FATTR_SIZE, size=0))

    assert (r.error, target.read_text()) == (-errno.EINVAL, "keep me")


# -- directories ---------------------------------------------------------------------------

def test_readdir_of_1000_files_returns_each_once_over_several_calls(rig):
    for i in range(1000):
        open(os.path.join(rig.root, f"file{i:04}"), "w").close()
    fh = rig.dir_fh()
    names, offset, calls = [], 0, 0
    while True:
        r = rig.call(F.READDIR, body=read_in(fh, offset, 4096), reply_len=4096 + 16)
        entries = dirents(r.body, plus=False)
        if not entries:
            break
        names += [n for n, _, _ in entries]
        offset = entries[-1][1]
        calls += 1

    assert (sorted(names), calls > 5) == (
        sorted([b".", b".."] + [f"file{i:04}".encode() for i in range(1000)]), True)


def test_readdirplus_of_1000_files_looks_each_up_once_over_several_calls(rig):
    for i in range(1000):
        open(os.path.join(rig.root, f"file{i:04}"), "w").close()
    fh = rig.dir_fh()
    seen, offset = {}, 0
    while True:
        r = rig.call(F.READDIRPLUS, body=read_in(fh, offset, 4096), reply_len=4096 + 16)
        entries = dirents(r.body, plus=True)
        if not entries:
            break
        seen.update((n, nodeid) for n, _, nodeid in entries)
        offset = entries[-1][1]

    files = {n: v for n, v in seen.items() if n not in (b".", b"..")}
    assert (len(files), all(files.values()), seen[b"."], rig.fs.inode_count()) == (
        1000, True, 0, 1001)


def test_readdir_fills_no_more_than_the_guest_size(rig):
    for i in range(50):
        open(os.path.join(rig.root, f"file{i:04}"), "w").close()
    fh = rig.dir_fh()

    r = rig.call(F.READDIR, body=read_in(fh, 0, 100), reply_len=4096)

    assert 0 < len(r.body) <= 100


def test_readdir_with_a_guest_size_below_one_entry_fails_einval(rig):
    fh = rig.dir_fh()

    r = rig.call(F.READDIR, body=read_in(fh, 0, 10))

    assert r.error == -errno.EINVAL


def test_opendir_of_a_file_fails_enotdir(rig):
    open(os.path.join(rig.root, "f"), "w").close()

    r = rig.call(F.OPENDIR, rig.entry(b"f").nodeid, F.OPEN_IN.pack(0, 0))

    assert r.error == -errno.ENOTDIR


def test_releasedir_of_a_file_handle_fails_ebadf(rig):
    open(os.path.join(rig.root, "f"), "w").close()
    fh = rig.fh(rig.entry(b"f").nodeid)

    r = rig.call(F.RELEASEDIR, body=F.RELEASE_IN.pack(fh, 0, 0, 0))

    assert r.error == -errno.EBADF


def test_statfs_reports_the_host_filesystem(rig):
    r = rig.call(F.STATFS)

    blocks, *_rest = F.KSTATFS.unpack(r.body)
    assert (r.error, blocks) == (0, os.statvfs(rig.root).f_blocks)


# -- xattrs --------------------------------------------------------------------------------

def test_setxattr_then_getxattr_returns_the_value(rig):
    open(os.path.join(rig.root, "f"), "w").close()
    nodeid = rig.entry(b"f").nodeid
    rig.call(F.SETXATTR, nodeid, F.SETXATTR_IN.pack(5, 0) + b"user.k\0hello")

    r = rig.call(F.GETXATTR, nodeid, F.GETXATTR_IN.pack(100, 0) + b"user.k\0")

    assert (r.body, os.getxattr(os.path.join(rig.root, "f"), "user.k")) == (b"hello", b"hello")


def test_getxattr_of_size_0_reports_the_value_size(rig):
    path = os.path.join(rig.root, "f")
    open(path, "w").close()
    os.setxattr(path, "user.k", b"12345678")

    r = rig.call(F.GETXATTR, rig.entry(b"f").nodeid, F.GETXATTR_IN.pack(0, 0) + b"user.k\0")

    assert F.GETXATTR_OUT.unpack(r.body)[0] == 8


def test_getxattr_into_a_small_buffer_fails_erange(rig):
    path = os.path.join(rig.root, "f")
    open(path, "w").close()
    os.setxattr(path, "user.k", b"12345678")

    r = rig.call(F.GETXATTR, rig.entry(b"f").nodeid, F.GETXATTR_IN.pack(4, 0) + b"user.k\0")

    assert r.error == -errno.ERANGE


def test_listxattr_lists_the_names_nul_separated(rig):
    path = os.path.join(rig.root, "f")
    open(path, "w").close()
    os.setxattr(path, "user.a", b"1")
    os.setxattr(path, "user.b", b"2")

    r = rig.call(F.LISTXATTR, rig.entry(b"f").nodeid, F.GETXATTR_IN.pack(4096, 0))

    assert sorted(r.body.split(b"\0")[:-1]) == [b"user.a", b"user.b"]


def test_removexattr_removes_it_on_the_host(rig):
    path = os.path.join(rig.root, "f")
    open(path, "w").close()
    os.setxattr(path, "user.k", b"1")

    rig.call(F.REMOVEXATTR, rig.entry(b"f").nodeid, b"user.k\0")

    assert os.listxattr(path) == []


def test_setxattr_of_security_capability_is_refused_eperm(rig):
    open(os.path.join(rig.root, "f"), "w").close()

    r = rig.call(F.SETXATTR, rig.entry(b"f").nodeid,
                 F.SETXATTR_IN.pack(4, 0) + b"security.capability\0\x01\0\0\x02")

    assert r.error == -errno.EPERM


@needs_root  # others cannot set trusted.* anyway: the test could not fail
def test_setxattr_of_a_trusted_xattr_is_refused_eperm(rig):
    os.mkdir(os.path.join(rig.root, "d"))
    nodeid = rig.entry(b"d").nodeid

    r = rig.call(F.SETXATTR, nodeid,
                 F.SETXATTR_IN.pack(4, 0) + b"trusted.overlay.redirect\0/etc")

    assert (r.error, os.listxattr(os.path.join(rig.root, "d"))) == (-errno.EPERM, [])


def test_setxattr_of_security_selinux_is_refused_eperm(rig):
    path = os.path.join(rig.root, "f")
    open(path, "w").close()
    before = os.listxattr(path)

    r = rig.call(F.SETXATTR, rig.entry(b"f").nodeid, F.SETXATTR_IN.pack(26, 0)
                 + b"security.selinux\0system_u:object_r:shadow_t")

    assert (r.error, os.listxattr(path)) == (-errno.EPERM, before)


@needs_root
def test_removexattr_of_a_trusted_xattr_is_refused_eperm(rig):
    path = os.path.join(rig.root, "f")
    open(path, "w").close()
    os.setxattr(path, "trusted.k", b"host")

    r = rig.call(F.REMOVEXATTR, rig.entry(b"f").nodeid, b"trusted.k\0")

    assert (r.error, os.getxattr(path, "trusted.k")) == (-errno.EPERM, b"host")


def test_setxattr_value_over_64_kib_fails_e2big(rig):
    open(os.path.join(rig.root, "f"), "w").close()
    nodeid = rig.entry(b"f").nodeid

    r = rig.call(F.SETXATTR, nodeid, F.SETXATTR_IN.pack((64 << 10) + 1, 0) + b"user.k\0")

    assert r.error == -errno.E2BIG


def acl(user_id: int) -> bytes:
    """A POSIX ACL xattr value: owner rw, user `user_id` r, group r, mask r, other none."""
    none = 0xFFFF_FFFF
    entries = [(0x01, 6, none), (0x02, 4, user_id), (0x04, 4, none), (0x10, 4, none),
               (0x20, 0, none)]
    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *e) for e in entries)


def test_setxattr_of_an_acl_stores_the_mapped_host_uid(tmp_path):
    (tmp_path / "share").mkdir()
    rig = Rig(tmp_path / "share", uid_map=IdMap.parse(f"5000 {os.getuid()} 1"))
    rig.init()
    path = os.path.join(rig.root, "f")
    open(path, "w").close()
    try:
        r = rig.call(F.SETXATTR, rig.entry(b"f").nodeid, F.SETXATTR_IN.pack(len(acl(5000)), 0)
                     + b"system.posix_acl_access\0" + acl(5000))

        assert (r.error, os.getxattr(path, "system.posix_acl_access")) == (0, acl(os.getuid()))
    finally:
        rig.close()


def test_getxattr_of_an_acl_reports_the_guest_uid(tmp_path):
    (tmp_path / "share").mkdir()
    rig = Rig(tmp_path / "share", uid_map=IdMap.parse(f"5000 {os.getuid()} 1"))
    rig.init()
    path = os.path.join(rig.root, "f")
    open(path, "w").close()
    os.setxattr(path, "system.posix_acl_access", acl(os.getuid()))
    try:
        r = rig.call(F.GETXATTR, rig.entry(b"f").nodeid,
                     F.GETXATTR_IN.pack(4096, 0) + b"system.posix_acl_access\0")

        assert r.body == acl(5000)
    finally:
        rig.close()


def test_acl_xattrs_are_refused_when_posix_acl_is_off(tmp_path):
    rig = make_rig(tmp_path, posix_acl=False)
    open(os.path.join(rig.root, "f"), "w").close()
    try:
        r = rig.call(F.GETXATTR, rig.entry(b"f").nodeid,
                     F.GETXATTR_IN.pack(4096, 0) + b"system.posix_acl_access\0")

        assert r.error == -errno.EOPNOTSUPP
    finally:
        rig.close()


# -- inode lifetime --------------------------------------------------------------------------

def test_forget_of_every_lookup_closes_the_inode_fd(rig):
    open(os.path.join(rig.root, "f"), "w").close()
    before = open_fd_count()
    nodeid = rig.entry(b"f").nodeid
    rig.entry(b"f")
    during = open_fd_count()

    written = rig.call(F.FORGET, nodeid, F.FORGET_IN.pack(2)).written

    assert (during, open_fd_count(), written, rig.fs.inode_count()) == (before + 1, before, 0, 1)


def test_forget_of_fewer_lookups_keeps_the_inode(rig):
    open(os.path.join(rig.root, "f"), "w").close()
    nodeid = rig.entry(b"f").nodeid
    rig.entry(b"f")

    rig.call(F.FORGET, nodeid, F.FORGET_IN.pack(1))

    assert rig.call(F.GETATTR, nodeid, F.GETATTR_IN.pack(0, 0, 0)).error == 0


def test_batch_forget_frees_every_listed_inode(rig):
    nodeids = []
    for name in ("a", "b", "c"):
        open(os.path.join(rig.root, name), "w").close()
        nodeids.append(rig.entry(name.encode()).nodeid)
    body = F.BATCH_FORGET_IN.pack(3, 0) + b"".join(F.FORGET_ONE.pack(n, 1) for n in nodeids)

    written = rig.call(F.BATCH_FORGET, 0, body).written

    assert (written, rig.fs.inode_count()) == (0, 1)


def test_batch_forget_count_beyond_its_entries_forgets_only_those_sent(rig):
    open(os.path.join(rig.root, "a"), "w").close()
    nodeid = rig.entry(b"a").nodeid

    rig.call(F.BATCH_FORGET, 0, F.BATCH_FORGET_IN.pack(1_000_000, 0) + F.FORGET_ONE.pack(nodeid, 1))

    assert rig.fs.inode_count() == 1


def test_forget_of_root_with_a_huge_count_keeps_root_and_its_fd(rig):
    open(os.path.join(rig.root, "f"), "w").close()

    rig.call(F.FORGET, ROOT, F.FORGET_IN.pack(1 << 40))

    getattr_ = rig.call(F.GETATTR, ROOT, F.GETATTR_IN.pack(0, 0, 0))
    assert (getattr_.error, rig.lookup(b"f").error, stat.S_ISDIR(os.fstat(rig.root_fd).st_mode)) \
        == (0, 0, True)


def test_forget_of_a_directory_with_an_open_handle_keeps_its_fd_open(rig):
    os.mkdir(os.path.join(rig.root, "d"))
    d = rig.entry(b"d").nodeid
    rig.dir_fh(d)
    fds = open_fd_count()

    rig.call(F.FORGET, d, F.FORGET_IN.pack(1))

    assert (rig.fs.inode_count(), open_fd_count(), rig.budget.held) == (1, fds, 2)


def test_releasedir_after_forget_closes_the_directory_and_its_inode_fd(rig):
    os.mkdir(os.path.join(rig.root, "d"))
    fds = open_fd_count()
    d = rig.entry(b"d").nodeid
    fh = rig.dir_fh(d)
    rig.call(F.FORGET, d, F.FORGET_IN.pack(1))

    r = rig.call(F.RELEASEDIR, body=F.RELEASE_IN.pack(fh, 0, 0, 0))

    assert (r.error, open_fd_count(), rig.budget.held) == (0, fds, 0)


def test_readdirplus_after_forget_of_its_directory_lists_that_directory_not_another(tmp_path):
    # uaf.py: a forgotten directory's fd number, reused by another share's server in
    # the process, must not become the directory READDIRPLUS looks names up in.
    for share, sub in (("share1", "a"), ("share2", "private")):
        os.makedirs(tmp_path / share / sub)
        (tmp_path / share / sub / "secret").write_text(share)
    one, two = Rig(tmp_path / "share1"), Rig(tmp_path / "share2")
    try:
        one.init()
        two.init()
        a = one.entry(b"a").nodeid
        fh = one.dir_fh(a)
        one.call(F.FORGET, a, F.FORGET_IN.pack(1))
        two.entry(b"private")  # the next fd the process opens

        r = one.call(F.READDIRPLUS, a, read_in(fh, 0, 4096))

        secret = {n: nodeid for n, _, nodeid in dirents(r.body, plus=True)}[b"secret"]
        opened = one.fh(secret)
        read = one.call(F.READ, secret, read_in(opened, 0, 100))
        assert (r.error, read.body) == (0, b"share1")
    finally:
        one.close()
        two.close()


def test_lookup_beyond_the_fd_budget_fails_enfile(tmp_path):
    (tmp_path / "share").mkdir()
    rig = Rig(tmp_path / "share", budget=FdBudget(limit=10))
    rig.init()
    for i in range(11):
        open(os.path.join(rig.root, f"f{i}"), "w").close()
    try:
        errors = [rig.lookup(f"f{i}".encode()).error for i in range(11)]

        assert (errors, rig.budget.held) == ([0] * 10 + [-errno.ENFILE], 10)
    finally:
        rig.close()


def test_lookup_after_forget_frees_the_fd_budget_succeeds(tmp_path):
    (tmp_path / "share").mkdir()
    rig = Rig(tmp_path / "share", budget=FdBudget(limit=10))
    rig.init()
    for i in range(11):
        open(os.path.join(rig.root, f"f{i}"), "w").close()
    try:
        first = rig.entry(b"f0").nodeid
        for i in range(1, 10):
            rig.lookup(f"f{i}".encode())
        rig.call(F.FORGET, first, F.FORGET_IN.pack(1))

        r = rig.lookup(b"f10")

        assert r.error == 0
    finally:
        rig.close()


def test_open_beyond_the_fd_budget_fails_enfile(tmp_path):
    (tmp_path / "share").mkdir()
    rig = Rig(tmp_path / "share", budget=FdBudget(limit=10))
    rig.init()
    open(os.path.join(rig.root, "f"), "w").close()
    try:
        nodeid = rig.entry(b"f").nodeid  # 1 of the 10: 9 handles fit
        errors = [rig.open(nodeid).error for _ in range(10)]

        assert (errors, rig.fs.handle_count()) == ([0] * 9 + [-errno.ENFILE], 9)
    finally:
        rig.close()


def test_open_after_release_frees_the_fd_budget_succeeds(tmp_path):
    (tmp_path / "share").mkdir()
    rig = Rig(tmp_path / "share", budget=FdBudget(limit=10))
    rig.init()
    open(os.path.join(rig.root, "f"), "w").close()
    try:
        nodeid = rig.entry(b"f").nodeid
        fhs = [rig.fh(nodeid) for _ in range(9)]
        rig.call(F.RELEASE, body=F.RELEASE_IN.pack(fhs[0], 0, 0, 0))

        r = rig.open(nodeid)

        assert r.error == 0
    finally:
        rig.close()


def test_close_gives_every_fd_back_to_the_budget(rig):
    os.mkdir(os.path.join(rig.root, "d"))
    open(os.path.join(rig.root, "f"), "w").close()
    rig.fh(rig.entry(b"f").nodeid)
    d = rig.entry(b"d").nodeid
    rig.dir_fh(d)
    rig.call(F.FORGET, d, F.FORGET_IN.pack(1))  # pinned by its handle only
    held = rig.budget.held

    rig.fs.close()

    assert (held, rig.budget.held) == (4, 0)


def test_close_closes_every_fd_it_opened(fresh):
    before = open_fd_count()
    fresh.init()
    open(os.path.join(fresh.root, "f"), "w").close()
    fresh.fh(fresh.entry(b"f").nodeid)
    fresh.dir_fh()

    fresh.fs.close()

    assert open_fd_count() == before


def test_getattr_of_an_unknown_nodeid_fails_ebadf(rig):
    r = rig.call(F.GETATTR, 12345, F.GETATTR_IN.pack(0, 0, 0))

    assert r.error == -errno.EBADF


# -- ids -----------------------------------------------------------------------------------

def test_attrs_report_host_owner_as_the_mapped_guest_uid(tmp_path):
    (tmp_path / "share").mkdir()
    rig = Rig(tmp_path / "share", uid_map=IdMap.parse(f"5000 {os.getuid()} 1"),
              gid_map=IdMap.parse(f"6000 {os.getgid()} 1"))
    rig.init()
    open(os.path.join(rig.root, "f"), "w").close()
    try:
        e = rig.entry(b"f")

        assert (e.uid, e.gid) == (5000, 6000)
    finally:
        rig.close()


def test_attrs_report_an_unmapped_host_owner_as_the_overflow_id(tmp_path):
    (tmp_path / "share").mkdir()
    rig = Rig(tmp_path / "share", uid_map=IdMap.parse("5000 123456 1"))
    rig.init()
    open(os.path.join(rig.root, "f"), "w").close()
    try:
        assert rig.entry(b"f").uid == OVERFLOW_ID
    finally:
        rig.close()


@needs_root
def test_setattr_uid_translates_the_guest_uid_to_the_host(tmp_path):
    (tmp_path / "share").mkdir()
    rig = Rig(tmp_path / "share", uid_map=IdMap.parse(f"0 0 1, 5000 1234 1"))
    rig.init()
    open(os.path.join(rig.root, "f"), "w").close()  # owned by host root
    try:
        r = rig.call(F.SETATTR, rig.entry(b"f").nodeid, setattr_in(F.FATTR_UID, uid=5000))

        assert (r.error, os.stat(os.path.join(rig.root, "f")).st_uid) == (0, 1234)
    finally:
        rig.close()


def test_setattr_of_an_unmapped_guest_uid_fails_einval(tmp_path):
    (tmp_path / "share").mkdir()
    rig = Rig(tmp_path / "share", uid_map=IdMap.parse(f"5000 {os.getuid()} 1"))
    rig.init()
    open(os.path.join(rig.root, "f"), "w").close()
    try:
        r = rig.call(F.SETATTR, rig.entry(b"f").nodeid, setattr_in(F.FATTR_UID, uid=42))

        assert r.error == -errno.EINVAL
    finally:
        rig.close()


@needs_root
def test_create_by_guest_uid_5000_is_owned_by_the_mapped_host_uid(tmp_path):
    (tmp_path / "share").mkdir()
    rig = Rig(tmp_path / "share", uid_map=IdMap.parse("5000 1234 1"),
              gid_map=IdMap.parse("5000 4321 1"))
    rig.init()
    try:
        rig.call(F.MKDIR, ROOT, F.MKDIR_IN.pack(0o755, 0) + b"d\0", uid=5000, gid=5000)

        st_ = os.stat(os.path.join(rig.root, "d"))
        assert (st_.st_uid, st_.st_gid) == (1234, 4321)
    finally:
        rig.close()


@needs_root
def test_access_checks_the_owner_bits_of_the_mapped_caller(tmp_path):
    (tmp_path / "share").mkdir()
    rig = Rig(tmp_path / "share", uid_map=IdMap.parse("5000 1234 1"))
    rig.init()
    path = os.path.join(rig.root, "f")
    open(path, "w").close()
    os.chown(path, 1234, 0)
    os.chmod(path, 0o400)
    try:
        nodeid = rig.entry(b"f").nodeid
        read = rig.call(F.ACCESS, nodeid, F.ACCESS_IN.pack(os.R_OK, 0), uid=5000).error
        write = rig.call(F.ACCESS, nodeid, F.ACCESS_IN.pack(os.W_OK, 0), uid=5000).error

        assert (read, write) == (0, -errno.EACCES)
    finally:
        rig.close()


def test_access_f_ok_of_an_unmapped_caller_succeeds(tmp_path):
    (tmp_path / "share").mkdir()
    rig = Rig(tmp_path / "share", uid_map=IdMap.parse("5000 1234 1"))
    rig.init()
    try:
        r = rig.call(F.ACCESS, ROOT, F.ACCESS_IN.pack(os.F_OK, 0), uid=7)

        assert r.error == 0
    finally:
        rig.close()


# -- malformed requests ----------------------------------------------------------------------

def test_reply_header_len_is_the_bytes_written(rig):
    written, raw = rig.raw(header(F.STATFS, ROOT, b""), reply_len=4096)

    assert (written, F.OUT_HEADER.unpack_from(raw)[0]) == (
        F.OUT_HEADER.size + F.KSTATFS.size, F.OUT_HEADER.size + F.KSTATFS.size)


def test_reply_echoes_the_request_unique(rig):
    written, raw = rig.raw(header(F.STATFS, ROOT, b"", unique=0xDEADBEEF), reply_len=4096)

    assert F.OUT_HEADER.unpack_from(raw)[2] == 0xDEADBEEF


def test_unknown_opcode_fails_enosys(rig):
    r = rig.call(999, ROOT, b"")

    assert r.error == -errno.ENOSYS


def test_truncated_header_gets_einval_and_the_next_request_still_works(rig):
    written, raw = rig.raw(header(F.GETATTR, ROOT, b"")[:20])

    after = rig.call(F.GETATTR, ROOT, F.GETATTR_IN.pack(0, 0, 0))
    assert (written, F.OUT_HEADER.unpack_from(raw)[1], after.error) == (16, -errno.EINVAL, 0)


def test_len_field_beyond_the_buffer_fails_einval(rig):
    r = rig.call(F.GETATTR, ROOT, F.GETATTR_IN.pack(0, 0, 0), length=1 << 20)

    assert r.error == -errno.EINVAL


def test_getattr_with_args_cut_short_fails_einval(rig):
    r = rig.call(F.GETATTR, ROOT, b"\0" * 8)

    assert r.error == -errno.EINVAL


def test_lookup_of_name_without_nul_fails_einval(rig):
    open(os.path.join(rig.root, "f"), "w").close()

    r = rig.call(F.LOOKUP, ROOT, b"f")

    assert r.error == -errno.EINVAL


def test_lookup_with_a_reply_buffer_too_small_for_the_entry_takes_no_reference(rig):
    open(os.path.join(rig.root, "f"), "w").close()

    r = rig.call(F.LOOKUP, ROOT, b"f\0", reply_len=64)

    assert (r.error, rig.fs.inode_count()) == (-errno.EINVAL, 1)


def test_request_with_no_room_for_a_reply_does_nothing(rig):
    open(os.path.join(rig.root, "f"), "w").close()

    r = rig.call(F.UNLINK, ROOT, b"f\0", reply_len=8)

    assert (r.written, os.path.exists(os.path.join(rig.root, "f"))) == (0, True)


def test_forget_with_a_bad_len_gets_no_reply(rig):
    r = rig.call(F.FORGET, ROOT, F.FORGET_IN.pack(1), length=1 << 20)

    assert r.written == 0


_OPCODES = sorted(F.OP_NAMES) + [0, 52, 4096, 0xFFFF_FFFF]
_NODEIDS = [0, ROOT, 2, 3, 1 << 63, (1 << 64) - 1]
_U32 = st.one_of(st.sampled_from([0, 1, 4096, 1 << 20, (1 << 31) - 1, (1 << 32) - 1]),
                 st.integers(0, (1 << 32) - 1))
_U64 = st.one_of(st.sampled_from([0, 1, 2, (1 << 63) - 1, 1 << 63, (1 << 64) - 1]),
                 st.integers(0, (1 << 64) - 1))


@st.composite
def _requests(draw) -> bytes:
    """A request as a hostile driver might send: a real op with lying fields, names
    without NUL, huge sizes, unknown nodeids and fhs, or raw bytes."""
    kind = draw(st.integers(0, 9))
    if kind == 0:
        return draw(st.binary(max_size=60))
    opcode = draw(st.sampled_from(_OPCODES))
    fields = draw(st.lists(st.one_of(_U32.map(lambda v: struct.pack("<I", v)),
                                     _U64.map(lambda v: struct.pack("<Q", v))), max_size=12))
    body = b"".join(fields)
    if draw(st.booleans()):
        body += draw(st.sampled_from([b"f", b"f\0", b"..\0", b"a/b\0", b"x" * 300 + b"\0",
                                      b"user.k\0", b"d\0e\0", b"f\0" + b"v" * 40]))
    length = F.IN_HEADER.size + len(body)
    length = draw(st.sampled_from([length, length, 0, 39, length - 1, length + 1, 1 << 31,
                                   (1 << 32) - 1]))
    nodeid = draw(st.sampled_from(_NODEIDS))
    return header(opcode, nodeid, body, length=length & 0xFFFF_FFFF,
                  uid=draw(st.sampled_from([0, os.getuid(), 65534])))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(requests=st.lists(_requests(), min_size=1, max_size=8))
def test_malformed_requests_get_error_replies_and_the_server_keeps_working(requests):
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("f", "d"):
            (os.mkdir if name == "d" else lambda p: open(p, "w").close())(os.path.join(tmp, name))
        fds = open_fd_count()
        rig = Rig(tmp)
        try:
            rig.init()
            rig.fh(rig.entry(b"f").nodeid)  # fh 1, nodeid 2 exist for requests to hit
            for request in requests:
                opcode = struct.unpack_from("<I", request, 4)[0] if len(request) >= 8 else None
                written, raw = rig.raw(request, reply_len=8192)

                if opcode in F.NO_REPLY and len(request) >= F.IN_HEADER.size:
                    assert written == 0
                else:
                    length, error = F.OUT_HEADER.unpack_from(raw)[:2]
                    assert written >= F.OUT_HEADER.size and length == written
                    assert -4095 <= error <= 0 and (error == 0 or written == F.OUT_HEADER.size)
            if not rig.fs.initialized:  # a DESTROY ended the session: a new one starts
                rig.init()
            after = rig.call(F.GETATTR, ROOT, F.GETATTR_IN.pack(0, 0, 0))
            assert after.error == 0
            assert rig.fs.handle_count() <= 1 + len(requests)
        finally:
            rig.close()
        assert (rig.budget.held, open_fd_count()) == (0, fds)
