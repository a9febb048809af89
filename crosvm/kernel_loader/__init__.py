"""Kernel image loading (crosvm's `kernel_loader` crate): ELF vmlinux and bzImage."""

from crosvm.kernel_loader.loader import (
    KernelLoaderError,
    LoadedKernel,
    load_bzimage,
    load_elf,
    load_initrd,
    load_kernel,
)

__all__ = ["KernelLoaderError", "LoadedKernel", "load_bzimage", "load_elf", "load_initrd",
           "load_kernel"]
