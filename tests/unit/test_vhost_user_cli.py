"""`--vhost-user TYPE,socket=PATH` and crosvm's older per-type spellings."""

from __future__ import annotations

import os

import pytest

from crosvm.cli.main import main
from crosvm.config import ConfigError, VhostUserOption
from tests.unit.test_cli_config import config_from


def test_vhost_user_takes_the_type_first_and_the_socket():
    cfg = config_from(["--vhost-user", "block,socket=/run/b.sock,max-queue-size=128", "k"])

    assert cfg.vhost_user == [VhostUserOption("block", "/run/b.sock", 128, None)]


@pytest.mark.parametrize("option, kind", [("--vhost-user-blk", "block"),
                                          ("--vhost-user-net", "net"),
                                          ("--vhost-user-console", "console"),
                                          ("--vhost-user-vsock", "vsock")])
def test_older_per_type_options_mean_vhost_user_of_that_type(option, kind):
    cfg = config_from([option, "/run/x.sock", "k"])

    assert cfg.vhost_user == [VhostUserOption(kind, "/run/x.sock")]


def test_vhost_user_fs_takes_socket_and_tag():
    cfg = config_from(["--vhost-user-fs", "/run/f.sock:myfs", "k"])

    assert cfg.vhost_user == [VhostUserOption("fs", "/run/f.sock", None, "myfs")]


def test_vhost_user_devices_keep_their_order():
    cfg = config_from(["--vhost-user", "net,socket=/a", "--vhost-user-blk", "/b", "k"])

    assert [(d.type, d.socket) for d in cfg.vhost_user] == [("net", "/a"), ("block", "/b")]


def test_vhost_user_queue_size_must_be_a_power_of_two():
    cfg = config_from(["--vhost-user", "block,socket=/s,max-queue-size=100", "k"])

    with pytest.raises(ConfigError, match="power of two"):
        cfg.validate()


def test_vhost_user_tag_is_only_for_fs():
    cfg = config_from(["--vhost-user", "block,socket=/s,tag=x", "k"])

    with pytest.raises(ConfigError, match="tag= is for type fs"):
        cfg.validate()


@pytest.mark.parametrize("args, words", [
    (["--vhost-user", "gpu,socket=/s"], "gpu"),
    (["--vhost-user", "block"], "socket"),
    (["--vhost-user-fs", "/s"], "SOCK:TAG"),
])
def test_bad_vhost_user_exits_35_with_one_line(args, words, capsys):
    code = main(["run", *args, "k"])

    err = capsys.readouterr().err
    assert code == 35
    assert words in err and err.count("\n") == 1


@pytest.mark.skipif(not os.access("/dev/kvm", os.R_OK | os.W_OK), reason="needs /dev/kvm")
def test_unreachable_backend_exits_1_naming_the_socket(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("crosvm.devices.virtio.vhost_user.CONNECT_TIMEOUT", 0.1)
    kernel = tmp_path / "k"
    kernel.write_bytes(b"\x7fELF")
    sock = tmp_path / "none.sock"

    code = main(["run", "--disable-sandbox", "--vhost-user", f"block,socket={sock}",
                 str(kernel)])

    err = capsys.readouterr().err
    assert code == 1
    assert f"vhost-user socket {sock}" in err
