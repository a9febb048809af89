"""The VM control socket (crosvm's `vm_control` crate): `crosvm run -s PATH` listens,
and `crosvm stop PATH` and friends send one request each."""

import importlib

_WHERE = {"ControlError": "client", "handle_request": "client", "vms_request": "client",
          "ControlServer": "server", "socket_path": "server"}


def __getattr__(name: str):
    """Names load their module on first use: `crosvm run` imports vm_control.signals
    for every VM, the client and server only when it has a control socket."""
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)


__all__ = ["ControlError", "ControlServer", "handle_request", "socket_path", "vms_request"]
