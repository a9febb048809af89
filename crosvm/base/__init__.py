"""Low-level OS helpers shared by every other package (crosvm's `base` crate)."""

from crosvm.base.event import Event, IrqLevelEvent
from crosvm.base.ioctl import IOC_READ, IOC_WRITE, io, ior, iow, iowr

__all__ = ["Event", "IrqLevelEvent", "IOC_READ", "IOC_WRITE", "io", "ior", "iow", "iowr"]
