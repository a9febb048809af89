"""TAP devices for virtio-net: open, check, and configure the host side.

A TAP is opened with IFF_TAP | IFF_NO_PI | IFF_VNET_HDR (plus IFF_MULTI_QUEUE for more
than one queue pair), its vnet header size set to virtio 1.x's 12 bytes, and its fds made
non-blocking, so a full TAP can never stall the device's worker. Host addresses are set
over netlink with pyroute2.
"""

from __future__ import annotations

import ctypes
import fcntl
import ipaddress
import os
import socket

from crosvm.base.ioctl import ior, iow, ioctl_ref, ioctl_val

TUN_PATH = "/dev/net/tun"
IFNAMSIZ = 16
IFF_TUN, IFF_TAP = 0x0001, 0x0002
IFF_MULTI_QUEUE = 0x0100
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
VNET_HDR_SIZE = 12
MAX_QUEUE_PAIRS = 16


class _IfReq(ctypes.Structure):
    # struct ifreq: the name, then a 24-byte union of which we use the flags.
    _fields_ = [("name", ctypes.c_char * IFNAMSIZ), ("flags", ctypes.c_short),
                ("pad", ctypes.c_char * 22)]


TUNSETIFF = iow(ord("T"), 202, ctypes.c_int)
TUNGETIFF = ior(ord("T"), 210, ctypes.c_uint)
TUNSETOFFLOAD = iow(ord("T"), 208, ctypes.c_uint)
TUNSETVNETHDRSZ = iow(ord("T"), 216, ctypes.c_int)
SIOCGIFMTU = 0x8921


class TapError(Exception):
    """A TAP could not be opened or configured; the message says which and why."""


class Tap:
    """One TAP interface: its name and one fd per queue pair."""

    def __init__(self, name: str, fds: list[int]) -> None:
        self.name = name
        self.fds = fds

    @classmethod
    def open(cls, name: str = "", queues: int = 1) -> "Tap":
        """Open (creating it if needed) TAP `name`; "" lets the kernel pick tapN."""
        if len(name.encode()) >= IFNAMSIZ:
            raise TapError(f"tap name '{name}' is longer than {IFNAMSIZ - 1} bytes")
        if not 1 <= queues <= MAX_QUEUE_PAIRS:
            raise TapError(f"vq-pairs must be between 1 and {MAX_QUEUE_PAIRS}, not {queues}")
        flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR | (IFF_MULTI_QUEUE if queues > 1 else 0)
        fds: list[int] = []
        try:
            for _ in range(queues):
                fd = os.open(TUN_PATH, os.O_RDWR | os.O_CLOEXEC | os.O_NONBLOCK)
                fds.append(fd)
                req = _IfReq(name.encode(), flags)
                ioctl_ref(fd, TUNSETIFF, req)
                name = req.name.decode()  # the kernel's choice for "" (or "tap%d")
        except OSError as e:
            for fd in fds:
                os.close(fd)
            what = f"tap '{name}'" if name else "a new tap"
            hint = " (needs CAP_NET_ADMIN or ownership of the tap)" if e.errno == 1 else ""
            multi = (" (a tap created without multi_queue cannot take vq-pairs > 1)"
                     if queues > 1 and e.errno == 22 else "")
            raise TapError(f"failed to open {what} through {TUN_PATH}: "
                           f"{e.strerror}{hint}{multi}") from None
        tap = cls(name, fds)
        tap._setup()
        return tap

    @classmethod
    def from_fd(cls, fd: int) -> "Tap":
        """A TAP fd the caller opened (`--net tap-fd=N`); checked to be a TAP with a
        vnet header. The fd is duplicated, so the caller's stays theirs."""
        req = _IfReq()
        try:
            ioctl_ref(fd, TUNGETIFF, req)
        except OSError as e:
            raise TapError(f"tap-fd {fd} is not an open TAP device: {e.strerror}") from None
        if req.flags & (IFF_TAP | IFF_TUN) != IFF_TAP:
            raise TapError(f"tap-fd {fd} is a TUN device, not a TAP")
        if not req.flags & IFF_VNET_HDR:
            raise TapError(f"tap-fd {fd} was opened without IFF_VNET_HDR")
        if not req.flags & IFF_NO_PI:
            raise TapError(f"tap-fd {fd} was opened without IFF_NO_PI")
        new = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 3)
        os.set_blocking(new, False)
        tap = cls(req.name.decode(), [new])
        tap._setup()
        return tap

    def _setup(self) -> None:
        try:
            for fd in self.fds:
                ioctl_ref(fd, TUNSETVNETHDRSZ, ctypes.c_int(VNET_HDR_SIZE))
                set_offload(fd, 0)  # until the driver says what it accepts
        except OSError as e:
            self.close()
            raise TapError(f"tap {self.name}: failed to set the vnet header: {e.strerror}") from None

    def mtu(self) -> int | None:
        """The interface's MTU (SIOCGIFMTU by name, in this network namespace), or
        None when it cannot be read (a tap-fd= from another namespace, say)."""
        req = _IfReq(self.name.encode())
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                fcntl.ioctl(s.fileno(), SIOCGIFMTU, req)
        except OSError:
            return None
        return ctypes.c_int.from_buffer_copy(bytes(req)[IFNAMSIZ:IFNAMSIZ + 4]).value

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds = []


def set_offload(fd: int, flags: int) -> None:
    """TUNSETOFFLOAD: which offloads the TAP may hand us on read."""
    ioctl_val(fd, TUNSETOFFLOAD, flags)


def prefix_length(netmask: str) -> int:
    """255.255.255.0 -> 24; ValueError for a non-contiguous mask."""
    return ipaddress.IPv4Network(f"0.0.0.0/{netmask}").prefixlen


def configure_host(name: str, host_ip: str, netmask: str, mac: bytes | None = None) -> None:
    """Give the host side of TAP `name` its address (and MAC) and bring it up (netlink)."""
    from pyroute2 import IPRoute  # only needed for host-ip=
    try:
        prefix = prefix_length(netmask)
    except ValueError:
        raise TapError(f"invalid netmask '{netmask}'") from None
    try:
        with IPRoute() as ipr:
            index = ipr.link_lookup(ifname=name)
            if not index:
                raise TapError(f"tap {name} vanished before it was configured")
            if mac is not None:
                ipr.link("set", index=index[0], address=mac_text(mac))
            ipr.addr("add", index=index[0], address=host_ip, prefixlen=prefix)
            ipr.link("set", index=index[0], state="up")
    except OSError as e:  # pyroute2's NetlinkError is an OSError
        raise TapError(f"failed to configure tap {name} with {host_ip}/{prefix}: {e}") from None


def mac_text(mac: bytes) -> str:
    return ":".join(f"{b:02x}" for b in mac)



VHOST_NET_DEVICE = "/dev/vhost-net"


def open_net_taps(params) -> "tuple[Tap, bytes | None]":
    """The TAP a `--net` option names (a `config.NetOption`), opened and, for host-ip=,
    created and configured; plus the guest's MAC. As in crosvm, host-ip='s mac= is the
    TAP's own (host side) address and the guest picks a random one; tap-name= and
    tap-fd= take mac= as the guest's."""
    from crosvm.devices.virtio.net_proto import parse_mac
    if params.vhost_net:
        if not os.path.exists(VHOST_NET_DEVICE):
            raise TapError(f"net: vhost-net=true needs {VHOST_NET_DEVICE}, which does not "
                           "exist on this host (load the vhost_net module, or drop vhost-net)")
        raise TapError(f"net: vhost-net=true is not supported yet ({VHOST_NET_DEVICE} exists, "
                       "but pycrosvm serves the queues itself; drop vhost-net)")
    mac = parse_mac(params.mac) if params.mac is not None else None
    if params.tap_fd is not None:
        return Tap.from_fd(params.tap_fd), mac
    if params.tap_name is not None:
        return Tap.open(params.tap_name, params.vq_pairs), mac
    tap = Tap.open("", params.vq_pairs)
    try:
        configure_host(tap.name, params.host_ip, params.netmask, mac)
    except BaseException:
        tap.close()
        raise
    return tap, None
