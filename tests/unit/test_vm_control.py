"""The control socket: `crosvm stop` against a listening VMM (no VM needed)."""

from __future__ import annotations

import os
import socket
import threading

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

    assert b"malformed request" in bad
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


# --- issue 10: no client can disable the control socket --------------------------------

def raw_exchange(path: str, payload: bytes) -> bytes:
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as s:
        s.settimeout(30)
        s.connect(path)
        s.send(payload)
        return s.recv(1 << 20)


def test_request_of_1000_brackets_gets_errstring_and_stop_still_works(server):
    srv, calls = server

    bad = raw_exchange(srv.path, b"[" * 1000)

    assert b"ErrString" in bad
    assert handle_request("Exit", srv.path) == "Ok"
    assert calls == ["Exit"]


def test_deeply_nested_valid_json_request_is_refused(server):
    srv, _ = server

    bad = raw_exchange(srv.path, b"[" * 5000 + b"]" * 5000)

    assert b"nest" in bad


def test_oversized_request_is_refused_and_server_keeps_serving(server):
    srv, calls = server
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
        s.connect(srv.path)
        s.send(b'"' + b"a" * (1 << 20) + b'"')
        bad = s.recv(4096)

    assert b"too large" in bad
    assert handle_request("Exit", srv.path) == "Ok"


def test_silent_clients_do_not_delay_stop(server):
    srv, calls = server
    silent = []
    for _ in range(4):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        s.connect(srv.path)
        silent.append(s)
    try:
        code = main(["stop", srv.path])
    finally:
        for s in silent:
            s.close()

    assert code == 0
    assert calls == ["Exit"]


def test_more_clients_than_the_limit_still_let_stop_through(server):
    srv, calls = server
    from crosvm.vm_control.server import MAX_CLIENTS
    silent = []
    try:
        for _ in range(MAX_CLIENTS + 4):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            s.connect(srv.path)
            silent.append(s)
        response = handle_request("Exit", srv.path)
    finally:
        for s in silent:
            s.close()

    assert response == "Ok"


def test_handler_that_raises_gets_errstring_and_server_survives(tmp_path):
    def broken():
        raise RuntimeError("boom")

    srv = ControlServer(str(tmp_path / "vm.sock"), {"Exit": broken, "Powerbtn": lambda: "Ok"})
    srv.start()
    try:
        first = handle_request("Exit", srv.path)
        second = handle_request("Powerbtn", srv.path)
    finally:
        srv.close()

    assert "ErrString" in first and "boom" in first["ErrString"]
    assert second == "Ok"


def test_struct_variant_payload_reaches_its_handler(tmp_path):
    seen = []
    srv = ControlServer(str(tmp_path / "vm.sock"),
                        {"DiskCommand": lambda payload: seen.append(payload) or "Ok"})
    srv.start()
    try:
        response = handle_request({"DiskCommand": {"disk_index": 0}}, srv.path)
    finally:
        srv.close()

    assert response == "Ok"
    assert seen == [{"disk_index": 0}]


def fake_vm(path: str, reply: bytes) -> threading.Thread:
    """A listener that answers any one request with `reply`."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind(path)
    listener.listen(1)

    def serve():
        conn, _ = listener.accept()
        with conn, listener:
            conn.recv(4096)
            conn.send(reply)

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    return t


def test_crosvm_stop_against_deeply_nested_response_is_one_line_exit_1(tmp_path, capsys):
    path = str(tmp_path / "evil.sock")
    fake_vm(path, b"[" * 5000 + b"]" * 5000)

    code = main(["stop", path])

    err = capsys.readouterr().err.splitlines()
    assert code == 1
    assert len(err) == 1 and "evil.sock" in err[0]


def test_stale_socket_file_is_replaced(tmp_path):
    path = str(tmp_path / "vm.sock")
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    dead.bind(path)
    dead.close()  # the file stays, as after a SIGKILL

    srv = ControlServer(path, {"Exit": lambda: "Ok"})
    srv.start()
    try:
        response = handle_request("Exit", path)
    finally:
        srv.close()

    assert response == "Ok"


def test_live_socket_of_another_vm_is_not_taken_over(server, tmp_path):
    srv, _ = server

    with pytest.raises(OSError, match="another VM"):
        ControlServer(srv.path, {})


def test_socket_path_that_is_a_regular_file_is_refused(tmp_path):
    path = tmp_path / "file"
    path.write_text("keep me")

    with pytest.raises(OSError, match="not a socket"):
        ControlServer(str(path), {})
    assert path.read_text() == "keep me"
