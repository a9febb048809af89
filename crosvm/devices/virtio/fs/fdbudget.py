"""How many fds the file servers of one process may hold between them.

Every inode, handle and fid a guest makes a file server hold is an fd in the device's
process — in the VMM itself without the sandbox, where running out would break every
other device. The servers take from one process-wide budget, the fd limit less a
reserve for everything else, and refuse a request that would go beyond it (ENFILE)."""

from __future__ import annotations

import errno
import resource
import threading

RESERVE = 512          # fds left for the rest of the process (devices, sockets, events)
MIN_BUDGET = 64


class FdBudget:
    """A counter of fds held by file servers against the process's RLIMIT_NOFILE."""

    def __init__(self, limit: int | None = None) -> None:
        self._limit = limit
        self._held = 0
        self._lock = threading.Lock()

    @property
    def limit(self) -> int:
        """Read once, on first use: in the device's process that is after its jail set
        its RLIMIT_NOFILE (and the VMM raised its own before serving)."""
        if self._limit is None:
            soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
            if soft == resource.RLIM_INFINITY:
                soft = 1 << 20
            self._limit = max(MIN_BUDGET, soft - RESERVE)
        return self._limit

    @property
    def held(self) -> int:
        return self._held

    def take(self, count: int = 1) -> None:
        """Account for `count` more fds; OSError(ENFILE) when over the budget."""
        with self._lock:
            if self._held + count > self.limit:
                raise OSError(errno.ENFILE, "too many open files for the shared directories")
            self._held += count

    def give(self, count: int = 1) -> None:
        with self._lock:
            self._held = max(0, self._held - count)


# One per process: in the VMM (no sandbox) every share's server draws from it.
PROCESS_BUDGET = FdBudget()


def raise_fd_limit(wanted: int = 65536) -> int:
    """Raise this process's soft RLIMIT_NOFILE toward `wanted` (within the hard limit),
    as a VMM serving shared directories needs; the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        return target
    return soft
