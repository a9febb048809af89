"""Reader and Writer: sequential, bounds-checked access to a chain's buffers.

They walk only the regions `parse_chain` validated, and move data between files and
guest memory with `os.preadv`/`os.pwritev` on memoryviews of the guest mapping: no
copy through Python objects. Large transfers go in pieces of at most `IO_CHUNK` bytes,
and between pieces the worker's stop request is honoured (`WorkerStopping`), so a
4 GiB request cannot hold up a reset.
"""

from __future__ import annotations

import os
import struct
import threading
from typing import Callable

IO_CHUNK = 1 << 20
IOV_MAX = 1024  # the kernel's limit on buffers per readv/writev

_worker = threading.local()


class WorkerStopping(Exception):
    """The worker serving this request was asked to stop; the request is abandoned
    (the driver is resetting the device)."""


def set_stop_check(check: Callable[[], bool] | None) -> None:
    """Installs, for the calling thread, what says a stop was requested."""
    _worker.check = check


def stop_requested() -> bool:
    """Whether the worker running on this thread was asked to stop."""
    check = getattr(_worker, "check", None)
    return check is not None and check()


def check_stop() -> None:
    if stop_requested():
        raise WorkerStopping()

from crosvm.devices.virtio.queue import DescriptorChain
from crosvm.vm_memory import GuestMemory


class ShortBuffer(IOError):
    """The chain's buffers are smaller than the request needs."""


class _Regions:
    def __init__(self, mem: GuestMemory, regions: list[tuple[int, int]]) -> None:
        self.mem = mem
        self.regions = list(regions)
        self.index = 0   # current region
        self.offset = 0  # offset within it
        self.consumed = 0
        self.remaining = sum(n for _, n in self.regions)

    def available_bytes(self) -> int:
        return self.remaining

    def views(self, count: int) -> list[memoryview]:
        """memoryviews covering the next `count` bytes (not consumed yet; at most
        IOV_MAX of them, so they may cover less)."""
        out = []
        i, off = self.index, self.offset
        while count > 0 and i < len(self.regions) and len(out) < IOV_MAX:
            addr, n = self.regions[i]
            take = min(count, n - off)
            out.append(self.mem.slice(addr + off, take))
            count -= take
            off += take
            if off == n:
                i, off = i + 1, 0
        return out

    def consume(self, count: int) -> None:
        count = min(count, self.remaining)
        self.consumed += count
        self.remaining -= count
        while count > 0 and self.index < len(self.regions):
            n = self.regions[self.index][1]
            take = min(count, n - self.offset)
            self.offset += take
            count -= take
            if self.offset == n:
                self.index, self.offset = self.index + 1, 0

    def transfer(self, count: int, io: Callable[[list[memoryview], int], int]) -> int:
        """Move the next `count` bytes in pieces: `io(views, done)` moves as much of
        `views` as it can and returns that; 0 means the end (a short read)."""
        done = 0
        while done < count:
            check_stop()
            n = io(self.views(min(count - done, IO_CHUNK)), done)
            if n <= 0:
                break
            self.consume(n)
            done += n
        return done

    def split_start(self, count: int) -> list[tuple[int, int]]:
        """Remove the first `count` unconsumed bytes from these regions and return them
        as regions (a reply header written after its payload, say)."""
        if count > self.available_bytes():
            raise ShortBuffer(f"need {count} bytes at the start, have {self.available_bytes()}")
        head: list[tuple[int, int]] = []
        while count > 0:
            addr, n = self.regions[self.index]
            take = min(count, n - self.offset)
            head.append((addr + self.offset, take))
            self.consume(take)
            count -= take
        self.consumed -= sum(n for _, n in head)  # moved out, not consumed here
        return head

    def split_end(self, count: int) -> list[tuple[int, int]]:
        """Remove the last `count` bytes from these regions and return them as regions."""
        if count > self.available_bytes():
            raise ShortBuffer(f"need {count} bytes at the end, have {self.available_bytes()}")
        tail: list[tuple[int, int]] = []
        while count > 0:
            addr, n = self.regions[-1]
            take = min(count, n)
            tail.insert(0, (addr + n - take, take))
            if take == n:
                self.regions.pop()
            else:
                self.regions[-1] = (addr, n - take)
            count -= take
            self.remaining -= take
        return tail


class Reader(_Regions):
    """Reads the readable (driver → device) part of a chain."""

    def __init__(self, mem: GuestMemory, chain: DescriptorChain) -> None:
        super().__init__(mem, chain.readable)

    def read(self, count: int) -> bytes:
        """Exactly `count` bytes, or ShortBuffer."""
        if count > self.available_bytes():
            raise ShortBuffer(f"read of {count} bytes, only {self.available_bytes()} available")
        check_stop()
        data = bytearray()
        while len(data) < count:
            views = self.views(count - len(data))
            for view in views:
                data += view
            self.consume(sum(len(v) for v in views))
        return bytes(data)

    def read_struct(self, fmt: str) -> tuple:
        return struct.unpack(fmt, self.read(struct.calcsize(fmt)))

    def read_all(self) -> bytes:
        return self.read(self.available_bytes())

    def write_to_fd(self, fd: int, count: int, offset: int | None) -> int:
        """Write the next `count` bytes to `fd` (at `offset`, or the file position)."""
        if count > self.available_bytes():
            raise ShortBuffer(f"write of {count} bytes, only {self.available_bytes()} available")

        def write(views: list[memoryview], done: int) -> int:
            n = os.writev(fd, views) if offset is None else os.pwritev(fd, views, offset + done)
            if n <= 0:
                raise OSError("short write")
            return n

        return self.transfer(count, write)


class Writer(_Regions):
    """Writes the writable (device → driver) part of a chain."""

    def __init__(self, mem: GuestMemory, chain: DescriptorChain | None = None,
                 regions: list[tuple[int, int]] | None = None) -> None:
        super().__init__(mem, chain.writable if chain is not None else regions or [])

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if len(data) > self.available_bytes():
            raise ShortBuffer(f"write of {len(data)} bytes, only {self.available_bytes()} available")
        pos = 0
        while pos < len(data):
            views = self.views(len(data) - pos)
            for view in views:
                view[:] = data[pos:pos + len(view)]
                pos += len(view)
            self.consume(sum(len(v) for v in views))

    def read_from_fd(self, fd: int, count: int, offset: int | None) -> int:
        """Fill the next `count` bytes from `fd`; returns bytes read (short at EOF)."""
        if count > self.available_bytes():
            raise ShortBuffer(f"read of {count} bytes, only {self.available_bytes()} available")
        return self.transfer(count, lambda views, done: (
            os.readv(fd, views) if offset is None else os.preadv(fd, views, offset + done)))

    def split_end_writer(self, count: int) -> "Writer":
        """A Writer for the last `count` bytes (a status byte, say), removed from this one."""
        return Writer(self.mem, regions=self.split_end(count))

    def split_start_writer(self, count: int) -> "Writer":
        """A Writer for the next `count` bytes (a header whose length field depends on
        the payload written after it), removed from this one."""
        return Writer(self.mem, regions=self.split_start(count))

    @property
    def bytes_written(self) -> int:
        return self.consumed
