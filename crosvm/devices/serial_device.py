"""Host ends of a serial port: where its output goes and where its input comes from."""

from __future__ import annotations

import logging
import os
import socket
import syslog
import threading
import time

from crosvm.base.hostfile import SERIAL_INPUT, SERIAL_OUTPUT, HostFileError, open_host_file
from crosvm.config import ConfigError, SerialParameters

log = logging.getLogger("crosvm.serial")

SYSLOG_LINE_MAX = 1024  # longer lines are sent in pieces
ERROR_REPORT_INTERVAL = 60.0  # seconds between reports of a sink that keeps failing


class OutputErrors:
    """Reports a failing output sink once, then at most every ERROR_REPORT_INTERVAL
    with the number of bytes lost since: a guest that prints to /dev/full writes a
    log line a minute, not one per byte. The port keeps working."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.clock = time.monotonic
        self._next_report: float | None = None
        self._lost = 0

    def failed(self, err: OSError, lost: int) -> None:
        now = self.clock()
        self._lost += lost
        if self._next_report is None:
            log.warning("%s: output failed: %s; its output is dropped while this lasts",
                        self.name, err.strerror or err)
        elif now >= self._next_report:
            log.warning("%s: output still failing: %s (%d bytes dropped)", self.name,
                        err.strerror or err, self._lost)
        else:
            return
        self._lost = 0
        self._next_report = now + ERROR_REPORT_INTERVAL


class SerialError(Exception):
    """A serial backend could not be opened."""


class SerialPathError(SerialError, ConfigError):
    """A serial path= or input= file is missing or of the wrong kind: a bad argument
    (exit 35, like a bad kernel or disk path), not a failure of the host."""


class FdOutput:
    """Writes everything to a file descriptor (stdout, a file, a pipe)."""

    def __init__(self, fd: int, owned: bool, timestamp: bool = False,
                 name: str = "serial") -> None:
        self.fd = fd
        self.owned = owned
        self.timestamp = timestamp
        self.errors = OutputErrors(name)
        self._line_start = True
        self._t0 = time.monotonic()

    def write(self, data: bytes) -> None:
        if self.timestamp:
            data = self._stamp(data)
        try:
            while data:
                n = os.write(self.fd, data)
                data = data[n:]
        except BlockingIOError:
            pass
        except OSError as e:  # EIO, ENOSPC, EPIPE...: the VM keeps running
            self.errors.failed(e, len(data))

    def _stamp(self, data: bytes) -> bytes:
        out = bytearray()
        for byte in data:
            if self._line_start:
                out += f"[{time.monotonic() - self._t0:12.6f}] ".encode()
            out.append(byte)
            self._line_start = byte == 0x0A
        return bytes(out)

    def fds(self) -> list[int]:
        return [self.fd]

    def close(self) -> None:
        if self.owned:
            os.close(self.fd)


class SyslogOutput:
    """Sends whole lines to syslog over its own /dev/log socket (a held fd keeps working
    inside a device jail, which has no /dev/log and may not create sockets). Without a
    syslog daemon the lines go to stderr, tagged."""

    def __init__(self, tag: str, path: str = "/dev/log") -> None:
        self._buf = bytearray()
        self._tag = tag
        self.errors = OutputErrors(tag)
        self.sock: socket.socket | None = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            self.sock.connect(path)
        except OSError as e:
            self.sock.close()
            self.sock = None
            log.warning("%s: no syslog at %s (%s); serial output goes to stderr", tag, path,
                        e.strerror)

    def write(self, data: bytes) -> None:
        self._buf += data
        if len(self._buf) > SYSLOG_LINE_MAX and b"\n" not in self._buf:
            self._buf += b"\n"  # a guest that never ends its line must not grow this
        while b"\n" in self._buf:
            line, _, rest = self._buf.partition(b"\n")
            text = f"{self._tag}: {line.decode(errors='replace')}"
            if self.sock is not None:
                message = f"<{syslog.LOG_USER | syslog.LOG_INFO}>{text}".encode(errors="replace")
                try:
                    self.sock.send(message)
                except OSError as e:  # the daemon went away or is flooded
                    self.errors.failed(e, len(line) + 1)
            else:
                try:
                    os.write(2, text.encode(errors="replace") + b"\n")
                except OSError:
                    pass  # stderr is where errors would be reported
            self._buf = bytearray(rest)

    def fds(self) -> list[int]:
        return [self.sock.fileno()] if self.sock is not None else []

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()


class UnixOutput:
    """A datagram socket connected to `path`: output is sent there (dropped while no one
    listens) and datagrams the peer sends back are the port's input."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            self.sock.bind("")   # autobind, so the peer can answer with guest input
            self.sock.connect(path)
        except OSError as e:
            self.sock.close()
            raise SerialError(f"serial: failed to connect to unix socket {path}: "
                              f"{e.strerror}") from e

    def write(self, data: bytes) -> None:
        try:
            self.sock.send(data)
        except OSError:
            pass

    def fileno(self) -> int:
        return self.sock.fileno()

    def fds(self) -> list[int]:
        return [self.sock.fileno()]

    def close(self) -> None:
        self.sock.close()


def open_output(params: SerialParameters) -> object | None:
    """The output sink for one port, or None for type=sink."""
    t = params.type
    name = f"serial{params.num}" if params.hardware == "serial" else f"console{params.num}"
    if t == "stdout":
        return FdOutput(1, owned=False, timestamp=params.out_timestamp, name=name)
    if t == "file":
        # A FIFO is taken if someone reads it (open would block for ever otherwise).
        try:
            fd = open_host_file(params.path, f"{name} output",
                                os.O_WRONLY | os.O_CREAT | os.O_APPEND, SERIAL_OUTPUT)
        except HostFileError as e:
            raise SerialPathError(f"serial: {e}") from None
        return FdOutput(fd, owned=True, timestamp=params.out_timestamp, name=name)
    if t == "syslog":
        return SyslogOutput(f"serial{params.num}")
    if t == "unix":
        return UnixOutput(params.path)
    return None


def open_input(params: SerialParameters, output: object | None) -> int | None:
    """The fd the port reads from: stdin, `input=` or the unix socket; None if none."""
    if params.stdin:
        return 0
    if params.input:
        # Non-blocking: a FIFO with no writer yet opens at once, and the input thread
        # polls it (a blocking read would hang on a FIFO between writers).
        try:
            return open_host_file(params.input, f"serial{params.num} input", os.O_RDONLY,
                                  SERIAL_INPUT, blocking=False)
        except HostFileError as e:
            raise SerialPathError(f"serial: {e}") from None
    if isinstance(output, UnixOutput):
        return output.fileno()
    return None


class InputThread:
    """Copies bytes from an fd into a serial device until EOF or stop."""

    def __init__(self, fd: int, sink, name: str) -> None:
        self.fd = fd
        self.sink = sink
        self._stop_r, self._stop_w = os.pipe2(os.O_CLOEXEC)
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        try:
            os.write(self._stop_w, b"x")
        except OSError:
            pass

    def _run(self) -> None:
        import select
        poller = select.poll()
        poller.register(self.fd, select.POLLIN)
        poller.register(self._stop_r, select.POLLIN)
        while True:
            events = dict(poller.poll())
            if self._stop_r in events:
                return
            if self.fd in events:
                try:
                    data = os.read(self.fd, 4096)
                except BlockingIOError:
                    continue
                except OSError:
                    return
                if not data:
                    return   # EOF: the guest sees no more input
                self.sink.queue_input_bytes(data)
