"""End-to-end: our vhost-user back-ends on our front-end. conftest.py starts `crosvm
devices` (a disk, a NIC on a TAP in a netns, a console; the vsock device too in the
sandboxed VM, where test_vsock.py runs over it) and `crosvm device fs`, jailed in the
sandboxed VM and not with --disable-sandbox, and the VM reaches them through
`--vhost-user TYPE,socket=PATH`. The guest's own drivers are the clients."""

from __future__ import annotations

import hashlib
import subprocess
import time

import pytest

from tests.e2e.sharing.layout import (OUR_BLOCK_FILE, OUR_BLOCK_MIB, OUR_CONSOLE_INPUT,
                                      OUR_FS_MOUNT, OUR_NET_GUEST, OUR_NET_HOST)
from tests.support.procs import descendants

pytestmark = pytest.mark.e2e

DISK = "vdc"  # after qemu-storage-daemon's two (vda, vdb)
DISK_MOUNT = "/mnt/ourb"
GUEST_LINE = "written through our vhost-user back-end"


@pytest.fixture(scope="module")
def block_session(vm):
    """Once per VM: the disk's size, its known file, a write and an unmount (which puts
    the write in the image before the host reads it). Safe to run twice."""
    return vm.run(
        f"cat /sys/block/{DISK}/size && mkdir -p {DISK_MOUNT} && "
        f"{{ grep -q ' {DISK_MOUNT} ' /proc/mounts || mount -t ext4 /dev/{DISK} {DISK_MOUNT}; }}"
        f" && cat {DISK_MOUNT}/known.txt && echo '{GUEST_LINE}' > {DISK_MOUNT}/new.txt && "
        f"umount {DISK_MOUNT}")


def test_guest_sees_our_back_ends_disk_at_its_image_size(block_session):
    assert block_session.stdout.split("\n")[0] == str(OUR_BLOCK_MIB << 11)


def test_guest_reads_a_known_file_from_our_back_ends_disk(block_session):
    assert block_session.stdout.split("\n")[1] + "\n" == OUR_BLOCK_FILE["known.txt"].decode()


def test_guest_write_to_our_back_ends_disk_lands_in_the_image(vm, block_session):
    written = subprocess.run(["debugfs", "-R", "cat /new.txt", vm.our_image],
                             capture_output=True, text=True, check=True).stdout

    assert block_session.returncode == 0
    assert written == GUEST_LINE + "\n"


def test_guest_pings_the_tap_behind_our_net_back_end(vm):
    result = vm.run(f"{{ ip addr show eth0 | grep -q {OUR_NET_GUEST} || "
                    f"ip addr add {OUR_NET_GUEST}/24 dev eth0; }} && ip link set eth0 up && "
                    f"ping -c 3 -W 10 {OUR_NET_HOST}", timeout=120)

    assert result.returncode == 0, result.stdout + result.stderr
    assert "3 packets received" in result.stdout


def test_host_pings_the_guest_through_our_net_back_end(vm):
    vm.run(f"ip addr show eth0 | grep -q {OUR_NET_GUEST} || "
           f"ip addr add {OUR_NET_GUEST}/24 dev eth0; ip link set eth0 up")

    result = subprocess.run(["ip", "netns", "exec", vm.our_netns, "busybox", "ping", "-c", "3",
                             "-W", "10", OUR_NET_GUEST], capture_output=True, text=True,
                            timeout=120)

    assert result.returncode == 0, result.stdout + result.stderr


def test_guest_console_output_reaches_our_back_ends_file(vm):
    vm.run("echo from-the-guest > /dev/hvc0")

    deadline = time.monotonic() + 30
    out = b""
    while b"from-the-guest" not in out and time.monotonic() < deadline:
        time.sleep(0.2)
        with open(vm.console_out, "rb") as f:
            out = f.read()
    assert b"from-the-guest" in out


def test_console_input_reaches_the_guest(vm):
    # A guest reader first (input that comes while nobody has hvc0 open is dropped by
    # the guest's tty layer), then the host writes the back-end's input FIFO.
    vm.run("rm -f /tmp/conin && ((stty raw -echo && head -c "
           f"{len(OUR_CONSOLE_INPUT)} > /tmp/conin) < /dev/hvc0 &) >/dev/null 2>&1")
    time.sleep(2)
    with open(vm.console_in, "wb") as fifo:
        fifo.write(OUR_CONSOLE_INPUT)

    result = vm.run(f"wait_for /tmp/conin {OUR_CONSOLE_INPUT.decode().strip()} 30 >/dev/null;"
                    " cat /tmp/conin")

    assert result.stdout.encode() == OUR_CONSOLE_INPUT


def test_guest_reads_a_file_of_our_fs_back_end_intact(vm):
    result = vm.run(f"set -o pipefail; sha256sum {OUR_FS_MOUNT}/payload.bin | cut -d' ' -f1")

    assert result.stdout.strip() == hashlib.sha256(vm.payload).hexdigest()


def test_guest_write_through_our_fs_back_end_reaches_the_host(vm):
    vm.run(f"echo '{GUEST_LINE}' > {OUR_FS_MOUNT}/from_guest.txt && sync")

    with open(f"{vm.our_share}/from_guest.txt") as f:
        assert f.read() == GUEST_LINE + "\n"


def test_back_ends_run_each_in_its_own_process_jailed_when_sandboxed(vm):
    pids = descendants(vm.devices_proc.pid)
    statuses = []
    for pid in pids:
        with open(f"/proc/{pid}/status") as f:
            statuses.append(f.read())

    seccomp = sorted(s.split("Seccomp:\t")[1][0] for s in statuses)
    # sandboxed: block, net, console, vsock (a jail may add its PID 1 reaper per device)
    assert len(pids) >= (4 if vm.sandboxed else 3)
    assert set(seccomp) == ({"2"} if vm.sandboxed else {"0"}), seccomp
