"""The vhost-user wire format (QEMU's "Vhost-user Protocol" specification): message
header, request codes, feature bits and the payload structs, with bounds checks.

Pure: no sockets here. Every decoder takes bytes from an untrusted peer and raises
`ProtocolError` on anything malformed (a wrong size, a bad version, too many regions).
"""

from __future__ import annotations

import enum
import struct
from typing import NamedTuple

# Header: request, flags (version in bits 0-1, REPLY bit 2, NEED_REPLY bit 3), size.
HEADER = struct.Struct("<III")
VERSION = 1
VERSION_MASK = 0x3
FLAG_REPLY = 1 << 2
FLAG_NEED_REPLY = 1 << 3
# The largest payload either side sends (GET_CONFIG's is 12 + 256; SET_MEM_TABLE's
# 8 + 8 * 32): anything larger is a broken peer, not a message to buffer.
MAX_PAYLOAD = 4096
MAX_FDS = 8
MAX_MEM_REGIONS = 8
MAX_CONFIG_SIZE = 256
MAX_QUEUES = 64

# Virtio feature bit 30: the backend speaks the protocol-feature extension. It is the
# transport's, never offered to the guest.
F_PROTOCOL_FEATURES = 1 << 30


class Request(enum.IntEnum):
    """Front-end → back-end requests."""

    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4
    SET_MEM_TABLE = 5
    SET_LOG_BASE = 6
    SET_LOG_FD = 7
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    SEND_RARP = 19
    NET_SET_MTU = 20
    SET_BACKEND_REQ_FD = 21
    IOTLB_MSG = 22
    SET_VRING_ENDIAN = 23
    GET_CONFIG = 24
    SET_CONFIG = 25
    GET_INFLIGHT_FD = 31
    SET_INFLIGHT_FD = 32
    RESET_DEVICE = 34
    GET_MAX_MEM_SLOTS = 36


class ProtocolFeature(enum.IntFlag):
    """VHOST_USER_PROTOCOL_F_* bits (those this implementation knows)."""

    MQ = 1 << 0
    LOG_SHMFD = 1 << 1
    RARP = 1 << 2
    REPLY_ACK = 1 << 3
    MTU = 1 << 4
    BACKEND_REQ = 1 << 5
    CROSS_ENDIAN = 1 << 6
    CONFIG = 1 << 9
    INBAND_NOTIFICATIONS = 1 << 14
    CONFIGURE_MEM_SLOTS = 1 << 15


# Requests whose reply carries data (the others reply only with REPLY_ACK).
REPLIES = {Request.GET_FEATURES, Request.GET_PROTOCOL_FEATURES, Request.GET_QUEUE_NUM,
           Request.GET_VRING_BASE, Request.GET_CONFIG, Request.GET_MAX_MEM_SLOTS}

U64 = struct.Struct("<Q")
VRING_STATE = struct.Struct("<II")            # index, num
VRING_ADDR = struct.Struct("<IIQQQQ")         # index, flags, desc, used, avail, log
MEMORY_HEADER = struct.Struct("<II")          # nregions, padding
MEMORY_REGION = struct.Struct("<QQQQ")        # guest address, size, user address, mmap offset
CONFIG_HEADER = struct.Struct("<III")         # offset, size, flags
VRING_INDEX_MASK = 0xFF
VRING_NOFD = 1 << 8                           # in SET_VRING_KICK/CALL/ERR: no fd attached


class ProtocolError(Exception):
    """A malformed or unexpected vhost-user message."""


class Header(NamedTuple):
    request: int
    flags: int
    size: int

    @property
    def is_reply(self) -> bool:
        return bool(self.flags & FLAG_REPLY)

    @property
    def need_reply(self) -> bool:
        return bool(self.flags & FLAG_NEED_REPLY)


class VringAddr(NamedTuple):
    index: int
    flags: int
    desc: int
    used: int
    avail: int
    log: int


class MemoryRegion(NamedTuple):
    guest_addr: int
    size: int
    user_addr: int
    mmap_offset: int


def encode(request: int, payload: bytes = b"", flags: int = 0) -> bytes:
    """A whole message: header (version 1 plus `flags`) and payload."""
    if len(payload) > MAX_PAYLOAD:
        raise ProtocolError(f"payload of {len(payload)} bytes exceeds {MAX_PAYLOAD}")
    return HEADER.pack(request, VERSION | flags, len(payload)) + payload


def decode_header(data: bytes) -> Header:
    """The header at the start of `data`; its payload size is bounded."""
    if len(data) < HEADER.size:
        raise ProtocolError(f"short header ({len(data)} bytes)")
    header = Header(*HEADER.unpack_from(data))
    if header.flags & VERSION_MASK != VERSION:
        raise ProtocolError(f"unsupported vhost-user version {header.flags & VERSION_MASK}")
    if header.size > MAX_PAYLOAD:
        raise ProtocolError(f"payload size {header.size} exceeds {MAX_PAYLOAD}")
    return header


def _exact(payload: bytes, size: int, what: str) -> None:
    if len(payload) != size:
        raise ProtocolError(f"{what}: payload is {len(payload)} bytes, expected {size}")


def u64(value: int) -> bytes:
    return U64.pack(value)


def decode_u64(payload: bytes, what: str = "u64") -> int:
    _exact(payload, U64.size, what)
    return U64.unpack(payload)[0]


def vring_state(index: int, num: int) -> bytes:
    return VRING_STATE.pack(index, num)


def decode_vring_state(payload: bytes) -> tuple[int, int]:
    _exact(payload, VRING_STATE.size, "vring state")
    index, num = VRING_STATE.unpack(payload)
    if index >= MAX_QUEUES:
        raise ProtocolError(f"vring index {index} out of range")
    return index, num


def vring_addr(addr: VringAddr) -> bytes:
    return VRING_ADDR.pack(*addr)


def decode_vring_addr(payload: bytes) -> VringAddr:
    _exact(payload, VRING_ADDR.size, "vring address")
    addr = VringAddr(*VRING_ADDR.unpack(payload))
    if addr.index >= MAX_QUEUES:
        raise ProtocolError(f"vring index {addr.index} out of range")
    return addr


def vring_fd(index: int, has_fd: bool) -> bytes:
    """SET_VRING_KICK/CALL/ERR's u64: the index, and NOFD when no fd is attached."""
    if not 0 <= index <= VRING_INDEX_MASK:
        raise ProtocolError(f"vring index {index} does not fit the message")
    return U64.pack(index | (0 if has_fd else VRING_NOFD))


def decode_vring_fd(payload: bytes) -> tuple[int, bool]:
    """(index, has_fd); other bits set are an error."""
    value = decode_u64(payload, "vring fd")
    if value & ~(VRING_INDEX_MASK | VRING_NOFD):
        raise ProtocolError(f"vring fd payload {value:#x} has unknown bits")
    index = value & VRING_INDEX_MASK
    if index >= MAX_QUEUES:
        raise ProtocolError(f"vring index {index} out of range")
    return index, not value & VRING_NOFD


def memory_table(regions: list[MemoryRegion]) -> bytes:
    if not 0 < len(regions) <= MAX_MEM_REGIONS:
        raise ProtocolError(f"{len(regions)} memory regions (1 to {MAX_MEM_REGIONS})")
    return MEMORY_HEADER.pack(len(regions), 0) + b"".join(
        MEMORY_REGION.pack(*r) for r in regions)


def decode_memory_table(payload: bytes, nfds: int) -> list[MemoryRegion]:
    """The regions, one fd each (`nfds` received); no region wraps or overlaps another."""
    if len(payload) < MEMORY_HEADER.size:
        raise ProtocolError("memory table: short payload")
    count, _ = MEMORY_HEADER.unpack_from(payload)
    if not 0 < count <= MAX_MEM_REGIONS:
        raise ProtocolError(f"memory table: {count} regions (1 to {MAX_MEM_REGIONS})")
    _exact(payload, MEMORY_HEADER.size + count * MEMORY_REGION.size, "memory table")
    if nfds != count:
        raise ProtocolError(f"memory table: {count} regions but {nfds} fds")
    regions = [MemoryRegion(*MEMORY_REGION.unpack_from(payload, MEMORY_HEADER.size + i * 32))
               for i in range(count)]
    limit = 1 << 64
    for r in regions:
        if r.size == 0 or r.guest_addr + r.size > limit or r.user_addr + r.size > limit \
                or r.mmap_offset + r.size > limit:
            raise ProtocolError(f"memory region {r.guest_addr:#x}+{r.size:#x} is empty or wraps")
    ordered = sorted(regions)
    for a, b in zip(ordered, ordered[1:]):
        if a.guest_addr + a.size > b.guest_addr:
            raise ProtocolError(f"memory regions overlap at {b.guest_addr:#x}")
    return regions


def config(offset: int, data: bytes, flags: int = 0) -> bytes:
    """GET_CONFIG (data: `size` zero bytes) and SET_CONFIG payloads."""
    if len(data) > MAX_CONFIG_SIZE:
        raise ProtocolError(f"config of {len(data)} bytes exceeds {MAX_CONFIG_SIZE}")
    return CONFIG_HEADER.pack(offset, len(data), flags) + data


def decode_config(payload: bytes) -> tuple[int, bytes]:
    """(offset, data) of a GET_CONFIG reply or a SET_CONFIG request."""
    if len(payload) < CONFIG_HEADER.size:
        raise ProtocolError("config: short payload")
    offset, size, _flags = CONFIG_HEADER.unpack_from(payload)
    if size > MAX_CONFIG_SIZE or offset > MAX_CONFIG_SIZE or offset + size > MAX_CONFIG_SIZE:
        raise ProtocolError(f"config range {offset}+{size} exceeds {MAX_CONFIG_SIZE}")
    _exact(payload, CONFIG_HEADER.size + size, "config")
    return offset, payload[CONFIG_HEADER.size:]
