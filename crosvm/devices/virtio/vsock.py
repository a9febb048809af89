"""virtio-vsock (type 19) in userspace, bridged to Unix sockets ("hybrid vsock").

The protocol Firecracker and Cloud Hypervisor document, for hosts without
/dev/vhost-vsock:

  * host -> guest: a host program connects to `uds_path` and writes `CONNECT <port>\\n`;
    the device asks the guest (REQUEST) and, once a guest program accepts, answers
    `OK <host_port>\\n` and relays bytes; if nobody listens the guest resets and the
    host socket is closed.
  * guest -> host: a guest program connects to CID 2, port P; the device connects to
    `<uds_path>_P` and relays, or resets the guest's socket if nobody listens there.

The worker owns the three queues (rx, tx, event) and every connection. Flow control
is the stream credit (vsock_proto.Credit): the device reads a host socket only as
far as the guest has room, and gives each guest connection a fixed buffer, so what it
holds is bounded per connection and in total. A guest that breaks the protocol gets
RST for that connection; nothing it sends stops the device.
"""

from __future__ import annotations

import collections
import errno
import logging
import os
import socket
import stat
import struct

from crosvm.base import Event
from crosvm.base.ratelimit import RateLimitedLog
from crosvm.devices.virtio import virtio_device as V
from crosvm.devices.virtio import vsock_proto as P
from crosvm.devices.virtio.descriptor_utils import Reader, Writer
from crosvm.devices.virtio.queue import DescriptorChain, Queue
from crosvm.jail.jail import JailConfig
from crosvm.vm_memory import GuestMemory

log = logging.getLogger(__name__)
_guest_log = RateLimitedLog(log)

TYPE_VSOCK = 19
QUEUE_SIZE = 256
RX, TX, EVENT = 0, 1, 2
MAX_CONTROL = 1024      # control packets waiting for receive buffers; more are dropped
MAX_ACCEPTING = 32      # host connections that have not sent their CONNECT line yet
CONNECT_LINE_MAX = 32   # "CONNECT 4294967295\n" is 19 bytes
FIRST_HOST_PORT = 1 << 30  # ports the device gives host-initiated connections


class VsockError(Exception):
    """The vsock device cannot be set up (its socket path, say)."""


def listen_unix(path: str) -> socket.socket:
    """Bind and listen on `path`; a stale socket file nobody listens on is replaced
    (anything that is not a socket is left alone and refused)."""
    if os.path.lexists(path):
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            raise VsockError(f"vsock: uds-path {path} exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except ConnectionRefusedError:
            os.unlink(path)  # left by a VM that died: nobody is there
        except OSError as e:
            raise VsockError(f"vsock: uds-path {path} exists and is not a socket "
                             f"({e.strerror})") from None
        else:
            raise VsockError(f"vsock: uds-path {path} is in use by another program")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.bind(path)
        sock.listen(64)
    except OSError as e:
        sock.close()
        raise VsockError(f"vsock: cannot listen on {path}: {e.strerror}") from None
    sock.setblocking(False)
    return sock


def _clip(views: list[memoryview], count: int) -> list[memoryview]:
    """The first `count` bytes of `views`."""
    out = []
    for v in views:
        if count <= 0:
            break
        out.append(v[:count])
        count -= len(out[-1])
    return out


class Vsock(V.VirtioDevice):
    """The device: guest CID in config space, a listening socket, and a worker."""

    device_type = TYPE_VSOCK
    seccomp_policy = "vsock_device"

    def __init__(self, cid: int, uds_path: str, listener: socket.socket | None = None,
                 label: str = "vsock") -> None:
        if not P.MIN_GUEST_CID <= cid <= P.MAX_GUEST_CID:
            raise ValueError(f"guest CID {cid} is reserved")
        self.cid = cid
        # Resolved once: the jail binds this directory and guest connections go into
        # it, inside the jail (where the cwd is /) as outside.
        self.uds_path = os.path.join(os.path.realpath(os.path.dirname(uds_path) or "."),
                                     os.path.basename(uds_path))
        self.listener = listener if listener is not None else listen_unix(self.uds_path)
        st = os.stat(self.uds_path)
        self.socket_id = (st.st_dev, st.st_ino)  # to remove only our own at exit
        self.label = label
        self.acked_features = 0

    def debug_label(self) -> str:
        return self.label

    def queue_max_sizes(self) -> list[int]:
        return [QUEUE_SIZE] * 3

    def features(self) -> int:
        return V.BASE_FEATURES | 1 << P.F_STREAM

    def config_bytes(self) -> bytes:
        return struct.pack("<Q", self.cid)

    def keep_fds(self) -> list[int]:
        return [self.listener.fileno()]

    def jail_config(self) -> JailConfig:
        """The jailed device must see where guest connections go."""
        return JailConfig(binds=[os.path.dirname(self.uds_path)])

    def activate(self, mem: GuestMemory, interrupt: V.Interrupt,
                 queues: list[tuple[int, Queue, Event]]) -> None:
        if len(queues) != 3:
            raise ValueError(f"virtio-vsock needs 3 queues, got {len(queues)}")
        worker = VsockWorker(self, mem, interrupt, {i: q for i, q, _ in queues},
                             {i: e for i, _, e in queues})
        self.worker = V.QueueWorker(
            f"v_{self.label}", interrupt, [(i, e) for i, _, e in queues], worker.handle,
            extra=[(self.listener.fileno(), worker.accept)], on_start=worker.started)
        self.state = worker

    def reset(self) -> bool:
        ok = super().reset()
        state = getattr(self, "state", None)
        if state is not None:
            state.qw = None  # its epoll is gone with the thread
            state.close_all()  # connections do not outlive the driver that made them
            self.state = None
        return ok

    def close(self) -> None:
        super().close()
        self.listener.close()


class Conn:
    """One connection: its host socket, credit, and what waits for the host socket."""

    def __init__(self, key: tuple[int, int], sock: socket.socket, open_: bool) -> None:
        self.key = key  # (guest port, host port)
        self.sock = sock
        self.fd = sock.fileno()
        self.open = open_  # False until the guest answers a host-initiated REQUEST
        self.credit = P.Credit()
        self.pending = bytearray()  # guest bytes the host socket has not taken yet
        self.not_guest = 0          # leading bytes of `pending` that are the OK line
        self.guest_shut = 0         # SHUTDOWN flags the guest sent
        self.host_eof = False       # the host will send no more (guest told)
        self.readable = False       # the host socket had data when last polled
        self.watching = (False, False)
        self.update_queued = False  # a CREDIT_UPDATE waits in the control queue


class VsockWorker:
    """Everything live: the queues, the connections, what waits for receive buffers."""

    def __init__(self, dev: Vsock, mem: GuestMemory, interrupt: V.Interrupt,
                 queues: dict[int, Queue], events: dict[int, Event]) -> None:
        self.dev = dev
        self.mem = mem
        self.interrupt = interrupt
        self.queues = queues
        self.events = events
        self.conns: dict[tuple[int, int], Conn] = {}
        self.accepting: dict[int, socket.socket] = {}
        self.lines: dict[int, bytearray] = {}  # CONNECT lines being read, by fd
        self.draining: dict[int, Conn] = {}  # reset by the guest, flushing to the host
        self.control: collections.deque[P.Header] = collections.deque()
        self.ready: dict[tuple[int, int], None] = {}  # connections with host data, in turn
        self.spare: DescriptorChain | None = None     # a receive chain popped, not used
        self.next_port = FIRST_HOST_PORT
        self.qw: V.QueueWorker | None = None
        self.dropped_control = 0

    def started(self, queue_worker: V.QueueWorker) -> None:
        self.qw = queue_worker

    # -- queues ------------------------------------------------------------------
    def handle(self, index: int) -> bool:
        if index == TX:
            more = V.process_queue(self.mem, self.queues[TX], self.interrupt, self.guest_packet)
            self.flush_rx()
            return more
        if index == RX:
            self.flush_rx()
        return False  # event buffers wait for an event

    def guest_packet(self, chain: DescriptorChain) -> int:
        """One packet from the guest's transmit queue."""
        reader = Reader(self.mem, chain)
        if reader.available_bytes() < P.HDR_LEN:
            _guest_log.warning("%s: dropping a %d-byte packet (shorter than a header)",
                               self.dev.label, reader.available_bytes())
            return 0
        h = P.Header.unpack(reader.read(P.HDR_LEN))
        try:
            P.check_guest_header(h, self.dev.cid, reader.available_bytes())
        except P.PacketError as e:
            _guest_log.warning("%s: bad packet: %s", self.dev.label, e)
            named = self.conns.get((h.src_port, h.dst_port))
            if named is not None:
                self._reset(named)  # the connection it names goes, on both sides
            else:
                self._refuse(h)
            return 0
        key = (h.src_port, h.dst_port)
        conn = self.conns.get(key)
        if h.op == P.OP_REQUEST:
            self._guest_connects(h, conn)
        elif conn is None:
            if h.op != P.OP_RST:
                self._refuse(h)
        elif h.op == P.OP_RST:
            self._drain_or_close(conn)
        else:
            conn.credit.update_peer(h)
            try:
                self._on_conn_packet(conn, h, reader)
            except P.PacketError as e:
                _guest_log.warning("%s: port %d: %s", self.dev.label, h.src_port, e)
                self._reset(conn)
        return 0

    def _on_conn_packet(self, conn: Conn, h: P.Header, reader: Reader) -> None:
        if h.op == P.OP_RESPONSE:
            if conn.open:
                raise P.PacketError("RESPONSE on an open connection")
            conn.open = True
            ok = f"OK {conn.key[1]}\n".encode()
            conn.pending[:0] = ok
            conn.not_guest += len(ok)  # the device's words, not the guest's: no credit
            self._flush_host(conn)
        elif not conn.open:
            raise P.PacketError(f"{P.OP_NAMES[h.op]} before the guest accepted")
        elif h.op == P.OP_RW:
            if conn.guest_shut & P.SHUTDOWN_SEND:
                raise P.PacketError("data after the guest's SHUTDOWN(SEND)")
            conn.credit.received(h.len)
            if h.len:
                self._to_host(conn, reader, h.len)
        elif h.op == P.OP_SHUTDOWN:
            conn.guest_shut |= h.flags
            if conn.guest_shut & P.SHUTDOWN_RCV:
                self.ready.pop(conn.key, None)
            self._flush_host(conn)
        elif h.op == P.OP_CREDIT_REQUEST:
            self._credit_update(conn)
        # CREDIT_UPDATE: the credit is taken from every header (above).
        if conn.key in self.conns:
            self._update_watch(conn)

    # -- guest -> host -------------------------------------------------------------
    def _guest_connects(self, h: P.Header, old: Conn | None) -> None:
        if old is not None:
            _guest_log.warning("%s: REQUEST for port %d, which is in use", self.dev.label,
                               h.src_port)
            self._reset(old)
            return
        if self._open_count() >= P.MAX_CONNECTIONS:
            _guest_log.warning("%s: %d connections open; refusing another",
                               self.dev.label, P.MAX_CONNECTIONS)
            self._refuse(h)
            return
        try:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC
                                 | socket.SOCK_NONBLOCK)
        except OSError as e:  # out of fds, say
            _guest_log.warning("%s: no socket for a guest connection: %s", self.dev.label, e)
            self._refuse(h)
            return
        try:
            sock.connect(f"{self.dev.uds_path}_{h.dst_port}")  # Unix: never in progress
        except OSError as e:
            if e.errno in (errno.ENOENT, errno.ECONNREFUSED, errno.EAGAIN):  # nobody
                # listens, or the listener's backlog is full: normal
                log.debug("%s: guest connect to port %d: %s", self.dev.label, h.dst_port, e)
            else:  # EACCES: a sandboxed device is an unprivileged uid outside its jail
                _guest_log.warning(
                    "%s: cannot connect to %s_%d for the guest: %s (a sandboxed device is "
                    "an unprivileged user outside its jail: the directory must be "
                    "searchable and the socket writable by others)", self.dev.label,
                    self.dev.uds_path, h.dst_port, e.strerror)
            sock.close()
            self._refuse(h)
            return
        conn = Conn((h.src_port, h.dst_port), sock, open_=True)
        conn.credit.update_peer(h)
        self.conns[conn.key] = conn
        self._send(conn.key, P.OP_RESPONSE)
        self._update_watch(conn)

    def _to_host(self, conn: Conn, reader: Reader, n: int) -> None:
        if conn.pending:  # behind what waits: keep order
            conn.pending += reader.read(n)
            return
        sent = self._write_host(conn, reader.views(n))
        if sent is None:
            return
        reader.consume(sent)
        conn.credit.forwarded(sent)
        if sent < n:
            conn.pending += reader.read(n - sent)
        self._credit_check(conn)

    def _write_host(self, conn: Conn, buffers: list) -> int | None:
        """Bytes the host socket took (0 when it is full), or None when it is gone
        (and the connection has been reset)."""
        try:
            return os.writev(conn.fd, buffers)
        except BlockingIOError:
            return 0
        except OSError as e:
            log.debug("%s: host socket for port %d: %s", self.dev.label, conn.key[0], e)
            self._reset(conn)
            return None

    def _flush_host(self, conn: Conn) -> None:
        """Write what waits for the host socket; then act on a guest shutdown."""
        if conn.pending:
            sent = self._write_host(conn, [conn.pending])
            if sent is None:
                return
            del conn.pending[:sent]
            ours = min(sent, conn.not_guest)
            conn.not_guest -= ours
            conn.credit.forwarded(sent - ours)
            self._credit_check(conn)
        if conn.pending:
            return
        if conn.guest_shut & P.SHUTDOWN_SEND:
            try:
                conn.sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass
        if conn.guest_shut == P.SHUTDOWN_BOTH:
            # The guest closed: the peer's RST ends it (virtio 5.10.6.6).
            self._reset(conn)

    def _credit_check(self, conn: Conn) -> None:
        if conn.credit.wants_update():
            self._credit_update(conn)

    def _credit_update(self, conn: Conn) -> None:
        """One CREDIT_UPDATE at a time per connection: it carries the count when sent."""
        if not conn.update_queued:
            conn.update_queued = self._send(conn.key, P.OP_CREDIT_UPDATE)

    # -- host -> guest -------------------------------------------------------------
    def accept(self) -> None:
        """The listening socket is readable: take the new host connections."""
        for _ in range(MAX_ACCEPTING):
            try:
                sock, _ = self.dev.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:  # EMFILE and the like: the listener stays
                _guest_log.warning("%s: accept failed: %s", self.dev.label, e)
                return
            if len(self.accepting) >= MAX_ACCEPTING:
                # The oldest connection still without its CONNECT line makes room: idle
                # ones cannot lock host programs out.
                oldest = next(iter(self.accepting))
                self._forget(oldest)
                self.accepting.pop(oldest).close()
                self.lines.pop(oldest, None)
            sock.setblocking(False)
            fd = sock.fileno()
            self.accepting[fd] = sock
            if self.qw is not None:
                self.qw.watch(fd, True, callback=lambda fd=fd: self._connect_line(fd))

    def _connect_line(self, fd: int) -> None:
        """Read the CONNECT line a byte at a time: nothing after its newline is taken
        (that is stream data), and what arrived is consumed, so a line sent in pieces
        does not keep the socket readable while the rest is on its way."""
        sock = self.accepting.get(fd)
        if sock is None:
            return
        line = self.lines.setdefault(fd, bytearray())
        while not line.endswith(b"\n") and len(line) < CONNECT_LINE_MAX:
            try:
                byte = sock.recv(1)
            except BlockingIOError:
                return  # the rest of the line is still coming
            except OSError:
                byte = b""
            if not byte:
                break
            line += byte
        self._forget(fd)
        del self.accepting[fd]
        del self.lines[fd]
        try:
            if not line.endswith(b"\n"):
                raise P.PacketError("no CONNECT line" if len(line) < CONNECT_LINE_MAX
                                    else "CONNECT line too long")
            port = P.parse_connect_line(bytes(line))
        except P.PacketError as e:
            _guest_log.warning("%s: host connection refused: %s", self.dev.label, e)
            sock.close()
            return
        if self._open_count() >= P.MAX_CONNECTIONS:
            _guest_log.warning("%s: %d connections open; refusing a host connection",
                               self.dev.label, P.MAX_CONNECTIONS)
            sock.close()
            return
        conn = Conn((port, self._host_port()), sock, open_=False)
        self.conns[conn.key] = conn
        self._send(conn.key, P.OP_REQUEST)
        self.flush_rx()

    def _host_port(self) -> int:
        while True:
            port = self.next_port
            self.next_port = port + 1 if port < 0xFFFF_FFFE else FIRST_HOST_PORT
            if not any(key[1] == port for key in self.conns):
                return port

    def host_event(self, conn: Conn) -> None:
        """The host socket is readable or writable (or hung up)."""
        if conn.key not in self.conns:
            return
        if conn.pending or conn.watching[1]:
            self._flush_host(conn)
            if conn.key not in self.conns:
                return
        if conn.watching[0]:
            conn.readable = True
            self.ready[conn.key] = None
        self._update_watch(conn)
        self.flush_rx()

    def _wants_read(self, conn: Conn) -> bool:
        return (conn.open and not conn.host_eof and not conn.readable
                and not conn.guest_shut & P.SHUTDOWN_RCV and conn.credit.peer_free() > 0)

    def _update_watch(self, conn: Conn) -> None:
        want = (self._wants_read(conn), bool(conn.pending))
        if conn.readable and conn.credit.peer_free() > 0 and conn.open \
                and not conn.guest_shut & P.SHUTDOWN_RCV:
            self.ready.setdefault(conn.key, None)
        if want != conn.watching and self.qw is not None:
            self.qw.watch(conn.fd, *want, callback=lambda c=conn: self.host_event(c))
            conn.watching = want

    # -- the receive queue ---------------------------------------------------------
    def flush_rx(self) -> None:
        """Fill receive buffers: control packets first, then data, one packet per
        connection in turn."""
        queue = self.queues[RX]
        budget = 2 * queue.size
        try:
            while budget and (self.control or self.ready):
                chain = self._rx_chain(queue)
                if chain is None:
                    return
                budget -= 1
                if self.control:
                    self._put_control(queue, chain, self.control.popleft())
                else:
                    self._put_data(queue, chain)
            if budget == 0 and (self.control or self.ready):
                self.events[RX].signal()  # come back after the other events
        finally:
            V.signal_used(self.mem, queue, self.interrupt)

    def _rx_chain(self, queue: Queue) -> DescriptorChain | None:
        chain, self.spare = self.spare, None
        while chain is None:
            chain = queue.pop(self.mem)
            if chain is None:
                queue.set_avail_event(self.mem)
                chain = queue.pop(self.mem)  # one added while the event was armed
                if chain is None:
                    return None
            if chain.writable_len() < P.HDR_LEN:
                _guest_log.warning("%s: receive buffer of %d bytes is too small",
                                   self.dev.label, chain.writable_len())
                queue.add_used(self.mem, chain.index, 0)
                chain = None
        return chain

    def _put_control(self, queue: Queue, chain: DescriptorChain, h: P.Header) -> None:
        conn = self.conns.get((h.dst_port, h.src_port))
        if conn is not None:
            conn.credit.stamp(h)
            if h.op == P.OP_CREDIT_UPDATE:
                conn.update_queued = False
        Writer(self.mem, chain).write(h.pack())
        queue.add_used(self.mem, chain.index, P.HDR_LEN)

    def _put_data(self, queue: Queue, chain: DescriptorChain) -> None:
        key = next(iter(self.ready))
        del self.ready[key]
        conn = self.conns.get(key)
        if conn is None or not conn.readable:
            self.spare = chain
            return
        credit = conn.credit.peer_free()
        if credit <= 0:  # the guest has no room: its CREDIT_UPDATE puts it back in turn
            self.spare = chain
            return
        room = min(chain.writable_len() - P.HDR_LEN, credit, P.MAX_PAYLOAD)
        if room <= 0:  # a buffer with room for a header only: useless for data
            _guest_log.warning("%s: receive buffer with no room for data", self.dev.label)
            queue.add_used(self.mem, chain.index, 0)
            self.ready[key] = None
            return
        addr, first = chain.writable[0]
        if first >= P.HDR_LEN:  # the usual layout: the header at the start of a buffer
            writer = None
            views = [self.mem.slice(a, n) for a, n in chain.writable]
            views[0] = views[0][P.HDR_LEN:]
        else:
            writer = Writer(self.mem, chain)
            views = Writer(self.mem, regions=writer.split_end(
                writer.available_bytes() - P.HDR_LEN)).views(room)
        views = _clip(views, room)
        try:
            n = os.readv(conn.fd, views)
        except BlockingIOError:
            conn.readable = False
            self.spare = chain
            self._update_watch(conn)
            return
        except OSError as e:
            log.debug("%s: host socket for port %d: %s", self.dev.label, key[0], e)
            n = -1
        h = P.Header(P.HOST_CID, self.dev.cid, key[1], key[0], 0, P.TYPE_STREAM, P.OP_RW)
        if n > 0:
            h.len = n
            conn.credit.sent(n)
            self.ready[key] = None  # more may wait: its next turn comes after the others
        elif n == 0:  # the host will send no more
            h.op, h.flags = P.OP_SHUTDOWN, P.SHUTDOWN_SEND
            conn.host_eof, conn.readable = True, False
        else:
            h.op = P.OP_RST
        raw = conn.credit.stamp(h).pack()
        if writer is None:
            self.mem.write(addr, raw)
        else:
            writer.write(raw)
        queue.add_used(self.mem, chain.index, P.HDR_LEN + max(n, 0))
        if h.op == P.OP_RST:
            self._close(conn)
        elif n <= 0 or conn.credit.peer_free() <= 0:
            self._update_watch(conn)  # what it waits for changed

    def _send(self, key: tuple[int, int], op: int, flags: int = 0) -> bool:
        """Queue a control packet for connection `key` (guest port, host port)."""
        return self._queue(P.Header(P.HOST_CID, self.dev.cid, key[1], key[0], 0,
                                    P.TYPE_STREAM, op, flags))

    def _queue(self, h: P.Header) -> bool:
        """False when it was dropped: RSTs and credit updates are bounded; a REQUEST or
        RESPONSE (at most one per connection) always goes."""
        if len(self.control) >= MAX_CONTROL and h.op not in (P.OP_REQUEST, P.OP_RESPONSE):
            self.dropped_control += 1
            _guest_log.warning("%s: %d control packets wait for receive buffers; "
                               "dropping one", self.dev.label, MAX_CONTROL)
            return False
        self.control.append(h)
        return True

    def _refuse(self, h: P.Header) -> None:
        """RST in answer to a guest packet no connection takes (never to an RST)."""
        if h.op != P.OP_RST:
            self._queue(P.Header(P.HOST_CID, self.dev.cid, h.dst_port, h.src_port, 0,
                                 P.TYPE_STREAM, P.OP_RST))

    # -- ending connections --------------------------------------------------------
    def _reset(self, conn: Conn) -> None:
        """Tell the guest the connection is gone, and close the host socket."""
        self._send(conn.key, P.OP_RST)
        self._close(conn)

    def _drain_or_close(self, conn: Conn) -> None:
        """The guest reset the connection: what it sent before still goes to the host
        (as a kernel's socket would hold it), then the host socket closes."""
        if not conn.pending or not conn.open:
            self._close(conn)
            return
        self.conns.pop(conn.key, None)  # the guest may reuse the ports at once
        self.ready.pop(conn.key, None)
        conn.guest_shut = P.SHUTDOWN_BOTH
        self.draining[conn.fd] = conn
        if self.qw is not None:
            self.qw.watch(conn.fd, False, True, callback=lambda c=conn: self._drain(c))
        conn.watching = (False, True)

    def _drain(self, conn: Conn) -> None:
        try:
            sent = os.write(conn.fd, conn.pending)
        except BlockingIOError:
            return
        except OSError:
            sent = len(conn.pending)  # the host is gone: nothing left to deliver
        del conn.pending[:sent]
        if not conn.pending:
            self.draining.pop(conn.fd, None)
            self._forget(conn.fd)
            conn.sock.close()

    def _open_count(self) -> int:
        """Connections holding a host socket and buffer, draining ones included."""
        return len(self.conns) + len(self.draining)

    def _close(self, conn: Conn) -> None:
        self.conns.pop(conn.key, None)
        self.ready.pop(conn.key, None)
        self._forget(conn.fd)
        conn.sock.close()

    def _forget(self, fd: int) -> None:
        if self.qw is not None:
            self.qw.forget(fd)

    def close_all(self) -> None:
        """Close every host socket (the worker has stopped, or is about to be told)."""
        for conn in list(self.conns.values()):
            self._close(conn)
        for conn in list(self.draining.values()):
            self._forget(conn.fd)
            conn.sock.close()
        self.draining.clear()
        for fd, sock in self.accepting.items():
            self._forget(fd)
            sock.close()
        self.accepting.clear()
        self.lines.clear()

    def transport_reset(self) -> bool:
        """Drop every connection and tell the guest (VIRTIO_VSOCK_EVENT_TRANSPORT_RESET),
        as after a restore: its sockets are reset. False if it gave no event buffer."""
        self.close_all()
        self.control.clear()
        self.ready.clear()
        queue = self.queues[EVENT]
        chain = queue.pop(self.mem)
        if chain is None:
            return False
        writer = Writer(self.mem, chain)
        if writer.available_bytes() < P.EVENT.size:
            queue.add_used(self.mem, chain.index, 0)
            V.signal_used(self.mem, queue, self.interrupt)
            return False
        writer.write(P.EVENT.pack(P.EVENT_TRANSPORT_RESET))
        queue.add_used(self.mem, chain.index, P.EVENT.size)
        V.signal_used(self.mem, queue, self.interrupt)
        return True

