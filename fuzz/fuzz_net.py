"""Fuzz target: virtio-net (crosvm/devices/virtio/net.py) between a hostile driver and a
hostile backend.

The driver posts transmit chains (a vnet header and frame from fuzzer bytes, split over
buffers), receive buffers of any size, and control commands, with fuzzer-chosen
features; the backend (a socketpair standing in for the TAP, or a passt-style stream)
sends frames or arbitrary bytes. Invariants: nothing escapes the worker's callbacks;
every frame the TAP gets passed the transmit header check for the acked features;
every used receive length fits its chain and is 0 or at least a vnet header; a
control command is acknowledged with OK or ERR.
"""

from __future__ import annotations

import socket

import atheris

from crosvm.devices.virtio import net_proto as P
from crosvm.devices.virtio.net import Net
from crosvm.devices.virtio.virtio_device import BASE_FEATURES, Interrupt

from fuzz import guest

FEATURES = (P.OFFLOAD_FEATURES | 1 << P.F_MRG_RXBUF | 1 << P.F_CTRL_VQ
            | 1 << P.F_CTRL_GUEST_OFFLOADS | 1 << P.F_MQ | 1 << P.F_MTU | 1 << P.F_STATUS)


def one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    stream = fdp.ConsumeIntInRange(0, 3) == 0
    ours, peer = socket.socketpair(socket.AF_UNIX,
                                   socket.SOCK_STREAM if stream else socket.SOCK_SEQPACKET)
    ours.setblocking(False)
    peer.setblocking(False)
    net = Net([ours.detach()], mac=bytes(6), mrg_rxbuf=fdp.ConsumeBool(), stream=stream,
              queue_size=16, set_offload=lambda fd, flags: None)
    try:
        _run(fdp, net, peer, stream)
    finally:
        net.close()  # the TAP end too
        peer.close()


def _run(fdp: atheris.FuzzedDataProvider, net: Net, peer: socket.socket, stream: bool) -> None:
    acked = BASE_FEATURES | (net.features() & fdp.ConsumeIntInRange(0, (1 << 64) - 1))
    net.ack_features(acked)
    mem = guest.clean_memory()
    rx = guest.Driver(mem, 16, base=0x1000, start=0x4000, end=0x14000)
    tx = guest.Driver(mem, 16, base=0x14000, start=0x17000, end=0x30000)
    ctrl = guest.Driver(mem, 16, base=0x30000, start=0x33000, end=0x40000)
    queues = [(0, rx.q.queue, None), (1, tx.q.queue, None), (2, ctrl.q.queue, None)]
    handle, extra = guest.activate_sync(net, mem, Interrupt(None, None), queues)
    acks: dict[int, int] = {}
    for _ in range(fdp.ConsumeIntInRange(1, 8)):
        action = fdp.ConsumeIntInRange(0, 4)
        if action == 0:  # a frame to transmit
            header = fdp.ConsumeBytes(P.VNET_HDR_LEN)
            frame = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 3000))
            cut = fdp.ConsumeIntInRange(0, len(header) + len(frame))
            whole = header + frame
            tx.post([b for b in (whole[:cut], whole[cut:]) if b], [], fdp.ConsumeBool())
            while handle(1):
                pass
        elif action == 1:  # receive buffers
            sizes = [fdp.ConsumeIntInRange(1, 2048) for _ in range(fdp.ConsumeIntInRange(1, 3))]
            rx.post([], sizes, fdp.ConsumeBool())
            handle(0)
        elif action == 2:  # a control command
            head = ctrl.post([fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 24)) or b"\0"], [1], False)
            if head is not None:
                acks[head] = ctrl.outstanding[head][1][0][0]
            handle(2)
        elif action == 3:  # the backend sends something
            blob = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 2000))
            if not stream and fdp.ConsumeBool():
                blob = P.VnetHeader().pack() + blob.ljust(P.ETH_MIN_LEN, b"\0")
            try:
                peer.send(blob)
            except (BlockingIOError, OSError):
                pass
            for callback in extra.values():
                callback()
        else:  # the backend reads what was sent
            _drain(peer, stream, acked)
    _drain(peer, stream, acked)
    for head, length, writable in rx.used():
        assert length <= sum(n for _, n in writable), (head, length)
        assert length == 0 or length >= P.VNET_HDR_LEN, length
    for head, length, _ in ctrl.used():
        if head in acks:
            assert mem.read(acks[head], 1)[0] in (P.CTRL_OK, P.CTRL_ERR)
    tx.used()


def _drain(peer: socket.socket, stream: bool, acked: int) -> None:
    while True:
        try:
            got = peer.recv(1 << 17)
        except BlockingIOError:
            return
        if not got:
            return
        if not stream:  # a TAP frame: the header the device let through is valid
            hdr = P.VnetHeader.unpack(got[:P.VNET_HDR_LEN])
            P.check_tx_header(hdr, len(got) - P.VNET_HDR_LEN, acked)
