"""Test harness: boots the test guest with `crosvm run` and drives its serial agent.

The guest's /init serves commands on COM2 (ttyS1) with guest/agent.sh: the host sends
`<id> <command>`, the guest answers @@BEGIN <id> / O:<stdout line> / E:<stderr line> /
@@END <id> <status> (O-:/E-: for a last line without newline). The host end of COM2 is a
pair of pipes handed to crosvm as /proc/self/fd/N paths.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from typing import Callable

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_GUEST = os.path.join(os.path.dirname(REPO), "shared", "guest")
# The command line this host's emulator needs (../shared/guest/README.md).
HOST_CMDLINE = ("console=ttyS0 panic=-1 noxsave clearcpuid=cx16,smap,popcnt nokaslr "
                "no_int3_selftest tsc=reliable noreplace-smp quiet")

BOOT_TIMEOUT = float(os.environ.get("CROSVM_TEST_BOOT_TIMEOUT", "300"))
COMMAND_TIMEOUT = float(os.environ.get("CROSVM_TEST_COMMAND_TIMEOUT", "120"))

# This host's nested KVM (kvm_pvm) now and then starts a guest process whose first TLS
# read sees zeros: static busybox dies in glibc's __ctype_init before main ("segfault at
# 0", these code bytes). It is the platform, not the VMM: QEMU on the same host and
# kernel shows it at the same rate (~1 in 150 process starts, 2 vCPUs). Such a process
# did nothing yet, so a command it killed is run again; see AgentChannel.run.
PLATFORM_FAULT_CODE = "64 48 8b 00 <48> 8b 00 48 8b 70 38"
PLATFORM_FAULT_RETRIES = 3


def test_kernel(kind: str = "vmlinux") -> str | None:
    """$CROSVM_TEST_KERNEL (for vmlinux) or ../shared/guest/<kind>, if it exists."""
    if kind == "vmlinux" and os.environ.get("CROSVM_TEST_KERNEL"):
        path = os.environ["CROSVM_TEST_KERNEL"]
    else:
        path = os.path.join(SHARED_GUEST, kind)
    return path if os.path.exists(path) else None


@dataclass
class CommandResult:
    """A guest command's output (undecodable bytes as surrogate escapes) and status."""
    stdout: str
    stderr: str
    returncode: int


class GuestError(Exception):
    """The guest did not answer in time, the VM died, or the agent broke its protocol."""


class AgentChannel:
    """The host end of guest/agent.sh over two file descriptors.

    A reader thread splits the agent's output into lines. `describe` gives the context
    (logs) for error messages and `exited` says whether the other end is gone for good.
    """

    def __init__(self, read_fd: int, write_fd: int,
                 exited: Callable[[], bool] = lambda: False,
                 describe: Callable[[], str] = lambda: "") -> None:
        self._in = write_fd
        self._out = read_fd
        self._exited = exited
        self._describe = describe
        self._next_id = 1
        self._platform_faults = 0  # platform faults in the guest's log, last we looked
        self._lines: list[str] = []
        self._cond = threading.Condition()
        self._eof = False
        self._reader = threading.Thread(target=self._read_loop, daemon=True)
        self._reader.start()

    def _read_loop(self) -> None:
        buf = b""
        while True:
            try:
                data = os.read(self._out, 65536)
            except OSError:
                data = b""
            if not data:
                with self._cond:
                    self._eof = True
                    self._cond.notify_all()
                return
            buf += data
            *lines, buf = buf.split(b"\n")
            with self._cond:
                # The port is raw (no CR/LF translation): every byte is the command's own.
                self._lines.extend(line.decode(errors="surrogateescape") for line in lines)
                self._cond.notify_all()

    def _next_line(self, deadline: float) -> str:
        with self._cond:
            while not self._lines:
                if self._eof or self._exited():
                    raise GuestError(f"guest agent gone; {self._describe()}")
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise GuestError(f"guest did not answer in time; {self._describe()}")
                self._cond.wait(min(remaining, 1.0))
            return self._lines.pop(0)

    def wait_ready(self, timeout: float = BOOT_TIMEOUT) -> None:
        """Wait until the agent says @@READY."""
        deadline = time.monotonic() + timeout
        while self._next_line(deadline) != "@@READY":
            pass

    def send(self, command: str) -> int:
        """Send a command without waiting for its answer; returns its id."""
        if "\n" in command:
            raise ValueError("agent commands are single lines")
        command_id = self._next_id
        self._next_id += 1
        os.write(self._in, f"{command_id} {command}\n".encode())
        return command_id

    def run(self, command: str, timeout: float = COMMAND_TIMEOUT) -> CommandResult:
        """Run a shell command in the guest and return its output and status.

        A command that failed while the guest kernel logged a new platform fault
        (PLATFORM_FAULT_CODE) is run again, up to PLATFORM_FAULT_RETRIES times."""
        result = self._run_once(command, timeout)
        for _ in range(PLATFORM_FAULT_RETRIES):
            if result.returncode == 0 or not self._new_platform_fault(timeout):
                break
            print(f"guest_vm: {command!r} hit the host's known process-start fault; "
                  f"running it again", file=sys.stderr)
            result = self._run_once(command, timeout)
        return result

    def _new_platform_fault(self, timeout: float) -> bool:
        """Whether the guest kernel logged a platform fault since the last look."""
        seen = self._run_once(f"dmesg | grep -c -F '{PLATFORM_FAULT_CODE}'", timeout)
        try:
            count = int(seen.stdout.strip())
        except ValueError:
            return False  # the check itself did not run: do not guess
        new = count > self._platform_faults
        self._platform_faults = count
        return new

    def _run_once(self, command: str, timeout: float) -> CommandResult:
        command_id = self.send(command)
        deadline = time.monotonic() + timeout
        # Answers to earlier commands (sent without waiting, or timed out) are not ours.
        while self._next_line(deadline) != f"@@BEGIN {command_id}":
            pass
        out: list[str] = []
        err: list[str] = []
        end = f"@@END {command_id} "
        while True:
            line = self._next_line(deadline)
            if line.startswith(end):
                return CommandResult("".join(out), "".join(err), int(line[len(end):]))
            tag, sep, text = line.partition(":")
            if not sep or tag not in ("O", "O-", "E", "E-"):
                raise GuestError(f"agent protocol: unexpected line {line!r} in the answer "
                                 f"to {command!r}; {self._describe()}")
            target = out if tag[0] == "O" else err
            target.append(text if tag.endswith("-") else text + "\n")


class GuestVm:
    """One running VM. Use as a context manager; it is killed on exit."""

    def __init__(self, kernel: str, initrd: str | None, workdir: str, cpus: int = 1,
                 mem: int = 256, params: tuple[str, ...] = (), extra_args: tuple[str, ...] = (),
                 console_hardware: str = "serial", mode: str = "agent",
                 env: dict[str, str] | None = None, entry: str = "crosvm",
                 pass_fds: tuple[int, ...] = (), prefix: tuple[str, ...] = ()) -> None:
        """`initrd=None` boots from a root disk in `extra_args`; `console_hardware`
        `virtio-console` makes hvc0 the console (written to `console_path`); `env` is
        added to crosvm's environment; `entry` is the module run as `python -m` (a test
        entry point such as tests.support.probe_vmm); `prefix` is a command crosvm runs
        under (`ip netns exec NS`)."""
        self.workdir = workdir
        self.console_path = os.path.join(workdir, "console.log")
        self.log_path = os.path.join(workdir, "crosvm.log")
        out_r, out_w = os.pipe2(os.O_CLOEXEC)
        in_r, in_w = os.pipe2(os.O_CLOEXEC)
        host_cmdline = os.environ.get("CROSVM_TEST_CMDLINE", HOST_CMDLINE)
        if console_hardware != "serial":
            # crosvm adds console=hvc0 itself; ttyS0 must not win as /dev/console.
            host_cmdline = " ".join(w for w in host_cmdline.split() if w != "console=ttyS0")
        cmdline = " ".join((host_cmdline, f"pycrosvm.mode={mode}") + tuple(params))
        self.args = [*prefix, sys.executable, "-m", entry, "run",
                     "--cpus", str(cpus), "--mem", str(mem),
                     *(("--initrd", initrd) if initrd else ()),
                     "--serial", f"type=file,path={self.console_path},num=1,console,"
                                 f"hardware={console_hardware}",
                     "--serial", f"type=file,path=/proc/self/fd/{out_w},"
                                 f"input=/proc/self/fd/{in_r},num=2",
                     "-p", cmdline, *extra_args,
                     # For debugging a run, e.g. "--seccomp-log-failures".
                     *shlex.split(os.environ.get("CROSVM_TEST_EXTRA_ARGS", "")), kernel]
        self._log = open(self.log_path, "wb")
        self._start = time.monotonic()
        self.proc = subprocess.Popen(self.args, pass_fds=(out_w, in_r, *pass_fds),
                                     stdin=subprocess.DEVNULL,
                                     stdout=self._log, stderr=subprocess.STDOUT, cwd=REPO,
                                     env={**os.environ, **(env or {})})
        os.close(out_w)
        os.close(in_r)
        self._in = in_w
        self._out = out_r
        self.agent = AgentChannel(out_r, in_w, exited=lambda: self.proc.poll() is not None,
                                  describe=self._describe)

    def _describe(self) -> str:
        status = self.proc.poll()
        state = "VM running" if status is None else f"VM exited (status {status})"
        return f"{state}; log: {self.log_tail()}"

    def wait_ready(self, timeout: float = BOOT_TIMEOUT) -> float:
        """Wait until the agent says @@READY; returns seconds since launch."""
        self.agent.wait_ready(timeout)
        return time.monotonic() - self._start

    def send(self, command: str) -> int:
        """Send a command without waiting for an answer (e.g. poweroff); returns its id."""
        return self.agent.send(command)

    def run(self, command: str, timeout: float = COMMAND_TIMEOUT) -> CommandResult:
        """Run a shell command in the guest and return its output and status. Output is
        text: the agent drops NUL bytes (hash binary data in the guest). Besides the
        shell, the agent's `wait_for FILE TEXT [SECONDS]` is there (guest/agent.sh)."""
        return self.agent.run(command, timeout)

    def wait_exit(self, timeout: float = BOOT_TIMEOUT) -> int:
        return self.proc.wait(timeout)

    def console(self) -> str:
        try:
            with open(self.console_path, "rb") as f:
                return f.read().decode(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, n: int = 2000) -> str:
        self._log.flush()
        with open(self.log_path, "rb") as f:
            text = f.read().decode(errors="replace")
        return text[-n:] + "\n--- console ---\n" + self.console()[-n:]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for fd in (self._in, self._out):
            try:
                os.close(fd)
            except OSError:
                pass
        self._log.close()

    def __enter__(self) -> "GuestVm":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
