"""virtio-rng: fills the driver's buffers from the host's random source."""

from __future__ import annotations

import os

from crosvm.base import Event
from crosvm.devices.virtio import virtio_device as V
from crosvm.devices.virtio.descriptor_utils import Writer
from crosvm.devices.virtio.queue import DescriptorChain, Queue
from crosvm.vm_memory import GuestMemory

QUEUE_SIZE = 256


class Rng(V.VirtioDevice):
    """One queue; every writable buffer is filled from /dev/urandom."""

    device_type = V.TYPE_RNG
    seccomp_policy = "rng_device"

    def __init__(self, source: str = "/dev/urandom") -> None:
        self.random_fd = os.open(source, os.O_RDONLY | os.O_CLOEXEC)

    def queue_max_sizes(self) -> list[int]:
        return [QUEUE_SIZE]

    def keep_fds(self) -> list[int]:
        return [self.random_fd]

    def activate(self, mem: GuestMemory, interrupt: V.Interrupt,
                 queues: list[tuple[int, Queue, Event]]) -> None:
        def fill(chain: DescriptorChain) -> int:
            writer = Writer(mem, chain)
            return writer.read_from_fd(self.random_fd, writer.available_bytes(), None)

        self.serve_single_queue("v_rng", mem, interrupt, queues, fill)

    def close(self) -> None:
        super().close()
        if self.random_fd >= 0:
            os.close(self.random_fd)
            self.random_fd = -1
