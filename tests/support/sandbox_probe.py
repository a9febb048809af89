"""A deliberately misbehaving test device: it tries what a compromised device would.

Test-only, and not part of the product: `python -m tests.support.probe_vmm run ...` is
crosvm's `run` plus this device (PCI 1ae0:7e57, no BARs, no interrupt), so end-to-end
tests can show from inside a device process that the jail and the seccomp policy hold. The guest writes
a probe number to config byte 0x40 (as root: `dd` into the device's sysfs `config`)
and reads the outcome, an errno (0: it worked), as a 32-bit value at 0x44.

A probe outside the policy (socket, execve, ptrace) does not return: the kernel
kills the device process with SIGSYS, and the VMM stops with exit 33 naming it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import socket
from typing import Callable

from crosvm.devices.pci.config import PciConfiguration
from crosvm.devices.pci.device import PciDevice

VENDOR_ID = 0x1AE0  # Google, whose vendor id crosvm's own devices use
DEVICE_ID = 0x7E57
CLASS_OTHER = 0xFF
PROBE_REG = 0x40 // 4
RESULT_REG = 0x44 // 4
NOT_RUN = 0xFFFF_FFFF

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
PTRACE_ATTACH = 16


def _errno_of(fn: Callable[[], object]) -> int:
    try:
        fn()
    except OSError as e:
        return e.errno or errno.EIO
    return 0


def _open_host_file() -> None:
    os.close(os.open("/etc/passwd", os.O_RDONLY))


def _create_socket() -> None:
    socket.socket(socket.AF_UNIX, socket.SOCK_STREAM).close()


def _execve() -> None:
    os.execv("/bin/true", ["true"])


def _ptrace() -> None:
    if _libc.ptrace(PTRACE_ATTACH, os.getppid() or 1, None, None) != 0:
        raise OSError(ctypes.get_errno(), "ptrace")


def _shared_memory() -> None:
    import mmap
    mmap.mmap(-1, 1 << 30, mmap.MAP_SHARED | mmap.MAP_ANONYMOUS).close()


PROBES: dict[int, Callable[[], None]] = {
    1: _open_host_file,
    2: _create_socket,
    3: _execve,
    4: _ptrace,
    5: _shared_memory,  # memory RLIMIT_DATA would not count
}


class SandboxProbe(PciDevice):
    """Runs probe N when the guest writes N to config byte 0x40."""

    # Exactly the common set (a path: the product's policy directory does not have it).
    seccomp_policy = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                  "sandbox_probe.policy")

    def __init__(self) -> None:
        self.config = PciConfiguration(VENDOR_ID, DEVICE_ID, CLASS_OTHER, 0)
        self.result = NOT_RUN

    def debug_label(self) -> str:
        return "sandbox-probe"

    def wants_intx(self) -> bool:
        return False

    def read_config_register(self, reg: int) -> int:
        if reg == RESULT_REG:
            return self.result
        return super().read_config_register(reg)

    def write_config_register(self, reg: int, offset: int, data: bytes | memoryview) -> None:
        if reg == PROBE_REG and offset == 0 and len(data) >= 1:
            probe = PROBES.get(data[0])
            self.result = errno.EINVAL if probe is None else _errno_of(probe)
            return
        super().write_config_register(reg, offset, data)

