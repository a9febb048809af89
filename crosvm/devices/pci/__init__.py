"""PCI: configuration space, the root bus and its config access paths, MSI-X."""

from crosvm.devices.pci.config import BarType, PciBar, PciConfiguration
from crosvm.devices.pci.device import PciBarRegion, PciDevice
from crosvm.devices.pci.msix import MsixConfig
from crosvm.devices.pci.root import PciAddress, PciConfigIo, PciConfigMmio, PciRoot

__all__ = ["BarType", "MsixConfig", "PciAddress", "PciBar", "PciBarRegion", "PciConfigIo",
           "PciConfigMmio", "PciConfiguration", "PciDevice", "PciRoot"]
