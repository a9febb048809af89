"""The interface every disk image format implements (crosvm's `DiskFile`)."""

from __future__ import annotations

from typing import Sequence


class DiskError(OSError):
    """The disk image cannot be used or an I/O on it failed; the message names why.

    An OSError, so a device turns it into an I/O error status like any other failed I/O."""


class DiskFile:
    """A virtual disk of `size` bytes addressed by byte offset.

    Subclasses implement `read_at`/`write_at` on one buffer; the vectored forms, used by
    virtio-blk with the guest's buffers, walk the buffers in order.
    """

    path: str = ""
    read_only: bool = True
    sparse: bool = False
    size: int = 0

    def get_len(self) -> int:
        """The virtual size in bytes."""
        return self.size

    def fds(self) -> list[int]:
        """Every file descriptor the disk needs (a jailed device keeps exactly these)."""
        return []

    def read_at(self, offset: int, buf: memoryview) -> None:
        """Fill `buf` with the disk's bytes at `offset` (the whole range must be on the disk)."""
        raise NotImplementedError

    def write_at(self, offset: int, buf: memoryview) -> None:
        """Write `buf` at `offset`."""
        raise DiskError(f"{self.path}: the disk is read-only")

    def read_vectored(self, offset: int, views: Sequence[memoryview]) -> int:
        """Fill `views` in order from `offset`; returns the bytes read."""
        done = 0
        for view in views:
            self.read_at(offset + done, view)
            done += len(view)
        return done

    def write_vectored(self, offset: int, views: Sequence[memoryview]) -> int:
        """Write `views` in order at `offset`; returns the bytes written."""
        done = 0
        for view in views:
            self.write_at(offset + done, view)
            done += len(view)
        return done

    def flush(self) -> None:
        """Make every completed write durable."""

    def punch_hole(self, offset: int, length: int) -> None:
        """Deallocate a range; it then reads as zeroes."""
        self.write_zeroes(offset, length)

    def write_zeroes(self, offset: int, length: int) -> None:
        """Make a range read as zeroes."""
        raise DiskError(f"{self.path}: the disk is read-only")

    def set_len(self, size: int) -> None:
        """Resize the disk (only growing is supported by the image formats)."""
        raise DiskError(f"{self.path}: this disk format cannot be resized")

    def close(self) -> None:
        """Release the files; flushes first when writable."""

    def check_range(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise DiskError(f"{self.path}: {length} bytes at {offset} is past the end "
                            f"({self.size} bytes)")
