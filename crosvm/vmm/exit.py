"""How a VM run ends, and crosvm's exit codes."""

from __future__ import annotations

import enum
import threading


class ExitCode(enum.IntEnum):
    """crosvm's `CommandStatus` exit codes."""

    SUCCESS = 0          # guest power-off or `crosvm stop`
    ERROR = 1
    GUEST_RESET = 32
    VM_CRASH = 33
    GUEST_PANIC = 34
    INVALID_ARGS = 35
    WATCHDOG_RESET = 36


class ExitState:
    """The first exit reason requested by any thread wins; waiters wake on it."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self._lock = threading.Lock()
        self.code: ExitCode | None = None
        self.message: str | None = None
        self._listeners: list = []

    def add_listener(self, fn) -> None:
        """`fn()` runs once, in the requesting thread, when an exit is first requested."""
        self._listeners.append(fn)

    def request(self, code: ExitCode, message: str | None = None) -> None:
        with self._lock:
            if self.code is not None:
                return
            self.code = code
            self.message = message
        self._event.set()
        for fn in self._listeners:
            fn()

    def explain(self, code: ExitCode, message: str) -> None:
        """Request `code`, or if it is already the reason, replace its message with a
        better one (a device crash is seen first as a dead socket, then as a status)."""
        with self._lock:
            if self.code == code:
                self.message = message
                return
        self.request(code, message)

    def poweroff(self) -> None:
        self.request(ExitCode.SUCCESS)

    def reset(self) -> None:
        self.request(ExitCode.GUEST_RESET)

    def is_set(self) -> bool:
        return self._event.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        return self._event.wait(timeout)
