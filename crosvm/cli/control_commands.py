"""The subcommands that talk to a running VM: `suspend`, `resume`, `powerbtn`,
`sleepbtn`, `gpe`, `disk resize`, `balloon`, `balloon_stats` (crosvm's spelling; the
last positional argument is the VM's control socket). A bad command line exits 35;
a VM that cannot be reached or refuses exits 1."""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from typing import Callable

from crosvm import control
from crosvm.cli.output import write_stdout
from crosvm.vmm.exit import ExitCode

log = logging.getLogger("crosvm")


class ControlUsageError(Exception):
    """Bad arguments for a control subcommand (exit 35)."""


def _split(args: list[str], usage: str, switches: tuple[str, ...] = ()) -> tuple[list[str],
                                                                               set[str]]:
    """(positional arguments, switches given); ControlUsageError for anything else."""
    positional: list[str] = []
    given: set[str] = set()
    for arg in args:
        if arg in switches:
            given.add(arg)
        elif arg.startswith("-") and arg != "-" and not _is_int(arg):
            raise ControlUsageError(f"unrecognized argument: {arg}\n{usage}")
        else:
            positional.append(arg)
    return positional, given


def _is_int(text: str) -> bool:
    try:
        int(text, 0)
        return True
    except ValueError:
        return False


def _u64(text: str, what: str) -> int:
    try:
        value = int(text, 0)
    except ValueError:
        raise ControlUsageError(f"invalid {what} '{text[:40]}': not an integer") from None
    if not 0 <= value < 1 << 64:
        raise ControlUsageError(f"invalid {what} '{text[:40]}': out of range")
    return value


def _send(fn: Callable[[], object]) -> int:
    try:
        fn()
    except control.ControlError as e:
        log.error("%s", e)
        return int(ExitCode.ERROR)
    return 0


def _help(args: list[str], usage: str) -> bool:
    if "-h" in args or "--help" in args:
        write_stdout(usage)
        return True
    return False


def _simple(name: str, fn: Callable[[str], None], what: str) -> Callable[[list[str]], int]:
    usage = f"Usage: crosvm {name} VM_SOCKET\n\n{what}"

    def command(args: list[str]) -> int:
        if _help(args, usage):
            return 0
        positional, _ = _split(args, usage)
        if len(positional) != 1:
            raise ControlUsageError(f"usage: crosvm {name} VM_SOCKET")
        return _send(lambda: fn(positional[0]))
    return command


def _suspend_resume(name: str, fn: Callable[[str, bool], None],
                    what: str) -> Callable[[list[str]], int]:
    usage = f"Usage: crosvm {name} VM_SOCKET [--full]\n\n{what}"

    def command(args: list[str]) -> int:
        if _help(args, usage):
            return 0
        positional, given = _split(args, usage, ("--full",))
        if len(positional) != 1:
            raise ControlUsageError(f"usage: crosvm {name} VM_SOCKET [--full]")
        return _send(lambda: fn(positional[0], "--full" in given))
    return command


def cmd_gpe(args: list[str]) -> int:
    usage = "Usage: crosvm gpe GPE_NUMBER VM_SOCKET\n\nRaises an ACPI general-purpose event."
    if _help(args, usage):
        return 0
    positional, _ = _split(args, usage)
    if len(positional) != 2:
        raise ControlUsageError("usage: crosvm gpe GPE_NUMBER VM_SOCKET")
    number = _u64(positional[0], "GPE number")
    return _send(lambda: control.gpe(positional[1], number))


DISK_USAGE = """Usage: crosvm disk resize DISK_INDEX NEW_SIZE VM_SOCKET

Resizes disk DISK_INDEX (the order of --block options, from 0) to NEW_SIZE bytes."""


def cmd_disk(args: list[str]) -> int:
    if _help(args, DISK_USAGE):
        return 0
    positional, _ = _split(args, DISK_USAGE)
    if len(positional) != 4 or positional[0] != "resize":
        raise ControlUsageError("usage: crosvm disk resize DISK_INDEX NEW_SIZE VM_SOCKET")
    index = _u64(positional[1], "disk index")
    size = _u64(positional[2], "disk size")
    return _send(lambda: control.disk_resize(positional[3], index, size))


BALLOON_USAGE = """Usage: crosvm balloon NUM_BYTES VM_SOCKET [--wait]

Sets the balloon to NUM_BYTES (memory taken back from the guest); with --wait, returns
once the guest has given it."""


def cmd_balloon(args: list[str]) -> int:
    if _help(args, BALLOON_USAGE):
        return 0
    positional, given = _split(args, BALLOON_USAGE, ("--wait",))
    if len(positional) != 2:
        raise ControlUsageError("usage: crosvm balloon NUM_BYTES VM_SOCKET [--wait]")
    num_bytes = _u64(positional[0], "balloon size")
    return _send(lambda: control.balloon(positional[1], num_bytes, "--wait" in given))


def cmd_balloon_stats(args: list[str]) -> int:
    usage = ("Usage: crosvm balloon_stats VM_SOCKET\n\nPrints the guest's memory statistics "
             "as JSON: {\"BalloonStats\": {\"stats\": {...}, \"balloon_actual\": N}}.")
    if _help(args, usage):
        return 0
    positional, _ = _split(args, usage)
    if len(positional) != 1:
        raise ControlUsageError("usage: crosvm balloon_stats VM_SOCKET")
    try:
        stats = control.balloon_stats(positional[0])
    except control.ControlError as e:
        log.error("%s", e)
        return int(ExitCode.ERROR)
    body = asdict(stats)
    actual = body.pop("balloon_actual")
    write_stdout(json.dumps({"BalloonStats": {"stats": body, "balloon_actual": actual}}))
    return 0


COMMANDS: dict[str, Callable[[list[str]], int]] = {
    "suspend": _suspend_resume("suspend", control.suspend,
                               "Parks the VM's vCPUs; --full also stops its devices."),
    "resume": _suspend_resume("resume", control.resume, "Resumes a suspended VM."),
    "powerbtn": _simple("powerbtn", control.powerbtn, "Presses the VM's ACPI power button."),
    "sleepbtn": _simple("sleepbtn", control.sleepbtn, "Presses the VM's ACPI sleep button."),
    "gpe": cmd_gpe,
    "disk": cmd_disk,
    "balloon": cmd_balloon,
    "balloon_stats": cmd_balloon_stats,
}
