"""`crosvm` entry point: global options, subcommands, exit codes."""

from __future__ import annotations

import logging
import sys
from typing import Any

from crosvm import __version__
from crosvm.cli.config_file import ConfigFileError, build_config, load_cfg, merge, normalize
from crosvm.cli.options import BY_LONG, BY_SHORT, run_help
from crosvm.cli.output import StdoutError, write_stdout
from crosvm.config import Config, ConfigError
from crosvm.vm_control.signals import stop_signals_raise
from crosvm.vmm.exit import ExitCode

log = logging.getLogger("crosvm")

USAGE = """Usage: crosvm [--log-level LEVEL] [--no-syslog] [--extended-status] COMMAND [ARGS]

Commands:
  run       Start a new VM
  create_composite  Create a composite disk: crosvm create_composite PATH LABEL:PARTITION...
  create_qcow2      Create a qcow2 image: crosvm create_qcow2 PATH [SIZE] [--backing-file F]
  device    Serve a device over vhost-user: crosvm device block --socket PATH --file IMG
  devices   Serve several, each jailed: crosvm devices --block vhost=PATH,path=IMG ...
  stop      Stop a VM: crosvm stop VM_SOCKET
  suspend / resume [--full] VM_SOCKET   Pause or resume a VM (--full: devices too)
  powerbtn / sleepbtn VM_SOCKET         Press the VM's ACPI power or sleep button
  gpe N VM_SOCKET                       Raise ACPI general-purpose event N
  disk resize INDEX SIZE VM_SOCKET      Resize a VM's disk
  balloon NUM_BYTES VM_SOCKET [--wait]  Set the VM's balloon size
  balloon_stats VM_SOCKET               Print the guest's memory statistics as JSON
  version   Show package version

Global options:
  --log-level LEVEL   log level, optionally per module: e.g. `debug,vcpu=off`
                      (levels: off, error, warn, info, debug, trace; default info)
  --no-syslog         log to stderr only (the only way this VMM logs)
  --extended-status   accepted for compatibility
  -h, --help          show this help

`crosvm run --help` lists every run option and its keys."""

LEVELS = {"off": logging.CRITICAL + 10, "error": logging.ERROR, "warn": logging.WARNING,
          "warning": logging.WARNING, "info": logging.INFO, "debug": logging.DEBUG,
          "trace": logging.DEBUG}


class UsageError(Exception):
    """Bad arguments: printed as one line, exit 35."""


def one_line(text: str) -> str:
    """`text` with newlines and other control characters escaped: a message that quotes
    user input (a file name, an option value) stays one line."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


class OneLineFormatter(logging.Formatter):
    """Log records as one line each, whatever their message quotes."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        return one_line(super().formatMessage(record))


def setup_logging(spec: str) -> None:
    """`info` or `debug,vcpu=off,serial=trace` style, as crosvm's --log-level."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(OneLineFormatter("[%(asctime)s %(levelname)s %(name)s] %(message)s"))
    root = logging.getLogger("crosvm")
    root.handlers[:] = [handler]
    root.propagate = False
    root.setLevel(logging.INFO)
    for part in spec.split(","):
        name, _, level = part.rpartition("=")
        if level not in LEVELS:
            raise UsageError(f"invalid log level '{level}' in --log-level")
        logger = logging.getLogger(f"crosvm.{name}" if name else "crosvm")
        logger.setLevel(LEVELS[level])


def _take_value(args: list[str], i: int, name: str, inline: str | None) -> tuple[str, int]:
    if inline is not None:
        return inline, i + 1
    if i + 1 >= len(args):
        raise UsageError(f"option {name} needs a value")
    return args[i + 1], i + 2


def parse_run_args(args: list[str]) -> tuple[dict[str, Any], list[str]]:
    """Command-line run options as config values, plus the --cfg files named."""
    values: dict[str, Any] = {}
    cfg_files: list[str] = []
    positional: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--":
            positional.extend(args[i + 1:])
            break
        if arg.startswith("--") or (arg.startswith("-") and len(arg) > 1):
            inline = None
            if arg.startswith("--"):
                name, eq, rest = arg[2:].partition("=")
                inline = rest if eq else None
                opt = BY_LONG.get(name)
                shown = f"--{name}"
            else:
                name, rest = arg[1:2], arg[2:]
                inline = rest.removeprefix("=") if rest else None
                opt = BY_SHORT.get(name)
                shown = f"-{name}"
            if opt is None:
                raise UsageError(f"unrecognized argument: {shown}")
            if opt.deprecated:
                log.warning("%s is deprecated, use %s", shown, opt.deprecated)
            if opt.kind == "flag":
                if inline is not None:
                    raise UsageError(f"option {shown} does not take a value")
                value: Any = True
                i += 1
            else:
                value, i = _take_value(args, i, shown, inline)
            if opt.long == "cfg":
                cfg_files.append(value)
                continue
            try:
                norm = normalize(opt, value, shown)
            except ConfigFileError as e:
                raise UsageError(str(e)) from None
            key = opt.config_key
            if opt.multi:
                values[key] = values.get(key, []) + norm
            elif key in values and opt.kind != "flag":
                raise UsageError(f"option {shown} given more than once")
            else:
                values[key] = norm
        else:
            positional.append(arg)
            i += 1
    if len(positional) > 1:
        raise UsageError(f"unexpected argument: {positional[1]}")
    if positional:
        if "kernel" in values:
            raise UsageError("the kernel is given both as --kernel and as an argument")
        values["kernel"] = positional[0]
    return values, cfg_files


def config_from_args(args: list[str]) -> Config:
    """The validated Config for `crosvm run ARGS` (command line and --cfg files), built
    without touching the host; raises UsageError."""
    values, cfg_files = parse_run_args(args)
    merged: dict[str, Any] = {}
    budget: dict = {}  # one file budget for all --cfg options together
    try:
        for path in cfg_files:
            merged = merge(merged, load_cfg(path, budget))
        cfg = build_config(merge(merged, values))
        if not cfg.kernel:
            raise UsageError("a kernel image is required: crosvm run [OPTIONS] KERNEL")
        cfg.validate()
    except (ConfigFileError, ConfigError) as e:
        raise UsageError(str(e)) from None
    return cfg


def cmd_run(args: list[str]) -> int:
    if "-h" in args or "--help" in args:
        write_stdout(run_help())
        return 0
    return start_vm(config_from_args(args))


def start_vm(cfg: Config) -> int:
    """Builds and runs the VM; its exit code. (The fuzz targets replace this: they
    drive `crosvm run` up to, not including, building a VM.)"""
    with stop_signals_raise():  # until the VM installs its own handlers
        from crosvm.vmm.run import run_config  # heavy imports only when running a VM
        return int(run_config(cfg))


def cmd_version(args: list[str]) -> int:
    if args:
        raise UsageError(f"unexpected argument: {args[0]}")
    write_stdout(f"crosvm {__version__}")
    return 0


def cmd_stop(args: list[str]) -> int:
    if "-h" in args or "--help" in args:
        write_stdout("Usage: crosvm stop VM_SOCKET\n\nStops the VM listening on VM_SOCKET "
                     "(`crosvm run -s VM_SOCKET`).")
        return 0
    if len(args) != 1:
        raise UsageError("usage: crosvm stop VM_SOCKET")
    from crosvm.vm_control import ControlError, vms_request
    try:
        vms_request("Exit", args[0])
    except ControlError as e:
        log.error("%s", e)
        return int(ExitCode.ERROR)
    return 0


def _disk_command(name: str):
    """A disk-image command, imported when used: `crosvm run` never needs them."""
    def command(args: list[str]) -> int:
        from crosvm.cli import disk_commands
        return getattr(disk_commands, f"cmd_{name}")(args)
    return command


CONTROL_COMMAND_NAMES = ("suspend", "resume", "powerbtn", "sleepbtn", "gpe", "disk",
                         "balloon", "balloon_stats")


def _control_command(name: str):
    """A control-socket command, imported when used (json, the client) and with its
    usage errors as ours (exit 35)."""
    def command(args: list[str]) -> int:
        from crosvm.cli.control_commands import COMMANDS as CONTROL, ControlUsageError
        try:
            return CONTROL[name](args)
        except ControlUsageError as e:
            raise UsageError(str(e)) from None
    return command


def _backend_command(name: str):
    """`crosvm device TYPE ...` / `crosvm devices ...`: vhost-user back-ends (imported
    when used)."""
    def command(args: list[str]) -> int:
        from crosvm.cli import device_command
        try:
            return getattr(device_command, f"cmd_{name}")(args)
        except device_command.DeviceUsageError as e:
            raise UsageError(str(e)) from None
    return command


COMMANDS = {"run": cmd_run, "stop": cmd_stop, "version": cmd_version,
            "device": _backend_command("device"), "devices": _backend_command("devices"),
            "create_qcow2": _disk_command("create_qcow2"),
            "create_composite": _disk_command("create_composite"),
            **{name: _control_command(name) for name in CONTROL_COMMAND_NAMES}}


def check_utf8(args: list[str]) -> None:
    """crosvm takes its arguments as UTF-8 strings and refuses others; here undecodable
    bytes arrive as surrogates, which no path, kernel parameter or serial id can hold."""
    for arg in args:
        try:
            arg.encode("utf-8")
        except UnicodeEncodeError:
            shown = arg.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
            raise UsageError(f"argument is not valid UTF-8: '{shown[:80]}'") from None


def main(argv: list[str] | None = None) -> int:
    """Runs one crosvm command; its exit code. The error boundary of every command:
    whatever goes wrong ends as one line on stderr and an exit code from crosvm's
    table, never a traceback."""
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        return _main(args)
    except UsageError as e:
        return _fail(str(e).split("\n")[0], ExitCode.INVALID_ARGS)
    except StdoutError as e:  # a closed pipe has an empty message: exit 1, quietly
        return _fail(e.message, ExitCode.ERROR)
    except KeyboardInterrupt as e:  # SIGINT, or a stop signal, before the VM ran
        return _fail(f"interrupted by {e.args[0] if e.args else 'SIGINT'} before the VM "
                     "started", ExitCode.ERROR)
    except Exception as e:  # noqa: BLE001 - the boundary: one line, not a traceback
        log.debug("unexpected error", exc_info=True)
        return _fail(f"unexpected error: {type(e).__name__}: {e}"[:400], ExitCode.ERROR)


def _main(args: list[str]) -> int:
    check_utf8(args)
    log_level = "info"
    while args and args[0].startswith("-"):
        arg = args.pop(0)
        name, eq, inline = arg.partition("=")
        if name in ("-h", "--help"):
            write_stdout(USAGE)
            return 0
        if name == "--log-level":
            if not eq:
                if not args:
                    raise UsageError(f"option {name} needs a value")
                inline = args.pop(0)
            log_level = inline
        elif name in ("--no-syslog", "--extended-status") and not eq:
            pass
        else:
            raise UsageError(f"unrecognized argument: {name}")
    setup_logging(log_level)
    if not args:
        raise UsageError("no command given (try `crosvm --help`)")
    command = COMMANDS.get(args[0])
    if command is None:
        raise UsageError(f"unknown command `{args[0]}` (try `crosvm --help`)")
    return command(args[1:])


def _fail(message: str, code: ExitCode) -> int:
    if not message:
        return int(code)
    try:
        print(f"crosvm: {one_line(message)}", file=sys.stderr, flush=True)
    except (OSError, ValueError):
        pass  # stderr is gone too: the exit code is all that is left
    return int(code)


if __name__ == "__main__":
    sys.exit(main())
