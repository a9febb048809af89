"""`crosvm device block` as the vhost-user back-end of another VMM: QEMU (microvm with
PCIe, guest RAM in a shared memfd) boots the test kernel with a vhost-user-blk-pci
device on our socket; the guest's virtio-blk driver mounts the ext4 image, reads a
known file and writes one that lands in the image. One boot; QEMU's serial console is
driven through its stdin."""

from __future__ import annotations

import os
import select
import shutil
import subprocess
import sys
import time

import pytest

from tests.conftest import make_ext4
from tests.guest_vm import BOOT_TIMEOUT, HOST_CMDLINE

pytestmark = pytest.mark.e2e

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
KNOWN = b"served by crosvm device block\n"
GUEST_LINE = "written by a QEMU guest"
BANNER = b"pycrosvm guest shell;"
END = b"END42"  # printed as END$((40+2)): the echoed command line does not contain it
DISK_MIB = 64


def read_until(proc: subprocess.Popen, marker: bytes, timeout: float) -> bytes:
    """The console output up to and including `marker` (all of it on a timeout)."""
    out = b""
    deadline = time.monotonic() + timeout
    fd = proc.stdout.fileno()
    while marker not in out and time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 1.0)
        if ready:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            out += chunk
    return out


@pytest.fixture(scope="module")
def qemu_session(kernel, initramfs, tmp_path_factory):
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        if os.environ.get("CI") or os.environ.get("CROSVM_REQUIRE_KERNEL"):
            pytest.fail("qemu-system-x86_64 is missing (scripts/setup.sh installs it)")
        pytest.skip("qemu-system-x86_64 is not installed")
    work = tmp_path_factory.mktemp("vu-backend")
    image = make_ext4(str(work / "disk.img"), DISK_MIB, {"known.txt": KNOWN})
    sock = str(work / "blk.sock")
    backend = subprocess.Popen([sys.executable, "-m", "crosvm", "device", "block", "--socket",
                                sock, "--file", image], cwd=REPO,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 30
    while not os.path.exists(sock) and backend.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    vm = subprocess.Popen(
        [qemu, "-M", "microvm,pcie=on,memory-backend=mem", "-enable-kvm",
         # plain -cpu host fails here (MSR 0x10a, ARCH_CAPABILITIES)
         "-cpu", "host,-arch-capabilities", "-m", "256", "-smp", "1", "-nodefaults",
         "-no-user-config", "-display", "none", "-serial", "stdio",
         "-object", "memory-backend-memfd,id=mem,size=256M,share=on",
         "-chardev", f"socket,id=blk,path={sock}", "-device", "vhost-user-blk-pci,chardev=blk",
         "-kernel", kernel, "-initrd", initramfs,
         "-append", f"{HOST_CMDLINE} pycrosvm.mode=shell"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        boot = read_until(vm, BANNER, BOOT_TIMEOUT)
        command = ("cat /sys/block/vda/size && mkdir -p /mnt/v && { grep -q ' /mnt/v ' "
                   "/proc/mounts || mount -t ext4 /dev/vda /mnt/v; } && cat /mnt/v/known.txt && "
                   f"echo '{GUEST_LINE}' > /mnt/v/new.txt && umount /mnt/v; echo END$((40+2))\n")
        output = b""
        for _ in range(2):  # once more if the host's platform fault killed a process
            vm.stdin.write(command.encode())
            vm.stdin.flush()
            output = read_until(vm, END, 120)
            if KNOWN.strip() in output:
                break
        vm.stdin.write(b"poweroff -f\n")
        vm.stdin.flush()
        vm_code = vm.wait(60)
        backend_code = backend.wait(30)
        yield {"boot": boot, "output": output.decode(errors="replace"), "image": image,
               "vm_code": vm_code, "backend_code": backend_code,
               "backend_log": backend.stderr.read().decode(errors="replace")}
    finally:
        for proc in (vm, backend):
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def test_qemu_guest_sees_the_disk_our_backend_serves(qemu_session):
    assert f"\n{DISK_MIB << 11}" in qemu_session["output"].replace("\r", "")


def test_qemu_guest_reads_a_known_file_through_our_backend(qemu_session):
    assert KNOWN.decode().strip() in qemu_session["output"]


def test_qemu_guest_write_through_our_backend_lands_in_the_image(qemu_session):
    written = subprocess.run(["debugfs", "-R", "cat /new.txt", qemu_session["image"]],
                             capture_output=True, text=True, check=True).stdout

    assert written == GUEST_LINE + "\n"


def test_backend_exits_0_when_the_vmm_disconnects(qemu_session):
    assert (qemu_session["vm_code"], qemu_session["backend_code"]) == (0, 0), \
        qemu_session["backend_log"][-2000:]
