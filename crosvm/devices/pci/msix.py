"""MSI-X: the vector table and pending-bit array a PCI device exposes in a BAR.

Each vector is an eventfd registered with KVM as an irqfd on its own GSI; when the
guest programs a table entry, `route(vector, address, data)` points that GSI at the
MSI message (KVM_SET_GSI_ROUTING). Signalling a vector then never enters the VMM.
"""

from __future__ import annotations

import logging
import struct
import threading
from typing import Callable

from crosvm.base import Event

log = logging.getLogger(__name__)

MSIX_TABLE_ENTRY_SIZE = 16
MSG_CTL_ENABLE = 1 << 15
MSG_CTL_FUNCTION_MASK = 1 << 14
VECTOR_MASKED = 1
NO_VECTOR = 0xFFFF  # virtio's VIRTIO_MSI_NO_VECTOR

RouteFn = Callable[[int, int, int], None]


class MsixConfig:
    """Table, PBA and the enable/mask state of one device's MSI-X capability."""

    def __init__(self, num_vectors: int, irqfds: list[Event], route: RouteFn) -> None:
        if not 1 <= num_vectors <= 2048 or len(irqfds) != num_vectors:
            raise ValueError(f"bad MSI-X vector count {num_vectors}")
        self.num_vectors = num_vectors
        self.irqfds = irqfds
        self._route = route
        # (address, data, control); entries start masked, as the spec requires.
        self.table = [[0, 0, VECTOR_MASKED] for _ in range(num_vectors)]
        self.pending = [False] * num_vectors
        self.enabled = False
        self.function_masked = False
        self._lock = threading.Lock()

    @property
    def table_size(self) -> int:
        return self.num_vectors * MSIX_TABLE_ENTRY_SIZE

    @property
    def pba_size(self) -> int:
        return ((self.num_vectors + 63) // 64) * 8

    def capability_body(self, table_bar: int, table_offset: int, pba_bar: int,
                        pba_offset: int) -> bytes:
        """Message control, table offset/BIR, PBA offset/BIR (after id and next)."""
        return struct.pack("<HII", self.num_vectors - 1, table_offset | table_bar,
                           pba_offset | pba_bar)

    def message_control(self) -> int:
        return ((self.num_vectors - 1) | (MSG_CTL_ENABLE if self.enabled else 0)
                | (MSG_CTL_FUNCTION_MASK if self.function_masked else 0))

    def write_message_control(self, value: int) -> None:
        with self._lock:
            self.enabled = bool(value & MSG_CTL_ENABLE)
            self.function_masked = bool(value & MSG_CTL_FUNCTION_MASK)
            self._deliver_pending()

    # -- table / PBA access from the guest ------------------------------------------
    def read_table(self, offset: int, data: memoryview) -> None:
        n = len(data)
        if n not in (4, 8) or offset % n or offset + n > self.table_size:
            data[:] = b"\xff" * n
            return
        with self._lock:
            raw = b"".join(struct.pack("<QII", *self.table[i])
                           for i in range(offset // 16, (offset + n - 1) // 16 + 1))
        start = offset % 16
        data[:] = raw[start:start + n]

    def write_table(self, offset: int, data: bytes | memoryview) -> None:
        n = len(data)
        if n not in (4, 8) or offset % n or offset + n > self.table_size:
            return  # the spec allows only aligned dword/qword accesses
        vector, start = divmod(offset, 16)
        with self._lock:
            entry = self.table[vector]
            raw = bytearray(struct.pack("<QII", *entry))
            raw[start:start + n] = data
            address, msg_data, control = struct.unpack("<QII", raw)
            changed = (address, msg_data) != (entry[0], entry[1])
            was_masked = entry[2] & VECTOR_MASKED
            self.table[vector] = [address, msg_data, control]
            if changed or (was_masked and not control & VECTOR_MASKED):
                self._route(vector, address, msg_data)
            self._deliver_pending()

    def read_pba(self, offset: int, data: memoryview) -> None:
        n = len(data)
        if n not in (4, 8) or offset % n or offset + n > self.pba_size:
            data[:] = b"\xff" * n
            return
        with self._lock:
            bits = sum(1 << i for i, p in enumerate(self.pending) if p)
        data[:] = ((bits >> (offset * 8)) & ((1 << (8 * n)) - 1)).to_bytes(n, "little")

    # -- device side ------------------------------------------------------------
    def _masked(self, vector: int) -> bool:
        return self.function_masked or bool(self.table[vector][2] & VECTOR_MASKED)

    def _deliver_pending(self) -> None:
        if not self.enabled:
            return
        for vector, pending in enumerate(self.pending):
            if pending and not self._masked(vector):
                self.pending[vector] = False
                self.irqfds[vector].signal()

    def trigger(self, vector: int) -> None:
        """Send `vector`, or mark it pending while masked. Unknown vectors are dropped."""
        if not 0 <= vector < self.num_vectors:
            return
        with self._lock:
            if self._masked(vector):
                self.pending[vector] = True
                return
        self.irqfds[vector].signal()

    def reset(self) -> None:
        with self._lock:
            self.enabled = False
            self.function_masked = False
            self.table = [[0, 0, VECTOR_MASKED] for _ in range(self.num_vectors)]
            self.pending = [False] * self.num_vectors
