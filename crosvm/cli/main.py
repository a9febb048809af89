"""`crosvm` entry point: global options, subcommands, exit codes."""

from __future__ import annotations

import logging
import sys
from typing import Any

from crosvm import __version__
from crosvm.cli.disk_commands import cmd_create_composite, cmd_create_qcow2
from crosvm.cli.config_file import ConfigFileError, build_config, load_cfg, merge, normalize
from crosvm.cli.options import BY_LONG, BY_SHORT, run_help
from crosvm.vmm.exit import ExitCode

log = logging.getLogger("crosvm")

USAGE = """Usage: crosvm [--log-level LEVEL] [--syslog-tag TAG] [--no-syslog] [--extended-status] COMMAND [ARGS]

Commands:
  run       Start a new VM
  create_composite  Create a composite disk: crosvm create_composite PATH LABEL:PARTITION...
  create_qcow2      Create a qcow2 image: crosvm create_qcow2 PATH [SIZE] [--backing-file F]
  stop      Stop a VM: crosvm stop VM_SOCKET
  version   Show package version

Global options:
  --log-level LEVEL   log level, optionally per module: e.g. `debug,vcpu=off`
                      (levels: off, error, warn, info, debug, trace; default info)
  --syslog-tag TAG    tag for syslog messages
  --no-syslog         log to stderr only
  --extended-status   accepted for compatibility
  -h, --help          show this help

`crosvm run --help` lists every run option and its keys."""

LEVELS = {"off": logging.CRITICAL + 10, "error": logging.ERROR, "warn": logging.WARNING,
          "warning": logging.WARNING, "info": logging.INFO, "debug": logging.DEBUG,
          "trace": logging.DEBUG}


class UsageError(Exception):
    """Bad arguments: printed as one line, exit 35."""


def setup_logging(spec: str) -> None:
    """`info` or `debug,vcpu=off,serial=trace` style, as crosvm's --log-level."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("[%(asctime)s %(levelname)s %(name)s] %(message)s"))
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


def cmd_run(args: list[str]) -> int:
    if "-h" in args or "--help" in args:
        print(run_help())
        return 0
    values, cfg_files = parse_run_args(args)
    merged: dict[str, Any] = {}
    try:
        for path in cfg_files:
            merged = merge(merged, load_cfg(path))
        cfg = build_config(merge(merged, values))
    except ConfigFileError as e:
        raise UsageError(str(e)) from None
    if not cfg.kernel:
        raise UsageError("a kernel image is required: crosvm run [OPTIONS] KERNEL")
    from crosvm.vmm.run import run_config  # heavy imports only when running a VM
    return int(run_config(cfg))


def cmd_version(args: list[str]) -> int:
    if args:
        raise UsageError(f"unexpected argument: {args[0]}")
    print(f"crosvm {__version__}")
    return 0


def cmd_stop(args: list[str]) -> int:
    if "-h" in args or "--help" in args:
        print("Usage: crosvm stop VM_SOCKET\n\nStops the VM listening on VM_SOCKET "
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


COMMANDS = {"run": cmd_run, "stop": cmd_stop, "version": cmd_version,
            "create_qcow2": cmd_create_qcow2, "create_composite": cmd_create_composite}


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    log_level = "info"
    try:
        while args and args[0].startswith("-"):
            arg = args.pop(0)
            name, eq, inline = arg.partition("=")
            if name in ("-h", "--help"):
                print(USAGE)
                return 0
            if name in ("--log-level", "--syslog-tag"):
                if not eq:
                    if not args:
                        raise UsageError(f"option {name} needs a value")
                    inline = args.pop(0)
                if name == "--log-level":
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
    except UsageError as e:
        print(f"crosvm: {e}", file=sys.stderr)
        return int(ExitCode.INVALID_ARGS)


if __name__ == "__main__":
    sys.exit(main())
