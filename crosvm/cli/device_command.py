"""`crosvm device TYPE --socket PATH ...`: one of our virtio devices served as a
vhost-user back-end to another VMM (QEMU, or `crosvm run --vhost-user`)."""

from __future__ import annotations

import logging

from crosvm.vmm.exit import ExitCode

log = logging.getLogger("crosvm")

USAGE = """Usage: crosvm device block --socket PATH --file IMAGE[,ro]

Serves a virtio block device on the vhost-user socket PATH (created; removed once a
front-end connects) until that front-end disconnects. IMAGE is any disk format
`crosvm run --block` takes. `--socket-path` is the same as `--socket`."""

TYPES = ("block",)


class DeviceUsageError(Exception):
    """Bad arguments for `crosvm device` (exit 35)."""


def parse(args: list[str]) -> tuple[str, str, str, bool]:
    """(type, socket path, image, read-only) from the command line."""
    if not args:
        raise DeviceUsageError("usage: crosvm device block --socket PATH --file IMAGE[,ro]")
    kind, rest = args[0], list(args[1:])
    if kind not in TYPES:
        raise DeviceUsageError(f"crosvm device: unknown or unsupported device type "
                               f"'{kind}' (supported: {', '.join(TYPES)})")
    values: dict[str, str] = {}
    while rest:
        arg = rest.pop(0)
        name, eq, value = arg.partition("=")
        key = {"--socket": "socket", "--socket-path": "socket", "--file": "file"}.get(name)
        if key is None:
            raise DeviceUsageError(f"crosvm device {kind}: unknown option {name}")
        if not eq:
            if not rest:
                raise DeviceUsageError(f"crosvm device {kind}: {name} needs a value")
            value = rest.pop(0)
        if key in values:
            raise DeviceUsageError(f"crosvm device {kind}: {name} is given twice")
        values[key] = value
    for key in ("socket", "file"):
        if not values.get(key):
            raise DeviceUsageError(f"crosvm device {kind}: --{key} PATH is required")
    if len(values["socket"].encode()) >= 108:  # sun_path
        raise DeviceUsageError(f"crosvm device {kind}: socket path is longer than 107 bytes")
    path, _, flags = values["file"].partition(",")
    if flags not in ("", "ro"):
        raise DeviceUsageError(f"crosvm device {kind}: --file {values['file']}: expected "
                               "IMAGE or IMAGE,ro")
    return kind, values["socket"], path, flags == "ro"


def cmd_device(args: list[str]) -> int:
    if "-h" in args or "--help" in args:
        from crosvm.cli.output import write_stdout
        write_stdout(USAGE)
        return 0
    _kind, socket_path, image, read_only = parse(args)
    from crosvm.devices.virtio.block import Block
    from crosvm.disk import DiskError, open_disk
    from crosvm.vhost_user.backend import serve_socket
    try:
        disk = open_disk(image, read_only=read_only)
    except DiskError as e:
        log.error("%s", e)
        return int(ExitCode.INVALID_ARGS)
    device = Block(disk)
    try:
        serve_socket(device, socket_path)
    except OSError as e:
        log.error("vhost-user socket %s: %s", socket_path, e.strerror or e)
        return int(ExitCode.ERROR)
    finally:
        device.close()
    return 0
