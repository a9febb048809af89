"""Rate-limited logging: a hostile guest must not be able to flood the host's log."""

from __future__ import annotations

import logging
import threading
import time


class RateLimitedLog:
    """Logs at most `burst` messages per `period` seconds; counts what it drops and says
    so with the next message that gets through."""

    def __init__(self, logger: logging.Logger, burst: int = 10, period: float = 10.0) -> None:
        self._log = logger
        self._burst = burst
        self._period = period
        self._window_start = float("-inf")
        self._count = 0
        self._dropped = 0
        self._lock = threading.Lock()

    def __call__(self, level: int, msg: str, *args: object) -> None:
        now = time.monotonic()
        with self._lock:
            if now - self._window_start >= self._period:
                self._window_start, self._count = now, 0
            if self._count >= self._burst:
                self._dropped += 1
                return
            self._count += 1
            dropped, self._dropped = self._dropped, 0
        if dropped:
            msg += f" ({dropped} similar messages suppressed)"
        self._log.log(level, msg, *args)

    def warning(self, msg: str, *args: object) -> None:
        self(logging.WARNING, msg, *args)

    def error(self, msg: str, *args: object) -> None:
        self(logging.ERROR, msg, *args)
