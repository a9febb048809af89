"""The VMM side of the control socket: a SOCK_SEQPACKET listener, one JSON request and
one JSON response per message, as crosvm's serde-serialized `VmRequest`/`VmResponse`
(`"Exit"` -> `"Ok"`). Requests this VMM does not implement get an `ErrString`."""

from __future__ import annotations

import json
import logging
import os
import select
import socket
import threading
from typing import Callable

log = logging.getLogger(__name__)

MAX_MESSAGE = 65536


def socket_path(path: str) -> str:
    """crosvm's rule: for a directory, the socket is `crosvm-<pid>.sock` inside it."""
    if os.path.isdir(path):
        return os.path.join(path, f"crosvm-{os.getpid()}.sock")
    return path


class ControlServer:
    """Serves requests on `path` in a thread; `handlers` maps a request name to a
    function returning the response (JSON-serializable)."""

    def __init__(self, path: str, handlers: dict[str, Callable[[], object]]) -> None:
        self.path = socket_path(path)
        self.handlers = handlers
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        try:
            self.sock.bind(self.path)
        except OSError as e:
            self.sock.close()
            raise OSError(e.errno, f"control socket {self.path}: {e.strerror or e}") from None
        self.sock.listen(8)
        self._stop_r, self._stop_w = os.pipe2(os.O_CLOEXEC)
        self._thread = threading.Thread(target=self._serve, name="vm_control", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _serve(self) -> None:
        poller = select.poll()
        poller.register(self.sock, select.POLLIN)
        poller.register(self._stop_r, select.POLLIN)
        while True:
            ready = {fd for fd, _ in poller.poll()}
            if self._stop_r in ready:
                return
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            with conn:
                conn.settimeout(5.0)  # a client that connects and says nothing
                try:
                    request = conn.recv(MAX_MESSAGE)
                    if request:
                        conn.send(json.dumps(self.respond(request)).encode())
                except OSError as e:
                    log.warning("control socket: %s", e)

    def respond(self, raw: bytes) -> object:
        """The response to one raw request; never raises."""
        try:
            request = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            return {"ErrString": "malformed request"}
        # serde writes a unit variant as "Name" and others as {"Name": {...}}.
        name = request if isinstance(request, str) else (
            next(iter(request)) if isinstance(request, dict) and len(request) == 1 else None)
        handler = self.handlers.get(name) if isinstance(name, str) else None
        if handler is None:
            return {"ErrString": f"unsupported request {str(name)[:64]!r}"}
        return handler()

    def close(self) -> None:
        os.write(self._stop_w, b"x")
        if self._thread.is_alive():
            self._thread.join(2.0)
        self.sock.close()
        for fd in (self._stop_r, self._stop_w):
            os.close(fd)
        try:
            os.unlink(self.path)
        except OSError:
            pass
