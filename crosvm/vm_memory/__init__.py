"""Guest physical memory (crosvm's `vm_memory` crate)."""

from crosvm.vm_memory.guest_memory import GuestMemory, GuestMemoryError, MemoryRegion

__all__ = ["GuestMemory", "GuestMemoryError", "MemoryRegion"]
