"""virtio-vsock's wire format and per-connection stream accounting (virtio 1.2, 5.10).

Pure: no fds, no guest memory. The device (vsock.py) feeds it the headers a guest
sends and asks it what to send back, so every rule about a hostile guest lives here
and is unit-tested on its own: a header is checked before anything acts on it, and a
connection whose guest breaks the credit protocol is reset, never buffered without
bound.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

HDR = struct.Struct("<QQIIIHHIII")  # struct virtio_vsock_hdr, packed
HDR_LEN = HDR.size  # 44

HOST_CID = 2
MIN_GUEST_CID = 3
MAX_GUEST_CID = 0xFFFF_FFFE  # U32_MAX is VMADDR_CID_ANY

TYPE_STREAM = 1
TYPE_SEQPACKET = 2

OP_INVALID = 0
OP_REQUEST = 1
OP_RESPONSE = 2
OP_RST = 3
OP_SHUTDOWN = 4
OP_RW = 5
OP_CREDIT_UPDATE = 6
OP_CREDIT_REQUEST = 7
OP_NAMES = {OP_REQUEST: "REQUEST", OP_RESPONSE: "RESPONSE", OP_RST: "RST",
            OP_SHUTDOWN: "SHUTDOWN", OP_RW: "RW", OP_CREDIT_UPDATE: "CREDIT_UPDATE",
            OP_CREDIT_REQUEST: "CREDIT_REQUEST"}

SHUTDOWN_RCV = 1   # the sender will receive no more
SHUTDOWN_SEND = 2  # the sender will send no more
SHUTDOWN_BOTH = SHUTDOWN_RCV | SHUTDOWN_SEND

F_STREAM = 0  # VIRTIO_VSOCK_F_STREAM (implied when no type feature is offered)
EVENT_TRANSPORT_RESET = 0
EVENT = struct.Struct("<I")

# What the device gives each connection: the guest may have this many bytes in flight
# towards the host socket, and no more (its credit; Linux's own default size, so a
# sender is not held to two packets per round trip). With MAX_CONNECTIONS that bounds
# what the device can ever hold for guests: 128 x 256 KiB = 32 MiB.
BUF_ALLOC = 256 << 10
MAX_CONNECTIONS = 128
MAX_PAYLOAD = 64 << 10  # one RW packet, either way (Linux sends at most 64 KiB)


class PacketError(ValueError):
    """A header the device refuses; the connection it names (if any) is reset."""


@dataclass
class Header:
    """One virtio_vsock_hdr."""

    src_cid: int
    dst_cid: int
    src_port: int
    dst_port: int
    len: int
    type: int
    op: int
    flags: int = 0
    buf_alloc: int = 0
    fwd_cnt: int = 0

    def pack(self) -> bytes:
        return HDR.pack(self.src_cid, self.dst_cid, self.src_port, self.dst_port, self.len,
                        self.type, self.op, self.flags, self.buf_alloc, self.fwd_cnt)

    @classmethod
    def unpack(cls, raw: bytes | memoryview) -> "Header":
        if len(raw) != HDR_LEN:
            raise PacketError(f"a vsock header is {HDR_LEN} bytes, not {len(raw)}")
        return cls(*HDR.unpack(raw))

    def reply(self, op: int, **kw) -> "Header":
        """A header going back the way this one came (ports and CIDs swapped)."""
        return Header(self.dst_cid, self.src_cid, self.dst_port, self.src_port, 0,
                      TYPE_STREAM, op, **kw)


def check_guest_header(h: Header, guest_cid: int, payload: int) -> None:
    """What a packet from the guest must be before anything acts on it. `payload` is
    the number of bytes the chain holds after the header."""
    if h.src_cid != guest_cid:
        raise PacketError(f"source CID {h.src_cid} is not the guest's ({guest_cid})")
    if h.dst_cid != HOST_CID:
        raise PacketError(f"destination CID {h.dst_cid} is not the host's ({HOST_CID})")
    if h.type != TYPE_STREAM:
        raise PacketError(f"socket type {h.type} is not stream")
    if h.op not in OP_NAMES:
        raise PacketError(f"unknown op {h.op}")
    if h.op == OP_RW:
        if h.len > MAX_PAYLOAD:
            raise PacketError(f"payload of {h.len} bytes is over {MAX_PAYLOAD}")
        if h.len > payload:
            raise PacketError(f"header says {h.len} bytes but the chain holds {payload}")
    elif h.len:
        raise PacketError(f"{OP_NAMES[h.op]} carries {h.len} payload bytes")
    if h.op == OP_SHUTDOWN and h.flags & ~SHUTDOWN_BOTH:
        raise PacketError(f"unknown shutdown flags {h.flags:#x}")


def parse_connect_line(line: bytes) -> int:
    """`CONNECT <port>\\n` from a host program (the hybrid-vsock protocol) -> port."""
    text = line.decode("ascii", "replace").rstrip("\n")
    verb, _, port = text.partition(" ")
    if verb != "CONNECT" or not port.isdigit() or len(port) > 10:
        raise PacketError(f"expected 'CONNECT <port>', got {text[:40]!r}")
    value = int(port)
    if value > 0xFFFF_FFFF:
        raise PacketError(f"port {value} does not fit 32 bits")
    return value


class Credit:
    """Both directions' stream accounting for one connection (virtio 5.10.6.3).

    Guest -> host: the guest may send while `rx_cnt - fwd_cnt <= BUF_ALLOC`; the
    device counts what it forwarded to the host socket in `fwd_cnt` and tells the
    guest (in every header it sends, and by CREDIT_UPDATE when the guest's view of our
    free space has fallen below half). Host -> guest: the device sends at most
    `peer_buf_alloc - (tx_cnt - peer_fwd_cnt)` bytes, as the guest last told it.
    Counters are u32 and wrap, as on the wire.
    """

    def __init__(self, peer_buf_alloc: int = 0, peer_fwd_cnt: int = 0) -> None:
        self.buf_alloc = BUF_ALLOC
        self.rx_cnt = 0         # payload bytes received from the guest
        self.fwd_cnt = 0        # of those, written to the host socket
        self.told_fwd_cnt = 0   # fwd_cnt as the guest last heard it
        self.tx_cnt = 0         # payload bytes sent to the guest
        self.peer_buf_alloc = peer_buf_alloc
        self.peer_fwd_cnt = peer_fwd_cnt

    def update_peer(self, h: Header) -> None:
        """Every guest header carries its current buffer size and forwarded count."""
        self.peer_buf_alloc = h.buf_alloc
        self.peer_fwd_cnt = h.fwd_cnt

    def peer_free(self) -> int:
        """How many bytes the guest can take now (0 when it owes us room)."""
        in_flight = (self.tx_cnt - self.peer_fwd_cnt) & 0xFFFF_FFFF
        return max(0, self.peer_buf_alloc - in_flight)

    def sent(self, n: int) -> None:
        self.tx_cnt = (self.tx_cnt + n) & 0xFFFF_FFFF

    def received(self, n: int) -> None:
        """`n` payload bytes came from the guest; PacketError if that is more than the
        credit it was given (a guest that ignores credit is reset, not buffered)."""
        held = (self.rx_cnt - self.fwd_cnt) & 0xFFFF_FFFF
        if held + n > self.buf_alloc:
            raise PacketError(f"the guest sent {n} bytes with {self.buf_alloc - held} of "
                              "credit left")
        self.rx_cnt = (self.rx_cnt + n) & 0xFFFF_FFFF

    def forwarded(self, n: int) -> None:
        self.fwd_cnt = (self.fwd_cnt + n) & 0xFFFF_FFFF

    def stamp(self, h: Header) -> Header:
        """Fill our buffer size and forwarded count into a header going to the guest."""
        h.buf_alloc, h.fwd_cnt = self.buf_alloc, self.fwd_cnt
        self.told_fwd_cnt = self.fwd_cnt
        return h

    def wants_update(self) -> bool:
        """Whether the guest's idea of our free space is below half the buffer while
        the real free space is larger: then it may be waiting, so tell it."""
        told_free = self.buf_alloc - ((self.rx_cnt - self.told_fwd_cnt) & 0xFFFF_FFFF)
        return told_free < self.buf_alloc // 2 and self.fwd_cnt != self.told_fwd_cnt
