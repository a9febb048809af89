"""Split virtqueue parsing and crosvm's defences against a hostile driver."""

from __future__ import annotations

import pytest

from crosvm.devices.virtio.descriptor_utils import Reader, ShortBuffer, Writer
from crosvm.devices.virtio.driver import QueueDriver
from crosvm.devices.virtio.queue import (VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT,
                                         VIRTQ_DESC_F_WRITE, DescriptorError, Queue, QueueConfig,
                                         QueueError, parse_chain)
from crosvm.devices.virtio.virtio_device import process_queue
from crosvm.vm_memory import GuestMemory

MEM_SIZE = 4 << 20


@pytest.fixture
def mem():
    m = GuestMemory([(0, MEM_SIZE)])
    yield m
    m.close()


@pytest.fixture
def drv(mem):
    return QueueDriver(mem, size=16)


def test_pop_returns_readable_then_writable_buffers(mem, drv):
    drv.add_buffers([b"abc", b"de"], [7])
    chain = drv.queue.pop(mem)
    assert (chain.readable_len(), chain.writable_len(), len(chain.readable)) == (5, 7, 2)


def test_pop_on_empty_ring_returns_none(mem, drv):
    assert drv.queue.pop(mem) is None


def test_reader_reads_across_descriptors(mem, drv):
    drv.add_buffers([b"abc", b"def"], [])
    reader = Reader(mem, drv.queue.pop(mem))
    assert reader.read(4) + reader.read(2) == b"abcdef"


def test_reader_short_read_raises(mem, drv):
    drv.add_buffers([b"abc"], [])
    reader = Reader(mem, drv.queue.pop(mem))
    with pytest.raises(ShortBuffer):
        reader.read(4)


def test_writer_writes_across_descriptors(mem, drv):
    _, (a, b) = drv.add_buffers([], [2, 3])
    Writer(mem, drv.queue.pop(mem)).write(b"vwxyz")
    assert mem.read(a, 2) + mem.read(b, 3) == b"vwxyz"


def test_writer_split_end_isolates_last_byte(mem, drv):
    _, (a,) = drv.add_buffers([], [4])
    writer = Writer(mem, drv.queue.pop(mem))
    status = writer.split_end_writer(1)
    status.write(b"S")
    assert (writer.available_bytes(), mem.read(a + 3, 1)) == (3, b"S")


def test_writer_overflow_raises(mem, drv):
    drv.add_buffers([], [2])
    with pytest.raises(ShortBuffer):
        Writer(mem, drv.queue.pop(mem)).write(b"abc")


def test_indirect_chain_is_followed(mem, drv):
    drv.add_buffers([b"hdr"], [5], indirect=True)
    chain = drv.queue.pop(mem)
    assert (chain.readable_len(), chain.writable_len()) == (3, 5)


def _single(drv, mem, addr, length, flags, next_index=0, index=0):
    drv.write_desc(index, addr, length, flags, next_index)
    return lambda: parse_chain(mem, drv.queue.desc_table, drv.size, index)


def test_head_index_out_of_range_is_rejected(mem, drv):
    with pytest.raises(DescriptorError, match="out of range"):
        parse_chain(mem, drv.queue.desc_table, drv.size, drv.size)


def test_next_index_out_of_range_is_rejected(mem, drv):
    parse = _single(drv, mem, drv.alloc(8), 8, VIRTQ_DESC_F_NEXT, next_index=99)
    with pytest.raises(DescriptorError, match="out of range"):
        parse()


def test_descriptor_loop_is_rejected(mem, drv):
    parse = _single(drv, mem, drv.alloc(8), 8, VIRTQ_DESC_F_NEXT, next_index=0)
    with pytest.raises(DescriptorError, match="loop"):
        parse()


def test_readable_after_writable_is_rejected(mem, drv):
    addr = drv.alloc(16)
    drv.write_desc(0, addr, 8, VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT, 1)
    drv.write_desc(1, addr + 8, 8, 0, 0)
    with pytest.raises(DescriptorError, match="readable descriptor after a writable"):
        parse_chain(mem, drv.queue.desc_table, drv.size, 0)


def test_buffer_outside_guest_memory_is_rejected(mem, drv):
    parse = _single(drv, mem, MEM_SIZE - 4, 8, 0)
    with pytest.raises(DescriptorError, match="outside guest memory"):
        parse()


def test_zero_length_descriptor_is_rejected(mem, drv):
    parse = _single(drv, mem, drv.alloc(8), 0, 0)
    with pytest.raises(DescriptorError, match="zero-length"):
        parse()


def test_unknown_descriptor_flag_is_rejected(mem, drv):
    parse = _single(drv, mem, drv.alloc(8), 8, 0x10)
    with pytest.raises(DescriptorError, match="unknown descriptor flags"):
        parse()


def test_chain_longer_than_4gib_is_rejected():
    big = GuestMemory([(0, 0xC000_0000)])  # sparse memfd: nothing is touched
    try:
        drv = QueueDriver(big, size=4)
        for i in range(3):
            drv.write_desc(i, 0, 0x6000_0000, VIRTQ_DESC_F_NEXT if i < 2 else 0, i + 1)
        with pytest.raises(DescriptorError, match="4 GiB"):
            parse_chain(big, drv.queue.desc_table, 4, 0)
    finally:
        big.close()


def test_indirect_chain_longer_than_queue_size_is_rejected(mem, drv):
    # A chain may not have more descriptors than the queue size (virtio 1.x, 2.7.5.3.1);
    # without the cap one kick of 256 such heads walks 8M descriptors (seconds).
    table = drv.alloc(16 * (drv.size + 1), 16)
    buf = drv.alloc(8)
    for i in range(drv.size + 1):
        more = VIRTQ_DESC_F_NEXT if i < drv.size else 0
        drv.write_desc(i, buf, 8, more, i + 1, table=table)
    parse = _single(drv, mem, table, 16 * (drv.size + 1), VIRTQ_DESC_F_INDIRECT)
    with pytest.raises(DescriptorError, match="longer than the queue size"):
        parse()


def test_indirect_chain_of_queue_size_descriptors_is_accepted(mem, drv):
    table = drv.alloc(16 * drv.size, 16)
    buf = drv.alloc(8)
    for i in range(drv.size):
        more = VIRTQ_DESC_F_NEXT if i + 1 < drv.size else 0
        drv.write_desc(i, buf, 8, more, i + 1, table=table)
    parse = _single(drv, mem, table, 16 * drv.size, VIRTQ_DESC_F_INDIRECT)
    assert len(parse().readable) == drv.size


def test_nested_indirect_is_rejected(mem, drv):
    inner = drv.alloc(16, 16)
    table = drv.alloc(16, 16)
    drv.write_desc(0, inner, 16, VIRTQ_DESC_F_INDIRECT, 0, table=table)
    parse = _single(drv, mem, table, 16, VIRTQ_DESC_F_INDIRECT)
    with pytest.raises(DescriptorError, match="indirect descriptor not allowed"):
        parse()


def test_indirect_with_next_is_rejected(mem, drv):
    table = drv.alloc(16, 16)
    parse = _single(drv, mem, table, 16, VIRTQ_DESC_F_INDIRECT | VIRTQ_DESC_F_NEXT, 1)
    with pytest.raises(DescriptorError, match="NEXT"):
        parse()


def test_indirect_table_of_odd_length_is_rejected(mem, drv):
    parse = _single(drv, mem, drv.alloc(24, 16), 24, VIRTQ_DESC_F_INDIRECT)
    with pytest.raises(DescriptorError, match="indirect table length"):
        parse()


def test_bad_chain_is_completed_with_zero_length_and_next_is_served(mem, drv):
    drv.write_desc(5, MEM_SIZE - 4, 8, 0, 0)  # outside guest memory
    drv.publish(5)
    drv.next_desc = 6
    drv.add_buffers([b"ok"], [])
    chain = drv.queue.pop(mem)
    assert (drv.used(), chain.readable_len()) == ([(5, 0)], 2)


def test_available_index_jump_beyond_queue_size_breaks_the_queue(mem, drv):
    mem.write_int(drv.queue.avail_ring + 2, drv.size + 1, 2)

    with pytest.raises(QueueError, match="jumped by 17"):
        drv.queue.pop(mem)


def test_available_head_outside_the_table_breaks_the_queue(mem, drv):
    drv.publish(drv.size)  # a head index one past the descriptor table

    with pytest.raises(QueueError, match="outside the table"):
        drv.queue.pop(mem)


def test_pop_completes_at_most_a_ring_of_bad_chains_per_call(mem, drv):
    drv.write_desc(0, 0, 0, 0, 0)  # zero length: a bad chain
    for _ in range(drv.size):
        drv.publish(0)

    chain = drv.queue.pop(mem)

    assert (chain, len(drv.used())) == (None, drv.size)


def test_queue_size_must_be_power_of_two():
    with pytest.raises(ValueError):
        Queue(100)


def test_queue_ring_outside_memory_is_invalid(mem):
    config = QueueConfig(16)
    config.ready = True
    config.used_ring = MEM_SIZE - 8

    assert not config.is_valid(mem, event_idx=False)


def test_activated_queue_is_a_copy_the_transport_cannot_change(mem):
    config = QueueConfig(16)
    config.desc_table, config.avail_ring, config.used_ring = 0x1000, 0x2000, 0x3000
    live = config.activate(event_idx=True)

    config.desc_table = 0x9000
    config.reset()

    assert (live.desc_table, live.avail_ring, live.used_ring, live.event_idx) == (
        0x1000, 0x2000, 0x3000, True)


class Counter:
    def __init__(self):
        self.vectors = []

    def signal_used_queue(self, vector):
        self.vectors.append(vector)


def test_process_queue_interrupts_for_a_bad_chain_alone(mem, drv):
    drv.write_desc(0, MEM_SIZE - 4, 8, 0, 0)  # outside guest memory
    drv.publish(0)
    irq = Counter()

    process_queue(mem, drv.queue, irq, lambda chain: 0)

    assert (drv.used(), len(irq.vectors)) == ([(0, 0)], 1)


def test_process_queue_stops_at_its_budget_and_reports_more(mem, drv):
    for _ in range(5):
        drv.add_buffers([b"x"], [])
    served = []

    more = process_queue(mem, drv.queue, Counter(), lambda c: served.append(c) or 0, budget=3)

    assert (more, len(served)) == (True, 3)


def test_process_queue_reports_no_more_once_the_ring_is_empty(mem, drv):
    for _ in range(2):
        drv.add_buffers([b"x"], [])

    more = process_queue(mem, drv.queue, Counter(), lambda c: 0, budget=3)

    assert more is False


def test_process_queue_rechecks_the_ring_after_arming_avail_event(mem):
    drv = QueueDriver(mem, size=16, event_idx=True)
    queue = drv.queue
    arm = queue.set_avail_event
    raced = []

    def driver_adds_a_buffer_as_the_device_arms(m):
        arm(m)
        if not raced:  # the driver publishes after the device's last look
            raced.append(drv.add_buffers([b"late"], []))

    queue.set_avail_event = driver_adds_a_buffer_as_the_device_arms
    drv.add_buffers([b"first"], [])
    served = []

    process_queue(mem, queue, Counter(), lambda c: served.append(c.readable_len()) or 0)

    assert served == [5, 4]


def test_add_used_publishes_element_and_index(mem, drv):
    drv.queue.add_used(mem, 3, 42)
    assert drv.used() == [(3, 42)]


def test_no_interrupt_flag_suppresses_interrupt(mem, drv):
    mem.write_int(drv.queue.avail_ring, 1, 2)  # VIRTQ_AVAIL_F_NO_INTERRUPT
    drv.queue.add_used(mem, 0, 0)
    assert not drv.queue.needs_interrupt(mem)


def test_event_idx_interrupts_only_when_used_event_is_crossed(mem):
    drv = QueueDriver(mem, size=16, event_idx=True)
    q = drv.queue
    drv.set_used_event(1)          # the driver wants an interrupt after the 2nd buffer
    q.add_used(mem, 0, 0)
    first = q.needs_interrupt(mem)  # nothing signalled yet: always interrupt once
    q.add_used(mem, 1, 0)
    second = q.needs_interrupt(mem)
    q.add_used(mem, 2, 0)
    third = q.needs_interrupt(mem)
    assert (first, second, third) == (True, True, False)


def test_event_idx_publishes_avail_event(mem):
    drv = QueueDriver(mem, size=16, event_idx=True)
    drv.add_buffers([b"x"], [])
    drv.queue.pop(mem)
    drv.queue.set_avail_event(mem)
    assert mem.read_int(drv.queue.used_ring + 4 + 8 * 16, 2) == 1


def test_chain_is_copied_once_so_later_table_edits_are_not_seen(mem, drv):
    head, _ = drv.add_buffers([b"abcd"], [])
    chain = drv.queue.pop(mem)
    drv.write_desc(head, 0, 1, 0, 0)
    assert chain.readable == [(chain.readable[0][0], 4)]
