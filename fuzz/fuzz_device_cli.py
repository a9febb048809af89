"""The `crosvm device TYPE ...` and `crosvm devices ...` command lines: any argv is
parsed and validated to a back-end spec or refused with DeviceUsageError (printed
as one line, exit 35), never another exception. Nothing is built: no socket is bound.

Input: the first byte picks the command (even: device, odd: devices); the rest are
arguments separated by NUL bytes. An argument whose first byte is below 0x20 is an
option of that command (the byte picks it) with the rest as its value.
"""

from __future__ import annotations

from crosvm.cli.device_command import (DEVICE_FLAGS, TYPES, DeviceUsageError,
                                       parse_device, parse_devices)
from crosvm.cli.main import one_line
from fuzz.cli_harness import argv_from, run_standalone

DEVICE_OPTIONS = sorted({f"--{flag}" for flags in DEVICE_FLAGS.values() for flag in flags}
                        | {"--socket-path"})
DEVICES_OPTIONS = ["--block", "--net", "--vsock", "--serial", "--jail", "--disable-sandbox"]


def one_input(data: bytes) -> None:
    if not data:
        return
    try:
        if data[0] % 2 == 0:
            args = argv_from(data[2:], DEVICE_OPTIONS, 32)
            kind = TYPES[data[1] % len(TYPES)] if len(data) > 1 else "block"
            parse_device([kind] + args)
        else:
            parse_devices(argv_from(data[1:], DEVICES_OPTIONS, 32))
    except DeviceUsageError as e:
        assert str(e) and "\n" not in one_line(str(e)), str(e)  # printed as one line


if __name__ == "__main__":
    run_standalone(one_input)
