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
from typing import Sequence

from crosvm import control
from crosvm.agent import AgentError, ExecResult, GuestAgent

__all__ = ["AgentError", "ExecResult", "Vm", "VmError"]

STOP_GRACE = 30.0  # seconds `close()` waits for a stopped VM to exit before killing it


class VmError(Exception):
    """The VM was not started, or it was started without the guest agent."""


class Vm:
    """A VM run by `crosvm run` in a child process, with a control socket."""

    def __init__(self, kernel: str, *, initrd: str | None = None, mem: int = 256,
                 cpus: int = 1, blocks: Sequence[str] = (), params: Sequence[str] = (),
                 extra_args: Sequence[str] = (), agent: bool = False,
                 workdir: str | None = None, socket_path: str | None = None,
                 control_socket: bool = True, console_hardware: str = "serial",
                 env: dict[str, str] | None = None, pass_fds: Sequence[int] = (),
                 prefix: Sequence[str] = (), entry: str = "crosvm") -> None:
        """`blocks` are --block values (`path[,ro]...`); `params` kernel parameters;
        `extra_args` any other `crosvm run` options; `agent` connects COM2 to the
        guest agent for `exec`. Files (console log, VMM log, socket) go to `workdir`
        (a new temporary directory by default). Without `control_socket` the VM has
        no socket (unless `extra_args` give one) and `close()` kills it.

        For running crosvm differently: `console_hardware` (`virtio-console` makes hvc0
        the console), `env` added to its environment, `pass_fds` it inherits, `prefix`
        a command to run it under (`ip netns exec NS`), `entry` the module run as
        `python -m` instead of `crosvm`."""
        self.workdir = workdir or tempfile.mkdtemp(prefix="crosvm-vm-")
        self.socket_path = (socket_path or os.path.join(self.workdir, "crosvm.sock")
                            if control_socket else None)
        self.console_path = os.path.join(self.workdir, "console.log")
        self.log_path = os.path.join(self.workdir, "crosvm.log")
        self.args = [*prefix, sys.executable, "-m", entry, "run", "--cpus", str(cpus),
                     "--mem", str(mem),
                     "--serial", f"type=file,path={self.console_path},num=1,console,"
                                 f"hardware={console_hardware}"]
        if self.socket_path is not None:
            self.args += ["-s", self.socket_path]
        if initrd:
            self.args += ["--initrd", initrd]
        for block in blocks:
            self.args += ["--block", block]
        if params:
            self.args += ["-p", " ".join(params)]
        self.agent: GuestAgent | None = None
        self._agent_fds: tuple[int, int] | None = None
        child_fds: list[int] = []
        if agent:
            out_r, out_w = os.pipe2(os.O_CLOEXEC)
            in_r, in_w = os.pipe2(os.O_CLOEXEC)
            self.args += ["--serial", f"type=file,path=/proc/self/fd/{out_w},"
                                      f"input=/proc/self/fd/{in_r},num=2"]
            self._agent_fds = (out_r, in_w)
            child_fds = [out_w, in_r]
        self.args += [*extra_args, kernel]
        self.proc: subprocess.Popen | None = None
        self._child_fds = child_fds
        self._pass_fds = tuple(pass_fds)
        self._env = dict(env or {})

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
            p for p in (package_root, os.environ.get("PYTHONPATH")) if p), **self._env}
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(self.args,
                                         pass_fds=(*self._child_fds, *self._pass_fds),
                                         stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, cwd=package_root,
                                         env=env)
        for fd in self._child_fds:
            os.close(fd)
        self._child_fds = []
        if self._agent_fds is not None:
            self.agent = GuestAgent(*self._agent_fds, exited=lambda: not self._alive(),
                                    describe=self.describe)

    # -- the guest ---------------------------------------------------------------------
    def _alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def describe(self) -> str:
        """The VM's state and the ends of its log and console, for error messages."""
        status = self.proc.poll() if self.proc is not None else None
        state = "VM running" if status is None else f"VM exited (status {status})"
        return f"{state}; log: {self.log_tail()}"

    def log_tail(self, n: int = 2000) -> str:
        """The last `n` characters of the VMM's log and of the console."""
        try:
            with open(self.log_path, "rb") as f:
                text = f.read().decode(errors="replace")
        except FileNotFoundError:
            text = ""
        return text[-n:] + "\n--- console ---\n" + self.console()[-n:]

    def wait_ready(self, timeout: float = 600.0) -> None:
        """Wait for the guest agent's @@READY."""
        self._need_agent().wait_ready(timeout)

    def exec(self, command: str, timeout: float = 600.0) -> ExecResult:
        """Run a shell command line in the guest (through its agent)."""
        return self._need_agent().run(command, timeout)

    def send(self, command: str) -> int:
        """Send a command line to the guest agent without waiting (e.g. `poweroff`);
        returns its id, for `read_answer`."""
        return self._need_agent().send(command)

    def read_answer(self, command_id: int, timeout: float = 600.0) -> ExecResult:
        """The result of the command that `send` gave `command_id`."""
        return self._need_agent().answer(command_id, f"command {command_id}", timeout)

    def _need_agent(self) -> GuestAgent:
        if self.agent is None:
            raise VmError("the VM was not started, or without agent=True")
        return self.agent

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
    def _socket(self) -> str:
        if self.socket_path is None:
            raise VmError("the VM was started without a control socket")
        return self.socket_path

    def stop(self) -> None:
        control.stop(self._socket())

    def suspend(self, full: bool = False) -> None:
        control.suspend(self._socket(), full)

    def resume(self, full: bool = False) -> None:
        control.resume(self._socket(), full)

    def powerbtn(self) -> None:
        control.powerbtn(self._socket())

    def sleepbtn(self) -> None:
        control.sleepbtn(self._socket())

    def gpe(self, number: int) -> None:
        control.gpe(self._socket(), number)

    def disk_resize(self, index: int, new_size: int) -> None:
        control.disk_resize(self._socket(), index, new_size)

    def balloon(self, num_bytes: int, wait: bool = False) -> None:
        control.balloon(self._socket(), num_bytes, wait)

    def balloon_stats(self) -> control.BalloonStats:
        return control.balloon_stats(self._socket())

    # -- lifetime ----------------------------------------------------------------------
    def kill(self) -> None:
        """SIGKILL the VM (if it runs) and reap it."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def close(self) -> None:
        """Stop the VM if it still runs (control socket, then SIGKILL) and reap it."""
        if self.proc is not None and self.proc.poll() is None:
            if self.socket_path is None:
                self.kill()
            else:
                try:
                    self.stop()
                    self.proc.wait(STOP_GRACE)
                except (control.ControlError, subprocess.TimeoutExpired):
                    self.kill()
        fds = self._agent_fds or ()
        self._agent_fds = None
        for fd in (*fds, *self._child_fds):
            try:
                os.close(fd)
            except OSError:
                pass
        self._child_fds = []

    def __enter__(self) -> "Vm":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
