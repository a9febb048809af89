"""End-to-end: boot the real test kernel with `crosvm run` and check it from inside.

One VM (2 vCPUs, 256 MiB) answers many checks; power-off and reboot, which end
the VM, are in test_power.py.
"""

from __future__ import annotations

import re
import time

import pytest

from tests.guest_vm import GuestVm

pytestmark = pytest.mark.e2e

CPUS = 2
MEM_MIB = 256
MARKER_PARAM = "pycrosvm.testparam=hello42"


@pytest.fixture(scope="module")
def vm(kernel, initramfs, tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("vm"))
    with GuestVm(kernel, initramfs, workdir, cpus=CPUS, mem=MEM_MIB,
                 params=(MARKER_PARAM,)) as guest:
        guest.wait_ready()
        yield guest


def test_guest_answers_echo(vm):
    result = vm.run("echo 42")

    assert result.stdout == "42\n"
    assert result.returncode == 0


def test_agent_returns_stderr_and_exit_status(vm):
    result = vm.run("echo oops >&2; printf partial; exit 3")

    assert result.stdout == "partial"
    assert result.stderr == "oops\n"
    assert result.returncode == 3


def test_nproc_equals_cpus(vm):
    result = vm.run("nproc")

    assert int(result.stdout) == CPUS


def test_memtotal_matches_mem(vm):
    result = vm.run("grep MemTotal /proc/meminfo")

    kib = int(re.search(r"MemTotal:\s+(\d+) kB", result.stdout).group(1))
    # The kernel keeps its own image and reserved ranges out of MemTotal.
    assert MEM_MIB * 1024 * 0.85 < kib <= MEM_MIB * 1024


def test_cmdline_contains_params(vm):
    result = vm.run("cat /proc/cmdline")

    assert MARKER_PARAM in result.stdout.split()


def test_cmdline_starts_with_crosvm_base_and_console(vm):
    result = vm.run("cat /proc/cmdline")

    assert result.stdout.startswith("panic=-1 console=ttyS0 ")


def test_guest_clock_within_a_minute_of_host(vm):
    result = vm.run("date +%s")

    assert abs(int(result.stdout) - time.time()) < 60


def test_serial_file_captures_console(vm):
    vm.run("echo console-marker-7d1 > /dev/console")

    assert "console-marker-7d1" in vm.console()


def test_all_four_uarts_are_16550a(vm):
    result = vm.run("cat /proc/tty/driver/serial")

    assert result.stdout.count("uart:16550A") == 4


def test_rtc_device_reads_host_time(vm):
    result = vm.run("cat /sys/class/rtc/rtc0/since_epoch")

    assert abs(int(result.stdout) - time.time()) < 60


def test_acpi_reports_s5(vm):
    result = vm.run("dmesg | grep 'ACPI: PM: (supports'")

    assert "S5" in result.stdout


def test_i8042_keyboard_is_found(vm):
    result = vm.run("cat /proc/bus/input/devices")

    assert "AT Translated Set 2 keyboard" in result.stdout
