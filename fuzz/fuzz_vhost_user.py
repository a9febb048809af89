"""Fuzz target: a hostile vhost-user back-end answering the front-end
(crosvm/vhost_user/frontend.py BackendConnection, protocol.py decoders).

Each input picks a request the front-end sends (with REPLY_ACK on or off) and the bytes
the back-end answers with: mostly a well-formed header with a fuzzed request code,
flags and size, sometimes raw bytes, then any payload; the back-end may close early.
Invariants: only BackendError leaves `request`; a data reply returned is exactly the
header's size and came with the REPLY flag and the request's own code; the payload
decoders raise only ProtocolError.
"""

from __future__ import annotations

import socket

import atheris

from crosvm.vhost_user import protocol as P
from crosvm.vhost_user.frontend import BackendConnection, BackendError

REQUESTS = sorted(P.Request)
DECODERS = (P.decode_header, P.decode_config, P.decode_vring_state, P.decode_vring_addr,
            P.decode_vring_fd, P.decode_u64)


def one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    request = REQUESTS[fdp.ConsumeIntInRange(0, len(REQUESTS) - 1)]
    front, back = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn = BackendConnection(front, timeout=0.005, label="fuzz")
        conn.reply_ack = fdp.ConsumeBool()
        if fdp.ConsumeBool():
            code = request if fdp.ConsumeBool() else fdp.ConsumeIntInRange(0, 64)
            flags = fdp.ConsumeIntInRange(0, 0xF)
            size = fdp.ConsumeIntInRange(0, 2 * P.MAX_PAYLOAD)
            answer = P.HEADER.pack(code, flags, size)
        else:
            answer = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 16))
        answer += fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 600))
        back.sendall(answer)
        if fdp.ConsumeBool():
            back.shutdown(socket.SHUT_WR)
        try:
            reply = conn.request(request, fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 64)))
        except BackendError:
            reply = None
        if reply and request in P.REPLIES:
            header = P.decode_header(answer)
            assert header.is_reply and header.request == request
            assert len(reply) == header.size
        rest = fdp.ConsumeBytes(400)
        nfds = fdp.ConsumeIntInRange(0, 9)
        for decode in DECODERS + ((lambda d: P.decode_memory_table(d, nfds)),):
            try:
                decode(rest)
            except P.ProtocolError:
                pass
    finally:
        front.close()
        back.close()
