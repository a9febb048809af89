"""End-to-end shared directories (`--shared-dir SRC:TAG[:type=fs]`): the guest mounts
a 9P share and a virtio-fs share (conftest.py) and works in them with busybox; the host
checks what landed in the shared directory and that nothing outside it was touched."""

from __future__ import annotations

import hashlib
import os
import stat

import pytest

from tests.e2e.sharing.layout import (GUEST_GID, GUEST_UID, HOST_GID, HOST_UID, MANY_FILES,
                                      MOUNTS, OUTSIDE_SECRET, UGID_MOUNT)

pytestmark = pytest.mark.e2e

KINDS = sorted(MOUNTS)


def test_guest_mounts_every_share(vm):
    assert (vm.mounted.returncode, vm.mounted.stderr) == (0, "")


def test_guest_finds_a_9p_and_two_fs_devices(vm):
    result = vm.run("cat /sys/bus/virtio/devices/*/device")

    ids = result.stdout.split()
    assert (ids.count("0x0009"), ids.count("0x001a")) == (1, 2)


@pytest.mark.parametrize("kind", KINDS)
def test_host_file_checksum_matches_in_guest(vm, kind):
    result = vm.run(f"sha256sum {MOUNTS[kind]}/payload.bin")

    assert result.stdout.split()[0] == hashlib.sha256(vm.payload).hexdigest()


@pytest.mark.parametrize("kind", KINDS)
def test_guest_write_lands_on_host(vm, kind):
    vm.run(f"echo written by the guest > {MOUNTS[kind]}/written.txt")

    with open(os.path.join(vm.shares[kind], "written.txt")) as f:
        assert f.read() == "written by the guest\n"


@pytest.mark.parametrize("kind", KINDS)
def test_guest_rename_moves_the_host_file(vm, kind):
    mnt = MOUNTS[kind]
    vm.run(f"echo r > {mnt}/before.txt && mv {mnt}/before.txt {mnt}/after.txt")

    names = os.listdir(vm.shares[kind])
    assert ("before.txt" in names, "after.txt" in names) == (False, True)


@pytest.mark.parametrize("kind", KINDS)
def test_guest_truncate_and_chmod_reach_the_host(vm, kind):
    mnt = MOUNTS[kind]
    vm.run(f"echo 0123456789 > {mnt}/t.txt && truncate -s 4 {mnt}/t.txt && "
           f"chmod 640 {mnt}/t.txt")

    st = os.stat(os.path.join(vm.shares[kind], "t.txt"))
    assert (st.st_size, stat.S_IMODE(st.st_mode)) == (4, 0o640)


@pytest.mark.parametrize("kind", KINDS)
def test_guest_hard_link_is_the_same_host_inode(vm, kind):
    mnt = MOUNTS[kind]
    vm.run(f"echo l > {mnt}/orig.txt && ln {mnt}/orig.txt {mnt}/hard.txt")

    share = vm.shares[kind]
    a, b = os.stat(os.path.join(share, "orig.txt")), os.stat(os.path.join(share, "hard.txt"))
    assert (a.st_ino, a.st_nlink) == (b.st_ino, 2)


@pytest.mark.parametrize("kind", KINDS)
def test_guest_symlink_is_a_host_symlink_with_the_same_text(vm, kind):
    vm.run(f"ln -s some/target {MOUNTS[kind]}/sym")

    assert os.readlink(os.path.join(vm.shares[kind], "sym")) == "some/target"


@pytest.mark.parametrize("kind", KINDS)
def test_guest_mkdir_and_rmdir_reach_the_host(vm, kind):
    mnt = MOUNTS[kind]
    vm.run(f"mkdir {mnt}/made && rmdir {mnt}/to_remove")

    names = os.listdir(vm.shares[kind])
    assert ("made" in names, "to_remove" in names) == (True, False)


@pytest.mark.parametrize("kind", KINDS)
def test_directory_of_a_thousand_files_lists_completely(vm, kind):
    result = vm.run(f"ls {MOUNTS[kind]}/many")

    assert sorted(result.stdout.split()) == [f"f{i:04d}" for i in range(MANY_FILES)]


def test_mapped_owner_shows_as_guest_ids(vm):
    result = vm.run(f"stat -c %u:%g {UGID_MOUNT}/owned.txt")

    assert result.stdout.strip() == f"{GUEST_UID}:{GUEST_GID}"


def test_file_the_guest_creates_gets_the_mapped_host_ids(vm):
    vm.run(f"echo new > {UGID_MOUNT}/created.txt")

    st = os.stat(os.path.join(vm.ugid_share, "created.txt"))
    assert (st.st_uid, st.st_gid) == (HOST_UID, HOST_GID)


@pytest.mark.parametrize("kind", KINDS)
def test_host_symlink_to_etc_passwd_does_not_read_the_host_file(vm, kind):
    result = vm.run(f"cat {MOUNTS[kind]}/evil_abs")

    with open("/etc/passwd") as f:
        first_line = f.readline().strip()
    assert first_line not in result.stdout


@pytest.mark.parametrize("kind", KINDS)
def test_host_symlink_out_of_the_share_does_not_read_outside(vm, kind):
    result = vm.run(f"cat {MOUNTS[kind]}/evil_rel")

    assert OUTSIDE_SECRET.decode().strip() not in result.stdout


@pytest.mark.parametrize("kind", KINDS)
def test_dotdot_from_the_mount_root_does_not_list_the_host_parent(vm, kind):
    result = vm.run(f"ls -a {MOUNTS[kind]}/..")

    assert "outside.txt" not in result.stdout.split()


@pytest.mark.parametrize("kind", KINDS)
def test_rename_out_of_the_tree_writes_nothing_outside_the_share(vm, kind):
    mnt = MOUNTS[kind]
    vm.run(f"echo leaving > {mnt}/leaving.txt; mv {mnt}/leaving.txt {mnt}/../leaving.txt")

    assert "leaving.txt" not in os.listdir(vm.workdir)
