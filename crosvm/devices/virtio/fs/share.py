"""What virtio-fs and virtio-9p have in common: the shared directory, its jail and its
id maps. The file server itself is made at activation, inside the device's process.

In the sandbox the jail's root is the shared directory itself (bind-mounted, nosuid,
nodev), the user namespace has the share's uidmap/gidmap and the process is `uid`/`gid`
inside it with the capabilities a file server needs there, as crosvm runs its fs and
p9 devices. /proc/self/fd is opened before the pivot: it is how an inode's O_PATH fd
is reopened for I/O. Without the sandbox the servers translate ids themselves.
"""

from __future__ import annotations

import os
from crosvm.base import Event
from crosvm.config import SharedDirOption
from crosvm.devices.virtio import virtio_device as V
from crosvm.devices.virtio.descriptor_utils import Reader, Writer
from crosvm.devices.virtio.fs.fdbudget import raise_fd_limit
from crosvm.devices.virtio.fs.idmap import IdMap
from crosvm.devices.virtio.fs.reopen import open_proc_self_fd
from crosvm.devices.virtio.queue import DescriptorChain, Queue
from crosvm.jail.jail import FILE_SERVER_CAPS, JailConfig
from crosvm.vm_memory import GuestMemory

QUEUE_SIZE = 256
# A file server holds an fd per inode, handle or fid the guest keeps: far more than
# the 1024 other devices get (crosvm raises it for its fs and p9 devices too).
MAX_OPEN_FILES = 65536


class ShareError(OSError):
    """The shared directory is not what was checked at start (replaced meanwhile)."""


class SharedDirDevice(V.VirtioDevice):
    """Base of the two shared-directory devices: `make_server()` builds the protocol
    server for the share (root fd, proc fd, maps) when the driver activates it."""

    def __init__(self, option: SharedDirOption) -> None:
        self.option = option
        self.tag = option.tag
        self.src = os.path.realpath(option.src)
        self.uid_map = IdMap.parse(option.uidmap)
        self.gid_map = IdMap.parse(option.gidmap)
        self._jailed = False
        self._proc_fd = -1
        # Opened now, before the guest runs: a guest with another share above this one
        # must not get to swap the directory for a symlink before this one activates.
        self._root_fd = os.open(self.src, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW
                                | os.O_CLOEXEC)
        st = os.fstat(self._root_fd)
        self._root_id = (st.st_dev, st.st_ino)
        raise_fd_limit(MAX_OPEN_FILES)  # without the sandbox the servers live in the VMM
        self.server = None
        self.acked_features = 0

    def debug_label(self) -> str:
        return f"{type(self).__name__.lower()}:{self.tag}"

    def jail_config(self) -> JailConfig:
        return JailConfig(root=self.src, uid_map=self.uid_map.proc_text(),
                          gid_map=self.gid_map.proc_text(), uid=self.option.uid,
                          gid=self.option.gid, caps=FILE_SERVER_CAPS,
                          prepare=self._prepare_jail, max_open_files=MAX_OPEN_FILES)

    def _prepare_jail(self) -> None:
        """In the jailed process, before the pivot hides /proc (the fd opened at start
        was closed with the VMM's others: the jail's own root is used instead)."""
        self._jailed = True
        self._root_fd = -1
        self._proc_fd = open_proc_self_fd()

    def share_fds(self) -> tuple[int, int, IdMap, IdMap]:
        """(root fd, /proc/self/fd fd, uid map, gid map) for a server in this process.
        In the jail the root is `/` and the kernel has already translated the ids."""
        if self._root_fd < 0:  # in the jail: its root, the share bind-mounted
            fd = os.open("/", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
            st = os.fstat(fd)
            if (st.st_dev, st.st_ino) != self._root_id:
                os.close(fd)
                raise ShareError(f"{self.src} was replaced after the VM started")
            self._root_fd = fd
        if self._proc_fd < 0:
            self._proc_fd = open_proc_self_fd()
        if self._jailed:
            return self._root_fd, self._proc_fd, self.uid_map.inner_only(), self.gid_map.inner_only()
        # No namespace: the servers translate, and give what an unmapped guest id makes
        # to uid=/gid= (the identity the sandboxed device would create it as).
        return (self._root_fd, self._proc_fd, self.uid_map.with_fallback(self.option.uid),
                self.gid_map.with_fallback(self.option.gid))

    def make_server(self) -> object:
        raise NotImplementedError

    def serve_queues(self, mem: GuestMemory, interrupt: V.Interrupt,
                     queues: list[tuple[int, Queue, Event]]) -> None:
        """Every queue's chains go to the one server, one request at a time."""
        self.server = server = self.make_server()

        def handle_chain(chain: DescriptorChain) -> int:
            return server.handle(Reader(mem, chain), Writer(mem, chain))

        self.worker = V.QueueWorker(
            self.debug_label(), interrupt, [(i, e) for i, (_, _, e) in enumerate(queues)],
            lambda i: V.process_queue(mem, queues[i][1], interrupt, handle_chain))

    def reset(self) -> bool:
        stopped = super().reset()
        if self.server is not None:
            self.server.close()  # a new driver starts from INIT/version: no old inodes or fids
            self.server = None
        return stopped

    def close(self) -> None:
        super().close()
        for fd in (self._root_fd, self._proc_fd):
            if fd >= 0:
                os.close(fd)
        self._root_fd = self._proc_fd = -1
