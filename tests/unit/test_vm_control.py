"""The control socket: `crosvm stop` against a listening VMM (no VM needed)."""

from __future__ import annotations

import os
import socket

import pytest

from crosvm.cli.main import main
from crosvm.vm_control import ControlError, ControlServer, handle_request, socket_path


@pytest.fixture
def server(tmp_path):
    calls = []
    srv = ControlServer(str(tmp_path / "vm.sock"), {"Exit": lambda: calls.append("Exit") or "Ok"})
    srv.start()
    yield srv, calls
    srv.close()


def test_exit_request_runs_handler_and_answers_ok(server):
    srv, calls = server

    response = handle_request("Exit", srv.path)

    assert response == "Ok"
    assert calls == ["Exit"]


def test_unsupported_request_gets_errstring(server):
    srv, calls = server

    response = handle_request({"BalloonCommand": {"Adjust": {"num_bytes": 1}}}, srv.path)

    assert response == {"ErrString": "unsupported request 'BalloonCommand'"}
    assert calls == []


def test_malformed_request_gets_errstring_and_server_keeps_serving(server):
    srv, _ = server
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as s:
        s.connect(srv.path)
        s.send(b"\xff{not json")
        bad = s.recv(4096)

    assert bad == b'{"ErrString": "malformed request"}'
    assert handle_request("Exit", srv.path) == "Ok"


def test_directory_gets_crosvm_pid_sock_inside(tmp_path):
    assert socket_path(str(tmp_path)) == str(tmp_path / f"crosvm-{os.getpid()}.sock")


def test_close_removes_the_socket_file(tmp_path):
    srv = ControlServer(str(tmp_path / "vm.sock"), {})
    srv.start()

    srv.close()

    assert not os.path.exists(tmp_path / "vm.sock")


def test_crosvm_stop_exits_0_when_the_vm_accepts(server):
    srv, calls = server

    code = main(["stop", srv.path])

    assert code == 0
    assert calls == ["Exit"]


def test_crosvm_stop_without_a_vm_exits_1_naming_the_socket(tmp_path, capsys):
    code = main(["stop", str(tmp_path / "missing.sock")])

    assert code == 1
    assert "missing.sock" in capsys.readouterr().err


def test_crosvm_stop_needs_exactly_one_socket():
    assert main(["stop"]) == 35


def test_client_reports_unreachable_socket(tmp_path):
    with pytest.raises(ControlError, match="cannot reach the VM"):
        handle_request("Exit", str(tmp_path / "nothing"))


def test_socket_path_too_long_is_a_clear_error(tmp_path):
    with pytest.raises(OSError, match="control socket .*too long"):
        ControlServer(str(tmp_path / ("s" * 120)), {})
