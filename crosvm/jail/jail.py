"""Jail a forked device process the way minijail does for crosvm.

`Jail.enter()` runs in a freshly forked, single-threaded child. It unshares the user,
PID, mount, IPC, UTS and network namespaces; root inside is mapped to the invoking user,
or, for a VMM run as root, to an unused, unprivileged uid and gid (`JAIL_ID`, mapped
by the VMM from outside, as minijail does), so a device never runs as the host's root.
The device is PID 1 of its own PID namespace: a VMM that may create PID namespaces (root)
forks it straight into one (`Jail.fork`); otherwise `enter` forks once more and the
first child waits for the device. It pivots into an empty
directory mounted read-only, becomes root of its namespace, drops every capability,
caps RLIMIT_NOFILE, RLIMIT_DATA (its heap: guest memory is a shared mapping and does
not count) and RLIMIT_CORE (0), becomes non-dumpable, sets NO_NEW_PRIVS and, last,
installs the device's seccomp filter (compiled in the VMM before the fork).
"""

from __future__ import annotations

import ctypes
import os
import resource
import signal
import struct
from dataclasses import dataclass, field
from typing import Callable

from crosvm.jail.policy import PolicyError, load_policy
from crosvm.jail.seccomp import ACT_KILL_PROCESS, ACT_LOG, SeccompError, compile_filter, load_filter

_libc = ctypes.CDLL(None, use_errno=True)  # libc is loaded; find_library spawns ldconfig

CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
MS_RDONLY = 1
MS_NOSUID, MS_NODEV, MS_NOEXEC = 2, 4, 8
MS_REMOUNT = 32
# statvfs f_flag bit -> the mount flag that keeps it (MS_RDONLY, NOSUID, NODEV, NOEXEC,
# atime): a read-only shared directory stays read-only, and may be shared.
_LOCKED_MOUNT_FLAGS = ((1, 1), (2, 2), (4, 4), (8, 8), (1024, 1024), (2048, 2048),
                       (4096, 1 << 21))
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 1 << 18
MNT_DETACH = 2
PR_SET_PDEATHSIG = 1
PR_SET_DUMPABLE = 4
PR_SET_KEEPCAPS = 8
PR_SET_NAME = 15
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
SYS_PIVOT_ROOT = 155
SYS_CAPSET = 126
LINUX_CAPABILITY_VERSION_3 = 0x20080522
DEFAULT_PIVOT_ROOT = "/var/empty"
DEFAULT_MAX_OPEN_FILES = 1024
DEFAULT_MAX_DATA_BYTES = 256 << 20
# The outside identity of device processes of a VMM run as root: no account has it and
# no file belongs to it, so a device that escapes its namespaces owns nothing.
JAIL_ID = 0x7FFF_FF00
DEFAULT_SECCOMP_POLICY_DIR = os.path.join(
    os.path.dirname(os.path.dirname(os.path.realpath(__file__))), "seccomp", "x86_64")


class JailError(Exception):
    """The jail could not be built; the message names the step."""


# Capabilities a file server keeps inside its user namespace (they act only on files
# whose owners are mapped there): chown, dac_override, dac_read_search, fowner, fsetid.
FILE_SERVER_CAPS = 0b11111


@dataclass
class JailConfig:
    """What one device needs from its jail beyond the defaults.

    `binds`: host directories shown at their own paths in a tmpfs root (a vsock's
    socket directory). `root`: a host directory that becomes the root itself, writable
    (a shared directory). `uid_map`/`gid_map`: the user namespace's maps in
    /proc/PID/uid_map form, and `uid`/`gid` the identity inside it (default: root
    mapped to JAIL_ID, or to the VMM's own user). `caps`: capability bits kept.
    `prepare`: runs in the jailed process before the pivot, while host paths are
    still visible (opening /proc/self/fd, say)."""

    binds: list[str] = field(default_factory=list)
    root: str | None = None
    uid_map: str | None = None
    gid_map: str | None = None
    uid: int = 0
    gid: int = 0
    caps: int = 0
    prepare: "Callable[[], None] | None" = None
    max_open_files: int | None = None  # RLIMIT_NOFILE (within the hard limit) if not the jail's


def _check(what: str, result: int) -> int:
    if result < 0:
        err = ctypes.get_errno()
        raise JailError(f"{what}: {os.strerror(err)}")
    return result


def prctl(option: int, arg2: int = 0, arg3: int = 0) -> int:
    return _check(f"prctl({option})",
                  _libc.prctl(option, ctypes.c_ulong(arg2), ctypes.c_ulong(arg3), 0, 0))


def set_name(name: str) -> None:
    """The thread name (`comm`) shown in ps and in the kernel's seccomp reports."""
    prctl(PR_SET_NAME, ctypes.cast(ctypes.c_char_p(name.encode()[:15]), ctypes.c_void_p).value)


def ensure_pivot_root(path: str) -> None:
    """Create the empty pivot directory if missing; a clear error if that fails."""
    if not os.path.isdir(path):
        try:
            os.makedirs(path, mode=0o755, exist_ok=True)
        except OSError as e:
            raise JailError(f"cannot create the sandbox's pivot root {path}: "
                            f"{e.strerror} (use --pivot-root DIR)") from e


def _last_cap() -> int:
    try:
        with open("/proc/sys/kernel/cap_last_cap") as f:
            return int(f.read())
    except OSError:
        return 40


class IdMapRequest:
    """A root VMM maps a device's user namespace from outside: writing an id other
    than one's own into uid_map takes CAP_SETUID in the parent namespace, which the
    device loses when it unshares. Two pipes: the device asks, the VMM answers."""

    def __init__(self, uid_map: str | None = None, gid_map: str | None = None) -> None:
        self.uid_map = uid_map or f"0 {JAIL_ID} 1\n"
        self.gid_map = gid_map or f"0 {JAIL_ID} 1\n"
        self._ask_r, self._ask_w = os.pipe2(os.O_CLOEXEC)
        self._done_r, self._done_w = os.pipe2(os.O_CLOEXEC)

    def child_fds(self) -> list[int]:
        """The ends the device process keeps."""
        return [self._ask_w, self._done_r]

    def request(self) -> None:
        """In the device, right after unshare: wait until the VMM has mapped it."""
        os.write(self._ask_w, b"?")
        if os.read(self._done_r, 1) != b"k":
            raise JailError("the VMM could not map the device's user namespace")
        os.close(self._ask_w)
        os.close(self._done_r)

    def serve(self, pid: int) -> None:
        """In the VMM, after the fork: map `pid`'s namespace when it asks."""
        os.close(self._ask_w)
        os.close(self._done_r)
        try:
            if os.read(self._ask_r, 1) != b"?":
                return  # the device died before it asked; its end is reported elsewhere
            try:
                with open(f"/proc/{pid}/uid_map", "w") as f:
                    f.write(self.uid_map)
                with open(f"/proc/{pid}/setgroups", "w") as f:
                    f.write("deny")
                with open(f"/proc/{pid}/gid_map", "w") as f:
                    f.write(self.gid_map)
                answer = b"k"
            except OSError:
                answer = b"!"
            try:
                os.write(self._done_w, answer)
            except OSError:
                pass  # the device died after asking; its end is reported elsewhere
        finally:
            os.close(self._ask_r)
            os.close(self._done_w)


@dataclass
class Jail:
    """What minijail would be configured with for one device."""

    pivot_root: str = DEFAULT_PIVOT_ROOT
    max_open_files: int = DEFAULT_MAX_OPEN_FILES
    max_data_bytes: int = DEFAULT_MAX_DATA_BYTES
    seccomp_policy_dir: str = DEFAULT_SECCOMP_POLICY_DIR
    seccomp_log_failures: bool = False
    _filters: dict[str, bytes] = field(default_factory=dict, repr=False)
    # The VMM's own PID namespace (to return to after each fork), or False once making
    # one failed (not root): then `enter` makes the namespace and an intermediate process.
    _own_pid_ns: "int | bool | None" = field(default=None, repr=False)
    _in_new_pid_ns: bool = field(default=False, repr=False)  # set in a `fork` child

    def fork(self) -> int:
        """`os.fork()` for a device process, the child already PID 1 of a new PID
        namespace when the VMM may make one: then `enter` needs no process in between
        to wait for the device (one process per device, not two, and less to fork).

        Only the calling thread's children go to the new namespace, and the thread is
        back in its own before this returns (a thread cannot start threads while its
        children's namespace differs from its own)."""
        if self._own_pid_ns is None:
            try:
                self._own_pid_ns = os.open("/proc/self/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                self._own_pid_ns = False
        if self._own_pid_ns is False:
            return os.fork()
        pid = -1
        try:
            if _libc.unshare(CLONE_NEWPID) != 0:  # not root: enter() makes the namespace
                os.close(self._own_pid_ns)
                self._own_pid_ns = False
                return os.fork()
            pid = os.fork()
        finally:
            # Only the parent goes back (the child is PID 1 of the new namespace, which
            # it cannot leave). Also after a failed fork or an exception in between.
            if pid != 0 and self._own_pid_ns is not False \
                    and _libc.setns(self._own_pid_ns, CLONE_NEWPID) != 0:
                err = ctypes.get_errno()
                if pid > 0:
                    os.kill(pid, signal.SIGKILL)
                    os.waitpid(pid, 0)
                raise JailError(f"setns(own PID namespace): {os.strerror(err)}")
        if pid == 0:
            self._in_new_pid_ns = True
        return pid

    def filter_for(self, policy: str, widen: str | None = None) -> bytes:
        """The BPF for `<policy_dir>/<policy>.policy` (or `policy` itself when it is an
        absolute path), compiled once (call it before fork).

        `widen` names a second policy whose rules are added, replacing the first's for
        the syscalls it names (a vhost-user back-end: the device's own policy plus
        serving the socket and mapping the front-end's memory).

        A syscall outside the policy kills the process (SIGSYS), or with
        `seccomp_log_failures` is allowed and logged by the kernel."""
        key = policy if widen is None else f"{policy}+{widen}"
        if key not in self._filters:
            default = ACT_LOG if self.seccomp_log_failures else ACT_KILL_PROCESS
            try:
                rules = load_policy(self._policy_path(policy)).rules
                if widen is not None:
                    extra = load_policy(self._policy_path(widen)).rules
                    replaced = {r.syscall for r in extra}
                    rules = [r for r in rules if r.syscall not in replaced] + extra
                self._filters[key] = compile_filter(rules, default)
            except (PolicyError, SeccompError) as e:
                raise JailError(f"seccomp policy {key}: {e}") from None
        return self._filters[key]

    def _policy_path(self, policy: str) -> str:
        return policy if os.path.isabs(policy) else os.path.join(
            self.seccomp_policy_dir, f"{policy}.policy")

    def enter(self, seccomp_filter: bytes | None = None,
              id_map: "IdMapRequest | None" = None, binds: list[str] | None = None,
              config: JailConfig | None = None) -> None:
        """Jail the calling process. Returns in the jailed grandchild only; the
        intermediate process waits for it and exits with its status.

        With `id_map` (a root VMM), the VMM maps the new user namespace from outside,
        root inside to JAIL_ID outside, as minijail does; the mounts are made before the
        process becomes that identity. Without it, the caller's own uid is mapped to
        root inside (a VMM run by a user). `binds` are host directories the device
        must reach (a vsock's socket directory): the root is then a fresh tmpfs holding
        only those, bind-mounted at their own paths. `config` says the rest (a shared
        directory as the root, id maps, identity, kept capabilities)."""
        config = config or JailConfig(binds=list(binds or []))
        last_cap = _last_cap()  # /proc is gone after pivot_root
        if id_map is not None:
            os.setgroups([])  # setgroups is denied inside: drop root's groups now
        uid, gid = os.getuid(), os.getgid()
        new_pid_ns = 0 if self._in_new_pid_ns else CLONE_NEWPID
        _check("unshare", _libc.unshare(CLONE_NEWUSER | new_pid_ns | CLONE_NEWNS
                                        | CLONE_NEWIPC | CLONE_NEWUTS | CLONE_NEWNET))
        if id_map is not None:
            id_map.request()
        else:
            self._map_ids(config.uid_map or f"0 {uid} 1\n", config.gid_map or f"0 {gid} 1\n")
        if new_pid_ns:  # PID 1 of the new namespace is the next child: fork, and wait
            pid = os.fork()
            if pid != 0:
                if id_map is not None:
                    self._become(config.uid, config.gid, 0)
                self._reap(pid)  # never returns
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if config.prepare is not None:
            config.prepare()
        if config.root is not None:
            self._pivot_into(config.root)
        else:
            self._pivot(config.binds)
        # As the namespace's root until now (a user VMM's own uid is root inside).
        self._become(config.uid, config.gid, config.caps)
        for cap in range(last_cap + 1):
            if not config.caps >> cap & 1:
                prctl(PR_CAPBSET_DROP, cap)
        prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL)
        header = struct.pack("<Ii", LINUX_CAPABILITY_VERSION_3, 0)
        low, high = config.caps & 0xFFFF_FFFF, config.caps >> 32
        # effective, permitted, inheritable for caps 0-31, then for 32-63
        data = struct.pack("<6I", low, low, 0, high, high, 0)
        _check("capset", _libc.syscall(SYS_CAPSET, header, data))
        nofile = config.max_open_files or self.max_open_files
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        if hard != resource.RLIM_INFINITY:
            nofile = min(nofile, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))
        resource.setrlimit(resource.RLIMIT_DATA, (self.max_data_bytes, self.max_data_bytes))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # a core would hold guest RAM
        prctl(PR_SET_DUMPABLE, 0)
        prctl(PR_SET_NO_NEW_PRIVS, 1)
        if seccomp_filter is not None:
            try:
                load_filter(seccomp_filter)
            except SeccompError as e:
                raise JailError(str(e)) from None

    @staticmethod
    def _become(uid: int, gid: int, caps: int) -> None:
        """`uid`/`gid` inside the namespace (root by default, which is JAIL_ID outside
        for a root VMM: no longer the host's root). Keeps the permitted capabilities
        across a change to a non-zero uid when `caps` asks for some."""
        try:
            os.setresgid(gid, gid, gid)
            if caps and uid != 0:
                prctl(PR_SET_KEEPCAPS, 1)
            os.setresuid(uid, uid, uid)
        except OSError as e:
            raise JailError(f"cannot become uid {uid}, gid {gid} in the device's user "
                            f"namespace (is it in uidmap/gidmap?): {e.strerror}") from None
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # a credential change clears it

    @staticmethod
    def _map_ids(uid_map: str, gid_map: str) -> None:
        """A VMM run by a user maps its own ids (one line each: all it may write)."""
        try:
            with open("/proc/self/uid_map", "w") as f:
                f.write(uid_map)
            with open("/proc/self/setgroups", "w") as f:
                f.write("deny")
            with open("/proc/self/gid_map", "w") as f:
                f.write(gid_map)
        except PermissionError:
            raise JailError(f"cannot map uids {uid_map.strip()!r} / gids {gid_map.strip()!r}"
                            " in the device's user namespace: a VMM not run as root may "
                            "map only its own uid and gid") from None

    @staticmethod
    def _reap(pid: int) -> None:
        """The process outside the PID namespace: hold no fds, mirror the device's end."""
        signal.signal(signal.SIGTERM, lambda *_: os.kill(pid, signal.SIGKILL))
        os.closerange(0, resource.getrlimit(resource.RLIMIT_NOFILE)[0])
        while True:
            try:
                _, status = os.waitpid(pid, 0)
                break
            except ChildProcessError:
                os._exit(1)
            except InterruptedError:
                continue
        if os.WIFSIGNALED(status):
            os._exit(128 + os.WTERMSIG(status))
        os._exit(os.WEXITSTATUS(status) if os.WIFEXITED(status) else 1)

    def _pivot_into(self, directory: str) -> None:
        """Make `directory` (a shared directory) the root, writable, as minijail's
        chroot-style jail for crosvm's file servers: nothing else of the host stays
        reachable by path, so even a symlink planted on the host points inside it."""
        path = directory.encode()
        _check("mount(/, private)", _libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None))
        _check(f"bind mount {directory}", _libc.mount(path, path, None, MS_BIND | MS_REC, None))
        os.chdir(directory)
        _check("pivot_root", _libc.syscall(SYS_PIVOT_ROOT, b".", b"."))
        _check("umount old root", _libc.umount2(b".", MNT_DETACH))
        os.chdir("/")
        # No device nodes or setuid programs through this mount, whatever is on the host.
        inherited = os.statvfs("/").f_flag
        flags = MS_REMOUNT | MS_BIND | MS_NOSUID | MS_NODEV | sum(
            ms for st, ms in _LOCKED_MOUNT_FLAGS if inherited & st)
        _check("remount / nosuid,nodev", _libc.mount(None, b"/", None, flags, None))

    def _pivot(self, binds: list[str]) -> None:
        root = self.pivot_root.encode()
        _check("mount(/, private)", _libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None))
        if binds:
            # The shared empty root cannot hold mount points: a private tmpfs over it
            # (in this mount namespace only) can, and holds nothing else.
            _check(f"mount tmpfs on {self.pivot_root}",
                   _libc.mount(b"tmpfs", root, b"tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC,
                               b"size=64k,mode=0755,uid=0,gid=0"))
            # Files are made as root of the new namespace: the VMM's own uid may have no
            # mapping in it (EOVERFLOW). It is the identity the device will have, so the
            # bound directories must be reachable by it anyway.
            _libc.setfsuid(0)
            _libc.setfsgid(0)
            for path in binds:
                target = os.path.join(self.pivot_root, os.path.abspath(path).lstrip("/"))
                os.makedirs(target, exist_ok=True)
                _check(f"bind mount {path}", _libc.mount(path.encode(), target.encode(), None,
                                                         MS_BIND | MS_REC, None))
        else:
            _check(f"bind mount {self.pivot_root}",
                   _libc.mount(root, root, None, MS_BIND | MS_REC, None))
        os.chdir(self.pivot_root)
        _check("pivot_root", _libc.syscall(SYS_PIVOT_ROOT, b".", b"."))
        _check("umount old root", _libc.umount2(b".", MNT_DETACH))
        os.chdir("/")
        # A remount in a user namespace must keep the flags it inherited (nosuid, ...).
        inherited = os.statvfs("/").f_flag
        flags = MS_REMOUNT | MS_BIND | MS_RDONLY | sum(
            ms for st, ms in _LOCKED_MOUNT_FLAGS if inherited & st)
        _check("remount / read-only", _libc.mount(None, b"/", None, flags, None))
