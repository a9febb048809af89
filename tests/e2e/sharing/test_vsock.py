"""End-to-end vsock through the userspace device (`--vsock cid=3,uds-path=...`), on the
package's VM (one per sandbox mode, conftest.py), the guest using the project's
/bin/vsock (guest/vsock.c).

Host programs speak the hybrid-vsock protocol: connect to the uds-path and write
`CONNECT <port>\\n` (answer `OK <host port>\\n`), or listen on `<uds-path>_<port>` for
the guest's connections to CID 2. Guest commands that run in the background loop until
they ran (this host's KVM now and then kills a process as it starts: tests/guest_vm.py).
"""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys
import threading
import time

import pytest

from tests.e2e.sharing.layout import CID
from tests.guest_vm import GuestVm

pytestmark = pytest.mark.e2e
MIB = 1 << 20
CONNECT_TIMEOUT = 60.0  # the guest listener may take a while to start


def host_connect(path: str, port: int, timeout: float = CONNECT_TIMEOUT) -> socket.socket:
    """Connect to guest port `port`, retrying while nobody listens there yet."""
    deadline = time.monotonic() + timeout
    while True:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(30)
        s.connect(path)
        s.sendall(f"CONNECT {port}\n".encode())
        line = b""
        try:
            while not line.endswith(b"\n"):
                chunk = s.recv(1)
                if not chunk:
                    break
                line += chunk
        except ConnectionResetError:  # refused while nobody listens
            pass
        if line.startswith(b"OK "):
            return s
        s.close()
        if time.monotonic() > deadline:
            raise AssertionError(f"guest port {port} never accepted (last answer {line!r})")
        time.sleep(0.5)


def host_listener(uds: str, port: int) -> socket.socket:
    """Where the guest's connections to CID 2 port `port` arrive; open to the sandboxed
    device, which is not root outside its jail."""
    path = f"{uds}_{port}"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(path)
    os.chmod(path, 0o777)
    s.listen(32)
    s.settimeout(CONNECT_TIMEOUT)
    return s


def recv_all(s: socket.socket) -> bytes:
    data = bytearray()
    while chunk := s.recv(1 << 16):
        data += chunk
    return bytes(data)


def take_one(listener: socket.socket) -> bytes:
    """Accept one guest connection, read it to its end, and close it (the guest's
    vsock waits for that close before it exits)."""
    conn, _ = listener.accept()
    with conn:
        return recv_all(conn)


def taking(listener: socket.socket, count: int = 1) -> tuple[threading.Thread, list[bytes]]:
    """`take_one` `count` times on a thread, while the guest runs its side."""
    got: list[bytes] = []
    t = threading.Thread(target=lambda: got.extend(take_one(listener) for _ in range(count)))
    t.start()
    return t, got


def background(vm: GuestVm, command: str) -> None:
    """Start `command` in the guest's background, run again until it succeeds."""
    vm.run(f"(until {command}; do sleep 0.5; done) </dev/null >/dev/null 2>&1 &")


def test_guest_finds_one_vsock_device(vm):
    result = vm.run("for d in /sys/bus/virtio/devices/*; do "
                    "[ $(cat $d/device) = 0x0013 ] && echo found; done")

    assert result.stdout.split() == ["found"]


def test_host_to_guest_message(vm):
    background(vm, "vsock -l 5000 > /tmp/m1")

    s = host_connect(vm.uds, 5000)
    s.sendall(b"hello from the host\n")
    s.close()

    result = vm.run("wait_for /tmp/m1 hello 30 >/dev/null; cat /tmp/m1")
    assert result.stdout == "hello from the host\n"


def test_guest_to_host_message(vm):
    taker, got = taking(host_listener(vm.uds, 5001))

    result = vm.run("echo hello from the guest | vsock 2 5001")
    taker.join(60)

    assert (result.returncode, got) == (0, [b"hello from the guest\n"]), result.stderr


def test_one_mib_host_to_guest_with_checksum(vm):
    data = os.urandom(MIB)
    background(vm, "vsock -l 5002 > /tmp/big_in && echo ok > /tmp/big_done")

    s = host_connect(vm.uds, 5002)
    s.sendall(data)
    s.close()

    result = vm.run("wait_for /tmp/big_done ok 120 >/dev/null && sha256sum /tmp/big_in",
                    timeout=300)
    assert result.stdout.split()[:1] == [hashlib.sha256(data).hexdigest()]


def test_one_mib_guest_to_host_with_checksum(vm):
    made = vm.run("head -c 1048576 /dev/urandom > /tmp/big_out && sha256sum /tmp/big_out")
    taker, got = taking(host_listener(vm.uds, 5003))

    sent = vm.run("vsock 2 5003 < /tmp/big_out", timeout=300)
    taker.join(120)

    assert (sent.returncode, hashlib.sha256(got[0]).hexdigest()) == (
        0, made.stdout.split()[0]), sent.stderr


def test_twenty_host_connections_at_once_echo(vm):
    background(vm, "vsock -l 5004 -e -n 20")
    host_connect(vm.uds, 5004).close()  # waits for the server (and uses one of 20 slots)
    results: dict[int, bool] = {}

    def one(i: int) -> None:
        payload = bytes([i]) * 65536
        s = host_connect(vm.uds, 5004)
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        results[i] = recv_all(s) == payload
        s.close()

    threads = [threading.Thread(target=one, args=(i,)) for i in range(19)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)

    assert results == {i: True for i in range(19)}


def test_twenty_guest_connections_at_once(vm):
    taker, got = taking(host_listener(vm.uds, 5005), 20)

    result = vm.run("for i in $(seq 1 20); do (until echo msg$i | vsock 2 5005; "
                    "do sleep 0.5; done) & done; wait", timeout=300)
    taker.join(120)

    assert (result.returncode, sorted(got)) == (
        0, sorted(f"msg{i}\n".encode() for i in range(1, 21)))


def test_host_connect_to_a_port_nobody_listens_on_is_closed(vm):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(30)
    s.connect(vm.uds)

    s.sendall(b"CONNECT 5999\n")

    assert s.recv(64) == b""


def test_guest_connect_to_a_port_nobody_listens_on_fails(vm):
    result = vm.run("vsock 2 5998")

    assert (result.returncode, "vsock: connect 2:5998" in result.stderr) == (1, True), \
        result.stderr


def test_guest_half_close_lets_the_host_still_send(vm):
    # The guest sends one line and shuts its write side; the host sees EOF, then sends.
    background(vm, "echo bye | vsock -l 5006 > /tmp/half")

    s = host_connect(vm.uds, 5006)
    first = recv_all(s)  # EOF: the guest's SHUTDOWN(SEND)
    s.sendall(b"still open\n")
    s.close()

    result = vm.run("wait_for /tmp/half still 30 >/dev/null; cat /tmp/half")
    assert (first, result.stdout) == (b"bye\n", "still open\n")


def device_rss_kib(vm: GuestVm) -> int:
    """Resident memory of the process serving this VM's vsock device: a descendant of
    its VMM (or of `crosvm devices`, over vhost-user) named after the device (the
    jail's reaper has the name too: the device is the larger), or the VMM itself
    without a sandbox."""
    root = vm.vsock_root or vm.proc.pid
    out = subprocess.run(["ps", "-eo", "pid,ppid,rss,comm"], capture_output=True,
                         text=True).stdout
    rows = {int(pid): (int(ppid), int(rss), comm)
            for pid, ppid, rss, comm in (line.split(None, 3) for line in out.splitlines()[1:])}

    def ours(pid: int) -> bool:
        while pid > 1:
            if pid == root:
                return True
            pid = rows.get(pid, (0,))[0]
        return False

    device = [rss for pid, (_, rss, comm) in rows.items() if "vsock" in comm and ours(pid)]
    return max(device) if device else rows[root][1]


def test_host_that_stops_reading_blocks_the_guest_and_gets_every_byte(vm):
    listener = host_listener(vm.uds, 5007)
    # 4 MiB of a cheap pattern (random bytes are slow to make in this emulated guest):
    # far more than the guest's socket, the device and the host socket hold.
    made = vm.run("yes 0123456789abcdef | head -c 4194304 > /tmp/slow && sha256sum /tmp/slow")
    vm.run("(vsock 2 5007 < /tmp/slow & echo $! > /tmp/slow_pid; wait $!; "
           "echo $? > /tmp/slow_rc) </dev/null >/dev/null 2>&1 &")
    conn, _ = listener.accept()
    before = device_rss_kib(vm)
    time.sleep(5)  # nobody reads: the guest must be blocked, not the device buffering
    # Blocked, not slow: still running, and no progress over another 5 s.
    sent = "grep pos /proc/$(cat /tmp/slow_pid)/fdinfo/0"  # how far it read its file
    first = vm.run(sent).stdout
    time.sleep(5)
    second = vm.run(sent).stdout
    blocked = vm.run("cat /tmp/slow_rc 2>/dev/null || echo running").stdout.strip()
    during = device_rss_kib(vm)

    got = recv_all(conn)
    conn.close()

    assert (blocked, first == second, hashlib.sha256(got).hexdigest()) == (
        "running", True, made.stdout.split()[0]), (first, second)
    assert during - before < 2 * 1024, (before, during)  # KiB: the credit, not 4 MiB


def test_vhost_vsock_without_the_device_is_refused_naming_it(kernel, tmp_path):
    if os.path.exists("/dev/vhost-vsock"):
        pytest.skip("this host has /dev/vhost-vsock; the missing-device error cannot be seen")

    result = subprocess.run([sys.executable, "-m", "crosvm", "run", "--vsock", "cid=3", kernel],
                            capture_output=True, text=True, timeout=60)

    assert (result.returncode, "/dev/vhost-vsock, which does not exist" in result.stderr) == (
        1, True), result.stderr

