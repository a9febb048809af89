"""End-to-end: the guest ends the VM; each test boots its own VM (after test_boot's
shared VM is gone, so they do not compete for the host's cores)."""

from __future__ import annotations

import pytest

from tests.guest_vm import GuestVm

pytestmark = pytest.mark.e2e


def test_guest_poweroff_exits_0(bzimage, initramfs, tmp_path):
    # Boots the bzImage, so this also proves the bzImage loader end to end.
    with GuestVm(bzimage, initramfs, str(tmp_path), cpus=1, mem=128) as guest:
        guest.wait_ready()
        guest.send("poweroff -f")

        code = guest.wait_exit()

    assert code == 0


def test_guest_reboot_exits_32(kernel, initramfs, tmp_path):
    with GuestVm(kernel, initramfs, str(tmp_path), cpus=1, mem=128) as guest:
        guest.wait_ready()
        guest.send("reboot -f")

        code = guest.wait_exit()

    assert code == 32
