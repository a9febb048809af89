"""The back-end side of vhost-user: serves one of our virtio devices to a front-end in
another process (`crosvm device block --socket PATH ...`; QEMU or our own VMM on the
other end).

The device is the same class the VMM runs in-process: the back-end plays the PCI
transport's part. It maps the guest memory the front-end sends, turns ring addresses
(the front-end's own virtual addresses) into guest addresses through that table, and
activates the device with Queues on those rings, the front-end's kick eventfds and an
interrupt that signals its call eventfds. The device's worker then serves the rings
exactly as it does in the VMM.

The front-end is not trusted: every message is bounded and checked (queue index, ring
size, addresses inside the table, fds present) and a bad one fails that request.
"""

from __future__ import annotations

import fcntl
import logging
import os
import socket

from crosvm.base import Event
from crosvm.base.fdpass import close_fds, fds_from
from crosvm.base.unix_socket import remove_socket, socket_identity
from crosvm.devices.virtio import virtio_device as V
from crosvm.devices.virtio.queue import Queue
from crosvm.vhost_user import protocol as P
from crosvm.vm_memory import GuestMemory, GuestMemoryError

log = logging.getLogger(__name__)

OUR_PROTOCOL = P.ProtocolFeature.MQ | P.ProtocolFeature.REPLY_ACK | P.ProtocolFeature.CONFIG


class RequestFailed(Exception):
    """A request the back-end refuses (answered with a failure status when asked)."""


class CallInterrupt(V.Interrupt):
    """The device's interrupts, as the front-end's call eventfds: a queue's vector is
    its index here."""

    def __init__(self, calls: dict[int, Event]) -> None:
        super().__init__(None, None)
        self.calls = calls

    def signal_used_queue(self, vector: int) -> None:
        call = self.calls.get(vector)
        if call is not None:
            call.signal()

    def signal_config_changed(self) -> None:
        pass  # needs the back-end request channel, which this back-end does not offer


class Vring:
    """What the front-end told us about one ring. Addresses are kept as the front-end
    gave them (its virtual addresses) and translated at activation, so a new memory
    table re-translates them."""

    def __init__(self, max_size: int) -> None:
        self.max_size = max_size
        self.size = max_size
        self.user_addrs: tuple[int, int, int] | None = None  # desc, avail, used
        self.base = 0
        self.kick: Event | None = None
        self.call: Event | None = None
        self.err: Event | None = None
        self.enabled = False

    def close(self) -> None:
        for event in (self.kick, self.call, self.err):
            if event is not None:
                event.close()
        self.kick = self.call = self.err = None


class DeviceBackend:
    """Serves `device` to one front-end connection (`serve` returns when it closes)."""

    def __init__(self, device: V.VirtioDevice, sock: socket.socket,
                 fd_dir: int | None = None) -> None:
        self.device = device
        self.sock = sock
        self.fd_dir = fd_dir  # /proc/self/fd, opened before a jail hid /proc
        self.vrings = [Vring(n) for n in device.queue_max_sizes()]
        self.features = 0
        self.protocol = P.ProtocolFeature(0)
        self.mem: GuestMemory | None = None
        self.table: list[P.MemoryRegion] = []
        self.queues: dict[int, Queue] | None = None  # by ring index, while active
        self._interrupt: CallInterrupt | None = None  # while active
        self._retired: list[Event] = []  # call eventfds replaced while active

    # -- the connection ------------------------------------------------------------
    def serve(self) -> None:
        """Serve until the front-end goes. Raises WorkerStuck (after logging it) when
        the device will not stop: its memory and eventfds are then left as they are,
        since its worker may still use them."""
        try:
            while self._one_message():
                pass
        except V.WorkerStuck as e:
            log.error("vhost-user back-end: %s; closing the connection", e)
            raise
        self._deactivate()
        for vring in self.vrings:
            vring.close()
        if self.mem is not None:
            self.mem.close()

    def _one_message(self) -> bool:
        try:
            raw, fds = self._recv(P.HEADER.size, with_fds=True)
        except ConnectionError:
            return False
        if raw is None:
            return False
        try:
            header = P.decode_header(raw)
            payload, _ = self._recv(header.size) if header.size else (b"", [])
            if payload is None:
                close_fds(fds)
                return False
        except (P.ProtocolError, ConnectionError) as e:
            log.error("vhost-user back-end: %s; closing the connection", e)
            close_fds(fds)
            return False
        try:
            reply = self._handle(header, payload, fds)
            status = 0
        except (RequestFailed, P.ProtocolError, GuestMemoryError) as e:
            log.error("vhost-user back-end: request %d refused: %s", header.request, e)
            reply, status = None, 1
        finally:
            close_fds(fds)  # handlers dup what they keep
        try:
            if header.request in P.REPLIES:
                if reply is None:  # no data to give: the front-end would wait forever
                    return False
                self._send(header.request, reply)
            elif header.need_reply and self.protocol & P.ProtocolFeature.REPLY_ACK:
                self._send(header.request, P.u64(status))
        except ConnectionError:
            return False  # the front-end went away first: an ordinary end
        return True

    def _recv(self, size: int, with_fds: bool = False) -> tuple[bytes | None, list[int]]:
        data = bytearray()
        fds: list[int] = []
        while len(data) < size:
            chunk, ancdata, _, _ = self.sock.recvmsg(
                size - len(data), socket.CMSG_SPACE(4 * P.MAX_FDS) if with_fds else 0)
            fds += fds_from(ancdata)
            if not chunk:
                close_fds(fds)
                return None, []
            data += chunk
            with_fds = False  # fds come with the header's bytes
        return bytes(data), fds

    def _send(self, request: int, payload: bytes) -> None:
        self.sock.sendall(P.encode(request, payload, P.FLAG_REPLY))

    # -- requests ------------------------------------------------------------------
    def _handle(self, header: P.Header, payload: bytes, fds: list[int]) -> bytes | None:
        R = P.Request
        code = header.request
        if code == R.GET_FEATURES:
            return P.u64(self.device.features() | P.F_PROTOCOL_FEATURES)
        if code == R.SET_FEATURES:
            value = P.decode_u64(payload, "features")
            offered = self.device.features() | P.F_PROTOCOL_FEATURES
            if value & ~offered:
                raise RequestFailed(f"features {value & ~offered:#x} were not offered")
            self.features = value
            self.device.ack_features(value & ~P.F_PROTOCOL_FEATURES)
            return None
        if code in (R.SET_OWNER, R.RESET_OWNER):
            return None
        if code == R.GET_PROTOCOL_FEATURES:
            return P.u64(OUR_PROTOCOL)
        if code == R.SET_PROTOCOL_FEATURES:
            self.protocol = P.ProtocolFeature(P.decode_u64(payload, "protocol") & OUR_PROTOCOL)
            return None
        if code == R.GET_QUEUE_NUM:
            return P.u64(len(self.vrings))
        if code == R.SET_MEM_TABLE:
            self._set_mem_table(payload, fds)
            return None
        if code == R.GET_CONFIG:
            offset, data = P.decode_config(payload)
            out = bytearray(len(data))
            self.device.read_config(offset, memoryview(out))
            return P.config(offset, bytes(out))
        if code == R.SET_CONFIG:
            offset, data = P.decode_config(payload)
            self.device.write_config(offset, data)
            return None
        if code in (R.SET_VRING_NUM, R.SET_VRING_BASE, R.SET_VRING_ENABLE, R.GET_VRING_BASE):
            index, num = P.decode_vring_state(payload)
            return self._vring_state(code, self._vring(index), index, num)
        if code == R.SET_VRING_ADDR:
            addr = P.decode_vring_addr(payload)
            vring = self._vring(addr.index)
            self._stopped_for_change(lambda: setattr(
                vring, "user_addrs", (addr.desc, addr.avail, addr.used)))
            return None
        if code in (R.SET_VRING_KICK, R.SET_VRING_CALL, R.SET_VRING_ERR):
            index, has_fd = P.decode_vring_fd(payload)
            vring = self._vring(index)
            if has_fd != (len(fds) == 1):
                raise RequestFailed(f"expected {1 if has_fd else 0} fd, got {len(fds)}")
            if not has_fd:
                if code == R.SET_VRING_ERR:
                    return None
                raise RequestFailed("rings without an eventfd (polling) are not supported")
            event = _eventfd(fds[0], self.fd_dir)
            name = {R.SET_VRING_KICK: "kick", R.SET_VRING_CALL: "call",
                    R.SET_VRING_ERR: "err"}[code]

            if code == R.SET_VRING_CALL and self.queues is not None and index in self.queues:
                # At run time (QEMU moves calls when the guest masks a vector): the
                # worker signals through the interrupt's table, swapped in place; the
                # old eventfd may be in use this instant, so it is closed at the stop.
                self._retired.append(vring.call)
                vring.call = event
                self._interrupt.calls[index] = event
                return None

            def swap() -> None:  # the device is stopped: nothing holds the old one
                old = getattr(vring, name)
                setattr(vring, name, event)
                if old is not None:
                    old.close()
                if code == R.SET_VRING_KICK and not self.features & P.F_PROTOCOL_FEATURES:
                    vring.enabled = True  # without the extension a kick fd starts it
            self._stopped_for_change(swap)
            return None
        raise RequestFailed(f"request {code} is not supported")

    def _vring(self, index: int) -> Vring:
        if index >= len(self.vrings):
            raise RequestFailed(f"ring {index} does not exist ({len(self.vrings)} rings)")
        return self.vrings[index]

    def _vring_state(self, code: int, vring: Vring, index: int, num: int) -> bytes | None:
        R = P.Request
        if code == R.SET_VRING_NUM:
            if not 0 < num <= vring.max_size or num & (num - 1):
                raise RequestFailed(f"ring {index}: size {num} (a power of two up to "
                                    f"{vring.max_size})")
            self._stopped_for_change(lambda: setattr(vring, "size", num))
        elif code == R.SET_VRING_BASE:
            if num > 0xFFFF:
                raise RequestFailed(f"ring {index}: base {num} does not fit 16 bits")
            self._stopped_for_change(lambda: setattr(vring, "base", num))
        elif code == R.SET_VRING_ENABLE:
            if num:
                vring.enabled = True
                self._maybe_activate()
            elif self.queues is not None and index in self.queues:
                self._deactivate()  # keeps where every ring stopped
                vring.enabled = False
                self._maybe_activate()  # the others go on
            else:
                vring.enabled = False
        else:  # GET_VRING_BASE: stop the ring (the device: all), say where it stopped
            if self.queues is not None and index in self.queues:
                self._deactivate()
                vring.enabled = False
                self._maybe_activate()  # the others go on
            vring.enabled = False
            return P.vring_state(index, vring.base)
        return None

    def _set_mem_table(self, payload: bytes, fds: list[int]) -> None:
        regions = P.decode_memory_table(payload, len(fds))
        for fd in fds:
            _check_sealed(fd)
        mem = GuestMemory.from_fds([(r.guest_addr, r.size, fd, r.mmap_offset)
                                    for r, fd in zip(regions, fds)])

        def swap() -> None:
            if self.mem is not None:
                self.mem.close()
            self.mem, self.table = mem, regions
        self._stopped_for_change(swap)

    def _guest_range(self, user_addr: int, length: int, align: int, what: str) -> int:
        """The guest address of a front-end virtual address range, which must lie in one
        region of the memory table and be aligned as the spec requires."""
        if user_addr % align:
            raise RequestFailed(f"{what} at {user_addr:#x} is not {align}-byte aligned")
        for r in self.table:
            if r.user_addr <= user_addr and user_addr + length <= r.user_addr + r.size:
                return r.guest_addr + user_addr - r.user_addr
        raise RequestFailed(f"{what} at {user_addr:#x}+{length:#x} is not inside one region "
                            "of the memory table")

    # -- the device ----------------------------------------------------------------
    def _stopped_for_change(self, change) -> None:
        """Apply `change` to ring or memory state with the device stopped (keeping
        every ring's position), then start it on the rings ready now."""
        self._deactivate()
        change()
        self._maybe_activate()

    def _maybe_activate(self) -> None:
        """Activate the device on every ring that is described, has both eventfds and
        is enabled (again, with one more, when another ring starts). The front-end may
        leave rings unused (a net control queue it does not expose): a device that
        cannot run on the rings started so far (activate raises ValueError) waits for
        more."""
        if self.mem is None:
            return
        ready = [i for i, v in enumerate(self.vrings)
                 if v.enabled and v.user_addrs and v.kick and v.call]
        if self.queues is not None and list(self.queues) == ready:
            return
        self._deactivate()  # keeps where every running ring stopped
        if not ready:
            return
        event_idx = bool(self.features >> V.VIRTIO_RING_F_EVENT_IDX & 1)
        extra = 2 if event_idx else 0  # used_event / avail_event after the rings
        queues: dict[int, Queue] = {}
        for i in ready:
            v = self.vrings[i]
            desc, avail, used = v.user_addrs
            q = Queue(v.size,
                      self._guest_range(desc, 16 * v.size, 16, f"ring {i} descriptors"),
                      self._guest_range(avail, 4 + 2 * v.size + extra, 2, f"ring {i} avail"),
                      self._guest_range(used, 4 + 8 * v.size + extra, 4, f"ring {i} used"),
                      vector=i, event_idx=event_idx)
            q.next_avail = v.base
            q.next_used = v.base
            queues[i] = q

        def needs_reset(why: str) -> None:
            log.error("vhost-user back-end: %s needs reset: %s", self.device.debug_label(), why)
            for v in self.vrings:  # tell the front-end (SET_VRING_ERR), if it gave one
                if v.err is not None:
                    v.err.signal()

        interrupt = CallInterrupt({i: self.vrings[i].call for i in queues})
        interrupt.on_needs_reset = needs_reset
        try:
            self.device.activate(self.mem, interrupt,
                                 [(i, q, self.vrings[i].kick) for i, q in queues.items()])
        except ValueError as e:
            log.debug("vhost-user back-end: %s not started on rings %s: %s",
                      self.device.debug_label(), ready, e)
            return
        self.queues = queues
        self._interrupt = interrupt
        log.info("vhost-user back-end: %s active with ring(s) %s",
                 self.device.debug_label(), ", ".join(map(str, ready)))

    def _deactivate(self) -> None:
        """Stop the device, keeping where each ring stopped (its next used index: a
        chain the stop abandoned half way is served again, which is harmless for
        block requests, rather than lost)."""
        if self.queues is None:
            return
        self.device.reset()
        for i, queue in self.queues.items():
            self.vrings[i].base = queue.next_used
        self.queues = None
        self._interrupt = None
        for event in self._retired:
            event.close()
        self._retired.clear()


def _eventfd(fd: int, fd_dir: int | None = None) -> Event:
    """Our own descriptor of an eventfd the front-end sent; anything else is refused
    (a pipe or a file would block or spin the worker). `fd_dir`: this process's
    /proc/self/fd, when /proc is not in its root."""
    try:
        kind = (os.readlink(str(fd), dir_fd=fd_dir) if fd_dir is not None
                else os.readlink(f"/proc/self/fd/{fd}"))
    except OSError as e:
        raise RequestFailed(f"cannot inspect the fd sent: {e.strerror}") from None
    if kind != "anon_inode:[eventfd]":
        raise RequestFailed(f"expected an eventfd, got {kind}")
    return Event(os.dup(fd))


def _check_sealed(fd: int) -> None:
    """Guest memory must be a memfd sealed against shrinking: a front-end that
    truncated it later would make every access past the new end a SIGBUS here."""
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    except OSError:
        raise RequestFailed("guest memory must be a memfd (sealable)") from None
    if not seals & fcntl.F_SEAL_SHRINK:
        raise RequestFailed("guest memory must be sealed against shrinking (F_SEAL_SHRINK; "
                            "QEMU: memory-backend-memfd with seal=on, its default)")


def listen(path: str) -> socket.socket:
    """A listening socket bound at `path` (an existing file there is an error, never
    replaced: it may be another back-end's)."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        listener.bind(path)
        listener.listen(1)
    except BaseException:
        listener.close()
        raise
    return listener


def serve_listener(device: V.VirtioDevice, listener: socket.socket,
                   on_connect=None, fd_dir: int | None = None) -> None:
    """Serve one front-end that connects to `listener` until it disconnects. The
    listener is closed once a front-end is connected, and `on_connect` runs then
    (removing the socket file)."""
    try:
        log.info("vhost-user back-end: %s waiting for a front-end", device.debug_label())
        conn, _ = listener.accept()
    finally:
        listener.close()
        if on_connect is not None:
            on_connect()
    with conn:
        DeviceBackend(device, conn, fd_dir).serve()


def serve_socket(device: V.VirtioDevice, path: str) -> None:
    """Listen on `path`, serve one front-end until it disconnects, then return. The
    socket file is removed once connected (only the one this process made)."""
    listener = listen(path)
    identity = socket_identity(path)
    serve_listener(device, listener, lambda: remove_socket(path, identity))
