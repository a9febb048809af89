"""End-to-end exit codes that need no booted userspace: bad images, emulator failures."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.guest_vm import REPO

pytestmark = pytest.mark.e2e


def crosvm(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "crosvm", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def test_broken_kernel_image_exits_35_with_clear_error(kernel, tmp_path):
    broken = tmp_path / "broken"
    broken.write_bytes(b"\x7fELF" + b"\x02\x01\x01" + b"\x00" * 57)   # ELF header, no segments

    result = crosvm("run", str(broken))

    assert result.returncode == 35
    assert f"kernel image {broken}" in result.stderr


def test_missing_kernel_exits_35(kernel, tmp_path):
    result = crosvm("run", str(tmp_path / "nope"))

    assert result.returncode == 35
    assert "failed to open kernel image" in result.stderr


def test_emulation_failure_exits_33_with_rip_and_instruction_bytes(kernel):
    # Without `noxsave` this host's instruction emulator fails on the kernel's xrstor
    # early in boot: KVM_EXIT_INTERNAL_ERROR must be reported and end the VM.
    cmdline = ("console=ttyS0 panic=-1 clearcpuid=cx16,smap,popcnt nokaslr no_int3_selftest "
               "quiet")

    result = crosvm("run", "--mem", "128", "--serial", "type=sink,console", "-p", cmdline, kernel)

    if result.returncode == 0:
        pytest.skip("this host's KVM runs xrstor; no emulation failure to observe")
    assert result.returncode == 33
    assert "vcpu 0: KVM internal error" in result.stderr
    assert "RIP 0x" in result.stderr
    assert "instruction bytes: " in result.stderr
