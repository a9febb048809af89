"""Opening a file for I/O from the O_PATH fd a file server holds for it.

The servers keep one O_PATH fd per inode (it pins the inode without opening it, and
works for symlinks). To read or write it, the fd is reopened through /proc/self/fd,
which opens the inode itself, never a path: a rename on the host cannot redirect it.
In the sandbox the jail's root is the shared directory (no /proc), so the device opens
`/proc/self/fd` before the pivot and hands that fd in (`proc_fd`).
"""

from __future__ import annotations

import os

PROC_SELF_FD = "/proc/self/fd"


def open_proc_self_fd() -> int:
    """An fd for the calling process's /proc/self/fd directory (open it in the process
    that will use it: /proc/self resolves at open time)."""
    return os.open(PROC_SELF_FD, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)


def reopen(proc_fd: int, path_fd: int, flags: int) -> int:
    """A new open file description for the inode `path_fd` holds, opened with `flags`
    (O_NOFOLLOW/O_CREAT are meaningless here and dropped; O_CLOEXEC is added)."""
    flags &= ~(os.O_NOFOLLOW | os.O_CREAT | os.O_EXCL)
    return os.open(str(path_fd), flags | os.O_CLOEXEC, dir_fd=proc_fd)
