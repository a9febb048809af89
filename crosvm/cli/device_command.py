"""`crosvm device TYPE ...` (one vhost-user back-end, in this process) and `crosvm
devices ...` (several, each forked into its own jail): our virtio devices served to
another VMM (QEMU, or `crosvm run --vhost-user`)."""

from __future__ import annotations

import logging
import os
import signal
from dataclasses import dataclass

from crosvm.vmm.exit import ExitCode

log = logging.getLogger("crosvm")

DEVICE_USAGE = """Usage: crosvm device TYPE OPTIONS

Serves one virtio device on a vhost-user socket (created; removed once a front-end
connects) until that front-end disconnects, then exits 0.

  crosvm device block --socket PATH --file IMAGE[,ro]
  crosvm device net --tap-name PATH,NAME[,MAC] | --tap-fd PATH,FD | --device PATH,IP,NETMASK,MAC
  crosvm device console --socket PATH [--output-file FILE] [--input-file FILE]
  crosvm device fs --socket PATH --tag TAG --shared-dir DIR [--uid-map MAP] [--gid-map MAP]
                   [--cfg KEY=VALUE,...]   (cache, timeout, writeback, posix_acl, ...)
  crosvm device vsock --socket PATH --cid N --uds-path UDS

IMAGE is any disk format `crosvm run --block` takes. `--socket-path` is the same as
`--socket`. console: output to FILE (default: standard output), guest input from FILE.
vsock: pycrosvm's userspace device, bridged to Unix sockets at UDS as `crosvm run
--vsock cid=N,uds-path=UDS` is (/dev/vhost-vsock is not driven)."""

DEVICES_USAGE = """Usage: crosvm devices [--disable-sandbox] [--jail KEY=VALUE,...] DEVICE...

Serves several vhost-user back-ends at once, each in its own jailed process; exits
when every one's front-end has disconnected (0 when all ended cleanly).

  --block vhost=PATH,path=IMAGE[,ro][,...]      the keys of `crosvm run --block`
  --net vhost=PATH,tap-name=NAME|tap-fd=FD|host-ip=..,netmask=..,mac=..[,...]
  --vsock vhost=PATH,cid=N,uds-path=UDS
  --serial vhost=PATH,type=stdout|file|unix|sink[,path=..][,input=..]   a virtio console
  --jail pivot-root=DIR,seccomp-policy-dir=DIR,seccomp-log-failures
  --disable-sandbox   run the back-ends unjailed"""

TYPES = ("block", "net", "console", "fs", "vsock")


class DeviceUsageError(Exception):
    """Bad arguments for `crosvm device` or `crosvm devices` (exit 35)."""


@dataclass
class BackendSpec:
    """One back-end to build: its type, socket and the `crosvm run` option for it."""

    kind: str
    socket: str
    option: object


# -- crosvm device --------------------------------------------------------------------
DEVICE_FLAGS = {
    "block": {"socket", "file"},
    "net": {"tap-name", "tap-fd", "device"},
    "console": {"socket", "output-file", "input-file"},
    "fs": {"socket", "tag", "shared-dir", "uid-map", "gid-map", "cfg"},
    "vsock": {"socket", "cid", "uds-path", "vhost-device"},
}
REQUIRED = {"block": ("socket", "file"), "net": (), "console": ("socket",),
            "fs": ("socket", "tag", "shared-dir"), "vsock": ("socket", "cid", "uds-path")}
FS_CFG_KEYS = ("cache", "timeout", "writeback", "posix_acl", "negative_timeout",
               "ascii_casefold", "uid", "gid")


def _flags(kind: str, args: list[str]) -> dict[str, str]:
    """`--name VALUE` / `--name=VALUE` pairs, each at most once, from the allowed set."""
    allowed = DEVICE_FLAGS[kind]
    values: dict[str, str] = {}
    rest = list(args)
    while rest:
        arg = rest.pop(0)
        name, eq, value = arg.partition("=")
        key = name[2:] if name.startswith("--") else None
        if key == "socket-path":
            key = "socket"
        if key not in allowed:
            raise DeviceUsageError(f"crosvm device {kind}: unknown option {name}")
        if not eq:
            if not rest:
                raise DeviceUsageError(f"crosvm device {kind}: {name} needs a value")
            value = rest.pop(0)
        if key in values:
            raise DeviceUsageError(f"crosvm device {kind}: {name} is given twice")
        if not value:
            raise DeviceUsageError(f"crosvm device {kind}: {name} is empty")
        values[key] = value
    for key in REQUIRED[kind]:
        if not values.get(key):
            raise DeviceUsageError(f"crosvm device {kind}: --{key} is required")
    return values


def _check_socket(what: str, path: str) -> str:
    from crosvm.config import SUN_PATH_MAX
    if not path:
        raise DeviceUsageError(f"{what}: the socket path is empty")
    if len(os.fsencode(path)) > SUN_PATH_MAX:  # the bytes the kernel gets
        raise DeviceUsageError(f"{what}: socket path is longer than {SUN_PATH_MAX} bytes")
    return path


def _int(what: str, text: str) -> int:
    from crosvm.cli.keyvalue import parse_int
    try:
        return parse_int(text)
    except ValueError:
        raise DeviceUsageError(f"{what}: expected a number, got '{text}'") from None


def parse_device(args: list[str]) -> BackendSpec:
    """The back-end `crosvm device TYPE ...` asks for."""
    from crosvm.config import (ConfigError, DiskOption, SerialParameters, VsockOption,
                               parse_shared_dir, validate_vsock)
    if not args:
        raise DeviceUsageError("usage: crosvm device TYPE --socket PATH ... (TYPE: "
                               f"{', '.join(TYPES)}; see crosvm device --help)")
    kind = args[0]
    if kind not in TYPES:
        raise DeviceUsageError(f"crosvm device: unknown or unsupported device type "
                               f"'{kind}' (supported: {', '.join(TYPES)})")
    values = _flags(kind, args[1:])
    what = f"crosvm device {kind}"
    try:
        if kind == "block":
            path, _, flags = values["file"].partition(",")
            if flags not in ("", "ro"):
                raise DeviceUsageError(f"{what}: --file {values['file']}: expected IMAGE or "
                                       "IMAGE,ro")
            return BackendSpec(kind, _check_socket(what, values["socket"]),
                               DiskOption(path, ro=flags == "ro"))
        if kind == "net":
            return _parse_net(values)
        if kind == "console":
            out = values.get("output-file")
            params = SerialParameters(type="file" if out else "stdout", path=out,
                                      input=values.get("input-file"),
                                      hardware="virtio-console")
            return BackendSpec(kind, _check_socket(what, values["socket"]), params)
        if kind == "fs":
            text = f"{values['shared-dir']}:{values['tag']}:type=fs"
            for name, key in (("uid-map", "uidmap"), ("gid-map", "gidmap")):
                if name in values:
                    text += f":{key}={values[name]}"
            for item in values.get("cfg", "").split(",") if values.get("cfg") else ():
                key = item.partition("=")[0]
                if key not in FS_CFG_KEYS:
                    raise DeviceUsageError(f"{what}: --cfg: unknown key '{key}' (known: "
                                           f"{', '.join(FS_CFG_KEYS)})")
                text += f":{item}"
            return BackendSpec(kind, _check_socket(what, values["socket"]),
                               parse_shared_dir(text))
        # vsock
        if "vhost-device" in values:
            raise DeviceUsageError(f"{what}: --vhost-device: /dev/vhost-vsock is not driven "
                                   "by pycrosvm; use --uds-path")
        option = VsockOption(cid=_int(f"{what}: --cid", values["cid"]),
                             uds_path=values["uds-path"])
        validate_vsock(option)
        return BackendSpec(kind, _check_socket(what, values["socket"]), option)
    except ConfigError as e:
        raise DeviceUsageError(f"{what}: {e}") from None


def _parse_net(values: dict[str, str]) -> BackendSpec:
    from crosvm.config import ConfigError, NetOption, validate_nets
    given = [k for k in ("tap-name", "tap-fd", "device") if k in values]
    if len(given) != 1:
        raise DeviceUsageError("crosvm device net: give exactly one of --tap-name "
                               "PATH,NAME[,MAC], --tap-fd PATH,FD, --device "
                               "PATH,IP,NETMASK,MAC")
    key = given[0]
    parts = values[key].split(",")
    expected = {"tap-name": (2, 3), "tap-fd": (2, 2), "device": (4, 4)}[key]
    if not expected[0] <= len(parts) <= expected[1]:
        form = {"tap-name": "PATH,NAME[,MAC]", "tap-fd": "PATH,FD",
                "device": "PATH,IP,NETMASK,MAC"}[key]
        raise DeviceUsageError(f"crosvm device net: --{key} {values[key]}: expected {form}")
    sock = _check_socket("crosvm device net", parts[0])
    if not all(parts):
        raise DeviceUsageError(f"crosvm device net: --{key} {values[key]}: an empty field")
    if key == "tap-name":
        option = NetOption(tap_name=parts[1], mac=parts[2] if len(parts) == 3 else None)
    elif key == "tap-fd":
        option = NetOption(tap_fd=_int("crosvm device net: --tap-fd", parts[1]))
    else:
        option = NetOption(host_ip=parts[1], netmask=parts[2], mac=parts[3])
    try:
        validate_nets([option])
    except ConfigError as e:
        raise DeviceUsageError(f"crosvm device net: {e}") from None
    return BackendSpec("net", sock, option)


# -- crosvm devices -------------------------------------------------------------------
DEVICES_KINDS = {"block": "block", "net": "net", "vsock": "vsock", "serial": "console"}


@dataclass
class DevicesCommand:
    backends: list[BackendSpec]
    disable_sandbox: bool = False
    pivot_root: str | None = None
    seccomp_policy_dir: str | None = None
    seccomp_log_failures: bool = False


def parse_devices(args: list[str]) -> DevicesCommand:
    """`crosvm devices ...`: each device option is `vhost=PATH` plus the keys `crosvm
    run` takes for that device."""
    from crosvm.cli import keyvalue as kv
    from crosvm.cli.options import BLOCK_SCHEMA, NET_SCHEMA, SERIAL_SCHEMA, VSOCK_SCHEMA
    from crosvm.config import (ConfigError, DiskOption, NetOption, SerialParameters,
                               VsockOption, validate_disks, validate_nets, validate_serial,
                               validate_vsock)
    def serial_port(option: SerialParameters) -> None:  # the ports together: below
        if option.hardware != "serial" or option.console or option.earlycon:
            raise ConfigError("a back-end is a virtio console; hardware=, console and "
                              "earlycon do not apply")

    def tap(option: NetOption) -> None:
        if option.tap_name == "":
            raise ConfigError("tap-name is empty")
        validate_nets([option])
    # flag: (schema, option class, its own validation)
    schemas = {"block": (BLOCK_SCHEMA, DiskOption, lambda o: validate_disks([o])),
               "net": (NET_SCHEMA, NetOption, tap),
               "vsock": (VSOCK_SCHEMA, VsockOption, validate_vsock),
               "serial": (SERIAL_SCHEMA, SerialParameters, serial_port)}
    jail_schema = kv.Schema([kv.Field("pivot-root", "path", None, ""),
                             kv.Field("seccomp-policy-dir", "path", None, ""),
                             kv.Field("seccomp-log-failures", "bool", False, "")],
                            first_key_optional=False)
    cmd = DevicesCommand([])
    sockets: set[str] = set()
    rest = list(args)
    while rest:
        arg = rest.pop(0)
        name, eq, value = arg.partition("=")
        flag = name[2:] if name.startswith("--") else None
        if flag == "disable-sandbox" and not eq:
            cmd.disable_sandbox = True
            continue
        if flag not in (*schemas, "jail"):
            raise DeviceUsageError(f"crosvm devices: unknown option {name}")
        if not eq:
            if not rest:
                raise DeviceUsageError(f"crosvm devices: {name} needs a value")
            value = rest.pop(0)
        try:
            items = kv.parse(value)
            if flag == "jail":
                values = kv.with_defaults(jail_schema, kv.from_items(jail_schema, items),
                                          "jail")
                cmd.pivot_root = values["pivot-root"] or cmd.pivot_root
                cmd.seccomp_policy_dir = values["seccomp-policy-dir"] or cmd.seccomp_policy_dir
                cmd.seccomp_log_failures = values["seccomp-log-failures"]
                continue
            vhost = [i for i in items if i.key == "vhost"]
            if len(vhost) != 1 or not isinstance(vhost[0].value, str):
                raise DeviceUsageError(f"crosvm devices: {name} {value}: vhost=PATH (the "
                                       "back-end's socket) is required, once")
            schema, make, validate = schemas[flag]
            fields = kv.with_defaults(schema, kv.from_items(
                schema, [i for i in items if i.key != "vhost"]), flag)
            option = make(**{k.replace("-", "_"): v for k, v in fields.items()})
            validate(option)
        except (kv.KeyValueError, ConfigError, TypeError) as e:
            raise DeviceUsageError(f"crosvm devices: {name} {value}: {e}") from None
        sock = _check_socket(f"crosvm devices: {name}", vhost[0].value)
        if os.path.abspath(sock) in sockets:
            raise DeviceUsageError(f"crosvm devices: socket {sock} is given twice")
        sockets.add(os.path.abspath(sock))
        if flag == "serial":  # numbered in order, as virtio consoles
            option.hardware = "virtio-console"
            option.num = sum(b.kind == "console" for b in cmd.backends) + 1
        cmd.backends.append(BackendSpec(DEVICES_KINDS[flag], sock, option))
    try:  # what holds across ports (one stdin, say)
        validate_serial([b.option for b in cmd.backends if b.kind == "console"])
    except ConfigError as e:
        raise DeviceUsageError(f"crosvm devices: --serial: {e}") from None
    if not cmd.backends:
        raise DeviceUsageError("crosvm devices: no device given (--block, --net, --vsock "
                               "or --serial, each with vhost=PATH)")
    return cmd


# -- running ----------------------------------------------------------------------------
def build(spec: BackendSpec):
    """The vhost_user.devices.Backend for `spec`."""
    from crosvm.vhost_user import devices
    return getattr(devices, spec.kind)(spec.socket, spec.option)


def _setup_errors() -> tuple[type[BaseException], ...]:
    """What building a back-end raises for a bad option or host file (exit 35)."""
    from crosvm.config import ConfigError
    from crosvm.devices.serial_device import SerialError
    from crosvm.devices.virtio.vsock import VsockError
    from crosvm.disk import DiskError
    from crosvm.net.tap import TapError
    from crosvm.vhost_user.devices import BackendSetupError
    return (ConfigError, DiskError, TapError, VsockError, SerialError, BackendSetupError)


def cmd_device(args: list[str]) -> int:
    if "-h" in args or "--help" in args:
        from crosvm.cli.output import write_stdout
        write_stdout(DEVICE_USAGE)
        return 0
    spec = parse_device(args)
    from crosvm.vhost_user.devices import serve_here
    try:
        backend = build(spec)
    except _setup_errors() as e:
        log.error("%s", e)
        return int(ExitCode.INVALID_ARGS)
    except OSError as e:
        log.error("crosvm device %s: %s", spec.kind, e)
        return int(ExitCode.INVALID_ARGS)
    from crosvm.devices.virtio.virtio_device import WorkerStuck
    from crosvm.vhost_user.devices import BackendSetupError
    try:
        serve_here(backend)
    except BackendSetupError as e:
        log.error("%s", e)
        return int(ExitCode.INVALID_ARGS)
    except OSError as e:
        log.error("vhost-user socket %s: %s", spec.socket, e.strerror or e)
        return int(ExitCode.ERROR)
    except WorkerStuck:
        return int(ExitCode.ERROR)  # logged
    return 0


def cmd_devices(args: list[str]) -> int:
    if "-h" in args or "--help" in args:
        from crosvm.cli.output import write_stdout
        write_stdout(DEVICES_USAGE)
        return 0
    cmd = parse_devices(args)
    from crosvm.jail import Jail, JailError, ensure_pivot_root
    from crosvm.jail.jail import DEFAULT_PIVOT_ROOT
    from crosvm.vhost_user.devices import spawn
    jail = None
    backends: list = []
    children: dict[int, object] = {}

    def stop(signum, _frame) -> None:  # before serving: stop setting up, clean up
        raise SystemExit(1)
    old = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        try:
            if not cmd.disable_sandbox:
                pivot_root = cmd.pivot_root or DEFAULT_PIVOT_ROOT
                ensure_pivot_root(pivot_root)
                jail = Jail(pivot_root=pivot_root,
                            seccomp_log_failures=cmd.seccomp_log_failures)
                if cmd.seccomp_policy_dir is not None:
                    jail.seccomp_policy_dir = cmd.seccomp_policy_dir
            for spec in cmd.backends:
                backends.append(build(spec))
            for backend in backends:
                children[spawn(backend, jail)] = backend
        except _setup_errors() + (JailError,) as e:
            log.error("%s", e)
            return int(ExitCode.INVALID_ARGS)
        except OSError as e:
            log.error("crosvm devices: %s", e)
            return int(ExitCode.INVALID_ARGS)
        log.info("crosvm devices: %d back-end(s) serving", len(children))
        return _wait(children)
    finally:
        _stop(children, backends)
        for s, handler in old.items():
            signal.signal(s, handler)


def _wait(children: dict[int, object]) -> int:
    """Until every back-end has ended (each is removed from `children` as it ends);
    SIGTERM/SIGINT/SIGHUP end them all."""
    def stop(signum, _frame) -> None:
        for pid in list(children):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    old = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    failed = []
    try:
        while children:
            try:
                pid, status = os.wait()
            except ChildProcessError:
                break
            backend = children.pop(pid, None)
            if backend is None:
                continue
            backend.close()
            code = os.waitstatus_to_exitcode(status)
            if code != 0:
                failed.append(backend.name)
                log.error("crosvm devices: %s (%s) ended with %s", backend.name,
                          backend.socket_path,
                          f"exit {code}" if code > 0 else f"signal {-code}")
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
    return 1 if failed else 0


def _stop(children: dict[int, object], backends: list) -> None:
    """Kill and reap what is still running; every back-end's cleanup (idempotent)."""
    for pid in children:
        try:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        except OSError:
            pass
    children.clear()
    for backend in backends:
        backend.close()
