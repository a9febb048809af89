"""Shared fixtures: the test kernel, the initramfs, and one booted guest per module."""

from __future__ import annotations

import os
import sys

import pytest

from tests.guest_vm import REPO, test_kernel

sys.path.insert(0, os.path.join(REPO, "guest"))


def _kernel_or_skip(kind: str) -> str:
    path = test_kernel(kind)
    if path is None:
        reason = (f"no test kernel: set CROSVM_TEST_KERNEL or provide ../shared/guest/{kind} "
                  "(built by ../shared/guest/build-kernel.sh)")
        if os.environ.get("CI") or os.environ.get("CROSVM_REQUIRE_KERNEL"):
            pytest.fail(reason)
        pytest.skip(reason)
    if not os.path.exists("/dev/kvm"):
        reason = "no /dev/kvm on this machine"
        if os.environ.get("CI") or os.environ.get("CROSVM_REQUIRE_KERNEL"):
            pytest.fail(reason)
        pytest.skip(reason)
    return path


@pytest.fixture(scope="session")
def kernel() -> str:
    return _kernel_or_skip("vmlinux")


@pytest.fixture(scope="session")
def bzimage() -> str:
    return _kernel_or_skip("bzImage")


@pytest.fixture(scope="session")
def initramfs(tmp_path_factory) -> str:
    import initramfs as builder
    return builder.build(str(tmp_path_factory.mktemp("guest") / "initramfs.cpio"))


def make_ext4(path: str, size_mib: int, files: dict[str, bytes] | None = None,
              tree: str | None = None) -> str:
    """An ext4 image made on the host with mkfs.ext4, holding `files` or the `tree` dir."""
    import subprocess
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        src = tree or tmp
        for name, data in (files or {}).items():
            with open(os.path.join(src, name), "wb") as f:
                f.write(data)
        with open(path, "wb") as f:
            f.truncate(size_mib << 20)
        subprocess.run(["mkfs.ext4", "-q", "-F", "-d", src, path], check=True)
    return path


@pytest.fixture
def rootfs_image(initramfs, tmp_path) -> str:
    """The initramfs's files (busybox, /init, ...) as an ext4 root disk image."""
    import subprocess
    tree = tmp_path / "rootfs"
    tree.mkdir()
    with open(initramfs, "rb") as cpio:
        # Device nodes may fail without root; the kernel mounts devtmpfs on /dev anyway.
        subprocess.run(["busybox", "cpio", "-id"], stdin=cpio, cwd=tree, capture_output=True)
    return make_ext4(str(tmp_path / "rootfs.img"), 64, tree=str(tree))
