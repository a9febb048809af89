"""End-to-end: a device process that breaks its seccomp policy is killed, and only it;
the VM stops with exit 33 naming the device and the syscall. The sandbox probe (a
test-only PCI device, added by the test entry point tests.support.probe_vmm) is driven by the guest through
its config space in sysfs."""

from __future__ import annotations

import os
import re

import pytest

from tests.guest_vm import GuestVm
from tests.support.procs import descendants

pytestmark = pytest.mark.e2e

FIND_PROBE = ("for d in /sys/bus/pci/devices/*; do read v < $d/vendor; read p < $d/device; "
              "[ $v:$p = 0x1ae0:0x7e57 ] && echo $d; done")


def probe_cmd(dev: str, number: int) -> str:
    """Write the probe number to config byte 0x40."""
    return f"printf '\\{number:03o}' | dd of={dev}/config bs=1 seek=64 conv=notrunc 2>/dev/null"


def result_cmd(dev: str) -> str:
    """The probe's errno, a 32-bit value at config offset 0x44."""
    return f"dd if={dev}/config bs=4 skip=17 count=1 2>/dev/null | od -An -tu4"


def test_device_breaking_its_policy_stops_vm_with_33_naming_device_and_syscall(
        kernel, initramfs, tmp_path):
    with GuestVm(kernel, initramfs, str(tmp_path), cpus=1, mem=128,
                 entry="tests.support.probe_vmm") as guest:
        guest.wait_ready()
        dev = guest.run(FIND_PROBE).stdout.strip()
        # Probe 1 opens /etc/passwd from inside the device process: it gets ENOENT (2).
        opened = guest.run(f"{probe_cmd(dev, 1)}; {result_cmd(dev)}").stdout.split()
        still_there = guest.run("echo alive").stdout
        processes = descendants(guest.proc.pid)
        # Probe 2 creates a socket: outside the policy, so the kernel kills the device.
        guest.send(probe_cmd(dev, 2))

        code = guest.wait_exit()
        log = open(guest.log_path).read()

    assert dev.startswith("/sys/bus/pci/devices/0000:00:")
    assert opened == ["2"]
    assert still_there == "alive\n"
    assert code == 33
    device = re.search(r"device (pci\w+_sandboxprobe) \(pid \d+\) killed by SIGSYS", log)
    assert device, log[-3000:]
    if os.access("/dev/kmsg", os.R_OK):  # the audit record names the syscall
        assert "syscall socket (41) is outside its seccomp policy" in log
    assert [p for p in processes if os.path.exists(f"/proc/{p}")] == []
