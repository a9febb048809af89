"""Writing a command's output to stdout, which may be a closed pipe or a full disk."""

from __future__ import annotations

import os
import sys


class StdoutError(Exception):
    """stdout cannot be written; `message` is empty when the reader just went away."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def write_stdout(text: str) -> None:
    """Prints `text` and a newline, flushed now, so a failure is seen here and not in
    the interpreter's exit-time flush (which would print a traceback-like warning)."""
    try:
        sys.stdout.write(text + "\n")
        sys.stdout.flush()
    except BrokenPipeError:
        # `crosvm --help | head`: the reader has what it wanted. Point stdout at
        # /dev/null so the exit-time flush of what is still buffered stays quiet.
        _silence_stdout()
        raise StdoutError("") from None
    except OSError as e:
        _silence_stdout()
        raise StdoutError(f"cannot write to stdout: {e.strerror}") from None


def _silence_stdout() -> None:
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass
