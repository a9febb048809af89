"""Bus: base-address lookup, one device per range."""

import pytest

from crosvm.devices.bus import Bus, BusDevice, BusError


class Recorder(BusDevice):
    def __init__(self):
        self.writes = []

    def read(self, offset, address, data):
        data[0] = offset

    def write(self, offset, address, data):
        self.writes.append((offset, address, bytes(data)))


def test_lookup_returns_device_and_offset_from_base():
    bus = Bus()
    dev = Recorder()
    bus.insert(dev, 0x3F8, 8)

    assert bus.get_device(0x3FD) == (dev, 5)


def test_address_past_range_is_unclaimed():
    bus = Bus()
    bus.insert(Recorder(), 0x3F8, 8)

    assert bus.get_device(0x400) is None
    assert bus.get_device(0x3F7) is None


def test_overlapping_insert_is_rejected():
    bus = Bus()
    bus.insert(Recorder(), 0x100, 0x10)

    with pytest.raises(BusError, match="overlaps"):
        bus.insert(Recorder(), 0x108, 0x10)


def test_insert_below_that_reaches_into_next_range_is_rejected():
    bus = Bus()
    bus.insert(Recorder(), 0x100, 0x10)

    with pytest.raises(BusError, match="overlaps"):
        bus.insert(Recorder(), 0xF8, 0x10)


def test_zero_length_range_is_rejected():
    with pytest.raises(BusError, match="zero-length"):
        Bus().insert(Recorder(), 0x100, 0)


def test_adjacent_ranges_are_allowed_and_dispatch_separately():
    bus = Bus()
    a, b = Recorder(), Recorder()
    bus.insert(a, 0x100, 0x10)
    bus.insert(b, 0x110, 0x10)

    bus.write(0x110, b"\x01")

    assert b.writes == [(0, 0x110, b"\x01")]
    assert a.writes == []


def test_read_of_unclaimed_address_reports_false():
    data = bytearray(b"\x55")

    assert Bus().read(0x80, memoryview(data)) is False
    assert data == b"\x55"
