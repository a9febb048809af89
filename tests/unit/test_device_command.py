"""`crosvm device block --socket PATH --file IMAGE[,ro]`: its command line."""

from __future__ import annotations

import pytest

from crosvm.cli.device_command import DeviceUsageError, parse
from crosvm.cli.main import main


def test_device_block_takes_socket_and_file():
    assert parse(["block", "--socket", "/run/b.sock", "--file", "d.img"]) == (
        "block", "/run/b.sock", "d.img", False)


def test_device_block_file_may_be_read_only_and_socket_path_is_an_alias():
    assert parse(["block", "--socket-path=/s", "--file=d.img,ro"]) == ("block", "/s", "d.img",
                                                                       True)


@pytest.mark.parametrize("args, words", [
    (["gpu", "--socket", "/s"], "unsupported device type 'gpu'"),
    (["block", "--file", "d.img"], "--socket PATH is required"),
    (["block", "--socket", "/s", "--file", "d.img,rw"], "expected IMAGE or IMAGE,ro"),
    (["block", "--socket"], "needs a value"),
    (["block", "--socket", "/a", "--socket", "/b", "--file", "d"], "given twice"),
    (["block", "--bogus", "1"], "unknown option --bogus"),
])
def test_bad_device_command_line_is_refused(args, words):
    with pytest.raises(DeviceUsageError, match=words):
        parse(args)


def test_bad_device_command_exits_35_with_one_line(capsys):
    code = main(["device", "block", "--file", "d.img"])

    err = capsys.readouterr().err
    assert (code, err.count("\n"), "--socket PATH is required" in err) == (35, 1, True)


def test_missing_image_exits_35_naming_it(tmp_path, capsys):
    code = main(["device", "block", "--socket", str(tmp_path / "s"),
                 "--file", str(tmp_path / "none.img")])

    err = capsys.readouterr().err
    assert code == 35 and "none.img" in err
