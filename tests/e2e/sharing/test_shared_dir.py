"""End-to-end shared directories (`--shared-dir SRC:TAG[:type=fs]`): the guest mounts
a 9P share and a virtio-fs share (conftest.py) and works in them with busybox; the host
checks what landed in the shared directory and that nothing outside it was touched.

Guest commands are slow here (each program the guest starts costs most of a second),
so the writes are one guest script per VM (`guest_changes`) whose effects each test
checks on the host, and each read-side check covers both protocols in one command."""

from __future__ import annotations

import hashlib
import os
import stat

import pytest

from tests.e2e.sharing.layout import (GUEST_GID, GUEST_UID, HOST_GID, HOST_UID, MANY_FILES,
                                      MOUNTS, OUTSIDE_SECRET, UGID_MOUNT, VU_MOUNT)

pytestmark = pytest.mark.e2e

KINDS = sorted(MOUNTS)
# What the guest does in each share (`$m` is its mount point), in order. One line: the
# agent takes one command per line. Chained with && and safe to run twice: a process the
# host's platform fault kills fails the whole command, which the harness runs again.
SHARE_OPS = [
    "echo written by the guest > $m/written.txt",
    "echo r > $m/before.txt", "mv $m/before.txt $m/after.txt",
    "echo 0123456789 > $m/t.txt", "truncate -s 4 $m/t.txt", "chmod 640 $m/t.txt",
    "echo l > $m/orig.txt", "ln -f $m/orig.txt $m/hard.txt",
    "ln -sf some/target $m/sym",
    "mkdir -p $m/made", "{ [ ! -d $m/to_remove ] || rmdir $m/to_remove; }",
    "echo leaving > $m/leaving.txt", "mv $m/leaving.txt $m/../leaving.txt",
]


@pytest.fixture(scope="module")
def guest_changes(vm):
    """The guest's writes in every share, once per VM; each test checks one effect."""
    mounts = " ".join(MOUNTS[k] for k in KINDS)
    return vm.run(f"for m in {mounts}; do {' && '.join(SHARE_OPS)} || exit 1; done && "
                  f"echo new > {UGID_MOUNT}/created.txt && sync")


def outputs_per_kind(vm, command: str, must_succeed: bool = True) -> dict[str, str]:
    """`command` (with `$m` for the mount point) run in the guest for each share; its
    standard output and error per share. With `must_succeed` the parts are chained
    (pipefail too), so a process killed by the host's platform fault fails the whole
    command and the harness runs it again, instead of a silently short output."""
    marker = "=====pycrosvm-share====="
    if must_succeed:
        parts = [f"m={MOUNTS[k]} && {{ {command}; }} 2>&1 && echo {marker}" for k in KINDS]
        result = vm.run("set -o pipefail; " + " && ".join(parts))
    else:
        parts = [f"m={MOUNTS[k]}; {command} 2>&1; echo {marker}" for k in KINDS]
        result = vm.run("; ".join(parts))
    return dict(zip(KINDS, result.stdout.split(marker + "\n")))


def test_guest_mounts_every_share(vm):
    # What is mounted, not the mount command's stderr: a process the host's platform
    # fault killed (a `grep` before a mount, say) prints there and is run again.
    # Shell builtins only: no process start that the fault could kill.
    listed = vm.run("while read -r _ dir _; do echo $dir; done < /proc/mounts")

    assert vm.mounted.returncode == 0
    assert {*MOUNTS.values(), UGID_MOUNT, VU_MOUNT} <= set(listed.stdout.split())


def test_guest_finds_a_9p_and_four_fs_devices(vm):
    result = vm.run("cat /sys/bus/virtio/devices/*/device")

    ids = result.stdout.split()
    # Two fs devices run in the VMM; two are behind vhost-user front-ends: virtiofsd's
    # and our `crosvm device fs`.
    assert (ids.count("0x0009"), ids.count("0x001a")) == (1, 4)


def test_guest_script_ran_without_errors(guest_changes):
    assert (guest_changes.returncode, guest_changes.stderr) == (0, "")


def test_host_file_checksum_matches_in_guest(vm):
    sums = outputs_per_kind(vm, "sha256sum $m/payload.bin")

    expected = hashlib.sha256(vm.payload).hexdigest()
    assert {k: out.split()[0] for k, out in sums.items()} == {k: expected for k in KINDS}


@pytest.mark.parametrize("kind", KINDS)
def test_guest_write_lands_on_host(vm, guest_changes, kind):
    with open(os.path.join(vm.shares[kind], "written.txt")) as f:
        assert f.read() == "written by the guest\n"


@pytest.mark.parametrize("kind", KINDS)
def test_guest_rename_moves_the_host_file(vm, guest_changes, kind):
    names = os.listdir(vm.shares[kind])

    assert ("before.txt" in names, "after.txt" in names) == (False, True)


@pytest.mark.parametrize("kind", KINDS)
def test_guest_truncate_and_chmod_reach_the_host(vm, guest_changes, kind):
    st = os.stat(os.path.join(vm.shares[kind], "t.txt"))

    assert (st.st_size, stat.S_IMODE(st.st_mode)) == (4, 0o640)


@pytest.mark.parametrize("kind", KINDS)
def test_guest_hard_link_is_the_same_host_inode(vm, guest_changes, kind):
    share = vm.shares[kind]
    a, b = os.stat(os.path.join(share, "orig.txt")), os.stat(os.path.join(share, "hard.txt"))

    assert (a.st_ino, a.st_nlink) == (b.st_ino, 2)


@pytest.mark.parametrize("kind", KINDS)
def test_guest_symlink_is_a_host_symlink_with_the_same_text(vm, guest_changes, kind):
    assert os.readlink(os.path.join(vm.shares[kind], "sym")) == "some/target"


@pytest.mark.parametrize("kind", KINDS)
def test_guest_mkdir_and_rmdir_reach_the_host(vm, guest_changes, kind):
    names = os.listdir(vm.shares[kind])

    assert ("made" in names, "to_remove" in names) == (True, False)


def test_rename_out_of_the_tree_writes_nothing_outside_the_share(vm, guest_changes):
    assert "leaving.txt" not in os.listdir(vm.workdir)


def test_directory_of_a_thousand_files_lists_completely(vm):
    # The shell's glob reads the directory and nothing else (`ls` stats every entry, a
    # round trip each), and only its checksum comes back: the agent's shell relays
    # output a byte per read(2), which takes most of a minute for 1000 names here.
    listings = outputs_per_kind(vm, "echo $m/many/* | md5sum")

    expected = {k: hashlib.md5((" ".join(f"{MOUNTS[k]}/many/f{i:04d}" for i in range(MANY_FILES))
                                + "\n").encode()).hexdigest() for k in KINDS}
    assert {k: out.split()[0] for k, out in listings.items()} == expected


def test_mapped_owner_shows_as_guest_ids(vm):
    result = vm.run(f"stat -c %u:%g {UGID_MOUNT}/owned.txt")

    assert result.stdout.strip() == f"{GUEST_UID}:{GUEST_GID}"


def test_file_the_guest_creates_gets_the_mapped_host_ids(vm, guest_changes):
    st = os.stat(os.path.join(vm.ugid_share, "created.txt"))

    assert (st.st_uid, st.st_gid) == (HOST_UID, HOST_GID)


def test_host_symlink_to_etc_passwd_does_not_read_the_host_file(vm):
    outputs = outputs_per_kind(vm, "cat $m/evil_abs", must_succeed=False)

    with open("/etc/passwd") as f:
        first_line = f.readline().strip()
    assert {k: first_line in out for k, out in outputs.items()} == {k: False for k in KINDS}


def test_host_symlink_out_of_the_share_does_not_read_outside(vm):
    outputs = outputs_per_kind(vm, "cat $m/evil_rel", must_succeed=False)

    secret = OUTSIDE_SECRET.decode().strip()
    assert {k: secret in out for k, out in outputs.items()} == {k: False for k in KINDS}


def test_dotdot_from_the_mount_root_does_not_list_the_host_parent(vm):
    outputs = outputs_per_kind(vm, "ls -a $m/..")

    assert {k: "outside.txt" in out.split() for k, out in outputs.items()} == {
        k: False for k in KINDS}
