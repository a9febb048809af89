"""Composite disks: crosvm's format for one disk made of several files, and the GPT
images `crosvm create_composite` builds with it.

The file is the magic `composite_disk\\x1d` followed by a protobuf `CompositeDisk`
message: version (1), repeated component_disks (2: file_path 1, offset 2,
read_write_capability 3 with 0 read-only / 1 read-write) and length (3).
"""

from __future__ import annotations

import bisect
import os
import struct
import zlib

from crosvm.disk.disk_file import DiskError, DiskFile

MAGIC = b"composite_disk\x1d"
VERSION = 2
MAX_DESCRIPTOR_BYTES = 1 << 20
MAX_COMPONENTS = 1024
READ_ONLY, READ_WRITE = 0, 1

SECTOR = 512
GPT_ENTRIES = 128
GPT_ENTRY_SIZE = 128
GPT_ENTRIES_BYTES = GPT_ENTRIES * GPT_ENTRY_SIZE          # 32 sectors
PARTITION_ALIGN = 4096
HEADER_BYTES = -(-(2 * SECTOR + GPT_ENTRIES_BYTES) // PARTITION_ALIGN) * PARTITION_ALIGN
FOOTER_BYTES = GPT_ENTRIES_BYTES + SECTOR
# The GPT type GUID 0FC63DAF-8483-4772-8E79-3D69D8477DE4 in its on-disk byte order.
LINUX_FILESYSTEM_LE = bytes.fromhex("AF3DC60F838472478E793D69D8477DE4")


# -- protobuf (the few wire types the message uses) -----------------------------------
def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        b = value & 0x7F
        value >>= 7
        if value:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _field(number: int, value: int | bytes) -> bytes:
    if isinstance(value, int):
        return _varint(number << 3) + _varint(value)
    return _varint(number << 3 | 2) + _varint(len(value)) + value


def _fields(data: bytes) -> list[tuple[int, int | bytes]]:
    """(field number, varint or bytes) for each field of one message."""
    out: list[tuple[int, int | bytes]] = []
    pos = 0

    def varint() -> int:
        nonlocal pos
        value = shift = 0
        while True:
            if pos >= len(data) or shift > 63:
                raise ValueError("truncated or overlong varint")
            b = data[pos]
            pos += 1
            value |= (b & 0x7F) << shift
            shift += 7
            if not b & 0x80:
                return value

    while pos < len(data):
        key = varint()
        number, wire = key >> 3, key & 7
        if wire == 0:
            out.append((number, varint()))
        elif wire == 2:
            n = varint()
            if pos + n > len(data):
                raise ValueError("field runs past the message")
            out.append((number, data[pos:pos + n]))
            pos += n
        elif wire in (1, 5):
            pos += 8 if wire == 1 else 4
        else:
            raise ValueError(f"unsupported wire type {wire}")
    return out


def encode_composite(components: list[tuple[str, int, bool]], length: int) -> bytes:
    """The composite file for `components` (path, offset, writable) and total `length`."""
    body = _field(1, VERSION)
    for path, offset, writable in components:
        msg = _field(1, path.encode()) + _field(2, offset) + \
            _field(3, READ_WRITE if writable else READ_ONLY)
        body += _field(2, msg)
    return MAGIC + body + _field(3, length)


def decode_composite(data: bytes) -> tuple[int, list[tuple[str, int, bool]], int]:
    """(version, [(path, offset, writable)], length) from a composite file's bytes."""
    if not data.startswith(MAGIC):
        raise ValueError("bad magic")
    version, length, comps = 0, 0, []
    for number, value in _fields(data[len(MAGIC):]):
        if number == 1 and isinstance(value, int):
            version = value
        elif number == 3 and isinstance(value, int):
            length = value
        elif number == 2 and isinstance(value, bytes):
            if len(comps) >= MAX_COMPONENTS:
                raise ValueError(f"more than {MAX_COMPONENTS} components")
            path, offset, rw = "", 0, READ_ONLY
            for n, v in _fields(value):
                if n == 1 and isinstance(v, bytes):
                    path = v.decode()
                elif n == 2 and isinstance(v, int):
                    offset = v
                elif n == 3 and isinstance(v, int):
                    rw = v
            comps.append((path, offset, rw == READ_WRITE))
    return version, comps, length


class CompositeDisk(DiskFile):
    """Several disks at fixed offsets of one; gaps read as zeroes."""

    def __init__(self, path: str, read_only: bool = False, depth: int = 0,
                 seen: frozenset = frozenset()) -> None:
        from crosvm.disk import open_disk
        self.path = path
        self.read_only = read_only
        self.parts: list[tuple[int, DiskFile]] = []
        try:
            with open(path, "rb") as f:
                data = f.read(MAX_DESCRIPTOR_BYTES + 1)
        except OSError as e:
            raise DiskError(f"failed to open composite disk {path}: {e.strerror}") from e
        if len(data) > MAX_DESCRIPTOR_BYTES:
            raise self._err("the descriptor is larger than 1 MiB")
        try:
            version, comps, length = decode_composite(data)
        except (ValueError, UnicodeDecodeError) as e:
            raise self._err(f"corrupt descriptor: {e}") from None
        if not 1 <= version <= VERSION:
            raise self._err(f"version {version} is not supported")
        base = os.path.dirname(path) or "."
        end = 0
        try:
            for comp_path, offset, writable in comps:
                if offset < end:
                    raise self._err(f"component {comp_path} overlaps the one before")
                full = comp_path if os.path.isabs(comp_path) else os.path.join(base, comp_path)
                disk = open_disk(full, read_only=read_only or not writable,
                                 backing_depth=depth + 1, seen=seen)
                self.parts.append((offset, disk))
                end = offset + disk.size
            if end > length:
                raise self._err(f"components end at {end}, past the length {length}")
        except BaseException:
            self.close()
            raise
        self.starts = [o for o, _ in self.parts]
        self.size = length
        self.sparse = False

    def _err(self, why: str) -> DiskError:
        return DiskError(f"composite disk {self.path}: {why}")

    def fds(self) -> list[int]:
        return [fd for _, d in self.parts for fd in d.fds()]

    def _walk(self, offset: int, length: int):
        """(disk or None, offset in it, start in the request, bytes) covering the range."""
        self.check_range(offset, length)
        done = 0
        while done < length:
            pos = offset + done
            i = bisect.bisect_right(self.starts, pos) - 1
            if i >= 0 and pos < self.parts[i][0] + self.parts[i][1].size:
                start, disk = self.parts[i]
                n = min(length - done, start + disk.size - pos)
                yield disk, pos - start, done, n
            else:
                nxt = self.starts[i + 1] if i + 1 < len(self.starts) else self.size
                n = min(length - done, nxt - pos)
                yield None, 0, done, n
            done += n

    def read_at(self, offset: int, buf: memoryview) -> None:
        for disk, at, start, n in self._walk(offset, len(buf)):
            if disk is None:
                buf[start:start + n] = bytes(n)
            else:
                disk.read_at(at, buf[start:start + n])

    def write_at(self, offset: int, buf: memoryview) -> None:
        for disk, at, start, n in self._walk(offset, len(buf)):
            if disk is None or disk.read_only:
                raise self._err(f"write at {offset + start} is on a read-only part")
            disk.write_at(at, buf[start:start + n])

    def write_zeroes(self, offset: int, length: int) -> None:
        for disk, at, start, n in self._walk(offset, length):
            if disk is None or disk.read_only:
                raise self._err(f"write at {offset + start} is on a read-only part")
            disk.write_zeroes(at, n)

    def flush(self) -> None:
        for _, d in self.parts:
            if not d.read_only:
                d.flush()

    def close(self) -> None:
        for _, d in self.parts:
            d.close()
        self.parts = []


# -- create_composite ----------------------------------------------------------------
def _gpt_header(current: int, backup: int, first: int, last: int, disk_guid: "uuid.UUID",
                entries_lba: int, entries_crc: int) -> bytes:
    fields = [b"EFI PART", 0x00010000, 92, 0, 0, current, backup, first, last,
              disk_guid.bytes_le, entries_lba, GPT_ENTRIES, GPT_ENTRY_SIZE, entries_crc]
    fmt = "<8sIIIIQQQQ16sQIII"
    crc = zlib.crc32(struct.pack(fmt, *fields))
    fields[3] = crc
    return struct.pack(fmt, *fields).ljust(SECTOR, b"\0")


def create_composite(path: str, partitions: list[tuple[str, str, bool]]) -> None:
    """Write a composite disk at `path` with a GPT holding `partitions` (label, file,
    writable); the GPT lives in `<path minus extension>.header` and `.footer` files."""
    import uuid  # only when creating: uuid imports platform, which `run` never needs
    stem = os.path.splitext(path)[0]
    header_path, footer_path = stem + ".header", stem + ".footer"
    entries = bytearray()
    components: list[tuple[str, int, bool]] = []
    offset = HEADER_BYTES
    for label, part, writable in partitions:
        try:
            size = os.stat(part).st_size
        except OSError as e:
            raise DiskError(f"partition {part}: {e.strerror}") from e
        if size == 0 or size % SECTOR:
            raise DiskError(f"partition {part}: size {size} is not a positive multiple of 512")
        name = label.encode("utf-16-le")
        if len(name) > 72:
            raise DiskError(f"partition label '{label}' is longer than 36 characters")
        entries += struct.pack("<16s16sQQQ72s", LINUX_FILESYSTEM_LE, uuid.uuid4().bytes_le,
                               offset // SECTOR, (offset + size) // SECTOR - 1, 0, name)
        components.append((os.path.abspath(part), offset, writable))
        offset = -(-(offset + size) // PARTITION_ALIGN) * PARTITION_ALIGN
    if len(partitions) > GPT_ENTRIES:
        raise DiskError(f"at most {GPT_ENTRIES} partitions fit in the GPT")
    entries = bytes(entries.ljust(GPT_ENTRIES_BYTES, b"\0"))
    footer_offset = offset
    total = footer_offset + FOOTER_BYTES
    sectors = total // SECTOR
    disk_guid = uuid.uuid4()
    crc = zlib.crc32(entries)
    first_usable, last_usable = HEADER_BYTES // SECTOR, footer_offset // SECTOR - 1
    mbr = bytearray(SECTOR)
    mbr[446:462] = struct.pack("<B3sB3sII", 0, b"\x00\x02\x00", 0xEE, b"\xff\xff\xff", 1,
                               min(sectors - 1, 0xFFFFFFFF))
    mbr[510:512] = b"\x55\xaa"
    primary = _gpt_header(1, sectors - 1, first_usable, last_usable, disk_guid, 2, crc)
    backup = _gpt_header(sectors - 1, 1, first_usable, last_usable, disk_guid,
                         footer_offset // SECTOR, crc)
    with open(header_path, "wb") as f:
        f.write((bytes(mbr) + primary + entries).ljust(HEADER_BYTES, b"\0"))
    with open(footer_path, "wb") as f:
        f.write(entries + backup)
    components = [(os.path.abspath(header_path), 0, False)] + components + \
        [(os.path.abspath(footer_path), footer_offset, False)]
    with open(path, "wb") as f:
        f.write(encode_composite(components, total))
