"""virtio-vsock's userspace device driven by the virtqueue driver (playing the guest's
transport) against real Unix sockets (playing host programs)."""

from __future__ import annotations

import os
import socket
import time

import pytest

from crosvm.base import Event
from crosvm.devices.virtio import vsock as VS
from crosvm.devices.virtio import vsock_proto as P
from crosvm.devices.virtio.driver import QueueDriver
from crosvm.devices.virtio.virtio_device import BASE_FEATURES, Interrupt
from crosvm.vm_memory import GuestMemory
from tests.unit.interrupts import Line, wait_signalled

CID = 3
GUEST_BUF = 256 << 10


class Rig:
    """A Vsock device on `tmp/v.sock`, its three queues driven from plain memory."""

    def __init__(self, tmp_path, queue_size: int = 64) -> None:
        self.mem = GuestMemory([(0, 32 << 20)])
        self.path = str(tmp_path / "v.sock")
        self.dev = VS.Vsock(CID, self.path)
        self.dev.ack_features(BASE_FEATURES | 1 << P.F_STREAM)
        self.drivers = [QueueDriver(self.mem, size=queue_size, base=(1 + 8 * i) << 20)
                        for i in range(3)]
        for d in self.drivers:
            d.data_start = d.next_free = d.next_free + (64 << 10)
        self.kicks = [Event() for _ in self.drivers]
        self.line = Line()
        self.rx_bufs: dict[int, int] = {}  # head -> address
        self.dev.activate(self.mem, Interrupt(None, self.line),
                          [(i, d.queue, k) for i, (d, k) in enumerate(zip(self.drivers, self.kicks))])
        self.received: list[tuple[P.Header, bytes]] = []

    def post_rx(self, count: int = 8, size: int = 4096 + P.HDR_LEN) -> None:
        for _ in range(count):
            head, addrs = self.drivers[VS.RX].add_buffers([], [size])
            self.rx_bufs[head] = addrs[0]
        self.kicks[VS.RX].signal()

    def send(self, op: int, src_port: int = 1000, dst_port: int = 5000, payload: bytes = b"",
             buf_alloc: int = GUEST_BUF, fwd_cnt: int = 0, flags: int = 0, length=None,
             src_cid: int = CID, dst_cid: int = P.HOST_CID, type_: int = P.TYPE_STREAM) -> None:
        h = P.Header(src_cid, dst_cid, src_port, dst_port,
                     len(payload) if length is None else length, type_, op, flags, buf_alloc,
                     fwd_cnt)
        self.send_raw(h.pack() + payload)

    def send_raw(self, data: bytes) -> None:
        self.drivers[VS.TX].add_buffers([data], [])
        self.kicks[VS.TX].signal()

    def recv(self, count: int = 1, timeout: float = 5.0) -> list[tuple[P.Header, bytes]]:
        """The next `count` packets the device put in receive buffers."""
        deadline = time.monotonic() + timeout
        while len(self.received) < count and time.monotonic() < deadline:
            for head, length in self.drivers[VS.RX].used():
                raw = self.mem.read(self.rx_bufs.pop(head), length)
                h = P.Header.unpack(raw[:P.HDR_LEN])
                self.received.append((h, raw[P.HDR_LEN:]))
            if len(self.received) < count:
                wait_signalled(self.line.trigger, 0.2)
        out, self.received = self.received[:count], self.received[count:]
        return out

    def tx_done(self, count: int = 1) -> list[tuple[int, int]]:
        used = self.drivers[VS.TX].used()
        while len(used) < count and wait_signalled(self.line.trigger):
            used += self.drivers[VS.TX].used()
        return used

    def listen(self, port: int) -> socket.socket:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(f"{self.path}_{port}")
        s.listen(4)
        s.settimeout(5)
        return s

    def host_connect(self, port: int) -> socket.socket:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(5)
        s.connect(self.path)
        s.sendall(f"CONNECT {port}\n".encode())
        return s

    def close(self) -> None:
        self.dev.close()
        self.mem.close()


@pytest.fixture
def rig(tmp_path):
    r = Rig(tmp_path)
    yield r
    r.close()


def guest_connect(rig: Rig, port: int = 5000, src: int = 1000, rx: int = 8):
    """The guest connects to host port `port` (after posting `rx` receive buffers);
    returns the host's accepted socket."""
    listener = rig.listen(port)
    rig.post_rx(rx)
    rig.send(P.OP_REQUEST, src_port=src, dst_port=port)
    [(h, _)] = rig.recv()
    assert h.op == P.OP_RESPONSE
    conn, _ = listener.accept()
    conn.settimeout(5)
    listener.close()
    return conn


def closed_by_device(sock: socket.socket) -> bool:
    """The device closed its end: EOF, or a reset when it left bytes unread."""
    try:
        return sock.recv(64) == b""
    except ConnectionResetError:
        return True


def recv_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            break
        data += chunk
    return data


# -- codec ---------------------------------------------------------------------------
def test_header_packs_to_44_bytes_and_back():
    h = P.Header(3, 2, 1000, 5000, 7, P.TYPE_STREAM, P.OP_RW, 0, 4096, 12)

    assert (len(h.pack()), P.Header.unpack(h.pack())) == (44, h)


def test_header_of_the_wrong_size_is_refused():
    with pytest.raises(P.PacketError, match="44 bytes"):
        P.Header.unpack(bytes(43))


@pytest.mark.parametrize("field, value, message", [
    ("src_cid", 4, "source CID 4"),
    ("dst_cid", 7, "destination CID 7"),
    ("type", P.TYPE_SEQPACKET, "socket type 2"),
    ("op", 99, "unknown op 99"),
    ("len", 5, "REQUEST carries 5"),
])
def test_check_guest_header_refuses(field, value, message):
    h = P.Header(CID, P.HOST_CID, 1, 2, 0, P.TYPE_STREAM, P.OP_REQUEST)
    setattr(h, field, value)

    with pytest.raises(P.PacketError, match=message):
        P.check_guest_header(h, CID, 0)


def test_check_guest_header_refuses_rw_longer_than_the_chain():
    h = P.Header(CID, P.HOST_CID, 1, 2, 100, P.TYPE_STREAM, P.OP_RW)

    with pytest.raises(P.PacketError, match="chain holds 99"):
        P.check_guest_header(h, CID, 99)


def test_check_guest_header_refuses_rw_over_the_packet_limit():
    h = P.Header(CID, P.HOST_CID, 1, 2, P.MAX_PAYLOAD + 1, P.TYPE_STREAM, P.OP_RW)

    with pytest.raises(P.PacketError, match="over"):
        P.check_guest_header(h, CID, 1 << 20)


def test_check_guest_header_refuses_unknown_shutdown_flags():
    h = P.Header(CID, P.HOST_CID, 1, 2, 0, P.TYPE_STREAM, P.OP_SHUTDOWN, 4)

    with pytest.raises(P.PacketError, match="shutdown flags"):
        P.check_guest_header(h, CID, 0)


@pytest.mark.parametrize("line, port", [(b"CONNECT 52\n", 52), (b"CONNECT 4294967295\n", 0xFFFFFFFF)])
def test_parse_connect_line(line, port):
    assert P.parse_connect_line(line) == port


@pytest.mark.parametrize("line", [b"CONNECT\n", b"CONNECT x\n", b"LISTEN 5\n",
                                  b"CONNECT 4294967296\n", b"CONNECT -1\n", b"CONNECT 5 6\n"])
def test_parse_connect_line_refuses(line):
    with pytest.raises(P.PacketError):
        P.parse_connect_line(line)


def test_credit_refuses_bytes_beyond_the_buffer():
    credit = P.Credit()
    credit.received(P.BUF_ALLOC - 10)

    with pytest.raises(P.PacketError, match="10 of credit"):
        credit.received(11)


def test_credit_peer_free_follows_the_peers_counts_across_u32_wrap():
    credit = P.Credit()
    credit.tx_cnt = 0xFFFF_FF00
    credit.sent(0x200)  # wraps to 0x100
    credit.update_peer(P.Header(0, 0, 0, 0, 0, 1, P.OP_CREDIT_UPDATE, 0, 0x1000, 0xFFFF_FF80))

    assert credit.peer_free() == 0x1000 - 0x180


def test_credit_wants_an_update_once_the_guest_thinks_we_are_half_full():
    credit = P.Credit()
    credit.received(P.BUF_ALLOC // 2 + 1)
    credit.forwarded(P.BUF_ALLOC // 2 + 1)

    assert credit.wants_update() is True


# -- the device ------------------------------------------------------------------------
def test_config_space_holds_the_guest_cid(rig):
    assert rig.dev.config_bytes() == (CID).to_bytes(8, "little")


def test_guest_connect_to_a_listening_host_port_gets_response(rig):
    conn = guest_connect(rig, 5000)

    assert conn.fileno() >= 0
    conn.close()


def test_guest_connect_to_a_port_nobody_listens_on_gets_rst(rig):
    rig.post_rx()

    rig.send(P.OP_REQUEST, dst_port=5999)
    [(h, _)] = rig.recv()

    assert (h.op, h.src_port, h.dst_port, h.dst_cid) == (P.OP_RST, 5999, 1000, CID)


def test_guest_data_reaches_the_host_socket(rig):
    conn = guest_connect(rig)

    rig.send(P.OP_RW, payload=b"hello host")

    assert recv_exact(conn, 10) == b"hello host"


def test_host_data_reaches_the_guest_as_rw(rig):
    conn = guest_connect(rig)

    conn.sendall(b"hello guest")
    [(h, body)] = rig.recv()

    assert (h.op, h.len, body, h.src_port, h.dst_port) == (P.OP_RW, 11, b"hello guest", 5000, 1000)


def test_host_connect_line_makes_a_request_to_the_guest(rig):
    rig.post_rx()

    host = rig.host_connect(52)
    [(h, _)] = rig.recv()

    assert (h.op, h.dst_port, h.dst_cid, h.src_cid, h.buf_alloc) == (
        P.OP_REQUEST, 52, CID, P.HOST_CID, P.BUF_ALLOC)
    host.close()


def test_guest_response_answers_ok_with_the_host_port(rig):
    rig.post_rx()
    host = rig.host_connect(52)
    [(req, _)] = rig.recv()

    rig.send(P.OP_RESPONSE, src_port=52, dst_port=req.src_port)

    assert host.recv(64) == f"OK {req.src_port}\n".encode()
    host.close()


def test_guest_rst_to_a_host_connect_closes_the_host_socket(rig):
    rig.post_rx()
    host = rig.host_connect(53)
    [(req, _)] = rig.recv()

    rig.send(P.OP_RST, src_port=53, dst_port=req.src_port)

    assert host.recv(64) == b""


def test_host_connect_with_a_bad_line_is_closed(rig):
    host = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    host.settimeout(5)
    host.connect(rig.path)

    host.sendall(b"HELLO THERE\n")

    assert host.recv(64) == b""


def test_host_connect_line_that_never_ends_is_closed(rig):
    host = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    host.settimeout(5)
    host.connect(rig.path)

    host.sendall(b"C" * 40)

    assert closed_by_device(host)


def shrink_host_socket(rig: Rig, key=(1000, 5000)) -> None:
    """Make the device's end of a host socket take only a few KiB before it blocks,
    so a host that does not read shows quickly."""
    rig.dev.state.conns[key].sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)


def test_guest_sending_beyond_its_credit_is_reset(rig):
    conn = guest_connect(rig)
    shrink_host_socket(rig)
    for _ in range(P.BUF_ALLOC // P.MAX_PAYLOAD):
        rig.send(P.OP_RW, payload=bytes(P.MAX_PAYLOAD))  # the host reads nothing

    rig.send(P.OP_RW, payload=b"x" * 16384)  # beyond what it was given
    ops = [h.op for h, _ in rig.recv(2, timeout=2)]

    assert P.OP_RST in ops
    conn.close()


def test_device_holds_what_the_host_does_not_read_and_delivers_it_later(rig):
    conn = guest_connect(rig)
    shrink_host_socket(rig)
    for i in range(P.BUF_ALLOC // P.MAX_PAYLOAD):
        rig.send(P.OP_RW, payload=bytes([i]) * P.MAX_PAYLOAD)
    rig.tx_done(P.BUF_ALLOC // P.MAX_PAYLOAD)
    held = sum(len(c.pending) for c in rig.dev.state.conns.values())

    got = recv_exact(conn, P.BUF_ALLOC)

    assert (0 < held <= P.BUF_ALLOC, got) == (
        True, b"".join(bytes([i]) * P.MAX_PAYLOAD for i in range(P.BUF_ALLOC // P.MAX_PAYLOAD)))
    conn.close()


def test_host_reading_again_gives_the_guest_credit_back(rig):
    conn = guest_connect(rig)
    for _ in range(3):
        rig.send(P.OP_RW, payload=bytes(P.MAX_PAYLOAD))

    got = recv_exact(conn, 3 * P.MAX_PAYLOAD)
    updates = [h for h, _ in rig.recv(1) if h.op == P.OP_CREDIT_UPDATE]

    assert (len(got), updates[0].fwd_cnt >= P.BUF_ALLOC // 2) == (3 * P.MAX_PAYLOAD, True)
    conn.close()


def test_host_data_waits_for_guest_credit(rig):
    listener = rig.listen(5000)
    rig.post_rx(16)
    rig.send(P.OP_REQUEST, dst_port=5000, buf_alloc=1000)
    rig.recv()  # RESPONSE
    conn, _ = listener.accept()
    conn.sendall(bytes(3000))
    first = rig.recv(1)
    more = rig.recv(1, timeout=0.5)

    rig.send(P.OP_CREDIT_UPDATE, buf_alloc=1000, fwd_cnt=1000)
    after = rig.recv(1)

    assert ([h.len for h, _ in first], more, [h.len for h, _ in after]) == ([1000], [], [1000])
    conn.close()


def test_guest_shutdown_send_half_closes_the_host_socket(rig):
    conn = guest_connect(rig)
    rig.send(P.OP_RW, payload=b"last words")

    rig.send(P.OP_SHUTDOWN, flags=P.SHUTDOWN_SEND)

    assert (recv_exact(conn, 10), conn.recv(10)) == (b"last words", b"")
    conn.close()


def test_host_half_close_tells_the_guest_shutdown_send(rig):
    conn = guest_connect(rig)

    conn.shutdown(socket.SHUT_WR)
    [(h, _)] = rig.recv()

    assert (h.op, h.flags) == (P.OP_SHUTDOWN, P.SHUTDOWN_SEND)
    conn.close()


def test_guest_shutdown_both_is_answered_with_rst_and_closes_the_host(rig):
    conn = guest_connect(rig)

    rig.send(P.OP_SHUTDOWN, flags=P.SHUTDOWN_BOTH)
    [(h, _)] = rig.recv()

    assert (h.op, conn.recv(10)) == (P.OP_RST, b"")


def test_host_closing_while_the_guest_sends_resets_the_connection(rig):
    conn = guest_connect(rig)
    conn.close()

    rig.send(P.OP_RW, payload=b"anyone?")
    packets = rig.recv(2)

    assert P.OP_RST in [h.op for h, _ in packets]


@pytest.mark.parametrize("kw", [dict(dst_cid=9), dict(src_cid=4), dict(type_=P.TYPE_SEQPACKET),
                                dict(op=42), dict(length=10)])
def test_malformed_packet_gets_rst_and_the_device_goes_on(rig, kw):
    rig.post_rx()
    op = kw.pop("op", P.OP_REQUEST)

    rig.send(op, dst_port=7000, **kw)
    [(h, _)] = rig.recv()
    conn = guest_connect(rig, 7001)

    assert (h.op, conn.fileno() >= 0) == (P.OP_RST, True)
    conn.close()


def test_packet_shorter_than_a_header_is_dropped(rig):
    rig.send_raw(b"short")

    assert rig.tx_done(1)[0][1] == 0
    conn = guest_connect(rig)
    conn.close()


def test_rw_for_an_unknown_connection_gets_rst(rig):
    rig.post_rx()

    rig.send(P.OP_RW, src_port=4444, dst_port=5555, payload=b"who?")
    [(h, _)] = rig.recv()

    assert (h.op, h.src_port, h.dst_port) == (P.OP_RST, 5555, 4444)


def test_rst_for_an_unknown_connection_is_not_answered(rig):
    rig.post_rx()

    rig.send(P.OP_RST, src_port=4444, dst_port=5555)

    assert rig.recv(1, timeout=0.5) == []


def test_request_reusing_an_open_connections_ports_resets_it(rig):
    conn = guest_connect(rig, 5000, src=1000)

    rig.send(P.OP_REQUEST, src_port=1000, dst_port=5000)
    [(h, _)] = rig.recv()

    assert (h.op, conn.recv(10)) == (P.OP_RST, b"")


def test_connections_beyond_the_limit_are_refused(rig, monkeypatch):
    monkeypatch.setattr(P, "MAX_CONNECTIONS", 2)
    conns = [guest_connect(rig, 5000 + i, src=1000 + i) for i in range(2)]
    listener = rig.listen(5002)
    listener.setblocking(False)

    rig.send(P.OP_REQUEST, src_port=1002, dst_port=5002)
    [(h, _)] = rig.recv()

    with pytest.raises(BlockingIOError):  # the device never connected to it
        listener.accept()
    assert h.op == P.OP_RST
    for c in conns:
        c.close()


def test_control_packets_without_receive_buffers_are_bounded(rig, monkeypatch):
    monkeypatch.setattr(VS, "MAX_CONTROL", 4)
    for i in range(10):
        rig.send(P.OP_RW, src_port=4000 + i, payload=b"x")
    rig.tx_done(10)

    assert (len(rig.dev.state.control), rig.dev.state.dropped_control) == (4, 6)


def test_transport_reset_posts_the_event_and_drops_connections(rig):
    conn = guest_connect(rig)
    head, [addr] = rig.drivers[VS.EVENT].add_buffers([], [4])
    rig.dev.worker.pause()

    sent = rig.dev.state.transport_reset()
    rig.dev.worker.resume()

    assert (sent, rig.mem.read(addr, 4), conn.recv(10)) == (True, bytes(4), b"")


def test_stale_socket_file_is_replaced(tmp_path):
    path = str(tmp_path / "s.sock")
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(path)
    stale.close()

    listener = VS.listen_unix(path)

    assert listener.getsockname() == path
    listener.close()


def test_socket_path_in_use_is_refused(tmp_path):
    path = str(tmp_path / "s.sock")
    first = VS.listen_unix(path)

    with pytest.raises(VS.VsockError, match="in use"):
        VS.listen_unix(path)
    first.close()


def test_regular_file_at_the_socket_path_is_kept_and_refused(tmp_path):
    path = tmp_path / "s.sock"
    path.write_text("important")

    with pytest.raises(VS.VsockError, match="not a socket"):
        VS.listen_unix(str(path))
    assert path.read_text() == "important"


def test_many_connections_relay_at_once(rig):
    conns = [guest_connect(rig, 6000 + i, src=2000 + i, rx=1) for i in range(20)]

    for i, c in enumerate(conns):
        rig.send(P.OP_RW, src_port=2000 + i, dst_port=6000 + i, payload=f"conn {i}".encode())
    got = [c.recv(16) for c in conns]

    assert got == [f"conn {i}".encode() for i in range(20)]
    for c in conns:
        c.close()


def test_reset_closes_every_host_socket(rig):
    conn = guest_connect(rig)

    rig.dev.reset()

    assert conn.recv(10) == b""


def test_ok_line_does_not_count_as_guest_bytes_forwarded(rig):
    rig.post_rx()
    host = rig.host_connect(52)
    [(req, _)] = rig.recv()
    rig.send(P.OP_RESPONSE, src_port=52, dst_port=req.src_port)
    host.recv(64)

    host.sendall(b"data!")
    [(h, body)] = rig.recv()

    assert (h.op, body, h.fwd_cnt) == (P.OP_RW, b"data!", 0)


def test_host_initiated_connection_relays_guest_data_back(rig):
    rig.post_rx()
    host = rig.host_connect(52)
    [(req, _)] = rig.recv()
    rig.send(P.OP_RESPONSE, src_port=52, dst_port=req.src_port)

    rig.send(P.OP_RW, src_port=52, dst_port=req.src_port, payload=b"echo")

    expected = f"OK {req.src_port}\necho".encode()
    assert recv_exact(host, len(expected)) == expected


def test_connect_line_sent_in_pieces_is_assembled(rig):
    rig.post_rx()
    host = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    host.settimeout(5)
    host.connect(rig.path)

    host.sendall(b"CONN")
    time.sleep(0.2)
    host.sendall(b"ECT 77\n")
    [(h, _)] = rig.recv()

    assert (h.op, h.dst_port) == (P.OP_REQUEST, 77)
    host.close()


def test_refused_header_naming_an_open_connection_resets_it(rig):
    conn = guest_connect(rig)

    rig.send(P.OP_CREDIT_REQUEST, length=7)  # a length it may not carry
    [(h, _)] = rig.recv()

    assert (h.op, closed_by_device(conn), rig.dev.state.conns) == (P.OP_RST, True, {})


def test_guest_reset_after_sending_still_delivers_its_bytes_to_the_host(rig):
    conn = guest_connect(rig)
    shrink_host_socket(rig)
    rig.send(P.OP_RW, payload=bytes(range(256)) * 256)  # 64 KiB the host has not read
    rig.send(P.OP_SHUTDOWN, flags=P.SHUTDOWN_BOTH)

    rig.send(P.OP_RST)  # the guest gives up waiting for our RST
    got = recv_exact(conn, 1 << 16)

    assert (got, conn.recv(10)) == (bytes(range(256)) * 256, b"")


def test_host_connections_without_a_connect_line_do_not_lock_others_out(rig, monkeypatch):
    monkeypatch.setattr(VS, "MAX_ACCEPTING", 2)
    rig.post_rx()
    idle = []
    for _ in range(3):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(rig.path)
        idle.append(s)

    host = rig.host_connect(60)
    [(h, _)] = rig.recv()

    assert (h.op, h.dst_port) == (P.OP_REQUEST, 60)
    for s in idle + [host]:
        s.close()


def test_credit_update_dropped_for_a_full_control_queue_is_sent_later(rig, monkeypatch):
    conn = guest_connect(rig, rx=1)  # used by the RESPONSE: none left after
    monkeypatch.setattr(VS, "MAX_CONTROL", 1)
    rig.send(P.OP_RW, src_port=4444, payload=b"x")  # an RST fills the control queue
    rig.send(P.OP_CREDIT_REQUEST)  # its update is dropped
    rig.tx_done(3)
    rig.post_rx(4)
    rig.recv(1)  # the RST

    rig.send(P.OP_CREDIT_REQUEST)
    [(h, _)] = rig.recv()

    assert h.op == P.OP_CREDIT_UPDATE
    conn.close()


def test_relative_socket_path_is_resolved_for_guest_connections(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    dev = VS.Vsock(CID, "rel.sock")

    assert (dev.uds_path, dev.jail_config().binds) == (str(tmp_path / "rel.sock"), [str(tmp_path)])
    dev.close()
