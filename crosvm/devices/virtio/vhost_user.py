"""A virtio device whose queues another process serves over vhost-user (crosvm's
`devices/src/virtio/vhost/user/vmm`): `--vhost-user TYPE,socket=PATH`.

The front-end is the PCI side: config space, feature negotiation with the guest, and at
activation it hands the back-end the guest's memory (the memfd), the rings' addresses,
each queue's kick eventfd (KVM's ioeventfd: a guest kick goes straight to the back-end)
and a call eventfd per queue. The worker turns calls into interrupts through the
transport's MSI-X table, so a vector the guest masked stays pending as the spec wants
(one wake-up of ours per interrupt; switching the call fd to the irqfd while a vector
is unmasked, as QEMU does, would take it off the path), and watches the socket: a
back-end that goes away puts the device in NEEDS_RESET with the reason logged, and the
connection is shut so the back-end stops its rings; the VMM goes on.
"""

from __future__ import annotations

import logging
import select
import socket
import threading

from crosvm.base import Event
from crosvm.devices.virtio import virtio_device as V
from crosvm.devices.virtio.queue import Queue
from crosvm.vhost_user import protocol as P
from crosvm.vhost_user.frontend import BackendConnection, BackendError, connect
from crosvm.vm_memory import GuestMemory

log = logging.getLogger(__name__)

TYPE_VSOCK = 19
TYPE_FS = 26
# Per device kind: virtio type, queues, config bytes asked of the back-end, and the
# device feature bits that would need queues this front-end does not expose (net's
# control queue and multiqueue, console's ports, fs's notification queue).
KINDS = {
    "block": (V.TYPE_BLOCK, 1, 60, 0),
    "net": (V.TYPE_NET, 2, 12, 0xFE_0000),  # CTRL_VQ 17 .. CTRL_MAC_ADDR 23
    "console": (V.TYPE_CONSOLE, 2, 12, 1 << 1),  # MULTIPORT
    "rng": (V.TYPE_RNG, 1, 0, 0),
    "vsock": (TYPE_VSOCK, 3, 8, 0),
    "fs": (TYPE_FS, 2, 40, 1 << 0),  # NOTIFICATION
}
FS_TAG_LEN = 36
VIRTIO_BLK_F_MQ = 12
BLK_NUM_QUEUES = slice(34, 36)      # virtio_blk_config.num_queues
FS_NUM_REQUEST_QUEUES = slice(36, 40)  # virtio_fs_config.num_request_queues
# What may pass from a back-end to the guest: the device's own bits (0-23) and the ring
# features this transport can carry. Not packed rings, not ACCESS_PLATFORM.
PASSED_FEATURES = 0xFF_FFFF | V.BASE_FEATURES
WANTED_PROTOCOL = P.ProtocolFeature.MQ | P.ProtocolFeature.REPLY_ACK | P.ProtocolFeature.CONFIG
DEFAULT_QUEUE_SIZE = 256
CONNECT_TIMEOUT = 10.0


class VhostUserError(Exception):
    """The back-end could not be set up (its socket, its handshake, its answers)."""


class VhostUserFrontend(V.VirtioDevice):
    """One back-end's device on our PCI bus. Connects and negotiates at construction
    (before any jail): the device process keeps only the connected socket."""

    seccomp_policy = "vhost_user_frontend"
    # `suspend --full` would pause only our worker while the back-end went on using the
    # rings: refused (with the reason) until the rings are stopped and restarted.
    can_sleep = False

    def __init__(self, kind: str, socket_path: str, mem: GuestMemory,
                 max_queue_size: int | None = None, tag: str | None = None,
                 label: str | None = None) -> None:
        if kind not in KINDS:
            raise VhostUserError(f"vhost-user: unknown device type '{kind}' "
                                 f"(one of {', '.join(KINDS)})")
        self.kind = kind
        self.device_type, num_queues, config_size, self._unsupported = KINDS[kind]
        self.mem = mem
        self.label = label or f"vhost-user-{kind}"
        self.socket_path = socket_path
        self.queue_size = max_queue_size or DEFAULT_QUEUE_SIZE
        try:
            sock = connect(socket_path, CONNECT_TIMEOUT)
        except BackendError as e:
            raise VhostUserError(str(e)) from None
        self.conn = BackendConnection(sock, label=f"{self.label} ({socket_path})")
        self._lock = threading.Lock()  # one request at a time: the worker watches too
        self.broken: str | None = None
        try:
            self._handshake(num_queues, config_size, tag)
        except (BackendError, P.ProtocolError) as e:
            self.conn.close()
            raise VhostUserError(str(e)) from None
        self.acked = 0
        self._call_events: list[Event] = []
        self._active: list[int] = []  # rings the back-end has started

    def _handshake(self, num_queues: int, config_size: int, tag: str | None) -> None:
        c = self.conn
        c.request(P.Request.SET_OWNER)
        self.backend_features = P.decode_u64(c.request(P.Request.GET_FEATURES), "features")
        self.protocol = P.ProtocolFeature(0)
        if self.backend_features & P.F_PROTOCOL_FEATURES:
            theirs = P.decode_u64(c.request(P.Request.GET_PROTOCOL_FEATURES), "protocol")
            self.protocol = P.ProtocolFeature(theirs & WANTED_PROTOCOL)
            c.request(P.Request.SET_PROTOCOL_FEATURES, P.u64(self.protocol))
            c.reply_ack = bool(self.protocol & P.ProtocolFeature.REPLY_ACK)
        if not self.backend_features & (1 << V.VIRTIO_F_VERSION_1):
            raise BackendError(f"{c.label}: the back-end does not offer VIRTIO_F_VERSION_1")
        max_queues = num_queues
        if self.protocol & P.ProtocolFeature.MQ:
            max_queues = P.decode_u64(c.request(P.Request.GET_QUEUE_NUM), "queue number")
            if self.kind == "block":  # one is enough; more than we can index is not used
                max_queues = min(max_queues, P.MAX_QUEUES)
            if not num_queues <= max_queues <= P.MAX_QUEUES:
                raise BackendError(f"{c.label}: the back-end has {max_queues} queues; a "
                                   f"{self.kind} device needs {num_queues}")
        self.config = b""
        if self.kind == "fs" and tag:  # ours: tag[36], num_request_queues
            raw = tag.encode()
            if not 0 < len(raw) <= FS_TAG_LEN:
                raise BackendError(f"{c.label}: tag '{tag}' must be 1 to {FS_TAG_LEN} bytes")
            self.config = raw.ljust(FS_TAG_LEN, b"\0") + (1).to_bytes(4, "little")
        elif config_size and self.protocol & P.ProtocolFeature.CONFIG:
            offset, self.config = P.decode_config(c.request(
                P.Request.GET_CONFIG, P.config(0, bytes(config_size))))
            if offset != 0 or len(self.config) != config_size:
                raise BackendError(f"{c.label}: asked for {config_size} config bytes at 0, "
                                   f"got {len(self.config)} at {offset}")
        elif self.kind == "block":
            raise BackendError(f"{c.label}: a block back-end must give its config "
                               "(VHOST_USER_PROTOCOL_F_CONFIG): the disk's size is there")
        elif self.kind == "fs":
            raise BackendError(f"{c.label}: the back-end gives no mount tag: use "
                               "--vhost-user fs,socket=PATH,tag=TAG (or --vhost-user-fs SOCK:TAG)")
        self.num_queues = num_queues
        if self.kind == "block" and self.backend_features >> VIRTIO_BLK_F_MQ & 1:
            wanted = int.from_bytes(self.config[BLK_NUM_QUEUES], "little") or 1
            self.num_queues = max(1, min(wanted, max_queues))
            self._patch_config(BLK_NUM_QUEUES, self.num_queues)
        if self.kind == "fs":  # one request queue after hiprio, whatever it could take
            self._patch_config(FS_NUM_REQUEST_QUEUES, 1)

    def _patch_config(self, field: slice, value: int) -> None:
        """Tell the guest the queue count this device exposes, not the back-end's."""
        raw = value.to_bytes(field.stop - field.start, "little")
        self.config = self.config[:field.start] + raw + self.config[field.stop:]

    # -- the guest's side ------------------------------------------------------
    def debug_label(self) -> str:
        return self.label

    def queue_max_sizes(self) -> list[int]:
        return [self.queue_size] * self.num_queues

    def features(self) -> int:
        return self.backend_features & PASSED_FEATURES & ~self._unsupported

    def ack_features(self, value: int) -> None:
        self.acked = value & self.features()

    def read_config(self, offset: int, data: memoryview) -> None:
        chunk = self.config[offset:offset + len(data)]
        data[:len(chunk)] = chunk
        data[len(chunk):] = bytes(len(data) - len(chunk))

    def write_config(self, offset: int, data: bytes | memoryview) -> None:
        if not self.protocol & P.ProtocolFeature.CONFIG or self.kind in ("fs", "rng"):
            return
        if self.broken or offset + len(data) > len(self.config):
            return  # past what the back-end described, or no back-end: nothing to write
        try:
            with self._lock:
                self.conn.request(P.Request.SET_CONFIG, P.config(offset, bytes(data)))
            self.config = self.config[:offset] + bytes(data) + self.config[offset + len(data):]
        except (BackendError, P.ProtocolError) as e:
            self._break(str(e))

    def config_bytes(self) -> bytes:
        return self.config

    def keep_fds(self) -> list[int]:
        return [self.conn.fileno(), self.mem.memfd]

    def close_in_vmm(self) -> None:
        """The VMM's copy of the connection, once the device process has its own: a
        device process that dies must leave the back-end at EOF, not connected."""
        self.conn.close()

    # -- activation -------------------------------------------------------------
    def activate(self, mem: GuestMemory, interrupt: V.Interrupt,
                 queues: list[tuple[int, Queue, Event]]) -> None:
        """Give the back-end the memory and the rings; start the worker that turns
        calls into interrupts and watches the connection."""
        if self.broken:
            interrupt.signal_needs_reset(self.broken)
            return
        self._call_events = [Event() for _ in queues]
        calls = {index: (call, queue.vector)
                 for (index, queue, _), call in zip(queues, self._call_events)}
        try:
            with self._lock:
                c = self.conn
                features = self.acked | (self.backend_features & P.F_PROTOCOL_FEATURES)
                c.request(P.Request.SET_FEATURES, P.u64(features))
                regions = [P.MemoryRegion(r.guest_addr, r.size, r.host_address(), r.shm_offset)
                           for r in mem.regions]
                c.request(P.Request.SET_MEM_TABLE, P.memory_table(regions),
                          [mem.memfd] * len(regions))
                for index, queue, kick in queues:
                    c.request(P.Request.SET_VRING_NUM, P.vring_state(index, queue.size))
                    c.request(P.Request.SET_VRING_ADDR, P.vring_addr(P.VringAddr(
                        index, 0, self._host(mem, queue.desc_table),
                        self._host(mem, queue.used_ring), self._host(mem, queue.avail_ring), 0)))
                    c.request(P.Request.SET_VRING_BASE, P.vring_state(index, 0))
                    c.request(P.Request.SET_VRING_KICK, P.vring_fd(index, True), [kick.fd])
                    c.request(P.Request.SET_VRING_CALL, P.vring_fd(index, True),
                              [calls[index][0].fd])
                    self._active.append(index)  # from here on reset must stop it
                    if features & P.F_PROTOCOL_FEATURES:  # rings start disabled then
                        c.request(P.Request.SET_VRING_ENABLE, P.vring_state(index, 1))
        except (BackendError, P.ProtocolError) as e:
            self._break(str(e))
            interrupt.signal_needs_reset(self.broken)
            return

        def forward(call: Event, vector: int) -> None:
            if call.drain():
                interrupt.signal_used_queue(vector)

        def started(worker: V.QueueWorker) -> None:
            self.worker = worker  # before the socket's callback can run

        # The calls are `extra` fds, not queue events: a queue event's callback also
        # runs once at start, which here would be an interrupt nobody raised.
        extra = [(call.fd, lambda call=call, vector=vector: forward(call, vector))
                 for call, vector in calls.values()]
        extra.append((self.conn.fileno(), lambda: self._socket_readable(interrupt)))
        self.worker = V.QueueWorker(self.label, interrupt, [], lambda _: False, extra=extra,
                                    on_start=started)

    @staticmethod
    def _host(mem: GuestMemory, guest_addr: int) -> int:
        """Our address of guest memory at `guest_addr` (the back-end maps the same
        memfd and translates through the table we sent)."""
        for r in mem.regions:
            if r.guest_addr <= guest_addr < r.end:
                return r.host_address() + guest_addr - r.guest_addr
        raise P.ProtocolError(f"ring address {guest_addr:#x} is not in guest memory")

    def _socket_readable(self, interrupt: V.Interrupt) -> None:
        """The socket woke the worker outside a request: the back-end closed it (or
        sent something unasked, which this front-end does not take either)."""
        if not self._lock.acquire(blocking=False):
            return  # a request is reading its reply
        try:
            # Readable right now? (The socket keeps the last request's timeout, so a recv
            # would wait that long for data that a request already took.)
            ready = select.poll()
            try:
                ready.register(self.conn.fileno(), select.POLLIN)
            except ValueError:  # closed meanwhile
                return
            if not ready.poll(0):
                return
            try:
                data = self.conn.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
            except BlockingIOError:
                return
            except OSError as e:
                data = b""
                log.debug("%s: %s", self.label, e)
            why = ("the vhost-user back-end closed the connection" if not data else
                   "the vhost-user back-end sent a message nobody asked for")
        finally:
            self._lock.release()
        self.worker.forget(self.conn.fileno())
        self._break(f"{self.label}: {why}")
        interrupt.signal_needs_reset(self.broken)

    def _break(self, why: str) -> None:
        """The back-end is no longer trusted to follow us: shut the connection (a
        back-end stops its rings when its front-end goes) and refuse further use."""
        if self.broken is None:
            self.broken = why
            log.error("%s", why)
            try:
                self.conn.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def reset(self) -> bool:
        """Stop the rings (GET_VRING_BASE stops one) and the worker."""
        super().reset()
        active, self._active = self._active, []
        if self.broken is None:
            try:
                with self._lock:
                    for index in active:
                        if self.backend_features & P.F_PROTOCOL_FEATURES:
                            self.conn.request(P.Request.SET_VRING_ENABLE,
                                              P.vring_state(index, 0))
                        P.decode_vring_state(self.conn.request(
                            P.Request.GET_VRING_BASE, P.vring_state(index, 0)))
            except (BackendError, P.ProtocolError) as e:
                self._break(str(e))
        for event in self._call_events:
            event.close()
        self._call_events = []
        return True

    def close(self) -> None:
        super().close()
        self.conn.close()
