"""`--net` and crosvm's deprecated TAP options: parsing, merging and validation."""

from __future__ import annotations

import os
import subprocess

import pytest

from crosvm.cli.config_file import build_config, merge
from crosvm.cli.main import parse_run_args
from crosvm.config import ConfigError, NetOption
from crosvm.net.tap import TapError, open_net_taps
from tests.support.netns import on_netns_thread


def config_from(args):
    values, _ = parse_run_args(args)
    return build_config(merge({}, values))


def test_net_tap_name_with_mac_vq_pairs_and_mrg_rxbuf():
    cfg = config_from(["--net", "tap-name=vmtap0,mac=52:54:00:12:34:56,vq-pairs=2,mrg-rxbuf",
                       "k"])

    assert cfg.nets == [NetOption(tap_name="vmtap0", mac="52:54:00:12:34:56", vq_pairs=2,
                                  mrg_rxbuf=True)]


def test_net_passt_is_a_bare_key():
    cfg = config_from(["--net", "passt,mac=52:54:00:12:34:56", "k"])

    assert cfg.nets == [NetOption(passt=True, mac="52:54:00:12:34:56")]


def test_net_may_repeat():
    cfg = config_from(["--net", "tap-fd=5", "--net", "tap-name=t1", "k"])

    assert [(n.tap_fd, n.tap_name) for n in cfg.nets] == [(5, None), (None, "t1")]


def test_net_first_key_may_not_be_omitted():
    with pytest.raises(Exception, match="tap0"):
        config_from(["--net", "tap0", "k"])


def test_deprecated_host_ip_netmask_mac_make_one_net_and_warn(monkeypatch):
    import crosvm.cli.main as cli_main
    warnings = []
    monkeypatch.setattr(cli_main.log, "warning", lambda msg, *a: warnings.append(msg % a))

    cfg = config_from(["--host-ip", "10.0.2.1", "--netmask", "255.255.255.0",
                       "--mac", "52:54:00:12:34:56", "--net-vq-pairs", "2", "k"])

    assert (cfg.nets, "--host-ip is deprecated, use --net host-ip=IP,netmask=M,mac=MAC"
            in warnings) == (
        [NetOption(host_ip="10.0.2.1", netmask="255.255.255.0", mac="52:54:00:12:34:56",
                   vq_pairs=2)], True)


def test_deprecated_tap_name_and_tap_fd_each_make_a_net():
    cfg = config_from(["--tap-name", "a", "--tap-fd", "7", "--vhost-net", "k"])

    assert cfg.nets == [NetOption(tap_name="a", vhost_net=True),
                        NetOption(tap_fd=7, vhost_net=True)]


@pytest.mark.parametrize("args, message", [
    (["--net", "tap-name=a,tap-fd=3"], "exactly one of"),
    (["--net", "host-ip=10.0.0.1,mac=52:54:00:00:00:01"], "needs netmask= and mac="),
    (["--net", "host-ip=10.0.0.300,netmask=255.255.255.0,mac=52:54:00:00:00:01"],
     "invalid host-ip"),
    (["--net", "host-ip=10.0.0.1,netmask=255.0.255.0,mac=52:54:00:00:00:01"],
     "invalid netmask"),
    (["--net", "tap-name=a,vq-pairs=17"], "vq-pairs must be between"),
    (["--net", "tap-fd=3,vq-pairs=2"], "tap-fd= gives one queue"),
    (["--net", "passt,tap-name=a"], "exactly one of"),
    (["--net", "passt,vq-pairs=2"], "passt gives one queue pair"),
])
def test_invalid_net_options_are_config_errors(args, message):
    cfg = config_from(args + ["k"])

    with pytest.raises(ConfigError, match=message):
        cfg.validate()


@pytest.mark.parametrize("args, message", [
    (["--netmask", "255.255.255.0"], "--netmask needs --host-ip and --mac too"),
    (["--tap-name", "a", "--mac", "52:54:00:00:00:01"],
     "--mac needs --host-ip and --netmask too.*--net tap-name=NAME,mac=MAC"),
])
def test_deprecated_host_ip_netmask_mac_must_come_together(args, message):
    with pytest.raises(ConfigError, match=message):
        config_from(args + ["k"])


def test_vhost_net_error_names_the_missing_device(tmp_path, monkeypatch):
    import crosvm.net.tap as tap
    monkeypatch.setattr(tap, "VHOST_NET_DEVICE", str(tmp_path / "vhost-net"))

    with pytest.raises(TapError, match=f"needs {tmp_path}/vhost-net, which does not exist"):
        open_net_taps(NetOption(tap_name="a", vhost_net=True))


def test_tap_fd_that_is_not_a_tap_is_refused(tmp_path):
    with open(tmp_path / "f", "w") as f:
        with pytest.raises(TapError, match=f"tap-fd {f.fileno()} is not an open TAP"):
            open_net_taps(NetOption(tap_fd=f.fileno()))


def test_net_passt_without_passt_installed_is_named(monkeypatch):
    import crosvm.net.passt as passt
    monkeypatch.setattr(passt.shutil, "which", lambda name: None)

    with pytest.raises(passt.PasstError, match="passt is not installed"):
        passt.Passt()


def test_net_passt_socket_that_nobody_listens_on_is_named(tmp_path):
    import crosvm.net.passt as passt

    with pytest.raises(passt.PasstError, match="cannot connect to passt|does not accept"):
        passt.Passt(str(tmp_path / "missing.sock"))


def test_vhost_net_on_this_host_is_refused_naming_dev_vhost_net():
    if os.path.exists("/dev/vhost-net"):
        pytest.skip("this host has /dev/vhost-net; the missing-device error cannot be seen")

    with pytest.raises(TapError, match="/dev/vhost-net, which does not exist"):
        open_net_taps(NetOption(tap_name="a", vhost_net=True))


@pytest.mark.skipif(not os.path.exists("/dev/vhost-net"),
                    reason="no /dev/vhost-net on this machine: vhost-net cannot be exercised")
def test_vhost_net_hands_the_queues_to_the_kernel():
    pytest.fail("vhost-net=true is not implemented: the device serves its queues itself")


needs_root_and_tun = pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.exists("/dev/net/tun"),
    reason="creating a TAP needs root and /dev/net/tun")


@needs_root_and_tun
def test_host_ip_mac_is_set_on_the_host_tap_and_the_guest_gets_none():
    from pyroute2 import IPRoute

    def make():
        tap, guest_mac = open_net_taps(NetOption(host_ip="10.9.0.1", netmask="255.255.255.0",
                                                 mac="52:54:00:aa:bb:01"))
        with IPRoute() as ipr:
            link = ipr.get_links(ipr.link_lookup(ifname=tap.name)[0])[0]
        tap.close()
        return link.get_attr("IFLA_ADDRESS"), guest_mac

    assert on_netns_thread(make) == ("52:54:00:aa:bb:01", None)


@needs_root_and_tun
def test_tap_mtu_is_read_from_the_interface():
    from crosvm.net.tap import Tap

    def make():
        tap = Tap.open("pcvmmtu0")
        subprocess.run(["ip", "link", "set", "pcvmmtu0", "mtu", "9000"], check=True)  # inherits this thread's namespace
        mtu = tap.mtu()
        tap.close()
        return mtu

    assert on_netns_thread(make) == 9000
