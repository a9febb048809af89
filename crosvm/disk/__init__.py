"""Disk image backends (crosvm's `disk` crate): raw files for now."""

from crosvm.disk.raw import DiskError, RawDisk

__all__ = ["DiskError", "RawDisk"]
