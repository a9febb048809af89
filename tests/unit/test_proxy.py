"""ProxyDevice: forwarding over the socket, actions coming back, a dying device (no jail)."""

from __future__ import annotations

import os

from crosvm.devices.bus import BusDevice
from crosvm.devices.pci.config import PciConfiguration
from crosvm.devices.pci.device import PciDevice
from crosvm.devices.proxy import BusProxy, DeviceProcess, HostRequests, PciProxy


class Echo(BusDevice):
    """Remembers the last write; reads return it; offset 7 kills the process."""

    def __init__(self) -> None:
        self.last = b"\x00"

    def read(self, offset, address, data):
        if offset == 7:
            os._exit(3)
        data[:] = (self.last * len(data))[:len(data)]

    def write(self, offset, address, data):
        self.last = bytes(data[:1])


class RoutingDevice(PciDevice):
    """A BAR write asks the VMM for an MSI route, as virtio-pci's MSI-X table does."""

    def __init__(self, host: HostRequests) -> None:
        self.host = host
        self.config = PciConfiguration(0x1234, 0x5678, 0xFF, 0)

    def write_bar(self, index, offset, data):
        self.host.set_msi_route(offset, 0xFEE0_0000, int.from_bytes(data, "little"))


def spawn(device, host=None):
    host = host or HostRequests()
    return DeviceProcess(device, "test_dev", [], None, host), host


def test_bus_write_then_read_crosses_process():
    proc, host = spawn(Echo())
    proxy = BusProxy(proc, "echo", host, lambda why: None)
    try:
        proxy.write(0, 0x3F8, b"\x5a")
        data = memoryview(bytearray(2))
        proxy.read(0, 0x3F8, data)
        assert bytes(data) == b"\x5a\x5a"
    finally:
        proc.shutdown()
        proc.reap()


def test_pci_config_read_is_served_by_child():
    device = RoutingDevice(HostRequests())
    proc, host = spawn(device, device.host)
    proxy = PciProxy(proc, device, host, lambda why: None)
    try:
        assert proxy.read_config_register(0) == 0x5678_1234
    finally:
        proc.shutdown()
        proc.reap()


def test_route_request_from_child_reaches_vmm():
    routes = []
    parent_host = HostRequests(route=lambda *a: routes.append(a))
    device = RoutingDevice(HostRequests())
    proc, _ = spawn(device, device.host)
    proxy = PciProxy(proc, device, parent_host, lambda why: None)
    try:
        proxy.write_bar(0, 3, (0x41).to_bytes(4, "little"))
        assert routes == [(3, 0xFEE0_0000, 0x41)]
    finally:
        proc.shutdown()
        proc.reap()


def test_dead_device_reports_death_and_reads_float():
    deaths = []
    proc, host = spawn(Echo())
    proxy = BusProxy(proc, "echo", host, deaths.append)
    data = memoryview(bytearray(1))
    proxy.read(7, 0x3F8, data)
    status = proc.reap()
    assert (len(deaths), bytes(data), os.waitstatus_to_exitcode(status)) == (1, b"\xff", 3)


def test_parse_reply_returns_data_and_actions():
    from crosvm.devices.proxy import ACTION_ROUTE, REPLY, parse_reply
    reply = REPLY.pack(0, 1) + bytes([2]) + b"ab" + ACTION_ROUTE.pack(1, 3, 0xFEE0_0000, 7)

    out, actions = parse_reply(reply)

    assert (out, len(actions)) == (b"ab", 1)


def test_parse_reply_rejects_what_a_compromised_child_might_send():
    import pytest as _pytest
    from crosvm.devices.proxy import ACTION_ROUTE, REPLY, DeviceDied, parse_reply
    bad = {
        "short": b"\x00",
        "bad status": REPLY.pack(1, 0) + b"\x00",
        "data past the end": REPLY.pack(0, 0) + bytes([9]) + b"ab",
        "unknown action kind": REPLY.pack(0, 1) + b"\x00" + b"\x07" * ACTION_ROUTE.size,
        "truncated action": REPLY.pack(0, 1) + b"\x00" + ACTION_ROUTE.pack(1, 0, 0, 0)[:5],
        "trailing bytes": REPLY.pack(0, 0) + b"\x00" + b"junk",
    }
    rejected = []
    for name, reply in bad.items():
        with _pytest.raises(DeviceDied):
            parse_reply(reply)
        rejected.append(name)

    assert rejected == list(bad)


class Stuck(BusDevice):
    """A device whose reads never finish (its host sink is blocked, say)."""

    def read(self, offset, address, data):
        import time
        time.sleep(60)


def test_shutdown_wakes_a_vcpu_waiting_on_a_stuck_device():
    import threading
    proc, host = spawn(Stuck())
    deaths = []
    proxy = BusProxy(proc, "stuck", host, deaths.append)
    vcpu = threading.Thread(target=proxy.read, args=(0, 0x3F8, memoryview(bytearray(1))))
    vcpu.start()
    import time
    time.sleep(0.3)   # the request is in flight

    proc.shutdown()
    vcpu.join(5.0)

    assert not vcpu.is_alive()
    assert len(deaths) == 1
    proc.reap(0.5)
    proc.close()
