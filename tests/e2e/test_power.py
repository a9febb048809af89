"""End-to-end: the guest ends the VM; each test boots its own VM (after test_boot's
shared VM is gone, so they do not compete for the host's cores)."""

from __future__ import annotations

import os
import re
import subprocess

import pytest

from tests.guest_vm import GuestVm
from tests.support.procs import descendants, jailed_processes

pytestmark = pytest.mark.e2e


def test_guest_poweroff_exits_0_and_leaves_no_device_process(bzimage, initramfs, tmp_path):
    # Boots the bzImage, so this also proves the bzImage loader end to end.
    with GuestVm(bzimage, initramfs, str(tmp_path), cpus=1, mem=128) as guest:
        guest.wait_ready()
        pid = guest.proc.pid
        family = descendants(pid)
        devices = jailed_processes(pid)
        guest.send("poweroff -f")

        code = guest.wait_exit()

    alive = [p for p in family if os.path.exists(f"/proc/{p}")]
    assert code == 0
    assert len(devices) >= 6   # 4 UARTs, rng, pvpanic, each jailed
    assert alive == []


def test_guest_reboot_exits_32(kernel, initramfs, tmp_path):
    with GuestVm(kernel, initramfs, str(tmp_path), cpus=1, mem=128) as guest:
        guest.wait_ready()
        guest.send("reboot -f")

        code = guest.wait_exit()

    assert code == 32


def test_init_exit_panics_guest_and_exits_34_via_pvpanic(kernel, initramfs, tmp_path):
    # hvc0 is the console here, so the panic message also proves console=hvc0 works.
    with GuestVm(kernel, initramfs, str(tmp_path), cpus=1, mem=128, mode="exit",
                 console_hardware="virtio-console") as guest:
        code = guest.wait_exit()
        console = guest.console()

    assert code == 34
    assert "Kernel panic - not syncing: Attempted to kill init" in console
    assert "init: exiting on purpose" in console


def test_root_disk_boots_as_root_over_intx_and_keeps_synced_write(kernel, rootfs_image,
                                                                   tmp_path):
    # pci=nomsi: the root disk's interrupts use INTx (level-triggered irqfd + resample).
    # init=/init: the kernel would otherwise run busybox's /sbin/init from the disk.
    with GuestVm(kernel, None, str(tmp_path), cpus=1, mem=128,
                 params=("pci=nomsi", "init=/init"),
                 extra_args=("--block", f"{rootfs_image},root")) as guest:
        guest.wait_ready()
        mounts = guest.run("cat /proc/mounts").stdout
        cmdline = guest.run("cat /proc/cmdline").stdout
        interrupts = guest.run("cat /proc/interrupts").stdout
        write = guest.run("echo written-in-guest > /guest.txt && sync")
        guest.send("poweroff -f")
        code = guest.wait_exit()
    on_host = subprocess.run(["debugfs", "-R", "cat /guest.txt", rootfs_image],
                             capture_output=True, text=True).stdout

    assert "/dev/root / ext4 rw" in mounts or "/dev/vda / ext4 rw" in mounts
    assert "root=/dev/vda rw" in cmdline
    assert re.search(r"IO-APIC\s+\d+-fasteoi\s+virtio0", interrupts)
    assert write.returncode == 0
    assert code == 0
    assert on_host == "written-in-guest\n"

