"""guest/vsock.c, the test guest's AF_VSOCK netcat (/bin/vsock), run on the host: it
compiles cleanly and statically, refuses bad arguments, reports a failed connect, and —
where the host kernel has vsock loopback (CID 1) — echoes and receives data. Also that
guest/initramfs.py installs it as /bin/vsock."""

from __future__ import annotations

import hashlib
import os
import socket
import stat
import struct
import subprocess
import threading

import initramfs as builder   # guest/, put on sys.path by tests/conftest.py
import pytest

VMADDR_CID_LOCAL = 1
TIMEOUT = 30
USAGE_START = "usage: vsock "


def _loopback_missing() -> str | None:
    """Why vsock loopback cannot be used here, or None when it can."""
    if not hasattr(socket, "AF_VSOCK"):
        return "this Python has no AF_VSOCK"
    try:
        with socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM) as s:
            s.bind((VMADDR_CID_LOCAL, socket.VMADDR_PORT_ANY))
    except OSError as e:
        return (f"no vsock loopback on this host (binding CID 1: {e.strerror}); "
                "it needs the vsock_loopback module (modprobe vsock_loopback)")
    return None


needs_loopback = pytest.mark.skipif(_loopback_missing() is not None,
                                    reason=str(_loopback_missing()))


@pytest.fixture(scope="module")
def tool(tmp_path_factory) -> str:
    return builder.compile_vsock(str(tmp_path_factory.mktemp("vsock") / "vsock"))


@pytest.fixture
def listener(tool):
    """Starts `vsock ARGS...` and returns once it has said "listening"; kills it after the test."""
    started = []

    def start(*args: str, **popen_args) -> subprocess.Popen:
        proc = subprocess.Popen([tool, *args], stderr=subprocess.PIPE, **popen_args)
        started.append(proc)
        assert proc.stderr.readline() == b"listening\n"
        return proc

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        proc.stderr.close()


def free_port() -> int:
    with socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM) as s:
        s.bind((VMADDR_CID_LOCAL, socket.VMADDR_PORT_ANY))
        return s.getsockname()[1]


def exchange(port: int, payload: bytes) -> bytes:
    """Connects to CID 1:port, sends `payload` then half-closes, while reading everything
    the other side sends until it closes (sending and reading at once, so an echo
    cannot stall on full buffers)."""
    with socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM) as s:
        s.settimeout(TIMEOUT)
        s.connect((VMADDR_CID_LOCAL, port))

        def send() -> None:
            s.sendall(payload)
            s.shutdown(socket.SHUT_WR)

        sender = threading.Thread(target=send)
        sender.start()
        received = bytearray()
        while chunk := s.recv(1 << 16):
            received += chunk
        sender.join(TIMEOUT)
    return bytes(received)


def cpio_entries(data: bytes) -> dict[str, tuple[int, bytes]]:
    """name -> (mode, contents) of an uncompressed newc cpio archive."""
    entries, pos = {}, 0
    while True:
        assert data[pos:pos + 6] == b"070701"
        fields = [int(data[pos + 6 + 8 * i:pos + 14 + 8 * i], 16) for i in range(13)]
        mode, size, name_size = fields[1], fields[6], fields[11]
        name = data[pos + 110:pos + 110 + name_size - 1].decode()
        start = (pos + 110 + name_size + 3) & ~3
        if name == "TRAILER!!!":
            return entries
        entries[name] = (mode, data[start:start + size])
        pos = (start + size + 3) & ~3


def test_tool_compiles_with_wall_without_warnings(tmp_path):
    command = builder.vsock_gcc_command(str(tmp_path / "vsock"))

    result = subprocess.run(command, capture_output=True, text=True, timeout=120)

    assert (result.returncode, result.stderr) == (0, "")


def test_tool_is_static_so_it_runs_without_a_dynamic_loader_in_the_guest(tool):
    with open(tool, "rb") as f:
        elf = f.read()

    phoff, = struct.unpack_from("<Q", elf, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", elf, 0x36)
    types = [struct.unpack_from("<I", elf, phoff + i * phentsize)[0] for i in range(phnum)]

    assert elf[:4] == b"\x7fELF"
    assert 3 not in types   # PT_INTERP: the guest has no ld.so


def test_no_arguments_prints_usage_and_exits_2(tool):
    result = subprocess.run([tool], capture_output=True, text=True, timeout=TIMEOUT)

    assert result.returncode == 2
    assert result.stderr.startswith(USAGE_START)


@pytest.mark.parametrize("args", [
    ["1"], ["1", "2", "3"], ["-l"], ["-l", "1", "2"], ["-e", "1", "2"], ["-l", "5", "-n", "1"],
    ["-l", "5", "-e", "-n", "0"], ["-l", "x"], ["1", "9x"], ["-1", "9"], ["-s", "soon", "1", "2"],
    ["-x", "1", "2"],
], ids=" ".join)
def test_bad_arguments_print_usage_and_exit_2(tool, args):
    result = subprocess.run([tool, *args], capture_output=True, text=True, timeout=TIMEOUT)

    assert result.returncode == 2
    assert result.stderr.startswith(USAGE_START)


def test_connect_with_nobody_listening_fails_with_one_line_and_exit_1(tool):
    # Without vsock loopback connect still fails (a timeout or "no such device"), or,
    # where AF_VSOCK is missing altogether, socket() does.
    result = subprocess.run([tool, "1", "9"], capture_output=True, text=True, timeout=TIMEOUT)

    assert result.returncode == 1
    assert result.stderr.startswith(("vsock: connect 1:9: ", "vsock: socket: "))
    assert result.stderr.count("\n") == 1


@needs_loopback
def test_echo_server_sends_back_a_mebibyte_a_client_sent(listener):
    port = free_port()
    payload = os.urandom(1 << 20)
    listener("-l", str(port), "-e", "-n", "1")

    received = exchange(port, payload)

    assert received == payload


@needs_loopback
def test_echo_server_with_n_1_exits_0_once_its_connection_is_served(listener):
    port = free_port()
    server = listener("-l", str(port), "-e", "-n", "1")

    exchange(port, b"one connection")

    assert server.wait(timeout=TIMEOUT) == 0


@needs_loopback
def test_listener_writes_what_a_client_sent_to_stdout(listener, tmp_path):
    port = free_port()
    payload = os.urandom(1 << 20)
    out = tmp_path / "received"
    with open(out, "wb") as stdout:
        server = listener("-l", str(port), stdin=subprocess.DEVNULL, stdout=stdout)

    exchange(port, payload)

    assert server.wait(timeout=TIMEOUT) == 0
    assert hashlib.sha256(out.read_bytes()).hexdigest() == hashlib.sha256(payload).hexdigest()


def test_initramfs_has_the_tool_as_executable_bin_vsock(tmp_path):
    cpio = builder.build(str(tmp_path / "initramfs.cpio"))

    with open(cpio, "rb") as f:
        mode, contents = cpio_entries(f.read())["bin/vsock"]

    assert mode == stat.S_IFREG | 0o755
    assert contents.startswith(b"\x7fELF")
