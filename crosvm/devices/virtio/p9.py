"""virtio-9p (device type 9): the guest's 9P2000.L client sends one T-message per
chain and the device writes the R-message into the same chain."""

from __future__ import annotations

import struct

from crosvm.base import Event
from crosvm.devices.virtio import virtio_device as V
from crosvm.devices.virtio.fs.share import QUEUE_SIZE, SharedDirDevice
from crosvm.devices.virtio.queue import Queue
from crosvm.p9.server import P9Server
from crosvm.vm_memory import GuestMemory

TYPE_9P = 9
VIRTIO_9P_MOUNT_TAG = 0  # feature bit: the config space holds the mount tag
MAX_MSIZE = 512 * 1024   # Linux's default msize for virtio is 512 KiB


class P9(SharedDirDevice):
    """`--shared-dir SRC:TAG` (type=p9, the default)."""

    device_type = TYPE_9P
    seccomp_policy = "p9_device"

    def queue_max_sizes(self) -> list[int]:
        return [QUEUE_SIZE]

    def features(self) -> int:
        return V.BASE_FEATURES | 1 << VIRTIO_9P_MOUNT_TAG

    def config_bytes(self) -> bytes:
        tag = self.tag.encode()
        return struct.pack("<H", len(tag)) + tag

    def make_server(self) -> P9Server:
        root_fd, proc_fd, uid_map, gid_map = self.share_fds()
        return P9Server(root_fd, proc_fd, uid_map, gid_map, max_msize=MAX_MSIZE)

    def activate(self, mem: GuestMemory, interrupt: V.Interrupt,
                 queues: list[tuple[int, Queue, Event]]) -> None:
        self.serve_queues(mem, interrupt, queues)
