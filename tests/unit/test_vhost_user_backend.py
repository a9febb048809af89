"""The vhost-user back-end (crosvm/vhost_user/backend.py): our devices served to a
front-end over a real socket; a hostile front-end's requests refused one by one."""

from __future__ import annotations

import array
import fcntl
import os
import select
import socket
import struct
import threading
import time

import pytest

from crosvm.base import Event
from crosvm.devices.virtio import virtio_device as V
from crosvm.devices.virtio.driver import QueueDriver
from crosvm.devices.virtio.rng import Rng
from crosvm.devices.virtio.vhost_user import VhostUserFrontend
from crosvm.vhost_user import protocol as P
from crosvm.vhost_user.backend import DeviceBackend, serve_socket
from crosvm.vm_memory import GuestMemory

MIB = 1 << 20


@pytest.fixture
def mem():
    m = GuestMemory([(0, 4 * MIB)])
    yield m
    m.close()


class Client:
    """A scripted front-end on one end of a socketpair; the back-end serves the other."""

    def __init__(self) -> None:
        self.sock, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(5)
        self.backend = DeviceBackend(Rng(), theirs)
        self.thread = threading.Thread(target=self._serve, args=(theirs,), daemon=True)
        self.thread.start()

    def _serve(self, theirs: socket.socket) -> None:
        with theirs:
            self.backend.serve()

    def send(self, request: int, payload: bytes = b"", fds: list[int] = (),
             ack: bool = True) -> None:
        message = P.encode(request, payload, P.FLAG_NEED_REPLY if ack else 0)
        if fds:
            self.sock.sendmsg([message], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                           array.array("i", fds))])
        else:
            self.sock.sendall(message)

    def reply(self) -> tuple[P.Header, bytes]:
        header = P.decode_header(self.sock.recv(P.HEADER.size, socket.MSG_WAITALL))
        return header, self.sock.recv(header.size, socket.MSG_WAITALL) if header.size else b""

    def status(self, request: int, payload: bytes = b"", fds: list[int] = ()) -> int:
        self.send(request, payload, fds)
        return P.decode_u64(self.reply()[1])

    def close(self) -> None:
        self.sock.close()
        self.thread.join(5)


@pytest.fixture
def client():
    c = Client()
    c.send(P.Request.SET_PROTOCOL_FEATURES, P.u64(P.ProtocolFeature.REPLY_ACK), ack=False)
    yield c
    c.close()


def test_our_frontend_and_backend_serve_a_request_end_to_end(tmp_path, mem):
    path = str(tmp_path / "rng.sock")
    server = threading.Thread(target=serve_socket, args=(Rng(), path), daemon=True)
    server.start()
    front = VhostUserFrontend("rng", path, mem)
    front.ack_features(front.features())
    driver = QueueDriver(mem, size=256)
    interrupt = V.Interrupt(None, None)
    kick = Event()
    front.activate(mem, interrupt, [(0, driver.queue, kick)])
    head, (addr,) = driver.add_buffers([], [64])

    kick.signal()
    used: list[tuple[int, int]] = []
    deadline = time.monotonic() + 5
    while not used and time.monotonic() < deadline:
        time.sleep(0.01)
        used = driver.used()

    assert used == [(head, 64)]                 # the back-end used the buffer
    assert mem.read(addr, 64) != bytes(64)      # and filled it with random bytes
    assert interrupt.read_and_clear_isr() == 1  # its call came back as an interrupt
    front.close()
    server.join(5)
    assert not server.is_alive()  # the back-end ends with its front-end


def sealed_memfd(size: int) -> int:
    """Guest memory as a front-end (ours, QEMU's memfd backend) makes it."""
    fd = os.memfd_create("guest", os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
    return fd


def test_memory_that_may_shrink_is_refused(client):
    fd = os.memfd_create("unsealed")
    os.ftruncate(fd, MIB)
    table = P.memory_table([P.MemoryRegion(0, MIB, 0x7000_0000, 0)])

    assert client.status(P.Request.SET_MEM_TABLE, table, [fd]) == 1
    os.close(fd)


def test_memory_region_past_the_end_of_its_file_is_refused(client):
    fd = sealed_memfd(MIB)
    table = P.memory_table([P.MemoryRegion(0, 4 * MIB, 0x7000_0000, 0)])

    assert client.status(P.Request.SET_MEM_TABLE, table, [fd]) == 1
    os.close(fd)


def start_ring(client: Client, mem: GuestMemory, driver: QueueDriver) -> Event:
    """Ring 0 on `driver`'s queue, started as a front-end does; its kick event."""
    host = mem.regions[0].host_address()
    q = driver.queue
    table = P.memory_table([P.MemoryRegion(0, mem.size, host, 0)])
    kick, call = Event(), Event()
    for request, payload, fds in (
            (P.Request.SET_MEM_TABLE, table, [mem.memfd]),
            (P.Request.SET_VRING_NUM, P.vring_state(0, q.size), []),
            (P.Request.SET_VRING_ADDR, P.vring_addr(P.VringAddr(
                0, 0, host + q.desc_table, host + q.used_ring, host + q.avail_ring, 0)), []),
            (P.Request.SET_VRING_BASE, P.vring_state(0, 0), []),
            (P.Request.SET_VRING_KICK, P.vring_fd(0, True), [kick.fd]),
            (P.Request.SET_VRING_CALL, P.vring_fd(0, True), [call.fd]),
            (P.Request.SET_VRING_ENABLE, P.vring_state(0, 1), [])):
        assert client.status(request, payload, fds) == 0, request.name
    return kick


def wait_used(driver: QueueDriver, count: int) -> list[tuple[int, int]]:
    used: list[tuple[int, int]] = []
    deadline = time.monotonic() + 5
    while len(used) < count and time.monotonic() < deadline:
        time.sleep(0.01)
        used += driver.used()
    return used


def test_disabled_ring_reports_where_it_stopped_and_resumes_there(client, mem):
    driver = QueueDriver(mem, size=256)
    kick = start_ring(client, mem, driver)
    for _ in range(3):
        driver.add_buffers([], [16])
    kick.signal()
    assert len(wait_used(driver, 3)) == 3

    assert client.status(P.Request.SET_VRING_ENABLE, P.vring_state(0, 0)) == 0
    client.send(P.Request.GET_VRING_BASE, P.vring_state(0, 0), ack=False)
    base = P.decode_vring_state(client.reply()[1])
    assert client.status(P.Request.SET_VRING_ENABLE, P.vring_state(0, 1)) == 0
    head, _ = driver.add_buffers([], [16])
    kick.signal()

    assert base == (0, 3)
    assert wait_used(driver, 1) == [(head, 16)]  # only the new one: nothing replayed


def test_call_moved_while_running_signals_the_new_eventfd_without_a_stop(client, mem):
    driver = QueueDriver(mem, size=256)
    kick = start_ring(client, mem, driver)
    worker = client.backend.device.worker
    new_call = Event()

    assert client.status(P.Request.SET_VRING_CALL, P.vring_fd(0, True), [new_call.fd]) == 0
    driver.add_buffers([], [16])
    kick.signal()

    assert len(wait_used(driver, 1)) == 1
    assert select.select([new_call.fd], [], [], 5)[0]  # its call came on the new eventfd
    assert client.backend.device.worker is worker  # the device was not stopped for it


def test_front_end_without_the_extension_starts_a_ring_once_it_is_described(mem):
    c = Client()  # no SET_FEATURES with PROTOCOL_FEATURES: rings have no enable step
    driver = QueueDriver(mem, size=256)
    host = mem.regions[0].host_address()
    q = driver.queue
    kick, call = Event(), Event()
    for request, payload, fds in (
            (P.Request.SET_MEM_TABLE, P.memory_table([P.MemoryRegion(0, mem.size, host, 0)]),
             [mem.memfd]),
            (P.Request.SET_VRING_NUM, P.vring_state(0, q.size), []),
            (P.Request.SET_VRING_ADDR, P.vring_addr(P.VringAddr(
                0, 0, host + q.desc_table, host + q.used_ring, host + q.avail_ring, 0)), []),
            (P.Request.SET_VRING_KICK, P.vring_fd(0, True), [kick.fd]),
            (P.Request.SET_VRING_CALL, P.vring_fd(0, True), [call.fd])):
        c.send(request, payload, fds, ack=False)
    head, _ = driver.add_buffers([], [16])
    kick.signal()

    assert wait_used(driver, 1) == [(head, 16)]
    c.close()


def test_ring_that_does_not_fit_its_region_is_refused(client, mem):
    driver = QueueDriver(mem, size=256)
    host = mem.regions[0].host_address()
    table = P.memory_table([P.MemoryRegion(0, mem.size, host, 0)])
    # With the extension negotiated rings start at SET_VRING_ENABLE (without, at once).
    assert client.status(P.Request.SET_FEATURES, P.u64(P.F_PROTOCOL_FEATURES)) == 0
    assert client.status(P.Request.SET_MEM_TABLE, table, [mem.memfd]) == 0
    for request, payload in ((P.Request.SET_VRING_NUM, P.vring_state(0, 256)),
                             (P.Request.SET_VRING_BASE, P.vring_state(0, 0))):
        assert client.status(request, payload) == 0
    kick, call = Event(), Event()
    assert client.status(P.Request.SET_VRING_KICK, P.vring_fd(0, True), [kick.fd]) == 0
    assert client.status(P.Request.SET_VRING_CALL, P.vring_fd(0, True), [call.fd]) == 0
    end = host + mem.size
    assert client.status(P.Request.SET_VRING_ADDR, P.vring_addr(P.VringAddr(
        0, 0, end - 16, host + driver.queue.used_ring, host + driver.queue.avail_ring, 0))) == 0

    status = client.status(P.Request.SET_VRING_ENABLE, P.vring_state(0, 1))

    assert status == 1  # the descriptor table would run past the end of guest memory


def test_kick_that_is_not_an_eventfd_is_refused(client):
    r, w = os.pipe()

    status = client.status(P.Request.SET_VRING_KICK, P.vring_fd(0, True), [r])

    os.close(r)
    os.close(w)
    assert status == 1


def test_socket_path_that_exists_is_left_alone(tmp_path):
    precious = tmp_path / "precious.txt"
    precious.write_text("keep me")

    with pytest.raises(OSError):
        serve_socket(Rng(), str(precious))

    assert precious.read_text() == "keep me"


@pytest.mark.parametrize("size", [0, 3, 512])
def test_ring_size_not_a_power_of_two_up_to_the_device_max_is_refused(client, size):
    assert client.status(P.Request.SET_VRING_NUM, P.vring_state(0, size)) == 1


def test_ring_index_beyond_the_device_is_refused(client):
    assert client.status(P.Request.SET_VRING_NUM, P.vring_state(1, 256)) == 1


def test_kick_without_an_fd_is_refused(client):
    assert client.status(P.Request.SET_VRING_KICK, P.vring_fd(0, True)) == 1


def test_features_not_offered_are_refused(client):
    assert client.status(P.Request.SET_FEATURES, P.u64(1 << 40)) == 1


def test_unknown_request_is_refused_and_the_backend_goes_on(client):
    refused = client.status(99)
    client.send(P.Request.GET_QUEUE_NUM, ack=False)

    assert refused == 1
    assert P.decode_u64(client.reply()[1]) == 1


def test_config_reads_come_from_the_device(client):
    client.send(P.Request.GET_CONFIG, P.config(0, bytes(8)), ack=False)

    header, payload = client.reply()

    assert header.request == P.Request.GET_CONFIG and P.decode_config(payload) == (0, bytes(8))


def test_malformed_header_closes_the_connection(client):
    client.sock.sendall(struct.pack("<III", 1, 2, 0))  # version 2

    assert client.sock.recv(1) == b""
    client.thread.join(5)
    assert not client.thread.is_alive()
