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
import traceback
from typing import Callable

from crosvm.base import Event, IrqLevelEvent
from crosvm.base.ratelimit import RateLimitedLog
from crosvm.devices.pci.msix import NO_VECTOR, MsixConfig
from crosvm.devices.virtio.descriptor_utils import WorkerStopping, set_stop_check
from crosvm.devices.virtio.queue import DescriptorChain, Queue, QueueError
from crosvm.jail.jail import JailConfig
from crosvm.vm_memory import GuestMemory

log = logging.getLogger(__name__)
_chain_errors = RateLimitedLog(log)
_needs_reset_log = RateLimitedLog(log)

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
        # Set by the transport: marks the device NEEDS_RESET and sends a config interrupt.
        self.on_needs_reset: Callable[[str], None] | None = None

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

    def signal_needs_reset(self, why: str) -> None:
        """The driver broke the protocol: the device stops and asks to be reset."""
        _needs_reset_log.error("virtio device needs reset: %s", why)
        if self.on_needs_reset is not None:
            self.on_needs_reset(why)

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

    def serve_single_queue(self, name: str, mem: GuestMemory, interrupt: Interrupt,
                           queues: list[tuple[int, Queue, Event]],
                           handle_chain: Callable[[DescriptorChain], int]) -> None:
        """`activate` for a device with one queue whose chains are served one at a time
        by `handle_chain` (block, rng, pmem)."""
        if len(queues) != 1:
            raise ValueError(f"expected 1 queue, got {len(queues)}")
        _, queue, event = queues[0]
        self.worker = QueueWorker(name, interrupt, [(0, event)],
                                  lambda _: process_queue(mem, queue, interrupt, handle_chain))

    def reset(self) -> bool:
        """Stop the worker and take the queues back (`WorkerStuck` if it will not stop);
        False if the device cannot reset."""
        if self.worker is not None:
            self.worker.stop()
            self.worker = None
        return True

    def keep_fds(self) -> list[int]:
        """File descriptors the device needs besides guest memory and its events."""
        return []

    def jail_config(self) -> JailConfig:
        """What its jail must give it beyond the defaults (host directories, a root,
        id maps); most devices need nothing."""
        return JailConfig()

    def control(self, code: int, arg: int) -> tuple[bytes, bool]:
        """A run-time request from the VMM (crosvm.devices.control codes other than
        sleep/wake): (payload, whether config space changed). Raises
        DeviceControlError to refuse."""
        from crosvm.devices.control import DeviceControlError
        raise DeviceControlError(f"{self.debug_label()} does not support this request")

    def close(self) -> None:
        """Stop for good (VM exit). A worker that will not stop is left to die with
        the process: the exit must go on."""
        try:
            self.reset()
        except WorkerStuck as e:
            log.error("%s", e)


STOP_TIMEOUT = 10.0  # how long a reset waits for a worker to hand its queues back


class WorkerStuck(Exception):
    """A worker did not stop when asked; its queues cannot be handed back safely.

    Nothing catches this: the device process dies (or, without a sandbox, the vCPU
    thread that asked for the reset fails) and the VM stops with exit 33, rather than
    letting a second worker run on the same queues."""


# handle(queue_index) -> True when that queue still has work (a budget was used up).
HandleFn = Callable[[int], "bool | None"]


class QueueWorker:
    """The thread that owns a device's live queues once it is activated.

    It waits on the queue kick events, the INTx resample fd, `extra` (fd, callback)
    pairs such as a console's host input, and its kill event. `handle(i)` runs after a
    kick of queue `i`; when it reports more work, the queue's event is signalled again
    so the kill event and the other queues get their turn first. A driver that breaks
    the ring protocol (`QueueError`) puts the device in NEEDS_RESET and ends the worker:
    it never spins on a broken ring.
    """

    def __init__(self, name: str, interrupt: Interrupt, queue_events: list[tuple[int, Event]],
                 handle: HandleFn,
                 extra: list[tuple[int, Callable[[], None]]] | None = None,
                 on_start: Callable[["QueueWorker"], None] | None = None) -> None:
        """`on_start(worker)` runs first on the worker's thread, before any callback:
        the place to hand the worker to code its callbacks use (`watch`)."""
        self.kill = Event()
        self._on_start = on_start
        self._stopping = False  # read by long transfers between their pieces
        self.name = name
        self._interrupt = interrupt
        self._queue_events = queue_events
        self._handle = handle
        self._extra = extra or []
        self._errors = RateLimitedLog(log)
        # `pause()`: the worker finishes what it is doing, then takes no requests until
        # every pause has its `resume()`; kicks that arrive meanwhile stay in their
        # eventfds. Counted, so a resize during `suspend --full` does not wake the worker.
        self._sleep_event = Event()
        self._pause_cond = threading.Condition()
        self._pauses = 0        # pauses without their resume yet
        self._sleeping = False  # the worker is in its sleep loop
        self._ended = False     # the worker's loop is over (set under _pause_cond)
        self._ep: select.epoll | None = None
        self._watched: set[int] = set()  # the `extra` fds currently in the epoll set
        self._actions: dict[int, Callable[[], None]] = {}
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        ep = self._ep = select.epoll()
        actions = self._actions
        for index, event in self._queue_events:
            actions[event.fd] = (lambda i=index, e=event: (e.wait(), self._serve(i, e)))
        if self._interrupt.intx is not None:
            actions[self._interrupt.intx.resample.fd] = self._interrupt.resample
        for fd, callback in self._extra:
            actions[fd] = callback
            self._watched.add(fd)
        for fd in actions:
            ep.register(fd, select.EPOLLIN)
        ep.register(self.kill.fd, select.EPOLLIN)
        ep.register(self._sleep_event.fd, select.EPOLLIN)
        set_stop_check(lambda: self._stopping)
        if self._on_start is not None:
            self._on_start(self)
        try:
            # Buffers made available before activation (or before we registered) count too.
            for index, event in self._queue_events:
                self._safe(lambda i=index, e=event: self._serve(i, e))
            while True:
                for fd, _ in ep.poll():
                    if fd == self.kill.fd:
                        return
                    if fd == self._sleep_event.fd:
                        self._sleep_event.drain()
                        self._sleep_until_woken()
                        break  # poll again: the kill event may have come meanwhile
                    action = actions.get(fd)
                    if action is not None:  # not one forgotten by an earlier callback
                        self._safe(action)
        except QueueError as e:
            self._interrupt.signal_needs_reset(str(e))
        except WorkerStopping:
            pass  # a request was abandoned half way: the driver is resetting the device
        finally:
            ep.close()
            with self._pause_cond:
                self._ended = True
                self._pause_cond.notify_all()  # a pause() waiting on a dead worker returns

    def _sleep_until_woken(self) -> None:
        with self._pause_cond:
            if not self._pauses:
                return
            self._sleeping = True
            self._pause_cond.notify_all()
            try:
                while self._pauses and not self._stopping:
                    self._pause_cond.wait(0.2)
            finally:
                self._sleeping = False

    def pause(self, timeout: float = STOP_TIMEOUT) -> bool:
        """Stop taking requests once the current one is done; False (and no pause) if
        the worker did not get there within `timeout`. Each True needs a `resume()`."""
        with self._pause_cond:
            self._pauses += 1
        try:
            self._sleep_event.signal()
        except OSError:
            pass  # stopped (its events are closed): it has ended, which counts as asleep
        with self._pause_cond:
            asleep = self._pause_cond.wait_for(
                lambda: self._sleeping or self._ended, timeout)
            if not asleep:  # undone: a worker busy for long must not sleep later for it
                self._pauses -= 1
                self._pause_cond.notify_all()
            return asleep

    def resume(self) -> None:
        """End one pause; the worker takes requests again when none is left (the kicks
        that came meanwhile are still pending)."""
        with self._pause_cond:
            if self._pauses:
                self._pauses -= 1
            self._pause_cond.notify_all()

    def _serve(self, index: int, event: Event) -> None:
        if self._handle(index):
            event.signal()  # come back after the other events

    def _safe(self, fn: Callable[[], None]) -> None:
        try:
            fn()
        except (QueueError, WorkerStopping):
            raise
        except Exception:  # a device bug must not take the VMM down; log and go on
            self._errors.error("%s: worker error:\n%s", self.name, traceback.format_exc())

    def watch(self, fd: int, readable: bool, writable: bool = False,
              callback: Callable[[], None] | None = None) -> None:
        """Choose what to wait for on one of the `extra` fds (its callback runs for
        either); only from the worker's own callbacks. A device with nowhere to put
        input stops polling its source (leaving it to the source's own bounded queue)
        instead of spinning on it, and waits for room only while output is held.
        `callback` adds an fd the worker did not start with (a new connection)."""
        if self._ep is None:
            return
        if callback is not None:
            self._actions[fd] = callback
        events = (select.EPOLLIN if readable else 0) | (select.EPOLLOUT if writable else 0)
        # Waiting for nothing means leaving the set: epoll reports a hang-up whatever
        # was asked for, and a closed peer would wake the worker forever.
        if not events:
            if fd in self._watched:
                self._ep.unregister(fd)
                self._watched.discard(fd)
        elif fd in self._watched:
            self._ep.modify(fd, events)
        else:
            self._ep.register(fd, events)
            self._watched.add(fd)

    def forget(self, fd: int) -> None:
        """Stop waiting on `fd` and drop its callback, before the caller closes it
        (only from the worker's own callbacks)."""
        self.watch(fd, False, False)
        self._actions.pop(fd, None)

    def stop(self) -> None:
        """Stop the thread and take the queues back; `WorkerStuck` if it will not stop."""
        self._stopping = True
        self.kill.signal()
        if threading.current_thread() is self._thread:
            return
        self._thread.join(STOP_TIMEOUT)
        if self._thread.is_alive():
            raise WorkerStuck(f"{self.name}: the worker did not stop within {STOP_TIMEOUT:g} s")
        self.kill.close()
        self._sleep_event.close()  # one eventfd per activation otherwise (a driver reset)


def signal_used(mem: GuestMemory, queue: Queue, interrupt: Interrupt) -> None:
    """Interrupt the driver once for what was used since the last interrupt, if it
    asked for one (EVENT_IDX or the NO_INTERRUPT flag)."""
    if queue.used_since_signal and queue.needs_interrupt(mem):
        interrupt.signal_used_queue(queue.vector)


def process_queue(mem: GuestMemory, queue: Queue, interrupt: Interrupt,
                  handle_chain: Callable[[DescriptorChain], int],
                  want: Callable[[], bool] | None = None, budget: int | None = None) -> bool:
    """Serve available chains, then interrupt the driver once if it asked.

    `handle_chain` returns the number of bytes written into the chain; `want` (if
    given) says whether the device has anything to put in another chain. At most
    `budget` chains (twice the queue size by default) are served per call, so a driver
    that keeps adding buffers cannot hold the worker: returns True when chains remain.
    With EVENT_IDX the avail event is re-armed and the ring re-checked, so a buffer the
    driver adds meanwhile is not left without a kick.
    """
    more = False
    try:
        for _ in range(2 * queue.size if budget is None else budget):
            if want is not None and not want():
                break
            chain = queue.pop(mem)
            if chain is None:
                queue.set_avail_event(mem)
                if not queue.has_available(mem):
                    break
                continue
            try:
                written = handle_chain(chain)
            except (QueueError, WorkerStopping):
                raise
            except Exception:  # a device bug fails this request, not the queue
                _chain_errors.error("request failed:\n%s", traceback.format_exc())
                written = 0
            queue.add_used(mem, chain.index, written)
        else:
            more = queue.has_available(mem)
    finally:
        signal_used(mem, queue, interrupt)  # for what completed, whatever happens next
    return more
