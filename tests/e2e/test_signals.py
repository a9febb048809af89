"""Issue 10: signals a daemon gets stop the VM cleanly; a killed VMM's socket is reused.

No guest userspace is needed: each VM is signalled as soon as its control server
answers (the VM is running), so these take seconds, not a boot.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from tests.guest_vm import HOST_CMDLINE, REPO

pytestmark = pytest.mark.e2e

START_GUARD = 120.0  # seconds; a guard against a VMM that never starts, not a speed test


def _serving(path: str) -> bool:
    """True once the VM's control server answers (it starts after the VM's signal
    handlers are installed); a request it does not know gets an ErrString."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as probe:
        probe.settimeout(5)
        try:
            probe.connect(path)
            probe.send(b'"Ping"')
            return b"ErrString" in probe.recv(4096)
        except OSError:  # not there yet, or the stale file of a killed VMM
            return False


def start_vm(kernel: str, sock: str) -> subprocess.Popen:
    """A VM whose control server accepts on `sock`."""
    proc = subprocess.Popen([sys.executable, "-m", "crosvm", "run", "--mem", "128",
                             "--serial", "type=sink,console", "-p", HOST_CMDLINE,
                             "-s", sock, kernel],
                            cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + START_GUARD
    while not _serving(sock):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"the VM did not start: {proc.communicate()[1]}")
        time.sleep(0.05)
    return proc


@pytest.mark.parametrize("sig", [signal.SIGHUP, signal.SIGTERM])
def test_stop_signal_exits_0_and_removes_the_socket(kernel, tmp_path, sig):
    sock = str(tmp_path / "vm.sock")
    proc = start_vm(kernel, sock)

    proc.send_signal(sig)
    _, err = proc.communicate(timeout=START_GUARD)

    assert proc.returncode == 0
    assert f"stopped by {sig.name}" in err
    assert not os.path.exists(sock)


def test_sigusr1_is_ignored_and_stop_still_works(kernel, tmp_path):
    sock = str(tmp_path / "vm.sock")
    proc = start_vm(kernel, sock)

    proc.send_signal(signal.SIGUSR1)
    stop = subprocess.run([sys.executable, "-m", "crosvm", "stop", sock], cwd=REPO,
                          capture_output=True, text=True, timeout=START_GUARD)
    _, err = proc.communicate(timeout=START_GUARD)

    assert stop.returncode == 0
    assert proc.returncode == 0
    assert "SIGUSR1 ignored" in err


def test_socket_left_by_a_killed_vmm_is_reused(kernel, tmp_path):
    sock = str(tmp_path / "vm.sock")
    first = start_vm(kernel, sock)
    first.kill()  # SIGKILL: nothing can remove the socket file
    first.communicate(timeout=START_GUARD)
    assert os.path.exists(sock)

    second = start_vm(kernel, sock)
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as s:
        s.settimeout(START_GUARD)
        s.connect(sock)
        s.send(b'"Exit"')
        answer = s.recv(4096)
    second.communicate(timeout=START_GUARD)

    assert answer == b'"Ok"'
    assert second.returncode == 0
