"""pycrosvm: crosvm, the ChromeOS virtual machine monitor, in Python.

`crosvm.Vm` starts and drives a VM; `crosvm.control` talks to one already running."""

__version__ = "0.1.0"


def __getattr__(name: str):
    # Lazy: `python -m crosvm` and the device processes need neither.
    if name == "Vm":
        from crosvm.api import Vm
        return Vm
    raise AttributeError(f"module 'crosvm' has no attribute {name!r}")
