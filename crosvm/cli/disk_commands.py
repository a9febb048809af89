"""`crosvm create_qcow2` and `crosvm create_composite`."""

from __future__ import annotations

import sys

from crosvm.disk import DiskError
from crosvm.disk.composite import create_composite
from crosvm.disk.qcow2 import create_qcow2
from crosvm.vmm.exit import ExitCode

QCOW2_USAGE = """Usage: crosvm create_qcow2 PATH [SIZE] [--backing-file FILE]

Creates an empty qcow2 image of SIZE bytes at PATH. With --backing-file, reads fall
through to FILE (raw or qcow2; a relative name is resolved from PATH's directory) and
SIZE defaults to its size."""

COMPOSITE_USAGE = """Usage: crosvm create_composite PATH LABEL:PARTITION[:writable]...

Creates a composite disk at PATH whose GPT holds each PARTITION file under LABEL
(read-only unless `:writable`); the GPT goes in PATH's .header and .footer files."""


def _usage_error(message: str) -> int:
    print(f"crosvm: {message}", file=sys.stderr)
    return int(ExitCode.INVALID_ARGS)


def _disk_error(e: DiskError) -> int:
    print(f"crosvm: {e}", file=sys.stderr)
    return int(ExitCode.ERROR)


def cmd_create_qcow2(args: list[str]) -> int:
    if "-h" in args or "--help" in args:
        print(QCOW2_USAGE)
        return 0
    positional: list[str] = []
    backing = None
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--backing-file" or arg.startswith("--backing-file="):
            if "=" in arg:
                backing = arg.split("=", 1)[1]
            elif i + 1 < len(args):
                i += 1
                backing = args[i]
            else:
                return _usage_error("--backing-file needs a value")
        elif arg.startswith("-"):
            return _usage_error(f"unrecognized argument: {arg}")
        else:
            positional.append(arg)
        i += 1
    if not 1 <= len(positional) <= 2:
        return _usage_error("usage: crosvm create_qcow2 PATH [SIZE] [--backing-file FILE]")
    size = None
    if len(positional) == 2:
        try:
            size = int(positional[1], 0)
        except ValueError:
            return _usage_error(f"invalid size '{positional[1]}' (a number of bytes)")
        if size <= 0:
            return _usage_error(f"invalid size '{positional[1]}' (a number of bytes)")
    elif backing is None:
        return _usage_error("create_qcow2 needs a SIZE or a --backing-file")
    try:
        create_qcow2(positional[0], size, backing_file=backing)
    except DiskError as e:
        return _disk_error(e)
    return 0


def cmd_create_composite(args: list[str]) -> int:
    if "-h" in args or "--help" in args:
        print(COMPOSITE_USAGE)
        return 0
    if len(args) < 2:
        return _usage_error("usage: crosvm create_composite PATH LABEL:PARTITION...")
    partitions = []
    for spec in args[1:]:
        parts = spec.split(":")
        if len(parts) not in (2, 3) or not parts[0] or not parts[1] or \
                (len(parts) == 3 and parts[2] != "writable"):
            return _usage_error(f"invalid partition '{spec}' (LABEL:PARTITION[:writable])")
        partitions.append((parts[0], parts[1], len(parts) == 3))
    try:
        create_composite(args[0], partitions)
    except DiskError as e:
        return _disk_error(e)
    return 0
