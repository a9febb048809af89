"""Fuzz target: virtio-console (crosvm/devices/virtio/console.py), both directions.

Operations interleave host input, receive buffers, transmit chains (with zero-length,
aliased or oversized parts) and kicks of either queue or the input event, driving the
worker's own callbacks synchronously. Invariants: nothing escapes; the host sees
exactly the bytes of the good transmit chains, in order, in pieces no larger than
TRANSMIT_CHUNK; the guest receives a prefix of the host input, in order; the input
buffer stays bounded.
"""

from __future__ import annotations

import hashlib

import atheris

from crosvm.devices.virtio import console as C
from crosvm.devices.virtio.queue import VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT
from crosvm.devices.virtio.virtio_device import Interrupt

from fuzz import guest


class Sink:
    """Host output: a running hash and size, never the bytes (bounded memory)."""

    def __init__(self) -> None:
        self.hash = hashlib.sha256()
        self.total = 0

    def write(self, data: bytes) -> None:
        assert 0 < len(data) <= C.TRANSMIT_CHUNK, len(data)
        self.hash.update(data)
        self.total += len(data)

    def flush(self) -> None:
        pass


def one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    mem = guest.clean_memory()
    sink = Sink()
    console = C.Console(sink)
    rx = guest.Driver(mem, 1 << fdp.ConsumeIntInRange(0, 8), base=0x1000, start=0x8000, end=0x20000)
    tx = guest.Driver(mem, 1 << fdp.ConsumeIntInRange(0, 8), base=0x4000, start=0x20000, end=0x40000)
    handle, extra = guest.activate_sync(console, mem, Interrupt(None, None),
                                        [(C.RECEIVEQ, rx.q.queue, None), (C.TRANSMITQ, tx.q.queue, None)])
    on_input = extra[console.input_ready.fd]
    expect_out = hashlib.sha256()
    expect_total = 0
    host_in = bytearray()
    guest_in = bytearray()
    try:
        for _ in range(fdp.ConsumeIntInRange(1, 24)):
            op = fdp.ConsumeIntInRange(0, 6)
            if op == 0:  # host input (never when it would block: that is back-pressure)
                chunk = fdp.ConsumeBytes(fdp.ConsumeIntInRange(1, 600))
                if chunk and console._in_len < C.INPUT_BUFFER_LIMIT:
                    console.queue_input_bytes(chunk)
                    host_in += chunk
            elif op == 1:  # receive buffers
                sizes = [fdp.ConsumeIntInRange(0, 300) for _ in range(fdp.ConsumeIntInRange(1, 4))]
                rx.post([], sizes, fdp.ConsumeBool())
            elif op == 2:  # a transmit chain
                parts = [fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 5000))
                         for _ in range(fdp.ConsumeIntInRange(1, 4))]
                writable = [fdp.ConsumeIntInRange(0, 16)] if fdp.ConsumeIntInRange(0, 7) == 0 else []
                if tx.post(parts, writable, fdp.ConsumeBool()) is not None:
                    if all(parts) and all(writable) and len(parts) + len(writable) <= tx.q.size:
                        for p in parts:
                            expect_out.update(p)
                        expect_total += sum(map(len, parts))
            elif op == 3:  # an aliased transmit chain: one buffer, many descriptors
                content = fdp.ConsumeBytes(fdp.ConsumeIntInRange(1, 0x4000)) or b"x"
                count = fdp.ConsumeIntInRange(1, tx.q.size + 1)
                if _post_aliased(tx, content, count):
                    for _ in range(count):
                        expect_out.update(content)
                    expect_total += count * len(content)
            elif op == 4:
                while handle(C.TRANSMITQ):
                    pass
            elif op == 5:
                handle(C.RECEIVEQ)
            else:
                console.input_ready.signal()  # a wake-up, spurious or not
                on_input()
            for _, length, bufs in rx.used():
                guest_in += guest.gather(mem, bufs, length)
            tx.used()
            assert guest_in == host_in[:len(guest_in)], "the guest received other bytes"
            assert console._in_len <= C.INPUT_BUFFER_LIMIT + 600, console._in_len
        while handle(C.TRANSMITQ):
            pass
        tx.used()
        assert console._output.flush(5.0), "console output did not drain"
        assert (sink.total, sink.hash.digest()) == (expect_total, expect_out.digest()), \
            "host output differs from the transmitted chains"
    finally:
        console.close()


def _post_aliased(drv: guest.Driver, content: bytes, count: int) -> bool:
    """An indirect table of `count` descriptors that all name one buffer."""
    q = drv.q
    if not drv.room(1, len(content) + 16 * count) or not drv.room(1, 0):
        return False
    buf = q.alloc(len(content))
    q.mem.write(buf, content)
    table = q.alloc(16 * count, 16)
    for i in range(count):
        q.write_desc(i, buf, len(content), VIRTQ_DESC_F_NEXT if i + 1 < count else 0, i + 1,
                     table=table)
    head = q.next_desc
    q.write_desc(head, table, 16 * count, VIRTQ_DESC_F_INDIRECT, 0)
    q.next_desc = (head + 1) % q.size
    q.publish(head)
    drv.outstanding[head] = (1, [])
    drv.in_flight_descs += 1
    return count <= q.size
