"""End-to-end: the control socket drives a running VM (issue 11), sandboxed and with
--disable-sandbox, started and driven through the Python API (`crosvm.Vm`, which the
harness's GuestVm extends), so tests and users share one path.

One VM per mode (boots are a minute or more on this host); the tests run in file order,
and the last one powers it off with the ACPI power button.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from crosvm import Vm, control
from tests.guest_vm import BOOT_TIMEOUT, COMMAND_TIMEOUT, REPO, GuestVm

pytestmark = pytest.mark.e2e

DISK_SIZE = 8 << 20
MEM_MIB = 256


def crosvm(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "crosvm", *args], capture_output=True,
                          text=True, cwd=REPO, timeout=120)


@pytest.fixture(scope="module", params=["sandboxed", "disable-sandbox"])
def vm(request, kernel, initramfs, tmp_path_factory):
    work = tmp_path_factory.mktemp("control")
    disk = str(work / "disk.img")
    with open(disk, "wb") as f:
        f.truncate(DISK_SIZE)
    extra = ("--disable-sandbox",) if request.param == "disable-sandbox" else ()
    with GuestVm(kernel, initramfs, str(work), cpus=1, mem=MEM_MIB, blocks=(disk,),
                 extra_args=extra, control_socket=True) as guest:
        guest.wait_ready()
        guest.sock = guest.socket_path
        guest.disk = disk
        yield guest


def wait_line(guest: Vm, timeout: float) -> bool:
    """Whether the guest agent printed anything within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if guest.agent.has_output():
            return True
        time.sleep(0.1)
    return False


def meminfo(guest: Vm, key: str) -> int:
    for line in guest.run("cat /proc/meminfo").stdout.splitlines():
        name, _, value = line.partition(":")
        if name == key:
            return int(value.split()[0]) << 10
    raise KeyError(key)


def guest_ram_rss(pid: int) -> int:
    """Resident bytes of the guest-memory memfd mapping in the VMM process (a page
    punched out by the balloon's process leaves every mapping)."""
    total = 0
    in_guest_ram = False
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            if not line[0].isupper() or "-" in line.split()[0]:
                in_guest_ram = "memfd:crosvm_guest" in line
            elif in_guest_ram and line.startswith("Rss:"):
                total += int(line.split()[1]) << 10
    return total


def test_two_clients_at_once_are_both_answered(vm):
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as idle:
        idle.connect(vm.sock)  # never speaks
        first = control.request(vm.sock, "ResumeVcpus")
        second = control.request(vm.sock, "ResumeVcpus")

    assert (first, second) == ("Ok", "Ok")


def test_garbage_oversized_and_truncated_clients_leave_the_vm_serving(vm):
    answers = []
    for payload in (b"\xff\x00garbage", b"[" * 1024 * 1024, b'{"DiskCommand": {"disk_'):
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as s:
            s.connect(vm.sock)
            try:
                s.send(payload)
                answers.append(s.recv(65536))
            except OSError as e:  # 1 MiB may exceed the socket's buffer: refused
                answers.append(str(e).encode())

    assert all(b"Ok" not in a for a in answers)
    assert control.request(vm.sock, "ResumeVcpus") == "Ok"
    assert vm.run("echo alive").stdout == "alive\n"


def test_unsupported_crosvm_request_is_named_in_errstring(vm):
    response = control.handle_request({"UsbCommand": {"ListDevice": {}}}, vm.sock)

    assert response == {"ErrString": "UsbCommand is not supported by this VMM"}


def test_suspended_guest_runs_nothing_until_resume(vm):
    before = int(vm.run("date +%s").stdout)
    host_before = time.time()
    suspend = crosvm("suspend", vm.sock)
    sent = vm.send("echo after-resume")
    answered_while_suspended = wait_line(vm, 5)
    resume = crosvm("resume", vm.sock)
    result = vm.read_answer(sent, COMMAND_TIMEOUT)
    after = int(vm.run("date +%s").stdout)
    host_elapsed = time.time() - host_before

    assert suspend.returncode == 0, suspend.stderr
    assert not answered_while_suspended
    assert resume.returncode == 0, resume.stderr
    assert result.stdout == "after-resume\n"
    # The guest clock follows the host's: no jump beyond the real time that passed.
    assert after - before <= host_elapsed + 5


def test_full_suspend_keeps_a_disk_write_issued_while_suspended(vm):
    suspend = crosvm("suspend", "--full", vm.sock)
    sent = vm.send("echo full-suspend | dd of=/dev/vda bs=512 seek=1 conv=sync oflag=direct "
            "2>/dev/null; echo written")
    answered_while_suspended = wait_line(vm, 3)
    resume = crosvm("resume", vm.sock, "--full")
    written = vm.read_answer(sent, COMMAND_TIMEOUT)
    with open(vm.disk, "rb") as f:
        f.seek(512)
        on_host = f.read(12)

    assert suspend.returncode == 0, suspend.stderr
    assert not answered_while_suspended
    assert resume.returncode == 0, resume.stderr
    assert written.stdout == "written\n"
    assert on_host == b"full-suspend"


def test_disk_resize_grows_file_and_guest_sees_new_size(vm):
    resize = crosvm("disk", "resize", "0", str(2 * DISK_SIZE), vm.sock)
    seen = ""
    for _ in range(30):
        seen = vm.run("blockdev --getsize64 /dev/vda").stdout.strip()
        if seen == str(2 * DISK_SIZE):
            break
        time.sleep(1)
    write_end = vm.run(f"echo end | dd of=/dev/vda bs=512 seek={2 * DISK_SIZE // 512 - 1} "
                       "conv=sync oflag=direct")

    assert resize.returncode == 0, resize.stderr
    assert seen == str(2 * DISK_SIZE)
    assert write_end.returncode == 0, write_end.stderr
    assert os.path.getsize(vm.disk) == 2 * DISK_SIZE


def test_disk_resize_bad_index_fails_with_message(vm):
    result = crosvm("disk", "resize", "7", str(DISK_SIZE), vm.sock)

    assert result.returncode == 1
    assert "disk index 7 out of range" in result.stderr


def test_gpe_out_of_range_is_refused(vm):
    ok = crosvm("gpe", "0", vm.sock)
    bad = crosvm("gpe", "99", vm.sock)

    assert ok.returncode == 0, ok.stderr
    assert bad.returncode == 1
    assert "out of range" in bad.stderr


def test_sleepbtn_reaches_guest_acpi(vm):
    before = vm.run("cat /sys/firmware/acpi/interrupts/ff_slp_btn").stdout.split()[0]
    result = crosvm("sleepbtn", vm.sock)
    after = before
    for _ in range(20):
        after = vm.run("cat /sys/firmware/acpi/interrupts/ff_slp_btn").stdout.split()[0]
        if after != before:
            break
        time.sleep(0.5)

    assert result.returncode == 0, result.stderr
    assert int(after) == int(before) + 1


def test_balloon_stats_report_plausible_guest_memory(vm):
    stats = vm.balloon_stats()
    cli = crosvm("balloon_stats", vm.sock)

    assert 0 < stats.free_memory < stats.total_memory <= MEM_MIB << 20
    assert stats.balloon_actual == 0
    assert cli.returncode == 0, cli.stderr
    assert set(json.loads(cli.stdout)["BalloonStats"]) == {"stats", "balloon_actual"}


def test_balloon_half_of_ram_takes_guest_memory_back_to_host_then_returns_it(vm):
    half = (MEM_MIB << 20) // 2
    # Touch some free memory, then free it: the host has it resident, and the balloon's
    # allocations take the guest's most recently freed pages first. (Only 16 MiB: the
    # guest kernel is emulated on this host, and writing memory in it runs ~7 MiB/min.)
    fill = 16 << 20
    vm.run(f"dd if=/dev/zero of=/tmp/fill bs=1M count={fill >> 20} 2>/dev/null; "
           "rm -f /tmp/fill")
    free_before = meminfo(vm, "MemFree")
    rss_before = guest_ram_rss(vm.proc.pid)

    result = crosvm("balloon", str(half), vm.sock)
    actual = 0
    for _ in range(120):
        actual = vm.balloon_stats().balloon_actual
        if actual >= half:
            break
        time.sleep(2)
    free_inflated = meminfo(vm, "MemFree")
    rss_inflated = guest_ram_rss(vm.proc.pid)
    vm.balloon(0, wait=True)
    free_after = meminfo(vm, "MemFree")

    assert result.returncode == 0, result.stderr
    assert actual == half
    assert free_before - free_inflated > half * 3 // 4
    # Not all of `fill`: which freed pages the balloon gets depends on the vCPU each
    # side ran on (per-CPU free lists); a punch that did nothing would show ~0.
    assert rss_before - rss_inflated > fill // 4
    assert free_after - free_inflated > half * 3 // 4


def test_powerbtn_is_counted_and_acpid_powers_off_exit_0(vm):
    setup = vm.run("mkdir -p /tmp/acpi/PWRF && printf '#!/bin/sh\\npoweroff -f\\n' "
                   "> /tmp/acpi/PWRF/00000080 && chmod +x /tmp/acpi/PWRF/00000080 && "
                   "{ acpid -d -c /tmp/acpi >/tmp/acpid.log 2>&1 & } && echo started")
    before = vm.run("cat /sys/firmware/acpi/interrupts/ff_pwr_btn").stdout.split()[0]
    result = crosvm("powerbtn", vm.sock)

    code = vm.wait(BOOT_TIMEOUT)

    assert setup.stdout == "started\n", setup.stderr
    assert int(before) == 0
    assert result.returncode == 0, result.stderr
    assert code == 0
