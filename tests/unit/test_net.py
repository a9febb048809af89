"""virtio-net driven by the virtqueue driver, with a SOCK_SEQPACKET socketpair standing in
for the TAP (one datagram per frame, vnet header first, like a TAP with IFF_VNET_HDR)."""

from __future__ import annotations

import os
import socket
import struct
import time

import pytest

from crosvm.base import Event
from tests.unit.interrupts import Line, wait_signalled
from crosvm.devices.virtio import net_proto as P
from crosvm.devices.virtio.driver import QueueDriver
from crosvm.devices.virtio.net import Net
from crosvm.devices.virtio.virtio_device import BASE_FEATURES, Interrupt
from crosvm.vm_memory import GuestMemory

FRAME = bytes(range(256)) * 4  # 1 KiB of "Ethernet frame"
CSUM_TSO = 1 << P.F_CSUM | 1 << P.F_HOST_TSO4
GUEST_OFFLOADS = 1 << P.F_GUEST_CSUM | 1 << P.F_GUEST_TSO4 | 1 << P.F_GUEST_UFO


class Rig:
    """A Net device on a socketpair, its rx/tx/ctrl queues driven from plain memory."""

    def __init__(self, features: int = 0, mrg_rxbuf: bool = False, pairs: int = 1,
                 queue_size: int = 16, stream: bool = False) -> None:
        self.mem = GuestMemory([(0, 64 << 20)])
        self.host: list[socket.socket] = []
        fds = []
        for _ in range(pairs):
            a, b = socket.socketpair(socket.AF_UNIX,
                                     socket.SOCK_STREAM if stream else socket.SOCK_SEQPACKET)
            a.setblocking(False)
            self.host.append(b)
            fds.append(a.detach())
        self.offloads: list[tuple[int, int]] = []
        self.net = Net(fds, mac=bytes.fromhex("52540012345a"), mrg_rxbuf=mrg_rxbuf,
                       queue_size=queue_size, stream=stream,
                       set_offload=lambda fd, flags: self.offloads.append((fd, flags)))
        self.net.ack_features(BASE_FEATURES | features)
        self.drivers = [QueueDriver(self.mem, size=queue_size, base=(1 + 8 * i) << 20)
                        for i in range(2 * pairs + 1)]
        for d in self.drivers:
            d.data_start = d.next_free = d.next_free + (64 << 10)
        self.kicks = [Event() for _ in self.drivers]
        self.line = Line()
        self.net.activate(self.mem, Interrupt(None, self.line),
                          [(i, d.queue, k) for i, (d, k) in enumerate(zip(self.drivers, self.kicks))])

    @property
    def rx(self) -> QueueDriver:
        return self.drivers[0]

    @property
    def tx(self) -> QueueDriver:
        return self.drivers[1]

    @property
    def ctrl(self) -> QueueDriver:
        return self.drivers[-1]

    def kick(self, index: int) -> None:
        self.kicks[index].signal()

    def used(self, driver: QueueDriver, count: int) -> list[tuple[int, int]]:
        """Used elements until `count` have arrived (or the interrupts stop)."""
        used = driver.used()
        while len(used) < count and wait_signalled(self.line.trigger):
            used += driver.used()
        return used

    def close(self) -> None:
        self.net.close()
        for s in self.host:
            s.close()
        self.mem.close()


@pytest.fixture
def rig_factory():
    rigs = []

    def make(**kw) -> Rig:
        rigs.append(Rig(**kw))
        return rigs[-1]
    yield make
    for r in rigs:
        r.close()


def tap_recv(sock: socket.socket, timeout: float = 5.0) -> bytes:
    sock.settimeout(timeout)
    return sock.recv(1 << 17)


def transmit(rig: Rig, header: P.VnetHeader, frame: bytes) -> None:
    rig.tx.add_buffers([header.pack(), frame], [])
    rig.kick(1)


# -- transmit -------------------------------------------------------------------
def test_transmit_sends_header_and_frame_to_the_tap(rig_factory):
    rig = rig_factory()

    transmit(rig, P.VnetHeader(), FRAME)

    assert tap_recv(rig.host[0]) == P.VnetHeader().pack() + FRAME


def test_transmit_of_a_header_split_across_buffers_sends_it_whole(rig_factory):
    rig = rig_factory()
    raw = P.VnetHeader().pack()

    rig.tx.add_buffers([raw[:5], raw[5:] + FRAME[:10], FRAME[10:]], [])
    rig.kick(1)

    assert tap_recv(rig.host[0]) == raw + FRAME


def test_transmit_passes_a_negotiated_tso4_header_through(rig_factory):
    rig = rig_factory(features=CSUM_TSO)
    hdr = P.VnetHeader(P.HDR_F_NEEDS_CSUM, P.GSO_TCPV4, 54, 1448, 34, 16)

    transmit(rig, hdr, FRAME * 60)

    assert tap_recv(rig.host[0])[:P.VNET_HDR_LEN] == hdr.pack()


def test_transmit_drops_a_chain_shorter_than_the_vnet_header(rig_factory):
    rig = rig_factory()

    rig.tx.add_buffers([bytes(8)], [])
    rig.kick(1)

    assert (rig.used(rig.tx, 1), rig.net.stats.tx_bad_chains) == ([(0, 0)], 1)


def test_transmit_drops_an_oversized_frame(rig_factory):
    rig = rig_factory()

    transmit(rig, P.VnetHeader(), bytes(P.MAX_FRAME_LEN + 1))

    assert (len(rig.used(rig.tx, 1)), rig.net.stats.tx_bad_chains) == (1, 1)


def test_transmit_drops_a_header_with_gso_that_was_not_negotiated(rig_factory):
    rig = rig_factory(features=1 << P.F_CSUM)
    hdr = P.VnetHeader(P.HDR_F_NEEDS_CSUM, P.GSO_TCPV4, 54, 1448, 34, 16)

    transmit(rig, hdr, FRAME)

    assert (len(rig.used(rig.tx, 1)), rig.net.stats.tx_bad_headers) == (1, 1)


def test_transmit_to_a_full_tap_drops_and_counts_instead_of_blocking(rig_factory):
    rig = rig_factory(queue_size=256)
    frames = 200  # far more than the socket buffer holds, none of them read

    for _ in range(frames):
        rig.tx.add_buffers([P.VnetHeader().pack(), FRAME * 32], [])
    rig.kick(1)

    stats = rig.net.stats
    assert (len(rig.used(rig.tx, frames)), stats.tx_frames + stats.tx_dropped_tap_full,
            stats.tx_dropped_tap_full > 0) == (frames, frames, True)


# -- receive --------------------------------------------------------------------
def test_receive_fills_one_buffer_and_sets_num_buffers_to_1(rig_factory):
    rig = rig_factory()
    _, (addr,) = rig.rx.add_buffers([], [2048])
    rig.kick(0)

    rig.host[0].send(P.VnetHeader(num_buffers=0x7777).pack() + FRAME)

    used = rig.used(rig.rx, 1)
    data = rig.mem.read(addr, P.VNET_HDR_LEN + len(FRAME))
    assert (used, P.VnetHeader.unpack(data).num_buffers, data[P.VNET_HDR_LEN:]) == (
        [(0, P.VNET_HDR_LEN + len(FRAME))], 1, FRAME)


def test_receive_with_mergeable_buffers_spreads_a_frame_over_chains(rig_factory):
    rig = rig_factory(features=1 << P.F_MRG_RXBUF, mrg_rxbuf=True)
    addrs = [rig.rx.add_buffers([], [512])[1][0] for _ in range(4)]
    rig.kick(0)

    rig.host[0].send(P.VnetHeader().pack() + FRAME)

    used = rig.used(rig.rx, 3)
    got = b"".join(rig.mem.read(a, n) for a, (_, n) in zip(addrs, used))
    assert ([n for _, n in used], P.VnetHeader.unpack(got).num_buffers,
            got[P.VNET_HDR_LEN:]) == ([512, 512, P.VNET_HDR_LEN + len(FRAME) - 1024], 3, FRAME)


def test_receive_without_mergeable_buffers_drops_a_frame_larger_than_the_buffer(rig_factory):
    rig = rig_factory()
    rig.rx.add_buffers([], [512])
    rig.kick(0)

    rig.host[0].send(P.VnetHeader().pack() + FRAME)
    rig.host[0].send(P.VnetHeader().pack() + FRAME[:100])

    assert (rig.used(rig.rx, 1), rig.net.stats.rx_dropped_no_room) == (
        [(0, P.VNET_HDR_LEN + 100)], 1)


def test_receive_buffer_shorter_than_the_vnet_header_is_returned_empty(rig_factory):
    rig = rig_factory()
    rig.rx.add_buffers([], [8])
    rig.rx.add_buffers([], [2048])
    rig.kick(0)

    rig.host[0].send(P.VnetHeader().pack() + FRAME)

    assert (rig.used(rig.rx, 2), rig.net.stats.rx_bad_buffers) == (
        [(0, 0), (1, P.VNET_HDR_LEN + len(FRAME))], 1)


def test_receive_without_guest_buffers_holds_one_frame_and_leaves_the_rest_queued(rig_factory):
    rig = rig_factory()
    rig.host[0].setblocking(False)
    sent = 0
    try:  # until the "TAP" queue is full: the device must not keep taking frames
        while True:
            rig.host[0].send(P.VnetHeader().pack() + struct.pack("<I", sent) + FRAME)
            sent += 1
    except BlockingIOError:
        pass

    for _ in range(2):
        rig.rx.add_buffers([], [2048])
    rig.kick(0)

    used = rig.used(rig.rx, 2)
    first = rig.mem.read(rig.rx.data_start, P.VNET_HDR_LEN + 4)[P.VNET_HDR_LEN:]
    assert (sent > 2, len(used), struct.unpack("<I", first)[0]) == (True, 2, 0)


def test_activate_sets_the_tap_offloads_the_driver_accepted(rig_factory):
    rig = rig_factory(features=GUEST_OFFLOADS)

    assert rig.offloads[-1][1] == P.TUN_F_CSUM | P.TUN_F_TSO4 | P.TUN_F_UFO


def test_reset_turns_the_tap_offloads_off(rig_factory):
    rig = rig_factory(features=GUEST_OFFLOADS)

    rig.net.reset()

    assert rig.offloads[-1][1] == 0


# -- control queue ----------------------------------------------------------------
def control(rig: Rig, request: bytes) -> int:
    _, (ack,) = rig.ctrl.add_buffers([request], [1])
    rig.kick(len(rig.drivers) - 1)
    rig.used(rig.ctrl, 1)
    return rig.mem.read(ack, 1)[0]


def test_control_vq_pairs_set_is_acknowledged(rig_factory):
    rig = rig_factory(features=1 << P.F_MQ | 1 << P.F_CTRL_VQ, pairs=2)

    status = control(rig, bytes([P.CLASS_MQ, P.MQ_VQ_PAIRS_SET]) + struct.pack("<H", 2))

    assert status == P.CTRL_OK


def test_control_garbage_gets_an_error_ack(rig_factory):
    rig = rig_factory(features=1 << P.F_CTRL_VQ)

    status = control(rig, os.urandom(1) + b"\xff" * 40)

    assert status == P.CTRL_ERR


def test_control_guest_offloads_set_changes_the_tap_offloads(rig_factory):
    rig = rig_factory(features=GUEST_OFFLOADS | 1 << P.F_CTRL_GUEST_OFFLOADS)

    status = control(rig, bytes([P.CLASS_GUEST_OFFLOADS, 0])
                     + struct.pack("<Q", 1 << P.F_GUEST_CSUM))

    assert (status, rig.offloads[-1][1]) == (P.CTRL_OK, P.TUN_F_CSUM)


def test_multiqueue_second_pair_receives_once_enabled(rig_factory):
    rig = rig_factory(features=1 << P.F_MQ | 1 << P.F_CTRL_VQ, pairs=2)
    control(rig, bytes([P.CLASS_MQ, P.MQ_VQ_PAIRS_SET]) + struct.pack("<H", 2))
    rig.drivers[2].add_buffers([], [2048])
    rig.kick(2)

    rig.host[1].send(P.VnetHeader().pack() + FRAME)

    assert rig.used(rig.drivers[2], 1) == [(0, P.VNET_HDR_LEN + len(FRAME))]


def test_multiqueue_second_tap_queue_folds_onto_the_first_pair_before_it_is_enabled(
        rig_factory):
    rig = rig_factory(features=1 << P.F_MQ | 1 << P.F_CTRL_VQ, pairs=2)
    rig.rx.add_buffers([], [2048])
    rig.kick(0)

    rig.host[1].send(P.VnetHeader().pack() + FRAME)

    assert rig.used(rig.rx, 1) == [(0, P.VNET_HDR_LEN + len(FRAME))]


def test_features_offer_mac_status_mtu_and_offloads_but_mrg_only_when_asked():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    net = Net([a.detach()], mac=bytes(6), set_offload=lambda fd, flags: None)
    try:
        bits = net.features()
    finally:
        net.close()
        b.close()
    wanted = (1 << P.F_MAC | 1 << P.F_STATUS | 1 << P.F_MTU | P.OFFLOAD_FEATURES)
    assert (bits & wanted, bits >> P.F_MRG_RXBUF & 1) == (wanted, 0)


# -- stream backend (passt's socket: length-prefixed frames, no vnet header) ----------
def read_exactly(sock: socket.socket, n: int) -> bytes:
    sock.settimeout(10)
    out = b""
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        assert chunk, "stream closed early"
        out += chunk
    return out


def test_stream_transmit_sends_the_frame_length_prefixed_without_a_header(rig_factory):
    rig = rig_factory(stream=True)

    transmit(rig, P.VnetHeader(), FRAME)

    assert read_exactly(rig.host[0], 4 + len(FRAME)) == struct.pack(">I", len(FRAME)) + FRAME


def test_stream_receive_reassembles_a_frame_that_arrives_in_pieces(rig_factory):
    rig = rig_factory(stream=True)
    _, (addr,) = rig.rx.add_buffers([], [2048])
    rig.kick(0)
    data = struct.pack(">I", len(FRAME)) + FRAME

    rig.host[0].send(data[:3])
    rig.host[0].send(data[3:500])
    rig.host[0].send(data[500:])

    used = rig.used(rig.rx, 1)
    got = rig.mem.read(addr, P.VNET_HDR_LEN + len(FRAME))
    assert (used, got) == ([(0, P.VNET_HDR_LEN + len(FRAME))],
                           P.VnetHeader(num_buffers=1).pack() + FRAME)


def test_stream_transmit_to_a_full_socket_keeps_every_frame_whole(rig_factory):
    rig = rig_factory(stream=True, queue_size=256)
    frames = 120   # ~4 MiB: several times what the socket buffers hold
    for i in range(frames):
        rig.tx.add_buffers([P.VnetHeader().pack(), struct.pack("<I", i) + FRAME * 32], [])
    rig.kick(1)

    got = []
    for _ in range(frames):
        (length,) = struct.unpack(">I", read_exactly(rig.host[0], 4))
        got.append((length, struct.unpack("<I", read_exactly(rig.host[0], length)[:4])[0]))

    assert got == [(4 + len(FRAME) * 32, i) for i in range(frames)]


def test_stream_peer_sending_a_bad_length_is_cut_off(rig_factory):
    rig = rig_factory(stream=True)
    rig.rx.add_buffers([], [2048])
    rig.kick(0)

    rig.host[0].send(struct.pack(">I", P.MAX_FRAME_LEN + 1) + FRAME)
    rig.host[0].send(struct.pack(">I", len(FRAME)) + FRAME)
    transmit(rig, P.VnetHeader(), FRAME)

    assert (rig.used(rig.tx, 1), rig.rx.used()) == ([(0, 0)], [])


def test_stream_backend_offers_no_offloads():
    a, b = socket.socketpair()
    net = Net([a.detach()], stream=True, set_offload=lambda fd, flags: None)
    try:
        bits = net.features()
    finally:
        net.close()
        b.close()
    assert bits & (P.OFFLOAD_FEATURES | 1 << P.F_CTRL_GUEST_OFFLOADS) == 0


def test_stream_peer_closing_takes_its_socket_out_of_the_worker_wait_set(rig_factory):
    import time
    rig = rig_factory(stream=True)
    fd = rig.net.tap_fds[0]

    rig.host[0].close()
    rig.host.clear()

    deadline = time.monotonic() + 5
    while fd in rig.net.worker._watched and time.monotonic() < deadline:
        time.sleep(0.01)
    assert fd not in rig.net.worker._watched


# -- review findings: state across resets, the control queue without MQ, link status --
def reactivate(rig: Rig) -> None:
    """A driver reset, then activation again on the same rings."""
    rig.net.reset()
    rig.net.activate(rig.mem, Interrupt(None, rig.line),
                     [(i, d.queue, k) for i, (d, k) in enumerate(zip(rig.drivers, rig.kicks))])


def wait_until(predicate, timeout: float = 5.0) -> bool:
    import time
    deadline = time.monotonic() + timeout
    while not predicate() and time.monotonic() < deadline:
        time.sleep(0.01)
    return predicate()


def test_stream_peer_gone_before_an_activation_is_not_polled_by_it(rig_factory):
    rig = rig_factory(stream=True)
    fd = rig.net.tap_fds[0]
    rig.host[0].close()
    rig.host.clear()
    wait_until(lambda: fd not in rig.net.worker._watched)

    reactivate(rig)
    time.sleep(0.3)  # the worker has started (it drops the dead fd before serving)
    cpu_before = sum(os.times()[:2])
    time.sleep(0.5)
    cpu_used = sum(os.times()[:2]) - cpu_before

    assert fd not in rig.net.worker._watched
    assert cpu_used < 0.25  # nothing spins on the hung-up socket


def test_stream_frame_half_read_before_a_reset_is_completed_after_it(rig_factory):
    rig = rig_factory(stream=True)
    data = struct.pack(">I", len(FRAME)) + FRAME
    rig.host[0].send(data[:300])
    half_read = wait_until(lambda: rig.net.stream_have[0] == 300)

    reactivate(rig)
    _, (addr,) = rig.rx.add_buffers([], [2048])
    rig.kick(0)
    rig.host[0].send(data[300:])
    used = rig.used(rig.rx, 1)

    assert half_read
    assert used[-1:] == [(used[-1][0], P.VNET_HDR_LEN + len(FRAME))]
    assert rig.mem.read(addr + P.VNET_HDR_LEN, len(FRAME)) == FRAME


def test_control_queue_is_queue_2_when_multiqueue_is_not_negotiated(rig_factory):
    rig = rig_factory(features=1 << P.F_CTRL_VQ, pairs=2)
    ctrl = rig.drivers[2]   # virtio 5.1.2: controlq is 2N with N = 1 without MQ

    _, (ack,) = ctrl.add_buffers([bytes([P.CLASS_MQ, P.MQ_VQ_PAIRS_SET, 2, 0])], [1])
    rig.kick(2)
    used = rig.used(ctrl, 1)

    assert (len(used), rig.mem.read(ack, 1)[0]) == (1, P.CTRL_ERR)


def test_stream_peer_closing_reports_the_link_down_in_config_space(rig_factory):
    rig = rig_factory(stream=True)
    up_before = rig.net.config_bytes()[6:8]

    rig.host[0].close()
    rig.host.clear()
    down = wait_until(lambda: not rig.net.link_up())

    assert (up_before, down, rig.net.config_bytes()[6:8]) == (
        struct.pack("<H", P.S_LINK_UP), True, b"\0\0")
