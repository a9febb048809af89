"""Disk formats against images made and checked by the real qemu-img / qemu-io / img2simg."""

from __future__ import annotations

import os
import random
import shutil
import struct
import subprocess

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from crosvm.disk import (AndroidSparseDisk, CompositeDisk, DiskError, Qcow2Disk, RawDisk,
                         open_disk)
from crosvm.disk.composite import create_composite
from crosvm.disk.qcow2 import create_qcow2

needs_qemu = pytest.mark.skipif(shutil.which("qemu-img") is None or
                                shutil.which("qemu-io") is None,
                                reason="qemu-img/qemu-io (Debian qemu-utils) not installed")
MiB = 1 << 20


def run(*cmd: str) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout


def qemu_io(path: str, *commands: str, fmt: str = "qcow2") -> None:
    args = ["qemu-io", "-f", fmt]
    for c in commands:
        args += ["-c", c]
    run(*args, path)


def to_raw(path: str, out: str) -> bytes:
    run("qemu-img", "convert", "-O", "raw", path, out)
    with open(out, "rb") as f:
        return f.read()


def read_all(disk) -> bytes:
    buf = bytearray(disk.size)
    disk.read_at(0, memoryview(buf))
    return bytes(buf)


def check(path: str) -> subprocess.CompletedProcess:
    return subprocess.run(["qemu-img", "check", path], capture_output=True, text=True)


def make_qcow2(path: str, size: str = "8M", cluster: int = 65536, compat: str = "1.1",
               extra: tuple[str, ...] = ()) -> str:
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o",
        f"cluster_size={cluster},compat={compat}", *extra, path, size)
    return path


WRITES = ("write -P 0xa1 0 70k", "write -P 0x5c 1M 4k", "write -P 0x33 3000k 130k",
          "write -z 1M 512", "write -P 0x7e 8000k 192k")


# -- reading what qemu wrote ----------------------------------------------------------
@needs_qemu
@pytest.mark.parametrize("cluster", [512, 4096, 65536, 2 * MiB])
@pytest.mark.parametrize("compat", ["0.10", "1.1"])
def test_qcow2_reads_qemu_io_writes_byte_for_byte(tmp_path, cluster, compat):
    image = make_qcow2(str(tmp_path / "a.qcow2"), cluster=cluster, compat=compat)
    qemu_io(image, *WRITES)
    expected = to_raw(image, str(tmp_path / "a.raw"))

    disk = open_disk(image, read_only=True)
    got = read_all(disk)
    disk.close()

    assert isinstance(disk, Qcow2Disk)
    assert got == expected


@needs_qemu
@pytest.mark.parametrize("compression", ["zlib", "zstd"])
def test_qcow2_reads_compressed_clusters(tmp_path, compression):
    raw = str(tmp_path / "src.raw")
    with open(raw, "wb") as f:
        f.write(random.Random(1).randbytes(MiB) + b"text" * 262_144 + bytes(MiB))
    image = str(tmp_path / "c.qcow2")
    run("qemu-img", "convert", "-c", "-O", "qcow2", "-o", f"compression_type={compression}",
        raw, image)

    disk = open_disk(image, read_only=True)
    got = read_all(disk)
    disk.close()

    with open(raw, "rb") as f:
        assert got == f.read()
    assert "compressed" in run("qemu-img", "check", image)


@needs_qemu
def test_qcow2_reads_through_backing_chain_with_relative_names(tmp_path):
    base = str(tmp_path / "base.raw")
    with open(base, "wb") as f:
        f.write(random.Random(2).randbytes(4 * MiB))
    os.mkdir(tmp_path / "sub")
    mid = str(tmp_path / "mid.qcow2")
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", mid, "6M")
    qemu_io(mid, "write -P 0x42 1M 100k")
    top = str(tmp_path / "sub" / "top.qcow2")
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", "../mid.qcow2", "-F", "qcow2", top)
    qemu_io(top, "write -P 0x99 1050k 8k", "write -z 3M 64k")
    expected = to_raw(top, str(tmp_path / "top.raw"))

    disk = open_disk(top, read_only=True)
    got = read_all(disk)
    fds = disk.fds()
    disk.close()

    assert got == expected
    assert len(fds) == 3


# -- writing what qemu-img accepts ---------------------------------------------------
def random_writes(disk, mirror: bytearray, seed: int, count: int = 60) -> None:
    rng = random.Random(seed)
    for _ in range(count):
        length = rng.choice([512, 4096, 65536, 3 * 512, 200_000])
        offset = rng.randrange(0, disk.size - length) & ~511
        data = rng.randbytes(length)
        disk.write_at(offset, memoryview(data))
        mirror[offset:offset + length] = data


@needs_qemu
@pytest.mark.parametrize("cluster", [512, 4096, 65536, 2 * MiB])
@pytest.mark.parametrize("compat", ["0.10", "1.1"])
def test_qcow2_writes_pass_qemu_img_check_and_compare(tmp_path, cluster, compat):
    image = make_qcow2(str(tmp_path / "w.qcow2"), size="16M", cluster=cluster, compat=compat)
    qemu_io(image, "write -P 0x10 0 1M")
    mirror = bytearray(to_raw(image, str(tmp_path / "before.raw")))
    disk = open_disk(image)
    random_writes(disk, mirror, seed=cluster)
    disk.close()
    expected = str(tmp_path / "expected.raw")
    with open(expected, "wb") as f:
        f.write(mirror)

    result = check(image)

    assert result.returncode == 0, result.stdout + result.stderr
    assert "No errors were found" in result.stdout
    assert "leaked" not in result.stdout
    run("qemu-img", "compare", "-f", "qcow2", "-F", "raw", image, expected)


@needs_qemu
def test_qcow2_writes_over_backing_and_compressed_clusters_copy_on_write(tmp_path):
    base = str(tmp_path / "base.qcow2")
    src = str(tmp_path / "src.raw")
    with open(src, "wb") as f:
        f.write(random.Random(3).randbytes(2 * MiB) + b"abcd" * 524_288)
    run("qemu-img", "convert", "-c", "-O", "qcow2", src, base)
    top = str(tmp_path / "top.qcow2")
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", top)
    mirror_top = bytearray(to_raw(top, str(tmp_path / "t.raw")))
    mirror_base = bytearray(mirror_top)
    disk = open_disk(top)
    random_writes(disk, mirror_top, seed=5, count=30)
    disk.close()
    direct = open_disk(base)
    random_writes(direct, mirror_base, seed=6, count=30)
    direct.close()

    assert check(base).returncode == 0
    assert check(top).returncode == 0
    assert to_raw(base, str(tmp_path / "b2.raw")) == bytes(mirror_base)


@needs_qemu
@pytest.mark.parametrize("compat", ["0.10", "1.1"])
@pytest.mark.parametrize("backing", [False, True])
def test_qcow2_write_zeroes_and_discard_read_as_zero_and_free_clusters(tmp_path, compat,
                                                                        backing):
    image = str(tmp_path / "z.qcow2")
    if backing:
        base = make_qcow2(str(tmp_path / "base.qcow2"), size="8M")
        qemu_io(base, "write -P 0x66 0 8M")
        run("qemu-img", "create", "-q", "-f", "qcow2", "-o", f"compat={compat}",
            "-b", base, "-F", "qcow2", image)
    else:
        make_qcow2(image, compat=compat)
    qemu_io(image, "write -P 0x77 0 4M")
    disk = open_disk(image)

    disk.write_zeroes(100_000, 3 * MiB)
    disk.punch_hole(5 * MiB, MiB)
    disk.close()

    result = check(image)
    assert result.returncode == 0 and "leaked" not in result.stdout, result.stdout
    qemu_io(image, "read -P 0 100000 3M", "read -P 0 5M 1M", "read -P 0x77 0 100000")


@needs_qemu
def test_qcow2_grows_its_refcount_table(tmp_path):
    image = make_qcow2(str(tmp_path / "g.qcow2"), size="64M", cluster=512)
    disk = open_disk(image)
    first_table = disk.rt_offset
    mirror = bytearray(64 * MiB)
    for offset in range(0, 40 * MiB, 2048):
        disk.write_at(offset, memoryview(b"\x5a" * 512))
        mirror[offset:offset + 512] = b"\x5a" * 512
    moved = disk.rt_offset != first_table
    disk.close()
    expected = str(tmp_path / "e.raw")
    with open(expected, "wb") as f:
        f.write(mirror)

    result = check(image)

    assert moved
    assert result.returncode == 0 and "leaked" not in result.stdout, result.stdout
    run("qemu-img", "compare", "-f", "qcow2", "-F", "raw", image, expected)


@needs_qemu
def test_qcow2_set_len_grows_the_l1_table(tmp_path):
    image = make_qcow2(str(tmp_path / "r.qcow2"), size="1M", cluster=4096)
    qemu_io(image, "write -P 0x31 0 1M")
    disk = open_disk(image)

    disk.set_len(300 * MiB)
    disk.write_at(299 * MiB, memoryview(b"\x32" * 4096))
    disk.close()

    assert check(image).returncode == 0
    assert "virtual size: 300 MiB" in run("qemu-img", "info", image)
    qemu_io(image, "read -P 0x31 0 1M", "read -P 0x32 299M 4k")


@needs_qemu
def test_qcow2_flush_leaves_a_consistent_image_while_open(tmp_path):
    image = make_qcow2(str(tmp_path / "f.qcow2"), cluster=4096)
    disk = open_disk(image)
    disk.write_at(0, memoryview(b"\x44" * 100_000))

    disk.flush()
    result = subprocess.run(["qemu-img", "check", "-U", image], capture_output=True,
                            text=True)
    disk.close()

    assert result.returncode == 0, result.stdout


@needs_qemu
def test_create_qcow2_image_passes_qemu_img_check(tmp_path):
    image = str(tmp_path / "new.qcow2")

    create_qcow2(image, 5 * 1024 * MiB)

    assert check(image).returncode == 0
    info = run("qemu-img", "info", image)
    assert "virtual size: 5 GiB" in info and "file format: qcow2" in info


@needs_qemu
def test_create_qcow2_with_backing_file_reads_the_backing_data(tmp_path):
    base = str(tmp_path / "base.raw")
    with open(base, "wb") as f:
        f.write(b"\x21" * (2 * MiB))
    image = str(tmp_path / "over.qcow2")

    create_qcow2(image, None, backing_file="base.raw")

    assert check(image).returncode == 0
    qemu_io(image, "read -P 0x21 0 2M")
    disk = open_disk(image, read_only=True)
    assert disk.size == 2 * MiB and read_all(disk) == b"\x21" * (2 * MiB)
    disk.close()


# -- hostile qcow2 images -----------------------------------------------------------
def header_patch(path: str, offset: int, fmt: str, value: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(struct.pack(fmt, value))


@needs_qemu
@pytest.mark.parametrize("offset,fmt,value,message", [
    (4, ">I", 4, "version 4"),
    (20, ">I", 30, "cluster_bits 30"),
    (20, ">I", 8, "cluster_bits 8"),
    (32, ">I", 1, "encrypted"),
    (36, ">I", 0, "too small"),
    (36, ">I", 0x7FFF_FFFF, "too large"),
    (40, ">Q", 1 << 40, "outside the file"),
    (40, ">Q", 0x1234, "not cluster aligned"),
    (48, ">Q", 1 << 40, "outside the file"),
    (56, ">I", 0, "refcount table of 0"),
    (72, ">Q", 1, "dirty"),
    (72, ">Q", 2, "corrupt"),
    (72, ">Q", 4, "external data file"),
    (72, ">Q", 16, "extended L2"),
    (72, ">Q", 1 << 40, "bit 40"),
    (96, ">I", 7, "refcount_order 7"),
    (100, ">I", 3, "header_length 3"),
    (24, ">Q", 1 << 63, "too large"),
])
def test_qcow2_hostile_header_gets_one_clear_error(tmp_path, offset, fmt, value, message):
    image = make_qcow2(str(tmp_path / "h.qcow2"))
    header_patch(image, offset, fmt, value)

    with pytest.raises(DiskError, match=message):
        open_disk(image)


@needs_qemu
def test_qcow2_l2_table_outside_the_file_fails_the_read(tmp_path):
    image = make_qcow2(str(tmp_path / "l2.qcow2"))
    qemu_io(image, "write 0 4k")
    disk = open_disk(image, read_only=True)
    l1_offset = disk.l1_offset
    disk.close()
    header_patch(image, l1_offset, ">Q", (1 << 63) | (1 << 40))
    disk = open_disk(image, read_only=True)

    with pytest.raises(DiskError, match="L2 table .* outside the file"):
        disk.read_at(0, memoryview(bytearray(512)))
    disk.close()


@needs_qemu
def test_qcow2_data_cluster_on_metadata_is_not_written(tmp_path):
    image = make_qcow2(str(tmp_path / "o.qcow2"), cluster=4096)
    qemu_io(image, "write 0 4k")
    disk = open_disk(image)
    l1_offset = disk.l1_offset
    disk.close()
    with open(image, "rb") as f:
        f.seek(l1_offset)
        l2_offset = struct.unpack(">Q", f.read(8))[0] & 0x00FF_FFFF_FFFF_FE00
    header_patch(image, l2_offset, ">Q", (1 << 63) | l1_offset)  # data "is" the L1 table
    disk = open_disk(image)

    with pytest.raises(DiskError, match="overlaps metadata"):
        disk.write_at(0, memoryview(b"x" * 512))
    disk.close_files()


@needs_qemu
def test_qcow2_backing_loop_is_rejected(tmp_path):
    a, b = str(tmp_path / "a.qcow2"), str(tmp_path / "b.qcow2")
    make_qcow2(a)
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", a, "-F", "qcow2", b)
    run("qemu-img", "rebase", "-u", "-b", b, "-F", "qcow2", a)

    with pytest.raises(DiskError, match="loop"):
        open_disk(b, read_only=True)


@needs_qemu
def test_qcow2_backing_chain_deeper_than_the_limit_is_rejected(tmp_path):
    prev = make_qcow2(str(tmp_path / "0.qcow2"), size="1M")
    for i in range(1, 35):
        cur = str(tmp_path / f"{i}.qcow2")
        run("qemu-img", "create", "-q", "-f", "qcow2", "-b", prev, "-F", "qcow2", cur)
        prev = cur

    with pytest.raises(DiskError, match="deeper than 32"):
        open_disk(prev, read_only=True)


@needs_qemu
def test_qcow2_missing_backing_file_names_it(tmp_path):
    image = str(tmp_path / "orphan.qcow2")
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", "gone.raw", "-F", "raw", "-u",
        image, "1M")

    with pytest.raises(DiskError, match="gone.raw"):
        open_disk(image, read_only=True)


@pytest.fixture(scope="module")
def fuzz_seed_image(tmp_path_factory):
    if shutil.which("qemu-io") is None:
        pytest.skip("qemu-io not installed")
    path = str(tmp_path_factory.mktemp("fuzz") / "seed.qcow2")
    make_qcow2(path, size="2M", cluster=4096)
    qemu_io(path, "write -P 0x12 0 8k", "write -P 0x34 1M 4k", "write -z 64k 4k")
    with open(path, "rb") as f:
        return f.read()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(patches=st.lists(st.tuples(st.integers(0, 5 * 4096 - 1), st.integers(0, 255)),
                        min_size=1, max_size=8))
def test_qcow2_fuzzed_metadata_only_raises_disk_error(tmp_path, fuzz_seed_image, patches):
    data = bytearray(fuzz_seed_image)
    for offset, value in patches:
        if offset < len(data):
            data[offset] = value
    path = str(tmp_path / "fuzz.qcow2")
    with open(path, "wb") as f:
        f.write(data)

    try:
        disk = open_disk(path)
    except DiskError:
        return
    try:
        if disk.size <= 16 * MiB:
            read_all(disk)
        disk.write_at(0, memoryview(b"w" * 4096))
        disk.write_zeroes(64 << 10, 4096)
        disk.flush()
    except DiskError:
        pass
    finally:
        try:
            disk.close()
        except DiskError:
            pass


# -- Android sparse --------------------------------------------------------------
@pytest.mark.skipif(shutil.which("img2simg") is None, reason="img2simg not installed")
def test_android_sparse_from_img2simg_reads_back_identically(tmp_path):
    raw = str(tmp_path / "fs.raw")
    with open(raw, "wb") as f:
        f.truncate(8 * MiB)
        f.seek(MiB)
        f.write(random.Random(7).randbytes(300_000))
        f.seek(5 * MiB)
        f.write(b"\xcd" * MiB)  # a fill chunk
    sparse = str(tmp_path / "fs.simg")
    run("img2simg", raw, sparse)

    disk = open_disk(sparse)
    got = read_all(disk)
    disk.close()

    assert isinstance(disk, AndroidSparseDisk) and disk.read_only
    with open(raw, "rb") as f:
        assert got == f.read()


def test_android_sparse_fill_dont_care_and_crc_chunks(tmp_path):
    blk = 4096
    chunks = [
        struct.pack("<HHII", 0xCAC1, 0, 1, 12 + blk) + b"\x01" * blk,
        struct.pack("<HHII", 0xCAC2, 0, 2, 16) + b"\x01\x02\x03\x04",
        struct.pack("<HHII", 0xCAC3, 0, 3, 12),
        struct.pack("<HHII", 0xCAC4, 0, 0, 16) + b"\0\0\0\0",
    ]
    path = str(tmp_path / "hand.simg")
    with open(path, "wb") as f:
        f.write(struct.pack("<IHHHHIIII", 0xED26FF3A, 1, 0, 28, 12, blk, 6, len(chunks), 0))
        f.write(b"".join(chunks))

    disk = open_disk(path)
    got = read_all(disk)
    disk.close()

    assert got == b"\x01" * blk + b"\x01\x02\x03\x04" * (2 * blk // 4) + bytes(3 * blk)


@pytest.mark.parametrize("header,chunk,message", [
    ((0xED26FF3A, 2, 0, 28, 12, 4096, 1, 1, 0), (0xCAC3, 0, 1, 12), "major version 2"),
    ((0xED26FF3A, 1, 0, 28, 12, 4095, 1, 1, 0), (0xCAC3, 0, 1, 12), "block size 4095"),
    ((0xED26FF3A, 1, 0, 28, 12, 4096, 9, 1, 0), (0xCAC3, 0, 1, 12), "header says"),
    ((0xED26FF3A, 1, 0, 28, 12, 4096, 1, 1, 0), (0xCAC9, 0, 1, 12), "unknown chunk"),
    ((0xED26FF3A, 1, 0, 28, 12, 4096, 1, 1, 0), (0xCAC1, 0, 1, 4108), "past the end"),
    ((0xED26FF3A, 1, 0, 28, 12, 4096, 1, 5, 0), (0xCAC3, 0, 1, 12), "outside the file"),
])
def test_android_sparse_hostile_image_gets_one_clear_error(tmp_path, header, chunk, message):
    path = str(tmp_path / "bad.simg")
    with open(path, "wb") as f:
        f.write(struct.pack("<IHHHHIIII", *header) + struct.pack("<HHII", *chunk))

    with pytest.raises(DiskError, match=message):
        open_disk(path, read_only=True)


# -- composite -----------------------------------------------------------------
def test_composite_disk_maps_partitions_after_a_gpt(tmp_path):
    p1, p2 = str(tmp_path / "one.img"), str(tmp_path / "two.img")
    with open(p1, "wb") as f:
        f.write(b"\x01" * (MiB + 512))
    with open(p2, "wb") as f:
        f.write(b"\x02" * MiB)
    path = str(tmp_path / "disk.composite")
    create_composite(path, [("one", p1, False), ("two", p2, True)])

    disk = open_disk(path)
    got = read_all(disk)
    disk.write_at(disk.parts[2][0], memoryview(b"\x09" * 512))
    disk.close()

    assert isinstance(disk, CompositeDisk)
    assert got[512:520] == b"EFI PART"
    assert got[20480:20480 + MiB + 512] == b"\x01" * (MiB + 512)
    start2 = 20480 + MiB + 4096
    assert got[start2:start2 + MiB] == b"\x02" * MiB
    assert got[-512:-504] == b"EFI PART"
    with open(p2, "rb") as f:
        assert f.read(512) == b"\x09" * 512


@pytest.mark.skipif(shutil.which("sfdisk") is None, reason="sfdisk not installed")
def test_composite_disk_gpt_is_valid_for_sfdisk(tmp_path):
    p1 = str(tmp_path / "one.img")
    with open(p1, "wb") as f:
        f.truncate(2 * MiB)
    path = str(tmp_path / "disk.composite")
    create_composite(path, [("root", p1, True)])
    flat = str(tmp_path / "flat.img")
    disk = open_disk(path, read_only=True)
    with open(flat, "wb") as f:
        f.write(read_all(disk))
    disk.close()

    out = subprocess.run(["sfdisk", "--verify", flat], capture_output=True, text=True)
    table = run("sfdisk", "--json", flat)

    assert out.returncode == 0, out.stdout + out.stderr
    assert '"label": "gpt"' in table and '"name": "root"' in table


def test_composite_component_overlap_is_rejected(tmp_path):
    from crosvm.disk.composite import encode_composite
    p1 = str(tmp_path / "one.img")
    with open(p1, "wb") as f:
        f.truncate(4096)
    path = str(tmp_path / "bad.composite")
    with open(path, "wb") as f:
        f.write(encode_composite([(p1, 0, False), (p1, 512, False)], 8192))

    with pytest.raises(DiskError, match="overlaps"):
        open_disk(path, read_only=True)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200))
def test_composite_fuzzed_descriptor_only_raises_disk_error(tmp_path_factory, body):
    path = str(tmp_path_factory.mktemp("cfz") / "f.composite")
    with open(path, "wb") as f:
        f.write(b"composite_disk\x1d" + body)

    try:
        open_disk(path, read_only=True).close()
    except DiskError:
        pass


def test_raw_disk_is_the_fallback_format(tmp_path):
    path = str(tmp_path / "plain.img")
    with open(path, "wb") as f:
        f.write(b"hello" * 1000)

    disk = open_disk(path, read_only=True)

    assert isinstance(disk, RawDisk)
    disk.close()
