"""Control messages into the real control server: through its request handling and
through its socket. Every input gets a JSON response or a closed connection, and
`"Exit"` is answered after every input (no client disables the server)."""

from __future__ import annotations

import json
import os
import socket
import tempfile

from crosvm.vm_control import ControlServer, handle_request
from fuzz.cli_harness import run_standalone

_DIR = tempfile.mkdtemp(prefix="fuzz_control_")
_exits = [0]
_server: ControlServer | None = None


def _exit() -> str:
    _exits[0] += 1
    return "Ok"


def _disk_command(payload: object) -> object:
    """A handler that looks into its payload, as issue 11's handlers will."""
    if not isinstance(payload, dict) or not isinstance(payload.get("disk_index"), int):
        return {"ErrString": "bad DiskCommand"}
    return "Ok"


def server() -> ControlServer:
    global _server
    if _server is None:
        _server = ControlServer(os.path.join(_DIR, "vm.sock"),
                                {"Exit": _exit,
                                 "DiskCommand": _disk_command})
        _server.start()
    return _server


def one_input(data: bytes) -> None:
    srv = server()
    response = srv.respond(data)
    json.dumps(response)  # a response must be serializable
    assert response == "Ok" or isinstance(response, dict), response

    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as s:
        s.settimeout(10)
        s.connect(srv.path)
        try:
            s.send(data)
            answer = s.recv(1 << 17)
        except OSError:  # e.g. EMSGSIZE for a message the socket cannot carry
            answer = b""
    if answer:
        json.loads(answer)
    assert handle_request("Exit", srv.path) == "Ok"


if __name__ == "__main__":
    run_standalone(one_input)
