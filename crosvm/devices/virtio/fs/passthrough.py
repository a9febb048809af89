"""The virtio-fs file server: FUSE requests from the guest served from a host directory
(crosvm's devices/src/virtio/fs/passthrough.rs).

The guest is hostile. Containment rests on three rules:

* Every inode the guest can name is held as an O_PATH|O_NOFOLLOW fd, reached from the
  shared root one checked component at a time (`check_name`, then `openat` relative to
  the parent's fd). No path is ever built from guest names and no symlink is ever
  followed: a symlink is an inode like any other (READLINK returns its text; OPEN of it
  fails ELOOP).
* I/O goes through `reopen` (the inode itself via /proc/self/fd, never a path), and
  only for regular files and directories: fifos, sockets and device nodes are never
  opened (a fifo open would block the device), nor created except fifos.
* Every length the guest sends is checked against what its buffers hold and against
  fixed bounds (1 MiB reads/writes, 64 KiB xattrs, 255-byte names, 65536 open
  handles) before anything acts on it; every fd an inode or handle holds also counts
  against the process's fd budget (fdbudget.py), beyond which the guest gets ENFILE
  rather than the VMM running out of fds.
* An fd is closed only when nothing can use it any more: a handle pins the inode it
  was opened from (FORGET does not close that inode's fd while the handle is open),
  a request pins what it uses, and a closed fd is forgotten (-1), so that no request
  ever acts through an fd number the process has since reused for another file.

Choices (what crosvm leaves to the host setup, decided here):

* An unknown nodeid or fh is EBADF (the guest names something it was never given).
* S_ISUID and S_ISGID are never set for the guest on files: they are stripped from the
  modes of CREATE, MKNOD, MKDIR and SETATTR (a guest must not mint set-id programs on
  the host). Directories may be set-gid: SETATTR keeps S_ISGID on them (`chmod 2775
  dir`), and a directory keeps the S_ISGID the host kernel gives it in a set-gid parent.
* WRITE with FUSE_WRITE_KILL_PRIV clears S_ISUID, and S_ISGID when group-executable
  (the host kernel would not when the device runs as root). HANDLE_KILLPRIV is not
  negotiated: the guest kernel removes those bits itself with SETATTR.
* ACCESS checks the mode bits against the caller's ids mapped to the host (owner,
  group (primary only: supplementary groups are not sent), other; host root passes
  read/write, and execute when any x bit is set or it is a directory). F_OK is
  existence. An unmapped caller gets EACCES for anything but F_OK.
* New nodes are chowned to the caller's mapped ids; if the host refuses (EPERM/EINVAL:
  the device is not privileged) they keep the device's identity, as for an unmapped
  id. In a set-gid directory the group is the directory's, as the host would make it.
* xattrs work on regular files and directories only (others: EOPNOTSUPP); POSIX ACL
  values have their uids/gids translated with the maps. The guest may set and remove
  only `user.*` and (with posix_acl) the two POSIX ACLs: anything else (`trusted.*`,
  `security.*` such as file capabilities and SELinux labels) is EPERM, as the device
  may run as host root. Reading and listing show them all.
* WRITE on a handle not opened for writing is EBADF before anything changes.
* ascii_casefold applies to LOOKUP only (creating a name differing in case from an
  existing one is left to the host).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import stat
import struct
import threading
from dataclasses import dataclass
from typing import Iterator

from crosvm.devices.virtio.descriptor_utils import Reader, ShortBuffer, WorkerStopping, Writer
from crosvm.devices.virtio.fs import fuse as F
from crosvm.devices.virtio.fs.fdbudget import PROCESS_BUDGET, FdBudget
from crosvm.devices.virtio.fs.idmap import IdMap, host_owner
from crosvm.devices.virtio.fs.names import ACL_XATTRS, NAME_MAX, check_name, guest_may_set_xattr
from crosvm.devices.virtio.fs.reopen import reopen

log = logging.getLogger(__name__)

MAX_IO = 1 << 20            # max_write, and the most one READ/READDIR returns
PAGE_SIZE = 4096
MAX_HANDLES = 65536         # open files and directories at once (then EMFILE)
MAX_INODES = 1 << 20        # inodes the guest holds at once (then ENFILE)
MAX_ARGS = F.XATTR_SIZE_MAX + 2 * (NAME_MAX + 1) + 4096  # a request's args, but WRITE's data
PATH_MAX = 4096
MAX_OFFSET = (1 << 63) - 1
_NO_ID = 0xFFFF_FFFF        # chown's "leave it"

# Flags a guest may open with; the rest (O_CREAT, O_NOFOLLOW, O_PATH, O_DIRECT, O_ASYNC,
# O_NOCTTY, O_TMPFILE, ...) are dropped.
_OPEN_FLAGS = os.O_ACCMODE | os.O_APPEND | os.O_TRUNC | os.O_SYNC | os.O_DSYNC
_SETID = stat.S_ISUID | stat.S_ISGID
_PERMS = 0o1777             # what guest modes may set: rwx bits and sticky
_ACL_NAMES = ACL_XATTRS
_ACL_USER, _ACL_GROUP = 0x02, 0x08
_ACL_HEADER, _ACL_ENTRY = struct.Struct("<I"), struct.Struct("<HHI")
_DIRENT64 = struct.Struct("<QqHB")          # linux_dirent64 without the name
_GETDENTS64 = {"x86_64": 217, "aarch64": 61, "riscv64": 61}.get(os.uname().machine)
_UTIME_NOW, _UTIME_OMIT = (1 << 30) - 1, (1 << 30) - 2

_libc = ctypes.CDLL(None, use_errno=True)


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


def _check(result: int) -> int:
    if result < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return result


def _renameat2(old_dir: int, old: bytes, new_dir: int, new: bytes, flags: int) -> None:
    _check(_libc.renameat2(ctypes.c_int(old_dir), ctypes.c_char_p(old), ctypes.c_int(new_dir),
                           ctypes.c_char_p(new), ctypes.c_uint(flags)))


def _utimensat(dir_fd: int, name: bytes, atime: tuple[int, int], mtime: tuple[int, int]) -> None:
    times = (_Timespec * 2)(_Timespec(*atime), _Timespec(*mtime))
    _check(_libc.utimensat(ctypes.c_int(dir_fd), ctypes.c_char_p(name), times, ctypes.c_int(0)))


def _fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    _check(_libc.fallocate64(ctypes.c_int(fd), ctypes.c_int(mode), ctypes.c_int64(offset),
                             ctypes.c_int64(length)))


def _getdents64(fd: int, buf: ctypes.Array) -> bytes:
    if _GETDENTS64 is None:
        raise OSError(errno.ENOSYS, "getdents64 number unknown on this machine")
    n = _check(_libc.syscall(ctypes.c_long(_GETDENTS64), ctypes.c_int(fd), buf,
                             ctypes.c_size_t(len(buf))))
    return buf.raw[:n]


@dataclass
class FsOptions:
    """How the shared directory is offered to the guest (crosvm's --shared-dir keys)."""

    cache: str = "auto"            # "never" | "auto" | "always"
    timeout: float = 5.0           # entry and attr timeout, seconds
    negative_timeout: float = 0.0  # cache negative lookups (entry with nodeid 0) this long
    writeback: bool = False        # FUSE_WRITEBACK_CACHE when the guest offers it
    posix_acl: bool = True         # FUSE_POSIX_ACL when offered (ACL xattrs passed through)
    ascii_casefold: bool = False   # lookups match names ignoring ASCII case

    def __post_init__(self) -> None:
        if self.cache not in ("never", "auto", "always"):
            raise ValueError(f"cache must be never, auto or always, not {self.cache!r}")
        if not (0 <= self.timeout < 1 << 32 and 0 <= self.negative_timeout < 1 << 32):
            raise ValueError("timeouts must be between 0 and 2^32 seconds")


class _Inode:
    """One host inode the guest holds: an O_PATH fd and the guest's lookup count.

    The fd stays open while anything may use it: the guest's lookups (`refcount`), the
    requests using it right now (`users`) and the open handles made from it (`handles`).
    Once FORGET (or `close`) removed it from the tables (`dead`), the last of those to
    go closes it and gives its fd back to the budget; `fd` is then -1, never a number
    the process may since have given to another file."""

    __slots__ = ("nodeid", "fd", "key", "type", "refcount", "users", "handles", "dead",
                 "owned")

    def __init__(self, nodeid: int, fd: int, key: tuple[int, int], type_: int,
                 owned: bool = True) -> None:
        self.nodeid, self.fd, self.key, self.type = nodeid, fd, key, type_
        self.refcount = 1
        self.users = 0      # requests using the fd right now (it is closed after them)
        self.handles = 0    # open handles made from it (they pin it: READDIRPLUS, SETATTR)
        self.dead = False
        self.owned = owned  # the server's fd (counted in the budget), not the root_fd


class _Handle:
    """One open file or directory (OPEN/CREATE/OPENDIR). It pins its inode until its
    own fd is closed."""

    __slots__ = ("fh", "fd", "inode", "is_dir", "writable", "users", "dead", "lock")

    def __init__(self, fh: int, fd: int, inode: _Inode, is_dir: bool, writable: bool) -> None:
        self.fh, self.fd, self.inode, self.is_dir = fh, fd, inode, is_dir
        self.writable = writable
        self.users = 0
        self.dead = False
        self.lock = threading.Lock()  # READDIR's lseek + getdents are one step


class PassthroughFs:
    """A FUSE server for the directory `root_fd` (an O_PATH or O_DIRECTORY fd), for
    virtio-fs. `proc_fd` is /proc/self/fd (see reopen.py). Both stay the caller's.

    Every fd an inode or handle holds is counted in `budget` (the process's, shared by
    every server in it, unless given another): a LOOKUP, OPEN, ... that would go
    beyond it fails ENFILE. Safe to call from several threads (the request and hiprio
    queues): an fd is closed only once no request uses it and no handle pins it."""

    def __init__(self, root_fd: int, proc_fd: int, options: FsOptions, uid_map: IdMap,
                 gid_map: IdMap, budget: FdBudget | None = None) -> None:
        self.root_fd, self.proc_fd, self.options = root_fd, proc_fd, options
        self.uid_map, self.gid_map = uid_map, gid_map
        self.budget = PROCESS_BUDGET if budget is None else budget
        self._lock = threading.Lock()
        st = os.fstat(root_fd)
        if not stat.S_ISDIR(st.st_mode):
            raise NotADirectoryError(errno.ENOTDIR, "the shared root is not a directory")
        self._root_key = (st.st_dev, st.st_ino)
        self._reset()

    # -- tables ----------------------------------------------------------------------------
    def _reset(self) -> None:
        self.initialized = False
        self.flags = 0              # negotiated INIT flags
        self.minor = F.KERNEL_MINOR_VERSION
        self._inodes: dict[int, _Inode] = {}
        self._by_key: dict[tuple[int, int], _Inode] = {}
        self._handles: dict[int, _Handle] = {}
        self._next_nodeid = F.ROOT_ID + 1
        self._next_fh = 1
        root = _Inode(F.ROOT_ID, self.root_fd, self._root_key, stat.S_IFDIR, owned=False)
        self._inodes[F.ROOT_ID] = root
        self._by_key[self._root_key] = root

    def close(self) -> None:
        """Closes every fd the server opened (not root_fd or proc_fd) and gives them back
        to the budget; one a request in another thread uses right now is closed when
        that request ends."""
        with self._lock:
            handles = list(self._handles.values())
            inodes = list(self._inodes.values()) + [h.inode for h in handles]
            for obj in handles + inodes:
                obj.dead = True
            fds = []
            for h in handles:
                fds += self._freed(h)
            for inode in inodes:
                fds += self._freed(inode)
            self._reset()
        self._close_fds(fds)

    def inode_count(self) -> int:
        """Inodes held for the guest, the root included."""
        with self._lock:
            return len(self._inodes)

    def handle_count(self) -> int:
        """Open files and directories."""
        with self._lock:
            return len(self._handles)

    @contextlib.contextmanager
    def _inode(self, nodeid: int) -> Iterator[_Inode]:
        with self._lock:
            inode = self._inodes.get(nodeid)
            if inode is None:
                raise OSError(errno.EBADF, f"no inode {nodeid}")
            inode.users += 1
        try:
            yield inode
        finally:
            self._unuse(inode)

    def _unuse(self, obj: _Inode | _Handle) -> None:
        with self._lock:
            obj.users -= 1
            fds = self._freed(obj)
        self._close_fds(fds)

    @staticmethod
    def _freed(obj: _Inode | _Handle) -> list[int]:
        """Under the lock: the fds to close now that `obj` may have lost its last user,
        forgotten (-1) so that nothing uses their numbers again. A handle's going
        unpins its inode."""
        fds = []
        if isinstance(obj, _Handle):
            if not obj.dead or obj.users or obj.fd < 0:
                return fds
            fds.append(obj.fd)
            obj.fd = -1
            obj.inode.handles -= 1
            obj = obj.inode
        if obj.dead and not obj.users and not obj.handles and obj.owned and obj.fd >= 0:
            fds.append(obj.fd)
            obj.fd = -1
        return fds

    def _close_fds(self, fds: list[int]) -> None:
        for fd in fds:
            _close(fd)
        if fds:
            self.budget.give(len(fds))

    @contextlib.contextmanager
    def _handle(self, fh: int, is_dir: bool) -> Iterator[_Handle]:
        with self._lock:
            h = self._handles.get(fh)
            if h is None:
                raise OSError(errno.EBADF, f"no handle {fh}")
            h.users += 1
        try:
            if h.is_dir != is_dir:
                raise OSError(errno.EISDIR if h.is_dir else errno.ENOTDIR, "handle type")
            yield h
        finally:
            self._unuse(h)

    def _add_ref(self, fd: int, st: os.stat_result, use: bool = False) -> _Inode:
        """The inode for the O_PATH `fd` (which this takes), one lookup more; with
        `use`, in use by the caller too (who then calls `_unuse`)."""
        key = (st.st_dev, st.st_ino)
        error = None
        with self._lock:
            inode = self._by_key.get(key)
            if inode is None:
                try:
                    if len(self._inodes) >= MAX_INODES:
                        raise OSError(errno.ENFILE, "too many inodes")
                    self.budget.take(1)
                except OSError as e:
                    error = e
                else:
                    inode = _Inode(self._next_nodeid, fd, key, stat.S_IFMT(st.st_mode))
                    self._next_nodeid += 1
                    self._inodes[inode.nodeid] = inode
                    self._by_key[key] = inode
                    inode.users += use
                    return inode
            else:
                inode.refcount += 1
                inode.users += use
        _close(fd)  # a second fd for an inode already held, or no room
        if error is not None:
            raise error
        return inode

    def _forget(self, nodeid: int, count: int, only: _Inode | None = None) -> None:
        """`count` lookups fewer for `nodeid` (if it is still the inode `only`, when given:
        nodeids start again after a DESTROY)."""
        with self._lock:
            inode = self._inodes.get(nodeid)
            if inode is None or (only is not None and inode is not only):
                return
            inode.refcount = max(0, inode.refcount - count)
            if inode.refcount or nodeid == F.ROOT_ID:
                return
            del self._inodes[nodeid]
            if self._by_key.get(inode.key) is inode:
                del self._by_key[inode.key]
            inode.dead = True
            fds = self._freed(inode)  # none while a handle or a request still uses it
        self._close_fds(fds)

    def _new_handle(self, fd: int, inode: _Inode, is_dir: bool, writable: bool = False) -> int:
        """A handle for the open `fd` (which this takes) of `inode`, which the caller
        has in use (so its fd is open: the handle pins it from here on)."""
        with self._lock:
            try:
                if len(self._handles) >= MAX_HANDLES:
                    raise OSError(errno.EMFILE, "too many open handles")
                if inode.fd < 0:
                    raise OSError(errno.EBADF, "the inode was closed")
                self.budget.take(1)
            except OSError:
                _close(fd)
                raise
            fh = self._next_fh
            self._next_fh += 1
            self._handles[fh] = _Handle(fh, fd, inode, is_dir, writable)
            inode.handles += 1
            return fh

    # -- the request loop --------------------------------------------------------------------
    def handle(self, reader: Reader, writer: Writer) -> int:
        """One request from the request queue (or hiprio queue): read the fuse_in_header
        and args from `reader`, write the reply to `writer`, return bytes written (0 for
        FORGET/BATCH_FORGET/INTERRUPT, which have no reply). Never raises for anything
        the guest sent (only WorkerStopping, when the device is resetting)."""
        try:
            return self._request(reader, writer)
        except WorkerStopping:
            raise
        except Exception:  # a bug in the framing itself: logged, the request dropped
            log.exception("virtio-fs: request failed")
            return 0

    def _request(self, reader: Reader, writer: Writer) -> int:
        avail = reader.available_bytes()
        if avail < F.IN_HEADER.size:
            return self._reply(writer, 0, -errno.EINVAL)  # no unique to answer to
        hdr = F.InHeader.unpack(reader.read(F.IN_HEADER.size))
        no_reply = hdr.opcode in F.NO_REPLY
        if hdr.len < F.IN_HEADER.size or hdr.len > avail:
            log.debug("virtio-fs: request len %d, chain holds %d", hdr.len, avail)
            return 0 if no_reply else self._reply(writer, hdr.unique, -errno.EINVAL)
        if not no_reply and writer.available_bytes() < F.OUT_HEADER.size:
            return 0  # nowhere to answer: do nothing the guest could not learn of
        op = _OPS.get(hdr.opcode)
        if op is None:
            return 0 if no_reply else self._reply(writer, hdr.unique, -errno.ENOSYS)
        method, reply_size = op
        if not self.initialized and hdr.opcode != F.INIT:
            return 0 if no_reply else self._reply(writer, hdr.unique, -errno.EIO)
        if reply_size and writer.available_bytes() < F.OUT_HEADER.size + reply_size:
            return self._reply(writer, hdr.unique, -errno.EINVAL)
        body_len = hdr.len - F.IN_HEADER.size
        try:
            if hdr.opcode == F.WRITE:  # the data stays in guest memory: written zero-copy
                args = F.Args(reader.read(min(body_len, F.WRITE_IN.size)))
                extra = body_len - args.remaining
            elif body_len > MAX_ARGS:
                raise OSError(errno.E2BIG, f"{body_len} bytes of arguments")
            else:
                args, extra = F.Args(reader.read(body_len)), 0
            result = method(self, hdr, args, extra, reader, writer)
        except WorkerStopping:
            raise
        except ShortBuffer as e:
            log.debug("virtio-fs: %s: %s", F.OP_NAMES.get(hdr.opcode), e)
            result = -errno.EINVAL
        except OSError as e:
            result = -(e.errno or errno.EIO)
        except (F.FuseError, ValueError, OverflowError) as e:
            log.debug("virtio-fs: %s: %s", F.OP_NAMES.get(hdr.opcode), e)
            result = -errno.EINVAL
        except Exception:  # a bug here must not end the device: the guest gets EIO
            log.exception("virtio-fs: %s failed", F.OP_NAMES.get(hdr.opcode))
            result = -errno.EIO
        if no_reply:
            return 0
        if isinstance(result, bytes):
            return self._reply(writer, hdr.unique, 0, result)
        if result < 0:
            return self._reply(writer, hdr.unique, result)
        return result  # the op wrote its own reply (READ, READDIR)

    @staticmethod
    def _reply(writer: Writer, unique: int, error: int, body: bytes = b"") -> int:
        total = F.OUT_HEADER.size + len(body)
        if total > writer.available_bytes():
            if error == 0 and writer.available_bytes() >= F.OUT_HEADER.size:
                return PassthroughFs._reply(writer, unique, -errno.EINVAL)
            return 0
        writer.write(F.out_header(total, error, unique) + body)
        return total

    # -- replies -----------------------------------------------------------------------------
    def _attr(self, st: os.stat_result) -> tuple:
        a_s, a_ns = divmod(st.st_atime_ns, 10**9)
        m_s, m_ns = divmod(st.st_mtime_ns, 10**9)
        c_s, c_ns = divmod(st.st_ctime_ns, 10**9)
        major, minor = os.major(st.st_rdev), os.minor(st.st_rdev)
        rdev = ((minor & 0xFF) | (major << 8) | ((minor & ~0xFF) << 12)) & 0xFFFF_FFFF
        u64 = (1 << 64) - 1
        return (st.st_ino, st.st_size, st.st_blocks, a_s & u64, m_s & u64, c_s & u64,
                a_ns, m_ns, c_ns, st.st_mode, min(st.st_nlink, 0xFFFF_FFFF),
                self.uid_map.to_guest(st.st_uid), self.gid_map.to_guest(st.st_gid), rdev,
                st.st_blksize & 0xFFFF_FFFF, 0)

    @staticmethod
    def _valid(seconds: float) -> tuple[int, int]:
        whole = int(seconds)
        return whole, int((seconds - whole) * 1e9)

    def _entry(self, inode: _Inode, st: os.stat_result) -> bytes:
        t, t_ns = self._valid(self.options.timeout)
        return F.ENTRY_OUT.pack(inode.nodeid, 0, t, t, t_ns, t_ns, *self._attr(st))

    def _attr_out(self, st: os.stat_result) -> bytes:
        t, t_ns = self._valid(self.options.timeout)
        return F.ATTR_OUT.pack(t, t_ns, 0, *self._attr(st))

    # -- lookups -----------------------------------------------------------------------------
    def _open_child(self, parent: _Inode, name: bytes, casefold: bool = False) -> int:
        """An O_PATH fd for `name` in `parent`, never following a symlink."""
        check_name(name)
        flags = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            return os.open(name, flags, dir_fd=parent.fd)
        except FileNotFoundError:
            if not casefold:
                raise
            match = self._casefold_match(parent, name)
            if match is None:
                raise
            return os.open(match, flags, dir_fd=parent.fd)

    def _casefold_match(self, parent: _Inode, name: bytes) -> bytes | None:
        want = name.lower()  # bytes.lower folds ASCII letters only, as crosvm's option
        fd = reopen(self.proc_fd, parent.fd, os.O_RDONLY | os.O_DIRECTORY)
        try:
            for entry in os.listdir(fd):
                raw = os.fsencode(entry)
                if raw.lower() == want:
                    return raw
        finally:
            os.close(fd)
        return None

    def _lookup_fd(self, fd: int, use: bool = False) -> tuple[_Inode, os.stat_result]:
        """Takes the O_PATH `fd`: its inode, with one more lookup (and in use by the
        caller with `use`), and its stat."""
        try:
            st = os.fstat(fd)
        except OSError:
            _close(fd)
            raise
        return self._add_ref(fd, st, use), st

    def _lookup(self, parent: _Inode, name: bytes, casefold: bool = False) -> bytes:
        inode, st = self._lookup_fd(self._open_child(parent, name, casefold))
        return self._entry(inode, st)

    def _op_lookup(self, hdr, args, extra, reader, writer):
        name = args.name()
        with self._inode(hdr.nodeid) as parent:
            try:
                return self._lookup(parent, name, self.options.ascii_casefold)
            except FileNotFoundError:
                if self.options.negative_timeout <= 0:
                    raise
                t, t_ns = self._valid(self.options.negative_timeout)
                return F.ENTRY_OUT.pack(0, 0, t, 0, t_ns, 0, *([0] * 16))

    def _op_forget(self, hdr, args, extra, reader, writer):
        (count,) = args.take(F.FORGET_IN)
        self._forget(hdr.nodeid, count)

    def _op_batch_forget(self, hdr, args, extra, reader, writer):
        count, _ = args.take(F.BATCH_FORGET_IN)
        for _ in range(min(count, args.remaining // F.FORGET_ONE.size)):
            nodeid, nlookup = args.take(F.FORGET_ONE)
            self._forget(nodeid, nlookup)

    def _op_interrupt(self, hdr, args, extra, reader, writer):
        return None  # requests are served synchronously: nothing to interrupt

    # -- attributes --------------------------------------------------------------------------
    def _op_getattr(self, hdr, args, extra, reader, writer):
        flags, _, fh = args.take(F.GETATTR_IN)
        with self._inode(hdr.nodeid) as inode:
            if flags & F.GETATTR_FH:
                with self._handle(fh, inode.type == stat.S_IFDIR) as h:
                    return self._attr_out(os.fstat(h.fd))
            return self._attr_out(os.fstat(inode.fd))

    def _op_setattr(self, hdr, args, extra, reader, writer):
        (valid, _, fh, size, _, atime, mtime, _, atime_ns, mtime_ns, _, mode, _, uid, gid,
         _) = args.take(F.SETATTR_IN)
        with self._inode(hdr.nodeid) as inode:
            proc_name = str(inode.fd)  # /proc/self/fd/N: the inode itself, never a path
            if valid & (F.FATTR_UID | F.FATTR_GID):
                os.chown(proc_name, *host_owner(
                    self.uid_map, self.gid_map, uid if valid & F.FATTR_UID else None,
                    gid if valid & F.FATTR_GID else None), dir_fd=self.proc_fd)
            if valid & F.FATTR_MODE:
                if inode.type == stat.S_IFLNK:
                    raise OSError(errno.EOPNOTSUPP, "mode of a symlink")
                # A directory may be set-gid (its new nodes get its group): never set-uid.
                keep = stat.S_ISGID if inode.type == stat.S_IFDIR else 0
                os.chmod(proc_name, mode & (_PERMS | keep), dir_fd=self.proc_fd)
            if valid & F.FATTR_SIZE:
                if size > MAX_OFFSET:
                    raise OSError(errno.EFBIG, "size")
                if valid & F.FATTR_FH:
                    with self._handle(fh, False) as h:
                        if h.inode is not inode:
                            raise OSError(errno.EBADF, "handle of another inode")
                        os.ftruncate(h.fd, size)
                else:
                    if inode.type != stat.S_IFREG:
                        raise OSError(errno.EISDIR if inode.type == stat.S_IFDIR
                                      else errno.EINVAL, "truncate of a non-file")
                    fd = reopen(self.proc_fd, inode.fd, os.O_WRONLY | os.O_NONBLOCK)
                    try:
                        os.ftruncate(fd, size)
                    finally:
                        os.close(fd)
            if valid & (F.FATTR_ATIME | F.FATTR_MTIME):
                def when(bit: int, now: int, sec: int, nsec: int) -> tuple[int, int]:
                    if not valid & bit:
                        return 0, _UTIME_OMIT
                    if valid & now:
                        return 0, _UTIME_NOW
                    if sec > MAX_OFFSET or nsec >= 10**9:
                        raise OSError(errno.EINVAL, "time")
                    return sec, nsec
                _utimensat(self.proc_fd, proc_name.encode(),
                           when(F.FATTR_ATIME, F.FATTR_ATIME_NOW, atime, atime_ns),
                           when(F.FATTR_MTIME, F.FATTR_MTIME_NOW, mtime, mtime_ns))
            return self._attr_out(os.fstat(inode.fd))

    def _op_readlink(self, hdr, args, extra, reader, writer):
        with self._inode(hdr.nodeid) as inode:
            if inode.type != stat.S_IFLNK:
                raise OSError(errno.EINVAL, "not a symlink")
            return os.readlink(b"", dir_fd=inode.fd)

    def _op_statfs(self, hdr, args, extra, reader, writer):
        with self._inode(hdr.nodeid) as inode:
            s = os.fstatvfs(inode.fd)
        return F.KSTATFS.pack(s.f_blocks, s.f_bfree, s.f_bavail, s.f_files, s.f_ffree,
                              s.f_bsize, s.f_namemax, s.f_frsize, 0)

    def _op_access(self, hdr, args, extra, reader, writer):
        mask, _ = args.take(F.ACCESS_IN)
        with self._inode(hdr.nodeid) as inode:
            st = os.fstat(inode.fd)
        mask &= os.R_OK | os.W_OK | os.X_OK
        if not mask:
            return b""  # F_OK: it exists
        uid, gid = self.uid_map.to_host(hdr.uid), self.gid_map.to_host(hdr.gid)
        if uid is None or gid is None:
            raise OSError(errno.EACCES, "unmapped caller")
        if uid == 0:
            allowed = os.R_OK | os.W_OK
            if st.st_mode & 0o111 or stat.S_ISDIR(st.st_mode):
                allowed |= os.X_OK
        elif uid == st.st_uid:
            allowed = (st.st_mode >> 6) & 7
        elif gid == st.st_gid:
            allowed = (st.st_mode >> 3) & 7
        else:
            allowed = st.st_mode & 7
        if mask & ~allowed:
            raise OSError(errno.EACCES, "mode bits")
        return b""

    # -- new nodes ---------------------------------------------------------------------------
    def _umode(self, mode: int, umask: int) -> int:
        # The guest kernel applied the caller's umask unless POSIX ACLs are on; applying
        # it again is harmless. Set-id bits are never granted (see the module docstring).
        return mode & ~umask & _PERMS

    def _parent_has_default_acl(self, parent: _Inode) -> bool:
        if not self.flags & F.POSIX_ACL:
            return False
        fd = reopen(self.proc_fd, parent.fd, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.getxattr(fd, "system.posix_acl_default")
            return True
        except OSError:
            return False
        finally:
            os.close(fd)

    def _settle_new(self, parent: _Inode, fd: int, hdr: F.InHeader, perms: int | None,
                    default_acl: bool) -> None:
        """Owner and mode of a node just created (its O_PATH fd `fd`): the caller's
        mapped ids, and the guest's permission bits undone by the process's umask."""
        st = os.fstat(fd)
        proc_name = str(fd)
        # Unmapped callers' nodes go to the device's identity (uid=/gid=) when the
        # map has one (no sandbox), as the sandboxed device would create them.
        uid = self.uid_map.owner_for(hdr.uid)
        gid = self.gid_map.owner_for(hdr.gid)
        if os.fstat(parent.fd).st_mode & stat.S_ISGID:
            gid = None  # a set-gid directory gives its own group, as on the host
        uid = -1 if uid is None or uid == st.st_uid else uid
        gid = -1 if gid is None or gid == st.st_gid else gid
        if (uid, gid) != (-1, -1):
            try:
                os.chown(proc_name, uid, gid, dir_fd=self.proc_fd)
            except OSError as e:
                if e.errno not in (errno.EPERM, errno.EINVAL):
                    raise
                log.debug("virtio-fs: new node keeps the device's ids: %s", e)
        if perms is not None and not default_acl and (st.st_mode & _PERMS) != perms:
            os.chmod(proc_name, (st.st_mode & stat.S_ISGID if stat.S_ISDIR(st.st_mode) else 0)
                     | perms, dir_fd=self.proc_fd)

    def _new_entry(self, parent: _Inode, name: bytes, hdr: F.InHeader, perms: int | None,
                   default_acl: bool, undo) -> bytes:
        try:
            fd = self._open_child(parent, name)
        except OSError:
            with contextlib.suppress(OSError):
                undo()
            raise
        try:
            self._settle_new(parent, fd, hdr, perms, default_acl)
        except OSError:
            _close(fd)
            with contextlib.suppress(OSError):
                undo()
            raise
        inode, st = self._lookup_fd(fd)
        return self._entry(inode, st)

    def _op_mknod(self, hdr, args, extra, reader, writer):
        mode, _, umask, _ = args.take(F.MKNOD_IN)
        name = check_name(args.name())
        kind = stat.S_IFMT(mode)
        if kind == 0:
            kind = stat.S_IFREG
        if kind not in (stat.S_IFREG, stat.S_IFIFO):
            raise OSError(errno.EPERM, "device nodes and sockets are not made for guests")
        perms = self._umode(mode, umask)
        with self._inode(hdr.nodeid) as parent:
            acl = self._parent_has_default_acl(parent)
            os.mknod(name, kind | perms, 0, dir_fd=parent.fd)
            return self._new_entry(parent, name, hdr, perms, acl,
                                   lambda: os.unlink(name, dir_fd=parent.fd))

    def _op_mkdir(self, hdr, args, extra, reader, writer):
        mode, umask = args.take(F.MKDIR_IN)
        name = check_name(args.name())
        perms = self._umode(mode, umask)
        with self._inode(hdr.nodeid) as parent:
            acl = self._parent_has_default_acl(parent)
            os.mkdir(name, perms, dir_fd=parent.fd)
            return self._new_entry(parent, name, hdr, perms, acl,
                                   lambda: os.rmdir(name, dir_fd=parent.fd))

    def _op_symlink(self, hdr, args, extra, reader, writer):
        name = check_name(args.name())
        target = args.name()
        if not target or len(target) >= PATH_MAX:
            raise OSError(errno.ENAMETOOLONG if target else errno.ENOENT, "link target")
        with self._inode(hdr.nodeid) as parent:
            os.symlink(target, name, dir_fd=parent.fd)  # text only: never followed here
            return self._new_entry(parent, name, hdr, None, False,
                                   lambda: os.unlink(name, dir_fd=parent.fd))

    def _op_link(self, hdr, args, extra, reader, writer):
        (old,) = args.take(F.LINK_IN)
        name = check_name(args.name())
        with self._inode(old) as inode, self._inode(hdr.nodeid) as parent:
            if inode.type == stat.S_IFDIR:
                raise OSError(errno.EPERM, "hard link to a directory")
            # linkat through /proc/self/fd links the inode itself (a symlink included).
            os.link(str(inode.fd), name, src_dir_fd=self.proc_fd, dst_dir_fd=parent.fd,
                    follow_symlinks=True)
            return self._lookup(parent, name)

    def _op_unlink(self, hdr, args, extra, reader, writer):
        name = check_name(args.name())
        with self._inode(hdr.nodeid) as parent:
            os.unlink(name, dir_fd=parent.fd)
        return b""

    def _op_rmdir(self, hdr, args, extra, reader, writer):
        name = check_name(args.name())
        with self._inode(hdr.nodeid) as parent:
            os.rmdir(name, dir_fd=parent.fd)
        return b""

    def _rename(self, hdr, newdir: int, flags: int, args) -> bytes:
        old, new = check_name(args.name()), check_name(args.name())
        if flags & ~(F.RENAME_NOREPLACE | F.RENAME_EXCHANGE) or flags == (
                F.RENAME_NOREPLACE | F.RENAME_EXCHANGE):
            raise OSError(errno.EINVAL, "rename flags")  # WHITEOUT would make a device
        with self._inode(hdr.nodeid) as src, self._inode(newdir) as dst:
            if flags:
                _renameat2(src.fd, old, dst.fd, new, flags)
            else:
                os.rename(old, new, src_dir_fd=src.fd, dst_dir_fd=dst.fd)
        return b""

    def _op_rename(self, hdr, args, extra, reader, writer):
        (newdir,) = args.take(F.RENAME_IN)
        return self._rename(hdr, newdir, 0, args)

    def _op_rename2(self, hdr, args, extra, reader, writer):
        newdir, flags, _ = args.take(F.RENAME2_IN)
        return self._rename(hdr, newdir, flags, args)

    # -- open files --------------------------------------------------------------------------
    def _open_flags(self, flags: int) -> int:
        flags &= _OPEN_FLAGS
        if (flags & os.O_ACCMODE) == os.O_ACCMODE:
            raise OSError(errno.EINVAL, "access mode 3")
        if self.flags & F.WRITEBACK_CACHE:
            # The guest's page cache reads to fill pages of write-only files and
            # appends itself.
            if flags & os.O_ACCMODE == os.O_WRONLY:
                flags = (flags & ~os.O_ACCMODE) | os.O_RDWR
            flags &= ~os.O_APPEND
        return flags

    def _file_open_flags(self) -> int:
        return {"never": F.FOPEN_DIRECT_IO, "auto": 0, "always": F.FOPEN_KEEP_CACHE}[
            self.options.cache]

    def _op_open(self, hdr, args, extra, reader, writer):
        flags, _ = args.take(F.OPEN_IN)
        flags = self._open_flags(flags)
        with self._inode(hdr.nodeid) as inode:
            if inode.type != stat.S_IFREG:
                raise OSError({stat.S_IFDIR: errno.EISDIR, stat.S_IFLNK: errno.ELOOP}.get(
                    inode.type, errno.ENXIO), "only regular files are opened")
            fd = reopen(self.proc_fd, inode.fd, flags)
            fh = self._new_handle(fd, inode, False, _writable(flags))
        return F.OPEN_OUT.pack(fh, self._file_open_flags(), 0)

    def _op_create(self, hdr, args, extra, reader, writer):
        flags, mode, umask, _ = args.take(F.CREATE_IN)
        name = check_name(args.name())
        excl = flags & os.O_EXCL
        flags = self._open_flags(flags)
        perms = self._umode(mode, umask)
        with self._inode(hdr.nodeid) as parent:
            acl = self._parent_has_default_acl(parent)
            for _ in range(8):
                try:  # O_CREAT|O_EXCL|O_NOFOLLOW: never opens what exists, never follows
                    fd = os.open(name, flags | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                                 | os.O_CLOEXEC, perms, dir_fd=parent.fd)
                    created = True
                    break
                except FileExistsError:
                    if excl:
                        raise
                try:  # it exists: open it as OPEN would (regular files only)
                    path_fd = self._open_child(parent, name)
                except FileNotFoundError:
                    continue  # removed meanwhile: try creating again
                try:
                    mode = os.fstat(path_fd).st_mode
                    if not stat.S_ISREG(mode):
                        raise OSError(errno.EISDIR if stat.S_ISDIR(mode) else errno.EPERM,
                                      "not a regular file")
                    fd = reopen(self.proc_fd, path_fd, flags)
                finally:
                    os.close(path_fd)
                created = False
                break
            else:
                raise OSError(errno.EAGAIN, "name keeps changing")
            try:
                path_fd = reopen(self.proc_fd, fd, os.O_PATH)
                if created:
                    try:
                        self._settle_new(parent, path_fd, hdr, perms, acl)
                    except OSError:
                        with contextlib.suppress(OSError):
                            os.unlink(name, dir_fd=parent.fd)
                        _close(path_fd)
                        raise
                # In use until the handle pins it: a FORGET meanwhile must not close it.
                inode, st = self._lookup_fd(path_fd, use=True)
            except OSError:
                _close(fd)
                raise
            try:
                fh = self._new_handle(fd, inode, False, _writable(flags))
            except OSError:
                self._forget(inode.nodeid, 1, only=inode)
                raise
            finally:
                self._unuse(inode)
        return self._entry(inode, st) + F.OPEN_OUT.pack(fh, self._file_open_flags(), 0)

    def _op_read(self, hdr, args, extra, reader, writer):
        fh, offset, size, _, _, _, _ = args.take(F.READ_IN)
        with self._handle(fh, False) as h:
            if offset > MAX_OFFSET:
                raise OSError(errno.EINVAL, "offset")
            count = min(size, MAX_IO, writer.available_bytes() - F.OUT_HEADER.size)
            head = writer.split_start_writer(F.OUT_HEADER.size)
            try:
                n = writer.read_from_fd(h.fd, count, offset)
            except OSError as e:
                head.write(F.out_header(F.OUT_HEADER.size, -(e.errno or errno.EIO), hdr.unique))
                return F.OUT_HEADER.size
            except OverflowError:
                head.write(F.out_header(F.OUT_HEADER.size, -errno.EINVAL, hdr.unique))
                return F.OUT_HEADER.size
        head.write(F.out_header(F.OUT_HEADER.size + n, 0, hdr.unique))
        return F.OUT_HEADER.size + n

    def _op_write(self, hdr, args, extra, reader, writer):
        fh, offset, size, write_flags, _, _, _ = args.take(F.WRITE_IN)
        if size > MAX_IO or size > extra or size > reader.available_bytes():
            raise OSError(errno.EINVAL, f"write of {size} bytes, {extra} sent")
        if offset > MAX_OFFSET or offset + size > MAX_OFFSET:
            raise OSError(errno.EFBIG, "offset")
        with self._handle(fh, False) as h:
            if not h.writable:  # before any change: a read-only handle changes nothing
                raise OSError(errno.EBADF, "handle not open for writing")
            if write_flags & F.WRITE_KILL_PRIV:  # as the kernel: before the data lands
                mode = os.fstat(h.fd).st_mode
                kill = stat.S_ISUID | (stat.S_ISGID if mode & stat.S_IXGRP else 0)
                if mode & kill:
                    os.fchmod(h.fd, stat.S_IMODE(mode) & ~kill)
            n = reader.write_to_fd(h.fd, size, offset)
        return F.WRITE_OUT.pack(n, 0)

    def _op_flush(self, hdr, args, extra, reader, writer):
        fh, _, _, _ = args.take(F.FLUSH_IN)
        with self._handle(fh, False):
            return b""

    def _release(self, fh: int, is_dir: bool) -> bytes:
        with self._lock:
            h = self._handles.get(fh)
            if h is None or h.is_dir != is_dir:
                raise OSError(errno.EBADF, f"no handle {fh}")
            del self._handles[fh]
            h.dead = True
            fds = self._freed(h)  # the handle's fd, and its inode's if it was the last pin
        self._close_fds(fds)
        return b""

    def _op_release(self, hdr, args, extra, reader, writer):
        fh, _, _, _ = args.take(F.RELEASE_IN)
        return self._release(fh, False)

    def _op_releasedir(self, hdr, args, extra, reader, writer):
        fh, _, _, _ = args.take(F.RELEASE_IN)
        return self._release(fh, True)

    def _fsync(self, args, is_dir: bool) -> bytes:
        fh, flags, _ = args.take(F.FSYNC_IN)
        with self._handle(fh, is_dir) as h:
            (os.fdatasync if flags & F.FSYNC_FDATASYNC else os.fsync)(h.fd)
        return b""

    def _op_fsync(self, hdr, args, extra, reader, writer):
        return self._fsync(args, False)

    def _op_fsyncdir(self, hdr, args, extra, reader, writer):
        return self._fsync(args, True)

    def _op_fallocate(self, hdr, args, extra, reader, writer):
        fh, offset, length, mode, _ = args.take(F.FALLOCATE_IN)
        if offset > MAX_OFFSET or length > MAX_OFFSET or mode > 0x7FFF_FFFF:
            raise OSError(errno.EINVAL, "fallocate range")
        with self._handle(fh, False) as h:
            _fallocate(h.fd, mode, offset, length)
        return b""

    def _op_lseek(self, hdr, args, extra, reader, writer):
        fh, offset, whence, _ = args.take(F.LSEEK_IN)
        if whence not in (os.SEEK_DATA, os.SEEK_HOLE) or offset > MAX_OFFSET:
            raise OSError(errno.EINVAL, "lseek")
        with self._handle(fh, False) as h:
            return F.LSEEK_OUT.pack(os.lseek(h.fd, offset, whence))

    # -- directories -------------------------------------------------------------------------
    def _op_opendir(self, hdr, args, extra, reader, writer):
        args.take(F.OPEN_IN)
        with self._inode(hdr.nodeid) as inode:
            if inode.type != stat.S_IFDIR:
                raise OSError(errno.ENOTDIR, "not a directory")
            fd = reopen(self.proc_fd, inode.fd, os.O_RDONLY | os.O_DIRECTORY)
            fh = self._new_handle(fd, inode, True)
        return F.OPEN_OUT.pack(fh, F.FOPEN_CACHE_DIR if self.options.cache == "always" else 0, 0)

    def _readdir(self, hdr, args, writer, plus: bool) -> int | bytes:
        fh, offset, size, _, _, _, _ = args.take(F.READ_IN)
        if offset > MAX_OFFSET:
            raise OSError(errno.EINVAL, "offset")
        room = min(size, MAX_IO, writer.available_bytes() - F.OUT_HEADER.size)
        out = bytearray()
        buf = ctypes.create_string_buffer(32 << 10)
        with self._handle(fh, True) as h, h.lock:
            # The host's d_off values are the offsets: stable across calls, seekable.
            os.lseek(h.fd, offset, os.SEEK_SET)
            full = False
            while not full:
                batch = _getdents64(h.fd, buf)
                if not batch:
                    break
                pos = 0
                while pos + _DIRENT64.size <= len(batch):
                    ino, off, reclen, dtype = _DIRENT64.unpack_from(batch, pos)
                    if reclen < _DIRENT64.size:
                        raise OSError(errno.EIO, "getdents64 record")
                    name = batch[pos + _DIRENT64.size:pos + reclen].split(b"\0", 1)[0]
                    pos += reclen
                    need = F.direntplus_size(len(name)) if plus else F.dirent_size(len(name))
                    if len(out) + need > room:
                        full = True
                        break
                    if plus:
                        out += self._direntplus(h.fd, name, ino, off, dtype)
                    else:
                        out += F.pack_dirent(ino, off & MAX_OFFSET, dtype, name)
        if full and not out:
            raise OSError(errno.EINVAL, f"{room} bytes do not hold one entry")
        return bytes(out)

    def _direntplus(self, dir_fd: int, name: bytes, ino: int, off: int, dtype: int) -> bytes:
        """One READDIRPLUS entry, `name` looked up in the directory the handle (in use,
        its fd `dir_fd`) lists: the very directory getdents read, whatever became of the
        inode it was opened from."""
        entry = bytes(F.ENTRY_OUT.size)  # nodeid 0: no lookup, the kernel takes no ref
        if name not in (b".", b".."):
            try:
                inode, st = self._lookup_fd(os.open(
                    name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd))
                entry = self._entry(inode, st)
                ino, dtype = st.st_ino, stat.S_IFMT(st.st_mode) >> 12
            except OSError:
                pass  # gone since getdents: listed without attributes
        return entry + F.pack_dirent(ino, off & MAX_OFFSET, dtype, name)

    def _op_readdir(self, hdr, args, extra, reader, writer):
        return self._readdir(hdr, args, writer, False)

    def _op_readdirplus(self, hdr, args, extra, reader, writer):
        return self._readdir(hdr, args, writer, True)

    # -- xattrs ------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _xattr_fd(self, nodeid: int) -> Iterator[int]:
        with self._inode(nodeid) as inode:
            if inode.type not in (stat.S_IFREG, stat.S_IFDIR):
                raise OSError(errno.EOPNOTSUPP, "xattrs of special files")
            flags = os.O_RDONLY | (os.O_DIRECTORY if inode.type == stat.S_IFDIR else 0)
            fd = reopen(self.proc_fd, inode.fd, flags | os.O_NONBLOCK)
        try:
            yield fd
        finally:
            os.close(fd)

    def _xattr_name(self, args) -> str:
        raw = args.name()
        if not raw or len(raw) > F.XATTR_NAME_MAX:
            raise OSError(errno.ERANGE if raw else errno.EINVAL, "xattr name")
        name = os.fsdecode(raw)
        if name in _ACL_NAMES and not self.flags & F.POSIX_ACL:
            raise OSError(errno.EOPNOTSUPP, "POSIX ACLs are off")
        return name

    def _acl_ids(self, value: bytes, to_host: bool) -> bytes:
        """A POSIX ACL xattr with its user and group ids translated."""
        if len(value) < _ACL_HEADER.size or (len(value) - _ACL_HEADER.size) % _ACL_ENTRY.size:
            if to_host:
                raise OSError(errno.EINVAL, "malformed ACL")
            return value
        out = bytearray(value)
        for pos in range(_ACL_HEADER.size, len(value), _ACL_ENTRY.size):
            tag, perm, id_ = _ACL_ENTRY.unpack_from(value, pos)
            idmap = self.uid_map if tag == _ACL_USER else self.gid_map if tag == _ACL_GROUP else None
            if idmap is None:
                continue
            new = idmap.to_host(id_) if to_host else idmap.to_guest(id_)
            if new is None:
                raise OSError(errno.EINVAL, f"unmapped id {id_} in an ACL")
            _ACL_ENTRY.pack_into(out, pos, tag, perm, new)
        return bytes(out)

    def _sized(self, data: bytes, size: int) -> bytes:
        if size == 0:
            return F.GETXATTR_OUT.pack(len(data), 0)
        if len(data) > size:
            raise OSError(errno.ERANGE, "buffer too small")
        return data

    def _op_getxattr(self, hdr, args, extra, reader, writer):
        size, _ = args.take(F.GETXATTR_IN)
        name = self._xattr_name(args)
        size = min(size, F.XATTR_SIZE_MAX)
        with self._xattr_fd(hdr.nodeid) as fd:
            value = os.getxattr(fd, name)
        if name in _ACL_NAMES:
            value = self._acl_ids(value, False)
        return self._sized(value, size)

    def _op_listxattr(self, hdr, args, extra, reader, writer):
        size, _ = args.take(F.GETXATTR_IN)
        size = min(size, F.XATTR_SIZE_MAX)
        with self._xattr_fd(hdr.nodeid) as fd:
            names = os.listxattr(fd)
        if not self.flags & F.POSIX_ACL:
            names = [n for n in names if n not in _ACL_NAMES]
        return self._sized(b"".join(os.fsencode(n) + b"\0" for n in names), size)

    def _op_setxattr(self, hdr, args, extra, reader, writer):
        size, flags = args.take(F.SETXATTR_IN)
        name = self._xattr_name(args)
        if size > F.XATTR_SIZE_MAX:
            raise OSError(errno.E2BIG, "xattr value")
        value = args.take_bytes(size)
        if flags & ~(os.XATTR_CREATE | os.XATTR_REPLACE):
            raise OSError(errno.EINVAL, "setxattr flags")
        _check_settable(name)
        if name in _ACL_NAMES:
            value = self._acl_ids(value, True)
        with self._xattr_fd(hdr.nodeid) as fd:
            os.setxattr(fd, name, value, flags)
        return b""

    def _op_removexattr(self, hdr, args, extra, reader, writer):
        name = self._xattr_name(args)
        _check_settable(name)
        with self._xattr_fd(hdr.nodeid) as fd:
            os.removexattr(fd, name)
        return b""

    # -- session -----------------------------------------------------------------------------
    def _op_init(self, hdr, args, extra, reader, writer):
        major, minor, max_readahead, offered = args.take(F.INIT_IN)
        if self.initialized:
            raise OSError(errno.EIO, "INIT twice")
        if major < F.KERNEL_VERSION:
            raise OSError(errno.EPROTO, f"FUSE {major}.{minor}")
        if major > F.KERNEL_VERSION:
            # Ours is older: say so, and the kernel sends INIT again at 7.x.
            return F.INIT_OUT.pack(F.KERNEL_VERSION, F.KERNEL_MINOR_VERSION, 0, 0, 0, 0, 0, 0,
                                   0, 0, 0)
        if minor < F.MIN_MINOR_VERSION:
            raise OSError(errno.EPROTO, f"FUSE 7.{minor} is older than 7.{F.MIN_MINOR_VERSION}")
        want = (F.ASYNC_READ | F.ATOMIC_O_TRUNC | F.BIG_WRITES | F.DO_READDIRPLUS
                | F.READDIRPLUS_AUTO | F.PARALLEL_DIROPS | F.MAX_PAGES)
        if self.options.cache == "auto":
            want |= F.AUTO_INVAL_DATA  # revalidate the page cache when mtime changes
        if self.options.writeback:
            want |= F.WRITEBACK_CACHE
        if self.options.posix_acl:
            want |= F.POSIX_ACL
        self.flags = offered & want
        self.minor = min(minor, F.KERNEL_MINOR_VERSION)
        self.initialized = True
        return F.INIT_OUT.pack(F.KERNEL_VERSION, self.minor, max_readahead, self.flags,
                               64, 48, MAX_IO, 1, MAX_IO // PAGE_SIZE, 0, 0)

    def _op_destroy(self, hdr, args, extra, reader, writer):
        self.close()
        return b""


def _close(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


def _writable(flags: int) -> bool:
    return flags & os.O_ACCMODE in (os.O_WRONLY, os.O_RDWR)


def _check_settable(name: str) -> None:
    """EPERM unless the guest may set or remove the xattr `name`: user.* and the POSIX
    ACLs only. trusted.* and security.* (overlayfs redirects, SELinux labels, file
    capabilities) and the other system.* names are the host's: the device may be root."""
    if not guest_may_set_xattr(name):
        raise OSError(errno.EPERM, f"the guest may not set the {name} xattr")


P = PassthroughFs
# opcode -> (method, bytes a successful reply needs at least: checked before acting)
_OPS = {
    F.INIT: (P._op_init, F.INIT_OUT.size),
    F.DESTROY: (P._op_destroy, 0),
    F.LOOKUP: (P._op_lookup, F.ENTRY_OUT.size),
    F.FORGET: (P._op_forget, 0),
    F.BATCH_FORGET: (P._op_batch_forget, 0),
    F.INTERRUPT: (P._op_interrupt, 0),
    F.GETATTR: (P._op_getattr, F.ATTR_OUT.size),
    F.SETATTR: (P._op_setattr, F.ATTR_OUT.size),
    F.READLINK: (P._op_readlink, 0),
    F.STATFS: (P._op_statfs, F.KSTATFS.size),
    F.ACCESS: (P._op_access, 0),
    F.MKNOD: (P._op_mknod, F.ENTRY_OUT.size),
    F.MKDIR: (P._op_mkdir, F.ENTRY_OUT.size),
    F.SYMLINK: (P._op_symlink, F.ENTRY_OUT.size),
    F.LINK: (P._op_link, F.ENTRY_OUT.size),
    F.UNLINK: (P._op_unlink, 0),
    F.RMDIR: (P._op_rmdir, 0),
    F.RENAME: (P._op_rename, 0),
    F.RENAME2: (P._op_rename2, 0),
    F.OPEN: (P._op_open, F.OPEN_OUT.size),
    F.CREATE: (P._op_create, F.ENTRY_OUT.size + F.OPEN_OUT.size),
    F.READ: (P._op_read, 0),
    F.WRITE: (P._op_write, F.WRITE_OUT.size),
    F.FLUSH: (P._op_flush, 0),
    F.RELEASE: (P._op_release, 0),
    F.RELEASEDIR: (P._op_releasedir, 0),
    F.FSYNC: (P._op_fsync, 0),
    F.FSYNCDIR: (P._op_fsyncdir, 0),
    F.FALLOCATE: (P._op_fallocate, 0),
    F.LSEEK: (P._op_lseek, F.LSEEK_OUT.size),
    F.OPENDIR: (P._op_opendir, F.OPEN_OUT.size),
    F.READDIR: (P._op_readdir, 0),
    F.READDIRPLUS: (P._op_readdirplus, 0),
    F.GETXATTR: (P._op_getxattr, 0),
    F.LISTXATTR: (P._op_listxattr, 0),
    F.SETXATTR: (P._op_setxattr, 0),
    F.REMOVEXATTR: (P._op_removexattr, 0),
}
del P
