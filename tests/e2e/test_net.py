"""End-to-end virtio-net: one VM per sandbox mode with three NICs, inside its own netns.

crosvm runs under `ip netns exec` in a namespace this module creates, so every frame
stays in it. eth0 is a TAP the test opened itself (`--net tap-fd=`, with mrg-rxbuf);
eth1 is one crosvm creates and addresses (`--net host-ip=`, vq-pairs=2); eth2 is
user-mode networking through a passt crosvm starts (`--net passt`), which copies its
addresses from a veth in the namespace. The guest pings the host and back, moves files
over TCP both ways with busybox nc, gets an address by DHCP from passt and fetches a
file from the namespace's loopback through it, and shows what was negotiated in sysfs.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import pytest

from crosvm.devices.virtio import net_proto as P
from crosvm.net.tap import Tap
from tests.guest_vm import GuestVm
from tests.support.netns import on_netns_thread
from tests.support.peers import crosvm_backends

pytestmark = pytest.mark.e2e

MAC0, MAC1 = "52:54:00:12:34:01", "52:54:00:12:34:02"
TAP0_MTU = 9000  # not the default: the guest must be told the TAP's own
HOST0, GUEST0 = "10.77.0.1", "10.77.0.2"
HOST1, GUEST1 = "10.78.0.1", "10.78.0.2"
# passt copies the namespace's address and gateway for the guest, and maps the gateway
# to the namespace's loopback.
PASST_ADDR, PASST_GW = "10.88.0.5", "10.88.0.1"
HTTP_PORT = 8088
DHCP_SCRIPT = ("printf '%s\\n' '#!/bin/sh' '[ \"$1\" = bound ] || exit 0' "
               "'ifconfig $interface $ip netmask $subnet' 'route add default gw $router' "
               "> /tmp/dhcp.sh && chmod +x /tmp/dhcp.sh")
TRANSFER_TIMEOUT = 600.0

# A one-connection TCP peer run inside the namespace: `send PORT FILE` serves the file,
# `recv PORT -` prints the sha256 and length of what it was sent.
PEER = r"""
import hashlib, socket, sys
mode, port, path = sys.argv[1], int(sys.argv[2]), sys.argv[3]
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", port))
s.listen(1)
print("ready", flush=True)
c, _ = s.accept()
if mode == "send":
    with open(path, "rb") as f:
        c.sendall(f.read())
    c.shutdown(socket.SHUT_WR)
    while c.recv(65536):
        pass
else:
    h, n = hashlib.sha256(), 0
    while data := c.recv(1 << 16):
        h.update(data)
        n += len(data)
    print(h.hexdigest(), n, flush=True)
"""

# Sends one TCP/IPv4 GSO frame (40 segments of 1448 bytes) out of interface argv[1] to
# MAC argv[2], from IP argv[3] to IP argv[4], through a packet socket with a vnet header.
GSO_SEGMENTS, GSO_MSS = 40, 1448
GSO_FRAME_LEN = 14 + 20 + 20 + GSO_SEGMENTS * GSO_MSS
GSO_SENDER = rf"""
import socket, struct, sys
iface, dst_mac, src_ip, dst_ip = sys.argv[1:5]
payload = bytes({GSO_SEGMENTS} * {GSO_MSS})
tcp = struct.pack("!HHIIBBHHH", 40000, 9, 1, 0, 5 << 4, 0x18, 65535, 0, 0)
ip = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, 40 + len(payload), 1, 0x4000, 64, 6,
                           0, socket.inet_aton(src_ip), socket.inet_aton(dst_ip)))
words = sum(struct.unpack("!10H", ip))
words = (words & 0xFFFF) + (words >> 16)
ip[10:12] = struct.pack("!H", ~((words & 0xFFFF) + (words >> 16)) & 0xFFFF)
eth = bytes.fromhex(dst_mac.replace(":", "")) + bytes.fromhex("525400abcdef") + b"\x08\x00"
# virtio_net_hdr: NEEDS_CSUM, GSO_TCPV4, header length, gso_size, csum_start/offset.
vnet = struct.pack("<BBHHHH", 1, 1, 54, {GSO_MSS}, 34, 16)
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.setsockopt(263, 15, 1)  # SOL_PACKET, PACKET_VNET_HDR
s.bind((iface, 0))
s.send(vnet + eth + bytes(ip) + tcp + payload)
"""


def in_ns(ns: str, *cmd: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", "netns", "exec", ns, *cmd], capture_output=True, text=True,
                          **kw)


def open_tap_in(ns: str, name: str) -> Tap:
    """Open TAP `name` inside `ns` (from a helper thread: setns moves only that thread)."""
    return on_netns_thread(lambda: Tap.open(name), ns)


@pytest.fixture(scope="module")
def netns():
    if os.geteuid() != 0:
        pytest.skip("network namespaces and TAP devices need root")
    if not os.path.exists("/dev/net/tun"):
        pytest.skip("no /dev/net/tun on this machine")
    name = f"pcvm-net-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        in_ns(name, "ip", "link", "set", "lo", "up", check=True)
        # passt's template: an interface with an address and a default route.
        for cmd in (["ip", "link", "add", "pv0", "type", "veth", "peer", "name", "pv1"],
                    ["ip", "addr", "add", f"{PASST_ADDR}/24", "dev", "pv0"],
                    ["ip", "link", "set", "pv0", "up"], ["ip", "link", "set", "pv1", "up"],
                    ["ip", "route", "add", "default", "via", PASST_GW]):
            in_ns(name, *cmd, check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


@pytest.fixture(scope="module")
def tap0(netns):
    tap = open_tap_in(netns, "pcvmtap0")
    in_ns(netns, "ip", "addr", "add", f"{HOST0}/24", "dev", tap.name, check=True)
    in_ns(netns, "ip", "link", "set", tap.name, "mtu", str(TAP0_MTU), check=True)
    in_ns(netns, "ip", "link", "set", tap.name, "up", check=True)
    yield tap
    tap.close()


@pytest.fixture(scope="module", params=["sandboxed", "disable-sandbox"])
def vm(request, netns, tap0, kernel, initramfs, tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("vm"))
    fd = tap0.fds[0]
    # Also a vsock device served by `crosvm device vsock` over vhost-user (the sharing
    # VMs run theirs in-VMM or from a jailed `crosvm devices`).
    vu_sock, vu_uds = os.path.join(workdir, "vsock-vu.sock"), os.path.join(workdir, "v.sock")
    extra = ("--net", f"tap-fd={fd},mac={MAC0},mrg-rxbuf",
             "--net", f"host-ip={HOST1},netmask=255.255.255.0,mac={MAC1},vq-pairs=2",
             "--net", "passt", "--vhost-user", f"vsock,socket={vu_sock}")
    if request.param == "disable-sandbox":
        extra += ("--disable-sandbox",)
    with crosvm_backends(["device", "vsock", "--socket", vu_sock, "--cid", "3", "--uds-path",
                          vu_uds], vu_sock, os.path.join(workdir, "vsock-vu.log")), \
            GuestVm(kernel, initramfs, workdir, cpus=2, mem=256, extra_args=extra,
                    pass_fds=(fd,), prefix=("ip", "netns", "exec", netns)) as g:
        g.wait_ready()
        g.vu_uds = vu_uds
        for command in ("ip link set eth0 up", f"ip addr add {GUEST0}/24 dev eth0",
                        "ip link set eth1 up", f"ip addr add {GUEST1}/24 dev eth1"):
            setup = g.run(command)
            assert setup.returncode == 0, (command, setup.stderr)
        yield g


def start_peer(ns: str, mode: str, port: int, path: str = "-") -> subprocess.Popen:
    peer = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-c", PEER, mode,
                             str(port), path], stdout=subprocess.PIPE, text=True)
    assert peer.stdout.readline().strip() == "ready"
    return peer


def features(vm: GuestVm, iface: str) -> str:
    return vm.run(f"cat /sys/class/net/{iface}/device/features").stdout.strip()


def test_guest_mac_and_mtu_come_from_config_space(vm):
    out = vm.run("cat /sys/class/net/eth0/address /sys/class/net/eth0/mtu").stdout.split()

    assert out == [MAC0, str(TAP0_MTU)]


def test_host_ip_mac_is_the_host_taps_and_the_guest_picks_its_own(vm, netns):
    # crosvm's host-ip=,netmask=,mac=: the TAP it creates gets the MAC; the guest's
    # device offers none, so Linux makes up a random one.
    links = in_ns(netns, "ip", "-o", "link", "show").stdout
    guest = vm.run("cat /sys/class/net/eth1/address").stdout.strip()

    assert (f"link/ether {MAC1} " in links, len(guest), guest != MAC1) == (True, 17, True), \
        (links, guest)


def test_guest_pings_host_five_times(vm):
    result = vm.run(f"ping -c 5 -W 10 {HOST0}")

    assert (result.returncode, "5 packets received" in result.stdout) == (0, True), result.stdout


def test_host_pings_guest_five_times(vm, netns):
    result = in_ns(netns, "busybox", "ping", "-c", "5", "-W", "10", GUEST0)

    assert (result.returncode, "5 packets received" in result.stdout) == (0, True), result.stdout


def test_file_moves_host_to_guest_over_tcp(vm, netns, tmp_path):
    data = os.urandom(2 << 20)
    path = tmp_path / "to_guest.bin"
    path.write_bytes(data)
    peer = start_peer(netns, "send", 5001, str(path))

    result = vm.run(f"nc {HOST0} 5001 > /tmp/in.bin && sha256sum /tmp/in.bin",
                    timeout=TRANSFER_TIMEOUT)
    peer.wait(30)

    assert result.stdout.split()[:1] == [hashlib.sha256(data).hexdigest()], result.stderr


def test_file_moves_guest_to_host_over_tcp(vm, netns):
    peer = start_peer(netns, "recv", 5002)

    result = vm.run(f"nc {HOST0} 5002 < /bin/busybox; sha256sum /bin/busybox",
                    timeout=TRANSFER_TIMEOUT)
    got, _ = peer.communicate(timeout=60)

    assert result.stdout.split()[:1] == got.split()[:1], (result.stdout, got)


def test_offloads_and_mergeable_buffers_are_negotiated(vm):
    bits = features(vm, "eth0")

    wanted = (P.F_CSUM, P.F_GUEST_CSUM, P.F_GUEST_TSO4, P.F_HOST_TSO4, P.F_MRG_RXBUF)
    assert [bits[b] for b in wanted] == ["1"] * len(wanted), bits


def test_big_tcp_segment_reaches_the_guest_as_one_frame(vm, netns, tap0):
    # One 58 KB TCP/IPv4 GSO frame sent out of the host's TAP (a packet socket with a
    # vnet header). With GUEST_TSO4 negotiated the TAP hands it to the device whole and
    # the guest counts one big frame; without, the kernel would cut it into 40 of 1514.
    # (A host TCP sender does not show this reliably: with a receiver as slow as the
    # emulated guest it sends window-limited segments smaller than the MTU.)
    counters = ("cat /sys/class/net/eth0/statistics/rx_bytes "
                "/sys/class/net/eth0/statistics/rx_packets")
    before = [int(x) for x in vm.run(counters).stdout.split()]
    sent = in_ns(netns, sys.executable, "-c", GSO_SENDER, tap0.name, MAC0, HOST0, GUEST0)
    after = [int(x) for x in vm.run(counters).stdout.split()]

    rx_bytes, rx_packets = after[0] - before[0], after[1] - before[1]
    assert sent.returncode == 0, sent.stderr
    assert rx_bytes >= GSO_FRAME_LEN
    assert rx_bytes / rx_packets > 1514, (rx_bytes, rx_packets)


def test_multiqueue_nic_has_two_queue_pairs_and_no_mergeable_buffers(vm):
    queues = vm.run("ls /sys/class/net/eth1/queues").stdout.split()
    bits = features(vm, "eth1")

    assert (queues, bits[P.F_MQ], bits[P.F_MRG_RXBUF]) == (
        ["rx-0", "rx-1", "tx-0", "tx-1"], "1", "0")


def test_multiqueue_nic_on_a_crosvm_created_tap_carries_traffic(vm):
    result = vm.run(f"ping -c 3 -W 10 {HOST1}")

    assert (result.returncode, "3 packets received" in result.stdout) == (0, True), result.stdout


@pytest.fixture(scope="module")
def http_server(netns, tmp_path_factory):
    """A static HTTP server on the namespace's loopback: what passt's gateway maps to."""
    root = tmp_path_factory.mktemp("www")
    data = os.urandom(1 << 20)
    (root / "file.bin").write_bytes(data)
    server = subprocess.Popen(["ip", "netns", "exec", netns, sys.executable, "-m", "http.server",
                               "--bind", "127.0.0.1", "--directory", str(root),
                               str(HTTP_PORT)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    yield hashlib.sha256(data).hexdigest()
    server.kill()
    server.wait()


def test_passt_gives_the_guest_an_address_by_dhcp(vm):
    result = vm.run(f"{DHCP_SCRIPT} && ip link set eth2 up && "
                    "udhcpc -i eth2 -n -q -t 10 -T 3 -s /tmp/dhcp.sh && "
                    "ip -4 -o addr show eth2", timeout=TRANSFER_TIMEOUT)

    assert f"inet {PASST_ADDR}/24" in result.stdout, (result.stdout, result.stderr)


def test_passt_guest_fetches_a_file_from_the_host_loopback(vm, http_server):
    result = vm.run(f"wget -q -O /tmp/w.bin http://{PASST_GW}:{HTTP_PORT}/file.bin && "
                    "sha256sum /tmp/w.bin", timeout=TRANSFER_TIMEOUT)

    assert result.stdout.split()[:1] == [http_server], (result.stdout, result.stderr)


def test_vsock_through_crosvm_device_vsock_carries_a_message_both_ways(vm):
    from tests.e2e.sharing.test_vsock import background, host_connect, host_listener, taking
    background(vm, "vsock -l 5100 > /tmp/vu_in")
    s = host_connect(vm.vu_uds, 5100)
    s.sendall(b"to the guest over vhost-user\n")
    s.close()
    taker, got = taking(host_listener(vm.vu_uds, 5101))

    sent = vm.run("echo to the host over vhost-user | vsock 2 5101")
    taker.join(60)
    received = vm.run("wait_for /tmp/vu_in guest 30 >/dev/null; cat /tmp/vu_in")

    assert sent.returncode == 0, sent.stderr
    assert (received.stdout, got) == ("to the guest over vhost-user\n",
                                      [b"to the host over vhost-user\n"])
