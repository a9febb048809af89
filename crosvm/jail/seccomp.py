"""Seccomp-BPF filters: compiled with libseccomp at start-up, loaded in the device process.

libseccomp (`libseccomp.so.2`, a system library on every distribution that ships
systemd) is the well-kept compiler from rules to BPF: it emits the architecture check,
resolves syscall names and splits 64-bit argument comparisons. It is reached through
ctypes. Compilation happens once per policy in the VMM, before any fork; the jailed
child only needs one `seccomp(2)` call to install the bytes, so it never parses
anything after it has been sandboxed.
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
import signal
from dataclasses import dataclass

# Actions (linux/seccomp.h, as libseccomp spells them).
ACT_KILL_PROCESS = 0x8000_0000
ACT_TRAP = 0x0003_0000
ACT_LOG = 0x7FFC_0000
ACT_ALLOW = 0x7FFF_0000


def act_errno(errno: int) -> int:
    """The action that fails the syscall with `errno` instead of running it."""
    return 0x0005_0000 | (errno & 0xFFFF)


# enum scmp_compare
CMP_NE, CMP_LT, CMP_LE, CMP_EQ, CMP_GE, CMP_GT, CMP_MASKED_EQ = range(1, 8)

SYS_SECCOMP = 317
SECCOMP_SET_MODE_FILTER = 1
SECCOMP_FILTER_FLAG_TSYNC = 1
BPF_INSN_SIZE = 8


class SeccompError(Exception):
    """A filter could not be compiled or installed; the message says which and why."""


class _ArgCmp(ctypes.Structure):
    _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int),
                ("datum_a", ctypes.c_uint64), ("datum_b", ctypes.c_uint64)]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


@dataclass(frozen=True)
class ArgCmp:
    """One comparison of a syscall argument (`arg` 0-5) with `op` and data."""

    arg: int
    op: int
    a: int
    b: int = 0


@dataclass(frozen=True)
class Rule:
    """`action` for `syscall` when every comparison holds (an empty list always holds)."""

    syscall: str
    action: int
    cmps: tuple[ArgCmp, ...] = ()


_lib: ctypes.CDLL | None = None


def _libseccomp() -> ctypes.CDLL:
    global _lib
    if _lib is None:
        try:  # the soname first: find_library spawns ldconfig (milliseconds per VM start)
            lib = ctypes.CDLL("libseccomp.so.2", use_errno=True)
        except OSError:
            from ctypes.util import find_library
            try:
                lib = ctypes.CDLL(find_library("seccomp") or "libseccomp.so",
                                  use_errno=True)
            except OSError as e:
                raise SeccompError(f"libseccomp is needed for the sandbox ({e}); install "
                                   "libseccomp2, or run with --disable-sandbox") from e
        lib.seccomp_init.restype = ctypes.c_void_p
        lib.seccomp_init.argtypes = [ctypes.c_uint32]
        lib.seccomp_release.argtypes = [ctypes.c_void_p]
        lib.seccomp_rule_add_array.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int,
                                               ctypes.c_uint, ctypes.POINTER(_ArgCmp)]
        lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
        lib.seccomp_export_bpf.argtypes = [ctypes.c_void_p, ctypes.c_int]
        lib.seccomp_syscall_resolve_num_arch.restype = ctypes.c_void_p  # malloc'd name
        lib.seccomp_syscall_resolve_num_arch.argtypes = [ctypes.c_uint32, ctypes.c_int]
        _lib = lib
    return _lib


def syscall_number(name: str) -> int | None:
    """The x86_64 number of a syscall, or None if libseccomp does not know the name."""
    nr = _libseccomp().seccomp_syscall_resolve_name(name.encode())
    return None if nr < 0 else nr


def compile_filter(rules: list[Rule], default_action: int) -> bytes:
    """BPF for `rules`, with `default_action` for every syscall they do not allow."""
    lib = _libseccomp()
    ctx = lib.seccomp_init(default_action)
    if not ctx:
        raise SeccompError("seccomp_init failed")
    try:
        for rule in rules:
            nr = syscall_number(rule.syscall)
            if nr is None:
                raise SeccompError(f"unknown syscall {rule.syscall!r}")
            cmps = (_ArgCmp * max(1, len(rule.cmps)))(
                *[_ArgCmp(c.arg, c.op, c.a, c.b) for c in rule.cmps])
            rc = lib.seccomp_rule_add_array(ctx, rule.action, nr, len(rule.cmps), cmps)
            if rc < 0:
                raise SeccompError(f"rule for {rule.syscall}: {os.strerror(-rc)}")
        fd = os.memfd_create("seccomp-bpf", os.MFD_CLOEXEC)
        try:
            rc = lib.seccomp_export_bpf(ctx, fd)
            if rc < 0:
                raise SeccompError(f"seccomp_export_bpf: {os.strerror(-rc)}")
            return os.pread(fd, os.fstat(fd).st_size, 0)
        finally:
            os.close(fd)
    finally:
        lib.seccomp_release(ctx)


_libc = ctypes.CDLL(None, use_errno=True)  # libc is loaded; find_library spawns ldconfig


def load_filter(bpf: bytes) -> None:
    """Installs `bpf` on the calling process (every thread). NO_NEW_PRIVS must be set."""
    if not bpf or len(bpf) % BPF_INSN_SIZE:
        raise SeccompError(f"bad BPF program of {len(bpf)} bytes")
    program = ctypes.create_string_buffer(bpf, len(bpf))
    fprog = _SockFprog(len(bpf) // BPF_INSN_SIZE, ctypes.addressof(program))
    rc = _libc.syscall(SYS_SECCOMP, SECCOMP_SET_MODE_FILTER, SECCOMP_FILTER_FLAG_TSYNC,
                       ctypes.byref(fprog))
    if rc != 0:
        err = ctypes.get_errno()
        raise SeccompError(f"installing the seccomp filter: {os.strerror(err)}")


def syscall_name(nr: int) -> str:
    """The name of x86_64 syscall `nr` (its number as text if libseccomp has none)."""
    ptr = _libseccomp().seccomp_syscall_resolve_num_arch(0, nr)  # 0: the native architecture
    if not ptr:
        return str(nr)
    try:
        return ctypes.string_at(ptr).decode()
    finally:
        _libc.free(ctypes.c_void_p(ptr))


_AUDIT_SECCOMP = re.compile(r'audit: type=1326 .*?\bcomm="([^"]*)".*?\bsig=(\d+)'
                            r'.*?\bsyscall=(\d+)')


class SeccompAuditLog:
    """Finds which syscall killed a device, from the kernel's seccomp audit records.

    The kernel logs every seccomp kill (and every `--seccomp-log-failures` hit) as an
    audit record of type 1326 naming the process (`comm`) and the syscall number; with
    no audit daemon running, those records go to the kernel log. Reading /dev/kmsg
    needs root or CAP_SYSLOG; without it the VMM still names the device, not the
    syscall. Opened at start-up and positioned at the end, so only this run counts.
    """

    def __init__(self, path: str = "/dev/kmsg") -> None:
        try:
            self.fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            os.lseek(self.fd, 0, os.SEEK_END)
        except OSError:
            self.fd = -1
        self.records: list[tuple[str, int, int]] = []  # comm, signal, syscall

    def _read(self) -> None:
        while self.fd >= 0:
            try:
                record = os.read(self.fd, 8192)
            except BlockingIOError:
                return
            except OSError as e:
                if e.errno == errno.EPIPE:  # records were overwritten before we read them
                    continue
                return
            if not record:
                return
            m = _AUDIT_SECCOMP.search(record.decode(errors="replace"))
            if m:
                self.records.append((m.group(1), int(m.group(2)), int(m.group(3))))

    def killing_syscall(self, comm: str) -> int | None:
        """The syscall whose seccomp kill (SIGSYS) ended process `comm`, if logged."""
        self._read()
        for name, sig, nr in reversed(self.records):
            if name == comm[:15] and sig == signal.SIGSYS:
                return nr
        return None

    def logged_syscalls(self, comm: str) -> set[int]:
        """Syscalls `comm` made outside its policy under --seccomp-log-failures."""
        self._read()
        return {nr for name, sig, nr in self.records if name == comm[:15] and sig == 0}

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
