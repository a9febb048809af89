"""virtio-pmem: the request parser, the flush queue, the file mapping and the options."""

from __future__ import annotations

import logging
import os
import struct

import pytest

from crosvm.cli import main as cli_main
from crosvm.cli.main import parse_run_args
from crosvm.config import ConfigError
from crosvm.devices.virtio import pmem as P
from crosvm.devices.virtio.driver import QueueDriver
from crosvm.devices.virtio.virtio_device import BASE_FEATURES
from crosvm.disk import DiskError
from crosvm.disk.qcow2 import create_qcow2
from crosvm.vm_memory import GuestMemory
from crosvm.vmm.pci import AddressAllocator
from crosvm.vmm.run import kernel_cmdline
from tests.unit.test_cli_config import config_from

MiB = 1 << 20
FLUSH = struct.pack("<I", P.REQ_TYPE_FLUSH)


@pytest.fixture
def mem():
    m = GuestMemory([(0, 4 * MiB)])
    yield m
    m.close()


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "pmem.img"
    path.write_bytes(bytes(range(256)) * (2 * MiB // 256))
    return str(path)


class Flush:
    """Stands in for the file's sync; counts calls and can fail."""

    def __init__(self, error: OSError | None = None) -> None:
        self.calls = 0
        self.error = error

    def __call__(self) -> None:
        self.calls += 1
        if self.error is not None:
            raise self.error


def submit(mem, device, readable, writable):
    """Post one chain and let the device answer it; returns (used length, response bytes)."""
    drv = QueueDriver(mem)
    _, addrs = drv.add_buffers(readable, writable)
    used = device.process_chain(mem, drv.queue.pop(mem))
    response = mem.read(addrs[0], writable[0]) if writable else b""
    return used, response


# -- the parser ---------------------------------------------------------------------
def test_parse_request_returns_flush_type():
    assert P.parse_request(FLUSH) == P.REQ_TYPE_FLUSH


def test_parse_request_ignores_bytes_after_the_type():
    assert P.parse_request(struct.pack("<I", 7) + b"extra") == 7


def test_parse_request_rejects_short_request():
    with pytest.raises(P.PmemRequestError, match="request of 3 bytes"):
        P.parse_request(b"\0\0\0")


def test_execute_flush_syncs_and_answers_ok():
    flush = Flush()
    status = P.execute(FLUSH, flush)
    assert (status, flush.calls) == (P.RESP_OK, 1)


def test_execute_unknown_type_answers_eio_without_syncing():
    flush = Flush()
    status = P.execute(struct.pack("<I", 1), flush)
    assert (status, flush.calls) == (P.RESP_EIO, 0)


def test_execute_short_request_answers_eio_without_syncing():
    flush = Flush()
    status = P.execute(b"\0", flush)
    assert (status, flush.calls) == (P.RESP_EIO, 0)


def test_execute_failed_sync_answers_eio():
    status = P.execute(FLUSH, Flush(OSError(5, "Input/output error")))
    assert status == P.RESP_EIO


# -- the device ---------------------------------------------------------------------
def test_pmem_is_device_type_27_with_one_queue_and_no_extra_features(image):
    device = P.Pmem(P.PmemFile(image, read_only=False), 0x1_0000_0000)
    try:
        assert (device.device_type, device.queue_max_sizes(), device.features()) == (
            27, [P.QUEUE_SIZE], BASE_FEATURES)
    finally:
        device.close()


def test_config_space_holds_guest_start_and_size(image):
    device = P.Pmem(P.PmemFile(image, read_only=False), 0x1_4000_0000)
    try:
        assert struct.unpack("<QQ", device.config_bytes()) == (0x1_4000_0000, 2 * MiB)
    finally:
        device.close()


def test_flush_request_through_queue_answers_ok_and_syncs(mem, image, monkeypatch):
    device = P.Pmem(P.PmemFile(image, read_only=False), 0x1_0000_0000)
    synced = []
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(fd))
    try:
        used, response = submit(mem, device, [FLUSH], [4])
        assert (used, response, synced) == (4, struct.pack("<I", P.RESP_OK), [device.file.fd])
    finally:
        device.close()


def test_flush_of_read_only_pmem_answers_ok_without_syncing(mem, image, monkeypatch):
    device = P.Pmem(P.PmemFile(image, read_only=True), 0x1_0000_0000)
    synced = []
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(fd))
    try:
        used, response = submit(mem, device, [FLUSH], [4])
        assert (used, response, synced) == (4, struct.pack("<I", P.RESP_OK), [])
    finally:
        device.close()


def test_request_without_room_for_response_is_returned_empty(mem, image):
    device = P.Pmem(P.PmemFile(image, read_only=False), 0x1_0000_0000)
    try:
        used, response = submit(mem, device, [FLUSH], [3])
        assert (used, response) == (0, bytes(3))
    finally:
        device.close()


def test_request_without_readable_bytes_answers_eio(mem, image):
    device = P.Pmem(P.PmemFile(image, read_only=False), 0x1_0000_0000)
    try:
        used, response = submit(mem, device, [], [4])
        assert (used, response) == (4, struct.pack("<I", P.RESP_EIO))
    finally:
        device.close()


def test_unsupported_request_is_logged_once_per_burst(mem, image, caplog):
    device = P.Pmem(P.PmemFile(image, read_only=False), 0x1_0000_0000)
    caplog.set_level(logging.WARNING, logger="crosvm.devices.virtio.pmem")
    try:
        for _ in range(50):
            submit(mem, device, [struct.pack("<I", 9)], [4])
        assert len(caplog.records) <= 10
    finally:
        device.close()


# -- the mapping --------------------------------------------------------------------
def test_mapping_shows_file_contents(image):
    pmem_file = P.PmemFile(image, read_only=True)
    try:
        assert bytes(pmem_file.view()[:2 * MiB]) == open(image, "rb").read()
    finally:
        pmem_file.close()


def test_stores_to_writable_mapping_reach_the_file(image):
    pmem_file = P.PmemFile(image, read_only=False)
    try:
        pmem_file.view()[4096:4100] = b"pmem"
        pmem_file.sync()
        with open(image, "rb") as f:
            f.seek(4096)
            assert f.read(4) == b"pmem"
    finally:
        pmem_file.close()


def test_size_is_padded_to_2_mib_with_zero_pages(tmp_path):
    path = tmp_path / "odd.img"
    path.write_bytes(b"\xff" * 5000)
    pmem_file = P.PmemFile(str(path), read_only=False)
    try:
        view = pmem_file.view()
        assert (pmem_file.size, bytes(view[:5000]), bytes(view[8192:2 * MiB])) == (
            2 * MiB, b"\xff" * 5000, bytes(2 * MiB - 8192))
    finally:
        pmem_file.close()


def test_stores_to_padding_do_not_grow_the_file(tmp_path):
    path = tmp_path / "odd.img"
    path.write_bytes(b"\xff" * 5000)
    pmem_file = P.PmemFile(str(path), read_only=False)
    try:
        pmem_file.view()[MiB] = 1
        pmem_file.sync()
        assert os.path.getsize(path) == 5000
    finally:
        pmem_file.close()


def test_qcow2_image_is_refused(tmp_path):
    path = str(tmp_path / "disk.qcow2")
    create_qcow2(path, 4 * MiB)
    with pytest.raises(DiskError, match="a qcow2 image cannot be mapped"):
        P.PmemFile(path, read_only=True)


def test_empty_file_is_refused(tmp_path):
    path = tmp_path / "empty.img"
    path.write_bytes(b"")
    with pytest.raises(DiskError, match="the file is empty"):
        P.PmemFile(str(path), read_only=False)


def test_missing_file_is_refused(tmp_path):
    with pytest.raises(DiskError, match="failed to open"):
        P.PmemFile(str(tmp_path / "nope.img"), read_only=True)


def test_writable_pmem_file_is_locked_against_a_second_writer(image):
    first = P.PmemFile(image, read_only=False)
    try:
        with pytest.raises(DiskError, match="locked"):
            P.PmemFile(image, read_only=False)
    finally:
        first.close()


def test_allocator_aligns_to_requested_alignment():
    allocator = AddressAllocator(0x1_0000_0000, 1 << 36)
    allocator.allocate(0x1000)
    assert allocator.allocate(2 * MiB, P.ADDRESS_ALIGN) == 0x1_0000_0000 + P.ADDRESS_ALIGN


# -- options ------------------------------------------------------------------------
def test_pmem_option_takes_ro_and_root():
    p = config_from(["--pmem", "img,ro,root"]).pmems[0]
    assert (p.path, p.ro, p.root) == ("img", True, True)


def test_pmem_option_defaults_to_writable_non_root():
    p = config_from(["--pmem", "path=img"]).pmems[0]
    assert (p.path, p.ro, p.root) == ("img", False, False)


def test_deprecated_pmem_device_is_read_only_and_warns(monkeypatch):
    warnings = []
    # The crosvm logger's handlers depend on earlier tests (main() sets them up).
    monkeypatch.setattr(cli_main.log, "warning", lambda msg, *args: warnings.append(msg % args))
    p = config_from(["--pmem-device", "img"]).pmems[0]
    assert (p.ro, warnings) == (True, ["--pmem-device is deprecated, use --pmem PATH,ro"])


def test_deprecated_rw_pmem_device_is_writable():
    assert config_from(["--rw-pmem-device", "img"]).pmems[0].ro is False


def test_pmem_devices_keep_command_line_order():
    cfg = config_from(["--pmem", "a", "--pmem-device", "b", "--rw-pmem-device", "c"])
    assert [p.path for p in cfg.pmems] == ["a", "b", "c"]


def test_pmem_in_cfg_file(tmp_path):
    cfg_file = tmp_path / "vm.json"
    cfg_file.write_text('{"pmem": [{"path": "img", "ro": true}]}')
    p = config_from(["--cfg", str(cfg_file)]).pmems[0]
    assert (p.path, p.ro) == ("img", True)


def test_pmem_root_adds_root_to_kernel_command_line():
    cfg = config_from(["--pmem", "a", "--pmem", "b,ro,root", "-p", "quiet"])
    assert kernel_cmdline(cfg).endswith("root=/dev/pmem1 ro quiet")


def test_block_root_and_pmem_root_together_are_rejected():
    cfg = config_from(["--block", "a.img,root", "--pmem", "b.img,root", "vmlinux"])
    with pytest.raises(ConfigError, match="only one block or pmem device can be the root"):
        cfg.validate()


def test_deprecated_pmem_device_rejects_ro_key():
    with pytest.raises(Exception, match="ro"):
        parse_run_args(["--pmem-device", "img,ro", "vmlinux"])
