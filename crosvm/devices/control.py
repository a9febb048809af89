"""Requests the VMM makes of a device at run time (`crosvm disk resize`, `suspend --full`,
`balloon`), as small binary messages that cross the device-process socket.

A request is (code, 64-bit argument). A result is one status byte (0 ok, 1 error)
then the payload: nothing, or a fixed-size struct for the codes that return one, or
an error message. The device process is not trusted, so `decode_result` checks the
shape before the VMM uses anything in it.
"""

from __future__ import annotations

import struct

CTRL_SLEEP = 1           # stop taking requests from the queues (after the current one)
CTRL_WAKE = 2            # take requests again; nothing queued meanwhile is lost
CTRL_RESIZE = 3          # block: argument = new size in bytes
CTRL_BALLOON_ADJUST = 4  # balloon: argument = target size in 4 KiB pages
CTRL_BALLOON_STATS = 5   # balloon: ask the guest for fresh stats; returns the latest
CTRL_BALLOON_ACTUAL = 6  # balloon: the pages the guest has given (returns one u64)

CODES = {CTRL_SLEEP, CTRL_WAKE, CTRL_RESIZE, CTRL_BALLOON_ADJUST, CTRL_BALLOON_STATS,
         CTRL_BALLOON_ACTUAL}
MAX_ARG = (1 << 64) - 1
MAX_ERROR = 200

# The balloon's stats payload: a generation counter, the balloon's actual pages, a
# bitmap of the stats the guest sent, then one u64 per stat tag (0..NUM_STATS-1).
NUM_STATS = 16
STATS = struct.Struct(f"<QQH{NUM_STATS}Q")
ACTUAL = struct.Struct("<Q")
# CTRL_SLEEP's payload: whether this request paused the device (a failed suspend wakes
# only those), or it was asleep already / had no worker.
SLEPT, ALREADY = b"\x01", b"\x00"
PAYLOAD_SIZES = {CTRL_SLEEP: 1, CTRL_WAKE: 0, CTRL_RESIZE: 0, CTRL_BALLOON_ADJUST: 0,
                 CTRL_BALLOON_STATS: STATS.size, CTRL_BALLOON_ACTUAL: ACTUAL.size}


class DeviceControlError(Exception):
    """The device refused the request, or could not be asked; the message says why."""


def encode_ok(payload: bytes = b"") -> bytes:
    return b"\x00" + payload


def encode_error(message: str) -> bytes:
    return b"\x01" + message.encode("utf-8", "replace")[:MAX_ERROR]


def decode_result(code: int, data: bytes | None) -> bytes:
    """The payload of a device's answer to `code`; DeviceControlError for a refusal or
    for an answer of the wrong shape."""
    if not data:
        raise DeviceControlError("the device did not answer")
    if data[0] == 1:
        text = data[1:MAX_ERROR + 1].decode("utf-8", "replace")
        raise DeviceControlError("".join(c if c.isprintable() else "?" for c in text))
    payload = data[1:]
    if data[0] != 0 or len(payload) != PAYLOAD_SIZES.get(code, -1):
        raise DeviceControlError(f"malformed answer from the device ({len(data)} bytes)")
    return payload
