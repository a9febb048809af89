"""Emulated devices (crosvm's `devices` crate)."""

from crosvm.devices.bus import Bus, BusDevice, BusError

__all__ = ["Bus", "BusDevice", "BusError"]
