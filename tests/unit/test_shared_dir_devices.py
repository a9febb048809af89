"""The shared-directory devices as the transport sees them (type, queues, features,
config space, jail) and a request through the real worker on a virtqueue."""

from __future__ import annotations

import os
import struct

import pytest

from crosvm.base import Event
from crosvm.config import SharedDirOption
from crosvm.devices.virtio.driver import QueueDriver
from crosvm.devices.virtio.fs import fuse as F
from crosvm.devices.virtio.fs.device import Fs
from crosvm.devices.virtio.p9 import P9
from crosvm.devices.virtio.virtio_device import Interrupt
from crosvm.jail.jail import FILE_SERVER_CAPS
from crosvm.vm_memory import GuestMemory
from tests.unit.interrupts import Line, wait_signalled


@pytest.fixture
def mem():
    m = GuestMemory([(0, 8 << 20)])
    yield m
    m.close()


def option(tmp_path, **kw) -> SharedDirOption:
    return SharedDirOption(src=str(tmp_path), tag="mytag", **kw)


def test_fs_device_is_type_26_with_hiprio_and_one_request_queue(tmp_path):
    dev = Fs(option(tmp_path, type="fs"))

    assert (dev.device_type, len(dev.queue_max_sizes())) == (26, 2)


def test_fs_config_is_the_padded_tag_then_one_request_queue(tmp_path):
    dev = Fs(option(tmp_path, type="fs"))

    assert dev.config_bytes() == b"mytag" + bytes(31) + struct.pack("<I", 1)


def test_fs_config_tag_of_36_bytes_has_no_terminator(tmp_path):
    dev = Fs(SharedDirOption(src=str(tmp_path), tag="t" * 36, type="fs"))

    assert dev.config_bytes()[:36] == b"t" * 36


def test_p9_device_is_type_9_with_one_queue_and_the_mount_tag_feature(tmp_path):
    dev = P9(option(tmp_path))

    assert (dev.device_type, len(dev.queue_max_sizes()), dev.features() & 1) == (9, 1, 1)


def test_p9_config_is_the_tag_length_then_the_tag(tmp_path):
    dev = P9(option(tmp_path))

    assert dev.config_bytes() == struct.pack("<H", 5) + b"mytag"


def test_shared_dir_jail_is_rooted_at_the_share_with_its_maps(tmp_path):
    dev = Fs(option(tmp_path, type="fs", uidmap="5000 1234 1", gidmap="6000 1235 1",
                    uid=5000, gid=6000))

    cfg = dev.jail_config()

    assert (cfg.root, cfg.uid_map, cfg.gid_map, cfg.uid, cfg.gid, cfg.caps) == (
        str(tmp_path), "5000 1234 1\n", "6000 1235 1\n", 5000, 6000, FILE_SERVER_CAPS)


def test_fs_device_serves_init_and_lookup_through_its_worker(tmp_path, mem):
    (tmp_path / "hello.txt").write_text("hi")
    dev = Fs(option(tmp_path, type="fs"))
    drivers = [QueueDriver(mem, base=0x10000 + i * 0x10000) for i in range(2)]
    drivers[1].next_free = drivers[1].data_start = 4 << 20
    line = Line()
    kicks = [Event(), Event()]
    dev.activate(mem, Interrupt(None, line), [(i, d.queue, k) for i, (d, k) in
                                              enumerate(zip(drivers, kicks))])
    try:
        init = F.IN_HEADER.pack(F.IN_HEADER.size + 16, F.INIT, 1, 0, 0, 0, 0, 0, 0) + \
            struct.pack("<IIII", 7, 31, 1 << 20, 0)
        lookup = F.IN_HEADER.pack(F.IN_HEADER.size + 10, F.LOOKUP, 2, 1, 0, 0, 0, 0, 0) + \
            b"hello.txt\0"
        _, (init_reply,) = drivers[1].add_buffers([init], [4096])
        _, (lookup_reply,) = drivers[1].add_buffers([lookup], [4096])
        kicks[1].signal()
        assert wait_signalled(line.trigger)
        used = drivers[1].used()
        _, error, unique = F.OUT_HEADER.unpack(mem.read(lookup_reply, F.OUT_HEADER.size))
        size = struct.unpack_from("<Q", mem.read(lookup_reply + 16 + 40 + 8, 8))[0]
    finally:
        dev.close()

    assert (len(used), error, unique, size) == (2, 0, 2, 2)


def test_fs_device_close_releases_its_fds(tmp_path, mem):
    before = len(os.listdir("/proc/self/fd"))
    dev = Fs(option(tmp_path, type="fs"))
    dev.share_fds()

    dev.close()

    assert len(os.listdir("/proc/self/fd")) == before


def test_share_root_is_the_directory_as_it_was_at_start(tmp_path):
    share = tmp_path / "share"
    share.mkdir()
    (share / "mine.txt").write_text("x")
    dev = Fs(SharedDirOption(src=str(share), tag="t", type="fs"))
    share.rename(tmp_path / "moved")
    os.symlink("/etc", share)  # swapped for a symlink before the guest activates it

    dir_fd = os.open(".", os.O_RDONLY | os.O_DIRECTORY, dir_fd=dev.share_fds()[0])
    names = os.listdir(dir_fd)
    os.close(dir_fd)
    dev.close()

    assert names == ["mine.txt"]


def test_share_of_a_symlink_is_its_target(tmp_path):
    (tmp_path / "real").mkdir()
    os.symlink("real", tmp_path / "link")

    dev = Fs(SharedDirOption(src=str(tmp_path / "link"), tag="t", type="fs"))
    dev.close()

    assert dev.src == str(tmp_path / "real")
