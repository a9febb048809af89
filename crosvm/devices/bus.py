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
    """A sorted set of non-overlapping (base, length, device) ranges.

    Lookups run on every vCPU without a lock: they read one immutable snapshot, which
    changes (a BAR the guest moves) are built beside and swapped in whole.
    """

    def __init__(self) -> None:
        # (bases, entries): read together, replaced together.
        self._table: tuple[tuple[int, ...], tuple[tuple[int, int, BusDevice], ...]] = ((), ())
        self._lock = threading.Lock()

    @staticmethod
    def _check_free(entries: list[tuple[int, int, BusDevice]], device: BusDevice, base: int,
                    length: int) -> int:
        if length <= 0:
            raise BusError(f"{device.debug_label()}: zero-length range at {base:#x}")
        i = bisect.bisect_left([e[0] for e in entries], base)
        if i > 0:
            pbase, plen, pdev = entries[i - 1]
            if pbase + plen > base:
                raise BusError(f"{device.debug_label()} at {base:#x} overlaps "
                               f"{pdev.debug_label()} at {pbase:#x}")
        if i < len(entries) and base + length > entries[i][0]:
            nbase, _, ndev = entries[i]
            raise BusError(f"{device.debug_label()} at {base:#x} overlaps "
                           f"{ndev.debug_label()} at {nbase:#x}")
        return i

    def _publish(self, entries: list[tuple[int, int, BusDevice]]) -> None:
        self._table = (tuple(e[0] for e in entries), tuple(entries))

    def insert(self, device: BusDevice, base: int, length: int) -> None:
        with self._lock:
            entries = list(self._table[1])
            i = self._check_free(entries, device, base, length)
            entries.insert(i, (base, length, device))
            self._publish(entries)

    def _index_of(self, entries: list[tuple[int, int, BusDevice]], base: int) -> int:
        for i, entry in enumerate(entries):
            if entry[0] == base:
                return i
        raise BusError(f"nothing on the bus at {base:#x}")

    def remove(self, base: int) -> BusDevice:
        """Take out the range that starts at `base`."""
        with self._lock:
            entries = list(self._table[1])
            device = entries.pop(self._index_of(entries, base))[2]
            self._publish(entries)
            return device

    def move(self, old_base: int, new_base: int) -> None:
        """Move the range at `old_base` to `new_base` in one step: every lookup sees it
        either at the old place or at the new one (a BAR the guest reprograms)."""
        with self._lock:
            entries = list(self._table[1])
            _, length, device = entries.pop(self._index_of(entries, old_base))
            i = self._check_free(entries, device, new_base, length)
            entries.insert(i, (new_base, length, device))
            self._publish(entries)

    def get_device(self, addr: int) -> tuple[BusDevice, int] | None:
        """The device covering `addr` and the offset into its range, or None."""
        bases, entries = self._table
        i = bisect.bisect_right(bases, addr) - 1
        if i < 0:
            return None
        base, length, device = entries[i]
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
        for _, _, dev in self._table[1]:
            if dev not in seen:
                seen.append(dev)
        return seen
