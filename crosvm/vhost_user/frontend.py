"""The front-end side of a vhost-user connection: one request at a time over the Unix
socket, fds attached with SCM_RIGHTS, replies checked against what was asked.

The back-end is another program, so it is not trusted: a reply of the wrong request,
size or shape, a missing reply (`timeout`) or a closed socket is a `BackendError`.
"""

from __future__ import annotations

import array
import socket
import time

from crosvm.base.fdpass import close_fds, fds_from
from crosvm.vhost_user import protocol as P


class BackendError(Exception):
    """The back-end broke the protocol, refused a request, or went away."""


def connect(path: str, timeout: float) -> socket.socket:
    """Connect to a back-end's socket, retrying until `timeout` while it is not there
    yet (a back-end started just before the VMM may not be listening yet)."""
    deadline = time.monotonic() + timeout
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        # A listener whose backlog is full would block connect() for good.
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            sock.connect(path)
            return sock
        except (FileNotFoundError, ConnectionRefusedError, BlockingIOError,
                socket.timeout) as e:
            sock.close()
            if time.monotonic() >= deadline:
                why = e.strerror if isinstance(e, OSError) and e.strerror else "timed out"
                raise BackendError(f"vhost-user socket {path}: {why}") from None
            time.sleep(0.05)
        except OSError as e:
            sock.close()
            raise BackendError(f"vhost-user socket {path}: {e.strerror}") from None


class BackendConnection:
    """Requests to one back-end. With REPLY_ACK negotiated every request that has no
    reply of its own asks for an acknowledgement, so a refusal is seen where it
    happens."""

    def __init__(self, sock: socket.socket, timeout: float = 10.0, label: str = "vhost-user"):
        self.sock = sock
        self.timeout = timeout  # for a whole request and its reply, however it trickles
        self.label = label
        self.reply_ack = False
        self._deadline = 0.0

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        self.sock.close()

    def request(self, request: P.Request, payload: bytes = b"", fds: list[int] = ()) -> bytes:
        """Send `request`; return its reply's payload (b"" for requests without one)."""
        expects_data = request in P.REPLIES
        ack = self.reply_ack and not expects_data
        message = P.encode(request, payload, P.FLAG_NEED_REPLY if ack else 0)
        self._deadline = time.monotonic() + self.timeout
        try:
            self._settimeout()
            sent = 0
            if fds:  # the fds travel with the first byte; the rest may need more sends
                sent = self.sock.sendmsg([message], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                                      array.array("i", fds))])
            if sent < len(message):
                self._settimeout()
                self.sock.sendall(message[sent:])
        except (OSError, ValueError) as e:
            why = e.strerror if isinstance(e, OSError) and e.strerror else "timed out"
            raise BackendError(f"{self.label}: sending {request.name}: {why}") from None
        if not (expects_data or ack):
            return b""
        header, reply = self._recv_reply(request)
        if ack:
            try:
                status = P.decode_u64(reply, f"{request.name} acknowledgement")
            except P.ProtocolError as e:
                raise BackendError(f"{self.label}: {e}") from None
            if status != 0:
                raise BackendError(f"{self.label}: the back-end refused {request.name} "
                                   f"(status {status})")
            return b""
        return reply

    def _recv_reply(self, request: P.Request) -> tuple[P.Header, bytes]:
        raw = self._recv_exact(P.HEADER.size, request)
        try:
            header = P.decode_header(raw)
        except P.ProtocolError as e:
            raise BackendError(f"{self.label}: reply to {request.name}: {e}") from None
        if not header.is_reply or header.request != request:
            raise BackendError(f"{self.label}: expected the reply to {request.name}, got "
                               f"request {header.request} (flags {header.flags:#x})")
        return header, self._recv_exact(header.size, request)

    def _recv_exact(self, size: int, request: P.Request) -> bytes:
        data = bytearray()
        while len(data) < size:
            try:
                self._settimeout()
                # Replies carry no fds; any the back-end attaches are closed unread.
                chunk, ancdata, _, _ = self.sock.recvmsg(size - len(data),
                                                         socket.CMSG_SPACE(4 * P.MAX_FDS))
            except (OSError, ValueError) as e:
                why = (e.strerror if isinstance(e, OSError) and e.strerror
                       else f"no answer within {self.timeout:g} s")
                raise BackendError(f"{self.label}: waiting for the reply to {request.name}: "
                                   f"{why}") from None
            close_fds(fds_from(ancdata))
            if not chunk:
                raise BackendError(f"{self.label}: the back-end closed the connection "
                                   f"(while waiting for the reply to {request.name})")
            data += chunk
        return bytes(data)


    def _settimeout(self) -> None:
        """What is left of this request's time (a ValueError once it is gone)."""
        remaining = self._deadline - time.monotonic()
        if remaining <= 0:
            raise ValueError("the request's time is up")
        self.sock.settimeout(remaining)
