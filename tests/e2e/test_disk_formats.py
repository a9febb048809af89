"""End-to-end: the guest reads and writes qcow2, Android sparse and composite disks made
by qemu-img / img2simg / create_composite, and what it writes stays valid for qemu-img.

One VM for the format checks and the virtio-pmem ones (its last test powers it off so
the images can be checked closed) and one for the crash test, which kills the VMM with
SIGKILL mid-stream.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import shutil
import subprocess
import time

import pytest

from crosvm.disk.composite import create_composite
from crosvm.disk.qcow2 import create_qcow2
from tests.conftest import make_ext4
from tests.guest_vm import GuestVm

pytestmark = [pytest.mark.e2e,
              pytest.mark.skipif(shutil.which("qemu-img") is None or
                                 shutil.which("img2simg") is None,
                                 reason="needs qemu-utils and android-sdk-libsparse-utils")]

MiB = 1 << 20
TAIL_OFFSET = 8 * MiB   # raw guest writes past the 4 MiB file system on the fresh qcow2
TAIL_BYTES = 64 << 10
PART_FILE = b"partition one\n" * 100
PMEM_FILE = b"persistent memory\n" * 100
PMEM_RW_MIB, PMEM_RO_MIB = 4, 6   # different sizes: each /dev/pmemN is known by its size
SLOW = 900   # seconds for the guest's bulk copies when the host is shared and busy
# The guest CPU is emulated (~1000x slower): images stay small and checksums are md5.


def run(*cmd: str) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout


def md5_of(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.md5(f.read()).hexdigest()


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("formats"))
    rng = random.Random(12)
    # vda: qcow2 v3 over a compressed qcow2 over raw, with qemu-io writes on top.
    raw = os.path.join(d, "base.raw")
    with open(raw, "wb") as f:
        f.write(rng.randbytes(MiB // 2) + b"compressible" * (MiB // 24) + bytes(MiB))
    mid = os.path.join(d, "mid.qcow2")
    run("qemu-img", "convert", "-c", "-O", "qcow2", raw, mid)
    top = os.path.join(d, "top.qcow2")
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2", top)
    run("qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 100k 300k", "-c", "write -z 600k 64k",
        "-c", "write -P 0x11 1900k 4k", top)
    # vdb: a version 2 image with 4 KiB clusters.
    v2 = os.path.join(d, "v2.qcow2")
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o", "compat=0.10,cluster_size=4096", v2,
        "2M")
    run("qemu-io", "-f", "qcow2", "-c", "write -P 0x77 0 100k", "-c", "write -P 0x78 1M 500k", v2)
    # vdc: a fresh qcow2 from create_qcow2 that the guest fills; vdd: the ext4 it copies.
    fresh = os.path.join(d, "fresh.qcow2")
    create_qcow2(fresh, 16 * MiB)
    ext4 = make_ext4(os.path.join(d, "fs.ext4"), 4, files={"seed.txt": b"seed\n"})
    # vde: a composite disk: an ext4 partition and a raw one.
    part1 = make_ext4(os.path.join(d, "part1.ext4"), 4, files={"file.txt": PART_FILE})
    part2 = os.path.join(d, "part2.raw")
    with open(part2, "wb") as f:
        f.write(rng.randbytes(256 << 10))
    composite = os.path.join(d, "disk.composite")
    create_composite(composite, [("one", part1, False), ("two", part2, False)])
    # vdf: Android sparse from img2simg.
    sparse_src = os.path.join(d, "sparse.raw")
    with open(sparse_src, "wb") as f:
        f.truncate(2 * MiB)
        f.seek(256 << 10)
        f.write(rng.randbytes(100_000))
        f.seek(MiB)
        f.write(b"\xee" * (512 << 10))
    sparse = os.path.join(d, "disk.simg")
    run("img2simg", sparse_src, sparse)
    # pmem0 (writable) and pmem1 (read-only): ext4 images holding a known file.
    pmem_rw = make_ext4(os.path.join(d, "pmem_rw.ext4"), PMEM_RW_MIB, files={"pmem.txt": PMEM_FILE})
    pmem_ro = make_ext4(os.path.join(d, "pmem_ro.ext4"), PMEM_RO_MIB, files={"pmem.txt": PMEM_FILE})
    expected = {"pmem_ro": md5_of(pmem_ro)}
    for name, path in (("vda", top), ("vdb", v2)):
        out = os.path.join(d, name + ".raw")
        run("qemu-img", "convert", "-O", "raw", path, out)
        expected[name] = md5_of(out)
    expected["vde2"] = md5_of(part2)
    expected["vdf"] = md5_of(sparse_src)
    return {"dir": d, "top": top, "v2": v2, "fresh": fresh, "ext4": ext4,
            "composite": composite, "sparse": sparse, "pmem_rw": pmem_rw, "pmem_ro": pmem_ro,
            "expected": expected}


@pytest.fixture(scope="module")
def vm(kernel, initramfs, images, tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("vm"))
    extra = ("--block", f"{images['top']},ro", "--block", f"{images['v2']},ro",
             "--block", images["fresh"], "--block", f"{images['ext4']},ro",
             "--block", f"{images['composite']},ro", "--block", images["sparse"],
             "--pmem", images["pmem_rw"], "--pmem", f"{images['pmem_ro']},ro")
    with GuestVm(kernel, initramfs, workdir, cpus=1, mem=256, extra_args=extra) as guest:
        guest.wait_ready()
        yield guest


def guest_md5(vm, device: str) -> str:
    result = vm.run(f"md5sum {device}")
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout.split()[0]


def test_guest_reads_qcow2_backing_chain_with_compressed_clusters(vm, images):
    assert guest_md5(vm, "/dev/vda") == images["expected"]["vda"]


def test_guest_reads_version_2_qcow2_with_small_clusters(vm, images):
    assert guest_md5(vm, "/dev/vdb") == images["expected"]["vdb"]


def test_guest_reads_android_sparse_image(vm, images):
    assert guest_md5(vm, "/dev/vdf") == images["expected"]["vdf"]


def test_guest_sees_composite_partitions(vm, images):
    result = vm.run("mount -o ro /dev/vde1 /mnt && md5sum /mnt/file.txt; umount /mnt")

    assert result.stdout.split()[0] == hashlib.md5(PART_FILE).hexdigest()
    assert guest_md5(vm, "/dev/vde2") == images["expected"]["vde2"]


def test_guest_writes_ext4_and_raw_offsets_on_fresh_qcow2(vm, images):
    copy = vm.run("dd if=/dev/vdd of=/dev/vdc bs=1M conv=fsync 2>&1 && mount /dev/vdc /mnt"
                  " && echo written-in-guest > /mnt/guest.txt && mkdir /mnt/dir"
                  " && cp /mnt/seed.txt /mnt/dir/ && umount /mnt && sync", timeout=SLOW)
    tail = vm.run(f"dd if=/dev/urandom of=/tmp/tail bs=4096 count={TAIL_BYTES // 4096}"
                  f" 2>/dev/null && dd if=/tmp/tail of=/dev/vdc bs=4096"
                  f" seek={TAIL_OFFSET // 4096} conv=fsync 2>/dev/null && md5sum /tmp/tail",
                  timeout=SLOW)

    assert copy.returncode == 0, copy.stdout + copy.stderr
    assert tail.returncode == 0, tail.stderr
    images["tail_sha"] = tail.stdout.split()[0]


def test_guest_sees_pmem_devices_of_the_image_sizes(vm):
    result = vm.run("cat /sys/block/pmem0/size /sys/block/pmem1/size")

    assert result.returncode == 0, result.stderr
    assert [int(n) * 512 for n in result.stdout.split()] == [PMEM_RW_MIB * MiB, PMEM_RO_MIB * MiB]


def test_guest_mounts_ext4_from_read_only_pmem(vm):
    result = vm.run("mount -o ro /dev/pmem1 /mnt && md5sum /mnt/pmem.txt; umount /mnt")

    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.split()[0] == hashlib.md5(PMEM_FILE).hexdigest()


def test_guest_ext4_writes_on_pmem_reach_the_file(vm, images):
    result = vm.run("mount /dev/pmem0 /mnt && cat /mnt/pmem.txt > /dev/null"
                    " && echo written-to-pmem > /mnt/guest.txt && sync && umount /mnt",
                    timeout=SLOW)
    on_host = run("debugfs", "-R", "cat /guest.txt", images["pmem_rw"])

    assert result.returncode == 0, result.stdout + result.stderr
    assert on_host == "written-to-pmem\n"


def test_read_only_pmem_refuses_writes(vm, images):
    write = vm.run("dd if=/dev/urandom of=/dev/pmem1 bs=4096 count=4 oflag=direct 2>&1;"
                   " dd if=/dev/pmem1 bs=4096 count=4 iflag=direct 2>/dev/null | md5sum")
    with open(images["pmem_ro"], "rb") as f:
        first_blocks = hashlib.md5(f.read(4 * 4096)).hexdigest()

    assert write.stdout.split()[-2] == first_blocks   # the guest reads back the old data
    assert md5_of(images["pmem_ro"]) == images["expected"]["pmem_ro"]


def test_poweroff_leaves_written_qcow2_clean_for_qemu_img(vm, images):
    vm.send("sync; poweroff -f")
    code = vm.wait_exit()
    check = subprocess.run(["qemu-img", "check", images["fresh"]], capture_output=True,
                           text=True)
    flat = os.path.join(images["dir"], "fresh.raw")
    run("qemu-img", "convert", "-O", "raw", images["fresh"], flat)
    fsck = subprocess.run(["e2fsck", "-fn", flat], capture_output=True, text=True)
    with open(flat, "rb") as f:
        f.seek(TAIL_OFFSET)
        tail_sha = hashlib.md5(f.read(TAIL_BYTES)).hexdigest()
    listing = run("debugfs", "-R", "cat /guest.txt", flat)

    assert code == 0
    assert check.returncode == 0 and "No errors" in check.stdout, check.stdout
    assert "leaked" not in check.stdout
    assert fsck.returncode == 0, fsck.stdout
    assert listing == "written-in-guest\n"
    assert tail_sha == images.get("tail_sha")
    for image in (images["top"], images["v2"]):   # opened read-only: untouched
        assert subprocess.run(["qemu-img", "check", image]).returncode == 0


# -- crash safety ----------------------------------------------------------------
RECORD_STEP = 70   # sectors: with 512-byte clusters every record needs a new L2 table


def test_sigkill_during_fsynced_writes_keeps_qcow2_consistent(kernel, initramfs, tmp_path):
    image = str(tmp_path / "crash.qcow2")
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=512", image, "16M")
    workdir = str(tmp_path / "vm")
    os.mkdir(workdir)
    with GuestVm(kernel, initramfs, workdir, extra_args=("--block", image,
                                                          "--disable-sandbox")) as guest:
        guest.wait_ready()
        guest.send("i=0; while [ $i -lt 100000 ]; do echo record $i | dd of=/dev/vda bs=512"
                   f" seek=$((i*{RECORD_STEP})) conv=fsync,sync 2>/dev/null"
                   " && echo fsynced $i > /dev/ttyS0; i=$((i+1)); done")
        deadline = time.monotonic() + 900
        done = []
        while time.monotonic() < deadline:
            done = [int(n) for n in re.findall(r"fsynced (\d+)", guest.console())]
            if len(done) >= 5:
                break
            time.sleep(0.5)
        guest.proc.kill()   # SIGKILL, in the middle of the stream
        guest.proc.wait()
    confirmed = max(done)

    check = subprocess.run(["qemu-img", "check", image], capture_output=True, text=True)
    records = {}
    run("qemu-img", "convert", "-O", "raw", image, str(tmp_path / "crash.raw"))
    with open(str(tmp_path / "crash.raw"), "rb") as f:
        for i in range(confirmed + 1):
            f.seek(i * RECORD_STEP * 512)
            records[i] = f.read(32).split(b"\n")[0]

    assert confirmed >= 4
    assert check.returncode in (0, 3), check.stdout   # 3: leaked clusters only
    assert "ERROR" not in check.stdout and "corrupt" not in check.stdout.lower()
    assert all(records[i] == f"record {i}".encode() for i in range(confirmed + 1))
