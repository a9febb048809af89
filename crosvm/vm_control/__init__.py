"""The VM control socket (crosvm's `vm_control` crate): `crosvm run -s PATH` listens,
and `crosvm stop PATH` and friends send one request each."""

from crosvm.vm_control.client import ControlError, handle_request, vms_request
from crosvm.vm_control.server import ControlServer, socket_path

__all__ = ["ControlError", "ControlServer", "handle_request", "socket_path", "vms_request"]
