"""i8042 keyboard controller (ports 0x60/0x64) with a keyboard that answers probes.

Enough of the controller for Linux's i8042 and atkbd drivers to find a keyboard
without timeouts, and the 0xFE command that pulses the CPU reset line.
"""

from __future__ import annotations

import collections
import threading
from typing import Callable

from crosvm.devices.bus import BusDevice
from crosvm.devices.serial import Interrupt

DATA_PORT = 0x60
COMMAND_PORT = 0x64

STR_OBF = 0x01
STR_SYSFLAG = 0x04
STR_CMDDAT = 0x08
STR_KEYLOCK = 0x10

CTR_KBDINT = 0x01
CTR_SYSFLAG = 0x04
CTR_KBDDIS = 0x10
CTR_AUXDIS = 0x20
CTR_XLATE = 0x40

CMD_READ_CTR = 0x20
CMD_WRITE_CTR = 0x60
CMD_AUX_DISABLE = 0xA7
CMD_AUX_ENABLE = 0xA8
CMD_AUX_TEST = 0xA9
CMD_SELF_TEST = 0xAA
CMD_KBD_TEST = 0xAB
CMD_KBD_DISABLE = 0xAD
CMD_KBD_ENABLE = 0xAE
CMD_READ_OUTPUT = 0xD0
CMD_WRITE_OUTPUT = 0xD1
CMD_KBD_LOOP = 0xD2
CMD_AUX_LOOP = 0xD3
CMD_AUX_SEND = 0xD4
CMD_RESET = 0xFE

KBD_ACK = 0xFA
KBD_RESET = 0xFF
KBD_GETID = 0xF2
KBD_ECHO = 0xEE
KBD_SCANSET = 0xF0
KBD_SET_LEDS = 0xED
KBD_SET_RATE = 0xF3
KBD_SELF_TEST_OK = 0xAA
AUX_TEST_CLOCK_LOW = 0x01   # "no mouse": the AUX port reports a stuck clock line


class I8042(BusDevice):
    """The controller; `reset` is called when the guest pulses the reset line."""

    def __init__(self, reset: Callable[[], None], kbd_interrupt: Interrupt | None = None) -> None:
        self._reset = reset
        self._irq = kbd_interrupt
        self._lock = threading.Lock()
        self.ctr = CTR_KBDINT | CTR_SYSFLAG | CTR_XLATE
        self.status = STR_SYSFLAG | STR_KEYLOCK
        self._out: collections.deque[int] = collections.deque()
        self._pending_cmd: int | None = None     # controller command awaiting its data byte
        self._pending_kbd: int | None = None     # keyboard command awaiting its argument
        self.scan_set = 2

    def _queue(self, *values: int) -> None:
        was_empty = not self._out
        self._out.extend(values)
        if was_empty and self._irq is not None and self.ctr & CTR_KBDINT:
            self._irq.signal()

    def _command(self, cmd: int) -> str | None:
        if cmd == CMD_READ_CTR:
            self._queue(self.ctr)
        elif cmd in (CMD_WRITE_CTR, CMD_WRITE_OUTPUT, CMD_KBD_LOOP, CMD_AUX_LOOP, CMD_AUX_SEND):
            self._pending_cmd = cmd
        elif cmd == CMD_AUX_DISABLE:
            self.ctr |= CTR_AUXDIS
        elif cmd == CMD_AUX_ENABLE:
            self.ctr &= ~CTR_AUXDIS
        elif cmd == CMD_AUX_TEST:
            self._queue(AUX_TEST_CLOCK_LOW)
        elif cmd == CMD_SELF_TEST:
            self._queue(0x55)
        elif cmd == CMD_KBD_TEST:
            self._queue(0x00)
        elif cmd == CMD_KBD_DISABLE:
            self.ctr |= CTR_KBDDIS
        elif cmd == CMD_KBD_ENABLE:
            self.ctr &= ~CTR_KBDDIS
        elif cmd == CMD_READ_OUTPUT:
            self._queue(0x01)
        elif cmd == CMD_RESET or (0xF0 <= cmd <= 0xFF and not cmd & 0x01):
            return "reset"
        return None

    def _data(self, value: int) -> str | None:
        cmd, self._pending_cmd = self._pending_cmd, None
        if cmd == CMD_WRITE_CTR:
            self.ctr = value
            self.status = (self.status & ~STR_SYSFLAG) | (value & CTR_SYSFLAG)
        elif cmd == CMD_WRITE_OUTPUT:
            if not value & 0x01:
                return "reset"
        elif cmd == CMD_KBD_LOOP:
            self._queue(value)
        elif cmd == CMD_AUX_LOOP:
            # No AUX port: answer at once with a byte that is not the one looped, so the
            # driver's AUX probe fails fast instead of timing out.
            self._queue(value ^ 0xFF)
        elif cmd == CMD_AUX_SEND:
            pass        # no mouse attached
        else:
            self._keyboard(value)
        return None

    def _keyboard(self, value: int) -> None:
        arg_for, self._pending_kbd = self._pending_kbd, None
        if arg_for == KBD_SCANSET:
            if value == 0:
                self._queue(KBD_ACK, self.scan_set)
            else:
                self.scan_set = value
                self._queue(KBD_ACK)
        elif arg_for is not None:
            self._queue(KBD_ACK)
        elif value == KBD_RESET:
            self._queue(KBD_ACK, KBD_SELF_TEST_OK)
        elif value == KBD_GETID:
            self._queue(KBD_ACK, 0xAB, 0x83)
        elif value == KBD_ECHO:
            self._queue(KBD_ECHO)
        elif value in (KBD_SCANSET, KBD_SET_LEDS, KBD_SET_RATE):
            self._pending_kbd = value
            self._queue(KBD_ACK)
        else:
            self._queue(KBD_ACK)

    def read(self, offset: int, address: int, data: memoryview) -> None:
        if len(data) != 1:
            return
        with self._lock:
            if address == COMMAND_PORT:
                data[0] = self.status | (STR_OBF if self._out else 0)
            elif address == DATA_PORT:
                data[0] = self._out.popleft() if self._out else 0
                if self._out and self._irq is not None and self.ctr & CTR_KBDINT:
                    self._irq.signal()
            else:
                data[0] = 0

    def write(self, offset: int, address: int, data: bytes | memoryview) -> None:
        if len(data) != 1:
            return
        with self._lock:
            if address == COMMAND_PORT:
                self.status |= STR_CMDDAT
                action = self._command(data[0])
            elif address == DATA_PORT:
                self.status &= ~STR_CMDDAT
                action = self._data(data[0])
            else:
                action = None
        if action == "reset":
            self._reset()
