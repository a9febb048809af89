"""Fuzz target: a hostile vhost-user front-end talking to our back-end
(crosvm/vhost_user/backend.py DeviceBackend serving a virtio-rng device).

Each input is a few messages: mostly a known request with a fuzzed payload (ring
indexes, sizes and addresses from interesting values or anywhere, memory tables whose
regions may lie past their file or overlap), sometimes raw bytes; fds attached at
random (a small memfd, an eventfd). The front-end then closes its end.
Invariants: `serve` returns normally (nothing escapes it), and afterwards the process
holds no more fds than before (every received fd is closed or owned and released).
"""

from __future__ import annotations

import array
import fcntl
import os
import socket
import struct

import atheris

from crosvm.devices.virtio.rng import Rng
from crosvm.vhost_user import protocol as P
from crosvm.vhost_user.backend import DeviceBackend

REQUESTS = sorted(P.Request)
MEM_SIZE = 1 << 20
ADDRS = [0, 0x1000, 0x7000_0000, 0x7000_1000, MEM_SIZE - 16, MEM_SIZE, 1 << 63, (1 << 64) - 1]


def _fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def _payload(fdp: atheris.FuzzedDataProvider, request: int) -> bytes:
    R = P.Request
    pick = lambda: ADDRS[fdp.ConsumeIntInRange(0, len(ADDRS) - 1)] if fdp.ConsumeBool() \
        else fdp.ConsumeIntInRange(0, (1 << 64) - 1)
    if request == R.SET_MEM_TABLE and fdp.ConsumeBool():
        n = fdp.ConsumeIntInRange(0, 3)
        return struct.pack("<II", n, 0) + b"".join(
            struct.pack("<QQQQ", pick(), fdp.ConsumeIntInRange(0, 2 * MEM_SIZE), pick(),
                        fdp.ConsumeIntInRange(0, MEM_SIZE)) for _ in range(n))
    if request == R.SET_VRING_ADDR and fdp.ConsumeBool():
        return struct.pack("<IIQQQQ", fdp.ConsumeIntInRange(0, 2), 0, pick(), pick(),
                           pick(), 0)
    if request in (R.SET_VRING_NUM, R.SET_VRING_BASE, R.SET_VRING_ENABLE,
                   R.GET_VRING_BASE) and fdp.ConsumeBool():
        return struct.pack("<II", fdp.ConsumeIntInRange(0, 2),
                           fdp.ConsumeIntInRange(0, 1 << 17))
    if request in (R.SET_VRING_KICK, R.SET_VRING_CALL, R.SET_VRING_ERR) and fdp.ConsumeBool():
        return struct.pack("<Q", fdp.ConsumeIntInRange(0, 0x1FF))
    return fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 80))


def one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    before = _fd_count()
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    memfd = os.memfd_create("fuzz-guest", os.MFD_ALLOW_SEALING)
    os.ftruncate(memfd, MEM_SIZE // 2 if fdp.ConsumeBool() else MEM_SIZE)
    if fdp.ConsumeBool():  # as a real front-end's memory is
        fcntl.fcntl(memfd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
    event = os.eventfd(0)
    rng = Rng()
    try:
        for _ in range(fdp.ConsumeIntInRange(1, 12)):
            if fdp.ConsumeProbability() < 0.1:
                ours.sendall(fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 24)))
                continue
            request = REQUESTS[fdp.ConsumeIntInRange(0, len(REQUESTS) - 1)]
            payload = _payload(fdp, request)
            flags = P.FLAG_NEED_REPLY if fdp.ConsumeBool() else 0
            message = P.HEADER.pack(request, P.VERSION | flags, len(payload)) + payload
            fds = [[], [memfd], [event], [memfd, memfd]][fdp.ConsumeIntInRange(0, 3)]
            if fds:
                ours.sendmsg([message], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                          array.array("i", fds))])
            else:
                ours.sendall(message)
        ours.shutdown(socket.SHUT_WR)
        DeviceBackend(rng, theirs).serve()
    finally:
        rng.close()
        ours.close()
        theirs.close()
        os.close(memfd)
        os.close(event)
    assert _fd_count() == before, f"fds leaked: {_fd_count() - before}"
