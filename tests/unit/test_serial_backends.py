"""Host ends of serial ports: file, unix datagram socket, input files."""

import os
import socket

import pytest

from crosvm.config import SerialParameters
from crosvm.devices.serial_device import SerialError, SyslogOutput, open_input, open_output


def test_file_output_appends(tmp_path):
    path = tmp_path / "out.log"
    path.write_bytes(b"old\n")
    out = open_output(SerialParameters(type="file", path=str(path)))

    out.write(b"new")
    out.close()

    assert path.read_bytes() == b"old\nnew"


def test_out_timestamp_prefixes_each_line(tmp_path):
    path = tmp_path / "out.log"
    out = open_output(SerialParameters(type="file", path=str(path), out_timestamp=True))

    out.write(b"a\nb\n")
    out.close()

    lines = path.read_bytes().splitlines()
    assert len(lines) == 2 and all(line.startswith(b"[") for line in lines)
    assert lines[0].endswith(b"] a") and lines[1].endswith(b"] b")


def test_sink_has_no_output():
    assert open_output(SerialParameters(type="sink")) is None


def test_unix_output_sends_datagrams_and_reads_input(tmp_path):
    path = str(tmp_path / "sock")
    peer = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    peer.bind(path)
    params = SerialParameters(type="unix", path=path)
    out = open_output(params)
    in_fd = open_input(params, out)

    out.write(b"hello")
    data, addr = peer.recvfrom(100)
    peer.sendto(b"typed", addr)

    assert data == b"hello"
    assert os.read(in_fd, 100) == b"typed"
    peer.close()
    out.close()


def test_unix_output_without_listener_is_clear_error(tmp_path):
    with pytest.raises(SerialError, match="failed to connect to unix socket"):
        open_output(SerialParameters(type="unix", path=str(tmp_path / "absent")))


def test_input_file_is_opened_for_reading(tmp_path):
    path = tmp_path / "in"
    path.write_bytes(b"typed")

    fd = open_input(SerialParameters(input=str(path)), None)

    assert os.read(fd, 10) == b"typed"
    os.close(fd)


def test_missing_input_file_is_clear_error(tmp_path):
    with pytest.raises(SerialError, match="failed to open serial1 input"):
        open_input(SerialParameters(input=str(tmp_path / "absent")), None)


def test_syslog_output_sends_tagged_lines_on_its_own_socket(tmp_path):
    path = str(tmp_path / "log")
    daemon = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    daemon.bind(path)
    out = SyslogOutput("crosvm[serial1]", path)

    out.write(b"hello\nrest")

    assert daemon.recv(256) == b"<14>crosvm[serial1]: hello"
    out.close()
    daemon.close()


def test_syslog_output_without_a_daemon_writes_to_stderr(tmp_path, capfd):
    out = SyslogOutput("crosvm[serial1]", str(tmp_path / "no-log"))

    out.write(b"hello\n")

    assert capfd.readouterr().err.endswith("crosvm[serial1]: hello\n")


def test_syslog_output_without_newlines_does_not_grow_without_bound(tmp_path):
    out = SyslogOutput("serial1", str(tmp_path / "no-daemon"))
    out.sock = None
    stderr = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)  # the no-daemon fallback writes to stderr
    try:
        for _ in range(1000):
            out.write(b"x" * 100)
    finally:
        os.dup2(stderr, 2)
        os.close(stderr)
        os.close(devnull)

    assert len(out._buf) <= 2048
