"""virtio-balloon: PFN and stats parsing, pages really released, stats handed back on
request, and the VMM's adjust request, driven through virtqueue drivers."""

from __future__ import annotations

import select
import struct

import pytest

from crosvm.base import Event
from crosvm.devices import control as C
from crosvm.devices.virtio import balloon as BL
from crosvm.devices.virtio.balloon_parse import page_ranges, parse_pfns, parse_stats
from crosvm.devices.virtio.driver import QueueDriver
from crosvm.devices.virtio.virtio_device import Interrupt
from crosvm.vm_control.handlers import RequestError, parse_balloon_command, stats_response
from crosvm.vm_memory import GuestMemory

MEM = 16 << 20
TARGET_PAGE = 0x800  # 8 MiB: away from the drivers' rings and buffers


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


@pytest.fixture
def balloon(mem):
    dev = BL.Balloon()
    dev.ack_features(dev.features())
    drivers = [QueueDriver(mem, 16, base=0x10000 * (i + 1)) for i in range(3)]
    kicks = [Event() for _ in drivers]
    dev.activate(mem, Interrupt(None, Line()),
                 [(i, d.queue, k) for i, (d, k) in enumerate(zip(drivers, kicks))])
    yield dev, drivers, kicks
    dev.close()


def test_parse_pfns_rejects_partial_pfn():
    with pytest.raises(ValueError, match="multiple of 4"):
        parse_pfns(b"\x01\x00\x00")


def test_page_ranges_merges_contiguous_pages_and_rejects_pfn_past_memory():
    assert page_ranges([1, 2, 3, 7], 1 << 20) == [(0x1000, 0x3000), (0x7000, 0x1000)]
    with pytest.raises(ValueError, match="outside guest memory"):
        page_ranges([256], 1 << 20)


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
