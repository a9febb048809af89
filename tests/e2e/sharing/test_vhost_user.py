"""End-to-end vhost-user front-end against QEMU's own back-ends (conftest.py starts
them): qemu-storage-daemon exports an ext4 image (vda) and a second one (vdb) whose
daemon the last test kills; QEMU's virtiofsd serves a directory the guest mounts by
tag. The guest's kernel drivers are the clients; the host checks the image and the
directory."""

from __future__ import annotations

import hashlib
import subprocess
import time

import pytest

from tests.e2e.sharing.layout import VU_BLOCK_FILE, VU_BLOCK_MIB, VU_MOUNT, VU_VICTIM_MIB

pytestmark = pytest.mark.e2e

DISK_MOUNT = "/mnt/vub"
GUEST_LINE = "written through vhost-user by the guest"


@pytest.fixture(scope="module")
def block_session(vm):
    """Once per VM: the disks' sizes, the known file, a write, and an unmount (which
    puts the write in the image before the host reads it). Safe to run twice."""
    return vm.run(
        "cat /sys/block/vda/size /sys/block/vdb/size && mkdir -p " + DISK_MOUNT + " && "
        "{ grep -q ' " + DISK_MOUNT + " ' /proc/mounts || mount -t ext4 /dev/vda "
        + DISK_MOUNT + "; } && cat " + DISK_MOUNT + "/known.txt && "
        f"echo '{GUEST_LINE}' > {DISK_MOUNT}/new.txt && umount {DISK_MOUNT}")


@pytest.fixture(scope="module")
def fs_session(vm):
    """Once per VM: a checksum of a host file and a write, through virtiofsd."""
    return vm.run(f"set -o pipefail; sha256sum {VU_MOUNT}/payload.bin | cut -d' ' -f1 && "
                  f"echo '{GUEST_LINE}' > {VU_MOUNT}/from_guest.txt && sync")


def test_guest_sees_each_vhost_user_disk_at_its_image_size(block_session):
    sizes = block_session.stdout.split()[:2]

    assert sizes == [str(VU_BLOCK_MIB << 11), str(VU_VICTIM_MIB << 11)]


def test_guest_reads_a_known_file_from_the_qemu_storage_daemon_disk(block_session):
    assert block_session.stdout.split("\n")[2] + "\n" == VU_BLOCK_FILE["known.txt"].decode()


def test_guest_write_to_the_vhost_user_disk_lands_in_the_image(vm, block_session):
    written = subprocess.run(["debugfs", "-R", "cat /new.txt", vm.vu_image],
                             capture_output=True, text=True, check=True).stdout

    assert block_session.returncode == 0
    assert written == GUEST_LINE + "\n"


def test_guest_reads_a_virtiofsd_file_intact(vm, fs_session):
    assert fs_session.stdout.split("\n")[0] == hashlib.sha256(vm.payload).hexdigest()


def test_guest_write_through_virtiofsd_reaches_the_host(vm, fs_session):
    with open(f"{vm.vu_share}/from_guest.txt") as f:
        assert f.read() == GUEST_LINE + "\n"


# Keep last: it kills the second disk's back-end for good.
def test_killed_backend_is_reported_and_the_vm_goes_on(vm, block_session):
    vm.victim_daemon.kill()
    vm.victim_daemon.wait()
    deadline = time.monotonic() + 30
    log = ""
    while time.monotonic() < deadline and "closed the connection" not in log:
        time.sleep(0.2)
        with open(vm.log_path) as f:
            log = f.read()

    alive = vm.run("echo alive")

    assert "vhost-user-block1" in log and "closed the connection" in log, log[-2000:]
    assert alive.stdout == "alive\n"
    assert vm.proc.poll() is None
