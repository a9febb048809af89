"""Files named by the host user (kernel, initrd, disks, configs, policies, serial paths).

Two rules for all of them:
- open() never blocks: the file is opened with O_NONBLOCK (a FIFO with no writer, or
  for writing no reader, would otherwise stall open() for ever), then checked with
  fstat to be a kind the caller allows, and only then switched back to blocking mode.
  Checking the opened fd, not the path, leaves no window for the file to be swapped.
- whole-file reads are capped: `read_host_file` refuses a file larger than its limit
  (and reads at most limit + 1 bytes of one that grows), so /dev/zero or a 10 GB
  "config" cannot fill memory.

Errors are `HostFileError` with one line naming what the file is for and its path.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat

REGULAR = frozenset({stat.S_IFREG})
REGULAR_OR_BLOCK = frozenset({stat.S_IFREG, stat.S_IFBLK})
# Serial output may go to a file, a terminal or /dev/null, or a FIFO someone reads.
SERIAL_OUTPUT = frozenset({stat.S_IFREG, stat.S_IFCHR, stat.S_IFIFO})
SERIAL_INPUT = SERIAL_OUTPUT

KIND_NAMES = {
    stat.S_IFREG: "a regular file", stat.S_IFDIR: "a directory", stat.S_IFIFO: "a FIFO",
    stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device",
    stat.S_IFSOCK: "a socket", stat.S_IFLNK: "a symbolic link",
}


class HostFileError(Exception):
    """A host file is missing, unreadable, of the wrong kind or too large."""


def _kinds(allowed: frozenset[int]) -> str:
    names = [KIND_NAMES[k] for k in sorted(allowed)]
    return " or ".join(names)


def open_host_file(path: str, what: str, flags: int = os.O_RDONLY,
                   allowed: frozenset[int] = REGULAR, blocking: bool = True,
                   mode: int = 0o644) -> int:
    """Opens `path` for `what` (e.g. "kernel image") without blocking; returns the fd.

    Raises HostFileError if it cannot be opened or is not one of the `allowed` kinds
    (stat.S_IF* values). With `blocking` false the fd stays O_NONBLOCK."""
    try:
        fd = os.open(path, flags | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC, mode)
    except ValueError:  # an embedded NUL: no such file can exist
        raise HostFileError(f"{what} {path!r}: the path contains a NUL byte") from None
    except OSError as e:
        if e.errno == errno.ENXIO and _is_fifo(path):
            raise HostFileError(f"{what} {path} is a FIFO with no reader") from None
        raise HostFileError(f"failed to open {what} {path}: {e.strerror}") from None
    try:
        kind = stat.S_IFMT(os.fstat(fd).st_mode)
        if kind not in allowed:
            raise HostFileError(f"{what} {path} is {KIND_NAMES.get(kind, 'of an unknown kind')}"
                                f", not {_kinds(allowed)}")
        if blocking:
            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _is_fifo(path: str) -> bool:
    try:
        return stat.S_ISFIFO(os.stat(path).st_mode)
    except (OSError, ValueError):
        return False


def read_host_file(path: str, what: str, limit: int) -> bytes:
    """The whole of regular file `path`, refused if it is larger than `limit` bytes."""
    fd = open_host_file(path, what)
    try:
        if os.fstat(fd).st_size > limit:
            raise HostFileError(f"{what} {path} is larger than {limit} bytes")
        chunks = []
        total = 0
        while total <= limit:
            chunk = os.read(fd, limit + 1 - total)
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
    except OSError as e:
        raise HostFileError(f"failed to read {what} {path}: {e.strerror}") from None
    finally:
        os.close(fd)
    if total > limit:  # it grew while we read it
        raise HostFileError(f"{what} {path} is larger than {limit} bytes")
    return b"".join(chunks)
