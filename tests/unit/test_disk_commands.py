"""`crosvm create_qcow2` / `create_composite` from the command line."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from crosvm.cli.main import main
from crosvm.disk import CompositeDisk, open_disk

needs_qemu = pytest.mark.skipif(shutil.which("qemu-img") is None, reason="needs qemu-img")


@needs_qemu
def test_create_qcow2_command_makes_an_image_qemu_img_accepts(tmp_path):
    path = str(tmp_path / "a.qcow2")

    code = main(["create_qcow2", path, str(1 << 30)])

    assert code == 0
    assert subprocess.run(["qemu-img", "check", path]).returncode == 0


def test_create_qcow2_command_with_bad_size_exits_35(tmp_path, capsys):
    code = main(["create_qcow2", str(tmp_path / "a.qcow2"), "lots"])

    assert code == 35
    assert "invalid size 'lots'" in capsys.readouterr().err


def test_create_qcow2_command_refuses_an_existing_file(tmp_path, capsys):
    path = tmp_path / "exists.qcow2"
    path.write_bytes(b"keep me")

    code = main(["create_qcow2", str(path), "1048576"])

    assert code == 1
    assert path.read_bytes() == b"keep me"
    assert "exists" in capsys.readouterr().err


def test_create_composite_command_makes_an_openable_disk(tmp_path):
    part = tmp_path / "p.img"
    part.write_bytes(b"\x07" * 4096)
    path = str(tmp_path / "c.composite")

    code = main(["create_composite", path, f"root:{part}:writable"])

    disk = open_disk(path)
    assert code == 0
    assert isinstance(disk, CompositeDisk) and disk.parts[1][1].read_only is False
    disk.close()


def test_create_composite_command_with_bad_partition_spec_exits_35(tmp_path, capsys):
    code = main(["create_composite", str(tmp_path / "c"), "nolabel"])

    assert code == 35
    assert "invalid partition 'nolabel'" in capsys.readouterr().err
