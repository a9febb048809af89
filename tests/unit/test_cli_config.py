"""Command-line parsing, --cfg merging and crosvm's serial rules."""

import json
import os

import pytest

from crosvm.cli.config_file import ConfigFileError, build_config, load_cfg, merge
from crosvm.cli.main import UsageError, main, parse_run_args
from crosvm.config import Config, ConfigError, SerialParameters, validate_serial
from crosvm.vmm.run import kernel_cmdline


def config_from(args):
    values, cfgs = parse_run_args(args)
    merged = {}
    for c in cfgs:
        merged = merge(merged, load_cfg(c))
    return build_config(merge(merged, values))


def test_mem_cpus_params_initrd_and_kernel():
    cfg = config_from(["--mem", "512", "-c", "2", "-p", "a=1", "--params", "b", "-i", "rd",
                       "vmlinux"])

    assert (cfg.mem_mib, cfg.cpus, cfg.params, cfg.initrd, cfg.kernel) == (
        512, 2, ["a=1", "b"], "rd", "vmlinux")


def test_keyed_forms_and_equals_syntax():
    cfg = config_from(["--mem=size=1024", "--cpus", "num-cores=3", "k"])

    assert (cfg.mem_mib, cfg.cpus) == (1024, 3)


def test_unknown_option_is_usage_error():
    with pytest.raises(UsageError, match="unrecognized argument: --frobnicate"):
        parse_run_args(["--frobnicate", "k"])


def test_main_returns_35_on_unknown_option(capsys):
    assert main(["run", "--frobnicate", "k"]) == 35
    assert "unrecognized argument: --frobnicate" in capsys.readouterr().err


def test_main_returns_35_on_unknown_command():
    assert main(["frobnicate"]) == 35


def test_version_prints_version(capsys):
    assert main(["version"]) == 0
    assert capsys.readouterr().out.startswith("crosvm ")


def test_run_help_documents_every_serial_key(capsys):
    assert main(["run", "--help"]) == 0
    out = capsys.readouterr().out
    for key in ("type=", "hardware=", "num=", "path=", "input=", "console=", "earlycon=",
                "stdin=", "out-timestamp="):
        assert key in out


def test_serial_option_builds_parameters():
    cfg = config_from(["--serial", "type=file,path=/tmp/x,num=2,console", "k"])

    assert cfg.serial == [SerialParameters(type="file", path="/tmp/x", num=2, console=True)]


def test_hypervisor_variant_sets_device():
    cfg = config_from(["--hypervisor", "kvm[device=/dev/other]", "k"])

    assert cfg.hypervisor_device == "/dev/other"


def test_hypervisor_unknown_variant_rejected():
    with pytest.raises(UsageError, match="unknown variant `xen`"):
        parse_run_args(["--hypervisor", "xen", "k"])


def test_single_value_option_given_twice_is_rejected():
    with pytest.raises(UsageError, match="given more than once"):
        parse_run_args(["--mem", "1", "--mem", "2", "k"])


def test_cfg_file_values_used(tmp_path):
    f = tmp_path / "vm.json"
    f.write_text(json.dumps({"kernel": "/k", "cpus": {"num-cores": 4}, "mem": {"size": 2048},
                             "serial": [{"type": "stdout", "console": True}]}))

    cfg = config_from(["--cfg", str(f)])

    assert (cfg.kernel, cfg.cpus, cfg.mem_mib) == ("/k", 4, 2048)
    assert cfg.serial == [SerialParameters(type="stdout", console=True)]


def test_command_line_overrides_scalars_and_extends_lists(tmp_path):
    f = tmp_path / "vm.json"
    f.write_text(json.dumps({"kernel": "/k", "mem": {"size": 2048}, "params": ["a"]}))

    cfg = config_from(["--mem", "512", "--params", "b", "--cfg", str(f)])

    assert cfg.mem_mib == 512
    assert cfg.params == ["a", "b"]


def test_included_files_apply_first_and_parent_wins(tmp_path):
    (tmp_path / "base.json").write_text(json.dumps({"mem": {"size": 1}, "params": ["base"]}))
    (tmp_path / "more.json").write_text(json.dumps({"mem": {"size": 2}, "params": ["more"]}))
    (tmp_path / "vm.json").write_text(json.dumps(
        {"mem": {"size": 3}, "cfg": ["base.json", "more.json"], "params": ["top"]}))

    values = load_cfg(str(tmp_path / "vm.json"))

    assert values["mem"] == {"size": 3}
    assert values["params"] == ["base", "more", "top"]


def test_later_cfg_overrides_earlier(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps({"kernel": "/a", "cpus": {"num-cores": 2}}))
    (tmp_path / "b.json").write_text(json.dumps({"cpus": {"num-cores": 3}}))

    cfg = config_from(["--cfg", str(tmp_path / "a.json"), "--cfg", str(tmp_path / "b.json")])

    assert (cfg.kernel, cfg.cpus) == ("/a", 3)


def test_cfg_unknown_key_is_error(tmp_path):
    (tmp_path / "vm.json").write_text(json.dumps({"frobnicate": 1}))

    with pytest.raises(ConfigFileError, match="unknown option `frobnicate`"):
        load_cfg(str(tmp_path / "vm.json"))


def test_cfg_unknown_nested_key_is_error(tmp_path):
    (tmp_path / "vm.json").write_text(json.dumps({"mem": {"bytes": 1}}))

    with pytest.raises(ConfigFileError, match="unknown field `bytes`"):
        load_cfg(str(tmp_path / "vm.json"))


def test_cfg_invalid_json_names_line(tmp_path):
    (tmp_path / "vm.json").write_text('{\n "kernel": }')

    with pytest.raises(ConfigFileError, match="invalid JSON at line 2"):
        load_cfg(str(tmp_path / "vm.json"))


def test_cfg_include_loop_is_error(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps({"cfg": ["b.json"]}))
    (tmp_path / "b.json").write_text(json.dumps({"cfg": ["a.json"]}))

    with pytest.raises(ConfigFileError, match="loop"):
        load_cfg(str(tmp_path / "a.json"))


def test_cfg_file_cannot_hold_cli_only_option(tmp_path):
    (tmp_path / "vm.json").write_text(json.dumps({"kvm-device": "/dev/kvm"}))

    with pytest.raises(ConfigFileError, match="unknown option `kvm-device`"):
        load_cfg(str(tmp_path / "vm.json"))


@pytest.mark.parametrize("ports, message", [
    ([SerialParameters(num=1), SerialParameters(num=1)], "more than once"),
    ([SerialParameters(num=1, console=True), SerialParameters(num=2, console=True)],
     "only one port can be the console"),
    ([SerialParameters(num=1, stdin=True), SerialParameters(num=2, stdin=True)],
     "only one port can read stdin"),
    ([SerialParameters(num=1, earlycon=True), SerialParameters(num=2, earlycon=True)],
     "only one port can be earlycon"),
    ([SerialParameters(num=5)], "between 1 and 4"),
    ([SerialParameters(type="file")], "needs path="),
    ([SerialParameters(stdin=True, input="/x")], "cannot both"),
    ([SerialParameters(hardware="legacy-virtio-console")], "invalid hardware"),
])
def test_serial_rules(ports, message):
    with pytest.raises(ConfigError, match=message):
        validate_serial(ports)


def test_default_serial_is_stdout_console_on_com1():
    cfg = Config(kernel="k")

    assert cfg.serial_ports() == [SerialParameters(type="stdout", num=1, console=True,
                                                   stdin=True)]


def test_cmdline_order_base_console_earlycon_params():
    cfg = Config(kernel="k", params=["root=/dev/vda"],
                 serial=[SerialParameters(num=2, console=True, earlycon=True)])

    assert kernel_cmdline(cfg) == ("panic=-1 console=ttyS1 earlycon=uart8250,io,0x2f8 "
                                   "root=/dev/vda")


def test_all_four_uarts_exist_and_unnamed_ones_are_sinks():
    cfg = Config(kernel="k", serial=[SerialParameters(type="stdout", num=2)])

    assert [(p.num, p.type) for p in cfg.uarts()] == [(1, "sink"), (2, "stdout"), (3, "sink"),
                                                     (4, "sink")]



def test_block_first_key_is_path_and_bare_flags_are_true():
    cfg = config_from(["--block", "disk.img,ro,root"])
    d = cfg.disks[0]
    assert (d.path, d.ro, d.root, d.sparse, d.block_size) == ("disk.img", True, True, True, 512)


def test_block_old_key_aliases_accepted():
    d = config_from(["-b", "disk.img,o_direct=true,block_size=4096"]).disks[0]
    assert (d.direct, d.block_size) == (True, 4096)


def test_deprecated_root_is_read_only_root_block():
    d = config_from(["-r", "rootfs.img"]).disks[0]
    assert (d.path, d.ro, d.root) == ("rootfs.img", True, True)


def test_deprecated_rwdisk_is_writable():
    assert config_from(["--rwdisk", "d.img"]).disks[0].ro is False


def test_deprecated_disk_rejects_ro_key():
    with pytest.raises(UsageError):
        parse_run_args(["--disk", "d.img,ro", "vmlinux"])


def test_disks_keep_command_line_order():
    cfg = config_from(["--block", "a.img", "-d", "b.img", "--block", "c.img"])
    assert [d.path for d in cfg.disks] == ["a.img", "b.img", "c.img"]


def test_two_root_disks_rejected():
    cfg = config_from(["--block", "a.img,root", "--block", "b.img,root", "vmlinux"])
    with pytest.raises(ConfigError, match="only one disk"):
        cfg.validate()


def test_block_without_path_rejected():
    with pytest.raises(ConfigFileError, match="missing field `path`"):
        config_from(["--block", "ro=true"])


def test_main_returns_35_on_block_without_path(capsys):
    assert main(["run", "--block", "ro=true", "vmlinux"]) == 35


def test_root_disk_adds_root_to_kernel_command_line():
    cfg = config_from(["--block", "a.img", "--block", "b.img,root", "-p", "quiet"])
    assert kernel_cmdline(cfg).endswith("root=/dev/vdb rw quiet")


def test_virtio_console_is_hvc_console():
    cfg = config_from(["--serial", "type=stdout,hardware=virtio-console,console"])
    assert "console=hvc0" in kernel_cmdline(cfg).split()


def test_no_rng_flag():
    assert config_from(["--no-rng"]).no_rng is True


def test_sandbox_options_reach_the_config():
    cfg = config_from(["--seccomp-log-failures", "--seccomp-policy-dir", "/pol",
                       "--pivot-root", "/jail", "-s", "/run/vm.sock", "vmlinux"])

    assert (cfg.seccomp_log_failures, cfg.seccomp_policy_dir, cfg.pivot_root, cfg.socket) == \
        (True, "/pol", "/jail", "/run/vm.sock")


def test_sandbox_defaults_are_crosvms():
    cfg = config_from(["vmlinux"])

    assert (cfg.disable_sandbox, cfg.seccomp_log_failures, cfg.seccomp_policy_dir,
            cfg.pivot_root, cfg.socket) == (False, False, None, "/var/empty", None)


def test_missing_seccomp_policy_dir_exits_35_naming_the_file(tmp_path, capsys):
    kernel = tmp_path / "vmlinux"
    kernel.write_bytes(b"\x7fELF")  # never read: the devices come first
    no_kvm = f"kvm[device={tmp_path}/no-kvm]"  # policies are checked before KVM is opened

    code = main(["run", "--hypervisor", no_kvm, "--seccomp-policy-dir",
                 str(tmp_path / "none"), str(kernel)])

    assert code == 35
    assert f"{tmp_path}/none/serial.policy: No such file or directory" in capsys.readouterr().err
