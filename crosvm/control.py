"""Drive a running VM over its control socket from Python: what crosvm_control is for C.

Each function sends one crosvm `VmRequest` to the VM listening on `socket_path`
(`crosvm run -s PATH`) and returns a Python value; any refusal or failure raises
`ControlError` with the VM's message.

    from crosvm import control
    control.suspend("/run/vm.sock")
    control.resume("/run/vm.sock")
    print(control.balloon_stats("/run/vm.sock").free_memory)
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from crosvm.vm_control.client import ControlError, handle_request

__all__ = ["BalloonStats", "ControlError", "balloon", "balloon_stats", "disk_resize", "gpe",
           "powerbtn", "resume", "sleepbtn", "stop", "suspend"]

# A balloon `--wait` may take as long as the guest needs to give its memory back.
WAIT_TIMEOUT = 120.0
# Suspend, resume and resize wait for vCPUs and device workers (10 s each at most, one
# device after another), and fail as a whole on the VMM's side when they time out: the
# client waits longer, so its "timed out" never hides a suspend that went on.
SLOW_TIMEOUT = 120.0


def request(socket_path: str, req: object, timeout: float | None = None) -> object:
    """Send any request; its response, with `{"Err": ..}`/`{"ErrString": ..}` raised."""
    response = handle_request(req, socket_path, timeout)
    if isinstance(response, dict) and len(response) == 1:
        (name, value), = response.items()
        if name == "ErrString":
            raise ControlError(str(value)[:400])
        if name == "Err":
            raise ControlError(f"the VM refused the request: error {str(value)[:100]}")
    return response


def _ok(socket_path: str, req: object, timeout: float | None = None) -> None:
    response = request(socket_path, req, timeout)
    if response != "Ok":
        raise ControlError(f"unexpected response from the VM: {str(response)[:200]}")


def stop(socket_path: str) -> None:
    """Stop the VM (`crosvm stop`); it exits with status 0."""
    _ok(socket_path, "Exit")


def suspend(socket_path: str, full: bool = False) -> None:
    """Park every vCPU (`crosvm suspend`); `full` also stops the devices taking
    requests (`--full`). Returns once they are stopped."""
    _ok(socket_path, "SuspendVm" if full else "SuspendVcpus", SLOW_TIMEOUT)


def resume(socket_path: str, full: bool = False) -> None:
    """Undo `suspend` (`crosvm resume [--full]`)."""
    _ok(socket_path, "ResumeVm" if full else "ResumeVcpus", SLOW_TIMEOUT)


def powerbtn(socket_path: str) -> None:
    """Press the ACPI power button."""
    _ok(socket_path, "Powerbtn")


def sleepbtn(socket_path: str) -> None:
    """Press the ACPI sleep button."""
    _ok(socket_path, "Sleepbtn")


def gpe(socket_path: str, number: int) -> None:
    """Raise ACPI general-purpose event `number`."""
    _ok(socket_path, {"Gpe": {"gpe": number, "clear_evt": None}})


def disk_resize(socket_path: str, index: int, new_size: int) -> None:
    """Resize disk `index` (in --block order) to `new_size` bytes; the guest is told."""
    _ok(socket_path, {"DiskCommand": {"disk_index": index,
                                      "command": {"Resize": {"new_size": new_size}}}},
        SLOW_TIMEOUT)


def balloon(socket_path: str, num_bytes: int, wait: bool = False) -> None:
    """Set the balloon to `num_bytes` (memory taken from the guest); with `wait`, return
    only once the guest has given that much."""
    _ok(socket_path, {"BalloonCommand": {"Adjust": {"num_bytes": num_bytes,
                                                    "wait_for_success": wait}}},
        WAIT_TIMEOUT if wait else None)


@dataclass
class BalloonStats:
    """crosvm's `BalloonStats` (bytes or counts; None for what the guest did not report)
    plus `balloon_actual`, the bytes the balloon holds."""

    swap_in: int | None = None
    swap_out: int | None = None
    major_faults: int | None = None
    minor_faults: int | None = None
    free_memory: int | None = None
    total_memory: int | None = None
    available_memory: int | None = None
    disk_caches: int | None = None
    hugetlb_allocations: int | None = None
    hugetlb_failures: int | None = None
    shared_memory: int | None = None
    unevictable_memory: int | None = None
    balloon_actual: int = 0

    @classmethod
    def from_response(cls, response: object) -> "BalloonStats":
        """From `{"BalloonStats": {"stats": {...}, "balloon_actual": N}}`."""
        body = response.get("BalloonStats") if isinstance(response, dict) else None
        stats = body.get("stats") if isinstance(body, dict) else None
        actual = body.get("balloon_actual") if isinstance(body, dict) else None
        if not isinstance(stats, dict) or not isinstance(actual, int):
            raise ControlError(f"unexpected response from the VM: {str(response)[:200]}")
        out = cls(balloon_actual=actual)
        for f in fields(cls):
            value = stats.get(f.name)
            if f.name != "balloon_actual" and isinstance(value, int):
                setattr(out, f.name, value)
        return out


def balloon_stats(socket_path: str) -> BalloonStats:
    """The guest's memory statistics as its balloon driver last reported them."""
    return BalloonStats.from_response(request(socket_path, {"BalloonCommand": "Stats"}))
