"""An INTx line a unit test can wait on, for devices driven without KVM."""

from __future__ import annotations

import select

from crosvm.base import Event


class Line:
    """An INTx line whose trigger the test can wait on."""

    def __init__(self) -> None:
        self.trigger = Event()
        self.resample = Event()


def wait_signalled(event: Event, timeout: float = 5.0) -> bool:
    """True once `event` is signalled (and drained), False after `timeout` seconds."""
    return bool(select.select([event.fd], [], [], timeout)[0]) and event.wait() > 0
