"""virtio-console (virtio 1.x, 5.3): one port, the guest's hvc0.

Output from the transmit queue goes to the same backends as the UART (`type=`)
through a bounded buffer and a writer thread: a sink that blocks leaves transmit chains
pending (the guest's hvc writes wait), never the worker. Host input is buffered
(bounded, never dropped: the input thread waits) and copied into the receive queue's
buffers as the driver provides them.
"""

from __future__ import annotations

import collections
import struct
import threading
from typing import Callable, NamedTuple

from crosvm.base import Event
from crosvm.devices.virtio import virtio_device as V
from crosvm.devices.output_buffer import OutputBuffer
from crosvm.devices.virtio.descriptor_utils import (Reader, WorkerStopping, Writer,
                                                    stop_requested)
from crosvm.devices.virtio.queue import DescriptorChain, Queue
from crosvm.vm_memory import GuestMemory

QUEUE_SIZE = 256
RECEIVEQ, TRANSMITQ = 0, 1
INPUT_BUFFER_LIMIT = 1 << 16
TRANSMIT_CHUNK = 1 << 12


class Console(V.VirtioDevice):
    """A single-port console (no MULTIPORT): receiveq 0, transmitq 1."""

    device_type = V.TYPE_CONSOLE
    seccomp_policy = "console_device"

    def __init__(self, output=None, label: str = "console") -> None:
        self.output = output
        self.label = label
        self._output = OutputBuffer(output, label)
        self._in: collections.deque[bytes] = collections.deque()
        self._in_len = 0
        self._lock = threading.Lock()
        self._space = threading.Condition(self._lock)
        self._closed = False
        self.input_ready = Event()

    def debug_label(self) -> str:
        return self.label

    def queue_max_sizes(self) -> list[int]:
        return [QUEUE_SIZE, QUEUE_SIZE]

    def config_bytes(self) -> bytes:
        # cols, rows, max_nr_ports, emerg_wr: read only with F_SIZE/F_MULTIPORT.
        return struct.pack("<HHII", 80, 25, 1, 0)

    # -- host side --------------------------------------------------------------
    def queue_input_bytes(self, data: bytes) -> None:
        """Host input for the guest; blocks while the guest is behind."""
        with self._lock:
            while self._in_len >= INPUT_BUFFER_LIMIT and not self._closed:
                self._space.wait()
            if self._closed:
                return
            self._in.append(data)
            self._in_len += len(data)
        self.input_ready.signal()

    def _take_input(self, limit: int) -> bytes:
        with self._lock:
            out = bytearray()
            while self._in and len(out) < limit:
                chunk = self._in.popleft()
                take = chunk[:limit - len(out)]
                out += take
                if len(take) < len(chunk):
                    self._in.appendleft(chunk[len(take):])
            self._in_len -= len(out)
            self._space.notify_all()
            return bytes(out)

    def _has_input(self) -> bool:
        with self._lock:
            return bool(self._in)

    # -- worker -----------------------------------------------------------------
    def activate(self, mem: GuestMemory, interrupt: V.Interrupt,
                 queues: list[tuple[int, Queue, Event]]) -> None:
        by_index = {i: (q, e) for i, q, e in queues}
        if set(by_index) != {RECEIVEQ, TRANSMITQ}:
            raise ValueError("console needs its receive and transmit queues")
        rxq, txq = by_index[RECEIVEQ][0], by_index[TRANSMITQ][0]

        def transmit(chain: DescriptorChain) -> int:
            # Streamed in small pieces: a chain may describe up to 4 GiB (or alias one
            # page many times), and none of it is held in host memory at once.
            reader = Reader(mem, chain)
            while n := min(reader.available_bytes(), TRANSMIT_CHUNK):
                if not self._output.put_wait(reader.read(n), stop_requested):
                    raise WorkerStopping()
            return 0

        def fill(chain: DescriptorChain) -> int:
            writer = Writer(mem, chain)
            data = self._take_input(writer.available_bytes())
            writer.write(data)
            return len(data)

        def handle(index: int) -> bool:
            if index == TRANSMITQ:
                return V.process_queue(mem, txq, interrupt, transmit)
            return V.process_queue(mem, rxq, interrupt, fill, want=self._has_input)

        def on_input() -> None:
            self.input_ready.wait()
            if handle(RECEIVEQ):
                self.input_ready.signal()  # more input than one turn's budget

        self.worker = V.QueueWorker(
            "v_console", interrupt, [(i, e) for i, _, e in queues], handle,
            extra=[(self.input_ready.fd, on_input)])

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._space.notify_all()
        super().close()
        self._output.close()  # what the guest wrote reaches the sink (bounded wait)
        self.input_ready.close()


class ConsoleParts(NamedTuple):
    """A virtio console for one `--serial hardware=virtio-console` port and its host
    ends: `keep_fds` the process serving it keeps, `start` starts its host input there
    (None without input), `out`/`in_fd` the host ends to close."""

    device: Console
    out: object | None
    in_fd: int | None
    keep_fds: list[int]
    start: Callable[[], None] | None


def open_console(params, label: str) -> ConsoleParts:
    """Open `params`' (a config.SerialParameters) output and input and make the device."""
    from crosvm.devices.serial_device import InputThread, open_input, open_output
    out = open_output(params)
    try:
        in_fd = open_input(params, out)
    except BaseException:
        if out is not None:
            out.close()
        raise
    device = Console(out, label=label)
    keep_fds = [device.input_ready.fd] + (out.fds() if out is not None else [])
    start = None
    if in_fd is not None:
        keep_fds.append(in_fd)
        start = lambda: InputThread(in_fd, device, f"{label}_input").start()  # noqa: E731
    return ConsoleParts(device, out, in_fd, keep_fds, start)
