"""The interface a virtio device implements, its interrupt, and the worker skeleton.

A device is a small class (type, queue sizes, features, config space) whose
`activate` hands its queues to a worker that owns them. The worker talks to the
rest of the VMM only through guest memory (the memfd mapping) and eventfds: the
queue kick events KVM signals, the irqfds it signals back, and a kill event. That is
what lets the sandbox move a device into its own process unchanged.
"""

from __future__ import annotations

import logging
import select
import threading
from typing import Callable

from crosvm.base import Event, IrqLevelEvent
from crosvm.devices.pci.msix import NO_VECTOR, MsixConfig
from crosvm.devices.virtio.queue import DescriptorChain, Queue
from crosvm.vm_memory import GuestMemory

log = logging.getLogger(__name__)

# Device types (virtio 1.x, 5).
TYPE_NET = 1
TYPE_BLOCK = 2
TYPE_CONSOLE = 3
TYPE_RNG = 4

# Feature bits every device may offer (virtio 1.x, 6).
VIRTIO_RING_F_INDIRECT_DESC = 28
VIRTIO_RING_F_EVENT_IDX = 29
VIRTIO_F_VERSION_1 = 32
BASE_FEATURES = (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_RING_F_EVENT_IDX) | (
    1 << VIRTIO_RING_F_INDIRECT_DESC)

# Device status (virtio 1.x, 2.1).
STATUS_ACKNOWLEDGE = 1
STATUS_DRIVER = 2
STATUS_DRIVER_OK = 4
STATUS_FEATURES_OK = 8
STATUS_NEEDS_RESET = 0x40
STATUS_FAILED = 0x80

ISR_QUEUE = 1
ISR_CONFIG = 2


class Interrupt:
    """How a device tells the driver a queue was used or its config changed.

    With MSI-X enabled a vector's irqfd is signalled (masked vectors go pending);
    otherwise the ISR bit is set and the level-triggered INTx line raised.
    """

    def __init__(self, msix: MsixConfig | None, intx: IrqLevelEvent | None) -> None:
        self.msix = msix
        self.intx = intx
        self.config_vector = NO_VECTOR
        self._isr = 0
        self._lock = threading.Lock()

    def _signal(self, vector: int, isr_bit: int) -> None:
        if self.msix is not None and self.msix.enabled:
            if vector != NO_VECTOR:
                self.msix.trigger(vector)
            return
        with self._lock:
            self._isr |= isr_bit
        if self.intx is not None:
            self.intx.trigger.signal()

    def signal_used_queue(self, vector: int) -> None:
        self._signal(vector, ISR_QUEUE)

    def signal_config_changed(self) -> None:
        self._signal(self.config_vector, ISR_CONFIG)

    def read_and_clear_isr(self) -> int:
        with self._lock:
            isr, self._isr = self._isr, 0
        return isr

    def resample(self) -> None:
        """KVM lowered INTx at the guest's EOI: raise it again if still pending."""
        if self.intx is None:
            return
        self.intx.resample.wait()
        with self._lock:
            pending = self._isr
        if pending:
            self.intx.trigger.signal()


class VirtioDevice:
    """Base class: override the type, queue sizes, features, config and `activate`."""

    device_type: int = 0
    seccomp_policy: str = "common_device"  # seccomp/x86_64/<name>.policy
    worker: "QueueWorker | None" = None  # set by activate()

    def debug_label(self) -> str:
        return type(self).__name__

    def queue_max_sizes(self) -> list[int]:
        return [256]

    def features(self) -> int:
        """Device feature bits offered to the driver (BASE_FEATURES included)."""
        return BASE_FEATURES

    def ack_features(self, value: int) -> None:
        self.acked_features = value

    def read_config(self, offset: int, data: memoryview) -> None:
        config = self.config_bytes()
        end = offset + len(data)
        chunk = config[offset:end] if offset < len(config) else b""
        data[:] = chunk + bytes(len(data) - len(chunk))

    def write_config(self, offset: int, data: bytes | memoryview) -> None:
        log.debug("%s: ignored config write at %#x", self.debug_label(), offset)

    def config_bytes(self) -> bytes:
        return b""

    def activate(self, mem: GuestMemory, interrupt: Interrupt,
                 queues: list[tuple[int, Queue, Event]]) -> None:
        raise NotImplementedError

    def reset(self) -> bool:
        """Stop the worker (it owns the queues); False if the device cannot reset."""
        if self.worker is not None:
            self.worker.stop()
            self.worker = None
        return True

    def keep_fds(self) -> list[int]:
        """File descriptors the device needs besides guest memory and its events."""
        return []

    def close(self) -> None:
        self.reset()


class QueueWorker:
    """A thread that waits on queue kicks, INTx resamples and a kill event.

    `handle(queue_index)` runs after a kick of that queue (the event already drained);
    `extra` adds more (fd, callback) pairs, such as a console's host input.
    """

    def __init__(self, name: str, interrupt: Interrupt, queue_events: list[tuple[int, Event]],
                 handle: Callable[[int], None],
                 extra: list[tuple[int, Callable[[], None]]] | None = None) -> None:
        self.kill = Event()
        self._interrupt = interrupt
        self._queue_events = queue_events
        self._handle = handle
        self._extra = extra or []
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        ep = select.epoll()
        actions: dict[int, Callable[[], None]] = {}
        for index, event in self._queue_events:
            actions[event.fd] = (lambda i=index, e=event: (e.wait(), self._handle(i)))
        if self._interrupt.intx is not None:
            actions[self._interrupt.intx.resample.fd] = self._interrupt.resample
        for fd, callback in self._extra:
            actions[fd] = callback
        for fd in actions:
            ep.register(fd, select.EPOLLIN)
        ep.register(self.kill.fd, select.EPOLLIN)
        # Buffers made available before activation (or before we registered) count too.
        for index, _ in self._queue_events:
            self._safe(lambda i=index: self._handle(i))
        try:
            while True:
                for fd, _ in ep.poll():
                    if fd == self.kill.fd:
                        return
                    self._safe(actions[fd])
        finally:
            ep.close()

    def _safe(self, fn: Callable[[], None]) -> None:
        try:
            fn()
        except Exception:  # a device bug must not take the VMM down; log and go on
            log.exception("%s: worker error", self._thread.name)

    def stop(self) -> None:
        self.kill.signal()
        if threading.current_thread() is not self._thread:
            self._thread.join(5.0)
        self.kill.close()


def process_queue(mem: GuestMemory, queue: Queue, interrupt: Interrupt,
                  handle_chain: Callable[[DescriptorChain], int]) -> int:
    """Serve every available chain, then interrupt the driver once if it asked.

    `handle_chain` returns the number of bytes written into the chain. With
    EVENT_IDX the avail event is re-armed and the ring re-checked, so a buffer the
    driver adds meanwhile is not left without a kick.
    """
    used = 0
    while True:
        while (chain := queue.pop(mem)) is not None:
            queue.add_used(mem, chain.index, handle_chain(chain))
            used += 1
        queue.set_avail_event(mem)
        if queue.avail_idx(mem) == queue.next_avail:
            break
    if used and queue.needs_interrupt(mem):
        interrupt.signal_used_queue(queue.vector)
    return used
