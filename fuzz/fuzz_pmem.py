"""Fuzz target: virtio-pmem requests (crosvm/devices/virtio/pmem.py) from a hostile driver.

Each input posts chains (any request bytes: a flush, another type, a short or long
request; response buffers of any size, split or not; zero-length buffers, indirect
tables) on one pmem device over a small file, with a file sync that may fail, and
kicks the queue as the worker does. Invariants: nothing escapes; a chain comes back
with length 4 and a response of OK or EIO, or with length 0 when it is bad or has no
room for the response; OK exactly when the request is a flush (its first four bytes)
and the sync succeeded; the sync runs once per flush request and never otherwise;
the mapped file never changes.
"""

from __future__ import annotations

import os
import struct
import tempfile

import atheris

from crosvm.devices.virtio import pmem as P
from crosvm.devices.virtio.virtio_device import Interrupt

from fuzz import guest

SHM = "/dev/shm" if os.path.isdir("/dev/shm") else None
CONTENT = bytes((i * 13 + 5) & 0xFF for i in range(8192))
_device: P.Pmem | None = None


class _Sync:
    """Replaces the file's fsync: counts calls and fails when told to."""

    def __init__(self) -> None:
        self.calls = 0
        self.fail = False

    def __call__(self) -> None:
        self.calls += 1
        if self.fail:
            raise OSError(5, "Input/output error")


def _pmem() -> P.Pmem:
    """One device per process (a file, a lock and a mapping are not free)."""
    global _device
    if _device is None:
        fd, path = tempfile.mkstemp(prefix="crosvm-fuzz-pmem-", dir=SHM)
        os.write(fd, CONTENT)
        os.close(fd)
        _device = P.Pmem(P.PmemFile(path, read_only=False), 0x1_0000_0000)
        os.unlink(path)  # the fd and the mapping keep it
    return _device


def _request(fdp: atheris.FuzzedDataProvider) -> bytes:
    choice = fdp.ConsumeIntInRange(0, 7)
    if choice < 4:
        return struct.pack("<I", P.REQ_TYPE_FLUSH)
    if choice < 6:
        return struct.pack("<I", fdp.ConsumeIntInRange(0, 0xFFFF_FFFF))
    return fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 12))


def one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    device = _pmem()
    sync = _Sync()
    device.file.sync = sync
    mem = guest.clean_memory()
    drv = guest.Driver(mem, 1 << fdp.ConsumeIntInRange(0, 6), base=0x1000, start=0x8000,
                       end=0x40000)
    handle, _ = guest.activate_sync(device, mem, Interrupt(None, None), [(0, drv.q.queue, None)])
    for _ in range(fdp.ConsumeIntInRange(1, 6)):
        sync.fail = fdp.ConsumeIntInRange(0, 3) == 0
        request = _request(fdp)
        readable = [request] if fdp.ConsumeIntInRange(0, 3) else [request[:2], request[2:]]
        readable += [fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 8))
                     for _ in range(fdp.ConsumeIntInRange(0, 1))]
        writable = [fdp.ConsumeIntInRange(0, 8) for _ in range(fdp.ConsumeIntInRange(0, 3))]
        head = drv.post(readable, writable, fdp.ConsumeBool())
        if head is None:
            continue
        stream = b"".join(readable)
        calls_before = sync.calls
        while handle(0):
            pass
        for _, length, bufs in drv.used():
            bad = not all(readable) or not all(writable) or len(readable) + len(writable) > drv.q.size
            if bad or sum(writable) < P.RESPONSE.size:
                assert length == 0, (length, bad, writable)
                assert sync.calls == calls_before, "a refused chain synced the file"
                continue
            assert length == P.RESPONSE.size, length
            (status,) = struct.unpack("<I", guest.gather(mem, bufs, P.RESPONSE.size))
            is_flush = len(stream) >= 4 and stream[:4] == struct.pack("<I", P.REQ_TYPE_FLUSH)
            assert sync.calls == calls_before + is_flush, "sync count does not match the request"
            assert status == (P.RESP_OK if is_flush and not sync.fail else P.RESP_EIO), (
                status, stream, sync.fail)
    assert bytes(device.file.view()[:len(CONTENT)]) == CONTENT, "the device changed the file"
