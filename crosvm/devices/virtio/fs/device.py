"""virtio-fs (device type 26): the guest's FUSE driver talks to a passthrough file
server over a high-priority queue (FORGET, INTERRUPT) and a request queue."""

from __future__ import annotations

import struct

from crosvm.base import Event
from crosvm.devices.virtio import virtio_device as V
from crosvm.devices.virtio.fs.passthrough import FsOptions, PassthroughFs
from crosvm.devices.virtio.fs.share import QUEUE_SIZE, SharedDirDevice
from crosvm.devices.virtio.queue import Queue
from crosvm.vm_memory import GuestMemory

TYPE_FS = 26
TAG_SIZE = 36
NUM_REQUEST_QUEUES = 1


class Fs(SharedDirDevice):
    """`--shared-dir SRC:TAG:type=fs`."""

    device_type = TYPE_FS
    seccomp_policy = "fs_device"

    def queue_max_sizes(self) -> list[int]:
        return [QUEUE_SIZE] * (1 + NUM_REQUEST_QUEUES)  # hiprio, then the request queues

    def config_bytes(self) -> bytes:
        # struct virtio_fs_config: tag[36] (NUL-padded, not terminated when full),
        # num_request_queues.
        return struct.pack("<36sI", self.tag.encode(), NUM_REQUEST_QUEUES)

    def make_server(self) -> PassthroughFs:
        root_fd, proc_fd, uid_map, gid_map = self.share_fds()
        o = self.option
        options = FsOptions(cache=o.cache, timeout=o.timeout,
                            negative_timeout=o.negative_timeout or 0.0,
                            writeback=o.writeback, posix_acl=o.posix_acl,
                            ascii_casefold=o.ascii_casefold)
        return PassthroughFs(root_fd, proc_fd, options, uid_map, gid_map)

    def activate(self, mem: GuestMemory, interrupt: V.Interrupt,
                 queues: list[tuple[int, Queue, Event]]) -> None:
        self.serve_queues(mem, interrupt, queues)
