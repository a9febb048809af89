"""Turning option values (command line or --cfg JSON) into one merged Config.

Merge rules (crosvm book, "Configuration files"): files apply in order, a file's
`cfg` includes apply before the file itself; options that take one value are
overwritten, lists are extended; the command line is applied last.
"""

from __future__ import annotations

import os
from typing import Any

from crosvm.base import boundedjson
from crosvm.base.hostfile import HostFileError, read_host_file
from crosvm.cli import keyvalue as kv
from crosvm.cli.options import BY_CONFIG_KEY, Option
from crosvm.config import (Config, ConfigError, DiskOption, NetOption, PmemOption,
                           SerialParameters, VhostUserOption, VsockOption, parse_shared_dir,
                           parse_vhost_user_fs)

MAX_CFG_DEPTH = 16      # include levels
MAX_CFG_FILES = 64      # files one --cfg may load, includes counted
MAX_CFG_BYTES = 1 << 20
MAX_JSON_DEPTH = 16     # a config is at most a few levels deep


class ConfigFileError(ValueError):
    """A config file or option value is invalid."""


def normalize(opt: Option, value: Any, where: str) -> Any:
    """One option value (a string from argv, or any JSON value) in canonical form.

    Inner checks raise without naming the option; `where` (the option, or the file
    and key) is added here, once."""
    try:
        if opt.multi:
            values = value if isinstance(value, list) else [value]
            return [_normalize_one(opt, v) for v in values]
        return _normalize_one(opt, value)
    except ValueError as e:  # KeyValueError and JsonLimitError are ValueErrors
        raise ConfigFileError(f"{where}: {e}") from None


def _normalize_one(opt: Option, value: Any) -> Any:
    if opt.kind == "flag":
        if not isinstance(value, bool):
            raise ValueError("expected true or false")
        return value
    if opt.kind == "value":
        if opt.value_type == "int":
            return kv.convert(kv.Field(opt.long, "int"), value)
        if not isinstance(value, str):
            raise ValueError("expected a string")
        if opt.long == "kvm-device":
            return {"kvm": {"device": value}}
        return value
    if opt.kind == "keyvalue":
        schema = opt.schema
        if isinstance(value, str):
            return {**kv.from_items(schema, kv.parse(value)), **(opt.implied or {})}
        if isinstance(value, int) and not isinstance(value, bool) and len(schema.fields) == 1:
            return {schema.fields[0].name: kv.convert(schema.fields[0], value)}
        if isinstance(value, dict):
            return {**kv.from_mapping(schema, value), **(opt.implied or {})}
        raise ValueError("expected key=value settings")
    if opt.kind == "variant":
        return _normalize_variant(opt, value)
    raise AssertionError(opt.kind)


def _normalize_variant(opt: Option, value: Any) -> dict[str, Any]:
    variants = opt.variants or {}
    expected = f"expected one of {', '.join(variants)}"
    if isinstance(value, str):
        items = kv.parse(value)
        if len(items) != 1 or items[0].key is not None:
            raise ValueError(expected)
        v = items[0].value
        name, fields = (v.name, v.items) if isinstance(v, kv.Variant) else (v, [])
        if not isinstance(name, str):  # `[...]` with no name before it
            raise ValueError(expected)
        if name not in variants:
            raise ValueError(f"unknown variant `{name}`, {expected}")
        schema = variants[name]
        return {name: kv.from_items(kv.Schema(schema.fields, first_key_optional=False), fields)}
    if isinstance(value, dict) and len(value) == 1:
        name, fields = next(iter(value.items()))
        if name not in variants:
            raise ValueError(f"unknown variant `{name}`, {expected}")
        if fields is None:
            fields = {}
        if not isinstance(fields, dict):
            raise ValueError(f"`{name}` takes key=value settings (a JSON object)")
        return {name: kv.from_mapping(variants[name], fields)}
    raise ValueError(expected)


def merge(base: dict[str, Any], overlay: dict[str, Any]) -> dict[str, Any]:
    """Lists extend, everything else is replaced."""
    out = dict(base)
    for key, value in overlay.items():
        if isinstance(value, list) and isinstance(out.get(key), list):
            out[key] = out[key] + value
        else:
            out[key] = value
    return out


def load_cfg(path: str, budget: dict | None = None,
             _stack: tuple[str, ...] = ()) -> dict[str, Any]:
    """Load one JSON config file with its `cfg` includes applied first.

    Each file must be a regular file of at most MAX_CFG_BYTES, nesting at most
    MAX_JSON_DEPTH deep; includes nest at most MAX_CFG_DEPTH deep, and at most
    MAX_CFG_FILES files are loaded in all (a file that includes another eight times,
    eight levels down, is 16 million loads). Pass the same `budget` dict to every
    call of one command line."""
    state = {} if budget is None else budget
    state["files"] = state.get("files", 0) + 1
    if state["files"] > MAX_CFG_FILES:
        raise ConfigFileError(f"{path}: more than {MAX_CFG_FILES} config files to load")
    real = os.path.realpath(path)
    if real in _stack:
        raise ConfigFileError(f"{path}: config files include each other in a loop")
    if len(_stack) >= MAX_CFG_DEPTH:
        raise ConfigFileError(f"{path}: config includes nest deeper than {MAX_CFG_DEPTH}")
    try:
        data = boundedjson.loads(read_host_file(path, "config file", MAX_CFG_BYTES),
                                 MAX_CFG_BYTES, MAX_JSON_DEPTH)
    except HostFileError as e:
        raise ConfigFileError(str(e)) from None
    except boundedjson.JsonLimitError as e:
        raise ConfigFileError(f"{path}: {e}") from None
    if not isinstance(data, dict):
        raise ConfigFileError(f"{path}: the top level must be a JSON object")
    includes = data.pop("cfg", [])
    if isinstance(includes, str):
        includes = [includes]
    if not isinstance(includes, list) or not all(isinstance(i, str) for i in includes):
        raise ConfigFileError(f"{path}: `cfg` must be a list of file names")
    merged: dict[str, Any] = {}
    for inc in includes:
        inc_path = inc if os.path.isabs(inc) else os.path.join(os.path.dirname(path), inc)
        merged = merge(merged, load_cfg(inc_path, state, _stack + (real,)))
    own: dict[str, Any] = {}
    for key, value in data.items():
        opt = BY_CONFIG_KEY.get(key)
        if opt is None:
            raise ConfigFileError(f"{path}: unknown option `{key}`")
        own[opt.config_key] = normalize(opt, value, f"{path}: {key}")
    return merge(merged, own)


def build_config(values: dict[str, Any]) -> Config:
    """The typed Config from merged option values."""
    try:
        return _build_config(values)
    except kv.KeyValueError as e:
        raise ConfigFileError(str(e)) from None


def _build_config(values: dict[str, Any]) -> Config:
    cfg = Config()
    cfg.kernel = values.get("kernel")
    cfg.initrd = values.get("initrd")
    cfg.params = list(values.get("params", []))
    if "cpus" in values:
        cfg.cpus = values["cpus"].get("num-cores", 1)
    if "mem" in values:
        cfg.mem_mib = values["mem"].get("size", 256)
    for s in values.get("serial", []):
        full = kv.with_defaults(BY_CONFIG_KEY["serial"].schema, s, "serial")
        cfg.serial.append(SerialParameters(**{k.replace("-", "_"): v for k, v in full.items()}))
    hyp = values.get("hypervisor")
    if hyp:
        cfg.hypervisor_device = hyp["kvm"].get("device", "/dev/kvm")
    cfg.no_i8042 = bool(values.get("no-i8042", False))
    cfg.no_rtc = bool(values.get("no-rtc", False))
    cfg.no_rng = bool(values.get("no-rng", False))
    cfg.no_balloon = bool(values.get("no-balloon", False))
    cfg.balloon_bias_mib = values.get("balloon-bias-mib", 0)
    cfg.balloon_page_reporting = bool(values.get("balloon-page-reporting", False))
    cfg.disable_sandbox = bool(values.get("disable-sandbox", False))
    cfg.pivot_root = values.get("pivot-root", cfg.pivot_root)
    cfg.socket = values.get("socket")
    cfg.seccomp_policy_dir = values.get("seccomp-policy-dir", cfg.seccomp_policy_dir)
    cfg.seccomp_log_failures = bool(values.get("seccomp-log-failures", False))
    for b in values.get("block", []):
        full = kv.with_defaults(BY_CONFIG_KEY["block"].schema, b, "block")
        cfg.disks.append(DiskOption(**{k.replace("-", "_"): v for k, v in full.items()}))
    for p in values.get("pmem", []):
        cfg.pmems.append(PmemOption(**kv.with_defaults(BY_CONFIG_KEY["pmem"].schema, p, "pmem")))
    for n in values.get("net", []):
        full = kv.with_defaults(BY_CONFIG_KEY["net"].schema, n, "net")
        cfg.nets.append(NetOption(**{k.replace("-", "_"): v for k, v in full.items()}))
    cfg.nets += _legacy_nets(values)
    if "vsock" in values:
        full = kv.with_defaults(BY_CONFIG_KEY["vsock"].schema, values["vsock"], "vsock")
        cfg.vsock = VsockOption(**{k.replace("-", "_"): v for k, v in full.items()})
    legacy_vsock = _legacy_vsock(values)
    if legacy_vsock is not None:
        if cfg.vsock is not None:
            raise ConfigError("--cid and --vsock cannot be given together; use --vsock only")
        cfg.vsock = legacy_vsock
    cfg.shared_dirs = [parse_shared_dir(text) for text in values.get("shared-dir", [])]
    for v in values.get("vhost-user", []):
        full = kv.with_defaults(BY_CONFIG_KEY["vhost-user"].schema, v, "vhost-user")
        cfg.vhost_user.append(VhostUserOption(**{k.replace("-", "_"): v
                                                 for k, v in full.items()}))
    cfg.vhost_user += [parse_vhost_user_fs(text)
                       for text in values.get("legacy-vhost-user-fs", [])]
    return cfg


def _legacy_nets(values: dict[str, Any]) -> list[NetOption]:
    """crosvm's deprecated --tap-name/--tap-fd/--host-ip/--netmask/--mac, each given
    --vhost-net and --net-vq-pairs."""
    common = {"vhost_net": bool(values.get("legacy-vhost-net", False)),
              "vq_pairs": values.get("legacy-net-vq-pairs", 1)}
    nets = [NetOption(tap_name=name, **common) for name in values.get("legacy-tap-name", [])]
    nets += [NetOption(tap_fd=fd, **common) for fd in values.get("legacy-tap-fd", [])]
    raw = {k: values.get(f"legacy-{k}") for k in ("host-ip", "netmask", "mac")}
    given = [k for k, v in raw.items() if v is not None]
    if given and len(given) < len(raw):
        missing = [f"--{k}" for k in raw if raw[k] is None]
        hint = (" (for a TAP's guest MAC use --net tap-name=NAME,mac=MAC)"
                if given == ["mac"] else "")
        raise ConfigError(f"{', '.join(f'--{k}' for k in given)} needs "
                          f"{' and '.join(missing)} too: together they make a TAP "
                          f"crosvm creates{hint}")
    if given:
        nets.append(NetOption(host_ip=raw["host-ip"], netmask=raw["netmask"], mac=raw["mac"],
                              **common))
    return nets


def _legacy_vsock(values: dict[str, Any]) -> VsockOption | None:
    """crosvm's deprecated --cid, with --vhost-vsock-device PATH or --vhost-vsock-fd FD
    (which crosvm opens as /proc/self/fd/FD)."""
    cid = values.get("legacy-cid")
    device = values.get("legacy-vhost-vsock-device")
    fd = values.get("legacy-vhost-vsock-fd")
    if cid is None:
        given = [name for name, v in (("--vhost-vsock-device", device),
                                      ("--vhost-vsock-fd", fd)) if v is not None]
        if given:
            raise ConfigError(f"{given[0]} needs --cid too (or use --vsock "
                              "cid=N,device=PATH)")
        return None
    if device is not None and fd is not None:
        raise ConfigError("only one of --vhost-vsock-device and --vhost-vsock-fd may be given")
    if fd is not None:
        if fd < 0:
            raise ConfigError(f"invalid --vhost-vsock-fd {fd}")
        device = f"/proc/self/fd/{fd}"
    return VsockOption(cid=cid, device=device)
