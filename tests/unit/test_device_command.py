"""`crosvm device TYPE ...` and `crosvm devices ...`: their command lines, and the
back-ends they start served to our own front-end (in this process, or forked and
jailed)."""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import subprocess
import sys
import time

import pytest

from crosvm.base import Event
from crosvm.cli.device_command import DeviceUsageError, parse_device, parse_devices
from crosvm.cli.main import main
from crosvm.config import DiskOption, NetOption, SerialParameters, VsockOption
from crosvm.devices.virtio import virtio_device as V
from crosvm.devices.virtio.driver import QueueDriver
from crosvm.devices.virtio.vhost_user import VhostUserFrontend
from crosvm.vm_memory import GuestMemory
from tests.support.procs import descendants


def test_device_block_takes_socket_and_file():
    spec = parse_device(["block", "--socket", "/run/b.sock", "--file", "d.img"])

    assert (spec.kind, spec.socket, spec.option) == ("block", "/run/b.sock", DiskOption("d.img"))


def test_device_block_file_may_be_read_only_and_socket_path_is_an_alias():
    spec = parse_device(["block", "--socket-path=/s", "--file=d.img,ro"])

    assert (spec.socket, spec.option) == ("/s", DiskOption("d.img", ro=True))


def test_device_net_tap_name_carries_socket_name_and_mac():
    spec = parse_device(["net", "--tap-name", "/s,tap1,52:54:00:00:00:01"])

    assert (spec.socket, spec.option) == ("/s", NetOption(tap_name="tap1",
                                                          mac="52:54:00:00:00:01"))


def test_device_console_writes_to_the_output_file_and_reads_the_input_file():
    spec = parse_device(["console", "--socket", "/s", "--output-file", "o", "--input-file", "i"])

    assert spec.option == SerialParameters(type="file", path="o", input="i",
                                           hardware="virtio-console")


def test_device_fs_maps_its_options_to_a_virtio_fs_share(tmp_path):
    spec = parse_device(["fs", "--socket", "/s", "--tag", "t", "--shared-dir", str(tmp_path),
                         "--uid-map", "0 1000 1", "--cfg", "cache=always,writeback=true"])

    share = spec.option
    assert (share.type, share.tag, share.src, share.uidmap, share.cache, share.writeback) == (
        "fs", "t", str(tmp_path), "0 1000 1", "always", True)


def test_device_vsock_is_the_userspace_device_on_a_uds_path(tmp_path):
    uds = str(tmp_path / "v")
    spec = parse_device(["vsock", "--socket", "/s", "--cid", "5", "--uds-path", uds])

    assert spec.option == VsockOption(cid=5, uds_path=uds)


@pytest.mark.parametrize("args, words", [
    (["gpu", "--socket", "/s"], "unsupported device type 'gpu'"),
    (["block", "--file", "d.img"], "--socket is required"),
    (["block", "--socket", "/s", "--file", "d.img,rw"], "expected IMAGE or IMAGE,ro"),
    (["block", "--socket"], "needs a value"),
    (["block", "--socket", "/a", "--socket", "/b", "--file", "d"], "given twice"),
    (["block", "--bogus", "1"], "unknown option --bogus"),
    (["block", "--socket", "/" + "s" * 120, "--file", "d"], "longer than 107 bytes"),
    (["block", "--socket", "/" + "\udcff" * 120, "--file", "d"], "longer than 107 bytes"),
    (["net", "--tap-name", "/s"], "expected PATH,NAME"),
    (["net", "--tap-name", "/s,t", "--tap-fd", "/s,3"], "exactly one of"),
    (["net", "--tap-fd", "/s,three"], "expected a number"),
    (["fs", "--socket", "/s", "--tag", "t", "--shared-dir", "/", "--cfg", "nope=1"],
     "unknown key 'nope'"),
    (["vsock", "--socket", "/s", "--cid", "2", "--uds-path", "/v"], "reserved|CID"),
    (["vsock", "--socket", "/s", "--cid", "3", "--uds-path", "/v", "--vhost-device", "/d"],
     "not driven"),
])
def test_bad_device_command_line_is_refused(args, words):
    with pytest.raises(DeviceUsageError, match=words):
        parse_device(args)


def test_devices_takes_each_device_with_its_run_keys():
    cmd = parse_devices(["--block", "vhost=/a,path=d.img,ro", "--serial",
                         "vhost=/b,type=file,path=out", "--disable-sandbox"])

    assert [(b.kind, b.socket, b.option) for b in cmd.backends] == [
        ("block", "/a", DiskOption("d.img", ro=True)),
        ("console", "/b", SerialParameters(type="file", path="out",
                                           hardware="virtio-console"))]
    assert cmd.disable_sandbox


def test_devices_jail_options_are_kept(tmp_path):
    cmd = parse_devices(["--jail", "pivot-root=/p,seccomp-log-failures", "--vsock",
                         f"vhost=/v,cid=3,uds-path={tmp_path}/u"])

    assert (cmd.pivot_root, cmd.seccomp_log_failures, cmd.disable_sandbox) == ("/p", True,
                                                                               False)


@pytest.mark.parametrize("args, words", [
    ([], "no device given"),
    (["--block", "path=d.img"], "vhost=PATH"),
    (["--block", "vhost=/a,path=d.img", "--net", "vhost=/a,tap-name=t"], "given twice"),
    (["--block", "vhost=/a,path=d.img,bogus=1"], "bogus"),
    (["--gpu", "vhost=/a"], "unknown option --gpu"),
    (["--vsock", "vhost=/a,cid=1"], "cid"),
    (["--serial", "vhost=/a,type=sink,console"], "a back-end is a virtio console"),
    (["--net", "vhost=/a,tap-name=\"\""], "tap-name is empty"),
    (["--serial", "vhost=/a,stdin", "--serial", "vhost=/b,stdin"], "stdin"),
])
def test_bad_devices_command_line_is_refused(args, words):
    with pytest.raises(DeviceUsageError, match=words):
        parse_devices(args)


def test_bad_device_command_exits_35_with_one_line(capsys):
    code = main(["device", "block", "--file", "d.img"])

    err = capsys.readouterr().err
    assert (code, err.count("\n"), "--socket is required" in err) == (35, 1, True)


def test_missing_image_exits_35_naming_it(tmp_path, capsys):
    code = main(["device", "block", "--socket", str(tmp_path / "s"),
                 "--file", str(tmp_path / "none.img")])

    err = capsys.readouterr().err
    assert code == 35 and "none.img" in err


def test_devices_with_a_missing_image_exits_35_and_leaves_no_socket(tmp_path, capsys):
    sock = tmp_path / "ok.sock"
    (tmp_path / "ok.img").write_bytes(bytes(4096))
    code = main(["devices", "--disable-sandbox", "--block", f"vhost={sock},path={tmp_path}/ok.img",
                 "--block", f"vhost={tmp_path / 'b.sock'},path={tmp_path / 'none.img'}"])

    assert code == 35 and "none.img" in capsys.readouterr().err
    assert not sock.exists()


# -- the back-ends, served to our front-end ------------------------------------------
BLOCK = 4096


def wait_for(path: str) -> None:
    deadline = time.monotonic() + 10
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.02)


def read_block(path: str, index: int) -> tuple[bytes, int]:
    """Connect our front-end to the block back-end at `path`, read block `index`, and
    disconnect; (the block's first bytes, the request's status)."""
    mem = GuestMemory([(0, 4 << 20)])
    front = VhostUserFrontend("block", path, mem)
    try:
        front.ack_features(front.features() & ~(1 << V.VIRTIO_RING_F_EVENT_IDX))
        driver = QueueDriver(mem, size=128)
        kick = Event()
        front.activate(mem, V.Interrupt(None, None), [(0, driver.queue, kick)])
        _, (data, status) = driver.add_buffers([struct.pack("<IIQ", 0, 0, index * 8)],
                                               [BLOCK, 1])
        kick.signal()
        deadline = time.monotonic() + 10
        while not driver.used() and time.monotonic() < deadline:
            time.sleep(0.01)
        return mem.read(data, 4), mem.read(status, 1)[0]
    finally:
        front.close()
        mem.close()


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "d.img"
    path.write_bytes(b"".join(bytes([i]) * BLOCK for i in range(16)))
    return str(path)


@contextlib.contextmanager
def crosvm(sock: str, *args: str):
    """`crosvm ARGS` (its stderr piped), yielded once `sock` exists; killed after."""
    proc = subprocess.Popen([sys.executable, "-m", "crosvm", *args], stderr=subprocess.PIPE)
    try:
        wait_for(sock)
        yield proc
    finally:
        proc.kill()
        proc.wait()
        proc.stderr.close()


@pytest.mark.parametrize("sandbox", [[], ["--disable-sandbox"]], ids=["jailed", "unjailed"])
def test_devices_serves_a_block_back_end_until_its_front_end_leaves(tmp_path, image, sandbox):
    sock = str(tmp_path / "b.sock")
    with crosvm(sock, "devices", *sandbox, "--block", f"vhost={sock},path={image}") as proc:
        result = read_block(sock, 3)
        code = proc.wait(10)

    assert (result, code) == ((b"\x03" * 4, 0), 0)
    assert not os.path.exists(sock)


def test_devices_back_end_runs_jailed_in_its_own_process(tmp_path, image):
    sock = str(tmp_path / "b.sock")
    with crosvm(sock, "devices", "--block", f"vhost={sock},path={image}") as proc:
        deadline = time.monotonic() + 10
        while not (children := descendants(proc.pid)) and time.monotonic() < deadline:
            time.sleep(0.02)
        status = ""
        while children and "Seccomp:\t2" not in status and time.monotonic() < deadline:
            time.sleep(0.02)  # the child is jailing itself
            with open(f"/proc/{children[0]}/status") as f:
                status = f.read()

    assert len(children) == 1
    assert "Seccomp:\t2" in status and "NoNewPrivs:\t1" in status


def test_device_serves_its_block_back_end_in_process(tmp_path, image):
    sock = str(tmp_path / "b.sock")
    with crosvm(sock, "device", "block", "--socket", sock, "--file", image) as proc:
        result = read_block(sock, 7)
        code = proc.wait(10)

    assert (result, code) == ((b"\x07" * 4, 0), 0)


def test_one_back_end_ending_leaves_the_others_serving(tmp_path, image):
    peer = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)  # the console's unix peer
    peer.bind(str(tmp_path / "peer"))
    console, block = str(tmp_path / "c.sock"), str(tmp_path / "b.sock")
    with crosvm(block, "devices", "--disable-sandbox",
                "--serial", f"vhost={console},type=unix,path={tmp_path / 'peer'}",
                "--block", f"vhost={block},path={image}") as proc:
        wait_for(console)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as front:
            front.connect(console)  # a front-end that comes and goes at once
        time.sleep(1)
        result = read_block(block, 5)
        code = proc.wait(10)

    peer.close()
    assert (result, code) == ((b"\x05" * 4, 0), 0)
