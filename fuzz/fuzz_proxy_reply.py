"""Fuzz target: what the VMM does with replies from a compromised device process
(crosvm/devices/proxy.py: parse_reply, DeviceProcess.call, the proxies' actions).

The device process is a socket the target answers with fuzzed replies (well-formed,
truncated, oversized, with any actions); the PCI proxy sits in a real PciSetup (vmm/
pci.py) whose VM is a recorder, so MSI routes go through the VMM's own checks.
Invariants: only DeviceDied leaves parse_reply and DeviceProcess.call, and nothing
leaves the proxies; a death stops all further requests from that process; MSI routes
reach the VM only for the device's own GSIs; reads return exactly the size asked.
"""

from __future__ import annotations

import socket
import struct
import threading

import atheris

from crosvm.devices import proxy as P
from crosvm.devices.bus import Bus
from crosvm.devices.virtio.rng import Rng
from crosvm.vmm.pci import PciSetup

MEM_SIZE = 256 << 20


class RecordingVm:
    """The KvmVm calls PciSetup makes, recorded."""

    def __init__(self) -> None:
        self.irqfds: list[int] = []
        self.routes: list[int] = []

    def register_irqfd(self, fd, gsi, resample_fd=None) -> None:
        self.irqfds.append(gsi)

    def set_msi_route(self, gsi, address, data) -> None:
        self.routes.append(gsi)

    def register_ioevent(self, fd, addr, length, pio) -> None:
        pass

    def unregister_ioevent(self, fd, addr, length, pio) -> None:
        pass


def fake_process(name: str) -> tuple[P.DeviceProcess, socket.socket]:
    """A DeviceProcess whose child is the returned socket (no fork)."""
    proc = object.__new__(P.DeviceProcess)
    proc.sock, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    proc.name, proc._lock, proc.dead, proc.status, proc.pid = name, threading.Lock(), False, None, -1
    return proc, child


def reply(fdp: atheris.FuzzedDataProvider) -> bytes:
    if fdp.ConsumeIntInRange(0, 7) == 0:
        return fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 4200))
    out = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 9))
    actions = []
    for _ in range(fdp.ConsumeIntInRange(0, 4)):
        kind = fdp.ConsumeIntInRange(0, 3)
        if kind == 1:
            vector = fdp.ConsumeIntInRange(0, 3) if fdp.ConsumeBool() else fdp.ConsumeIntInRange(0, 0xFFFF)
            actions.append(P.ACTION_ROUTE.pack(1, vector, fdp.ConsumeIntInRange(0, (1 << 64) - 1),
                                               fdp.ConsumeIntInRange(0, 0xFFFF_FFFF)))
        else:
            actions.append(bytes([kind]) + fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 12)))
    n_actions = len(actions) if fdp.ConsumeIntInRange(0, 7) else fdp.ConsumeIntInRange(0, 255)
    n_out = len(out) if fdp.ConsumeIntInRange(0, 7) else fdp.ConsumeIntInRange(0, 255)
    status = 0 if fdp.ConsumeIntInRange(0, 7) else fdp.ConsumeIntInRange(0, 255)
    return P.REPLY.pack(status, n_actions) + bytes([n_out]) + out + b"".join(actions)


def _drain(sock: socket.socket) -> None:
    while True:
        try:
            sock.recv(8192, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return


def one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    raw = reply(fdp)
    try:
        out, actions = P.parse_reply(raw)
    except P.DeviceDied:
        pass
    else:
        assert len(out) <= 255 and all(len(a) == P.ACTION_SIZES[a[0]] for a in actions)

    vm = RecordingVm()
    deaths: list[str] = []
    exits: list[int] = []
    children: list[socket.socket] = []

    def spawn(device, name, keep_fds, host, start):
        proc, child = fake_process(name)
        children.append(child)
        return P.PciProxy(proc, device, host, deaths.append)

    setup = PciSetup(vm, None, Bus(), Bus(), MEM_SIZE, 39, None, spawn=spawn)
    rng = Rng()
    pci = setup.add_virtio(rng)
    proxy = setup.root.devices[next(a for a, d in setup.root.devices.items() if isinstance(d, P.PciProxy))]
    gsis = set(vm.irqfds) - {irq for _, _, irq in setup.intx}
    bus_proc, bus_child = fake_process("bus")
    children.append(bus_child)
    bus_proxy = P.BusProxy(bus_proc, "pvpanic", P.HostRequests(exit=exits.append), deaths.append)
    try:
        for _ in range(fdp.ConsumeIntInRange(1, 12)):
            pci_side = fdp.ConsumeBool()
            target, child = (proxy, children[0]) if pci_side else (bus_proxy, bus_child)
            dead_before = target.proc.dead
            routes_before, exits_before = len(vm.routes), len(exits)
            try:
                child.send(reply(fdp))
            except OSError:
                pass  # the socket is shut down or full: the proxy must cope
            op = fdp.ConsumeIntInRange(0, 3)
            n = fdp.ConsumeIntInRange(1, 8)
            buf = memoryview(bytearray(n))
            offset = fdp.ConsumeIntInRange(0, 0x1_0000)
            payload = fdp.ConsumeBytes(n).ljust(n, b"\0")
            if pci_side:
                if op == 0:
                    assert 0 <= proxy.read_config_register(offset & 0x3FF) <= 0xFFFF_FFFF
                elif op == 1:
                    proxy.write_config_register(fdp.ConsumeIntInRange(0, 70), fdp.ConsumeIntInRange(0, 3), payload[:4])
                elif op == 2:
                    proxy.read_bar(0, offset, buf)
                else:
                    proxy.write_bar(0, offset, payload)
            elif op & 1:
                bus_proxy.read(offset, offset, buf)
            else:
                bus_proxy.write(offset, offset, payload)
            assert len(buf) == n
            _drain(child)
            _drain(target.proc.sock)  # a reply nobody asked for is the next one's
            if dead_before:
                assert (len(vm.routes), len(exits)) == (routes_before, exits_before), \
                    "a dead device's reply was acted on"
            assert set(vm.routes) <= gsis, f"MSI route for GSIs {set(vm.routes) - gsis}"
            assert all(0 <= code <= 255 for code in exits)
    finally:
        for sock in children + [proxy.proc.sock, bus_proc.sock]:
            sock.close()
        for event in setup._events + pci.queue_events:
            event.close()
        rng.close()
