"""Guest output on its way to a host sink that may block.

A device never writes to a host sink on its own thread: a pipe nobody reads, a pager
or Ctrl-S would stall it (and with a UART, the vCPU). Output goes into a bounded
buffer; a writer thread owns the blocking writes. The device decides what a full
buffer means to its guest (a UART clears THRE, virtio-console leaves the chain pending).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable, Protocol

from crosvm.base.ratelimit import RateLimitedLog

log = logging.getLogger(__name__)

DEFAULT_LIMIT = 1 << 16
CLOSE_TIMEOUT = 1.0
WAIT_SLICE = 0.05


class Sink(Protocol):
    def write(self, data: bytes) -> None: ...


class OutputBuffer:
    """At most `limit` bytes waiting for `sink`; `on_drained()` runs (on the writer
    thread, no lock held) after each write to the sink."""

    def __init__(self, sink: Sink | None, label: str, limit: int = DEFAULT_LIMIT,
                 on_drained: Callable[[], None] | None = None) -> None:
        self._sink = sink
        self._label = label
        self._limit = limit
        self._on_drained = on_drained
        self._buf = bytearray()
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._writer: threading.Thread | None = None  # started by the first output
        self._write_started: float | None = None  # when the write in progress began
        self._closed = False
        self._errors = RateLimitedLog(log, burst=1, period=10.0)

    def buffered(self) -> int:
        with self._lock:
            return len(self._buf)

    def room(self) -> int:
        with self._lock:
            return self._limit - len(self._buf)

    def stalled_for(self) -> float:
        """How long the sink has been blocked in one write (0 when it is not)."""
        with self._lock:
            started = self._write_started
        return 0.0 if started is None else time.monotonic() - started

    def put(self, data: bytes) -> int:
        """Take as much of `data` as fits; returns how much that was (never blocks)."""
        with self._lock:
            take = min(len(data), self._limit - len(self._buf))
            if take <= 0 or self._closed:
                return 0
            self._buf += data[:take]
            self._start_writer_locked()
            self._changed.notify_all()
            return take

    def put_wait(self, data: bytes, should_stop: Callable[[], bool]) -> bool:
        """Take all of `data`, waiting for room; False if `should_stop()` came first."""
        pos = 0
        while pos < len(data):
            pos += self.put(data[pos:])
            if pos < len(data):
                if should_stop() or self._closed:
                    return False
                with self._lock:
                    if len(self._buf) >= self._limit:
                        self._changed.wait(WAIT_SLICE)
        return True

    def _start_writer_locked(self) -> None:
        # Started here, not in __init__: a sandboxed device is built before the fork
        # and only the device process may own the thread.
        if self._writer is None:
            self._writer = threading.Thread(target=self._write_loop,
                                            name=f"{self._label}_out"[:15], daemon=True)
            self._writer.start()

    def _write_loop(self) -> None:
        while True:
            with self._lock:
                while not self._buf and not self._closed:
                    self._changed.wait()
                if not self._buf:
                    return
                data = bytes(self._buf)
                self._buf.clear()
                self._write_started = time.monotonic()
            try:
                if self._sink is not None:
                    self._sink.write(data)  # may block: only this thread waits
            except Exception as e:  # a broken sink must not end the output for good
                self._errors.warning("%s: output lost: %s", self._label, e)
            finally:
                with self._lock:
                    self._write_started = None
                    self._changed.notify_all()
            if self._on_drained is not None:
                self._on_drained()

    def flush(self, timeout: float = CLOSE_TIMEOUT) -> bool:
        """Wait until everything buffered has been written; False on timeout."""
        with self._lock:
            return self._changed.wait_for(
                lambda: not self._buf and self._write_started is None, timeout)

    def close(self, timeout: float = CLOSE_TIMEOUT) -> None:
        """Give buffered output `timeout` to reach the sink, then stop taking more."""
        with self._lock:
            self._closed = True
            self._changed.notify_all()
            writer = self._writer
        if writer is not None:
            writer.join(timeout)
