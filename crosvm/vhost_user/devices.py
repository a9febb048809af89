"""Our virtio devices as vhost-user back-ends: building each from its options, and
running it (in this process for `crosvm device`, forked and jailed for `crosvm
devices`).

A back-end is the device a VMM would run, plus what the process serving it needs:
the fds it keeps, what starts in it before serving (host input), and what the parent
cleans up afterwards (socket files).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import socket
from dataclasses import dataclass, field
from typing import Callable

from crosvm.base.unix_socket import remove_socket, socket_identity
from crosvm.devices.virtio import virtio_device as V
from crosvm.vhost_user import backend as B

log = logging.getLogger("crosvm")

BACKEND_POLICY = "vhost_user_backend"  # widens the device's own seccomp policy


class BackendSetupError(Exception):
    """A back-end could not be set up (its socket, say); the message names it."""


@dataclass
class Backend:
    """One device to serve on the vhost-user socket `socket_path`."""

    kind: str
    socket_path: str
    device: V.VirtioDevice
    keep_fds: list[int] = field(default_factory=list)   # besides device.keep_fds()
    start: Callable[[], None] | None = None             # in the serving process
    closers: list[Callable[[], None]] = field(default_factory=list)  # in the parent
    listener: socket.socket | None = None
    _remove_socket_file: Callable[[], None] | None = None
    _device_open: bool = True

    @property
    def name(self) -> str:
        return f"vu_{self.kind}"

    def listen(self) -> None:
        """Bind the socket (before any jail: the jailed back-end only accepts)."""
        try:
            self.listener = B.listen(self.socket_path)
            identity = socket_identity(self.socket_path)
        except OSError as e:
            raise BackendSetupError(f"vhost-user socket {self.socket_path}: "
                                    f"{e.strerror or e}") from None
        self._remove_socket_file = lambda: remove_socket(self.socket_path, identity)

    def remove_socket_file(self) -> None:
        """Remove the socket file this process bound (once)."""
        remove, self._remove_socket_file = self._remove_socket_file, None
        if remove is not None:
            remove()

    def serve(self, fd_dir: int | None = None,
              on_connect: Callable[[], None] | None = None) -> None:
        """Serve one front-end on the bound socket until it disconnects."""
        if self.start is not None:
            self.start()
        listener, self.listener = self.listener, None
        B.serve_listener(self.device, listener, on_connect, fd_dir)

    def close(self) -> None:
        """The parent's cleanup: the device's fds, the socket file and the rest."""
        if self.listener is not None:
            self.listener.close()
            self.listener = None
        self.remove_socket_file()
        closers, self.closers = self.closers, []
        for close in [self.release_device, *reversed(closers)]:
            try:
                close()
            except OSError as e:  # one failed cleanup must not skip the others
                log.warning("%s: cleanup: %s", self.name, e)

    def release_device(self) -> None:
        """Close the device here (its process has its own copy of everything)."""
        if self._device_open:
            self._device_open = False
            self.device.close()


# -- building each type from the options `crosvm run` takes for it ------------------
def block(socket_path: str, option) -> Backend:
    """`option`: a config.DiskOption."""
    from crosvm.devices.virtio.block import Block
    from crosvm.disk import open_disk
    image = open_disk(option.path, read_only=option.ro, direct=option.direct,
                      sparse=option.sparse)
    device = Block(image, option.block_size,
                   option.id.encode() if option.id is not None else None)
    return Backend("block", socket_path, device)


def net(socket_path: str, option) -> Backend:
    """`option`: a config.NetOption naming a TAP (tap-name, tap-fd or host-ip)."""
    from crosvm.devices.virtio.net import Net
    from crosvm.devices.virtio.net_proto import net_mtu
    from crosvm.net.tap import TapError, open_net_taps
    if option.passt or option.passt_socket:
        raise TapError("vhost-user net back-end: passt is not supported; give a TAP "
                       "(tap-name=, tap-fd= or host-ip=)")
    tap, mac = open_net_taps(option)
    device = Net(tap.fds, mac, mtu=net_mtu(tap.mtu()), mrg_rxbuf=option.mrg_rxbuf,
                 label="net")
    return Backend("net", socket_path, device)


def console(socket_path: str, params) -> Backend:
    """`params`: config.SerialParameters (type=stdout|file|unix|sink, input=, stdin)."""
    from crosvm.devices.virtio.console import open_console
    parts = open_console(params, "console")
    backend = Backend("console", socket_path, parts.device, keep_fds=parts.keep_fds,
                      start=parts.start)
    if parts.out is not None:
        backend.closers.append(parts.out.close)
    out_fds = parts.out.fds() if parts.out is not None else []
    in_fd = parts.in_fd
    if in_fd is not None and in_fd != 0 and in_fd not in out_fds:  # a unix socket is both
        backend.closers.append(lambda: os.close(in_fd))
    return backend


def vsock(socket_path: str, option) -> Backend:
    """`option`: a config.VsockOption with uds-path (vhost-vsock is not driven)."""
    from crosvm.devices.virtio.vsock import Vsock, VsockError
    if option.uds_path is None:
        raise VsockError("vhost-user vsock back-end: uds-path=PATH is required (pycrosvm's "
                         "userspace vsock; /dev/vhost-vsock is not driven)")
    device = Vsock(option.cid, option.uds_path)
    backend = Backend("vsock", socket_path, device)
    backend.closers.append(lambda: remove_socket(device.uds_path, device.socket_id))
    return backend


def fs(socket_path: str, option) -> Backend:
    """`option`: a config.SharedDirOption of type=fs."""
    from crosvm.devices.virtio.fs.device import Fs
    return Backend("fs", socket_path, Fs(option))


# -- running -----------------------------------------------------------------------
def serve_here(backend: Backend) -> None:
    """`crosvm device`: serve in this process; the socket file goes once connected."""
    backend.listen()
    try:
        backend.serve(on_connect=backend.remove_socket_file)
    finally:
        backend.close()


def spawn(backend: Backend, jail) -> int:
    """`crosvm devices`: fork the back-end into its own process, jailed by `jail`
    (a crosvm.jail.Jail, or None for --disable-sandbox); returns its pid. The socket
    is bound here first."""
    from crosvm.devices.virtio.fs.reopen import open_proc_self_fd
    from crosvm.jail.spawn import spawn as spawn_process
    device = backend.device
    seccomp_filter = None
    config = None
    fd_dir: list[int] = []
    if jail is not None:
        seccomp_filter = jail.filter_for(device.seccomp_policy, BACKEND_POLICY)
        config = device.jail_config()
        device_prepare = config.prepare

        def prepare() -> None:  # before the pivot hides /proc
            if device_prepare is not None:
                device_prepare()
            fd_dir.append(open_proc_self_fd())
        config = dataclasses.replace(config, prepare=prepare)
    backend.listen()
    keep = {backend.listener.fileno(), *device.keep_fds(), *backend.keep_fds}
    pid, id_map = spawn_process(backend.name, lambda: backend.serve(
        fd_dir[0] if fd_dir else None), keep, jail, seccomp_filter, config)
    try:
        if id_map is not None:
            id_map.serve(pid)
    except BaseException:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        raise
    backend.listener.close()  # the child accepts on its copy
    backend.listener = None
    backend.release_device()  # the child has its own copy of everything
    return pid
