"""File descriptors received with SCM_RIGHTS (crosvm's `base` fd passing)."""

from __future__ import annotations

import array
import os
import socket


def fds_from(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    """The fds in `recvmsg`'s ancillary data (now ours: the caller closes them)."""
    fds = array.array("i")
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[:len(data) - len(data) % fds.itemsize])
    return list(fds)


def close_fds(fds: list[int]) -> None:
    """Close every fd, ignoring ones already gone."""
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass
