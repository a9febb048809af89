"""virtio-balloon: PFN and stats parsing, pages really released, stats handed back on
request, and the VMM's adjust request, driven through virtqueue drivers."""

from __future__ import annotations

import select
import struct
import tracemalloc

import pytest

from crosvm.base import Event
from crosvm.devices import control as C
from crosvm.devices.virtio import balloon as BL
from crosvm.devices.virtio.balloon_parse import (MAX_PFN_BYTES, page_ranges, parse_pfns,
                                                 parse_stats, usable_ram)
from crosvm.devices.virtio.driver import QueueDriver
from crosvm.devices.virtio.queue import VIRTQ_DESC_F_WRITE
from crosvm.devices.virtio.virtio_device import Interrupt
from crosvm.vm_control.handlers import RequestError, parse_balloon_command, stats_response
from crosvm.vm_memory import GuestMemory

MEM = 16 << 20
TARGET_PAGE = 0x800  # 8 MiB: away from the drivers' rings and buffers
RESERVED_PAGE = 0xE0  # ACPI tables: in RAM region 0 but not RAM in the e820 map
BIG = 0x400000        # a 1 MiB scratch buffer for oversized chains, below TARGET_PAGE
MARK = b"\xaa" * 4096


class Line:
    def __init__(self) -> None:
        self.trigger = Event()
        self.resample = Event()


def wait_used(drv: QueueDriver, timeout: float = 5.0) -> list[tuple[int, int]]:
    poller = select.poll()
    for _ in range(int(timeout / 0.02)):
        used = drv.used()
        if used:
            return used
        poller.poll(20)
    return []


@pytest.fixture
def mem():
    m = GuestMemory([(0, MEM)])
    yield m
    m.close()


def started(mem, dev):
    dev.ack_features(dev.features())
    drivers = [QueueDriver(mem, 16, base=0x10000 * (i + 1))
               for i in range(len(dev.queue_max_sizes()))]
    kicks = [Event() for _ in drivers]
    dev.activate(mem, Interrupt(None, Line()),
                 [(i, d.queue, k) for i, (d, k) in enumerate(zip(drivers, kicks))])
    return dev, drivers, kicks


@pytest.fixture
def balloon(mem):
    dev, drivers, kicks = started(mem, BL.Balloon())
    yield dev, drivers, kicks
    dev.close()


@pytest.fixture
def reporting_balloon(mem):
    dev, drivers, kicks = started(mem, BL.Balloon(page_reporting=True))
    yield dev, drivers, kicks
    dev.close()


def kick_and_wait(kick: Event, drv: QueueDriver) -> list[tuple[int, int]]:
    kick.signal()
    return wait_used(drv)


def peak_while(action):
    """What `action()` returns, and the peak of Python allocations (all threads, the
    device's worker too) while it ran."""
    tracemalloc.start()
    try:
        result = action()
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_parse_pfns_rejects_partial_pfn():
    with pytest.raises(ValueError, match="multiple of 4"):
        parse_pfns(b"\x01\x00\x00")


def test_page_ranges_merges_contiguous_pages():
    assert page_ranges([1, 2, 3, 7], [(0, 1 << 20)]) == [(0x1000, 0x3000), (0x7000, 0x1000)]


def test_page_ranges_rejects_pfn_past_memory():
    with pytest.raises(ValueError, match="not guest RAM"):
        page_ranges([256], [(0, 1 << 20)])


def test_page_ranges_rejects_pfn_in_a_hole_between_ram_ranges():
    with pytest.raises(ValueError, match="not guest RAM"):
        page_ranges([1, 0xA0], [(0, 0x9F000), (0x100000, 0x100000)])


def test_page_ranges_does_not_merge_across_two_ram_ranges():
    assert page_ranges([1, 2], [(0x1000, 0x1000), (0x2000, 0x1000)]) == [
        (0x1000, 0x1000), (0x2000, 0x1000)]


def test_usable_ram_is_whole_pages_both_listed_and_backed():
    listed = [(0, 0x9FC00), (0x100000, 0xF00000)]

    ram = usable_ram(listed, [(0, 0x1000000)])

    assert ram == [(0, 0x9F000), (0x100000, 0xF00000)]


def test_guest_ram_leaves_out_the_low_memory_the_e820_map_reserves(mem):
    assert BL.guest_ram(mem) == [(0, 0x9F000), (0x100000, MEM - 0x100000)]


def test_parse_stats_names_crosvm_fields_and_skips_unknown_tags():
    data = struct.pack("<HQ", 4, 100) + struct.pack("<HQ", 5, 200) + struct.pack("<HQ", 77, 1)

    assert parse_stats(data + b"\x01") == {"free_memory": 100, "total_memory": 200}


def test_inflate_releases_the_pages_to_zero(balloon, mem):
    dev, (inflate, _, _), kicks = balloon
    mem.write(TARGET_PAGE << 12, b"\xaa" * 8192)

    inflate.add_buffers([struct.pack("<II", TARGET_PAGE, TARGET_PAGE + 1)], [])
    kicks[0].signal()
    used = wait_used(inflate)

    assert used
    assert mem.read(TARGET_PAGE << 12, 8192) == bytes(8192)


def test_inflate_with_a_pfn_outside_memory_releases_nothing(balloon, mem):
    dev, (inflate, _, _), kicks = balloon
    mem.write(TARGET_PAGE << 12, b"\xaa" * 4096)

    inflate.add_buffers([struct.pack("<II", TARGET_PAGE, MEM >> 12)], [])
    kicks[0].signal()
    used = wait_used(inflate)

    assert used
    assert mem.read(TARGET_PAGE << 12, 4096) == b"\xaa" * 4096


def test_inflate_chain_longer_than_the_pfn_bound_is_refused_without_copying_it(balloon, mem):
    dev, (inflate, _, _), kicks = balloon
    mem.write(TARGET_PAGE << 12, MARK)
    mem.write(BIG, struct.pack("<I", TARGET_PAGE) * (0x100000 // 4))
    head = inflate.add_descriptors([(BIG, 0x100000, 0)] * 16)  # 16 MiB, all the same 1 MiB

    used, peak = peak_while(lambda: kick_and_wait(kicks[0], inflate))

    assert used == [(head, 0)]
    assert mem.read(TARGET_PAGE << 12, 4096) == MARK
    assert peak < MAX_PFN_BYTES


def test_deflate_chain_longer_than_the_pfn_bound_is_returned_without_copying_it(balloon, mem):
    dev, (_, deflate, _), kicks = balloon
    head = deflate.add_descriptors([(BIG, 0x100000, 0)] * 16)

    used, peak = peak_while(lambda: kick_and_wait(kicks[1], deflate))

    assert used == [(head, 0)]
    assert peak < MAX_PFN_BYTES


def test_stats_chain_is_read_only_as_far_as_the_stats_bound(balloon, mem):
    dev, (_, _, stats_q), kicks = balloon
    mem.write(BIG, struct.pack("<HQ", 4, 123 << 12) + bytes(0x100000 - 10))
    stats_q.add_descriptors([(BIG, 0x100000, 0)] * 16)

    def stats_once():
        kicks[2].signal()
        for _ in range(250):
            generation, response = stats_response(dev.control(C.CTRL_BALLOON_STATS, 0)[0])
            if generation:
                return response
            select.select([], [], [], 0.02)
        return None

    response, peak = peak_while(stats_once)

    assert response["BalloonStats"]["stats"]["free_memory"] == 123 << 12
    assert peak < 0x100000  # not even one descriptor's worth was copied


def test_inflate_of_reserved_low_memory_releases_nothing(balloon, mem):
    dev, (inflate, _, _), kicks = balloon
    mem.write(RESERVED_PAGE << 12, MARK)

    inflate.add_buffers([struct.pack("<I", RESERVED_PAGE)], [])
    kicks[0].signal()
    used = wait_used(inflate)

    assert len(used) == 1
    assert mem.read(RESERVED_PAGE << 12, 4096) == MARK


def test_inflate_of_the_page_holding_the_ebda_releases_nothing(balloon, mem):
    dev, (inflate, _, _), kicks = balloon
    mem.write(0x9F000, MARK)  # its last KiB is the EBDA (the MP table)

    inflate.add_buffers([struct.pack("<I", 0x9F)], [])
    kicks[0].signal()
    used = wait_used(inflate)

    assert len(used) == 1
    assert mem.read(0x9F000, 4096) == MARK


def test_reported_free_pages_in_writable_buffers_are_released(reporting_balloon, mem):
    dev, drivers, kicks = reporting_balloon
    report = drivers[3]
    mem.write(TARGET_PAGE << 12, MARK * 3)
    head = report.add_descriptors([(TARGET_PAGE << 12, 0x2000, VIRTQ_DESC_F_WRITE),
                               ((TARGET_PAGE + 2) << 12, 0x1000, VIRTQ_DESC_F_WRITE)])

    kicks[3].signal()
    used = wait_used(report)

    assert used == [(head, 0)]
    assert mem.read(TARGET_PAGE << 12, 3 * 4096) == bytes(3 * 4096)


def test_reported_range_in_reserved_low_memory_is_not_released(reporting_balloon, mem):
    dev, drivers, kicks = reporting_balloon
    report = drivers[3]
    mem.write(RESERVED_PAGE << 12, MARK)
    head = report.add_descriptors([(RESERVED_PAGE << 12, 0x1000, VIRTQ_DESC_F_WRITE)])

    kicks[3].signal()
    used = wait_used(report)

    assert used == [(head, 0)]
    assert mem.read(RESERVED_PAGE << 12, 4096) == MARK


def test_reported_range_that_is_not_whole_pages_is_not_released(reporting_balloon, mem):
    dev, drivers, kicks = reporting_balloon
    report = drivers[3]
    mem.write(TARGET_PAGE << 12, MARK * 2)
    report.add_descriptors([((TARGET_PAGE << 12) + 0x800, 0x1000, VIRTQ_DESC_F_WRITE)])

    kicks[3].signal()
    used = wait_used(report)

    assert len(used) == 1
    assert mem.read(TARGET_PAGE << 12, 2 * 4096) == MARK * 2


def test_readable_buffer_on_the_reporting_queue_is_not_released(reporting_balloon, mem):
    dev, drivers, kicks = reporting_balloon
    report = drivers[3]
    mem.write(TARGET_PAGE << 12, MARK)
    report.add_descriptors([(TARGET_PAGE << 12, 0x1000, 0)])

    kicks[3].signal()
    used = wait_used(report)

    assert len(used) == 1
    assert mem.read(TARGET_PAGE << 12, 4096) == MARK


def test_stats_buffer_is_read_then_handed_back_on_request(balloon):
    dev, (_, _, stats_q), kicks = balloon
    stats_q.add_buffers([struct.pack("<HQ", 4, 123 << 12)], [])
    kicks[2].signal()
    generation = 0
    for _ in range(250):
        generation, response = stats_response(dev.control(C.CTRL_BALLOON_STATS, 0)[0])
        if generation:
            break
        select.select([], [], [], 0.02)
    held = stats_q.used()

    dev.control(C.CTRL_BALLOON_STATS, 1)
    handed_back = wait_used(stats_q)

    assert generation == 1
    assert response["BalloonStats"]["stats"]["free_memory"] == 123 << 12
    assert response["BalloonStats"]["stats"]["swap_in"] is None
    assert held == []
    assert len(handed_back) == 1


def test_adjust_sets_num_pages_in_config_and_reports_config_change():
    dev = BL.Balloon()

    payload, changed = dev.control(C.CTRL_BALLOON_ADJUST, 256)

    assert (payload, changed) == (b"", True)
    assert struct.unpack_from("<I", dev.config_bytes())[0] == 256


def test_driver_writes_actual_and_vmm_reads_it():
    dev = BL.Balloon()

    dev.write_config(4, (42).to_bytes(4, "little"))

    assert C.ACTUAL.unpack(dev.control(C.CTRL_BALLOON_ACTUAL, 0)[0]) == (42,)


def test_driver_write_to_num_pages_is_ignored():
    dev = BL.Balloon()

    dev.write_config(0, (42).to_bytes(4, "little"))

    assert struct.unpack_from("<I", dev.config_bytes())[0] == 0


@pytest.mark.parametrize("payload,parsed", [
    ("Stats", ("stats", 0, False)),
    ({"Adjust": {"num_bytes": 4096, "wait_for_success": True}}, ("adjust", 4096, True)),
    ({"Adjust": {"num_bytes": 4096}}, ("adjust", 4096, False))])
def test_balloon_command_shapes_are_parsed(payload, parsed):
    assert parse_balloon_command(payload) == parsed


@pytest.mark.parametrize("payload", ["WorkingSet", {"Adjust": {"num_bytes": -1}},
                                     {"Adjust": {"num_bytes": 1, "wait_for_success": 1}}])
def test_malformed_balloon_command_is_refused(payload):
    with pytest.raises(RequestError):
        parse_balloon_command(payload)


def test_balloon_request_without_balloon_device_names_the_problem():
    from types import SimpleNamespace

    from crosvm.vm_control.handlers import vm_handlers
    vm = SimpleNamespace(balloon_target=None, _exit_request=lambda: "Ok")
    handler = vm_handlers(vm)["BalloonCommand"]

    response = handler({"Adjust": {"num_bytes": 4096, "wait_for_success": False}})

    assert response == {"ErrString": "no balloon device (the VM runs with --no-balloon)"}
