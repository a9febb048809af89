"""The signals a VMM handles, as a daemon would: SIGHUP, SIGINT and SIGTERM stop the VM
(exit 0, like `crosvm stop`, so the terminal is restored and the control socket
removed); SIGUSR1 and SIGUSR2, whose default is to kill silently, are logged and
ignored. Other fatal signals keep their default: SIGQUIT and SIGKILL are the ways to
end a VMM at once."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from typing import Callable, Iterator

log = logging.getLogger("crosvm")

STOP_SIGNALS = (signal.SIGHUP, signal.SIGINT, signal.SIGTERM)
IGNORED_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2)


def _install(on_stop: Callable[[str], None]) -> dict[int, object]:
    """Installs the handlers; returns the previous ones. Handlers act only in the
    installing process: a device process forked later inherits them and ignores
    these signals (the VMM stops it)."""
    owner = os.getpid()

    def stop(signum: int, _frame: object) -> None:
        if os.getpid() == owner:
            on_stop(signal.Signals(signum).name)

    def ignore(signum: int, _frame: object) -> None:
        if os.getpid() == owner:
            log.warning("%s ignored (SIGTERM or `crosvm stop` stops the VM)",
                        signal.Signals(signum).name)

    saved = {}
    for sig in STOP_SIGNALS:
        saved[sig] = signal.signal(sig, stop)
    for sig in IGNORED_SIGNALS:
        saved[sig] = signal.signal(sig, ignore)
    return saved


def install_stop_signals(stop: Callable[[str], None]) -> None:
    """For a running VM: `stop(signal_name)` on SIGHUP, SIGINT or SIGTERM.

    `stop` runs in a new thread, not in the handler: the handler interrupts the main
    thread anywhere, possibly while it holds a lock `stop` needs."""
    _install(lambda name: threading.Thread(target=stop, args=(name,),
                                           name="stop_signal", daemon=True).start())


def _raise(name: str) -> None:
    raise KeyboardInterrupt(name)


@contextlib.contextmanager
def stop_signals_raise() -> Iterator[None]:
    """While the VM is being built: a stop signal raises KeyboardInterrupt(name), which
    unwinds the set-up and reaches the error boundary as one line."""
    if threading.current_thread() is not threading.main_thread():
        yield  # only the main thread may set handlers (a test or fuzzer driving main())
        return
    saved = _install(_raise)
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
