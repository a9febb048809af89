"""Fuzz target: virtio-vsock (crosvm/devices/virtio/vsock.py) between a hostile guest
driver and hostile host programs.

The driver posts transmit packets (a 44-byte header of plausible fields, the right
CIDs, ports and ops mostly, one field from anywhere sometimes, or raw bytes; payloads
split over buffers; lengths that lie), receive buffers of any size (shorter than a
header too) and event buffers, in fuzzer-chosen order. Host programs connect to the
device's socket and write CONNECT lines, parts of them or garbage; listen on
`<uds_path>_<port>` for the guest's connections; send, read, half-close and close at
random. The worker's callbacks run synchronously: the queue handlers, the listener's
accept callback and the per-connection callbacks it registers with `watch`, each
called when its fd is ready for what it waits for, as the worker's epoll would (and
now and then when it is not). The device's bounds are made small for the input
(restored after), and its host sockets take only a few KiB, so a short input reaches
them.

Invariants: nothing escapes the worker's callbacks (a transmit packet's exception,
which the queue loop would only log, included); every used receive length is 0 or at
least a header and fits its chain; every received header is from CID 2 to the guest's
CID, STREAM, a known op, with `len` the used length less the header (0 but for RW);
an RW never takes the guest past the credit it last gave (buf_alloc, fwd_cnt) for
that connection; the device never holds more than BUF_ALLOC guest bytes for a
connection, more than MAX_CONNECTIONS connections, MAX_ACCEPTING half-open host
connections or MAX_CONTROL control packets; an RST the device sends names no
connection it keeps; every fd with a callback is a socket the device still has, and
a host connection waiting for its CONNECT line is watched; once the host and the
guest stop, the worker settles (no watched fd stays ready: a callback that leaves
its fd ready would spin the real worker); no fd outlives the input.
"""

from __future__ import annotations

import atexit
import os
import select
import shutil
import socket
import tempfile

import atheris

from crosvm.devices.virtio import vsock as VS
from crosvm.devices.virtio import vsock_proto as P
from crosvm.devices.virtio.virtio_device import BASE_FEATURES, Interrupt

from fuzz import guest

GUEST_PORTS = [1000, 1001, 1002]
HOST_PORTS = [5000, 5001, 5002]
U32 = 0xFFFF_FFFF
# The device's bounds for one input: small, so that 4 KiB of fuzzer bytes reach them.
LIMITS = ((P, "BUF_ALLOC", 0x4000), (P, "MAX_CONNECTIONS", 3), (VS, "MAX_CONTROL", 8),
          (VS, "MAX_ACCEPTING", 3))
HOST_SNDBUF = 4096   # the device's host sockets block after a few KiB (a slow host)
SETTLE_ROUNDS = 64   # epoll rounds the worker gets to go quiet once nobody acts
_dir: str | None = None


class Finding(BaseException):
    """An invariant broke. A BaseException, so the queue loop (which logs a failing
    request's Exception and goes on) cannot swallow it."""


def expect(ok: bool, message) -> None:
    if not ok:
        raise Finding(message() if callable(message) else message)


def _uds_path() -> str:
    """The device's socket path, in a directory made once per process."""
    global _dir
    if _dir is None:
        _dir = tempfile.mkdtemp(prefix="crosvm-fuzz-vsock-")
        atexit.register(shutil.rmtree, _dir, True)
    return os.path.join(_dir, "v.sock")


def _fds() -> list[str]:
    return os.listdir("/proc/self/fd")


class Kick:
    """A queue's event: the worker signals its own RX queue to come back later."""

    def __init__(self) -> None:
        self.set = False

    def signal(self) -> None:
        self.set = True


class Track:
    """One connection as the guest sees it: the credit it last gave, and the RW bytes
    it got (both as u32 counters, as on the wire)."""

    def __init__(self, conn, buf_alloc: int, fwd_cnt: int) -> None:
        self.conn = conn
        self.buf_alloc = buf_alloc
        self.fwd_cnt = fwd_cnt
        self.got = 0


def one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    mem = guest.clean_memory()
    path = _uds_path()
    saved = [(mod, name, getattr(mod, name)) for mod, name, _ in LIMITS]
    before = _fds()
    run = None
    try:
        for mod, name, value in LIMITS:
            setattr(mod, name, value)
        run = Run(fdp, mem, path)
        run.start()
        run.drive()
    finally:
        if run is not None:
            run.close()
        for mod, name, value in saved:
            setattr(mod, name, value)
    after = _fds()  # `run` still holds the worker: nothing it leaked is collected yet
    expect(len(after) == len(before), lambda: "fds leaked: " + ", ".join(
        _describe_fd(fd) for fd in sorted(set(after) - set(before))))


def _describe_fd(fd: str) -> str:
    try:
        return f"{fd} -> {os.readlink(f'/proc/self/fd/{fd}')}"
    except OSError:
        return fd


class Run:
    """One input: the device, the guest's three queues, the host's sockets."""

    def __init__(self, fdp: atheris.FuzzedDataProvider, mem, path: str) -> None:
        self.fdp = fdp
        self.mem = mem
        self.path = path
        self.host: list[socket.socket] = []            # host programs' connections
        self.listeners: dict[int, socket.socket] = {}  # port -> listening at path_port
        self.cid = (3 if fdp.ConsumeIntInRange(0, 7)
                    else fdp.ConsumeIntInRange(P.MIN_GUEST_CID, P.MAX_GUEST_CID))
        self.dev: VS.Vsock | None = None
        self.tracks: dict[tuple[int, int], Track] = {}  # (guest port, host port) -> Track
        self.keys = [(g, h) for g in GUEST_PORTS for h in HOST_PORTS]

    def start(self) -> None:
        """The device, activated on the guest's three queues (its worker not started)."""
        mem = self.mem
        self.dev = VS.Vsock(self.cid, self.path)
        self.dev.ack_features(BASE_FEATURES | 1 << P.F_STREAM)
        self.rx = guest.Driver(mem, 16, base=0x1000, start=0x4000, end=0x14000)
        self.tx = guest.Driver(mem, 16, base=0x14000, start=0x17000, end=0x40000)
        self.ev = guest.Driver(mem, 8, base=0x50000, start=0x53000, end=0x60000)
        self.kicks = [Kick() for _ in range(3)]
        queues = [(VS.RX, self.rx.q.queue, self.kicks[VS.RX]),
                  (VS.TX, self.tx.q.queue, self.kicks[VS.TX]),
                  (VS.EVENT, self.ev.q.queue, self.kicks[VS.EVENT])]
        self.handle, self.actions = guest.activate_sync(self.dev, mem, Interrupt(None, None),
                                                        queues)
        self.worker = self.dev.state
        self.qw = self.worker.qw  # guest._Recorder: `actions` and what each fd waits for
        self.listener_fd = self.dev.listener.fileno()
        self._device_packet = self.worker.guest_packet
        self.worker.guest_packet = self._guest_packet  # handle(TX) looks it up per call

    # -- the input ---------------------------------------------------------------------
    def drive(self) -> None:
        fdp = self.fdp
        for port in HOST_PORTS:  # host programs that were there before the guest
            if fdp.ConsumeBool():
                self.host_listens(port)
        for _ in range(fdp.ConsumeIntInRange(1, 32)):
            op = fdp.ConsumeIntInRange(0, 14)
            if op <= 2:
                self.guest_transmits()
            elif op <= 4:
                self.guest_receive_buffers()
            elif op == 5:
                self.ev.post([], [fdp.ConsumeIntInRange(0, 8)], fdp.ConsumeBool())
                self.handle(VS.EVENT)
            elif op <= 10:
                (self.host_connects, self.host_listens, self.host_accepts, self.host_sends,
                 self.host_reads_or_closes)[op - 6]()
                if fdp.ConsumeIntInRange(0, 3):  # the worker's epoll wakes up now
                    self.poll_round()
            elif op <= 12:
                self.poll_round(spurious=fdp.ConsumeIntInRange(0, 7) == 0)
            elif op == 13:
                self.kick(fdp.ConsumeIntInRange(0, 2))
            elif fdp.ConsumeIntInRange(0, 3) == 0:  # a restore, the worker paused
                self.worker.transport_reset()
            self.check()
        self.settle()

    def kick(self, index: int) -> None:
        self.kicks[index].set = False
        for _ in range(8):  # the real worker re-signals while handle() says more
            if not self.handle(index):
                break

    # -- the guest ---------------------------------------------------------------------
    def guest_transmits(self) -> None:
        fdp = self.fdp
        head, payload = self._packet()
        whole = head + payload
        cuts = sorted(fdp.ConsumeIntInRange(0, len(whole))
                      for _ in range(fdp.ConsumeIntInRange(0, 2)))
        parts = [whole[a:b] for a, b in zip([0, *cuts], [*cuts, len(whole)])]
        parts = [p for p in parts if p] or [b"\0"]
        writable = [fdp.ConsumeIntInRange(1, 64)] if fdp.ConsumeIntInRange(0, 15) == 0 else []
        self.tx.post(parts, writable, fdp.ConsumeBool())
        if fdp.ConsumeIntInRange(0, 3):
            self.kick(VS.TX)

    def _packet(self) -> tuple[bytes, bytes]:
        fdp = self.fdp
        if fdp.ConsumeIntInRange(0, 15) == 0:  # raw bytes, maybe short of a header
            return fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, P.HDR_LEN)), self._payload()
        key = self._key()
        op = fdp.ConsumeIntInRange(P.OP_REQUEST, P.OP_CREDIT_REQUEST)
        payload = self._payload() if op == P.OP_RW or fdp.ConsumeIntInRange(0, 15) == 0 else b""
        flags = fdp.ConsumeIntInRange(0, P.SHUTDOWN_BOTH) if op == P.OP_SHUTDOWN else 0
        if fdp.ConsumeIntInRange(0, 3):
            buf_alloc = 0x40000
        else:
            buf_alloc = fdp.PickValueInList([0, 1, 100, 4096, 0x10000, U32,
                                             fdp.ConsumeIntInRange(0, U32)])
        track = self.tracks.get(key)
        fwd_cnt = track.got if track is not None else 0  # all it got, consumed
        if fdp.ConsumeIntInRange(0, 7) == 0:
            fwd_cnt = (fwd_cnt + fdp.ConsumeIntInRange(-0x1000, 0x1000)) & U32
        h = P.Header(self.cid, P.HOST_CID, key[0], key[1], len(payload), P.TYPE_STREAM, op,
                     flags, buf_alloc, fwd_cnt)
        if fdp.ConsumeIntInRange(0, 5) == 0:  # one field from anywhere (a lying length...)
            name = fdp.PickValueInList(["src_cid", "dst_cid", "src_port", "dst_port", "len",
                                        "len", "type", "op", "flags", "fwd_cnt"])
            width = 0xFFFF if name in ("type", "op") else U32
            small = fdp.ConsumeBool()
            setattr(h, name, fdp.ConsumeIntInRange(0, min(width, 0x11000) if small else width))
        return h.pack(), payload

    def _payload(self) -> bytes:
        fdp = self.fdp
        if fdp.ConsumeBool():
            return fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 512))
        big = fdp.ConsumeIntInRange(0, 3) == 0  # over the credit, or a packet's limit
        return bytes([fdp.ConsumeIntInRange(0, 255)]) * fdp.ConsumeIntInRange(
            0, 0x11000 if big else P.BUF_ALLOC)

    def _key(self) -> tuple[int, int]:
        """Ports of a connection the guest may have (or a guess)."""
        fdp = self.fdp
        if fdp.ConsumeIntInRange(0, 15) == 0:
            return fdp.ConsumeIntInRange(0, U32), fdp.ConsumeIntInRange(0, U32)
        return self.keys[fdp.ConsumeIntInRange(0, len(self.keys) - 1)]

    def guest_receive_buffers(self) -> None:
        fdp = self.fdp
        sizes = []
        for _ in range(fdp.ConsumeIntInRange(1, 3)):
            kind = fdp.ConsumeIntInRange(0, 3)
            sizes.append(fdp.ConsumeIntInRange(1, P.HDR_LEN) if kind == 0 else
                         P.HDR_LEN + fdp.ConsumeIntInRange(0, 64) if kind == 1 else
                         fdp.ConsumeIntInRange(1, 0x3000))
        hostile = fdp.ConsumeIntInRange(0, 15) == 0  # a readable part first
        readable = [b"\0" * fdp.ConsumeIntInRange(1, 8)] if hostile else []
        for _ in range(fdp.ConsumeIntInRange(1, 4)):
            self.rx.post(readable, sizes, fdp.ConsumeBool())
        if fdp.ConsumeIntInRange(0, 3):
            self.kick(VS.RX)

    def _guest_packet(self, chain) -> int:
        """The device's own transmit handler, with what the guest knows around it."""
        w = self.worker
        self._check_rx()  # what came before this packet, under the credit before it
        self._sync()
        raw = guest.gather(self.mem, chain.readable, P.HDR_LEN)
        h = P.Header.unpack(raw) if len(raw) == P.HDR_LEN else None
        key = (h.src_port, h.dst_port) if h is not None else None
        before = w.conns.get(key)
        queued = len(w.control)
        refused = None
        if h is not None:
            try:
                P.check_guest_header(h, self.cid, chain.readable_len() - P.HDR_LEN)
            except P.PacketError as e:
                refused = e
        try:
            written = self._device_packet(chain)
        except Exception as e:  # the queue loop would log it and complete the chain
            raise Finding(f"the transmit handler raised {e!r}") from e
        expect(written == 0, f"the transmit handler wrote {written} bytes")
        for sent in list(w.control)[queued:]:
            expect(sent.op != P.OP_RST or (sent.dst_port, sent.src_port) not in w.conns,
                   lambda: f"RST to the guest for its port {sent.dst_port} (host port "
                   f"{sent.src_port}), answering {h} (refused: {refused}), but the device "
                   "keeps that connection and its host socket open")
        if h is None:
            return written
        after = w.conns.get(key)
        valid = refused is None
        if after is not None and after is not before:  # the REQUEST made it
            self._new_track(key, after, h.buf_alloc, h.fwd_cnt)
        elif after is not None and valid and h.op not in (P.OP_REQUEST, P.OP_RST):
            track = self.tracks[key]
            track.buf_alloc, track.fwd_cnt = h.buf_alloc, h.fwd_cnt
        return written

    # -- the host ----------------------------------------------------------------------
    def host_connects(self) -> None:
        fdp = self.fdp
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK
                          | socket.SOCK_CLOEXEC)
        try:
            s.connect(self.path)
        except OSError:
            s.close()
            return
        self.host.append(s)
        port = (fdp.PickValueInList(GUEST_PORTS) if fdp.ConsumeIntInRange(0, 7)
                else fdp.ConsumeIntInRange(0, U32))
        line = f"CONNECT {port}\n".encode()
        kind = fdp.ConsumeIntInRange(0, 4)
        if kind == 0:
            msg = line
        elif kind == 1:
            msg = line + fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 64))
        elif kind == 2:
            msg = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 40))
        elif kind == 3:
            msg = line[:fdp.ConsumeIntInRange(0, len(line))]  # the rest may never come
        else:
            msg = b""
        _send(s, msg)

    def host_listens(self, port: int | None = None) -> None:
        port = self.fdp.PickValueInList(HOST_PORTS) if port is None else port
        if port in self.listeners:
            return
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK
                          | socket.SOCK_CLOEXEC)
        self.listeners[port] = s
        try:
            os.unlink(f"{self.path}_{port}")  # left by an input that failed
        except FileNotFoundError:
            pass
        s.bind(f"{self.path}_{port}")
        s.listen(self.fdp.ConsumeIntInRange(0, 2))

    def host_accepts(self) -> None:
        for port, listener in list(self.listeners.items()):
            if self.fdp.ConsumeIntInRange(0, 3) == 0:  # the program goes away
                listener.close()
                del self.listeners[port]
                os.unlink(f"{self.path}_{port}")
                continue
            while True:
                try:
                    s, _ = listener.accept()
                except OSError:
                    break
                s.setblocking(False)
                self.host.append(s)

    def _host_sock(self) -> socket.socket | None:
        if not self.host:
            return None
        return self.host[self.fdp.ConsumeIntInRange(0, len(self.host) - 1)]

    def host_sends(self) -> None:
        s = self._host_sock()
        if s is None:
            return
        fdp = self.fdp
        if fdp.ConsumeBool():
            _send(s, fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 256)))
        else:
            _send(s, bytes([fdp.ConsumeIntInRange(0, 255)]) * fdp.ConsumeIntInRange(1, 0x12000))

    def host_reads_or_closes(self) -> None:
        s = self._host_sock()
        if s is None:
            return
        what = self.fdp.ConsumeIntInRange(0, 3)
        if what <= 1:
            _drain(s)
        elif what == 2:
            try:
                s.shutdown(socket.SHUT_WR)
            except OSError:
                pass
        else:
            self.host.remove(s)
            s.close()

    # -- the worker's epoll ---------------------------------------------------------------
    def _ready(self) -> list[int]:
        """The fds with a callback that epoll would report now."""
        p = select.poll()
        for fd in list(self.actions):
            r, w = self.qw.watched.get(fd, (True, False))
            mask = (select.POLLIN if r else 0) | (select.POLLOUT if w else 0)
            if mask:
                p.register(fd, mask)
        ready = []
        for fd, revents in p.poll(0):
            expect(not revents & select.POLLNVAL, f"the worker waits on fd {fd}, closed")
            ready.append(fd)
        return ready

    def poll_round(self, spurious: bool = False) -> None:
        ready = self._ready()
        if spurious and self.actions:  # readiness gone by the time the callback runs
            fds = sorted(self.actions)
            ready.append(fds[self.fdp.ConsumeIntInRange(0, len(fds) - 1)])
        for fd in ready:
            action = self.actions.get(fd)  # not one an earlier callback forgot
            if action is not None:
                action()

    def settle(self) -> None:
        """Nobody acts any more: the worker must go quiet."""
        for _ in range(SETTLE_ROUNDS):
            kicked = [i for i, k in enumerate(self.kicks) if k.set]
            for i in kicked:
                self.kick(i)
            if not kicked and not self._ready():
                return
            self.poll_round()
            self.check()
        raise Finding("the worker does not settle; still ready: "
                      + ", ".join(self._describe(fd) for fd in self._ready()))

    def _describe(self, fd: int) -> str:
        w = self.worker
        if fd == self.listener_fd:
            return f"{fd} (the listener)"
        if fd in w.accepting:
            try:
                head = w.accepting[fd].recv(64, socket.MSG_PEEK)
            except OSError as e:
                head = repr(e).encode()
            return f"{fd} (a host connection before its CONNECT line, holding {head!r})"
        for conn in w.conns.values():
            if conn.fd == fd:
                return (f"{fd} (connection {conn.key}, open={conn.open}, "
                        f"watching={conn.watching}, pending={len(conn.pending)})")
        return f"{fd} (unknown)"

    # -- invariants ------------------------------------------------------------------------
    def check(self) -> None:
        self._check_rx()
        for head, length, _ in self.tx.used():
            expect(length == 0, f"transmit chain {head} used with {length} bytes")
        for head, length, bufs in self.ev.used():
            expect(length in (0, P.EVENT.size) and length <= sum(n for _, n in bufs),
                   f"event chain {head} used with {length} bytes")
            if length:
                got = guest.gather(self.mem, bufs, length)
                expect(got == P.EVENT.pack(P.EVENT_TRANSPORT_RESET), f"event {got!r}")
        self._sync()
        w = self.worker
        expect(len(w.conns) <= P.MAX_CONNECTIONS, f"{len(w.conns)} connections")
        expect(len(w.control) <= VS.MAX_CONTROL, f"{len(w.control)} control packets wait")
        expect(len(w.accepting) <= VS.MAX_ACCEPTING, f"{len(w.accepting)} host connections "
               "wait for their CONNECT line")
        live = {self.listener_fd, *w.accepting}
        for key, conn in w.conns.items():
            guest_bytes = len(conn.pending) - conn.not_guest
            expect(0 <= conn.not_guest <= len(f"OK {U32}\n") and guest_bytes <= P.BUF_ALLOC,
                   f"connection {key} holds {guest_bytes} guest bytes (+{conn.not_guest})")
            expect(conn.sock.fileno() == conn.fd, f"connection {key}'s socket is closed")
            live.add(conn.fd)
        for fd, sock in w.accepting.items():
            expect(sock.fileno() == fd, f"accepting socket {fd} is closed")
            expect(fd in self.actions and self.qw.watched.get(fd, (False, False))[0],
                   f"host connection {fd} waits for its CONNECT line, unwatched")
        for fd in self.actions:
            expect(fd in live, f"a callback for fd {fd}, which the device no longer has")
        for fd, (r, wr) in self.qw.watched.items():
            expect(not (r or wr) or fd in self.actions, f"fd {fd} watched with no callback")

    def _check_rx(self) -> None:
        for head, length, bufs in self.rx.used():
            expect(length <= sum(n for _, n in bufs),
                   f"receive chain {head} used with {length} bytes; it holds {bufs}")
            expect(length == 0 or length >= P.HDR_LEN, f"receive chain used with {length} bytes")
            if not length:
                continue
            h = P.Header.unpack(guest.gather(self.mem, bufs, P.HDR_LEN))
            expect((h.src_cid, h.dst_cid, h.type) == (P.HOST_CID, self.cid, P.TYPE_STREAM)
                   and h.op in P.OP_NAMES, f"received {h}")
            expect(h.len == length - P.HDR_LEN and (h.op == P.OP_RW or h.len == 0),
                   f"received {h} in {length} bytes")
            key = (h.dst_port, h.src_port)
            if h.op == P.OP_REQUEST and key not in self.keys:
                self.keys.append(key)
            if h.op == P.OP_RW:
                track = self.tracks.get(key)
                expect(track is not None, f"RW for {key}, never a connection")
                track.got = (track.got + h.len) & U32
                in_flight = (track.got - track.fwd_cnt) & U32
                expect(in_flight <= track.buf_alloc,
                       f"RW of {h.len} bytes on {key} puts {in_flight} in flight; the guest "
                       f"gave buf_alloc {track.buf_alloc}, fwd_cnt {track.fwd_cnt}")

    def _sync(self) -> None:
        """Connections the guest did not ask for (the host's): nothing given yet."""
        for key, conn in self.worker.conns.items():
            track = self.tracks.get(key)
            if track is None or track.conn is not conn:
                self._new_track(key, conn, 0, 0)

    def _new_track(self, key, conn, buf_alloc: int, fwd_cnt: int) -> None:
        self.tracks[key] = Track(conn, buf_alloc, fwd_cnt)
        if key not in self.keys:
            self.keys.append(key)
        try:
            conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, HOST_SNDBUF)
        except OSError:
            pass

    # -- the end ------------------------------------------------------------------------
    def close(self) -> None:
        if self.dev is not None:
            self.dev.close()  # every connection, the half-open ones, the listener
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
        for s in self.host:
            s.close()
        for port, s in self.listeners.items():
            s.close()
            try:
                os.unlink(f"{self.path}_{port}")
            except FileNotFoundError:
                pass


def _send(s: socket.socket, data: bytes) -> None:
    if data:
        try:
            s.send(data)
        except OSError:  # full, or the device closed it
            pass


def _drain(s: socket.socket) -> None:
    for _ in range(64):
        try:
            if not s.recv(1 << 16):
                return
        except OSError:
            return
