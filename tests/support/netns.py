"""Run test code inside a network namespace without moving the test process:
namespaces belong to threads, so a helper thread enters one and runs the code there
(child processes it starts inherit that namespace)."""

from __future__ import annotations

import ctypes
import os
import threading
from typing import Callable, TypeVar

CLONE_NEWNET = 0x40000000
T = TypeVar("T")


def on_netns_thread(fn: Callable[[], T], ns: str | None = None) -> T:
    """`fn()` on a thread in network namespace `ns` (a name under /run/netns), or in a
    new, empty one when `ns` is None (it vanishes with the thread, and its TAPs too).
    Its result is returned and its exception raised here."""
    result: dict = {}

    def run() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        try:
            if ns is None:
                ok = libc.unshare(CLONE_NEWNET) == 0
            else:
                fd = os.open(f"/run/netns/{ns}", os.O_RDONLY | os.O_CLOEXEC)
                try:
                    ok = libc.setns(fd, CLONE_NEWNET) == 0
                finally:
                    os.close(fd)
            if not ok:
                raise OSError(ctypes.get_errno(), "entering a network namespace")
            result["value"] = fn()
        except BaseException as e:  # handed to the calling thread
            result["error"] = e

    t = threading.Thread(target=run)
    t.start()
    t.join()
    if "error" in result:
        raise result["error"]
    return result["value"]
