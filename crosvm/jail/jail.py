"""Jail a forked device process the way minijail does for crosvm.

`Jail.enter()` runs in a freshly forked, single-threaded child. A VMM run as root first
becomes an unused, unprivileged uid and gid (`JAIL_ID`), as crosvm's devices run as
their own user; then the child unshares the user, PID, mount, IPC, UTS and network
namespaces, maps its (unprivileged) user to root inside, forks once more so the device
becomes PID 1 of its namespace, pivots into an empty directory mounted read-only, drops
every capability, caps RLIMIT_NOFILE and RLIMIT_DATA (its heap: guest memory is a
shared mapping and does not count), sets NO_NEW_PRIVS and, last, installs the device's
seccomp filter (compiled in the VMM before the fork).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import resource
import signal
import struct
from dataclasses import dataclass, field
from pathlib import Path

from crosvm.jail.policy import PolicyError, load_policy
from crosvm.jail.seccomp import ACT_KILL_PROCESS, ACT_LOG, SeccompError, compile_filter, load_filter

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)

CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
MS_RDONLY = 1
MS_REMOUNT = 32
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 1 << 18
MNT_DETACH = 2
PR_SET_PDEATHSIG = 1
PR_SET_DUMPABLE = 4
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
DEFAULT_SECCOMP_POLICY_DIR = str(Path(__file__).resolve().parent.parent / "seccomp" / "x86_64")


class JailError(Exception):
    """The jail could not be built; the message names the step."""


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
    """Create the empty pivot directory if missing; a clear error if that fails, or if
    the devices' unprivileged user could not reach it."""
    if not os.path.isdir(path):
        try:
            os.makedirs(path, mode=0o755, exist_ok=True)
        except OSError as e:
            raise JailError(f"cannot create the sandbox's pivot root {path}: "
                            f"{e.strerror} (use --pivot-root DIR)") from e
    if os.geteuid() == 0:
        # Device processes of a root VMM mount it as JAIL_ID: "other" must be able to
        # search every directory on the way.
        walk = os.path.abspath(path)
        while True:
            if not os.stat(walk).st_mode & 0o001:
                raise JailError(f"the sandbox's pivot root {path} is not reachable by the "
                                f"device user (uid {JAIL_ID}): {walk} is not searchable by "
                                f"others (chmod o+x, or use --pivot-root DIR)")
            if walk == "/":
                break
            walk = os.path.dirname(walk)


def _last_cap() -> int:
    try:
        with open("/proc/sys/kernel/cap_last_cap") as f:
            return int(f.read())
    except OSError:
        return 40


@dataclass
class Jail:
    """What minijail would be configured with for one device."""

    pivot_root: str = DEFAULT_PIVOT_ROOT
    max_open_files: int = DEFAULT_MAX_OPEN_FILES
    max_data_bytes: int = DEFAULT_MAX_DATA_BYTES
    seccomp_policy_dir: str = DEFAULT_SECCOMP_POLICY_DIR
    seccomp_log_failures: bool = False
    _filters: dict[str, bytes] = field(default_factory=dict, repr=False)

    def filter_for(self, policy: str) -> bytes:
        """The BPF for `<policy_dir>/<policy>.policy` (or `policy` itself when it is an
        absolute path), compiled once (call it before fork).

        A syscall outside the policy kills the process (SIGSYS), or with
        `seccomp_log_failures` is allowed and logged by the kernel."""
        if policy not in self._filters:
            path = Path(policy) if os.path.isabs(policy) else (
                Path(self.seccomp_policy_dir) / f"{policy}.policy")
            default = ACT_LOG if self.seccomp_log_failures else ACT_KILL_PROCESS
            try:
                self._filters[policy] = compile_filter(load_policy(path).rules, default)
            except (PolicyError, SeccompError) as e:
                raise JailError(f"seccomp policy {policy}: {e}") from None
        return self._filters[policy]

    def enter(self, seccomp_filter: bytes | None = None) -> None:
        """Jail the calling process. Returns in the jailed grandchild only; the
        intermediate process waits for it and exits with its status."""
        last_cap = _last_cap()  # /proc is gone after pivot_root
        if os.geteuid() == 0:
            self._drop_root()
        uid, gid = os.getuid(), os.getgid()
        _check("unshare", _libc.unshare(CLONE_NEWUSER | CLONE_NEWPID | CLONE_NEWNS
                                        | CLONE_NEWIPC | CLONE_NEWUTS | CLONE_NEWNET))
        self._map_ids(uid, gid)
        pid = os.fork()
        if pid != 0:
            self._reap(pid)  # never returns
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        self._pivot()
        for cap in range(last_cap + 1):
            prctl(PR_CAPBSET_DROP, cap)
        prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL)
        header = struct.pack("<Ii", LINUX_CAPABILITY_VERSION_3, 0)
        data = bytes(24)  # effective, permitted, inheritable = 0 (two 32-bit halves)
        _check("capset", _libc.syscall(SYS_CAPSET, header, data))
        resource.setrlimit(resource.RLIMIT_NOFILE, (self.max_open_files, self.max_open_files))
        resource.setrlimit(resource.RLIMIT_DATA, (self.max_data_bytes, self.max_data_bytes))
        prctl(PR_SET_NO_NEW_PRIVS, 1)
        if seccomp_filter is not None:
            try:
                load_filter(seccomp_filter)
            except SeccompError as e:
                raise JailError(str(e)) from None

    @staticmethod
    def _drop_root() -> None:
        """Become JAIL_ID before unsharing, so root outside is never mapped inside."""
        os.setgroups([])
        os.setresgid(JAIL_ID, JAIL_ID, JAIL_ID)
        os.setresuid(JAIL_ID, JAIL_ID, JAIL_ID)
        # Changing credentials clears both: /proc/self/uid_map must stay writable, and
        # the process must still die with the VMM.
        prctl(PR_SET_DUMPABLE, 1)
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() == 1:
            os._exit(1)  # the VMM died before the signal was armed again

    @staticmethod
    def _map_ids(uid: int, gid: int) -> None:
        with open("/proc/self/uid_map", "w") as f:
            f.write(f"0 {uid} 1\n")
        with open("/proc/self/setgroups", "w") as f:
            f.write("deny")
        with open("/proc/self/gid_map", "w") as f:
            f.write(f"0 {gid} 1\n")

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

    def _pivot(self) -> None:
        root = self.pivot_root.encode()
        _check("mount(/, private)", _libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None))
        _check(f"bind mount {self.pivot_root}",
               _libc.mount(root, root, None, MS_BIND | MS_REC, None))
        os.chdir(self.pivot_root)
        _check("pivot_root", _libc.syscall(SYS_PIVOT_ROOT, b".", b"."))
        _check("umount old root", _libc.umount2(b".", MNT_DETACH))
        os.chdir("/")
        _check("remount / read-only",
               _libc.mount(None, b"/", None, MS_REMOUNT | MS_BIND | MS_RDONLY, None))
