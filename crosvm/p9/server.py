"""A 9P2000.L file server over one host directory, for a hostile guest (crosvm's `p9`).

`P9Server.handle` serves one request: it reads a T-message from a descriptor chain's
Reader and writes the R-message to its Writer. Anything the guest sends, however
malformed, gets an Rlerror (or, when not even the 7-byte header is there, nothing);
nothing it sends makes `handle` raise.

Containment. Every fid holds an O_PATH|O_NOFOLLOW fd, and every lookup is one
component (`check_name`) opened relative to a held directory fd with O_NOFOLLOW:
no path is ever built from guest names and no symlink is ever followed (Treadlink
returns the target's text; the guest resolves it). '..' stays at the share's root,
and elsewhere its result is checked to lie under the root (a directory the host
moved out cannot be climbed out of). Files are opened for I/O only by reopening the
fid's own inode through /proc/self/fd (`reopen`), and only regular files and
directories: a fifo cannot block the device, a device node is never opened. Guests
cannot make device nodes, and setuid bits (and setgid on anything but a directory)
are stripped from every mode the guest gives; a write or truncation through a fid
open for writing clears the setuid/setgid bits a host file had, as the kernel would
for an unprivileged writer. Every count is bounded: names (255), walks (16 names),
strings (the message), replies (msize and the writer), directory reads, xattrs
(64 KiB), fids (`max_fids`) and fds: every fd the server opens is taken from a
budget shared by the process's file servers (`FdBudget`), ENFILE beyond it.

Choices:
- Locks: Tlock always answers SUCCESS and Tgetlock always "unlocked". The guest
  kernel arbitrates locks among its own processes (the Linux client takes the lock
  locally before asking the server); host processes are not coordinated with, and a
  blocking host lock cannot stall the device.
- Errors: an unknown fid is EBADF, a newfid already in use EEXIST, a full fid table
  EMFILE, a malformed message EINVAL (EMSGSIZE when over the msize), an unknown or
  9P2000-only type EOPNOTSUPP, a reply that would not fit the msize or the writer
  ENOBUFS; everything else is the errno of the failing syscall.
- Tremove and the legacy Trename answer EOPNOTSUPP (the Linux client then uses
  Tunlinkat/Trenameat, which are relative to held directory fds); Tremove still
  clunks its fid, as the protocol says.
- Treaddir offsets are entry indexes ('.' is 0, '..' is 1), read from a stream that
  is restarted when the guest asks for another offset than the next one.
- Created files get the attaching user's uid and the message's gid through the
  maps; an id with no mapping keeps the server's own, and so does a chown the host
  refuses (EPERM when not running as root).
- Xattrs are read as they are, but the guest sets and removes only user.* and the
  POSIX ACLs (EPERM for the rest: security.* holds file capabilities, setuid by
  another name, and LSM labels; trusted.* is the host's, overlayfs keeps its
  metadata there). POSIX ACL xattrs have the ids inside translated with the maps,
  both ways (an id without a mapping is EINVAL).
- Tlcreate always creates (O_EXCL): opening an existing name could open a fifo or a
  device node the host put there.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import stat
import struct
import time
from dataclasses import dataclass
from typing import Iterator

from crosvm.devices.virtio.descriptor_utils import WorkerStopping
from crosvm.devices.virtio.fs.fdbudget import PROCESS_BUDGET, FdBudget
from crosvm.devices.virtio.fs.idmap import IdMap, host_owner
from crosvm.devices.virtio.fs import names
from crosvm.devices.virtio.fs.names import check_name
from crosvm.devices.virtio.fs.reopen import reopen
from crosvm.p9 import protocol as P

log = logging.getLogger(__name__)

U64 = (1 << 64) - 1
MAX_OFFSET = (1 << 63) - 1        # file offsets are signed 64-bit on the host
MAX_XATTR_SIZE = 64 << 10         # XATTR_SIZE_MAX: a value, and a listing
MAX_XATTR_NAME = 255              # XATTR_NAME_MAX
MAX_SYMLINK_TARGET = 4095         # PATH_MAX less the NUL
MAX_ROOT_DEPTH = 4096             # directories climbed checking a '..' is under the root
PATH_FLAGS = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC
DIR_PATH_FLAGS = PATH_FLAGS | os.O_DIRECTORY
ACL_XATTRS = tuple(n.encode() for n in names.ACL_XATTRS)
_NO_QID = P.Qid(0, 0, 0)
# Replies longer than an Rlerror to requests that change something: the room for
# them is checked before the request acts (the others are checked before they act,
# or have nothing to undo).
_REPLY_LEN = {
    P.TVERSION: len(P.rversion(0, 0, P.VERSION_9P2000_L)),
    P.TATTACH: len(P.rattach(0, _NO_QID)),
    P.TLOPEN: len(P.rlopen(0, _NO_QID, 0)),
    P.TLCREATE: len(P.rlcreate(0, _NO_QID, 0)),
    P.TSYMLINK: len(P.rsymlink(0, _NO_QID)),
    P.TMKNOD: len(P.rmknod(0, _NO_QID)),
    P.TMKDIR: len(P.rmkdir(0, _NO_QID)),
}

# Tlopen/Tlcreate flags kept when opening for I/O (the rest, O_CREAT, O_NOFOLLOW,
# O_NOCTTY, O_DIRECT, O_ASYNC, O_NOATIME, O_NONBLOCK..., are dropped: the server
# decides how it opens and only regular files and directories are opened).
_KEPT_FLAGS = ((P.DOTL_TRUNC, os.O_TRUNC), (P.DOTL_APPEND, os.O_APPEND),
               (P.DOTL_DSYNC, os.O_DSYNC), (P.DOTL_SYNC, os.O_SYNC))
_ACCESS = {P.DOTL_RDONLY: os.O_RDONLY, P.DOTL_WRONLY: os.O_WRONLY, P.DOTL_RDWR: os.O_RDWR}


def _err(code: int, what: str = "") -> OSError:
    return OSError(code, what or os.strerror(code))


@dataclass
class _Fid:
    """What one fid stands for: a file (`fd`, opened for I/O in `io` after Tlopen or
    Tlcreate), or an xattr: a value read by Txattrwalk (`fd` None) or one being
    written after Txattrcreate (`xattr_name` set).

    The fid owns its fds (a walk dups, never shares): `fd`, `io` and the directory
    stream's own dup each count one in the server's budget, and only the server's
    `_close_fid` closes them, once."""

    fd: int | None
    uid: int                      # the attaching user's guest uid (owner of new files)
    io: int | None = None
    xattr: bytes | bytearray | None = None
    xattr_name: bytes | None = None
    xattr_flags: int = 0
    xattr_copied: int = 0
    dir_entries: Iterator | None = None   # the directory stream Treaddir reads
    dir_next: int = 0                     # index of the entry it gives next
    dir_pending: tuple | None = None      # an entry that did not fit the last reply


class P9Server:
    """Serves 9P2000.L requests for the directory `root_fd` (see the module doc).

    `root_fd` and `proc_fd` (the process's /proc/self/fd, `open_proc_self_fd`) stay
    the caller's; the server closes only the fds it opens (`close`). Every fd it
    opens, held by a fid or only for the length of a request, is taken from `budget`
    (the process's, shared with the other shares' servers, by default) when opened
    and given back when closed: a request that would go beyond it is ENFILE."""

    def __init__(self, root_fd: int, proc_fd: int, uid_map: IdMap, gid_map: IdMap,
                 max_msize: int = 512 * 1024, max_fids: int = 4096,
                 budget: FdBudget | None = None) -> None:
        if not P.MIN_MSIZE <= max_msize <= 0xFFFF_FFFF:
            raise ValueError(f"max_msize {max_msize} is not in [{P.MIN_MSIZE}, 2^32)")
        if max_fids < 1:
            raise ValueError("max_fids must be at least 1")
        self.root_fd = root_fd
        self.proc_fd = proc_fd
        self.uid_map = uid_map
        self.gid_map = gid_map
        self.max_msize = max_msize
        self.max_fids = max_fids
        self.budget = PROCESS_BUDGET if budget is None else budget
        self.msize = max_msize  # until a Tversion negotiates it
        st = os.fstat(root_fd)
        if not stat.S_ISDIR(st.st_mode):
            raise NotADirectoryError(errno.ENOTDIR, "the shared root is not a directory")
        self.root_id = (st.st_dev, st.st_ino)
        self.fids: dict[int, _Fid] = {}
        self._room = 0
        self._handlers = {
            P.TVERSION: self._version, P.TAUTH: self._auth, P.TATTACH: self._attach,
            P.TFLUSH: self._flush, P.TWALK: self._walk, P.TCLUNK: self._clunk,
            P.TREMOVE: self._remove, P.TSTATFS: self._statfs, P.TLOPEN: self._lopen,
            P.TLCREATE: self._lcreate, P.TSYMLINK: self._symlink, P.TMKNOD: self._mknod,
            P.TRENAME: self._rename, P.TREADLINK: self._readlink, P.TGETATTR: self._getattr,
            P.TSETATTR: self._setattr, P.TXATTRWALK: self._xattrwalk,
            P.TXATTRCREATE: self._xattrcreate, P.TREADDIR: self._readdir,
            P.TFSYNC: self._fsync, P.TLOCK: self._lock, P.TGETLOCK: self._getlock,
            P.TLINK: self._link, P.TMKDIR: self._mkdir, P.TRENAMEAT: self._renameat,
            P.TUNLINKAT: self._unlinkat,
        }

    # -- the request loop ------------------------------------------------------------------

    def handle(self, reader, writer) -> int:
        """Serve one T-message read from `reader`, write the R-message to `writer`;
        return the number of bytes written. Never raises for anything the guest sent
        (only `WorkerStopping`, the device's own stop request, goes through)."""
        try:
            return self._handle(reader, writer)
        except WorkerStopping:
            raise
        except Exception:  # a server bug: the worker must go on serving
            log.exception("9p: request failed")
            return 0

    def _handle(self, reader, writer) -> int:
        available = reader.available_bytes()
        if available < P.HEADER_LEN:
            return 0  # no tag to answer to
        size, msg_type, tag = P.parse_header(reader.read(P.HEADER_LEN))
        room = min(writer.available_bytes(), self.msize)
        if room < P.RLERROR_LEN:
            return 0  # not even an error fits: do nothing the guest cannot hear about
        self._room = room
        try:
            P.check_size(size, available, self.msize)
            if room < _REPLY_LEN.get(msg_type, 0):
                # Before acting: a file made, opened or a session reset that the
                # guest is told failed would be a change it does not know of.
                raise _err(errno.ENOBUFS, "the reply would not fit")
            body_len = size - P.HEADER_LEN
            if msg_type == P.TREAD:
                return self._read(tag, reader.read(body_len), writer)
            if msg_type == P.TWRITE:
                reply = self._write(tag, reader, body_len)
            else:
                args = P.decode(msg_type, reader.read(body_len))
                reply = self._handlers[msg_type](tag, *args)
        except WorkerStopping:
            raise
        except Exception as e:  # noqa: BLE001 - every failure becomes the guest's Rlerror
            reply = P.rlerror(tag, self._errno(e))
        if len(reply) > room:
            reply = P.rlerror(tag, errno.ENOBUFS)
        writer.write(reply)
        return len(reply)

    @staticmethod
    def _errno(e: Exception) -> int:
        if isinstance(e, P.ProtocolError):
            return e.errno
        if isinstance(e, OSError):
            return e.errno or errno.EIO  # ShortBuffer, a short write: no errno
        if isinstance(e, (ValueError, OverflowError)):
            return errno.EINVAL  # an embedded NUL, an offset or time the host cannot take
        log.exception("9p: request failed")
        return errno.EIO

    def close(self) -> None:
        """Close every fd the server holds (not root_fd or proc_fd)."""
        self._reset_fids()

    def _reset_fids(self) -> None:
        fids, self.fids = self.fids, {}
        for f in fids.values():
            self._close_fid(f)

    # -- fds: each one taken from the budget when opened, given back when closed ----------

    def _take(self, opener, *args, **kwargs) -> int:
        self.budget.take(1)
        try:
            return opener(*args, **kwargs)
        except BaseException:
            self.budget.give(1)
            raise

    def _open(self, path, flags: int, mode: int = 0o777, *, dir_fd: int) -> int:
        return self._take(os.open, path, flags, mode, dir_fd=dir_fd)

    def _dup(self, fd: int) -> int:
        return self._take(os.dup, fd)

    def _reopen(self, path_fd: int, flags: int) -> int:
        return self._take(reopen, self.proc_fd, path_fd, flags)

    def _close(self, fd: int) -> None:
        try:
            os.close(fd)
        finally:
            self.budget.give(1)

    def _close_fid(self, f: _Fid) -> None:
        """Close what `f` holds, each fd once (the fields are cleared first), and give
        them back to the budget, even when one close fails."""
        stream, f.dir_entries, f.dir_pending = f.dir_entries, None, None
        fds = [fd for fd in (f.io, f.fd) if fd is not None]
        f.io = f.fd = None
        if stream is not None:
            try:
                stream.close()  # its dup: closed and given back in `_entries`
            except Exception:  # noqa: BLE001 - the fds below are closed regardless
                log.exception("9p: closing a directory stream")
        for fd in fds:
            try:
                self._close(fd)
            except OSError:
                log.exception("9p: closing fd %d", fd)

    # -- fids ------------------------------------------------------------------------------

    def _fid(self, fid: int) -> _Fid:
        f = self.fids.get(fid)
        if f is None:
            raise _err(errno.EBADF, f"no fid {fid}")
        return f

    def _path_fid(self, fid: int) -> _Fid:
        """A fid that names a file (not an xattr)."""
        f = self._fid(fid)
        if f.fd is None or f.xattr_name is not None:
            raise _err(errno.EBADF, f"fid {fid} is an xattr")
        return f

    def _check_new_fid(self, fid: int) -> None:
        if fid == P.NOFID:
            raise _err(errno.EINVAL, "NOFID as a new fid")
        if fid in self.fids:
            raise _err(errno.EEXIST, f"fid {fid} is in use")
        if len(self.fids) >= self.max_fids:
            raise _err(errno.EMFILE, "fid table full")

    # -- files -----------------------------------------------------------------------------

    def _qid(self, st: os.stat_result) -> P.Qid:
        return P.Qid(self._qid_type(st.st_mode), 0, self._qid_path(st.st_ino, st.st_dev))

    @staticmethod
    def _qid_type(mode: int) -> int:
        if stat.S_ISDIR(mode):
            return P.QTDIR
        if stat.S_ISLNK(mode):
            return P.QTSYMLINK
        return P.QTFILE

    def _qid_path(self, ino: int, dev: int) -> int:
        """The inode number; on another filesystem mounted inside the share, with the
        top 16 bits mixed with its device so two files there rarely share a qid."""
        if dev == self.root_id[0]:
            return ino & U64
        return (ino ^ ((((dev * 0x9E37_79B9_7F4A_7C15) >> 32) & 0xFFFF or 1) << 48)) & U64

    def _lookup(self, dir_fd: int, name: bytes) -> int:
        """An O_PATH fd for `name` in `dir_fd`: one component, no symlink followed."""
        if name == b"..":
            return self._parent(dir_fd)
        check_name(name)
        return self._open(name, PATH_FLAGS, dir_fd=dir_fd)

    def _parent(self, dir_fd: int) -> int:
        st = os.fstat(dir_fd)
        if (st.st_dev, st.st_ino) == self.root_id:
            return self._open(".", DIR_PATH_FLAGS, dir_fd=self.root_fd)
        parent = self._open("..", DIR_PATH_FLAGS, dir_fd=dir_fd)
        try:
            if not self._under_root(parent):
                raise _err(errno.EACCES, "'..' leads out of the shared directory")
        except BaseException:
            self._close(parent)
            raise
        return parent

    def _under_root(self, fd: int) -> bool:
        """Whether climbing '..' from directory `fd` meets the share's root."""
        cur = self._dup(fd)
        try:
            for _ in range(MAX_ROOT_DEPTH):
                st = os.fstat(cur)
                if (st.st_dev, st.st_ino) == self.root_id:
                    return True
                up = self._open("..", DIR_PATH_FLAGS, dir_fd=cur)
                ust = os.fstat(up)
                self._close(cur)
                cur = up
                if (ust.st_dev, ust.st_ino) == (st.st_dev, st.st_ino):
                    return False  # the host's / without passing the root
            return False
        finally:
            self._close(cur)

    @staticmethod
    def _guest_mode(mode: int, is_dir: bool) -> int:
        """Permission bits the guest may set: never setuid; setgid only on directories
        (where it means "new files take this group", not an identity change)."""
        mode &= 0o7777 & ~stat.S_ISUID
        if not is_dir:
            mode &= ~stat.S_ISGID
        return mode

    def _set_owner(self, path_fd: int, uid: int, gid: int) -> None:
        """Give a new file the guest's uid/gid, as far as they map; see the module doc."""
        # Unmapped guest ids: the device's identity (uid=/gid=) when the map has one
        # (no sandbox), as the sandboxed device would create the file.
        host_uid = self.uid_map.fallback if uid == P.NONUNAME else self.uid_map.owner_for(uid)
        host_gid = self.gid_map.owner_for(gid)
        if host_uid is None and host_gid is None:
            return
        st = os.fstat(path_fd)
        want = (st.st_uid if host_uid is None else host_uid,
                st.st_gid if host_gid is None else host_gid)
        if want == (st.st_uid, st.st_gid):
            return
        try:
            # The /proc/self/fd link is the inode itself (a symlink stays a symlink).
            os.chown(str(path_fd), *want, dir_fd=self.proc_fd)
        except PermissionError:
            log.debug("9p: cannot give a new file to %s; it keeps the server's ids", want)

    def _chmod(self, path_fd: int, mode: int) -> None:
        os.chmod(str(path_fd), mode, dir_fd=self.proc_fd)

    def _finish_create(self, path_fd: int, uid: int, gid: int, mode: int | None) -> P.Qid:
        """Owner, then the exact mode (the server's umask is not the guest's; a
        directory keeps the setgid bit it inherited from its parent)."""
        self._set_owner(path_fd, uid, gid)
        st = os.fstat(path_fd)
        if mode is not None:
            if stat.S_ISDIR(st.st_mode):
                mode |= st.st_mode & stat.S_ISGID
            if stat.S_IMODE(st.st_mode) != mode:
                self._chmod(path_fd, mode)
        return self._qid(st)

    @staticmethod
    def _io_flags(flags: int) -> int:
        access = _ACCESS.get(flags & P.DOTL_ACCMODE)
        if access is None:
            raise _err(errno.EINVAL, "no access mode")
        for dotl, host in _KEPT_FLAGS:
            if flags & dotl:
                access |= host
        return access

    # -- messages --------------------------------------------------------------------------

    def _version(self, tag: int, msize: int, version: bytes) -> bytes:
        self._reset_fids()
        if msize < P.MIN_MSIZE:
            raise P.ProtocolError(f"msize {msize} is below {P.MIN_MSIZE}")
        negotiated = min(msize, self.max_msize)
        if version != P.VERSION_9P2000_L.encode():
            return P.rversion(tag, negotiated, P.VERSION_UNKNOWN)
        self.msize = negotiated
        return P.rversion(tag, negotiated, P.VERSION_9P2000_L)

    def _auth(self, tag: int, afid: int, uname: bytes, aname: bytes, n_uname: int) -> bytes:
        raise _err(errno.EOPNOTSUPP, "no authentication")

    def _attach(self, tag: int, fid: int, afid: int, uname: bytes, aname: bytes,
                n_uname: int) -> bytes:
        self._check_new_fid(fid)
        fd = self._open(".", DIR_PATH_FLAGS, dir_fd=self.root_fd)
        self.fids[fid] = _Fid(fd, n_uname)
        return P.rattach(tag, self._qid(os.fstat(fd)))

    def _flush(self, tag: int, oldtag: int) -> bytes:
        return P.rflush(tag)  # requests are served one at a time: nothing is in flight

    def _walk(self, tag: int, fid: int, newfid: int, names: list[bytes]) -> bytes:
        f = self._path_fid(fid)
        if newfid != fid:
            self._check_new_fid(newfid)
        qids: list[P.Qid] = []
        cur = self._dup(f.fd)
        try:
            for name in names:
                try:
                    nxt = self._lookup(cur, name)
                except OSError:
                    if not qids:
                        raise
                    break  # a partial walk: the qids so far, no newfid
                self._close(cur)
                cur = nxt
                qids.append(self._qid(os.fstat(cur)))
            reply = P.rwalk(tag, qids)
            if len(reply) > self._room:
                raise _err(errno.ENOBUFS)
            if len(qids) == len(names):
                if newfid == fid:
                    self._close_fid(f)
                    f.fd = cur
                else:
                    self.fids[newfid] = _Fid(cur, f.uid)
                cur = -1
            return reply
        finally:
            if cur >= 0:
                self._close(cur)

    def _clunk(self, tag: int, fid: int) -> bytes:
        f = self.fids.pop(fid, None)
        if f is None:
            raise _err(errno.EBADF, f"no fid {fid}")
        try:
            if f.xattr_name is not None:
                self._commit_xattr(f)
        finally:
            self._close_fid(f)
        return P.rclunk(tag)

    def _remove(self, tag: int, fid: int) -> bytes:
        f = self.fids.pop(fid, None)
        if f is None:
            raise _err(errno.EBADF, f"no fid {fid}")
        self._close_fid(f)  # Tremove clunks, whatever else it does
        raise _err(errno.EOPNOTSUPP, "remove by fid: use Tunlinkat")

    def _statfs(self, tag: int, fid: int) -> bytes:
        s = os.fstatvfs(self._path_fid(fid).fd)
        return P.rstatfs(tag, P.V9FS_MAGIC, s.f_frsize, s.f_blocks, s.f_bfree, s.f_bavail,
                         s.f_files, s.f_ffree, s.f_fsid & U64, s.f_namemax)

    def _lopen(self, tag: int, fid: int, flags: int) -> bytes:
        f = self._path_fid(fid)
        if f.io is not None:
            raise _err(errno.EINVAL, "fid already open")
        st = os.fstat(f.fd)
        host_flags = self._io_flags(flags)
        if stat.S_ISDIR(st.st_mode):
            host_flags |= os.O_DIRECTORY
        elif stat.S_ISLNK(st.st_mode):
            raise _err(errno.ELOOP, "a symlink is not opened")
        elif not stat.S_ISREG(st.st_mode):
            raise _err(errno.EPERM, "only regular files and directories are opened")
        io = self._reopen(f.fd, host_flags)
        try:
            if host_flags & os.O_TRUNC:
                self._kill_priv(io)  # a truncation is a write
        except BaseException:
            self._close(io)
            raise
        f.io = io
        return P.rlopen(tag, self._qid(st), 0)

    def _lcreate(self, tag: int, fid: int, name: bytes, flags: int, mode: int,
                 gid: int) -> bytes:
        f = self._path_fid(fid)
        if f.io is not None:
            raise _err(errno.EINVAL, "fid already open")
        check_name(name)
        perm = self._guest_mode(mode, False)
        host_flags = (self._io_flags(flags) | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                      | os.O_CLOEXEC)
        # Both fds are taken from the budget before the file is made: a guest at its
        # limit gets ENFILE and no file, not a file it was told was not made.
        self.budget.take(2)
        io = path = -1
        try:
            io = os.open(name, host_flags, perm & 0o777, dir_fd=f.fd)
            path = os.open(str(io), os.O_PATH | os.O_CLOEXEC, dir_fd=self.proc_fd)
            qid = self._finish_create(path, f.uid, gid, perm)
        except BaseException:
            for fd in (io, path):
                if fd >= 0:
                    os.close(fd)
            self.budget.give(2)
            raise
        self._close_fid(f)
        f.fd, f.io = path, io
        return P.rlcreate(tag, qid, 0)

    def _create(self, f: _Fid, name: bytes, make, gid: int, mode: int | None) -> P.Qid:
        """`make()` the file `name` in `f`'s directory, then its owner and mode. The fd
        that takes is taken from the budget before anything is made."""
        self.budget.take(1)
        try:
            make()
            fd = os.open(name, PATH_FLAGS, dir_fd=f.fd)
            try:
                return self._finish_create(fd, f.uid, gid, mode)
            finally:
                os.close(fd)
        finally:
            self.budget.give(1)

    def _symlink(self, tag: int, fid: int, name: bytes, target: bytes, gid: int) -> bytes:
        f = self._path_fid(fid)
        check_name(name)
        if not target or b"\0" in target:
            raise _err(errno.EINVAL, "bad symlink target")
        if len(target) > MAX_SYMLINK_TARGET:
            raise _err(errno.ENAMETOOLONG, "symlink target too long")
        return P.rsymlink(tag, self._create(
            f, name, lambda: os.symlink(target, name, dir_fd=f.fd), gid, None))

    def _mknod(self, tag: int, dfid: int, name: bytes, mode: int, major: int, minor: int,
               gid: int) -> bytes:
        f = self._path_fid(dfid)
        check_name(name)
        kind = stat.S_IFMT(mode) or stat.S_IFREG
        if kind not in (stat.S_IFREG, stat.S_IFIFO):
            raise _err(errno.EPERM, "only regular files and fifos are made")
        perm = self._guest_mode(mode, False)
        return P.rmknod(tag, self._create(
            f, name, lambda: os.mknod(name, kind | (perm & 0o777), 0, dir_fd=f.fd), gid, perm))

    def _mkdir(self, tag: int, dfid: int, name: bytes, mode: int, gid: int) -> bytes:
        f = self._path_fid(dfid)
        check_name(name)
        perm = self._guest_mode(mode, True)
        return P.rmkdir(tag, self._create(
            f, name, lambda: os.mkdir(name, perm & 0o777, dir_fd=f.fd), gid, perm))

    def _rename(self, tag: int, fid: int, dfid: int, name: bytes) -> bytes:
        self._path_fid(fid)
        self._path_fid(dfid)
        raise _err(errno.EOPNOTSUPP, "rename by fid: use Trenameat")

    def _readlink(self, tag: int, fid: int) -> bytes:
        f = self._path_fid(fid)
        if not stat.S_ISLNK(os.fstat(f.fd).st_mode):
            raise _err(errno.EINVAL, "not a symlink")
        return P.rreadlink(tag, os.readlink(b"", dir_fd=f.fd))

    def _getattr(self, tag: int, fid: int, request_mask: int) -> bytes:
        st = os.fstat(self._path_fid(fid).fd)
        attr = P.Attr(
            mode=st.st_mode, uid=self.uid_map.to_guest(st.st_uid),
            gid=self.gid_map.to_guest(st.st_gid), nlink=st.st_nlink, rdev=st.st_rdev,
            size=st.st_size, blksize=st.st_blksize, blocks=st.st_blocks,
            atime=_timespec(st.st_atime_ns), mtime=_timespec(st.st_mtime_ns),
            ctime=_timespec(st.st_ctime_ns))
        return P.rgetattr(tag, P.GETATTR_BASIC, self._qid(st), attr)

    def _setattr(self, tag: int, fid: int, valid: int, mode: int, uid: int, gid: int,
                 size: int, atime_s: int, atime_ns: int, mtime_s: int, mtime_ns: int) -> bytes:
        f = self._path_fid(fid)
        st = os.fstat(f.fd)
        name = str(f.fd)  # through proc_fd: the inode itself, whatever it is called now
        if valid & P.SETATTR_MODE:
            self._chmod(f.fd, self._guest_mode(mode, stat.S_ISDIR(st.st_mode)))
        if valid & (P.SETATTR_UID | P.SETATTR_GID):
            os.chown(name, *host_owner(
                self.uid_map, self.gid_map, uid if valid & P.SETATTR_UID else None,
                gid if valid & P.SETATTR_GID else None), dir_fd=self.proc_fd)
        if valid & P.SETATTR_SIZE:
            if stat.S_ISDIR(st.st_mode):
                raise _err(errno.EISDIR)
            if not stat.S_ISREG(st.st_mode):
                raise _err(errno.EINVAL, "only regular files are truncated")
            if f.io is not None and _writable(f.io):
                self._kill_priv(f.io)
                os.ftruncate(f.io, size)  # ftruncate(2) of an open file: no permission check
            else:
                fd = self._reopen(f.fd, os.O_WRONLY | os.O_NONBLOCK)
                try:
                    self._kill_priv(fd)
                    os.ftruncate(fd, size)
                finally:
                    self._close(fd)
        if valid & (P.SETATTR_ATIME | P.SETATTR_MTIME):
            self._set_times(name, st, valid, atime_s, atime_ns, mtime_s, mtime_ns)
        return P.rsetattr(tag)

    def _set_times(self, name: str, st: os.stat_result, valid: int, atime_s: int,
                   atime_ns: int, mtime_s: int, mtime_ns: int) -> None:
        both = P.SETATTR_ATIME | P.SETATTR_MTIME
        if valid & (both | P.SETATTR_ATIME_SET | P.SETATTR_MTIME_SET) == both:
            # Both "now": utimensat(NULL), which needs only write access, like touch.
            os.utime(name, None, dir_fd=self.proc_fd)
            return
        now = time.time_ns()

        def pick(flag: int, set_flag: int, sec: int, nsec: int, current: int) -> int:
            if not valid & flag:
                return current
            if not valid & set_flag:
                return now
            if nsec >= 1_000_000_000:
                raise _err(errno.EINVAL, "nanoseconds out of range")
            return _signed64(sec) * 1_000_000_000 + nsec

        times = (pick(P.SETATTR_ATIME, P.SETATTR_ATIME_SET, atime_s, atime_ns, st.st_atime_ns),
                 pick(P.SETATTR_MTIME, P.SETATTR_MTIME_SET, mtime_s, mtime_ns, st.st_mtime_ns))
        os.utime(name, ns=times, dir_fd=self.proc_fd)

    # -- read, write, readdir ----------------------------------------------------------------

    def _read(self, tag: int, body: bytes, writer) -> int:
        """Tread: the data goes from the file straight into guest memory, after an
        11-byte slot for the header (written last, when the count is known)."""
        fid, offset, count = P.decode(P.TREAD, body)
        f = self._fid(fid)
        count = min(count, self._room - P.IOHDR_LEN)
        if f.xattr is not None and f.xattr_name is None:
            reply = P.rread(tag, bytes(f.xattr[offset:offset + count]))
            writer.write(reply)
            return len(reply)
        if f.io is None:
            raise _err(errno.EBADF, "fid not open")
        if offset > MAX_OFFSET:
            raise _err(errno.EINVAL, "offset beyond 2^63")
        header = writer.split_start_writer(P.IOHDR_LEN)
        try:
            n = writer.read_from_fd(f.io, count, offset)
        except WorkerStopping:
            raise
        except Exception as e:  # noqa: BLE001 - the header slot takes the Rlerror
            header.write(P.rlerror(tag, self._errno(e)))
            return P.RLERROR_LEN
        header.write(P.rread_header(tag, n))
        return P.IOHDR_LEN + n

    def _write(self, tag: int, reader, body_len: int) -> bytes:
        """Twrite: the data goes from guest memory straight to the file. The count is
        clamped to the data the message holds (the Linux client's zero-copy path
        sizes the message by the pages it pinned, which can be fewer)."""
        if body_len < P.WRITE_FIXED_LEN:
            raise P.ProtocolError("Twrite shorter than its fixed fields")
        fid, offset, count = P.decode(P.TWRITE, reader.read(P.WRITE_FIXED_LEN))
        count = min(count, body_len - P.WRITE_FIXED_LEN)
        f = self._fid(fid)
        if f.xattr_name is not None:
            if offset + count > len(f.xattr):
                raise _err(errno.ENOSPC, "beyond the size given in Txattrcreate")
            f.xattr[offset:offset + count] = reader.read(count)
            f.xattr_copied += count
            return P.rwrite(tag, count)
        if f.io is None or not _writable(f.io):
            raise _err(errno.EBADF, "fid not open for writing")
        if offset > MAX_OFFSET:
            raise _err(errno.EINVAL, "offset beyond 2^63")
        if count:
            self._kill_priv(f.io)
        return P.rwrite(tag, reader.write_to_fd(f.io, count, offset))

    @staticmethod
    def _kill_priv(fd: int) -> None:
        """Before a write or truncation of a regular file: clear S_ISUID, and S_ISGID
        if group-executable, as the kernel does for a writer without CAP_FSETID (it
        does not for the device running as root: a guest could rewrite a setuid
        program the host keeps in the share and keep its setuid bit)."""
        mode = os.fstat(fd).st_mode
        kill = stat.S_ISUID | (stat.S_ISGID if mode & stat.S_IXGRP else 0)
        if stat.S_ISREG(mode) and mode & kill:
            try:
                os.fchmod(fd, stat.S_IMODE(mode) & ~kill)
            except PermissionError:
                pass  # not the owner and not root: the kernel clears them at the write

    def _readdir(self, tag: int, fid: int, offset: int, count: int) -> bytes:
        f = self._path_fid(fid)
        if f.io is None:
            raise _err(errno.EBADF, "directory not open")
        if not stat.S_ISDIR(os.fstat(f.fd).st_mode):
            raise _err(errno.ENOTDIR)
        count = min(count, self._room - P.IOHDR_LEN)
        try:
            if f.dir_entries is None or offset != f.dir_next:
                self._rewind(f)
                while f.dir_next < offset and next(f.dir_entries, None) is not None:
                    f.dir_next += 1
            data = bytearray()
            while True:
                entry = f.dir_pending or next(f.dir_entries, None)
                if entry is None:
                    break
                name, qid, d_type = entry
                raw = P.dirent(qid, f.dir_next + 1, d_type, name)
                if len(data) + len(raw) > count:
                    f.dir_pending = entry
                    break
                data += raw
                f.dir_pending = None
                f.dir_next += 1
        except BaseException:
            # A stream that failed is finished: kept, the next Treaddir at the same
            # offset would read its end as the directory's.
            self._drop_stream(f)
            raise
        return P.rreaddir(tag, bytes(data))

    def _drop_stream(self, f: _Fid) -> None:
        stream, f.dir_entries, f.dir_next, f.dir_pending = f.dir_entries, None, 0, None
        if stream is not None:
            stream.close()

    def _rewind(self, f: _Fid) -> None:
        self._drop_stream(f)
        f.dir_entries = self._entries(f)

    def _entries(self, f: _Fid) -> Iterator[tuple[bytes, P.Qid, int]]:
        """(name, qid, d_type) of '.', '..' and the directory's entries, in order."""
        st = os.fstat(f.fd)
        yield b".", self._qid(st), stat.S_IFDIR >> 12
        parent = st
        if (st.st_dev, st.st_ino) != self.root_id:
            try:
                parent = os.stat("..", dir_fd=f.fd, follow_symlinks=False)
            except OSError:
                pass
        yield b"..", self._qid(parent), stat.S_IFDIR >> 12
        os.lseek(f.io, 0, os.SEEK_SET)  # scandir's dup shares this fd's position
        # scandir holds a dup of f.io until the stream ends or is closed: one more fd
        # in the budget for as long (given back however the generator finishes).
        self.budget.take(1)
        try:
            with os.scandir(f.io) as it:
                for e in it:
                    mode = _entry_type(e)
                    qid = P.Qid(self._qid_type(mode), 0, self._qid_path(e.inode(), st.st_dev))
                    yield os.fsencode(e.name), qid, stat.S_IFMT(mode) >> 12
        finally:
            self.budget.give(1)

    def _fsync(self, tag: int, fid: int, datasync: int) -> bytes:
        f = self._path_fid(fid)
        if f.io is None:
            raise _err(errno.EBADF, "fid not open")
        (os.fdatasync if datasync else os.fsync)(f.io)
        return P.rfsync(tag)

    def _lock(self, tag: int, fid: int, lock_type: int, flags: int, start: int, length: int,
              proc_id: int, client_id: bytes) -> bytes:
        self._path_fid(fid)
        if lock_type not in (P.LOCK_TYPE_RDLCK, P.LOCK_TYPE_WRLCK, P.LOCK_TYPE_UNLCK):
            raise _err(errno.EINVAL, "unknown lock type")
        return P.rlock(tag, P.LOCK_SUCCESS)  # see the module doc

    def _getlock(self, tag: int, fid: int, lock_type: int, start: int, length: int,
                 proc_id: int, client_id: bytes) -> bytes:
        self._path_fid(fid)
        if lock_type not in (P.LOCK_TYPE_RDLCK, P.LOCK_TYPE_WRLCK, P.LOCK_TYPE_UNLCK):
            raise _err(errno.EINVAL, "unknown lock type")
        return P.rgetlock(tag, P.LOCK_TYPE_UNLCK, start, length, proc_id, client_id)

    # -- names in directories ---------------------------------------------------------------

    def _link(self, tag: int, dfid: int, fid: int, name: bytes) -> bytes:
        d, f = self._path_fid(dfid), self._path_fid(fid)
        check_name(name)
        if stat.S_ISDIR(os.fstat(f.fd).st_mode):
            raise _err(errno.EPERM, "hard link to a directory")
        # linkat through /proc/self/fd links the inode itself (AT_EMPTY_PATH would
        # need CAP_DAC_READ_SEARCH); a symlink's link is the symlink, not its target.
        os.link(str(f.fd), name, src_dir_fd=self.proc_fd, dst_dir_fd=d.fd,
                follow_symlinks=True)
        return P.rlink(tag)

    def _renameat(self, tag: int, olddirfid: int, oldname: bytes, newdirfid: int,
                  newname: bytes) -> bytes:
        old, new = self._path_fid(olddirfid), self._path_fid(newdirfid)
        check_name(oldname)
        check_name(newname)
        os.rename(oldname, newname, src_dir_fd=old.fd, dst_dir_fd=new.fd)
        return P.rrenameat(tag)

    def _unlinkat(self, tag: int, dirfid: int, name: bytes, flags: int) -> bytes:
        d = self._path_fid(dirfid)
        check_name(name)
        if flags & ~P.AT_REMOVEDIR:
            raise _err(errno.EINVAL, "unknown unlinkat flags")
        if flags & P.AT_REMOVEDIR:
            os.rmdir(name, dir_fd=d.fd)
        else:
            os.unlink(name, dir_fd=d.fd)
        return P.runlinkat(tag)

    # -- xattrs ---------------------------------------------------------------------------

    def _xattr_fd(self, path_fd: int) -> int | None:
        """A readable fd for f*xattr on the inode (O_PATH fds cannot), or None for
        what is never opened (symlinks, fifos, sockets, devices)."""
        mode = os.fstat(path_fd).st_mode
        if stat.S_ISREG(mode):
            return self._reopen(path_fd, os.O_RDONLY | os.O_NONBLOCK)
        if stat.S_ISDIR(mode):
            return self._reopen(path_fd, os.O_RDONLY | os.O_DIRECTORY)
        return None

    @staticmethod
    def _check_xattr_name(name: bytes) -> None:
        if not name or b"\0" in name:
            raise _err(errno.EINVAL, "bad xattr name")
        if len(name) > MAX_XATTR_NAME:
            raise _err(errno.ERANGE, "xattr name too long")

    def _xattrwalk(self, tag: int, fid: int, newfid: int, name: bytes) -> bytes:
        f = self._path_fid(fid)
        self._check_new_fid(newfid)
        if name:
            self._check_xattr_name(name)
        fd = self._xattr_fd(f.fd)
        try:
            if fd is None:
                if name:
                    raise _err(errno.ENODATA, "no xattrs on this kind of file")
                value = b""
            elif name:
                value = os.getxattr(fd, name)
                if name in ACL_XATTRS:
                    value = _map_acl(value, self.uid_map.to_guest, self.gid_map.to_guest)
            else:
                value = b"".join(os.fsencode(n) + b"\0" for n in os.listxattr(fd))
        finally:
            if fd is not None:
                self._close(fd)
        if len(value) > MAX_XATTR_SIZE:
            raise _err(errno.E2BIG, "xattr larger than 64 KiB")
        reply = P.rxattrwalk(tag, len(value))
        if len(reply) > self._room:
            raise _err(errno.ENOBUFS)
        self.fids[newfid] = _Fid(None, f.uid, xattr=bytes(value))
        return reply

    def _xattrcreate(self, tag: int, fid: int, name: bytes, size: int, flags: int) -> bytes:
        f = self._path_fid(fid)
        self._check_xattr_name(name)
        if size > MAX_XATTR_SIZE:
            raise _err(errno.E2BIG, "xattr larger than 64 KiB")
        if flags & ~(P.XATTR_CREATE | P.XATTR_REPLACE):
            raise _err(errno.EINVAL, "unknown xattr flags")
        if f.io is not None:
            raise _err(errno.EINVAL, "fid is open")
        if not _guest_settable(name):
            # security.* holds file capabilities (setuid by another name) and LSM
            # labels, trusted.* is the host's (overlayfs keeps its redirects there):
            # the guest sets and removes only user.* and the POSIX ACLs.
            raise _err(errno.EPERM, "xattr reserved to the host")
        f.xattr, f.xattr_name, f.xattr_flags, f.xattr_copied = bytearray(size), name, flags, 0
        return P.rxattrcreate(tag)

    def _commit_xattr(self, f: _Fid) -> None:
        """At the clunk of a Txattrcreate fid: set the value written to it (size 0 with
        XATTR_REPLACE is how the Linux client removes one)."""
        if f.xattr_copied != len(f.xattr):
            raise _err(errno.EINVAL, "xattr value not completely written")
        fd = self._xattr_fd(f.fd)
        if fd is None:
            raise _err(errno.EPERM, "no xattrs on this kind of file")
        try:
            if not f.xattr and f.xattr_flags & P.XATTR_REPLACE:
                os.removexattr(fd, f.xattr_name)
                return
            value = bytes(f.xattr)
            if f.xattr_name in ACL_XATTRS:
                value = _map_acl(value, self.uid_map.to_host, self.gid_map.to_host)
            os.setxattr(fd, f.xattr_name, value, f.xattr_flags)
        finally:
            self._close(fd)


def _writable(fd: int) -> bool:
    return fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE != os.O_RDONLY


def _guest_settable(name: bytes) -> bool:
    """Whether the guest may set or remove the xattr `name` (names.guest_may_set_xattr)."""
    return names.guest_may_set_xattr(name.decode("utf-8", "surrogateescape"))


def _timespec(ns: int) -> tuple[int, int]:
    sec, nsec = divmod(ns, 1_000_000_000)
    return sec & U64, nsec


def _signed64(value: int) -> int:
    return value - (1 << 64) if value > MAX_OFFSET else value


def _entry_type(e: os.DirEntry) -> int:
    """The S_IFMT bits of a directory entry (from d_type when the filesystem gives
    it; a vanished entry is 0, "unknown")."""
    try:
        if e.is_symlink():
            return stat.S_IFLNK
        if e.is_dir(follow_symlinks=False):
            return stat.S_IFDIR
        if e.is_file(follow_symlinks=False):
            return stat.S_IFREG
        return stat.S_IFMT(e.stat(follow_symlinks=False).st_mode)
    except OSError:
        return 0


# POSIX ACL xattr: version[4] then entries of tag[2] perm[2] id[4]; USER and GROUP
# entries carry an id (include/uapi/linux/posix_acl_xattr.h).
_ACL_VERSION = 2
_ACL_USER = 0x02
_ACL_GROUP = 0x08


def _map_acl(value: bytes, map_uid, map_gid) -> bytes:
    """An ACL xattr with its ids translated; EINVAL if malformed or an id has no map."""
    if len(value) < 4 or (len(value) - 4) % 8 or struct.unpack_from("<I", value)[0] != _ACL_VERSION:
        raise _err(errno.EINVAL, "malformed POSIX ACL")
    out = bytearray(value)
    for off in range(4, len(value), 8):
        tag, _perm, ident = struct.unpack_from("<HHI", value, off)
        mapper = map_uid if tag == _ACL_USER else map_gid if tag == _ACL_GROUP else None
        if mapper is None:
            continue
        mapped = mapper(ident)
        if mapped is None:
            raise _err(errno.EINVAL, "ACL id has no mapping")
        struct.pack_into("<I", out, off + 4, mapped)
    return bytes(out)
