"""A small ACPI Machine Language encoder: the terms crosvm's DSDT needs (ACPI 6.x, 20).

Each function returns the encoded bytes of one term, so tables are built by
composition: `scope(b"\\_SB_", [device(b"PC00", [name(b"_HID", eisa_id("PNP0A08"))])])`.
"""

from __future__ import annotations

import struct


def pkglength(length_of_rest: int) -> bytes:
    """PkgLength encoding: `length_of_rest` excludes the PkgLength bytes themselves."""
    for nbytes in (1, 2, 3, 4):
        total = length_of_rest + nbytes
        if nbytes == 1 and total < 0x40:
            return bytes([total])
        if nbytes > 1 and total < 1 << (4 + 8 * (nbytes - 1)):
            first = ((nbytes - 1) << 6) | (total & 0xF)
            rest = (total >> 4).to_bytes(nbytes - 1, "little")
            return bytes([first]) + rest
    raise ValueError("AML package too long")


def name_string(path: bytes) -> bytes:
    """`\\_SB_.PC00` style paths; each segment is padded to four characters with '_'."""
    prefix = b""
    if path.startswith(b"\\"):
        prefix, path = b"\\", path[1:]
    segs = [s.ljust(4, b"_") for s in path.split(b".")] if path else []
    for s in segs:
        if len(s) != 4:
            raise ValueError(f"bad AML name segment {s!r}")
    if len(segs) == 1:
        return prefix + segs[0]
    if len(segs) == 2:
        return prefix + b"\x2E" + b"".join(segs)
    return prefix + b"\x2F" + bytes([len(segs)]) + b"".join(segs)


def integer(value: int) -> bytes:
    """The shortest integer encoding (ZeroOp, OneOp, Byte/Word/DWord/QWord const)."""
    if value == 0:
        return b"\x00"
    if value == 1:
        return b"\x01"
    for prefix, fmt, limit in ((0x0A, "<B", 1 << 8), (0x0B, "<H", 1 << 16),
                               (0x0C, "<I", 1 << 32), (0x0E, "<Q", 1 << 64)):
        if 0 <= value < limit:
            return bytes([prefix]) + struct.pack(fmt, value)
    raise ValueError(f"integer {value} does not fit AML")


def string(text: str) -> bytes:
    return b"\x0D" + text.encode("ascii") + b"\x00"


def eisa_id(text: str) -> bytes:
    """EISAID("PNP0A08"): three letters compressed to 5 bits each, then 4 hex digits."""
    if len(text) != 7:
        raise ValueError(f"bad EISA id {text!r}")
    vendor = ((ord(text[0]) - 0x40) << 10) | ((ord(text[1]) - 0x40) << 5) | (ord(text[2]) - 0x40)
    product = int(text[3:], 16)
    raw = bytes([vendor >> 8, vendor & 0xFF, product >> 8, product & 0xFF])
    return b"\x0C" + raw


def name(path: bytes, obj: bytes) -> bytes:
    return b"\x08" + name_string(path) + obj


def package(elements: list[bytes]) -> bytes:
    body = bytes([len(elements)]) + b"".join(elements)
    return b"\x12" + pkglength(len(body)) + body


def buffer(data: bytes) -> bytes:
    body = integer(len(data)) + data
    return b"\x11" + pkglength(len(body)) + body


def scope(path: bytes, terms: list[bytes]) -> bytes:
    body = name_string(path) + b"".join(terms)
    return b"\x10" + pkglength(len(body)) + body


def device(path: bytes, terms: list[bytes]) -> bytes:
    body = name_string(path) + b"".join(terms)
    return b"\x5B\x82" + pkglength(len(body)) + body


# -- resource descriptors (ACPI 6.x, 6.4) ---------------------------------------
ADDRESS_FIXED_PRODUCER = 0x0C  # MinFixed | MaxFixed, positive decode, producer
MEM_READ_WRITE = 0x01


def resource_template(descriptors: list[bytes]) -> bytes:
    """A Buffer of resource descriptors ending with an End Tag (checksum 0 = none)."""
    return buffer(b"".join(descriptors) + b"\x79\x00")


def word_bus_number(first: int, last: int) -> bytes:
    return b"\x88" + struct.pack("<HBBBHHHHH", 13, 2, ADDRESS_FIXED_PRODUCER, 0, 0, first,
                                 last, 0, last - first + 1)


def io_port(base: int, length: int) -> bytes:
    """IO(Decode16, base, base, 1, length)."""
    return b"\x47" + struct.pack("<BHHBB", 1, base, base, 1, length)


def dword_memory(base: int, length: int) -> bytes:
    return b"\x87" + struct.pack("<HBBBIIIII", 23, 0, ADDRESS_FIXED_PRODUCER, MEM_READ_WRITE, 0,
                                 base, base + length - 1, 0, length)


def qword_memory(base: int, length: int) -> bytes:
    return b"\x8A" + struct.pack("<HBBBQQQQQ", 43, 0, ADDRESS_FIXED_PRODUCER, MEM_READ_WRITE, 0,
                                 base, base + length - 1, 0, length)


def memory32_fixed(base: int, length: int) -> bytes:
    return b"\x86" + struct.pack("<HBII", 9, 1, base, length)
