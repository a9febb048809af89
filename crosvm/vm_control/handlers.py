"""What a running VM does for each control request (crosvm's `VmRequest` variants).

`vm_handlers(vm)` maps request names to handlers for ControlServer. Handlers that wait
(for vCPUs to park, a device process to answer, the guest to report) return a
`Deferred`, so the server thread itself never blocks.
"""

from __future__ import annotations

import functools
import time
from typing import TYPE_CHECKING, Any, Callable

from crosvm.devices import control as C
from crosvm.vm_control.server import Deferred, Handler, err_string

if TYPE_CHECKING:
    from crosvm.vmm.run import Vm

PARK_TIMEOUT = 10.0  # how long `suspend` waits for every vCPU to leave the guest
STATS_TIMEOUT = 5.0  # how long `balloon_stats` waits for the guest's fresh report
BALLOON_WAIT_TIMEOUT = 110.0  # `balloon --wait` (the client waits WAIT_TIMEOUT = 120)
POLL = 0.05
PAGE_SHIFT = 12

# Requests crosvm has and this VMM does not: answered with an ErrString that names them.
UNSUPPORTED = ("UsbCommand", "GpuCommand", "BatCommand", "SndCommand", "Snapshot", "Swap",
               "HotPlugVfioCommand", "HotPlugNetCommand", "MakeRT", "Rtc", "PciPme",
               "RegisterListener", "UnregisterListener", "Unregister", "VcpuPidTid",
               "Throttle", "GetVmDescriptor", "RegisterMemory", "UnregisterMemory")


class RequestError(Exception):
    """A request that is refused with an ErrString carrying this message."""


def parse_gpe(payload: Any) -> int:
    """`{"Gpe": N}` (older crosvm) or `{"Gpe": {"gpe": N, "clear_evt": null}}`."""
    if isinstance(payload, dict):
        payload = payload.get("gpe")
    if not isinstance(payload, int) or isinstance(payload, bool) or payload < 0:
        raise RequestError("Gpe needs a GPE number")
    return payload


def parse_disk_command(payload: Any) -> tuple[int, int]:
    """(disk index, new size) of `{"disk_index": I, "command": {"Resize": {"new_size": N}}}`."""
    if not isinstance(payload, dict):
        raise RequestError("DiskCommand needs disk_index and command")
    index = payload.get("disk_index")
    command = payload.get("command")
    if not _is_u64(index):
        raise RequestError("DiskCommand: disk_index must be a non-negative integer")
    if not (isinstance(command, dict) and len(command) == 1 and "Resize" in command
            and isinstance(command["Resize"], dict)):
        raise RequestError(f"DiskCommand: unsupported command {str(command)[:64]}")
    size = command["Resize"].get("new_size")
    if not _is_u64(size):
        raise RequestError("DiskCommand: new_size must be a non-negative integer")
    return index, size


def parse_balloon_command(payload: Any) -> tuple[str, int, bool]:
    """("stats", 0, False) for `"Stats"`, ("adjust", num_bytes, wait) for
    `{"Adjust": {"num_bytes": N, "wait_for_success": B}}`."""
    if payload == "Stats":
        return "stats", 0, False
    adjust = payload.get("Adjust") if isinstance(payload, dict) and len(payload) == 1 else None
    if not isinstance(adjust, dict):
        raise RequestError(f"BalloonCommand: unsupported command {str(payload)[:64]}")
    num_bytes = adjust.get("num_bytes")
    wait = adjust.get("wait_for_success", False)
    if not _is_u64(num_bytes) or not isinstance(wait, bool):
        raise RequestError("BalloonCommand: Adjust needs num_bytes (an integer) and "
                           "wait_for_success (a boolean)")
    return "adjust", num_bytes, wait


def stats_response(payload: bytes) -> tuple[int, dict[str, Any]]:
    """(generation, crosvm's BalloonStats response) from a CTRL_BALLOON_STATS payload."""
    from crosvm.devices.virtio.balloon_parse import STAT_FIELDS
    generation, actual, mask, *values = C.STATS.unpack(payload)
    stats = {name: (values[i] if mask >> i & 1 else None) for i, name in enumerate(STAT_FIELDS)}
    return generation, {"BalloonStats": {"stats": stats,
                                         "balloon_actual": actual << PAGE_SHIFT}}


def _is_u64(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 1 << 64


def device_call(target: Any, code: int, arg: int = 0) -> bytes:
    """Send a crosvm.devices.control request to a device (in process, or through its
    proxy) and check the answer; DeviceControlError when refused."""
    return C.decode_result(code, target.control(code, arg))


def _guarded(fn: Callable[..., object]) -> Handler:
    @functools.wraps(fn)  # keeps fn's signature: the server checks arguments against it
    def handler(*args: Any) -> object:
        try:
            return fn(*args)
        except (RequestError, C.DeviceControlError) as e:
            return err_string(str(e))
    return handler


def vm_handlers(vm: "Vm") -> dict[str, Handler]:
    """Every request `vm` answers."""

    def suspend_vcpus() -> object:
        # Nothing happens until the work runs: a request refused as busy changes nothing.
        def wait_parked() -> object:
            for v in vm.vcpus:
                v.suspend()
            deadline = time.monotonic() + PARK_TIMEOUT
            while not all(v.is_parked() for v in vm.vcpus):
                if time.monotonic() > deadline:
                    resume_vcpus()  # all or nothing: the client is told it failed
                    return err_string("the vCPUs did not stop in time")
                time.sleep(0.01)
            return "Ok"
        return Deferred(wait_parked)

    def resume_vcpus() -> object:
        for v in vm.vcpus:
            v.resume()
        return "Ok"

    def devices_call(code: int, targets: list | None = None) -> None:
        """Send `code` to every virtio device (or `targets`); raises with every refusal
        once all were asked."""
        errors = []
        for target in vm.virtio_targets() if targets is None else targets:
            try:
                device_call(target, code)
            except C.DeviceControlError as e:
                errors.append(str(e))
        if errors:
            raise C.DeviceControlError("; ".join(errors))

    def suspend_vm() -> object:
        inner = suspend_vcpus()

        def work() -> object:
            response = inner.work()
            if response != "Ok":
                return response
            slept: list = []
            try:
                for target in vm.virtio_targets():
                    if device_call(target, C.CTRL_SLEEP) == C.SLEPT:
                        slept.append(target)
            except C.DeviceControlError:
                # All or nothing: what this request put to sleep wakes (not a device an
                # earlier `suspend --full` holds), and the vCPUs run again.
                try:
                    devices_call(C.CTRL_WAKE, slept)
                finally:
                    resume_vcpus()
                raise
            return "Ok"
        return Deferred(_guarded(work))

    def resume_vm() -> object:
        def work() -> object:
            devices_call(C.CTRL_WAKE)  # devices first: a vCPU's first kick is served
            return resume_vcpus()
        return Deferred(_guarded(work))

    def gpe(payload: Any) -> object:
        number = parse_gpe(payload)
        try:
            vm.acpi_pm.gpe(number)
        except ValueError as e:
            raise RequestError(str(e)) from None
        return "Ok"

    def disk_command(payload: Any) -> object:
        index, size = parse_disk_command(payload)
        disks = vm.block_targets
        if index >= len(disks):
            raise RequestError(f"disk index {index} out of range (the VM has "
                               f"{len(disks)} disk{'s' if len(disks) != 1 else ''})")
        target = disks[index]

        def resize() -> object:
            device_call(target, C.CTRL_RESIZE, size)
            return "Ok"
        return Deferred(_guarded(resize))

    def balloon_command(payload: Any) -> object:
        kind, num_bytes, wait = parse_balloon_command(payload)
        target = vm.balloon_target
        if target is None:
            raise RequestError("no balloon device (the VM runs with --no-balloon)")
        if kind == "stats":
            def stats() -> object:
                first, response = stats_response(device_call(target, C.CTRL_BALLOON_STATS, 1))
                deadline = time.monotonic() + STATS_TIMEOUT
                while time.monotonic() < deadline:
                    time.sleep(POLL)
                    generation, fresh = stats_response(
                        device_call(target, C.CTRL_BALLOON_STATS, 0))
                    if generation != first:
                        return fresh
                return response  # the guest did not report in time: the last report
            return Deferred(_guarded(stats))
        pages = num_bytes >> PAGE_SHIFT
        if num_bytes > vm.mem_size:
            raise RequestError(f"balloon size {num_bytes} is larger than the guest's "
                               f"memory ({vm.mem_size} bytes)")

        def adjust() -> object:
            device_call(target, C.CTRL_BALLOON_ADJUST, pages)
            deadline = time.monotonic() + BALLOON_WAIT_TIMEOUT
            while wait:
                actual = C.ACTUAL.unpack(device_call(target, C.CTRL_BALLOON_ACTUAL))[0]
                if actual == pages:
                    break
                if time.monotonic() > deadline:
                    return err_string(f"the balloon reached {actual << PAGE_SHIFT} bytes, "
                                      f"not {pages << PAGE_SHIFT}, in time")
                time.sleep(POLL * 4)
            return "Ok"
        return Deferred(_guarded(adjust))

    def unsupported(name: str) -> Handler:
        return lambda *_: err_string(f"{name} is not supported by this VMM")

    handlers: dict[str, Handler] = {name: unsupported(name) for name in UNSUPPORTED}
    handlers.update({
        "Exit": vm._exit_request,
        "Powerbtn": lambda: vm.acpi_pm.power_button() or "Ok",
        "Sleepbtn": lambda: vm.acpi_pm.sleep_button() or "Ok",
        "Gpe": _guarded(gpe),
        "SuspendVcpus": suspend_vcpus, "Suspend": suspend_vcpus,
        "ResumeVcpus": resume_vcpus, "Resume": resume_vcpus,
        "SuspendVm": suspend_vm, "ResumeVm": resume_vm,
        "DiskCommand": _guarded(disk_command),
        "BalloonCommand": _guarded(balloon_command),
    })
    return handlers
