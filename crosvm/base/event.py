"""Event: an eventfd, the notification primitive between threads, processes and KVM."""

from __future__ import annotations

import os
import select


class Event:
    """A counter eventfd. `signal()` adds 1; `wait()` blocks and resets it."""

    def __init__(self, fd: int | None = None) -> None:
        self.fd = os.eventfd(0, os.EFD_CLOEXEC) if fd is None else fd

    def signal(self) -> None:
        os.eventfd_write(self.fd, 1)

    def wait(self) -> int:
        return os.eventfd_read(self.fd)

    def drain(self) -> int:
        """Reset the counter without blocking; returns what it was."""
        poller = select.poll()  # not select(): fds above 1023 are fine
        poller.register(self.fd, select.POLLIN)
        if poller.poll(0):
            return os.eventfd_read(self.fd)
        return 0

    def fileno(self) -> int:
        return self.fd

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> "Event":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class IrqLevelEvent:
    """A level-triggered interrupt line: the trigger irqfd plus KVM's resample event.

    KVM lowers the line at the guest's EOI and signals `resample`; the device then
    re-asserts if its interrupt is still pending.
    """

    def __init__(self) -> None:
        self.trigger = Event()
        self.resample = Event()

    def close(self) -> None:
        self.trigger.close()
        self.resample.close()
