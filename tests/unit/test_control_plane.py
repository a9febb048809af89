"""Issue 11's control plane without a guest: deferred answers, ACPI events on the SCI,
request parsing, device control requests (in process and through a device process),
queue workers that sleep and wake, the Python API's wire shapes, the CLI's usage errors."""

from __future__ import annotations

import os
import select
import socket
import threading

import pytest

from crosvm import control
from crosvm.arch.x86_64.acpi import PmPorts
from crosvm.base import Event
from crosvm.cli.main import main
from crosvm.devices import control as C
from crosvm.devices.acpi import PM1_PWRBTN, AcpiPm
from crosvm.devices.proxy import DeviceProcess, HostRequests, PciProxy
from crosvm.devices.virtio import block as B
from crosvm.devices.virtio.driver import QueueDriver
from crosvm.devices.virtio.rng import Rng
from crosvm.devices.virtio.virtio_device import Interrupt
from crosvm.devices.virtio.virtio_pci import VirtioPciDevice
from crosvm.disk import RawDisk
from crosvm.vm_control import ControlServer, handle_request
from crosvm.vm_control.handlers import RequestError, parse_disk_command, parse_gpe
from crosvm.vm_control.server import Deferred
from crosvm.vm_memory import GuestMemory
from tests.unit.interrupts import Line

PORTS = PmPorts()


# -- the server's deferred answers ------------------------------------------------------
def test_deferred_answer_arrives_when_work_finishes_and_others_are_served_meanwhile(tmp_path):
    release = threading.Event()
    srv = ControlServer(str(tmp_path / "vm.sock"), {
        "Slow": lambda: Deferred(lambda: release.wait(10) and "Ok"),
        "Fast": lambda: "Ok"})
    srv.start()
    try:
        slow = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        slow.connect(srv.path)
        slow.send(b'"Slow"')

        fast = handle_request("Fast", srv.path)
        waiting = select.select([slow], [], [], 0.2)[0]
        release.set()
        slow_answer = slow.recv(100)
        slow.close()
    finally:
        srv.close()

    assert fast == "Ok"
    assert waiting == []
    assert slow_answer == b'"Ok"'


def test_deferred_work_that_raises_answers_errstring(tmp_path):
    srv = ControlServer(str(tmp_path / "vm.sock"),
                        {"Bad": lambda: Deferred(lambda: 1 // 0)})
    srv.start()
    try:
        response = handle_request("Bad", srv.path)
    finally:
        srv.close()

    assert response == {"ErrString": "request failed: integer division or modulo by zero"}


# -- ACPI fixed events and GPEs ----------------------------------------------------------
def acpi() -> tuple[AcpiPm, list[bool]]:
    levels: list[bool] = []
    return AcpiPm(PORTS, lambda: None, lambda: None, sci=levels.append), levels


def test_power_button_sets_status_but_no_sci_until_enabled():
    pm, levels = acpi()

    pm.power_button()
    status = bytearray(2)
    pm.read(0, PORTS.pm1_evt, memoryview(status))

    assert int.from_bytes(status, "little") & PM1_PWRBTN
    assert levels == []


def test_enabled_power_button_raises_sci_and_clearing_status_lowers_it():
    pm, levels = acpi()
    pm.write(2, PORTS.pm1_evt + 2, PM1_PWRBTN.to_bytes(2, "little"))

    pm.power_button()
    pm.write(0, PORTS.pm1_evt, PM1_PWRBTN.to_bytes(2, "little"))  # write 1 to clear

    assert levels == [True, False]


def test_enabled_gpe_raises_sci():
    pm, levels = acpi()
    pm.write(2, PORTS.gpe0 + 2, (1 << 3).to_bytes(2, "little"))

    pm.gpe(3)

    assert levels == [True]


def test_gpe_out_of_range_is_refused():
    pm, _ = acpi()

    with pytest.raises(ValueError, match="out of range"):
        pm.gpe(16)


# -- request parsing -------------------------------------------------------------------
def test_disk_command_resize_is_parsed():
    payload = {"disk_index": 1, "command": {"Resize": {"new_size": 4096}}}

    assert parse_disk_command(payload) == (1, 4096)


@pytest.mark.parametrize("payload", [
    None, {"disk_index": -1, "command": {"Resize": {"new_size": 1}}},
    {"disk_index": 0, "command": "Resize"}, {"disk_index": 0, "command": {"Grow": {}}},
    {"disk_index": 0, "command": {"Resize": {"new_size": True}}},
    {"disk_index": 0, "command": {"Resize": {"new_size": 1 << 64}}}])
def test_malformed_disk_command_is_refused(payload):
    with pytest.raises(RequestError):
        parse_disk_command(payload)


@pytest.mark.parametrize("payload,number", [(3, 3), ({"gpe": 5, "clear_evt": None}, 5)])
def test_gpe_both_crosvm_shapes_are_parsed(payload, number):
    assert parse_gpe(payload) == number


# -- device control results --------------------------------------------------------------
@pytest.mark.parametrize("data", [b"", b"\x02", b"\x00extra", b"\x00" + bytes(3)])
def test_malformed_device_answer_is_refused(data):
    with pytest.raises(C.DeviceControlError):
        C.decode_result(C.CTRL_RESIZE, data)


def test_device_error_answer_carries_its_message_without_control_characters():
    with pytest.raises(C.DeviceControlError, match=r"^bad\?size$"):
        C.decode_result(C.CTRL_RESIZE, C.encode_error("bad\nsize"))


# -- block resize ------------------------------------------------------------------------
@pytest.fixture
def mem():
    m = GuestMemory([(0, 8 << 20)])
    yield m
    m.close()


def virtio_block(mem, path, read_only=False) -> VirtioPciDevice:
    block = B.Block(RawDisk(path, read_only=read_only))
    n = VirtioPciDevice.num_msix_vectors(block)
    return VirtioPciDevice(block, mem, [Event() for _ in range(n)], lambda *a: None)


def capacity(dev: VirtioPciDevice) -> int:
    data = memoryview(bytearray(8))
    dev.device.read_config(0, data)
    return int.from_bytes(data, "little")


def test_block_resize_grows_file_capacity_and_config_generation(mem, tmp_path):
    path = tmp_path / "disk.img"
    path.write_bytes(bytes(1 << 20))
    dev = virtio_block(mem, str(path))

    result = dev.control(C.CTRL_RESIZE, 2 << 20)

    assert C.decode_result(C.CTRL_RESIZE, result) == b""
    assert os.path.getsize(path) == 2 << 20
    assert capacity(dev) == (2 << 20) // 512
    assert dev.config_generation == 1


def test_block_resize_of_read_only_disk_is_refused(mem, tmp_path):
    path = tmp_path / "disk.img"
    path.write_bytes(bytes(1 << 20))
    dev = virtio_block(mem, str(path), read_only=True)

    with pytest.raises(C.DeviceControlError, match="read-only"):
        C.decode_result(C.CTRL_RESIZE, dev.control(C.CTRL_RESIZE, 2 << 20))
    assert os.path.getsize(path) == 1 << 20


def test_block_resize_to_unaligned_size_is_refused(mem, tmp_path):
    path = tmp_path / "disk.img"
    path.write_bytes(bytes(1 << 20))
    dev = virtio_block(mem, str(path))

    with pytest.raises(C.DeviceControlError, match="multiple of 512"):
        C.decode_result(C.CTRL_RESIZE, dev.control(C.CTRL_RESIZE, 1000))


def test_block_resize_crosses_the_device_process(mem, tmp_path):
    path = tmp_path / "disk.img"
    path.write_bytes(bytes(1 << 20))
    dev = virtio_block(mem, str(path))
    host = HostRequests()
    proc = DeviceProcess(dev, "test_block", dev.device.keep_fds(), None, host)
    proxy = PciProxy(proc, dev, host, lambda why: None)
    try:
        result = proxy.control(C.CTRL_RESIZE, 3 << 20)
        unknown = proxy.control(99, 0)
    finally:
        proc.shutdown()
        proc.reap()

    assert C.decode_result(C.CTRL_RESIZE, result) == b""
    assert os.path.getsize(path) == 3 << 20
    with pytest.raises(C.DeviceControlError, match="unknown device request 99"):
        C.decode_result(99, unknown)


# -- a worker that sleeps and wakes --------------------------------------------------------
def test_paused_worker_serves_a_kick_only_after_resume(mem):
    rng = Rng()
    drv = QueueDriver(mem)
    line, kick = Line(), Event()
    rng.activate(mem, Interrupt(None, line), [(0, drv.queue, kick)])
    try:
        paused = rng.worker.pause()
        drv.add_buffers([], [16])
        kick.signal()
        served_while_paused = bool(select.select([line.trigger.fd], [], [], 0.3)[0])
        rng.worker.resume()
        served_after = bool(select.select([line.trigger.fd], [], [], 5)[0])
    finally:
        rng.close()

    assert paused
    assert not served_while_paused
    assert served_after
    assert drv.used()[0][1] == 16


# -- the Python API speaks crosvm's JSON --------------------------------------------------
@pytest.fixture
def recorder(tmp_path):
    seen: list[object] = []

    def record(name):
        return lambda *payload: seen.append({name: payload[0]} if payload else name) or "Ok"

    names = ["Exit", "SuspendVcpus", "SuspendVm", "ResumeVcpus", "ResumeVm", "Powerbtn",
             "Sleepbtn", "Gpe", "DiskCommand", "BalloonCommand"]
    srv = ControlServer(str(tmp_path / "vm.sock"), {n: record(n) for n in names})
    srv.start()
    yield srv.path, seen
    srv.close()


@pytest.mark.parametrize("call,wire", [
    (lambda s: control.stop(s), "Exit"),
    (lambda s: control.suspend(s), "SuspendVcpus"),
    (lambda s: control.suspend(s, full=True), "SuspendVm"),
    (lambda s: control.resume(s, full=True), "ResumeVm"),
    (lambda s: control.powerbtn(s), "Powerbtn"),
    (lambda s: control.gpe(s, 4), {"Gpe": {"gpe": 4, "clear_evt": None}}),
    (lambda s: control.disk_resize(s, 0, 4096),
     {"DiskCommand": {"disk_index": 0, "command": {"Resize": {"new_size": 4096}}}}),
    (lambda s: control.balloon(s, 1 << 20),
     {"BalloonCommand": {"Adjust": {"num_bytes": 1 << 20, "wait_for_success": False}}}),
])
def test_python_api_sends_crosvm_json_shape(recorder, call, wire):
    path, seen = recorder

    call(path)

    assert seen == [wire]


def test_python_api_raises_errstring_as_control_error(tmp_path):
    srv = ControlServer(str(tmp_path / "vm.sock"),
                        {"Powerbtn": lambda: {"ErrString": "no ACPI"}})
    srv.start()
    try:
        with pytest.raises(control.ControlError, match="no ACPI"):
            control.powerbtn(srv.path)
    finally:
        srv.close()


def test_balloon_stats_response_becomes_dataclass():
    response = {"BalloonStats": {"stats": {"free_memory": 100, "total_memory": 200,
                                           "swap_in": None}, "balloon_actual": 4096}}

    stats = control.BalloonStats.from_response(response)

    assert (stats.free_memory, stats.total_memory, stats.swap_in) == (100, 200, None)
    assert stats.balloon_actual == 4096


# -- the CLI ---------------------------------------------------------------------------------
@pytest.mark.parametrize("args", [
    ["disk", "resize", "0", "lots", "/tmp/sock"], ["disk", "grow", "0", "1", "/tmp/sock"],
    ["suspend", "--fast", "/tmp/sock"], ["gpe", "/tmp/sock"], ["balloon", "/tmp/sock"],
    ["powerbtn"]])
def test_control_command_with_bad_arguments_exits_35(args, capsys):
    code = main(args)

    assert code == 35
    assert capsys.readouterr().err.count("\n") == 1


def test_control_command_without_a_vm_exits_1(tmp_path, capsys):
    code = main(["suspend", str(tmp_path / "nothing.sock")])

    assert code == 1
    assert "cannot reach the VM" in capsys.readouterr().err


def test_block_resize_grows_a_qcow2_image_through_set_len(mem, tmp_path):
    from crosvm.disk import open_disk
    from crosvm.disk.qcow2 import create_qcow2
    path = str(tmp_path / "disk.qcow2")
    create_qcow2(path, 1 << 20)
    block = B.Block(open_disk(path))
    dev = VirtioPciDevice(block, mem, [Event() for _ in range(2)], lambda *a: None)

    result = dev.control(C.CTRL_RESIZE, 4 << 20)
    seen = capacity(dev)
    dev.close()
    reopened = open_disk(path, read_only=True)

    assert C.decode_result(C.CTRL_RESIZE, result) == b""
    assert seen == (4 << 20) // 512
    assert reopened.size == 4 << 20
    reopened.close()


class FakeVcpu:
    def __init__(self) -> None:
        self.running = True

    def suspend(self) -> None:
        self.running = False

    def resume(self) -> None:
        self.running = True

    def is_parked(self) -> bool:
        return not self.running


def test_suspend_answers_ok_once_every_vcpu_is_parked_and_resume_releases_them():
    from types import SimpleNamespace

    from crosvm.vm_control.handlers import vm_handlers
    vcpus = [FakeVcpu(), FakeVcpu()]
    handlers = vm_handlers(SimpleNamespace(vcpus=vcpus, _exit_request=lambda: "Ok"))

    suspended = handlers["SuspendVcpus"]().work()
    parked = [v.is_parked() for v in vcpus]
    resumed = handlers["ResumeVcpus"]()

    assert suspended == "Ok"
    assert parked == [True, True]
    assert resumed == "Ok"
    assert [v.running for v in vcpus] == [True, True]


def test_disk_resize_of_a_missing_disk_names_the_index():
    from types import SimpleNamespace

    from crosvm.vm_control.handlers import vm_handlers
    handlers = vm_handlers(SimpleNamespace(block_targets=[], _exit_request=lambda: "Ok"))

    response = handlers["DiskCommand"]({"disk_index": 2,
                                        "command": {"Resize": {"new_size": 512}}})

    assert response == {"ErrString": "disk index 2 out of range (the VM has 0 disks)"}


# -- review findings: pauses that fail or overlap, bounded server threads, arguments ----
def test_pause_that_times_out_is_undone_and_later_kicks_are_served(mem):
    rng = Rng()
    drv = QueueDriver(mem)
    line, kick = Line(), Event()
    busy = threading.Event()
    release = threading.Event()
    rng.activate(mem, Interrupt(None, line), [(0, drv.queue, kick)])
    worker = rng.worker
    handle = worker._handle
    worker._handle = lambda i: (busy.set(), release.wait(10), handle(i))[2]
    try:
        drv.add_buffers([], [16])
        kick.signal()
        busy.wait(5)
        paused = worker.pause(timeout=0.2)   # the worker is inside a long request
        release.set()
        line.trigger.wait()                  # that request ends
        drv.add_buffers([], [16])
        kick.signal()
        served_later = bool(select.select([line.trigger.fd], [], [], 5)[0])
    finally:
        release.set()
        rng.close()

    assert paused is False
    assert served_later


def test_worker_paused_twice_sleeps_until_both_pauses_end(mem):
    rng = Rng()
    drv = QueueDriver(mem)
    line, kick = Line(), Event()
    rng.activate(mem, Interrupt(None, line), [(0, drv.queue, kick)])
    try:
        first = rng.worker.pause()     # `suspend --full`
        second = rng.worker.pause()    # a resize meanwhile
        rng.worker.resume()            # the resize is done
        drv.add_buffers([], [16])
        kick.signal()
        served_while_suspended = bool(select.select([line.trigger.fd], [], [], 0.3)[0])
        rng.worker.resume()            # `resume --full`
        served_after = bool(select.select([line.trigger.fd], [], [], 5)[0])
    finally:
        rng.close()

    assert (first, second) == (True, True)
    assert not served_while_suspended
    assert served_after


def test_full_suspend_asked_twice_is_undone_by_one_resume(mem):
    rng = Rng()
    dev = VirtioPciDevice(rng, mem, [Event() for _ in range(VirtioPciDevice.num_msix_vectors(rng))],
                          lambda *a: None)
    worker = FakeWorker()
    dev.activated = True
    dev.device.worker = worker

    answers = [C.decode_result(code, dev.control(code, 0))
               for code in (C.CTRL_SLEEP, C.CTRL_SLEEP, C.CTRL_WAKE)]

    assert answers == [C.SLEPT, C.ALREADY, b""]
    assert (worker.pauses, worker.resumes) == (1, 1)


class FakeWorker:
    def __init__(self) -> None:
        self.pauses = self.resumes = 0

    def pause(self) -> bool:
        self.pauses += 1
        return True

    def resume(self) -> None:
        self.resumes += 1


def occupy_deferred_slots(srv: ControlServer) -> list[socket.socket]:
    """MAX_DEFERRED clients that each sent "Slow" and wait for the answer meanwhile."""
    from crosvm.vm_control.server import MAX_DEFERRED
    clients = []
    for _ in range(MAX_DEFERRED):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        s.connect(srv.path)
        s.send(b'"Slow"')
        clients.append(s)
    return clients


def test_deferred_requests_beyond_the_cap_are_refused_as_busy(tmp_path):
    from crosvm.vm_control.server import MAX_DEFERRED
    release = threading.Event()
    srv = ControlServer(str(tmp_path / "vm.sock"),
                        {"Slow": lambda: Deferred(lambda: release.wait(10) and "Ok")})
    srv.start()
    clients = []
    try:
        clients = occupy_deferred_slots(srv)
        extra = handle_request("Slow", srv.path)
        release.set()
    finally:
        release.set()
        for s in clients:
            s.close()
        srv.close()

    assert extra == {"ErrString": f"busy: {MAX_DEFERRED} requests are in progress"}


@pytest.mark.parametrize("request_, answer", [
    ('"Gpe"', {"ErrString": "Gpe needs arguments"}),
    ('{"Powerbtn": 1}', {"ErrString": "Powerbtn takes no arguments"}),
])
def test_request_with_wrong_arguments_is_refused_plainly(tmp_path, request_, answer):
    import json
    from types import SimpleNamespace

    from crosvm.vm_control.handlers import vm_handlers
    handlers = vm_handlers(SimpleNamespace(_exit_request=lambda: "Ok"))
    srv = ControlServer(str(tmp_path / "vm.sock"), handlers)

    response = srv.respond(request_.encode())
    srv.close()

    assert response == answer
    assert json.dumps(response)


def test_balloon_larger_than_guest_memory_is_refused():
    from types import SimpleNamespace

    from crosvm.vm_control.handlers import vm_handlers
    handlers = vm_handlers(SimpleNamespace(balloon_target=object(), mem_size=256 << 20,
                                           _exit_request=lambda: "Ok"))

    response = handlers["BalloonCommand"]({"Adjust": {"num_bytes": 8 << 40,
                                                      "wait_for_success": False}})

    assert response == {"ErrString": f"balloon size {8 << 40} is larger than the guest's "
                                     f"memory ({256 << 20} bytes)"}


class StuckVcpu(FakeVcpu):
    def is_parked(self) -> bool:
        return False


def test_suspend_that_times_out_lets_the_vcpus_run_again(monkeypatch):
    from types import SimpleNamespace

    from crosvm.vm_control import handlers as H
    monkeypatch.setattr(H, "PARK_TIMEOUT", 0.1)
    vcpus = [FakeVcpu(), StuckVcpu()]
    handlers = H.vm_handlers(SimpleNamespace(vcpus=vcpus, _exit_request=lambda: "Ok"))

    response = handlers["SuspendVcpus"]().work()

    assert response == {"ErrString": "the vCPUs did not stop in time"}
    assert [v.running for v in vcpus] == [True, True]


def test_block_resize_beyond_a_file_offset_is_refused(mem, tmp_path):
    path = tmp_path / "disk.img"
    path.write_bytes(bytes(1 << 20))
    dev = virtio_block(mem, str(path))

    with pytest.raises(C.DeviceControlError, match="too large"):
        C.decode_result(C.CTRL_RESIZE, dev.control(C.CTRL_RESIZE, 1 << 63))


class SleepTarget:
    """A device as the handlers see it: answers CTRL_SLEEP/CTRL_WAKE like
    VirtioPciDevice.control, or refuses to sleep."""

    def __init__(self, refuse: bool = False, asleep: bool = False) -> None:
        self.refuse = refuse
        self.asleep = asleep

    def control(self, code: int, arg: int) -> bytes:
        if code == C.CTRL_SLEEP:
            if self.refuse:
                return C.encode_error("the worker did not stop in time")
            newly, self.asleep = not self.asleep, True
            return C.encode_ok(C.SLEPT if newly else C.ALREADY)
        self.asleep = False
        return C.encode_ok()


def test_full_suspend_that_a_device_refuses_wakes_what_it_slept_and_runs_the_vcpus():
    from types import SimpleNamespace

    from crosvm.vm_control.handlers import vm_handlers
    vcpus = [FakeVcpu()]
    earlier, fresh, stuck = SleepTarget(asleep=True), SleepTarget(), SleepTarget(refuse=True)
    handlers = vm_handlers(SimpleNamespace(vcpus=vcpus, _exit_request=lambda: "Ok",
                                           virtio_targets=lambda: [earlier, fresh, stuck]))

    response = handlers["SuspendVm"]().work()

    assert response == {"ErrString": "the worker did not stop in time"}
    assert [v.running for v in vcpus] == [True]
    assert (earlier.asleep, fresh.asleep) == (True, False)


def test_suspend_refused_as_busy_leaves_the_vcpus_running(tmp_path):
    from types import SimpleNamespace

    from crosvm.vm_control.handlers import vm_handlers
    from crosvm.vm_control.server import MAX_DEFERRED
    vcpus = [FakeVcpu()]
    release = threading.Event()
    handlers = vm_handlers(SimpleNamespace(vcpus=vcpus, _exit_request=lambda: "Ok"))
    handlers["Slow"] = lambda: Deferred(lambda: release.wait(10) and "Ok")
    srv = ControlServer(str(tmp_path / "vm.sock"), handlers)
    srv.start()
    clients = []
    try:
        clients = occupy_deferred_slots(srv)
        response = handle_request("SuspendVcpus", srv.path)
    finally:
        release.set()
        for s in clients:
            s.close()
        srv.close()

    assert response == {"ErrString": f"busy: {MAX_DEFERRED} requests are in progress"}
    assert [v.running for v in vcpus] == [True]
