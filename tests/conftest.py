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
