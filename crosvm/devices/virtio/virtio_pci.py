"""Modern virtio-pci transport (virtio 1.x, 4.1), laid out in one BAR as crosvm does.

BAR0 (64-bit memory, 0x8000 bytes):
  0x0000 common config   0x1000 ISR   0x2000 device config   0x3000 notify (4 bytes/queue)
  0x6000 MSI-X table     0x7000 MSI-X PBA
Queue kicks are ioeventfds registered with KVM on the notify addresses, so a kick
never runs Python on a vCPU thread; the notify handler here is only a fallback.
"""

from __future__ import annotations

import logging
import struct
import threading

from crosvm.base import Event
from crosvm.devices.pci.config import CAP_ID_MSIX, CAP_ID_VENDOR, BarType, PciBar, PciConfiguration
from crosvm.devices.pci.device import PciDevice
from crosvm.devices.pci.msix import NO_VECTOR, MsixConfig, RouteFn
from crosvm.devices.virtio import virtio_device as V
from crosvm.base.ratelimit import RateLimitedLog
from crosvm.devices.virtio.queue import QueueConfig
from crosvm.jail.jail import JailConfig
from crosvm.vm_memory import GuestMemory

log = logging.getLogger(__name__)
_guest_log = RateLimitedLog(log)

VIRTIO_PCI_VENDOR_ID = 0x1AF4
VIRTIO_PCI_DEVICE_ID_BASE = 0x1040
SUBSYSTEM_ID = 0x1100

BAR_SIZE = 0x8000
COMMON_OFFSET, COMMON_SIZE = 0x0000, 0x38
ISR_OFFSET, ISR_SIZE = 0x1000, 0x1
DEVICE_OFFSET, DEVICE_SIZE = 0x2000, 0x1000
NOTIFY_OFFSET, NOTIFY_SIZE = 0x3000, 0x1000
NOTIFY_OFF_MULTIPLIER = 4
MSIX_TABLE_OFFSET = 0x6000
MSIX_PBA_OFFSET = 0x7000

CAP_COMMON, CAP_NOTIFY, CAP_ISR, CAP_DEVICE, CAP_PCI_CFG = 1, 2, 3, 4, 5

# (pci class, subclass) by virtio device type.
CLASS_CODES = {V.TYPE_NET: (0x02, 0x00), V.TYPE_BLOCK: (0x01, 0x80),
               V.TYPE_CONSOLE: (0x07, 0x80)}

# Common config fields: name -> (offset, size); virtio 1.x struct virtio_pci_common_cfg.
COMMON_FIELDS = {
    "device_feature_select": (0x00, 4), "device_feature": (0x04, 4),
    "driver_feature_select": (0x08, 4), "driver_feature": (0x0C, 4),
    "config_msix_vector": (0x10, 2), "num_queues": (0x12, 2),
    "device_status": (0x14, 1), "config_generation": (0x15, 1),
    "queue_select": (0x16, 2), "queue_size": (0x18, 2), "queue_msix_vector": (0x1A, 2),
    "queue_enable": (0x1C, 2), "queue_notify_off": (0x1E, 2),
    "queue_desc": (0x20, 8), "queue_driver": (0x28, 8), "queue_device": (0x30, 8),
}


def virtio_cap(cfg_type: int, bar: int, offset: int, length: int, extra: bytes = b"") -> bytes:
    """struct virtio_pci_cap after the id/next bytes: cap_len, cfg_type, bar, id, pad."""
    return struct.pack("<BBBB2xII", 16 + len(extra), cfg_type, bar, 0, offset, length) + extra


class VirtioPciDevice(PciDevice):
    """Wraps a VirtioDevice: config space, BAR0 registers, status machine, MSI-X."""

    def __init__(self, device: V.VirtioDevice, mem: GuestMemory, msix_irqfds: list[Event],
                 msix_route: RouteFn) -> None:
        self.device = device
        self.mem = mem
        # The driver-programmed registers; the live queues are the worker's alone.
        self.queues = [QueueConfig(n) for n in device.queue_max_sizes()]
        self.queue_events = [Event() for _ in self.queues]
        cls, sub = CLASS_CODES.get(device.device_type, (0xFF, 0x00))
        self.config = PciConfiguration(
            VIRTIO_PCI_VENDOR_ID, VIRTIO_PCI_DEVICE_ID_BASE + device.device_type, cls, sub,
            revision=1, subsystem_vendor_id=VIRTIO_PCI_VENDOR_ID, subsystem_id=SUBSYSTEM_ID)
        num_vectors = len(self.queues) + 1
        if len(msix_irqfds) != num_vectors:
            raise ValueError(f"{device.debug_label()} needs {num_vectors} MSI-X irqfds")
        self.msix = MsixConfig(num_vectors, msix_irqfds, msix_route)
        self.interrupt = V.Interrupt(self.msix, None)
        self.interrupt.on_needs_reset = self._needs_reset
        self._add_capabilities()
        self._lock = threading.RLock()
        self._control_lock = threading.Lock()  # one VMM control request at a time
        self._slept: object | None = None  # the worker `suspend --full` paused
        self.intx = None
        self._reset_state()

    def debug_label(self) -> str:
        return f"virtio-pci {self.device.debug_label()}"

    @property
    def seccomp_policy(self) -> str:  # type: ignore[override]
        return self.device.seccomp_policy

    def jail_config(self) -> JailConfig:
        return self.device.jail_config()

    def close_in_vmm(self) -> None:
        """After the fork: what only the device's process may hold (its own hook)."""
        hook = getattr(self.device, "close_in_vmm", None)
        if hook is not None:
            hook()

    @staticmethod
    def num_msix_vectors(device: V.VirtioDevice) -> int:
        return len(device.queue_max_sizes()) + 1

    def _add_capabilities(self) -> None:
        c = self.config
        c.add_capability(CAP_ID_VENDOR, virtio_cap(CAP_COMMON, 0, COMMON_OFFSET, COMMON_SIZE))
        c.add_capability(CAP_ID_VENDOR, virtio_cap(CAP_ISR, 0, ISR_OFFSET, ISR_SIZE))
        c.add_capability(CAP_ID_VENDOR, virtio_cap(CAP_DEVICE, 0, DEVICE_OFFSET, DEVICE_SIZE))
        c.add_capability(CAP_ID_VENDOR, virtio_cap(
            CAP_NOTIFY, 0, NOTIFY_OFFSET, NOTIFY_SIZE, struct.pack("<I", NOTIFY_OFF_MULTIPLIER)))
        # VIRTIO_PCI_CAP_PCI_CFG must exist; like crosvm's it is a stub.
        c.add_capability(CAP_ID_VENDOR, virtio_cap(CAP_PCI_CFG, 0, 0, 0, bytes(4)))
        self.msix_cap = c.add_capability(
            CAP_ID_MSIX, self.msix.capability_body(0, MSIX_TABLE_OFFSET, 0, MSIX_PBA_OFFSET),
            writable={0: 0xC000_0000})

    def bar_specs(self) -> list[PciBar]:
        return [PciBar(0, BAR_SIZE, BarType.MEM64)]

    def assign_irq(self, line, pin: int, irq: int) -> None:
        super().assign_irq(line, pin, irq)
        self.interrupt.intx = line

    def notify_addresses(self) -> list[tuple[Event, int]]:
        """(kick event, guest address) for each queue, to register as ioeventfds."""
        base = self.config.bar_address(0) + NOTIFY_OFFSET
        return [(e, base + i * NOTIFY_OFF_MULTIPLIER) for i, e in enumerate(self.queue_events)]

    # -- state ------------------------------------------------------------------
    def _reset_state(self) -> None:
        self.status = 0
        self.device_feature_select = 0
        self.driver_feature_select = 0
        self.driver_features = 0
        self.queue_select = 0
        self.config_generation = 0
        self.interrupt.config_vector = NO_VECTOR
        self.activated = False
        self.broken = False  # NEEDS_RESET: set by the worker's thread, cleared by a reset
        for q in self.queues:
            q.reset()
        self.interrupt.read_and_clear_isr()

    def _queue(self) -> QueueConfig | None:
        if 0 <= self.queue_select < len(self.queues):
            return self.queues[self.queue_select]
        return None

    # -- config space -----------------------------------------------------------
    def write_config_register(self, reg: int, offset: int, data: bytes | memoryview) -> None:
        super().write_config_register(reg, offset, data)
        if reg == self.msix_cap // 4:
            self.msix.write_message_control(self.config.regs[reg] >> 16)

    # -- BAR0 -------------------------------------------------------------------
    def read_bar(self, index: int, offset: int, data: memoryview) -> None:
        n = len(data)
        with self._lock:
            if COMMON_OFFSET <= offset and offset + n <= COMMON_OFFSET + COMMON_SIZE:
                raw = self._common_bytes()
                data[:] = raw[offset - COMMON_OFFSET:offset - COMMON_OFFSET + n]
            elif offset == ISR_OFFSET and n == 1:
                data[0] = self.interrupt.read_and_clear_isr()
            elif DEVICE_OFFSET <= offset and offset + n <= DEVICE_OFFSET + DEVICE_SIZE:
                self.device.read_config(offset - DEVICE_OFFSET, data)
            elif MSIX_TABLE_OFFSET <= offset < MSIX_PBA_OFFSET:
                self.msix.read_table(offset - MSIX_TABLE_OFFSET, data)
            elif MSIX_PBA_OFFSET <= offset < BAR_SIZE:
                self.msix.read_pba(offset - MSIX_PBA_OFFSET, data)
            else:
                data[:] = bytes(n)

    def write_bar(self, index: int, offset: int, data: bytes | memoryview) -> None:
        n = len(data)
        with self._lock:
            if COMMON_OFFSET <= offset and offset + n <= COMMON_OFFSET + COMMON_SIZE:
                self._write_common(offset - COMMON_OFFSET, data)
            elif DEVICE_OFFSET <= offset and offset + n <= DEVICE_OFFSET + DEVICE_SIZE:
                self.device.write_config(offset - DEVICE_OFFSET, data)
            elif NOTIFY_OFFSET <= offset < NOTIFY_OFFSET + NOTIFY_SIZE:
                # Only reached when the ioeventfd did not match (an odd access size).
                queue = (offset - NOTIFY_OFFSET) // NOTIFY_OFF_MULTIPLIER
                if queue < len(self.queue_events):
                    self.queue_events[queue].signal()
            elif MSIX_TABLE_OFFSET <= offset < MSIX_PBA_OFFSET:
                self.msix.write_table(offset - MSIX_TABLE_OFFSET, data)

    def _field_values(self) -> dict[str, int]:
        q = self._queue()
        features = self.device.features()
        sel = self.device_feature_select
        values = {
            "device_feature_select": sel,
            "device_feature": (features >> (32 * sel)) & 0xFFFF_FFFF if sel < 2 else 0,
            "driver_feature_select": self.driver_feature_select,
            "driver_feature": (self.driver_features >> (32 * self.driver_feature_select))
            & 0xFFFF_FFFF if self.driver_feature_select < 2 else 0,
            "config_msix_vector": self.interrupt.config_vector,
            "num_queues": len(self.queues),
            "device_status": self.status | (V.STATUS_NEEDS_RESET if self.broken else 0),
            "config_generation": self.config_generation,
            "queue_select": self.queue_select,
        }
        if q is None:
            values.update(queue_size=0, queue_msix_vector=NO_VECTOR, queue_enable=0,
                          queue_notify_off=0, queue_desc=0, queue_driver=0, queue_device=0)
        else:
            values.update(queue_size=q.size, queue_msix_vector=q.vector,
                          queue_enable=int(q.ready), queue_notify_off=self.queue_select,
                          queue_desc=q.desc_table, queue_driver=q.avail_ring,
                          queue_device=q.used_ring)
        return values

    def _common_bytes(self) -> bytes:
        raw = bytearray(COMMON_SIZE)
        for name, value in self._field_values().items():
            off, size = COMMON_FIELDS[name]
            raw[off:off + size] = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")
        return bytes(raw)

    def _write_common(self, offset: int, data: bytes | memoryview) -> None:
        raw = bytearray(self._common_bytes())
        raw[offset:offset + len(data)] = data
        for name, (off, size) in COMMON_FIELDS.items():
            if off < offset + len(data) and offset < off + size:
                self._set_field(name, int.from_bytes(raw[off:off + size], "little"))

    def _set_field(self, name: str, value: int) -> None:
        q = self._queue()
        # Frozen once the driver says DRIVER_OK, and while a worker owns the queues.
        queue_writable = (q is not None and not self.activated
                          and not self.status & V.STATUS_DRIVER_OK)
        if name == "device_feature_select":
            self.device_feature_select = value
        elif name == "driver_feature_select":
            self.driver_feature_select = value
        elif name == "driver_feature":
            if self.status & V.STATUS_FEATURES_OK or self.driver_feature_select >= 2:
                return  # features are frozen once FEATURES_OK is set
            shift = 32 * self.driver_feature_select
            self.driver_features = (self.driver_features & ~(0xFFFF_FFFF << shift)) | value << shift
        elif name == "config_msix_vector":
            self.interrupt.config_vector = value if value < self.msix.num_vectors else NO_VECTOR
        elif name == "device_status":
            self._set_status(value)
        elif name == "queue_select":
            self.queue_select = value
        elif not queue_writable:
            return
        elif name == "queue_size":
            q.size = value
        elif name == "queue_msix_vector":
            q.vector = value if value < self.msix.num_vectors else NO_VECTOR
        elif name == "queue_enable":
            q.ready = value == 1
        elif name == "queue_desc":
            q.desc_table = value
        elif name == "queue_driver":
            q.avail_ring = value
        elif name == "queue_device":
            q.used_ring = value

    # -- status state machine ---------------------------------------------------
    def _set_status(self, value: int) -> None:
        value &= 0xFF
        if value == 0:
            self._reset()
            return
        if value == self.status:
            return  # nothing new (and no second try at a failed activation)
        # NEEDS_RESET is the device's bit, not the driver's: a write of it alone is not
        # a reset request (it would clear every other bit, which is ignored below).
        value &= ~V.STATUS_NEEDS_RESET
        if self.status & ~value:
            # Only a reset (0) may clear status bits (virtio 1.x, 2.1.1).
            _guest_log.warning("%s: driver tried to clear status bits (%#x -> %#x); ignored",
                               self.debug_label(), self.status, value)
            return
        if value & ~self.status & V.STATUS_FEATURES_OK:
            offered = self.device.features()
            if (self.driver_features & ~offered) or not (
                    self.driver_features >> V.VIRTIO_F_VERSION_1) & 1:
                _guest_log.warning("%s: driver accepted features %#x not offered (%#x) or without "
                            "VERSION_1", self.debug_label(), self.driver_features, offered)
                value &= ~V.STATUS_FEATURES_OK
            else:
                self.device.ack_features(self.driver_features)
        self.status = value
        needed = V.STATUS_ACKNOWLEDGE | V.STATUS_DRIVER | V.STATUS_FEATURES_OK | V.STATUS_DRIVER_OK
        if (not self.activated and value & needed == needed
                and not value & V.STATUS_FAILED):
            self._activate()

    def _activate(self) -> None:
        event_idx = bool((self.driver_features >> V.VIRTIO_RING_F_EVENT_IDX) & 1)
        ready = []
        for i, q in enumerate(self.queues):
            if not q.ready:
                continue
            if not q.is_valid(self.mem, event_idx):
                self._needs_reset(f"queue {i} is invalid")
                return
            ready.append((i, q.activate(event_idx), self.queue_events[i]))
        try:
            self.device.activate(self.mem, self.interrupt, ready)
        except Exception as e:  # noqa: BLE001 - a failed activate only breaks this device
            self._needs_reset(f"activate failed: {e}")
            return
        self.activated = True

    def _needs_reset(self, why: str) -> None:
        """NEEDS_RESET plus a config interrupt (virtio 1.x, 2.1.2). Called from the vCPU
        path or from the worker's thread, so it takes no lock: the worker may be the one
        a reset (holding the lock) is waiting for."""
        _guest_log.error("%s: %s; device needs reset", self.debug_label(), why)
        self.broken = True
        self.config_generation = (self.config_generation + 1) & 0xFF
        self.interrupt.signal_config_changed()

    def _reset(self) -> None:
        # The worker hands the queues back, or WorkerStuck ends this device (exit 33).
        if self.activated and not self.device.reset():
            log.warning("%s: device does not support reset", self.debug_label())
        for e in self.queue_events:
            e.drain()
        self._reset_state()

    # -- run-time requests from the VMM ----------------------------------------------
    def control(self, code: int, arg: int) -> bytes:
        """Serve a crosvm.devices.control request; the encoded result, never raises (it
        runs in the device process, on the request the VMM sent)."""
        from crosvm.devices import control as C
        try:
            if code not in C.CODES or not 0 <= arg <= C.MAX_ARG:
                raise C.DeviceControlError(f"unknown device request {code}")
            # Sleep and wake not under `_lock`: a pause may wait for a long request to
            # finish, and (without the sandbox) the vCPUs reach the registers meanwhile.
            with self._control_lock:
                with self._lock:
                    worker = self.device.worker if self.activated else None
                if code == C.CTRL_SLEEP:  # `suspend --full`: once, however often asked
                    if not getattr(self.device, "can_sleep", True):
                        raise C.DeviceControlError(f"{self.device.debug_label()}: cannot "
                                                   "sleep (its queues are served elsewhere)")
                    if worker is None or self._slept is worker:
                        return C.encode_ok(C.ALREADY)
                    if not worker.pause():
                        raise C.DeviceControlError(f"{self.device.debug_label()}: the "
                                                   "worker did not stop in time")
                    self._slept = worker
                    return C.encode_ok(C.SLEPT)  # paused now: a failed suspend undoes it
                if code == C.CTRL_WAKE:
                    if self._slept is not None:
                        self._slept.resume()
                        self._slept = None
                    return C.encode_ok()
                # Under `_lock`: a guest reset must not swap the worker a resize paused.
                with self._lock:
                    payload, config_changed = self.device.control(code, arg)
                    if config_changed:
                        # virtio 1.x, 4.1.4.3: the driver rereads config when the
                        # generation changes, and is told by the config interrupt.
                        self.config_generation = (self.config_generation + 1) & 0xFF
                        if self.activated:
                            self.interrupt.signal_config_changed()
                return C.encode_ok(payload)
        except C.DeviceControlError as e:
            return C.encode_error(str(e))
        except Exception as e:  # noqa: BLE001 - a device bug refuses the request only
            log.warning("%s: request %d failed: %s: %s", self.debug_label(), code,
                        type(e).__name__, e)
            return C.encode_error(f"{type(e).__name__}: {e}")

    def close(self) -> None:
        self.device.close()

