"""Bus: maps I/O-port or MMIO address ranges to devices, with crosvm's semantics.

A device owns one or more ranges; an access is dispatched to the device whose range
contains the address, with the offset from that range's base. Ranges never overlap.
"""

from __future__ import annotations

import bisect
import threading


class BusError(Exception):
    """A range could not be inserted (zero length or overlap)."""


class BusDevice:
    """Base class: a device reached through a Bus. Accesses outside it are ignored."""

    # The seccomp policy file (seccomp/x86_64/<name>.policy) for its sandboxed process.
    seccomp_policy: str | None = None

    def debug_label(self) -> str:
        return type(self).__name__

    def read(self, offset: int, address: int, data: memoryview) -> None:
        """Fill `data` (1-8 bytes) with the value at `offset` from the range's base
        (`address` is the absolute one, for devices that own several ranges)."""

    def write(self, offset: int, address: int, data: bytes | memoryview) -> None:
        """Handle a guest write of `data` at `offset` (absolute `address`)."""


class Bus:
    """A sorted set of non-overlapping (base, length, device) ranges."""

    def __init__(self) -> None:
        self._bases: list[int] = []
        self._entries: list[tuple[int, int, BusDevice]] = []
        self._lock = threading.Lock()

    def insert(self, device: BusDevice, base: int, length: int) -> None:
        if length <= 0:
            raise BusError(f"{device.debug_label()}: zero-length range at {base:#x}")
        with self._lock:
            i = bisect.bisect_left(self._bases, base)
            if i > 0:
                pbase, plen, pdev = self._entries[i - 1]
                if pbase + plen > base:
                    raise BusError(f"{device.debug_label()} at {base:#x} overlaps "
                                   f"{pdev.debug_label()} at {pbase:#x}")
            if i < len(self._entries) and base + length > self._entries[i][0]:
                nbase, _, ndev = self._entries[i]
                raise BusError(f"{device.debug_label()} at {base:#x} overlaps "
                               f"{ndev.debug_label()} at {nbase:#x}")
            self._bases.insert(i, base)
            self._entries.insert(i, (base, length, device))

    def remove(self, base: int) -> BusDevice:
        """Take out the range that starts at `base` (a BAR the guest moves)."""
        with self._lock:
            i = bisect.bisect_left(self._bases, base)
            if i == len(self._bases) or self._bases[i] != base:
                raise BusError(f"nothing on the bus at {base:#x}")
            del self._bases[i]
            return self._entries.pop(i)[2]

    def get_device(self, addr: int) -> tuple[BusDevice, int] | None:
        """The device covering `addr` and the offset into its range, or None."""
        i = bisect.bisect_right(self._bases, addr) - 1
        if i < 0:
            return None
        base, length, device = self._entries[i]
        if addr < base + length:
            return device, addr - base
        return None

    def read(self, addr: int, data: memoryview) -> bool:
        """Dispatch a read; returns False (data untouched) when nothing is there."""
        found = self.get_device(addr)
        if found is None:
            return False
        found[0].read(found[1], addr, data)
        return True

    def write(self, addr: int, data: bytes | memoryview) -> bool:
        found = self.get_device(addr)
        if found is None:
            return False
        found[0].write(found[1], addr, data)
        return True

    def devices(self) -> list[BusDevice]:
        seen: list[BusDevice] = []
        for _, _, dev in self._entries:
            if dev not in seen:
                seen.append(dev)
        return seen
