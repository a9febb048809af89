"""vhost-user: the wire format, and the front-end against a scripted back-end on a
real Unix socket (no KVM, no guest)."""

from __future__ import annotations

import socket
import struct
import threading
import time

import pytest
from hypothesis import given, settings, strategies as st

from crosvm.base import Event
from crosvm.base.fdpass import close_fds, fds_from
from crosvm.devices.virtio import virtio_device as V
from crosvm.devices.virtio.queue import Queue
from crosvm.devices.virtio.vhost_user import VhostUserError, VhostUserFrontend
from crosvm.vhost_user import protocol as P
from crosvm.vm_memory import GuestMemory

MIB = 1 << 20
BLOCK_FEATURES = (1 << V.VIRTIO_F_VERSION_1) | (1 << 9) | P.F_PROTOCOL_FEATURES | (1 << 34)
BLOCK_CONFIG = struct.pack("<Q", 2048) + bytes(52)  # capacity: 2048 sectors


class FakeBackend:
    """Serves one connection: answers what it is asked as `replies` says, records every
    request (code, payload, number of fds) in `seen`. `replies[code]` is bytes (the
    reply payload), or a callable(payload) -> bytes | None (None: no reply)."""

    def __init__(self, path: str, features: int = BLOCK_FEATURES,
                 protocol: int = int(P.ProtocolFeature.REPLY_ACK | P.ProtocolFeature.CONFIG),
                 config: bytes = BLOCK_CONFIG) -> None:
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(path)
        self.listener.listen(1)
        self.seen: list[tuple[int, bytes, int]] = []
        self.replies: dict[int, object] = {
            P.Request.GET_FEATURES: P.u64(features),
            P.Request.GET_PROTOCOL_FEATURES: P.u64(protocol),
            P.Request.GET_QUEUE_NUM: P.u64(1),
            P.Request.GET_CONFIG: lambda payload: P.config(0, config[:P.decode_config(
                payload)[1].__len__()]),
            P.Request.GET_VRING_BASE: lambda payload: payload,
        }
        self.conn: socket.socket | None = None
        self.raw_reply: bytes | None = None  # sent instead of the next data reply
        self.refuse: set[int] = set()  # acknowledged with a non-zero status
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        try:
            self._serve_connection()
        except OSError:
            pass  # the front-end went away (a test that closed it)

    def _serve_connection(self) -> None:
        self.conn, _ = self.listener.accept()
        while True:
            msg, anc, _, _ = self.conn.recvmsg(P.HEADER.size, socket.CMSG_SPACE(4 * 8))
            if not msg:
                return
            header = P.decode_header(msg)
            payload = b""
            while len(payload) < header.size:
                chunk = self.conn.recv(header.size - len(payload))
                if not chunk:
                    return
                payload += chunk
            fds = fds_from(anc)
            close_fds(fds)
            self.seen.append((header.request, payload, len(fds)))
            reply = self.replies.get(header.request)
            if callable(reply):
                reply = reply(payload)
            if reply is not None and header.request in P.REPLIES:
                if self.raw_reply is not None:
                    self.conn.sendall(self.raw_reply)
                    self.raw_reply = None
                    continue
                self.conn.sendall(P.encode(header.request, reply, P.FLAG_REPLY))
            elif header.need_reply:
                status = 1 if header.request in self.refuse else 0
                self.conn.sendall(P.encode(header.request, P.u64(status), P.FLAG_REPLY))

    def requests(self) -> list[int]:
        return [code for code, _, _ in self.seen]

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
        self.listener.close()


@pytest.fixture
def backend(tmp_path):
    path = str(tmp_path / "backend.sock")
    made: list[FakeBackend] = []

    def make(**kwargs) -> tuple[str, FakeBackend]:
        b = FakeBackend(path, **kwargs)
        made.append(b)
        return path, b

    yield make
    for b in made:
        b.close()


@pytest.fixture
def mem():
    m = GuestMemory([(0, 4 * MIB)])
    yield m
    m.close()


def activate(device: VhostUserFrontend, mem: GuestMemory) -> V.Interrupt:
    interrupt = V.Interrupt(None, None)
    device.activate(mem, interrupt, [(0, Queue(256, 0x1000, 0x2000, 0x3000, vector=0), Event())])
    return interrupt


# -- the wire format ---------------------------------------------------------------
def test_encode_sets_version_and_size():
    assert P.encode(P.Request.SET_OWNER) == struct.pack("<III", 3, 1, 0)


def test_header_with_wrong_version_is_rejected():
    with pytest.raises(P.ProtocolError, match="version"):
        P.decode_header(struct.pack("<III", 1, 2, 0))


def test_header_with_oversized_payload_is_rejected():
    with pytest.raises(P.ProtocolError, match="exceeds"):
        P.decode_header(struct.pack("<III", 1, 1, P.MAX_PAYLOAD + 1))


def test_memory_table_round_trips():
    regions = [P.MemoryRegion(0, MIB, 0x7F00_0000_0000, 0),
               P.MemoryRegion(4 * MIB, MIB, 0x7F00_0010_0000, MIB)]

    assert P.decode_memory_table(P.memory_table(regions), 2) == regions


def test_memory_table_needs_one_fd_per_region():
    table = P.memory_table([P.MemoryRegion(0, MIB, 0x1000, 0)])

    with pytest.raises(P.ProtocolError, match="fds"):
        P.decode_memory_table(table, 0)


def test_memory_table_with_overlapping_regions_is_rejected():
    table = P.memory_table([P.MemoryRegion(0, 2 * MIB, 0x1000, 0),
                            P.MemoryRegion(MIB, MIB, 0x9000_0000, 0)])

    with pytest.raises(P.ProtocolError, match="overlap"):
        P.decode_memory_table(table, 2)


def test_memory_region_that_wraps_is_rejected():
    table = P.memory_table([P.MemoryRegion((1 << 64) - 4096, 8192, 0x1000, 0)])

    with pytest.raises(P.ProtocolError, match="wraps"):
        P.decode_memory_table(table, 1)


def test_vring_fd_with_unknown_bits_is_rejected():
    with pytest.raises(P.ProtocolError, match="unknown bits"):
        P.decode_vring_fd(P.u64(1 << 20))


def test_vring_fd_nofd_flag_decodes():
    assert P.decode_vring_fd(P.vring_fd(3, has_fd=False)) == (3, False)


def test_config_larger_than_its_payload_is_rejected():
    payload = P.CONFIG_HEADER.pack(0, 60, 0) + bytes(10)

    with pytest.raises(P.ProtocolError, match="expected"):
        P.decode_config(payload)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300), st.integers(0, 8))
def test_decoders_raise_only_protocol_error_on_any_input(data, nfds):
    for decode in (P.decode_header, P.decode_config, P.decode_vring_state,
                   P.decode_vring_addr, P.decode_vring_fd, P.decode_u64,
                   lambda d: P.decode_memory_table(d, nfds)):
        try:
            decode(data)
        except P.ProtocolError:
            pass


# -- the front-end -------------------------------------------------------------------
def test_frontend_handshake_takes_features_and_config_from_the_backend(backend, mem):
    path, b = backend()

    device = VhostUserFrontend("block", path, mem)

    assert device.device_type == V.TYPE_BLOCK
    assert device.features() == (1 << V.VIRTIO_F_VERSION_1) | (1 << 9)  # not 30, not packed
    assert device.config_bytes()[:8] == struct.pack("<Q", 2048)
    assert b.requests()[:4] == [P.Request.SET_OWNER, P.Request.GET_FEATURES,
                                P.Request.GET_PROTOCOL_FEATURES, P.Request.SET_PROTOCOL_FEATURES]
    device.close()


def test_frontend_activation_sends_memory_and_each_ring_with_its_fds(backend, mem):
    path, b = backend()
    device = VhostUserFrontend("block", path, mem)
    device.ack_features(device.features())
    b.seen.clear()

    activate(device, mem)
    device.reset()  # GET_VRING_BASE: a reply, so every request before it was handled

    by_code: dict[int, tuple[bytes, int]] = {}
    for code, payload, nfds in b.seen:  # the first of each (reset sends ENABLE 0 later)
        by_code.setdefault(code, (payload, nfds))
    table = P.decode_memory_table(*by_code[P.Request.SET_MEM_TABLE])
    addr = P.decode_vring_addr(by_code[P.Request.SET_VRING_ADDR][0])
    host = mem.regions[0].host_address()
    assert [(r.guest_addr, r.size, r.user_addr) for r in table] == [(0, 4 * MIB, host)]
    assert (addr.desc, addr.avail, addr.used) == (host + 0x1000, host + 0x2000, host + 0x3000)
    assert by_code[P.Request.SET_VRING_KICK][1] == 1
    assert by_code[P.Request.SET_VRING_CALL][1] == 1
    assert P.decode_u64(by_code[P.Request.SET_FEATURES][0]) & P.F_PROTOCOL_FEATURES
    assert P.decode_vring_state(by_code[P.Request.SET_VRING_ENABLE][0]) == (0, 1)
    device.close()


def test_frontend_refuses_a_backend_without_version_1(backend, mem):
    path, _ = backend(features=P.F_PROTOCOL_FEATURES)

    with pytest.raises(VhostUserError, match="VERSION_1"):
        VhostUserFrontend("block", path, mem)


def test_frontend_refuses_a_block_backend_without_config(backend, mem):
    path, _ = backend(protocol=int(P.ProtocolFeature.REPLY_ACK))

    with pytest.raises(VhostUserError, match="config"):
        VhostUserFrontend("block", path, mem)


def test_frontend_rejects_a_reply_to_another_request(backend, mem):
    path, b = backend()
    b.raw_reply = P.encode(P.Request.GET_CONFIG, P.u64(0), P.FLAG_REPLY)

    with pytest.raises(VhostUserError, match="expected the reply to GET_FEATURES"):
        VhostUserFrontend("block", path, mem)


def test_net_features_that_need_a_control_queue_are_not_offered(backend, mem):
    ctrl_vq, mac = 1 << 17, 1 << 5
    path, _ = backend(features=(1 << V.VIRTIO_F_VERSION_1) | ctrl_vq | mac | (1 << 22),
                      protocol=int(P.ProtocolFeature.CONFIG), config=bytes(12))

    device = VhostUserFrontend("net", path, mem)

    assert device.features() == (1 << V.VIRTIO_F_VERSION_1) | mac
    device.close()


def test_config_reply_of_another_size_is_rejected(backend, mem):
    path, b = backend()
    b.replies[P.Request.GET_CONFIG] = P.config(0, bytes(256))

    with pytest.raises(VhostUserError, match="asked for 60 config bytes"):
        VhostUserFrontend("block", path, mem)


def test_fs_config_from_the_backend_says_one_request_queue(backend, mem):
    config = b"tag".ljust(36, b"\0") + struct.pack("<I", 8)
    path, _ = backend(features=(1 << V.VIRTIO_F_VERSION_1) | P.F_PROTOCOL_FEATURES,
                      protocol=int(P.ProtocolFeature.CONFIG), config=config)

    device = VhostUserFrontend("fs", path, mem)

    assert device.config_bytes()[36:40] == struct.pack("<I", 1)
    assert device.queue_max_sizes() == [256, 256]
    device.close()


def test_backend_with_fewer_queues_than_the_device_needs_is_refused(backend, mem):
    path, b = backend(features=(1 << V.VIRTIO_F_VERSION_1) | P.F_PROTOCOL_FEATURES,
                      protocol=int(P.ProtocolFeature.MQ | P.ProtocolFeature.CONFIG),
                      config=bytes(8))
    b.replies[P.Request.GET_QUEUE_NUM] = P.u64(2)

    with pytest.raises(VhostUserError, match="needs 3"):
        VhostUserFrontend("vsock", path, mem)


def test_frontend_rejects_a_reply_payload_of_the_wrong_size(backend, mem):
    path, b = backend()
    b.replies[P.Request.GET_FEATURES] = b"\x01"

    with pytest.raises(VhostUserError, match="features"):
        VhostUserFrontend("block", path, mem)


def test_frontend_rejects_an_oversized_reply(backend, mem):
    path, b = backend()
    b.raw_reply = struct.pack("<III", P.Request.GET_FEATURES, 1 | P.FLAG_REPLY, 1 << 20)

    with pytest.raises(VhostUserError, match="exceeds"):
        VhostUserFrontend("block", path, mem)


def test_request_the_backend_refuses_breaks_the_device_at_activation(backend, mem):
    path, b = backend()
    device = VhostUserFrontend("block", path, mem)
    device.ack_features(device.features())
    b.refuse.add(P.Request.SET_VRING_NUM)
    reasons: list[str] = []
    interrupt = V.Interrupt(None, None)
    interrupt.on_needs_reset = reasons.append

    device.activate(mem, interrupt, [(0, Queue(256, 0x1000, 0x2000, 0x3000), Event())])

    assert len(reasons) == 1 and "refused SET_VRING_NUM" in reasons[0]
    device.close()


def test_frontend_missing_socket_is_a_clear_error(tmp_path, mem, monkeypatch):
    monkeypatch.setattr("crosvm.devices.virtio.vhost_user.CONNECT_TIMEOUT", 0.1)

    with pytest.raises(VhostUserError, match="No such file"):
        VhostUserFrontend("block", str(tmp_path / "nobody.sock"), mem)


def test_fs_frontend_takes_its_tag_from_the_command_line(backend, mem):
    path, _ = backend(features=(1 << V.VIRTIO_F_VERSION_1), protocol=0)

    device = VhostUserFrontend("fs", path, mem, tag="myfs")

    assert device.config_bytes() == b"myfs".ljust(36, b"\0") + struct.pack("<I", 1)
    assert device.queue_max_sizes() == [256, 256]
    device.close()


def test_fs_frontend_without_a_tag_from_anywhere_names_the_option(backend, mem):
    path, _ = backend(features=(1 << V.VIRTIO_F_VERSION_1), protocol=0)

    with pytest.raises(VhostUserError, match="tag="):
        VhostUserFrontend("fs", path, mem)


def test_backend_closing_puts_the_device_in_needs_reset(backend, mem):
    path, b = backend()
    device = VhostUserFrontend("block", path, mem)
    device.ack_features(device.features())
    interrupt = activate(device, mem)
    reasons: list[str] = []
    done = threading.Event()
    interrupt.on_needs_reset = lambda why: (reasons.append(why), done.set())

    b.conn.shutdown(socket.SHUT_RDWR)

    assert done.wait(5)
    assert "closed the connection" in reasons[0]
    device.close()


def test_interrupts_are_forwarded_while_msix_is_off(backend, mem):
    path, b = backend()
    device = VhostUserFrontend("block", path, mem)
    device.ack_features(device.features())
    interrupt = activate(device, mem)
    call = device._call_events[0]  # the eventfd the back-end got as the ring's call fd
    time.sleep(0.1)
    assert interrupt.read_and_clear_isr() == 0  # nothing raised before the back-end calls

    call.signal()  # what the back-end does when it used a buffer

    deadline = threading.Event()
    for _ in range(100):
        if interrupt.read_and_clear_isr():
            break
        deadline.wait(0.02)
    else:
        pytest.fail("the call eventfd did not become a queue interrupt")
    device.close()


def test_full_suspend_is_refused_for_a_vhost_user_device(backend, mem):
    from crosvm.devices import control as C
    from crosvm.devices.virtio.virtio_pci import VirtioPciDevice
    path, _ = backend()
    device = VhostUserFrontend("block", path, mem)
    pci = VirtioPciDevice(device, mem, [Event() for _ in range(2)], lambda *route: None)

    reply = pci.control(C.CTRL_SLEEP, 0)

    assert reply[:1] == b"\x01" and b"cannot sleep" in reply
    device.close()
