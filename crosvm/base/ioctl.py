"""ioctl request-number encoding (Linux asm-generic/ioctl.h) and typed ioctl calls."""

from __future__ import annotations

import ctypes
import os

_libc = ctypes.CDLL(None, use_errno=True)
_libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong]
_libc.ioctl.restype = ctypes.c_int

IOC_NONE = 0
IOC_WRITE = 1
IOC_READ = 2

_NRSHIFT = 0
_TYPESHIFT = 8
_SIZESHIFT = 16
_DIRSHIFT = 30


def _ioc(direction: int, type_: int, nr: int, size: int) -> int:
    return (direction << _DIRSHIFT) | (type_ << _TYPESHIFT) | (nr << _NRSHIFT) | (size << _SIZESHIFT)


def io(type_: int, nr: int) -> int:
    """_IO(type, nr)."""
    return _ioc(IOC_NONE, type_, nr, 0)


def ior(type_: int, nr: int, struct: type) -> int:
    """_IOR(type, nr, struct): the size comes from the ctypes type, never by hand."""
    return _ioc(IOC_READ, type_, nr, ctypes.sizeof(struct))


def iow(type_: int, nr: int, struct: type) -> int:
    """_IOW(type, nr, struct)."""
    return _ioc(IOC_WRITE, type_, nr, ctypes.sizeof(struct))


def iowr(type_: int, nr: int, struct: type) -> int:
    """_IOWR(type, nr, struct)."""
    return _ioc(IOC_READ | IOC_WRITE, type_, nr, ctypes.sizeof(struct))


def ioctl_val(fd: int, request: int, arg: int = 0) -> int:
    """ioctl with an integer argument; returns the result or raises OSError.

    Uses libc directly: it releases the GIL, takes 64-bit arguments and does not
    retry on EINTR behind our back.
    """
    ret = _libc.ioctl(fd, request, arg)
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return ret


def ioctl_ref(fd: int, request: int, obj: ctypes.Structure | ctypes.Array | ctypes._SimpleCData) -> int:
    """ioctl passing a pointer to a ctypes object that the kernel may read and fill."""
    return ioctl_val(fd, request, ctypes.addressof(obj))
