"""The host end of pycrosvm's guest agent (guest/agent.sh), over two file descriptors.

The agent is a busybox shell loop that the project's test guest runs on a serial port.
Protocol, one line per step:

    host:  <id> <shell command>
    guest: @@BEGIN <id> / O:<stdout line> / E:<stderr line> / @@END <id> <exit status>

A last line without a newline is tagged O-: or E-:. The agent says @@READY once first.
Ids let the host drop answers to commands it stopped waiting for.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from typing import Callable


class AgentError(Exception):
    """The guest did not answer in time, the agent is gone, or it broke the protocol."""


@dataclass
class ExecResult:
    """What a command run in the guest returned. Text; bytes that are not UTF-8 are
    surrogate escapes (the port is raw: every byte is the command's own)."""

    returncode: int
    stdout: str
    stderr: str


class GuestAgent:
    """A reader thread splits the agent's output into lines; `run` sends one command and
    collects its answer. `exited` says whether the other end is gone for good (the VM
    exited), `describe` adds context (logs) to error messages."""

    def __init__(self, read_fd: int, write_fd: int,
                 exited: Callable[[], bool] = lambda: False,
                 describe: Callable[[], str] = lambda: "") -> None:
        self._in = write_fd
        self._out = read_fd
        self._exited = exited
        self._describe = describe
        self._next_id = 1
        self._lines: list[str] = []
        self._cond = threading.Condition()
        self._eof = False
        self._reader = threading.Thread(target=self._read_loop, name="guest_agent",
                                        daemon=True)
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
                self._lines.extend(line.decode(errors="surrogateescape") for line in lines)
                self._cond.notify_all()

    def _next_line(self, deadline: float) -> str:
        with self._cond:
            while not self._lines:
                if self._eof or self._exited():
                    raise AgentError(f"guest agent gone; {self._describe()}")
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AgentError(f"guest did not answer in time; {self._describe()}")
                self._cond.wait(min(remaining, 1.0))
            return self._lines.pop(0)

    def wait_ready(self, timeout: float) -> None:
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

    def run(self, command: str, timeout: float) -> ExecResult:
        """Run a shell command in the guest and return its output and status."""
        return self.answer(self.send(command), command, timeout)

    def answer(self, command_id: int, command: str, timeout: float) -> ExecResult:
        """The answer to the command `send` gave `command_id` (answers to earlier
        commands are dropped)."""
        deadline = time.monotonic() + timeout
        while self._next_line(deadline) != f"@@BEGIN {command_id}":
            pass
        out: list[str] = []
        err: list[str] = []
        end = f"@@END {command_id} "
        while True:
            line = self._next_line(deadline)
            if line.startswith(end):
                return ExecResult(int(line[len(end):]), "".join(out), "".join(err))
            tag, sep, text = line.partition(":")
            if not sep or tag not in ("O", "O-", "E", "E-"):
                raise AgentError(f"agent protocol: unexpected line {line!r} in the answer "
                                 f"to {command!r}; {self._describe()}")
            target = out if tag[0] == "O" else err
            target.append(text if tag.endswith("-") else text + "\n")

    def has_output(self) -> bool:
        """Whether the guest sent anything not yet read (a command that was to wait,
        say, has answered)."""
        with self._cond:
            return bool(self._lines)

    def join(self, timeout: float) -> None:
        """Wait for the reader thread (it ends at end of file)."""
        self._reader.join(timeout)
