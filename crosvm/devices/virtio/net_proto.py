"""virtio-net wire formats (virtio 1.x, 5.1.6), parsed and checked without I/O.

The vnet header that precedes every frame on the queues (and on a TAP opened with
IFF_VNET_HDR), the feature bits, config space, the TAP offload flags that follow from
what the driver acked, and control-queue commands. Everything here is pure so it can be
tested against hostile input directly.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

# Feature bits (virtio 1.x, 5.1.3).
F_CSUM = 0
F_GUEST_CSUM = 1
F_CTRL_GUEST_OFFLOADS = 2
F_MTU = 3
F_MAC = 5
F_GUEST_TSO4 = 7
F_GUEST_TSO6 = 8
F_GUEST_ECN = 9
F_GUEST_UFO = 10
F_HOST_TSO4 = 11
F_HOST_TSO6 = 12
F_HOST_ECN = 13
F_HOST_UFO = 14
F_MRG_RXBUF = 15
F_STATUS = 16
F_CTRL_VQ = 17
F_CTRL_RX = 18
F_MQ = 22

# Offloads offered in both directions: the TAP takes any of them on write, and can give
# them on read once TUNSETOFFLOAD says the driver accepted them.
OFFLOAD_FEATURES = sum(1 << b for b in (
    F_CSUM, F_GUEST_CSUM, F_GUEST_TSO4, F_GUEST_TSO6, F_GUEST_ECN, F_GUEST_UFO,
    F_HOST_TSO4, F_HOST_TSO6, F_HOST_ECN, F_HOST_UFO))

# What VIRTIO_NET_CTRL_GUEST_OFFLOADS_SET may turn on and off.
GUEST_OFFLOADS = sum(1 << b for b in (
    F_GUEST_CSUM, F_GUEST_TSO4, F_GUEST_TSO6, F_GUEST_ECN, F_GUEST_UFO))

# struct virtio_net_hdr_v1: flags, gso_type, hdr_len, gso_size, csum_start,
# csum_offset, num_buffers. With VERSION_1 it is always 12 bytes.
VNET_HDR = struct.Struct("<BBHHHHH")
VNET_HDR_LEN = VNET_HDR.size
HDR_F_NEEDS_CSUM = 1
HDR_F_DATA_VALID = 2
MIN_GSO_SIZE = 64  # bytes per segment a transmitted GSO frame may ask for
GSO_NONE, GSO_TCPV4, GSO_UDP, GSO_TCPV6, GSO_ECN = 0, 1, 3, 4, 0x80

# The largest frame either side may hand over: a 64 KiB GSO packet plus its Ethernet
# and VLAN headers. Anything longer is dropped, never buffered.
MAX_FRAME_LEN = 65535 + 14 + 4
ETH_MIN_LEN = 14
DEFAULT_MTU = 1500
MIN_MTU = 68  # IPv4's minimum
MAX_MTU = MAX_FRAME_LEN - 18  # an Ethernet header and a VLAN tag around the payload

# TUNSETOFFLOAD flags (linux/if_tun.h).
TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, TUN_F_TSO_ECN, TUN_F_UFO = 0x01, 0x02, 0x04, 0x08, 0x10

# Link status (config space).
S_LINK_UP = 1

# Control queue (virtio 1.x, 5.1.6.5).
CTRL_HDR = struct.Struct("<BB")
CTRL_OK, CTRL_ERR = 0, 1
CLASS_RX, CLASS_MAC, CLASS_VLAN, CLASS_ANNOUNCE, CLASS_MQ, CLASS_GUEST_OFFLOADS = 0, 1, 2, 3, 4, 5
MQ_VQ_PAIRS_SET = 0
MQ_PAIRS_MIN, MQ_PAIRS_MAX = 1, 0x8000
MAX_CTRL_DATA = 4096  # a command's payload; MAC tables are the largest legitimate one


class HeaderError(ValueError):
    """A vnet header the device refuses (the frame is dropped and counted)."""


@dataclass(frozen=True)
class VnetHeader:
    """One virtio_net_hdr_v1."""

    flags: int = 0
    gso_type: int = GSO_NONE
    hdr_len: int = 0
    gso_size: int = 0
    csum_start: int = 0
    csum_offset: int = 0
    num_buffers: int = 0

    def pack(self) -> bytes:
        return VNET_HDR.pack(self.flags, self.gso_type, self.hdr_len, self.gso_size,
                             self.csum_start, self.csum_offset, self.num_buffers)

    @classmethod
    def unpack(cls, data: bytes | memoryview) -> "VnetHeader":
        if len(data) < VNET_HDR_LEN:
            raise HeaderError(f"vnet header needs {VNET_HDR_LEN} bytes, got {len(data)}")
        return cls(*VNET_HDR.unpack_from(data))


def check_tx_header(hdr: VnetHeader, frame_len: int, acked: int) -> None:
    """Refuse a transmit header the driver may not send with the features it acked.

    The TAP validates again; checking here means a driver cannot make the host kernel
    see offloads it never negotiated, and gives one clear reason per dropped frame.
    """
    if frame_len < ETH_MIN_LEN:
        raise HeaderError(f"frame of {frame_len} bytes is shorter than an Ethernet header")
    if frame_len > MAX_FRAME_LEN:
        raise HeaderError(f"frame of {frame_len} bytes is longer than {MAX_FRAME_LEN}")
    # virtio 5.1.6.2.1: the driver MUST NOT set DATA_VALID (nor RSC_INFO) on transmit.
    if hdr.flags & ~HDR_F_NEEDS_CSUM:
        raise HeaderError(f"header flags {hdr.flags:#x} are not allowed on transmit")
    if hdr.flags & HDR_F_NEEDS_CSUM:
        if not acked >> F_CSUM & 1:
            raise HeaderError("NEEDS_CSUM without VIRTIO_NET_F_CSUM")
        if hdr.csum_start + hdr.csum_offset + 2 > frame_len:
            raise HeaderError(f"checksum at {hdr.csum_start}+{hdr.csum_offset} is past the "
                              f"frame ({frame_len} bytes)")
    gso = hdr.gso_type & ~GSO_ECN
    if gso == GSO_NONE:
        if hdr.gso_type & GSO_ECN:
            raise HeaderError("ECN flag without a GSO type")
        return
    need = {GSO_TCPV4: F_HOST_TSO4, GSO_TCPV6: F_HOST_TSO6, GSO_UDP: F_HOST_UFO}.get(gso)
    if need is None:
        raise HeaderError(f"unknown GSO type {hdr.gso_type:#x}")
    if not acked >> need & 1:
        raise HeaderError(f"GSO type {gso} was not negotiated")
    if hdr.gso_type & GSO_ECN and not acked >> F_HOST_ECN & 1:
        raise HeaderError("GSO ECN was not negotiated")
    if not hdr.flags & HDR_F_NEEDS_CSUM:
        raise HeaderError("a GSO frame must ask for a checksum (NEEDS_CSUM)")
    if hdr.gso_size < MIN_GSO_SIZE:
        # Tinier segments would make the host cut one frame into thousands.
        raise HeaderError(f"GSO frame with a segment size of {hdr.gso_size} "
                          f"(at least {MIN_GSO_SIZE})")


def tap_offload_flags(acked: int) -> int:
    """TUNSETOFFLOAD flags for what the driver accepts on receive (virtio 5.1.6.4.1).

    Segmentation offloads need checksum offload; without GUEST_CSUM the TAP must
    hand over only complete, checksummed frames."""
    if not acked >> F_GUEST_CSUM & 1:
        return 0
    flags = TUN_F_CSUM
    for feature, tun in ((F_GUEST_TSO4, TUN_F_TSO4), (F_GUEST_TSO6, TUN_F_TSO6),
                         (F_GUEST_ECN, TUN_F_TSO_ECN), (F_GUEST_UFO, TUN_F_UFO)):
        if acked >> feature & 1:
            flags |= tun
    if not flags & (TUN_F_TSO4 | TUN_F_TSO6):
        flags &= ~TUN_F_TSO_ECN
    return flags


def net_mtu(tap_mtu: int | None) -> int:
    """The MTU the guest is told: the TAP's, as crosvm, kept within what the device
    frames; 1500 when the TAP's could not be read."""
    if tap_mtu is None:
        return DEFAULT_MTU
    return max(MIN_MTU, min(tap_mtu, MAX_MTU))


def parse_mac(text: str) -> bytes:
    """`52:54:00:12:34:56` as 6 bytes; ValueError names what is wrong."""
    parts = text.split(":")
    if len(parts) != 6 or not all(len(p) == 2 for p in parts):
        raise ValueError(f"invalid MAC address '{text}' (expected six hex pairs: "
                         "aa:bb:cc:dd:ee:ff)")
    try:
        mac = bytes(int(p, 16) for p in parts)
    except ValueError:
        raise ValueError(f"invalid MAC address '{text}'") from None
    return mac  # any six bytes, as crosvm (a multicast one is the user's choice)


def config_bytes(mac: bytes | None, link_up: bool, max_pairs: int, mtu: int) -> bytes:
    """struct virtio_net_config: mac, status, max_virtqueue_pairs, mtu."""
    return struct.pack("<6sHHH", mac or bytes(6), S_LINK_UP if link_up else 0, max_pairs, mtu)


@dataclass(frozen=True)
class CtrlCommand:
    """One control-queue request: class, command and its payload."""

    cls: int
    cmd: int
    data: bytes


def parse_ctrl(data: bytes) -> CtrlCommand:
    """A control request's readable part (header + payload)."""
    if len(data) < CTRL_HDR.size:
        raise HeaderError(f"control request of {len(data)} bytes has no class/command")
    cls, cmd = CTRL_HDR.unpack_from(data)
    return CtrlCommand(cls, cmd, bytes(data[CTRL_HDR.size:]))


def mq_pairs_requested(command: CtrlCommand, max_pairs: int) -> int:
    """The pair count a VQ_PAIRS_SET asks for, checked against what the device has."""
    if command.cmd != MQ_VQ_PAIRS_SET:
        raise HeaderError(f"unknown MQ command {command.cmd}")
    if len(command.data) != 2:
        raise HeaderError(f"VQ_PAIRS_SET with {len(command.data)} bytes of payload")
    (pairs,) = struct.unpack("<H", command.data)
    if not MQ_PAIRS_MIN <= pairs <= max_pairs:
        raise HeaderError(f"VQ_PAIRS_SET {pairs} outside 1..{max_pairs}")
    return pairs
