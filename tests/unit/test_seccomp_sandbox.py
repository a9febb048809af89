"""A jailed device process under its seccomp filter (needs namespaces and libseccomp, no
KVM). The sandbox probe device tries, from inside its process, what a compromised
device would; the same probe outside the jail succeeds, so each check can fail."""

from __future__ import annotations

import errno
import logging
import os
import signal
import time

import pytest

from crosvm.devices.proxy import DeviceProcess, HostRequests, PciProxy, describe_status
from tests.support.sandbox_probe import NOT_RUN, PROBE_REG, RESULT_REG, SandboxProbe
from crosvm.jail import Jail, ensure_pivot_root
from crosvm.jail.seccomp import SeccompAuditLog, syscall_name
from tests.support.procs import device_process

OPEN_HOST_FILE, CREATE_SOCKET, EXECVE, PTRACE, SHARED_MEMORY = 1, 2, 3, 4, 5


class Buggy(SandboxProbe):
    """A device with a bug: its Python traceback is printed from inside the jail."""

    def read_config_register(self, reg: int) -> int:
        raise ValueError("device bug")


class Probe:
    """A SandboxProbe in its own (jailed) process, driven through its PCI proxy."""

    def __init__(self, jail: Jail | None, name: str = "probe_test",
                 device: SandboxProbe | None = None) -> None:
        self.deaths: list[str] = []
        host = HostRequests()
        self.proc = DeviceProcess(device or SandboxProbe(), name, [], jail, host)
        self.proxy = PciProxy(self.proc, SandboxProbe(), host, self.deaths.append)

    def run(self, probe: int) -> int:
        self.proxy.write_config_register(PROBE_REG, 0, bytes([probe]))
        return self.proxy.read_config_register(RESULT_REG)

    def exit_code(self) -> int:
        self.proc.shutdown()
        return os.waitstatus_to_exitcode(self.proc.reap())


@pytest.fixture(params=["jail.fork", "two-step"])
def jail(request, tmp_path):
    """A jail as a root VMM has it (devices forked into their PID namespace), and as a
    VMM that may not make PID namespaces has it (a first process waits for the device)."""
    root = str(tmp_path / "empty")
    ensure_pivot_root(root)
    if not os.path.exists("/proc/self/ns/user"):
        pytest.skip("no user namespaces")
    jail = Jail(pivot_root=root)
    if request.param == "two-step":
        jail._own_pid_ns = False
    return jail


def test_jailed_device_opening_a_host_path_gets_enoent(jail):
    probe = Probe(jail)

    result = probe.run(OPEN_HOST_FILE)

    assert result == errno.ENOENT
    assert probe.exit_code() == 0


def test_unjailed_device_can_open_a_host_path():
    probe = Probe(None)

    assert probe.run(OPEN_HOST_FILE) == 0
    probe.exit_code()


@pytest.mark.parametrize("which", [CREATE_SOCKET, EXECVE, PTRACE, SHARED_MEMORY],
                         ids=["socket", "execve", "ptrace", "shared-memory"])
def test_syscall_outside_policy_kills_the_device_with_sigsys(jail, which):
    probe = Probe(jail)

    result = probe.run(which)

    assert result == NOT_RUN  # the proxy read 0xffffffff: no device answered
    assert probe.deaths and "probe_test" in probe.deaths[0]
    # Killed by the signal itself, or (two-step) its waiting process mirrors it as 128+n.
    assert probe.exit_code() in (-signal.SIGSYS, 128 + signal.SIGSYS)


def test_unjailed_device_can_create_a_socket():
    probe = Probe(None)

    assert probe.run(CREATE_SOCKET) == 0
    assert probe.exit_code() == 0


def test_log_failures_lets_the_syscall_run(jail):
    jail.seccomp_log_failures = True
    probe = Probe(jail)

    result = probe.run(CREATE_SOCKET)

    assert result == 0
    assert probe.exit_code() == 0


def test_device_process_status_shows_filter_mode_and_no_privileges(jail):
    probe = Probe(jail)
    probe.run(OPEN_HOST_FILE)  # the device serves requests: it is jailed by now
    device_pid = device_process(probe.proc.pid)

    status = dict(line.split(":", 1) for line in open(f"/proc/{device_pid}/status"))

    assert status["Seccomp"].strip() == "2"
    assert status["NoNewPrivs"].strip() == "1"
    assert int(status["CapEff"], 16) == 0
    probe.exit_code()


def test_kill_is_described_as_a_seccomp_violation(jail):
    probe = Probe(jail)
    probe.run(CREATE_SOCKET)

    text = describe_status(probe.proc.reap())

    assert "SIGSYS" in text and "seccomp" in text


@pytest.mark.skipif(not os.access("/dev/kmsg", os.R_OK), reason="/dev/kmsg not readable")
def past_audit_rate_limit(attempt, tries: int = 3):
    """`attempt()` until it returns something: the kernel prints at most 10 audit
    records per 5 s (kauditd_printk_skb is rate-limited) and the suite's other seccomp
    kills use them up, so a missing record is waited out and the action repeated."""
    for _ in range(tries - 1):
        result = attempt()
        if result:
            return result
        time.sleep(5.5)
    return attempt()


def test_audit_log_names_the_syscall_that_killed_the_device(jail):
    audit = SeccompAuditLog()

    def kill_and_find():
        probe = Probe(jail, name="probe_audit")
        probe.run(CREATE_SOCKET)
        probe.proc.reap()
        return audit.killing_syscall("probe_audit")

    nr = past_audit_rate_limit(kill_and_find)

    audit.close()
    assert nr is not None and syscall_name(nr) == "socket"


def test_device_exception_is_logged_with_traceback_not_killed(jail, capfd):
    # As crosvm's CLI does: records go to stderr, which the device process keeps.
    handler = logging.StreamHandler(open(2, "w", closefd=False))
    logger = logging.getLogger("crosvm")
    logger.addHandler(handler)
    try:
        probe = Probe(jail, device=Buggy())

        probe.proxy.read_config_register(0)
        code = probe.exit_code()
    finally:
        logger.removeHandler(handler)
        handler.stream.close()

    assert code == 1  # an ordinary failure, not 128+SIGSYS
    err = capfd.readouterr().err
    assert "Traceback" in err and "ValueError: device bug" in err


@pytest.mark.skipif(not os.access("/dev/kmsg", os.R_OK), reason="/dev/kmsg not readable")
def test_log_failures_records_the_syscall_for_policy_writing(jail):
    jail.seccomp_log_failures = True
    audit = SeccompAuditLog()

    def log_and_find():
        probe = Probe(jail, name="probe_logged")
        probe.run(CREATE_SOCKET)
        probe.exit_code()
        return {syscall_name(nr) for nr in audit.logged_syscalls("probe_logged")}

    logged = past_audit_rate_limit(log_and_find)

    audit.close()
    assert "socket" in logged
