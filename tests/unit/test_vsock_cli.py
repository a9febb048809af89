"""`--vsock` and crosvm's deprecated --cid/--vhost-vsock-device/--vhost-vsock-fd: parsing,
merging and validation."""

from __future__ import annotations

import json

import pytest

from crosvm.cli.main import UsageError, main, parse_run_args
from crosvm.config import ConfigError, VsockOption
from tests.unit.test_cli_config import config_from


@pytest.fixture
def warnings(monkeypatch):
    import crosvm.cli.main as cli_main
    seen = []
    monkeypatch.setattr(cli_main.log, "warning", lambda msg, *a: seen.append(msg % a))
    return seen


def test_no_vsock_by_default():
    assert config_from(["k"]).vsock is None


def test_vsock_cid_uses_dev_vhost_vsock():
    cfg = config_from(["--vsock", "cid=3", "k"])

    assert cfg.vsock == VsockOption(cid=3, device="/dev/vhost-vsock", uds_path=None)


def test_vsock_cid_key_may_be_omitted():
    cfg = config_from(["--vsock", "3", "k"])

    assert cfg.vsock == VsockOption(cid=3, device="/dev/vhost-vsock")


def test_vsock_cid_may_be_hex_like_any_crosvm_number():
    assert config_from(["--vsock", "cid=0x10", "k"]).vsock.cid == 16


def test_vsock_with_device():
    cfg = config_from(["--vsock", "cid=3,device=/dev/x", "k"])

    assert cfg.vsock == VsockOption(cid=3, device="/dev/x")


def test_vsock_with_uds_path_has_no_vhost_device():
    cfg = config_from(["--vsock", "cid=5,uds-path=/tmp/v.sock", "k"])

    assert cfg.vsock == VsockOption(cid=5, device=None, uds_path="/tmp/v.sock")


def test_vsock_with_uds_path_in_a_directory_of_its_own_validates(tmp_path):
    cfg = config_from(["--vsock", f"cid=5,uds-path={tmp_path}/v.sock", "k"])

    cfg.validate()


@pytest.mark.parametrize("path, message", [
    ("/tmp/v.sock", "shared with other programs"),      # sticky, world-writable
    ("/v.sock", "shared with other programs"),          # the whole host
    ("{tmp}/vm_12", "ends in _<number>"),               # another VM's guest port
])
def test_vsock_uds_path_the_device_could_misuse_is_refused(tmp_path, path, message):
    cfg = config_from(["--vsock", f"cid=5,uds-path={path.format(tmp=tmp_path)}", "k"])

    with pytest.raises(ConfigError, match=message):
        cfg.validate()


def test_vsock_from_a_config_file(tmp_path):
    (tmp_path / "vm.json").write_text(json.dumps({"vsock": {"cid": 7, "uds-path": "/tmp/s"}}))

    cfg = config_from(["--cfg", str(tmp_path / "vm.json"), "k"])

    assert cfg.vsock == VsockOption(cid=7, uds_path="/tmp/s")


def test_vsock_on_the_command_line_replaces_the_config_files(tmp_path):
    (tmp_path / "vm.json").write_text(json.dumps({"vsock": {"cid": 7}}))

    cfg = config_from(["--cfg", str(tmp_path / "vm.json"), "--vsock", "cid=9", "k"])

    assert cfg.vsock == VsockOption(cid=9)


def test_vsock_given_twice_is_a_usage_error():
    with pytest.raises(UsageError, match="option --vsock given more than once"):
        parse_run_args(["--vsock", "cid=3", "--vsock", "cid=4", "k"])


def test_deprecated_cid_is_vsock_cid_and_warns(warnings):
    cfg = config_from(["--cid", "4", "k"])

    assert (cfg.vsock, warnings) == (VsockOption(cid=4, device="/dev/vhost-vsock"),
                                     ["--cid is deprecated, use --vsock cid=N"])


def test_deprecated_cid_with_vhost_vsock_device(warnings):
    cfg = config_from(["--cid", "4", "--vhost-vsock-device", "/dev/y", "k"])

    assert (cfg.vsock, warnings[1]) == (
        VsockOption(cid=4, device="/dev/y"),
        "--vhost-vsock-device is deprecated, use --vsock cid=N,device=PATH")


def test_deprecated_cid_with_vhost_vsock_fd_opens_proc_self_fd(warnings):
    cfg = config_from(["--cid", "4", "--vhost-vsock-fd", "7", "k"])

    assert (cfg.vsock, warnings[1]) == (
        VsockOption(cid=4, device="/proc/self/fd/7"),
        "--vhost-vsock-fd is deprecated, use --vsock cid=N,device=/proc/self/fd/FD")


def test_deprecated_vsock_options_are_not_config_file_keys(tmp_path):
    (tmp_path / "vm.json").write_text(json.dumps({"cid": 4}))

    with pytest.raises(Exception, match="unknown option `cid`"):
        config_from(["--cfg", str(tmp_path / "vm.json"), "k"])


def test_run_help_lists_vsock_its_keys_and_the_deprecated_options(capsys):
    assert main(["run", "--help"]) == 0
    out = capsys.readouterr().out

    assert [s for s in ("--vsock cid=N", "cid=int", "device=path", "uds-path=path",
                        "--cid N", "--vhost-vsock-device PATH", "--vhost-vsock-fd FD")
            if s not in out] == []


def long_uds_path(tmp_path, size):
    return str(tmp_path) + "/" + "s" * (size - len(str(tmp_path)) - 1)


def test_uds_path_of_96_bytes_fits(tmp_path):
    path = long_uds_path(tmp_path, 96)

    config_from(["--vsock", f"cid=3,uds-path={path}", "k"]).validate()


@pytest.mark.parametrize("args, message", [
    (["--vsock", "cid=2"], r"invalid cid 2: a guest CID is between 3 and 4294967294 "
                           r"\(0, 1, 2 and 4294967295 are reserved\)"),
    (["--vsock", "cid=0"], "invalid cid 0"),
    (["--vsock", "cid=4294967295"], "invalid cid 4294967295"),
    (["--vsock", "cid=4294967296"], "invalid cid 4294967296"),
    (["--vsock", "cid=-3"], "invalid cid -3"),
    (["--vsock", "cid=3,device=/dev/x,uds-path=/tmp/v.sock"],
     "device= and uds-path= cannot both be given"),
    (["--vsock", "cid=3,uds-path="], "uds-path= must not be empty"),
    (["--vsock", "cid=3,device="], "device= must not be empty"),
    (["--vsock", "cid=3,uds-path=/nonexistent-dir/v.sock"],
     "the directory of uds-path /nonexistent-dir/v.sock, /nonexistent-dir, does not exist"),
    (["--cid", "2"], "invalid cid 2"),
])
def test_invalid_vsock_options_are_config_errors(args, message):
    cfg = config_from(args + ["k"])

    with pytest.raises(ConfigError, match=message):
        cfg.validate()


def test_uds_path_under_a_file_is_refused(tmp_path):
    (tmp_path / "f").write_text("")
    cfg = config_from(["--vsock", f"cid=3,uds-path={tmp_path}/f/v.sock", "k"])

    with pytest.raises(ConfigError, match=f"directory of uds-path {tmp_path}/f/v.sock, "
                                          f"{tmp_path}/f, is not a directory"):
        cfg.validate()


def test_uds_path_of_97_bytes_is_too_long_for_the_port_suffix(tmp_path):
    cfg = config_from(["--vsock", f"cid=3,uds-path={long_uds_path(tmp_path, 97)}", "k"])

    with pytest.raises(ConfigError, match=r"is 97 bytes; it must be at most 96 so that PATH "
                                          r"plus a `_<port>` suffix \(up to 11 bytes\) fits "
                                          r"a Unix socket address \(107 bytes\)"):
        cfg.validate()


@pytest.mark.parametrize("args, message", [
    (["--vsock", "cid=three"], "--vsock: invalid number 'three'"),
    (["--vsock", "three"], "--vsock: invalid number 'three'"),
    (["--vsock", "cid=3,port=5"], "--vsock: unknown field `port`, expected one of `cid`, "
                                  "`device`, `uds-path`"),
    (["--cid", "x"], "--cid: invalid number 'x'"),
    (["--cid", "3", "--cid", "4"], "option --cid given more than once"),
])
def test_malformed_vsock_options_are_usage_errors(args, message):
    with pytest.raises(UsageError, match=message):
        parse_run_args(args + ["k"])


def test_vsock_without_cid_names_the_missing_field():
    with pytest.raises(Exception, match="vsock: missing field `cid`"):
        config_from(["--vsock", "device=/dev/x", "k"])


@pytest.mark.parametrize("args, message", [
    (["--vhost-vsock-fd", "7"], r"--vhost-vsock-fd needs --cid too \(or use --vsock "
                                r"cid=N,device=PATH\)"),
    (["--vhost-vsock-device", "/dev/y"], "--vhost-vsock-device needs --cid too"),
    (["--vsock", "cid=3", "--cid", "4"],
     "--cid and --vsock cannot be given together; use --vsock only"),
    (["--cid", "4", "--vhost-vsock-device", "/dev/y", "--vhost-vsock-fd", "7"],
     "only one of --vhost-vsock-device and --vhost-vsock-fd may be given"),
    (["--cid", "4", "--vhost-vsock-fd", "-1"], "invalid --vhost-vsock-fd -1"),
])
def test_invalid_deprecated_vsock_combinations_are_config_errors(args, message):
    with pytest.raises(ConfigError, match=message):
        config_from(args + ["k"])


def test_main_returns_35_for_a_reserved_cid(capsys):
    assert main(["run", "--vsock", "cid=2", "k"]) == 35
    assert "invalid cid 2" in capsys.readouterr().err
