"""ProxyDevice: a device forked into its own (jailed) process, as crosvm runs them.

The parent keeps a proxy on the bus that forwards reads and writes (bus, PCI config
and BAR accesses) over a SOCK_SEQPACKET socketpair; the child serves them. Guest
memory is shared through the memfd mapping; ioeventfds, irqfds and the device's own
fds are the only other descriptors the child keeps. Queue kicks and interrupts go
straight between KVM and the child.

What the child asks of the VMM (MSI-X routes, an exit) comes back with each reply as
plain structs, and the parent validates it: the child is not trusted, so nothing it
sends is unpickled or executed.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import struct
import threading
import time
from typing import Callable

from crosvm.devices.bus import BusDevice
from crosvm.devices.pci.device import PciDevice
from crosvm.jail import Jail, JailError
from crosvm.jail.jail import IdMapRequest, JailConfig
from crosvm.jail.spawn import spawn

log = logging.getLogger(__name__)

# Requests: op, index (BAR), length, offset (bus offset / register / BAR offset),
# extra (bus address / byte within register), then data.
REQ = struct.Struct("<BBBQQ")
OP_BUS_READ, OP_BUS_WRITE, OP_CFG_READ, OP_CFG_WRITE, OP_BAR_READ, OP_BAR_WRITE = range(1, 7)
OP_CONTROL = 7  # index: a crosvm.devices.control code, offset: its argument
OP_SHUTDOWN = 15
# Reply: status, number of actions; then data, then actions.
REPLY = struct.Struct("<BB")
ACTION_ROUTE = struct.Struct("<BHQI")    # kind 1: vector, address, data
ACTION_EXIT = struct.Struct("<BB")       # kind 2: exit code
MAX_MSG = 4096
SHUTDOWN_LOCK_TIMEOUT = 0.5
ACTION_SIZES = {1: ACTION_ROUTE.size, 2: ACTION_EXIT.size}


class DeviceDied(Exception):
    """The device process is gone (crashed, or killed by its seccomp policy), or it
    broke the reply protocol, which is treated the same way."""


def parse_reply(reply: bytes) -> tuple[bytes, list[bytes]]:
    """Split a device process's reply into (data, raw actions).

    The child is untrusted: anything malformed raises `DeviceDied` (the VM stops with
    33), and nothing in a reply is executed; actions are checked again by the caller.
    """
    if len(reply) < REPLY.size + 1:
        raise DeviceDied("device process exited")
    status, n_actions = REPLY.unpack_from(reply)
    n = reply[REPLY.size]
    start = REPLY.size + 1
    if status != 0 or start + n > len(reply):
        raise DeviceDied(f"malformed reply from the device process ({len(reply)} bytes)")
    out = reply[start:start + n]
    rest = reply[start + n:]
    actions = []
    for _ in range(n_actions):
        size = ACTION_SIZES.get(rest[0]) if rest else None
        if size is None or len(rest) < size:
            raise DeviceDied("malformed action from the device process")
        actions.append(rest[:size])
        rest = rest[size:]
    if rest:
        raise DeviceDied("trailing bytes in a reply from the device process")
    return out, actions


class HostRequests:
    """What a device may ask of the VMM. In-process the calls go straight through;
    in a device process they are queued and sent back with the next reply."""

    def __init__(self, route: Callable[[int, int, int], None] | None = None,
                 exit: Callable[[int], None] | None = None) -> None:
        self._route = route
        self._exit = exit
        self.queued: list[bytes] | None = None

    def set_msi_route(self, vector: int, address: int, data: int) -> None:
        if self.queued is not None:
            self.queued.append(ACTION_ROUTE.pack(1, vector, address, data))
        elif self._route is not None:
            self._route(vector, address, data)

    def request_exit(self, code: int) -> None:
        if self.queued is not None:
            self.queued.append(ACTION_EXIT.pack(2, code))
        elif self._exit is not None:
            self._exit(code)


def _serve(device: object, sock: socket.socket, host: HostRequests) -> None:
    is_pci = isinstance(device, PciDevice)
    while True:
        try:
            msg = sock.recv(MAX_MSG)
        except InterruptedError:
            continue
        if len(msg) < REQ.size:
            break  # the VMM closed the socket
        op, index, length, offset, extra = REQ.unpack_from(msg)
        length = min(length, 8)
        data = msg[REQ.size:]
        out = b""
        host.queued = []
        if op == OP_SHUTDOWN:
            break
        if op == OP_BUS_READ:
            buf = bytearray(length)
            device.read(offset, extra, memoryview(buf))
            out = bytes(buf)
        elif op == OP_BUS_WRITE:
            device.write(offset, extra, data)
        elif is_pci and op == OP_CFG_READ:
            out = struct.pack("<I", device.read_config_register(offset) & 0xFFFF_FFFF)
        elif is_pci and op == OP_CFG_WRITE:
            device.write_config_register(offset, extra, data)
        elif is_pci and op == OP_BAR_READ:
            buf = bytearray(length)
            device.read_bar(index, offset, memoryview(buf))
            out = bytes(buf)
        elif is_pci and op == OP_BAR_WRITE:
            device.write_bar(index, offset, data)
        elif op == OP_CONTROL and hasattr(device, "control"):
            out = device.control(index, offset)[:255]
        actions = host.queued[:255]
        sock.send(REPLY.pack(0, len(actions)) + bytes([len(out)]) + out + b"".join(actions))
    close = getattr(device, "close", None)
    if close is not None:
        close()  # flush output, stop workers: nothing buffered is lost at a clean stop


class DeviceProcess:
    """Forks `device` into a child that serves it; the parent keeps the socket.

    `keep_fds` are the only fds the child keeps (plus stderr for its log). `start`
    runs in the child after jailing (to start input threads, say).
    """

    _id_map: IdMapRequest | None = None  # until mapped (a root VMM's jailed device)

    def __init__(self, device: object, name: str, keep_fds: list[int], jail: Jail | None,
                 host: HostRequests, start: Callable[[], None] | None = None) -> None:
        self.name = name
        seccomp_filter = None
        if jail is not None:
            policy = getattr(device, "seccomp_policy", None)
            if policy is None:
                raise JailError(f"{name}: the device has no seccomp policy")
            seccomp_filter = jail.filter_for(policy)  # compiled here, before the fork
        parent_sock, child_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        jail_config = device.jail_config() if hasattr(device, "jail_config") else JailConfig()

        def body() -> None:
            parent_sock.detach()  # its fd is closed already (not kept): forget it
            host.queued = []
            if start is not None:
                start()
            _serve(device, child_sock, host)
        pid, id_map = spawn(name, body, set(keep_fds) | {child_sock.fileno()}, jail,
                            seccomp_filter, jail_config)
        child_sock.close()
        close_in_vmm = getattr(device, "close_in_vmm", None)
        if close_in_vmm is not None:  # a connection only the device process may hold
            close_in_vmm()
        # Mapped later (`map_ids`, or before the first request): the VMM forks the next
        # device while this one unshares, rather than waiting for it.
        self._id_map = id_map
        self.pid = pid
        self.sock = parent_sock
        # No timeout: a device that is slow (its host output blocks, say) is not dead.
        # Death is the socket's end (the child held the only other end) or its exit.
        self._lock = threading.Lock()
        self.dead = False
        self.status: int | None = None  # wait status once reaped

    def call(self, op: int, index: int = 0, length: int = 0, offset: int = 0, extra: int = 0,
             data: bytes | memoryview = b"",
             on_actions: Callable[[list[bytes]], None] | None = None) -> bytes:
        """One request/reply round trip; returns the reply's data. `on_actions` gets the
        raw actions while the device is still locked, so two vCPUs' requests take
        effect in the order the device answered them."""
        with self._lock:
            if self.dead:
                raise DeviceDied(self.name)
            try:
                self.map_ids()
                self.sock.send(REQ.pack(op, index, length, offset, extra) + bytes(data))
                out, actions = parse_reply(self.sock.recv(MAX_MSG))
            except OSError as e:
                self.dead = True
                raise DeviceDied(f"{self.name}: {e}") from None
            except DeviceDied as e:
                self.dead = True
                raise DeviceDied(f"{self.name}: {e}") from None
            if actions and on_actions is not None:
                on_actions(actions)
            return out

    def map_ids(self) -> None:
        """Map the device's user namespace once it asks (a root VMM's part of the jail);
        the device waits in its jail until then. Idempotent."""
        id_map, self._id_map = self._id_map, None
        if id_map is not None:
            id_map.serve(self.pid)

    def shutdown(self) -> None:
        """Ask the device to stop (it flushes and exits), and wake any vCPU still waiting
        on it: the socket is shut down even if a request is in flight."""
        if self._lock.acquire(timeout=SHUTDOWN_LOCK_TIMEOUT):
            try:
                self.map_ids()  # a device never mapped would wait in its jail, not stop
                if not self.dead:
                    try:
                        self.sock.send(REQ.pack(OP_SHUTDOWN, 0, 0, 0, 0))
                    except OSError:
                        pass
            finally:
                self._lock.release()
        self.dead = True
        try:
            # Both ways: a vCPU still waiting for a reply gets EOF at once (the device
            # has the request to stop already, and exits on its own).
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()

    def poll(self) -> int | None:
        """The wait status if the process has ended, without blocking."""
        pid, status = os.waitpid(self.pid, os.WNOHANG)
        return status if pid else None

    def reap(self, timeout: float = 2.0, kill: bool = True) -> int | None:
        """Wait up to `timeout` for the child, then kill it (or with `kill=False`, give
        up and return None). Returns its wait status."""
        deadline = time.monotonic() + timeout
        while True:
            status = self.poll()
            if status is not None:
                return status
            if time.monotonic() > deadline:
                if not kill:
                    return None
                os.kill(self.pid, signal.SIGKILL)
                return os.waitpid(self.pid, 0)[1]
            time.sleep(0.02)


def killing_signal(status: int) -> int | None:
    """The signal that ended a device process, if one did (the jail's reaper mirrors a
    signal as exit status 128+n)."""
    code = os.waitstatus_to_exitcode(status)
    if code < 0:
        return -code
    return code - 128 if code > 128 else None


def describe_status(status: int) -> str:
    """How a device process ended, in words."""
    sig = killing_signal(status)
    if sig is not None:
        name = signal.Signals(sig).name if sig in signal.Signals._value2member_map_ else str(sig)
        if sig == signal.SIGSYS:
            return f"killed by {name}: a syscall outside its seccomp policy"
        return f"killed by {name}"
    return f"exited with status {os.waitstatus_to_exitcode(status)}"


class ProxyBase:
    """Turns replies' actions into VMM calls, and a dead device into a VM crash."""

    def __init__(self, proc: DeviceProcess, host: HostRequests,
                 on_death: Callable[[str], None]) -> None:
        self.proc = proc
        self.host = host
        self.on_death = on_death

    def _call(self, op: int, **kw) -> bytes | None:
        try:
            return self.proc.call(op, on_actions=self._apply, **kw)
        except DeviceDied as e:
            self.on_death(str(e))
            return None

    def _apply(self, actions: list[bytes]) -> None:
        for raw in actions:
            if raw[0] == 1:
                _, vector, address, data = ACTION_ROUTE.unpack(raw)
                self.host.set_msi_route(vector, address, data)
            else:
                self.host.request_exit(raw[1])


def _fill(data: memoryview, out: bytes | None) -> None:
    n = len(data)
    data[:] = (out or b"")[:n].ljust(n, b"\xff" if out is None else b"\0")


class BusProxy(ProxyBase, BusDevice):
    """A bus device served by a device process."""

    def __init__(self, proc: DeviceProcess, label: str, host: HostRequests,
                 on_death: Callable[[str], None]) -> None:
        super().__init__(proc, host, on_death)
        self.label = label

    def debug_label(self) -> str:
        return f"{self.label} (sandboxed)"

    def read(self, offset: int, address: int, data: memoryview) -> None:
        _fill(data, self._call(OP_BUS_READ, length=len(data), offset=offset, extra=address))

    def write(self, offset: int, address: int, data: bytes | memoryview) -> None:
        self._call(OP_BUS_WRITE, offset=offset, extra=address, data=data)


class PciProxy(ProxyBase, PciDevice):
    """A PCI function served by a device process; config and BARs cross the socket."""

    def __init__(self, proc: DeviceProcess, device: PciDevice, host: HostRequests,
                 on_death: Callable[[str], None]) -> None:
        super().__init__(proc, host, on_death)
        self.label = device.debug_label()
        self.config = device.config  # the parent's copy is only for setup-time facts

    def debug_label(self) -> str:
        return f"{self.label} (sandboxed)"

    def read_config_register(self, reg: int) -> int:
        out = self._call(OP_CFG_READ, offset=reg)
        return struct.unpack("<I", out)[0] if out and len(out) == 4 else 0xFFFF_FFFF

    def write_config_register(self, reg: int, offset: int, data: bytes | memoryview) -> None:
        self._call(OP_CFG_WRITE, offset=reg, extra=offset, data=data)
        # The parent's copy tracks the guest's writes through the same masks, so the VMM
        # knows where BARs are without asking (or trusting) the device process.
        self.config.write_reg(reg, offset, data)

    def read_bar(self, index: int, offset: int, data: memoryview) -> None:
        _fill(data, self._call(OP_BAR_READ, index=index, length=len(data), offset=offset))

    def write_bar(self, index: int, offset: int, data: bytes | memoryview) -> None:
        self._call(OP_BAR_WRITE, index=index, offset=offset, data=data)

    def control(self, code: int, arg: int) -> bytes:
        """A run-time request (crosvm.devices.control) to the device process; its
        encoded result, which the caller checks with `decode_result`."""
        if not 0 <= code <= 0xFF or not 0 <= arg < 1 << 64:
            return b""
        return self._call(OP_CONTROL, index=code, offset=arg) or b""
