"""`--shared-dir SRC:TAG[:key=value...]`: crosvm's colon syntax, defaults, validation
and the exit code of a bad one."""

from __future__ import annotations

import json
import os

import pytest

from crosvm.cli.main import main
from crosvm.config import ConfigError, SharedDirOption, parse_shared_dir
from tests.unit.test_cli_config import config_from


def test_shared_dir_defaults_to_9p_with_crosvm_defaults(tmp_path):
    cfg = config_from(["--shared-dir", f"{tmp_path}:tag", "k"])

    assert cfg.shared_dirs == [SharedDirOption(
        src=str(tmp_path), tag="tag", type="p9", uidmap=f"0 {os.geteuid()} 1",
        gidmap=f"0 {os.getegid()} 1", uid=0, gid=0, cache="auto", timeout=5.0,
        writeback=False, posix_acl=True, ascii_casefold=False, negative_timeout=None)]


def test_shared_dir_fs_options_are_parsed():
    opt = parse_shared_dir("/s:t:type=fs:cache=always:timeout=2:writeback=true:"
                           "posix_acl=false:negative_timeout=3")

    assert (opt.type, opt.cache, opt.timeout, opt.writeback, opt.posix_acl,
            opt.negative_timeout) == ("fs", "always", 2.0, True, False, 3.0)


def test_shared_dir_maps_and_identity_are_parsed():
    opt = parse_shared_dir("/s:t:uidmap=5000 1234 1:gidmap=6000 1235 1:uid=5000:gid=6000")

    assert (opt.uidmap, opt.gidmap, opt.uid, opt.gid) == ("5000 1234 1", "6000 1235 1",
                                                          5000, 6000)


def test_shared_dir_bare_ascii_casefold_means_true():
    assert parse_shared_dir("/s:t:type=fs:ascii_casefold").ascii_casefold is True


def test_shared_dir_repeats(tmp_path):
    cfg = config_from(["--shared-dir", f"{tmp_path}:a", "--shared-dir", f"{tmp_path}:b:type=fs",
                       "k"])

    assert [(d.tag, d.type) for d in cfg.shared_dirs] == [("a", "p9"), ("b", "fs")]


def test_shared_dir_from_a_config_file(tmp_path):
    cfg_file = tmp_path / "vm.json"
    cfg_file.write_text(json.dumps({"shared-dir": [f"{tmp_path}:cfgtag:type=fs"]}))

    cfg = config_from(["--cfg", str(cfg_file), "k"])

    assert [(d.tag, d.type) for d in cfg.shared_dirs] == [("cfgtag", "fs")]


@pytest.mark.parametrize("text, names", [
    ("/s", "SRC:TAG"),
    ("/s:", "SRC:TAG"),
    ("/s:t:type=nfs", "type=nfs"),
    ("/s:t:cache=sometimes", "cache=sometimes"),
    ("/s:t:uidmap=0 0", "uidmap"),
    ("/s:t:uidmap=0 0 1,0 1 1", "overlap"),
    ("/s:t:timeout=soon", "timeout=soon"),
    ("/s:t:timeout=nan", "timeout=nan"),
    ("/s:t:negative_timeout=inf", "negative_timeout=inf"),
    ("/s:t:uidmap=\u00b2 0 1", "uidmap"),
    ("/s:t:writeback=yes", "writeback=yes"),
    ("/s:t:uid=-1", "uid=-1"),
    ("/s:t:colour=blue", "colour"),
    ("/s:t:cache=auto:cache=never", "more than once"),
    ("/s:t:ascii_casefold:negative_timeout=1", "cannot be used together"),
])
def test_bad_shared_dir_is_refused_naming_the_problem(text, names):
    with pytest.raises(ConfigError, match=names):
        parse_shared_dir(text)


@pytest.mark.parametrize("suffix, names", [
    (":t:type=fs:dax=true", "dax"),
    (":" + "t" * 37 + ":type=fs", "longer than 36"),
    (":t:uid=7", "uid=7 is not mapped"),
    (":t:gid=7", "gid=7 is not mapped"),
])
def test_shared_dir_validation_names_the_problem(tmp_path, suffix, names):
    cfg = config_from(["--shared-dir", f"{tmp_path}{suffix}", "k"])

    with pytest.raises(ConfigError, match=names):
        cfg.validate()


def test_shared_dir_missing_source_is_refused(tmp_path):
    cfg = config_from(["--shared-dir", f"{tmp_path}/nope:t", "k"])

    with pytest.raises(ConfigError, match="does not exist"):
        cfg.validate()


def test_shared_dir_tag_used_twice_is_refused(tmp_path):
    cfg = config_from(["--shared-dir", f"{tmp_path}:t", "--shared-dir", f"{tmp_path}:t", "k"])

    with pytest.raises(ConfigError, match="used twice"):
        cfg.validate()


def test_bad_shared_dir_exits_35_with_one_line(tmp_path, capsys):
    code = main(["run", "--shared-dir", f"{tmp_path}:t:cache=sometimes", str(tmp_path / "k")])

    err = capsys.readouterr().err
    assert (code, err.count("\n"), "cache=sometimes" in err) == (35, 1, True)
