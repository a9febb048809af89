"""Disk image formats (crosvm's `disk` crate) behind one interface, `DiskFile`.

`open_disk` picks the format from the file's first bytes: qcow2, Android sparse,
composite, otherwise raw.
"""

from __future__ import annotations

import os

from crosvm.disk.android_sparse import MAGIC_BYTES as SPARSE_MAGIC, AndroidSparseDisk
from crosvm.disk.composite import MAGIC as COMPOSITE_MAGIC, CompositeDisk
from crosvm.disk.disk_file import DiskError, DiskFile
from crosvm.disk.qcow2 import MAGIC as QCOW2_MAGIC, Qcow2Disk
from crosvm.disk.raw import RawDisk, open_locked

MAX_BACKING_DEPTH = 32

__all__ = ["AndroidSparseDisk", "CompositeDisk", "DiskError", "DiskFile", "Qcow2Disk",
           "RawDisk", "detect_format", "open_disk"]


def detect_format(head: bytes) -> str:
    """'qcow2', 'android-sparse', 'composite' or 'raw' from a file's first bytes."""
    if head.startswith(QCOW2_MAGIC):
        return "qcow2"
    if head.startswith(SPARSE_MAGIC):
        return "android-sparse"
    if head.startswith(COMPOSITE_MAGIC):
        return "composite"
    return "raw"


def open_disk(path: str, read_only: bool = False, direct: bool = False, sparse: bool = True,
              format: str | None = None, backing_depth: int = 0,
              seen: frozenset = frozenset()) -> DiskFile:
    """Open `path` as the format its magic says (or `format`), locked as crosvm does.

    `backing_depth` and `seen` (device, inode) pairs bound backing chains and nested
    composites: a loop or a chain deeper than MAX_BACKING_DEPTH is an error."""
    if backing_depth > MAX_BACKING_DEPTH:
        raise DiskError(f"{path}: disk images nest deeper than {MAX_BACKING_DEPTH}")
    fd = open_locked(path, read_only, direct)
    try:
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino) in seen:
            raise DiskError(f"{path}: backing file loop (the image is its own ancestor)")
        seen = seen | {(st.st_dev, st.st_ino)}
        kind = format or detect_format(os.pread(fd, 64, 0))
        if kind not in ("qcow2", "android-sparse", "composite", "raw"):
            raise DiskError(f"{path}: unknown disk format '{kind}'")
    except BaseException:
        os.close(fd)
        raise
    # From here the format's class owns fd (and closes it if the image is bad).
    if kind == "qcow2":
        return Qcow2Disk(path, read_only, sparse, backing_depth, seen, fd=fd)
    if kind == "android-sparse":
        # Read-only like crosvm's: the guest sees a read-only disk.
        return AndroidSparseDisk(path, fd=fd)
    if kind == "composite":
        os.close(fd)
        return CompositeDisk(path, read_only, backing_depth, seen)
    return RawDisk(path, read_only, direct, sparse, fd=fd)
