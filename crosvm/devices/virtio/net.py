"""virtio-net (virtio 1.x, 5.1) over a TAP opened with a vnet header.

Queues: receiveq/transmitq per pair (0/1, 2/3, ...), then the control queue. Frames
cross with their 12-byte vnet header, so checksum and segmentation offloads pass
between the guest and the host kernel untouched; TUNSETOFFLOAD tells the TAP which
offloads the driver accepted on receive.

Against a hostile guest: every frame is bounded (`MAX_FRAME_LEN`) and read into one
per-pair buffer, never a growing one. A receive frame the guest has no buffer for
stays in that buffer and the TAP is no longer polled until the guest adds buffers, so
further frames wait in (and are dropped by) the kernel's bounded TAP queue. Frames the
device refuses (short chains, oversized frames, headers with offloads that were not
negotiated) are dropped and counted in `stats`. The TAP fds are non-blocking: a full
TAP costs a dropped frame, never a stalled worker.
"""

from __future__ import annotations

import errno
import logging
import os
import struct
from dataclasses import dataclass
from typing import Callable

from crosvm.base import Event
from crosvm.base.ratelimit import RateLimitedLog
from crosvm.devices.virtio import net_proto as P
from crosvm.devices.virtio import virtio_device as V
from crosvm.devices.virtio.descriptor_utils import Reader, ShortBuffer, Writer
from crosvm.devices.virtio.queue import DescriptorChain, Queue
from crosvm.vm_memory import GuestMemory

log = logging.getLogger(__name__)
_guest_log = RateLimitedLog(log)

QUEUE_SIZE = 256
CTRL_QUEUE_SIZE = 64
MAX_IOVECS = 64  # more pieces than this are gathered into one buffer first (UIO_MAXIOV)
FRAME_BUFFER = P.VNET_HDR_LEN + P.MAX_FRAME_LEN


@dataclass
class NetStats:
    """Frames the device dropped, by reason (the worker's own counters)."""

    rx_frames: int = 0
    tx_frames: int = 0
    rx_dropped_no_room: int = 0    # larger than the guest's buffers allow
    rx_bad_buffers: int = 0        # receive chains shorter than the vnet header
    tx_bad_chains: int = 0         # transmit chains shorter than the header, or oversized
    tx_bad_headers: int = 0        # offloads not negotiated, checksum past the frame...
    tx_dropped_tap_full: int = 0   # the TAP would have blocked
    tx_tap_errors: int = 0         # the TAP refused the frame


class Net(V.VirtioDevice):
    """A virtio-net device on one TAP fd per queue pair.

    `set_offload(fd, flags)` is TUNSETOFFLOAD (tests stand a socketpair in for the TAP
    and record the flags instead)."""

    device_type = V.TYPE_NET
    seccomp_policy = "net_device"

    def __init__(self, tap_fds: list[int], mac: bytes | None = None, mtu: int = P.DEFAULT_MTU,
                 mrg_rxbuf: bool = False, queue_size: int = QUEUE_SIZE,
                 set_offload: Callable[[int, int], None] | None = None,
                 label: str = "net", stream: bool = False) -> None:
        if not tap_fds:
            raise ValueError("virtio-net needs at least one TAP fd")
        if mac is not None and len(mac) != 6:
            raise ValueError("a MAC address is 6 bytes")
        if not P.MIN_MTU <= mtu <= P.MAX_MTU:
            raise ValueError(f"mtu {mtu} is outside {P.MIN_MTU}..{P.MAX_MTU}")
        if set_offload is None:
            from crosvm.net.tap import set_offload
        self.tap_fds = list(tap_fds)
        self.pairs = len(tap_fds)
        self.mac = mac
        self.mtu = mtu
        self.mrg_rxbuf = mrg_rxbuf
        self.queue_size = queue_size
        self._set_offload = set_offload
        self.label = label
        # stream: a byte stream of frames each prefixed by its 32-bit big-endian length
        # and without a vnet header (passt's qemu socket): no offloads, one pair.
        self.stream = stream
        if stream and self.pairs != 1:
            raise ValueError("a stream backend has one queue pair")
        self.acked_features = 0
        self.offload_flags = 0
        self.stats = NetStats()
        # Per backend and kept across resets: a stream is not back at a frame boundary
        # because the driver reset (a frame half read, or half sent, goes on).
        self.rx_buffers = [bytearray(FRAME_BUFFER) for _ in tap_fds]
        self.stream_have = [0] * len(tap_fds)     # bytes of length prefix + frame read
        self.tx_backlog: list[bytes] = [b""] * len(tap_fds)  # unsent end of one frame
        self.backend_dead = [False] * len(tap_fds)  # the peer went away, or the TAP fails

    def debug_label(self) -> str:
        return self.label

    def queue_max_sizes(self) -> list[int]:
        return [self.queue_size] * (2 * self.pairs) + [CTRL_QUEUE_SIZE]

    def keep_fds(self) -> list[int]:
        return list(self.tap_fds)

    def features(self) -> int:
        bits = V.BASE_FEATURES | 1 << P.F_MTU | 1 << P.F_STATUS | 1 << P.F_CTRL_VQ
        if not self.stream:
            bits |= P.OFFLOAD_FEATURES | 1 << P.F_CTRL_GUEST_OFFLOADS
        if self.mac is not None:
            bits |= 1 << P.F_MAC
        if self.mrg_rxbuf:
            bits |= 1 << P.F_MRG_RXBUF
        if self.pairs > 1:
            bits |= 1 << P.F_MQ
        return bits

    def config_bytes(self) -> bytes:
        return P.config_bytes(self.mac, self.link_up(), self.pairs, self.mtu)

    def _apply_offload(self, flags: int) -> bool:
        """TUNSETOFFLOAD on every queue; without UFO if the kernel refuses it. A TAP
        that refuses all offloads sends plain frames, which any driver accepts."""
        if self.stream:
            return flags == 0
        for attempt in (flags, flags & ~P.TUN_F_UFO):
            try:
                for fd in self.tap_fds:
                    self._set_offload(fd, attempt)
                self.offload_flags = attempt
                return True
            except OSError as e:
                error = e
        _guest_log.warning("%s: TUNSETOFFLOAD %#x failed: %s", self.label, flags, error)
        return False

    def activate(self, mem: GuestMemory, interrupt: V.Interrupt,
                 queues: list[tuple[int, Queue, Event]]) -> None:
        by_index = {i: q for i, q, _ in queues}
        for pair in range(self.pairs):
            if 2 * pair not in by_index or 2 * pair + 1 not in by_index:
                if pair == 0:
                    raise ValueError("virtio-net needs receiveq1 and transmitq1")
        self._apply_offload(P.tap_offload_flags(self.acked_features))
        worker = _NetWorker(self, mem, interrupt, by_index, {i: e for i, _, e in queues})
        self.worker = V.QueueWorker(
            "v_net", interrupt, [(i, e) for i, _, e in queues], worker.handle,
            extra=[(fd, lambda j=j: worker.backend_ready(j)) for j, fd in enumerate(self.tap_fds)],
            on_start=worker.started)

    def reset(self) -> bool:
        super().reset()
        if self.offload_flags:  # not otherwise: a TAP this process shares may be in use
            self._apply_offload(0)
        return True

    def close(self) -> None:
        try:
            self.reset()
        except V.WorkerStuck as e:  # the exit goes on; the fds still close
            log.error("%s", e)
        for fd in self.tap_fds:
            os.close(fd)
        self.tap_fds = []

    def link_up(self) -> bool:
        """False once every backend is gone (a stream whose peer closed, a TAP that
        fails): the guest is told through VIRTIO_NET_S_LINK_UP."""
        return not all(self.backend_dead)


class _NetWorker:
    """Per-activation state: queues, the per-pair frame buffers, the active pair count."""

    def __init__(self, dev: Net, mem: GuestMemory, interrupt: V.Interrupt,
                 queues: dict[int, Queue], events: dict[int, Event]) -> None:
        self.dev = dev
        self.mem = mem
        self.interrupt = interrupt
        self.queues = queues
        self.events = events
        self.stats = dev.stats
        self.acked = dev.acked_features
        self.mrg = bool(self.acked >> P.F_MRG_RXBUF & 1)
        # virtio 5.1.2: the control queue is 2N, N = 1 unless MQ was negotiated.
        self.ctrl_index = 2 * dev.pairs if self.acked >> P.F_MQ & 1 else 2
        self.active_pairs = 1  # until the driver sends VQ_PAIRS_SET (virtio 5.1.6.5.5)
        self.buffers = dev.rx_buffers
        self.pending: list[int] = [0] * len(dev.tap_fds)  # bytes of a frame not yet delivered
        self.paused = [False] * len(dev.tap_fds)
        self.stream = dev.stream
        self.stream_have = dev.stream_have
        self.tx_backlog = dev.tx_backlog
        self.dead = dev.backend_dead
        self.reserved: dict[int, list[DescriptorChain]] = {}  # rx chains held for one frame
        self.queue_worker: V.QueueWorker | None = None

    def started(self, queue_worker: V.QueueWorker) -> None:
        """On the worker's thread, before its first callback: from now on `watch`
        works, so what an earlier activation left (a dead backend, output held) is
        reflected in what the worker polls."""
        self.queue_worker = queue_worker
        for tap in range(len(self.dev.tap_fds)):
            if self.dead[tap] or self.tx_backlog[tap]:
                self._update_watch(tap)

    # -- dispatch ---------------------------------------------------------------
    def handle(self, index: int) -> bool:
        if index == self.ctrl_index:
            return V.process_queue(self.mem, self.queues[index], self.interrupt, self.control)
        pair, is_tx = divmod(index, 2)
        if pair >= self.dev.pairs:
            return False
        if is_tx:
            fd = self.dev.tap_fds[pair]
            if self.dead[pair]:  # nowhere to send: give the buffers back, counted
                return V.process_queue(self.mem, self.queues[index], self.interrupt,
                                       self._drop_tx)
            if self.tx_backlog[pair]:
                return False  # resumed once the stream has room again
            return V.process_queue(self.mem, self.queues[index], self.interrupt,
                                   lambda chain: self.transmit(fd, chain),
                                   want=lambda: not self.tx_backlog[pair])
        # New receive buffers: whatever waited for them may go now.
        for tap in range(len(self.dev.tap_fds)):
            if self._rx_queue_for(tap) == index:
                self.tap_readable(tap)
        return False

    def _rx_queue_for(self, tap: int) -> int:
        # A TAP queue beyond the pairs in use still receives (the kernel steers to every
        # attached queue, and detaching one needs CAP_NET_ADMIN): fold it onto one in use.
        index = 2 * (tap % self.active_pairs)
        return index if index in self.queues else 0

    # -- transmit ---------------------------------------------------------------
    def transmit(self, fd: int, chain: DescriptorChain) -> int:
        total = chain.readable_len()
        if total < P.VNET_HDR_LEN or total > FRAME_BUFFER:
            self.stats.tx_bad_chains += 1
            _guest_log.warning("%s: dropping a transmit chain of %d bytes", self.dev.label, total)
            return 0
        frame_len = total - P.VNET_HDR_LEN
        addr, first = chain.readable[0]
        if first >= P.VNET_HDR_LEN:  # the usual layout: the header at the start of a buffer
            raw = bytes(self.mem.slice(addr, P.VNET_HDR_LEN))
            views = [self.mem.slice(a, n) for a, n in chain.readable[1:]]
            if first > P.VNET_HDR_LEN:
                views.insert(0, self.mem.slice(addr + P.VNET_HDR_LEN, first - P.VNET_HDR_LEN))
        else:
            reader = Reader(self.mem, chain)
            raw = reader.read(P.VNET_HDR_LEN)
            views = reader.views(frame_len)
        try:
            P.check_tx_header(P.VnetHeader.unpack(raw), frame_len, self.acked)
        except P.HeaderError as e:
            self.stats.tx_bad_headers += 1
            _guest_log.warning("%s: dropping a transmitted frame: %s", self.dev.label, e)
            return 0
        if len(views) > MAX_IOVECS:
            views = [b"".join(bytes(v) for v in views)]
        if self.stream:
            self._send_stream(fd, struct.pack(">I", frame_len), views)
            return 0
        try:
            os.writev(fd, [raw, *views])  # our copy of the header: checked is what is sent
        except BlockingIOError:
            self.stats.tx_dropped_tap_full += 1
            return 0
        except OSError as e:
            if e.errno == errno.ENOBUFS:
                self.stats.tx_dropped_tap_full += 1
            else:
                self.stats.tx_tap_errors += 1
                _guest_log.warning("%s: the TAP refused a frame: %s", self.dev.label, e)
            return 0
        self.stats.tx_frames += 1
        return 0

    def _drop_tx(self, chain: DescriptorChain) -> int:
        self.stats.tx_tap_errors += 1
        return 0

    def _send_stream(self, fd: int, prefix: bytes, views: list) -> None:
        """Send one length-prefixed frame; what the socket does not take now is kept
        (one frame at most) and the transmit queue waits until the socket has room."""
        tap = self.dev.tap_fds.index(fd)
        total = len(prefix) + sum(len(v) for v in views)
        try:
            sent = os.writev(fd, [prefix, *views])
        except BlockingIOError:
            sent = 0
        except OSError as e:
            self._stream_gone(tap, f"send failed: {e}")
            return
        self.stats.tx_frames += 1
        if sent < total:
            self.tx_backlog[tap] = b"".join([prefix, *(bytes(v) for v in views)])[sent:]
            self._update_watch(tap)

    def _stream_gone(self, tap: int, why: str) -> None:
        if self.dead[tap]:
            self._update_watch(tap)
            return
        log.error("%s: network backend %d is gone (%s)%s", self.dev.label, tap, why,
                  "; the guest's link is down" if all(
                      d or i == tap for i, d in enumerate(self.dead)) else "")
        self.dead[tap] = True
        self.tx_backlog[tap] = b""
        self._update_watch(tap)
        if not self.dev.link_up():
            self.interrupt.signal_config_changed()  # the driver rereads the status

    def _update_watch(self, tap: int) -> None:
        if self.queue_worker is not None:
            dead = self.dead[tap]
            self.queue_worker.watch(self.dev.tap_fds[tap], not dead and not self.paused[tap],
                                    not dead and bool(self.tx_backlog[tap]))

    def backend_ready(self, tap: int) -> None:
        """The TAP or stream socket is readable (or, with output held, writable)."""
        if self.dead[tap]:  # a hang-up is reported whatever was asked: stop polling it
            self._update_watch(tap)
            return
        if self.tx_backlog[tap]:
            try:
                sent = os.write(self.dev.tap_fds[tap], self.tx_backlog[tap])
            except BlockingIOError:
                sent = 0
            except OSError as e:
                self._stream_gone(tap, f"send failed: {e}")
                return
            self.tx_backlog[tap] = self.tx_backlog[tap][sent:]
            if not self.tx_backlog[tap]:
                self._update_watch(tap)
                if self.handle(2 * tap + 1):  # the transmit queue waited for this
                    self.events[2 * tap + 1].signal()  # more than one turn's budget
        if not self.paused[tap] and not self.dead[tap]:
            self.tap_readable(tap)

    def _read_frame(self, tap: int, fd: int) -> int:
        """The next whole frame in the pair's buffer (vnet header first): its length,
        or 0 when none is ready yet. Raises BlockingIOError when nothing was read."""
        buf = self.buffers[tap]
        if not self.stream:
            return os.readv(fd, [buf])
        # Stream: a 4-byte length at buf[8:12], then the frame at buf[12:] right behind
        # a vnet header of zeros (no offloads on a stream).
        have = self.stream_have[tap]
        want = 4 if have < 4 else 4 + struct.unpack_from(">I", buf, 8)[0]
        n = os.readv(fd, [memoryview(buf)[8 + have:8 + want]])
        if n == 0:
            self._stream_gone(tap, "the peer closed it")
            raise BlockingIOError
        have += n
        if have == 4:
            length = struct.unpack_from(">I", buf, 8)[0]
            if not P.ETH_MIN_LEN <= length <= P.MAX_FRAME_LEN:
                self._stream_gone(tap, f"it sent a frame length of {length}")
                raise BlockingIOError
        self.stream_have[tap] = have
        if have < 4 or have < 4 + struct.unpack_from(">I", buf, 8)[0]:
            return 0
        self.stream_have[tap] = 0
        buf[:P.VNET_HDR_LEN] = bytes(P.VNET_HDR_LEN)
        return have - 4 + P.VNET_HDR_LEN

    # -- receive ----------------------------------------------------------------
    def tap_readable(self, tap: int) -> None:
        """Move frames from TAP queue `tap` to the guest until either runs out (at most
        two rings' worth per turn; the TAP's fd stays readable if more wait)."""
        index = self._rx_queue_for(tap)
        queue = self.queues.get(index)
        if queue is None:
            return
        fd = self.dev.tap_fds[tap]
        for _ in range(2 * queue.size):
            if not self.pending[tap]:
                try:
                    n = self._read_frame(tap, fd)
                except BlockingIOError:
                    break
                except OSError as e:  # not EAGAIN: it would fail again on every wakeup
                    self._stream_gone(tap, f"read failed: {e}")
                    break
                if n == 0 and self.stream:
                    continue  # part of a frame; the rest is still on its way
                if n < P.VNET_HDR_LEN + P.ETH_MIN_LEN:
                    continue
                self.pending[tap] = n
            if not self._deliver(index, queue, memoryview(self.buffers[tap])[:self.pending[tap]]):
                self._pause(tap, fd, True)
                break
            self.pending[tap] = 0
        else:
            V.signal_used(self.mem, queue, self.interrupt)
            return
        if not self.pending[tap]:
            self._pause(tap, fd, False)
        V.signal_used(self.mem, queue, self.interrupt)

    def _pause(self, tap: int, fd: int, paused: bool) -> None:
        if self.paused[tap] == paused or self.queue_worker is None:
            return  # (None: the worker is still starting; the next turn tries again)
        self.paused[tap] = paused
        self._update_watch(tap)

    def _next_chain(self, index: int, queue: Queue, taken: int) -> DescriptorChain | None:
        held = self.reserved.setdefault(index, [])
        if taken < len(held):
            return held[taken]
        chain = queue.pop(self.mem)
        if chain is None:
            queue.set_avail_event(self.mem)
            chain = queue.pop(self.mem)  # one added while the event was being armed
        if chain is not None:
            held.append(chain)
        return chain

    def _deliver(self, index: int, queue: Queue, frame: memoryview) -> bool:
        """Put one frame (vnet header first) into receive buffers. False: no buffer yet
        (the frame waits); True: delivered or dropped."""
        held = self.reserved.setdefault(index, [])
        need = len(frame)
        chains: list[DescriptorChain] = []
        room = 0
        discarded = 0
        while room < need:
            if len(chains) >= queue.size:  # every buffer the ring can hold is too small
                self.stats.rx_dropped_no_room += 1
                return True
            if discarded >= queue.size:
                # A ring's worth of useless buffers: the frame waits for the next kick,
                # so a guest re-posting them cannot hold the worker here.
                return False
            chain = self._next_chain(index, queue, len(chains))
            if chain is None:
                return False
            if chain.writable_len() < P.VNET_HDR_LEN:
                # Useless to anyone: give it back empty and carry on.
                self.stats.rx_bad_buffers += 1
                held.remove(chain)
                queue.add_used(self.mem, chain.index, 0)
                discarded += 1
                continue
            chains.append(chain)
            room += chain.writable_len()
            if not self.mrg and room < need:
                # Without mergeable buffers a frame needs one chain that holds it all.
                self.stats.rx_dropped_no_room += 1
                return True  # the chain stays reserved for the next frame
        # The TAP leaves num_buffers (the header's last 2 bytes) for us to fill.
        struct.pack_into("<H", frame, P.VNET_HDR_LEN - 2, len(chains))
        pos = 0
        for chain in chains:
            writer = Writer(self.mem, chain)
            take = min(need - pos, writer.available_bytes())
            writer.write(frame[pos:pos + take])
            pos += take
            queue.add_used(self.mem, chain.index, take)
        del held[:len(chains)]
        self.stats.rx_frames += 1
        return True

    # -- control queue ----------------------------------------------------------
    def control(self, chain: DescriptorChain) -> int:
        writer = Writer(self.mem, chain)
        if writer.available_bytes() < 1:
            _guest_log.warning("%s: control request without an ack byte", self.dev.label)
            return 0
        ack = writer.split_end_writer(1)
        status = P.CTRL_ERR
        try:
            reader = Reader(self.mem, chain)
            if reader.available_bytes() > P.MAX_CTRL_DATA:
                raise P.HeaderError(f"control request of {reader.available_bytes()} bytes")
            status = self._execute(P.parse_ctrl(reader.read_all()))
        except (P.HeaderError, ShortBuffer) as e:
            _guest_log.warning("%s: bad control request: %s", self.dev.label, e)
        ack.write(bytes([status]))
        return 1

    def _execute(self, command: P.CtrlCommand) -> int:
        if command.cls == P.CLASS_MQ and self.acked >> P.F_MQ & 1:
            pairs = P.mq_pairs_requested(command, self.dev.pairs)
            if any(i not in self.queues for i in range(2 * pairs)):
                raise P.HeaderError(f"VQ_PAIRS_SET {pairs} with queues not enabled")
            self.active_pairs = pairs
            for tap, fd in enumerate(self.dev.tap_fds):
                if self.paused[tap]:  # its frame may now go to another queue
                    self._pause(tap, fd, False)
            return P.CTRL_OK
        if command.cls == P.CLASS_GUEST_OFFLOADS and self.acked >> P.F_CTRL_GUEST_OFFLOADS & 1:
            if command.cmd != 0 or len(command.data) != 8:
                raise P.HeaderError("bad GUEST_OFFLOADS_SET")
            (offloads,) = struct.unpack("<Q", command.data)
            if offloads & ~(self.acked & P.GUEST_OFFLOADS):
                raise P.HeaderError(f"guest offloads {offloads:#x} were not negotiated")
            return P.CTRL_OK if self.dev._apply_offload(P.tap_offload_flags(offloads)) \
                else P.CTRL_ERR
        raise P.HeaderError(f"unsupported control class {command.cls} command {command.cmd}")
