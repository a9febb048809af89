"""`crosvm.Vm`: start a VM from Python and drive it (the control functions of
`crosvm.control` as methods, the exit code, the console, and commands run in a guest
that serves pycrosvm's guest agent on its second serial port).

    from crosvm import Vm
    with Vm.start("vmlinux", initrd="initramfs.cpio", mem=256,
                  params=["pycrosvm.mode=agent"], agent=True) as vm:
        vm.wait_ready()
        print(vm.exec("uname -r").stdout)
        vm.stop()

The VM runs `crosvm run` as a child process (this package's, with this interpreter).
Leaving the `with` block stops it (through the control socket, then by SIGKILL if it
does not exit) and reaps it, whatever happened inside.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Sequence

from crosvm import control

STOP_GRACE = 30.0  # seconds `close()` waits for a stopped VM to exit before killing it


class VmError(Exception):
    """The VM exited, or its guest agent did not answer in time."""


@dataclass
class ExecResult:
    """What a command run in the guest returned."""

    returncode: int
    stdout: str
    stderr: str


class _Agent:
    """The host end of the guest agent's line protocol on COM2:
    @@READY once, then per command @@BEGIN, O:/E: lines (a `-` after the tag: no
    newline at the end), @@END <status>."""

    def __init__(self, read_fd: int, write_fd: int) -> None:
        self.read_fd = read_fd
        self.write_fd = write_fd
        self.lines: list[str] = []
        self.closed = False
        self.cond = threading.Condition()
        threading.Thread(target=self._reader, name="crosvm_agent", daemon=True).start()

    def _reader(self) -> None:
        pending = b""
        while True:
            try:
                chunk = os.read(self.read_fd, 65536)
            except OSError:
                chunk = b""
            with self.cond:
                if not chunk:
                    self.closed = True
                    self.cond.notify_all()
                    return
                pending += chunk
                *complete, pending = pending.split(b"\n")
                self.lines += [c.decode(errors="replace").rstrip("\r") for c in complete]
                self.cond.notify_all()

    def line(self, deadline: float, alive) -> str:
        with self.cond:
            while not self.lines:
                if self.closed or not alive():
                    raise VmError("the VM exited")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise VmError("the guest agent did not answer in time")
                self.cond.wait(min(left, 0.5))
            return self.lines.pop(0)

    def send(self, command: str) -> None:
        if "\n" in command:
            raise ValueError("guest commands are single lines")
        os.write(self.write_fd, command.encode() + b"\n")

    def close(self) -> None:
        for fd in (self.read_fd, self.write_fd):
            try:
                os.close(fd)
            except OSError:
                pass


class Vm:
    """A VM run by `crosvm run` in a child process, with a control socket."""

    def __init__(self, kernel: str, *, initrd: str | None = None, mem: int = 256,
                 cpus: int = 1, blocks: Sequence[str] = (), params: Sequence[str] = (),
                 extra_args: Sequence[str] = (), agent: bool = False,
                 workdir: str | None = None, socket_path: str | None = None) -> None:
        """`blocks` are --block values (`path[,ro]...`); `params` kernel parameters;
        `extra_args` any other `crosvm run` options; `agent` connects COM2 to the
        guest agent for `exec`. Files (console log, VMM log, socket) go to `workdir`
        (a new temporary directory by default)."""
        self.workdir = workdir or tempfile.mkdtemp(prefix="crosvm-vm-")
        self.socket_path = socket_path or os.path.join(self.workdir, "crosvm.sock")
        self.console_path = os.path.join(self.workdir, "console.log")
        self.log_path = os.path.join(self.workdir, "crosvm.log")
        self.args = [sys.executable, "-m", "crosvm", "run", "--cpus", str(cpus),
                     "--mem", str(mem), "-s", self.socket_path,
                     "--serial", f"type=file,path={self.console_path},num=1,console"]
        if initrd:
            self.args += ["--initrd", initrd]
        for block in blocks:
            self.args += ["--block", block]
        if params:
            self.args += ["-p", " ".join(params)]
        self._agent: _Agent | None = None
        self._pass_fds: tuple[int, ...] = ()
        child_fds: list[int] = []
        if agent:
            out_r, out_w = os.pipe2(os.O_CLOEXEC)
            in_r, in_w = os.pipe2(os.O_CLOEXEC)
            self.args += ["--serial", f"type=file,path=/proc/self/fd/{out_w},"
                                      f"input=/proc/self/fd/{in_r},num=2"]
            self._agent = _Agent(out_r, in_w)
            child_fds = [out_w, in_r]
        self.args += [*extra_args, kernel]
        self.proc: subprocess.Popen | None = None
        self._child_fds = child_fds

    @classmethod
    def start(cls, kernel: str, **options) -> "Vm":
        """Build and launch a VM (the options of `Vm()`); use it as a context manager."""
        vm = cls(kernel, **options)
        vm.launch()
        return vm

    def launch(self) -> None:
        """Start `crosvm run`."""
        package_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            p for p in (package_root, os.environ.get("PYTHONPATH")) if p)}
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(self.args, pass_fds=self._child_fds,
                                         stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, env=env)
        for fd in self._child_fds:
            os.close(fd)
        self._child_fds = []

    # -- the guest ---------------------------------------------------------------------
    def _alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_ready(self, timeout: float = 600.0) -> None:
        """Wait for the guest agent's @@READY."""
        agent = self._need_agent()
        deadline = time.monotonic() + timeout
        while agent.line(deadline, self._alive) != "@@READY":
            pass

    def exec(self, command: str, timeout: float = 600.0) -> ExecResult:
        """Run a shell command line in the guest (through its agent)."""
        self.send(command)
        return self.read_answer(timeout)

    def send(self, command: str) -> None:
        """Send a command line to the guest agent without waiting (e.g. `poweroff`);
        `read_answer` collects its result."""
        self._need_agent().send(command)

    def read_answer(self, timeout: float = 600.0) -> ExecResult:
        """The result of the oldest command sent whose answer was not yet read."""
        agent = self._need_agent()
        deadline = time.monotonic() + timeout
        while agent.line(deadline, self._alive) != "@@BEGIN":
            pass
        streams: dict[str, list[str]] = {"O": [], "E": []}
        while True:
            line = agent.line(deadline, self._alive)
            if line.startswith("@@END "):
                return ExecResult(int(line[6:]), "".join(streams["O"]), "".join(streams["E"]))
            tag, _, text = line.partition(":")
            streams.get(tag[:1], streams["E"]).append(text if tag.endswith("-") else text + "\n")

    def _need_agent(self) -> _Agent:
        if self._agent is None:
            raise VmError("the VM was started without agent=True")
        return self._agent

    def console(self) -> str:
        """Everything the guest wrote to its console so far."""
        try:
            with open(self.console_path, "rb") as f:
                return f.read().decode(errors="replace")
        except FileNotFoundError:
            return ""

    def wait(self, timeout: float | None = None) -> int:
        """Wait for the VM to exit; its exit code (crosvm's: 0 stop, 32 reset, ...)."""
        if self.proc is None:
            raise VmError("the VM was not started")
        return self.proc.wait(timeout)

    # -- control (crosvm.control over this VM's socket) --------------------------------
    def stop(self) -> None:
        control.stop(self.socket_path)

    def suspend(self, full: bool = False) -> None:
        control.suspend(self.socket_path, full)

    def resume(self, full: bool = False) -> None:
        control.resume(self.socket_path, full)

    def powerbtn(self) -> None:
        control.powerbtn(self.socket_path)

    def sleepbtn(self) -> None:
        control.sleepbtn(self.socket_path)

    def gpe(self, number: int) -> None:
        control.gpe(self.socket_path, number)

    def disk_resize(self, index: int, new_size: int) -> None:
        control.disk_resize(self.socket_path, index, new_size)

    def balloon(self, num_bytes: int, wait: bool = False) -> None:
        control.balloon(self.socket_path, num_bytes, wait)

    def balloon_stats(self) -> control.BalloonStats:
        return control.balloon_stats(self.socket_path)

    # -- lifetime ----------------------------------------------------------------------
    def close(self) -> None:
        """Stop the VM if it still runs (control socket, then SIGKILL) and reap it."""
        if self.proc is not None and self.proc.poll() is None:
            try:
                self.stop()
                self.proc.wait(STOP_GRACE)
            except (control.ControlError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        if self._agent is not None:
            self._agent.close()

    def __enter__(self) -> "Vm":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
