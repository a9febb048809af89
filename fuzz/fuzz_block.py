"""Fuzz target: virtio-blk requests (crosvm/devices/virtio/block.py) on a small raw disk.

Each input makes a disk (size, read-only, sparse, id) in /dev/shm, then posts requests
(any type, sector, data and status buffer layout, segment lists, indirect tables) and
kicks the queue as the worker does. The disk file is compared with a model after
every request. Invariants: nothing escapes; the status byte is OK, IOERR or UNSUPP;
a failed request changes nothing; a write, write-zeroes or discard changes only the
sectors it names; a read returns the disk's bytes; the file never changes size.
"""

from __future__ import annotations

import os
import struct
import tempfile

import atheris

from crosvm.devices.virtio import block as B
from crosvm.devices.virtio.virtio_device import Interrupt
from crosvm.disk import RawDisk

from fuzz import guest

SHM = "/dev/shm" if os.path.isdir("/dev/shm") else None
PATTERN = bytes((i * 7 + 1) & 0xFF for i in range(64 * 512 + 512))
TYPES = [B.T_IN, B.T_OUT, B.T_FLUSH, B.T_GET_ID, B.T_DISCARD, B.T_WRITE_ZEROES]


def _header(fdp: atheris.FuzzedDataProvider, sectors: int) -> bytes:
    if fdp.ConsumeIntInRange(0, 15) == 0:
        return fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 20))
    type_ = TYPES[fdp.ConsumeIntInRange(0, 5)] if fdp.ConsumeIntInRange(0, 7) else fdp.ConsumeIntInRange(0, 0xFFFF_FFFF)
    sector = fdp.ConsumeIntInRange(0, sectors + 2) if fdp.ConsumeIntInRange(0, 7) else fdp.ConsumeIntInRange(0, (1 << 64) - 1)
    return B.HEADER.pack(type_, 0, sector)


def _segments(fdp: atheris.FuzzedDataProvider, sectors: int) -> bytes:
    out = b""
    for _ in range(fdp.ConsumeIntInRange(0, 34)):
        sector = fdp.ConsumeIntInRange(0, sectors + 2) if fdp.ConsumeIntInRange(0, 7) else fdp.ConsumeIntInRange(0, (1 << 64) - 1)
        count = fdp.ConsumeIntInRange(0, 8) if fdp.ConsumeIntInRange(0, 7) else fdp.ConsumeIntInRange(0, 0xFFFF_FFFF)
        flags = fdp.ConsumeIntInRange(0, 1) if fdp.ConsumeIntInRange(0, 7) else fdp.ConsumeIntInRange(0, 0xFFFF_FFFF)
        out += B.SEGMENT.pack(sector, count, flags)
    if fdp.ConsumeIntInRange(0, 15) == 0:
        out += fdp.ConsumeBytes(fdp.ConsumeIntInRange(1, 15))
    return out


def _length(fdp: atheris.FuzzedDataProvider) -> int:
    if fdp.ConsumeIntInRange(0, 3):
        return B.SECTOR_SIZE * fdp.ConsumeIntInRange(0, 8)
    return fdp.ConsumeIntInRange(0, 0x1100)


def _changed_only_in(before: bytes, after: bytes, ranges: list[tuple[int, int]]) -> bool:
    a, b = bytearray(before), bytearray(after)
    for off, n in ranges:
        a[off:off + n] = bytes(len(a[off:off + n]))
        b[off:off + n] = bytes(len(b[off:off + n]))
    return a == b


def one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    mem = guest.clean_memory()
    disk_size = B.SECTOR_SIZE * fdp.ConsumeIntInRange(0, 64) + (fdp.ConsumeIntInRange(0, 511) if fdp.ConsumeIntInRange(0, 7) == 0 else 0)
    read_only, sparse = fdp.ConsumeIntInRange(0, 3) == 0, fdp.ConsumeBool()
    ident = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, B.ID_BYTES)) if fdp.ConsumeBool() else None
    fd, path = tempfile.mkstemp(prefix="crosvm-fuzz-disk-", dir=SHM)
    try:
        os.write(fd, PATTERN[:disk_size])
        os.close(fd)
        disk = RawDisk(path, read_only=read_only, sparse=sparse)
        try:
            _run(fdp, mem, B.Block(disk, id=ident), disk_size)
        finally:
            disk.close()
    finally:
        os.unlink(path)


def _run(fdp, mem, block: B.Block, disk_size: int) -> None:
    sectors = disk_size // B.SECTOR_SIZE
    drv = guest.Driver(mem, 1 << fdp.ConsumeIntInRange(0, 8), base=0x1000, start=0x8000, end=0x40000)
    handle, _ = guest.activate_sync(block, mem, Interrupt(None, None), [(0, drv.q.queue, None)])
    for _ in range(fdp.ConsumeIntInRange(1, 4)):
        header = _header(fdp, sectors)
        readable = [header]
        if len(header) == 16 and B.HEADER.unpack(header)[0] in (B.T_DISCARD, B.T_WRITE_ZEROES) and fdp.ConsumeIntInRange(0, 3):
            readable.append(_segments(fdp, sectors))
        else:
            readable += [fdp.ConsumeBytes(_length(fdp)) for _ in range(fdp.ConsumeIntInRange(0, 3))]
        writable = [_length(fdp) for _ in range(fdp.ConsumeIntInRange(0, 3))]
        writable.append(1 if fdp.ConsumeIntInRange(0, 7) else fdp.ConsumeIntInRange(0, 4))
        stream = b"".join(readable)  # what the device reads: a header, then data
        type_, sector = B.HEADER.unpack(stream[:16])[::2] if len(stream) >= 16 else (None, None)
        head = drv.post(readable, writable, fdp.ConsumeBool())
        if head is None:
            continue
        before = _contents(block)
        while handle(0):
            pass
        after = _contents(block)
        assert os.fstat(block.disk.fd).st_size == disk_size, "the image changed size"
        for _, length, bufs in drv.used():
            bad = not all(readable) or not all(writable) or len(readable) + len(writable) > drv.q.size
            if bad:
                assert length == 0 and after == before, (length, "bad chain touched the disk")
                continue
            total_w = sum(writable)
            assert 1 <= length <= total_w, (length, total_w)
            status = guest.gather(mem, bufs, total_w)[-1]
            assert status in (B.S_OK, B.S_IOERR, B.S_UNSUPP), status
            _check(block, type_, sector, stream[16:], mem, bufs, total_w, status, before, after)


def _contents(block: B.Block) -> bytes:
    return os.pread(block.disk.fd, block.disk.size + 4096, 0)


def _check(block, type_, sector, payload, mem, bufs, total_w, status, before, after) -> None:
    if status != B.S_OK:
        assert after == before, f"request {type_} failed with {status} but changed the disk"
        return
    assert type_ in TYPES, f"request type {type_} succeeded"
    if block.disk.read_only:
        assert type_ in (B.T_IN, B.T_GET_ID), f"request {type_} succeeded on a read-only disk"
    offset = sector * B.SECTOR_SIZE
    if type_ == B.T_OUT:
        assert offset + len(payload) <= len(before), "write past the end succeeded"
        expect = before[:offset] + payload + before[offset + len(payload):]
        assert after == expect, "the write changed other bytes or wrote wrong data"
    elif type_ == B.T_IN:
        got = guest.gather(mem, bufs, total_w)[:-1]
        assert got == before[offset:offset + len(got)] and offset + len(got) <= len(before)
        assert after == before
    elif type_ in (B.T_DISCARD, B.T_WRITE_ZEROES):
        ranges = [(s * B.SECTOR_SIZE, n * B.SECTOR_SIZE)
                  for s, n, _ in B.SEGMENT.iter_unpack(payload)]
        for off, n in ranges:
            assert off + n <= len(before), "a segment past the end succeeded"
            if type_ == B.T_WRITE_ZEROES:
                assert after[off:off + n] == bytes(n), "write-zeroes left data"
        assert _changed_only_in(before, after, ranges), "discard/write-zeroes outside its segments"
    else:
        assert after == before, f"request {type_} changed the disk"
        if type_ == B.T_GET_ID:
            got = guest.gather(mem, bufs, total_w)[:-1]
            want = block.id.ljust(B.ID_BYTES, b"\0")[:len(got)]
            assert got[:len(want)] == want
