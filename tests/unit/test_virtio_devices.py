"""virtio-rng and virtio-console workers, driven through a virtqueue driver harness."""

from __future__ import annotations


import pytest

from crosvm.base import Event
from tests.unit.interrupts import Line, wait_signalled
from crosvm.devices.output_buffer import DEFAULT_LIMIT as OUTPUT_LIMIT
from crosvm.devices.virtio.console import Console
from crosvm.devices.virtio.driver import QueueDriver
from crosvm.devices.virtio.rng import Rng
from crosvm.devices.virtio.virtio_device import Interrupt
from crosvm.vm_memory import GuestMemory


@pytest.fixture
def mem():
    m = GuestMemory([(0, 4 << 20)])
    yield m
    m.close()


def test_rng_fills_writable_buffer(mem):
    rng = Rng()
    drv = QueueDriver(mem)
    line, kick = Line(), Event()
    rng.activate(mem, Interrupt(None, line), [(0, drv.queue, kick)])
    try:
        drv.add_buffers([], [64])
        kick.signal()
        assert wait_signalled(line.trigger)
        assert drv.used()[0][1] == 64
    finally:
        rng.close()


class Sink:
    def __init__(self) -> None:
        self.data = b""

    def write(self, data: bytes) -> None:
        self.data += data


def start_console(mem):
    out = Sink()
    console = Console(out)
    rx, tx = QueueDriver(mem, base=0x10000), QueueDriver(mem, base=0x80000)
    tx.data_start = tx.next_free = 0x200000   # keep the two drivers' buffers apart
    line, rx_kick, tx_kick = Line(), Event(), Event()
    console.activate(mem, Interrupt(None, line), [(0, rx.queue, rx_kick), (1, tx.queue, tx_kick)])
    return console, out, rx, tx, line, rx_kick, tx_kick


def test_console_transmit_goes_to_output(mem):
    console, out, _, tx, line, _, tx_kick = start_console(mem)
    try:
        tx.add_buffers([b"hello ", b"hvc"], [])
        tx_kick.signal()
        assert wait_signalled(line.trigger)
        console._output.flush()
        assert out.data == b"hello hvc"
    finally:
        console.close()


def test_console_input_waits_for_receive_buffers(mem):
    console, _, rx, _, line, rx_kick, _ = start_console(mem)
    try:
        console.queue_input_bytes(b"typed")   # before the driver has posted any buffer
        _, (addr,) = rx.add_buffers([], [16])
        rx_kick.signal()
        assert wait_signalled(line.trigger)
        assert (rx.used(), mem.read(addr, 5)) == ([(0, 5)], b"typed")
    finally:
        console.close()


def test_console_input_larger_than_buffer_is_split(mem):
    console, _, rx, _, line, rx_kick, _ = start_console(mem)
    try:
        rx.add_buffers([], [4])
        rx.add_buffers([], [4])
        rx_kick.signal()
        console.queue_input_bytes(b"abcdef")
        assert wait_signalled(line.trigger)
        used = rx.used()
        while len(used) < 2 and wait_signalled(line.trigger, 1.0):
            used += rx.used()
        assert [n for _, n in used] == [4, 2]
    finally:
        console.close()


class ChunkSink:
    def __init__(self) -> None:
        self.total = 0
        self.largest = 0

    def write(self, data: bytes) -> None:
        self.total += len(data)
        self.largest = max(self.largest, len(data))


def test_console_transmit_of_an_aliased_chain_is_streamed_in_bounded_pieces(mem):
    from crosvm.devices.virtio import console as C
    from crosvm.devices.virtio.queue import VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT
    out = ChunkSink()
    console = Console(out)
    rx, tx = QueueDriver(mem, base=0x10000), QueueDriver(mem, base=0x80000)
    alias, alias_len = 0x300000, 0x10000
    n = tx.size  # the longest chain allowed, every descriptor the same 64 KiB
    table = 0x100000
    for i in range(n):
        more = VIRTQ_DESC_F_NEXT if i + 1 < n else 0
        tx.write_desc(i, alias, alias_len, more, i + 1, table=table)
    tx.write_desc(0, table, 16 * n, VIRTQ_DESC_F_INDIRECT, 0)
    tx.publish(0)
    line, rx_kick, tx_kick = Line(), Event(), Event()
    console.activate(mem, Interrupt(None, line), [(0, rx.queue, rx_kick), (1, tx.queue, tx_kick)])
    try:
        assert wait_signalled(line.trigger, 30.0)
        console._output.flush()
        # Host memory held at once: at most the output buffer, never the chain.
        assert (out.total, out.largest <= OUTPUT_LIMIT) == (n * alias_len, True)
    finally:
        console.close()


class BlockedSink:
    def __init__(self) -> None:
        import threading
        self.release = threading.Event()

    def write(self, data: bytes) -> None:
        self.release.wait()


def test_console_reset_with_a_blocked_sink_stops_the_worker(mem):
    sink = BlockedSink()
    console = Console(sink)
    rx, tx = QueueDriver(mem, base=0x10000), QueueDriver(mem, base=0x80000)
    tx.data_start = tx.next_free = 0x200000
    line, rx_kick, tx_kick = Line(), Event(), Event()
    console.activate(mem, Interrupt(None, line), [(0, rx.queue, rx_kick), (1, tx.queue, tx_kick)])
    for _ in range(3):  # more than the output buffer holds: the worker has to wait
        tx.add_buffers([bytes(40_000)], [])
    tx_kick.signal()
    import time
    time.sleep(0.5)

    console.reset()   # WorkerStuck if the worker could not be stopped

    assert console.worker is None
    sink.release.set()
    console.close()


def test_console_receive_rechecks_the_ring_after_arming_avail_event(mem):
    console = Console(Sink())
    rx = QueueDriver(mem, base=0x10000, event_idx=True)
    tx = QueueDriver(mem, base=0x80000, event_idx=True)
    tx.data_start = tx.next_free = 0x200000
    arm = rx.queue.set_avail_event
    posted = []

    def driver_posts_a_buffer_as_the_device_arms(m):
        arm(m)
        if not posted:  # the driver adds a buffer after the device's last look
            posted.append(rx.add_buffers([], [16])[1][0])

    rx.queue.set_avail_event = driver_posts_a_buffer_as_the_device_arms
    line, rx_kick, tx_kick = Line(), Event(), Event()
    console.queue_input_bytes(b"late")
    console.activate(mem, Interrupt(None, line), [(0, rx.queue, rx_kick), (1, tx.queue, tx_kick)])
    try:
        assert wait_signalled(line.trigger)   # no kick was needed
        assert mem.read(posted[0], 4) == b"late"
    finally:
        console.close()
