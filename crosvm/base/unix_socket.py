"""Unix socket files a process binds, and their removal."""

from __future__ import annotations

import os


def socket_identity(path: str) -> tuple[int, int]:
    """(device, inode) of the socket file at `path`, to recognise it at removal."""
    st = os.lstat(path)
    return st.st_dev, st.st_ino


def remove_socket(path: str, identity: tuple[int, int]) -> None:
    """Remove the socket file we bound, not whatever took its place since."""
    try:
        if socket_identity(path) == identity:
            os.unlink(path)
    except OSError:
        pass
