"""16550A UART with the register semantics the Linux 8250 driver relies on.

Output goes to a `SerialOutput` through a bounded buffer that a writer thread drains,
so a host sink that blocks (a pipe nobody reads, a pager, Ctrl-S) never blocks the
vCPU: the guest sees back-pressure the way real hardware shows it, as a transmitter
that is not empty (LSR THRE clear, no THR interrupt) until the host catches up.
Input arrives from a host thread through `queue_input_bytes`. Interrupts are edges on
an Event (an irqfd in a VM).
"""

from __future__ import annotations

import collections
import logging
import threading
from typing import Protocol

from crosvm.base.ratelimit import RateLimitedLog
from crosvm.devices.bus import BusDevice
from crosvm.devices.output_buffer import OutputBuffer

log = logging.getLogger(__name__)

DATA = 0
IER = 1
IIR = 2          # read
FCR = 2          # write
LCR = 3
MCR = 4
LSR = 5
MSR = 6
SCR = 7

IER_RECV_BIT = 0x01
IER_THR_BIT = 0x02
IER_FIFO_BITS = 0x0F

IIR_FIFO_BITS = 0xC0
IIR_NONE_BIT = 0x01
IIR_THR_BIT = 0x02
IIR_RECV_BIT = 0x04

FCR_FIFO_ENABLE = 0x01
FCR_CLEAR_RX = 0x02

LCR_DLAB_BIT = 0x80

LSR_DATA_BIT = 0x01
LSR_EMPTY_BIT = 0x20
LSR_IDLE_BIT = 0x40

MCR_DTR_BIT = 0x01
MCR_RTS_BIT = 0x02
MCR_OUT1_BIT = 0x04
MCR_OUT2_BIT = 0x08
MCR_LOOP_BIT = 0x10

MSR_CTS_BIT = 0x10
MSR_DSR_BIT = 0x20
MSR_RI_BIT = 0x40
MSR_DCD_BIT = 0x80

DEFAULT_LINE_CONTROL = 0x3      # 8N1
DEFAULT_BAUD_DIVISOR = 12       # 9600 baud
DEFAULT_MODEM_CONTROL = MCR_OUT2_BIT
DEFAULT_MODEM_STATUS = MSR_DSR_BIT | MSR_CTS_BIT | MSR_DCD_BIT

# Host input waits (it is never dropped) once this much is queued for the guest.
INPUT_BUFFER_LIMIT = 4096
# Guest output buffered for a slow host sink. THRE is reported while a FIFO's worth
# fits; the THR interrupt comes back once the writer has drained it to half.
OUTPUT_BUFFER_LIMIT = 1 << 16
TX_FIFO_SIZE = 16
POLLED_STALL_LIMIT = 0.1  # seconds


class Interrupt(Protocol):
    def signal(self) -> None: ...


class SerialOutput(Protocol):
    def write(self, data: bytes) -> None: ...


class Serial(BusDevice):
    """One 16550A UART (8 registers)."""

    seccomp_policy = "serial"

    def __init__(self, interrupt: Interrupt, out: SerialOutput | None = None,
                 label: str = "serial") -> None:
        self._interrupt = interrupt
        self._out = out
        self._label = label
        self._lock = threading.Lock()
        self._space = threading.Condition(self._lock)
        self._in: collections.deque[int] = collections.deque()
        self._closed = False
        self._output = OutputBuffer(out, label, OUTPUT_BUFFER_LIMIT, self._output_drained)
        self._tx_waiting = False  # the guest waits for THRE: interrupt when drained
        self._dropped = 0
        self._drop_log = RateLimitedLog(log, burst=1, period=10.0)
        self.interrupt_enable = 0
        self.thr_pending = False
        self.fifo_enabled = False
        self.line_control = DEFAULT_LINE_CONTROL
        self.modem_control = DEFAULT_MODEM_CONTROL
        self.scratch = 0
        self.baud_divisor = DEFAULT_BAUD_DIVISOR

    def debug_label(self) -> str:
        return self._label

    # --- host side ---
    def queue_input_bytes(self, data: bytes) -> None:
        """Hand host input to the guest; blocks while the guest is behind."""
        with self._lock:
            for byte in data:
                while len(self._in) >= INPUT_BUFFER_LIMIT and not self._closed:
                    self._space.wait()
                if self._closed:
                    return
                self._in.append(byte)
                self._recv_data_locked()

    def close(self) -> None:
        """Stop taking input; give buffered output a moment to reach the sink."""
        with self._lock:
            self._closed = True
            self._space.notify_all()
        self._output.close()

    def flush(self, timeout: float = 1.0) -> bool:
        """Wait until buffered output has been written to the sink; False on timeout."""
        return self._output.flush(timeout)

    # --- output ---
    def _tx_room_locked(self) -> bool:
        """THRE: whether the guest may write another FIFO's worth.

        A driver that waits for the THR interrupt sleeps while the host sink is
        blocked: back-pressure, nothing lost. A driver that polls LSR with that
        interrupt off (the kernel's console) would spin a vCPU on VM exits, so after
        POLLED_STALL_LIMIT of a stalled sink it is told to go on, and what it writes
        while the buffer is full is dropped and counted."""
        if self._output.room() >= TX_FIFO_SIZE:
            return True
        return (not self.interrupt_enable & IER_THR_BIT
                and self._output.stalled_for() > POLLED_STALL_LIMIT)

    def _queue_output_locked(self, value: int) -> None:
        if not self._output.put(bytes([value])):
            self._dropped += 1
            self._drop_log.warning("%s: host output is not keeping up; %d bytes dropped so far",
                                   self._label, self._dropped)
        if self._tx_room_locked():
            self._thr_empty_locked()
        else:
            self._tx_waiting = True

    def _output_drained(self) -> None:
        with self._lock:
            if self._tx_waiting and self._output.buffered() <= OUTPUT_BUFFER_LIMIT // 2:
                self._tx_waiting = False
                self._thr_empty_locked()

    # --- interrupt logic ---
    def _trigger(self) -> None:
        self._interrupt.signal()

    def _recv_data_locked(self) -> None:
        if self.interrupt_enable & IER_RECV_BIT and len(self._in) == 1:
            self._trigger()

    def _thr_empty_locked(self) -> None:
        if self.interrupt_enable & IER_THR_BIT:
            self.thr_pending = True
            self._trigger()

    def _iir_locked(self) -> int:
        fifo = IIR_FIFO_BITS if self.fifo_enabled else 0
        if self._in and self.interrupt_enable & IER_RECV_BIT:
            return IIR_RECV_BIT | fifo
        if self.thr_pending and self.interrupt_enable & IER_THR_BIT:
            self.thr_pending = False  # reading IIR acknowledges THR empty
            return IIR_THR_BIT | fifo
        return IIR_NONE_BIT | fifo

    def _modem_status_locked(self) -> int:
        if self.modem_control & MCR_LOOP_BIT:
            mcr = self.modem_control
            return ((MSR_CTS_BIT if mcr & MCR_RTS_BIT else 0) | (MSR_DSR_BIT if mcr & MCR_DTR_BIT else 0)
                    | (MSR_RI_BIT if mcr & MCR_OUT1_BIT else 0)
                    | (MSR_DCD_BIT if mcr & MCR_OUT2_BIT else 0))
        return DEFAULT_MODEM_STATUS

    # --- guest side ---
    def write(self, offset: int, address: int, data: bytes | memoryview) -> None:
        if len(data) != 1:
            return
        value = data[0]
        with self._lock:
            dlab = self.line_control & LCR_DLAB_BIT
            if offset == DATA:
                if dlab:
                    self.baud_divisor = (self.baud_divisor & 0xFF00) | value
                elif self.modem_control & MCR_LOOP_BIT:
                    if len(self._in) < INPUT_BUFFER_LIMIT:  # beyond: overrun, dropped
                        self._in.append(value)
                        self._recv_data_locked()
                else:
                    self._queue_output_locked(value)
            elif offset == IER:
                if dlab:
                    self.baud_divisor = (self.baud_divisor & 0x00FF) | (value << 8)
                else:
                    self.interrupt_enable = value & IER_FIFO_BITS
                    if self.interrupt_enable & IER_THR_BIT and self._tx_room_locked():
                        self._thr_empty_locked()  # THR is empty: say so at once
                    if self.interrupt_enable & IER_RECV_BIT and self._in:
                        self._trigger()
            elif offset == FCR:
                self.fifo_enabled = bool(value & FCR_FIFO_ENABLE)
                if value & FCR_CLEAR_RX:
                    self._in.clear()
                    self._space.notify_all()
            elif offset == LCR:
                self.line_control = value
            elif offset == MCR:
                self.modem_control = value & 0x1F
            elif offset == SCR:
                self.scratch = value

    def read(self, offset: int, address: int, data: memoryview) -> None:
        if len(data) != 1:
            return
        with self._lock:
            dlab = self.line_control & LCR_DLAB_BIT
            if offset == DATA:
                if dlab:
                    value = self.baud_divisor & 0xFF
                elif self._in:
                    value = self._in.popleft()
                    if len(self._in) < INPUT_BUFFER_LIMIT:
                        self._space.notify_all()
                else:
                    value = 0
            elif offset == IER:
                value = self.baud_divisor >> 8 if dlab else self.interrupt_enable
            elif offset == IIR:
                value = self._iir_locked()
            elif offset == LCR:
                value = self.line_control
            elif offset == MCR:
                value = self.modem_control
            elif offset == LSR:
                value = ((LSR_EMPTY_BIT | LSR_IDLE_BIT if self._tx_room_locked() else 0)
                         | (LSR_DATA_BIT if self._in else 0))
            elif offset == MSR:
                value = self._modem_status_locked()
            elif offset == SCR:
                value = self.scratch
            else:
                value = 0
        data[0] = value
