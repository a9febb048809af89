"""The client side: send one request to a VM's control socket, return its response."""

from __future__ import annotations

import json
import socket

from crosvm.base import boundedjson
from crosvm.vm_control.server import MAX_DEPTH, MAX_MESSAGE

TIMEOUT = 10.0


class ControlError(Exception):
    """The VM could not be reached, or it refused the request."""


def handle_request(request: object, path: str, timeout: float | None = None) -> object:
    """Send `request` (e.g. "Exit") to the VM listening on `path`; its response
    (waiting at most `timeout` seconds, TIMEOUT by default)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC) as s:
        s.settimeout(TIMEOUT if timeout is None else timeout)
        try:
            s.connect(path)
            s.send(json.dumps(request).encode())
            raw, _, flags, _ = s.recvmsg(MAX_MESSAGE)
        except OSError as e:
            raise ControlError(f"cannot reach the VM at {path}: {e.strerror or e}") from None
    if flags & socket.MSG_TRUNC:
        raise ControlError(f"bad response from the VM at {path}: larger than "
                           f"{MAX_MESSAGE} bytes")
    if not raw:
        raise ControlError(f"the VM at {path} closed the connection without answering")
    try:
        return boundedjson.loads(raw, MAX_MESSAGE, MAX_DEPTH)
    except ValueError as e:
        raise ControlError(f"bad response from the VM at {path}: {e}") from None


def vms_request(request: object, path: str) -> None:
    """`handle_request`, with any response but "Ok" an error."""
    response = handle_request(request, path)
    if response != "Ok":
        shown = json.dumps(response)
        raise ControlError(f"the VM at {path} refused {json.dumps(request)[:100]}: "
                           f"{shown[:200]}")
