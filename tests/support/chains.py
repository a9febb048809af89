"""One descriptor chain on plain memory, for request/reply devices' unit tests."""

from __future__ import annotations

from crosvm.devices.virtio.descriptor_utils import Reader, Writer
from crosvm.devices.virtio.queue import DescriptorChain
from crosvm.vm_memory import GuestMemory

REQUEST_AT = 0x1000


def chain_io(mem: GuestMemory, request: bytes, reply_len: int,
             reply_at: int | None = None) -> tuple[Reader, Writer, int]:
    """Put `request` in memory as the readable part of a chain and `reply_len` writable
    bytes after it. Returns the Reader, the Writer and the reply's guest address."""
    if reply_at is None:
        reply_at = (REQUEST_AT + len(request) + 0xFFF) & ~0xFFF
    mem.write(REQUEST_AT, request)
    mem.write(reply_at, bytes(reply_len))
    chain = DescriptorChain(0, [(REQUEST_AT, len(request))] if request else [],
                            [(reply_at, reply_len)] if reply_len else [])
    return Reader(mem, chain), Writer(mem, chain), reply_at
