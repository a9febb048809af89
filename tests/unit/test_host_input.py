"""Issue 10: every host-side input gets one clear line, never a traceback, hang or runaway.

Each test feeds one hostile input from the issue through the real entry point. Inputs
that used to hang (FIFOs, /dev/zero) run under `bounded`, so a regression fails the
test instead of hanging the suite.
"""

from __future__ import annotations

import json
import logging
import os
import re
import queue
import signal
import subprocess
import sys
import threading

import pytest

from crosvm.cli.config_file import ConfigFileError, load_cfg
from crosvm.cli.main import main
from crosvm.config import SerialParameters
from crosvm.devices.serial_device import SerialError, open_input, open_output
from crosvm.disk import DiskError, RawDisk
from crosvm.jail.policy import PolicyError, load_policy
from crosvm.kernel_loader import KernelLoaderError, load_initrd, load_kernel

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HANG_GUARD = float(os.environ.get("CROSVM_TEST_HANG_GUARD", "30"))  # seconds; a guard against a hang, never a speed assertion


def bounded(fn, *args):
    """Runs fn(*args) in a thread; its result, or its exception re-raised. Fails the
    test if it has not returned within HANG_GUARD (it used to block forever)."""
    box: dict = {}

    def target():
        try:
            box["result"] = fn(*args)
        except BaseException as e:  # noqa: BLE001 - handed back to the test
            box["error"] = e

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(HANG_GUARD)
    if t.is_alive():
        pytest.fail(f"{getattr(fn, '__name__', fn)}{args} still blocked after {HANG_GUARD} s")
    if "error" in box:
        raise box["error"]
    return box.get("result")


@pytest.fixture
def fifo(tmp_path):
    path = tmp_path / "fifo"
    os.mkfifo(path)
    return str(path)


def run_cli(capsys, *args):
    """(exit code, stderr lines) of `crosvm run ARGS`."""
    code = main(["run", *args])
    err = capsys.readouterr().err
    return code, err.splitlines()


# --- command line: one line, exit 35 -----------------------------------------------

def test_serial_with_400_brackets_is_one_line_exit_35(capsys):
    code, err = run_cli(capsys, "--serial", "[" * 400, "k")

    assert code == 35
    assert len(err) == 1 and "--serial" in err[0] and "nest" in err[0]


def test_hypervisor_empty_list_is_one_line_exit_35(capsys):
    code, err = run_cli(capsys, "--hypervisor", "[]", "k")

    assert code == 35
    assert len(err) == 1 and "--hypervisor" in err[0]


def test_params_with_non_utf8_byte_is_one_line_exit_35(capsys):
    code, err = run_cli(capsys, "-p", os.fsdecode(b"\xff"), "k")

    assert code == 35
    assert len(err) == 1 and "UTF-8" in err[0]


def test_block_id_with_non_utf8_byte_is_one_line_exit_35(capsys):
    code, err = run_cli(capsys, "--block", "x.img,id=" + os.fsdecode(b"\xff"), "k")

    assert code == 35
    assert len(err) == 1 and "UTF-8" in err[0]


def test_cpus_arabic_indic_digit_is_rejected(capsys):
    code, err = run_cli(capsys, "--cpus", "\u0663", "k")

    assert code == 35
    assert len(err) == 1 and "invalid number" in err[0]


def test_error_names_the_option_once(capsys):
    code, err = run_cli(capsys, "--hypervisor", "xen", "k")

    assert code == 35
    assert err[0].count("--hypervisor") == 1


def test_cfg_error_names_file_and_key_once(tmp_path, capsys):
    f = tmp_path / "x.json"
    f.write_text('{"cpus": true}')

    code, err = run_cli(capsys, "--cfg", str(f), "k")

    assert code == 35
    assert err[0].count(str(f)) == 1 and err[0].count("cpus") == 1


# --- --cfg files -------------------------------------------------------------------

@pytest.mark.parametrize("text, why", [
    ('{"hypervisor": {"kvm": 5}}', "hypervisor"),
    ("[" * 2000 + "]" * 2000, "nest"),
    ('{"cpus": ' + "9" * 5000 + "}", "number"),
    ('{"kernel": "\\ud800"}', "UTF-8"),
], ids=["variant-not-object", "2000-deep", "5000-digit-int", "lone-surrogate"])
def test_bad_cfg_content_is_one_line_exit_35(tmp_path, capsys, text, why):
    f = tmp_path / "vm.json"
    f.write_text(text)

    code, err = run_cli(capsys, "--cfg", str(f), "k")

    assert code == 35
    assert len(err) == 1 and str(f) in err[0] and why in err[0]


def test_cfg_with_non_utf8_bytes_is_one_line_exit_35(tmp_path, capsys):
    f = tmp_path / "vm.json"
    f.write_bytes(b'{"kernel": "\xff"}')

    code, err = run_cli(capsys, "--cfg", str(f), "k")

    assert code == 35
    assert len(err) == 1 and "UTF-8" in err[0]


def test_cfg_fifo_is_refused_without_blocking(fifo):
    with pytest.raises(ConfigFileError, match="fifo.*FIFO"):
        bounded(load_cfg, fifo)


def test_cfg_dev_zero_is_refused_without_reading_it():
    with pytest.raises(ConfigFileError, match="/dev/zero.*character device"):
        bounded(load_cfg, "/dev/zero")


def test_cfg_larger_than_the_cap_is_refused(tmp_path):
    f = tmp_path / "big.json"
    f.write_text('{"params": ["' + "a" * (2 << 20) + '"]}')

    with pytest.raises(ConfigFileError, match="larger than"):
        load_cfg(str(f))


def test_cfg_includes_that_fan_out_are_bounded(tmp_path):
    (tmp_path / "leaf.json").write_text("{}")
    for level in range(6):  # each file includes the one below it 8 times: 8**6 loads
        below = "leaf.json" if level == 0 else f"l{level - 1}.json"
        (tmp_path / f"l{level}.json").write_text(json.dumps({"cfg": [below] * 8}))

    with pytest.raises(ConfigFileError, match="more than .* config files to load"):
        bounded(load_cfg, str(tmp_path / "l5.json"))


# --- files the VMM opens: checked before a blocking open ---------------------------

def test_kernel_fifo_is_refused_without_blocking(fifo):
    with pytest.raises(KernelLoaderError, match="fifo.*FIFO"):
        bounded(load_kernel, None, fifo)


def test_kernel_directory_is_refused_naming_it(tmp_path):
    with pytest.raises(KernelLoaderError, match=f"{tmp_path}.*directory"):
        load_kernel(None, str(tmp_path))


def test_initrd_fifo_is_refused_without_blocking(fifo):
    with pytest.raises(KernelLoaderError, match="fifo.*FIFO"):
        bounded(load_initrd, None, fifo, 0, 0)


def test_serial_output_fifo_without_reader_is_refused_without_blocking(fifo):
    with pytest.raises(SerialError, match="fifo.*no reader"):
        bounded(open_output, SerialParameters(type="file", path=fifo))


def test_serial_output_fifo_with_reader_is_accepted(fifo):
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:
        out = bounded(open_output, SerialParameters(type="file", path=fifo))
        out.write(b"hi")
        out.close()

        assert os.read(reader, 10) == b"hi"
    finally:
        os.close(reader)


def test_serial_input_fifo_opens_without_blocking(fifo):
    fd = bounded(open_input, SerialParameters(type="sink", input=fifo), None)

    assert fd is not None
    os.close(fd)


def test_serial_output_directory_is_refused(tmp_path):
    with pytest.raises(SerialError, match="directory"):
        open_output(SerialParameters(type="file", path=str(tmp_path)))


def test_block_fifo_is_refused_naming_it(fifo):
    with pytest.raises(DiskError, match="fifo.*FIFO"):
        bounded(RawDisk, fifo)


def test_block_directory_read_only_is_refused_naming_it(tmp_path):
    with pytest.raises(DiskError, match=f"{tmp_path}.*directory"):
        RawDisk(str(tmp_path), read_only=True)


# --- serial output that fails --------------------------------------------------------

@pytest.fixture
def serial_log():
    """The messages the serial backends log (the `crosvm` logger does not propagate
    to pytest's caplog once main() has set up logging)."""
    messages: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record):
            messages.append(record.getMessage())

    logger = logging.getLogger("crosvm.serial")
    handler = Collect(logging.WARNING)
    logger.addHandler(handler)
    yield messages
    logger.removeHandler(handler)


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_serial_output_to_dev_full_warns_once_then_rate_limited(serial_log):
    clock = FakeClock()
    out = open_output(SerialParameters(type="file", path="/dev/full"))
    out.errors.clock = clock

    for _ in range(1000):
        out.write(b"x")
    clock.now += 3600
    out.write(b"x")
    out.close()

    assert len(serial_log) == 2
    assert "No space left" in serial_log[0]
    assert "1000 bytes dropped" in serial_log[1]  # lost since the first report


def test_serial_output_to_closed_pipe_keeps_running_and_warns_once(serial_log):
    r, w = os.pipe()
    os.close(r)
    from crosvm.devices.serial_device import FdOutput
    out = FdOutput(w, owned=True)

    for _ in range(100):
        out.write(b"x")  # EPIPE every time; must not raise
    out.close()

    assert len(serial_log) == 1 and "Broken pipe" in serial_log[0]


# --- seccomp policy files -------------------------------------------------------------

def test_policy_return_with_superscript_digit_is_a_policy_error(tmp_path):
    p = tmp_path / "x.policy"
    p.write_text("read: return \u00b2\n")

    with pytest.raises(PolicyError, match="x.policy:1: bad errno"):
        load_policy(p)


def test_policy_line_expanding_to_65536_rules_is_refused(tmp_path):
    p = tmp_path / "x.policy"
    p.write_text("ioctl: arg0 & 0xffffffffffffffff && arg1 & 0xffffffffffffffff "
                 "&& arg2 & 0xffff\n")

    with pytest.raises(PolicyError, match="x.policy:1: .*expands to 65536 rules"):
        bounded(load_policy, p)


def test_policy_fifo_is_refused_without_blocking(tmp_path):
    p = tmp_path / "x.policy"
    os.mkfifo(p)

    with pytest.raises(PolicyError, match="FIFO"):
        bounded(load_policy, p)


def test_policy_non_utf8_is_a_policy_error(tmp_path):
    p = tmp_path / "x.policy"
    p.write_bytes(b"read: 1 # \xff\n")

    with pytest.raises(PolicyError, match="UTF-8"):
        load_policy(p)


# --- the process boundary: signals, stdout, anything unexpected ------------------------

def test_sigint_during_setup_is_one_line_not_a_traceback(monkeypatch, capsys, tmp_path):
    kernel = tmp_path / "k"
    kernel.write_bytes(b"")

    def interrupted(cfg):
        raise KeyboardInterrupt

    monkeypatch.setattr("crosvm.vmm.run.run_config", interrupted)
    code, err = run_cli(capsys, str(kernel))

    assert code == 1
    assert len(err) == 1 and "interrupted" in err[0]


def test_unexpected_exception_is_one_line_exit_1(monkeypatch, capsys, tmp_path):
    def broken(cfg):
        raise ZeroDivisionError("boom")

    monkeypatch.setattr("crosvm.vmm.run.run_config", broken)
    code, err = run_cli(capsys, "k")

    assert code == 1
    assert len(err) == 1 and "boom" in err[0]


def test_help_into_a_closed_pipe_prints_nothing_on_stderr():
    r, w = os.pipe()
    os.close(r)  # `crosvm --help | head` once head has exited
    try:
        proc = subprocess.run([sys.executable, "-m", "crosvm", "--help"], cwd=REPO,
                              stdout=w, stderr=subprocess.PIPE, text=True, timeout=60)
    finally:
        os.close(w)

    assert proc.returncode == 1
    assert proc.stderr == ""


def test_help_into_dev_full_is_one_line_exit_1():
    with open("/dev/full", "w") as full:
        proc = subprocess.run([sys.executable, "-m", "crosvm", "--help"], cwd=REPO,
                              stdout=full, stderr=subprocess.PIPE, text=True, timeout=60)

    assert proc.returncode == 1
    assert len(proc.stderr.splitlines()) == 1 and "No space" in proc.stderr


@pytest.mark.parametrize("offered", ["unix-stream", "legacy-virtio-console", "debugcon",
                                     "name=", "--syslog-tag"])
def test_help_offers_only_what_works(capsys, offered):
    main(["--help"])
    main(["run", "--help"])

    # As a word of its own: `tap-name=` (--net) is a different key from serial `name=`.
    assert not re.search(rf"(?<![\w-]){re.escape(offered)}", capsys.readouterr().out)


@pytest.mark.parametrize("value, named", [("type=unix-stream,path=/x", "unix-stream"),
                                          ("hardware=debugcon", "debugcon"),
                                          ("hardware=legacy-virtio-console", "legacy"),
                                          ("type=stdout,hardware=virtio-console,name=a",
                                           "`name`")])
def test_serial_settings_not_implemented_are_refused_naming_them(capsys, value, named):
    code, err = run_cli(capsys, "--serial", value, "k")

    assert code == 35
    assert len(err) == 1 and named in err[0]


def test_syslog_tag_is_refused(capsys):
    code = main(["--syslog-tag", "x", "version"])

    assert code == 35


def test_stop_signals_request_a_stop():
    from crosvm.vm_control.signals import install_stop_signals
    stops: queue.Queue = queue.Queue()
    saved = {s: signal.getsignal(s) for s in (signal.SIGHUP, signal.SIGINT, signal.SIGTERM,
                                              signal.SIGUSR1, signal.SIGUSR2)}
    try:
        install_stop_signals(stops.put)

        os.kill(os.getpid(), signal.SIGUSR1)  # ignored, with a line: not a stop
        os.kill(os.getpid(), signal.SIGHUP)
        os.kill(os.getpid(), signal.SIGTERM)

        assert [stops.get(timeout=HANG_GUARD) for _ in range(2)] == ["SIGHUP", "SIGTERM"]
        assert stops.empty()
    finally:
        for s, h in saved.items():
            signal.signal(s, h)



def test_serial_path_error_is_a_bad_argument_not_a_host_failure(tmp_path):
    from crosvm.config import ConfigError  # run_config turns a ConfigError into exit 35

    with pytest.raises(ConfigError):
        open_output(SerialParameters(type="file", path=str(tmp_path / "no" / "dir")))


def test_many_cfg_options_share_one_file_budget(tmp_path, capsys):
    f = tmp_path / "vm.json"
    f.write_text("{}")

    code, err = run_cli(capsys, *["--cfg", str(f)] * 100, "k")

    assert code == 35
    assert len(err) == 1 and "config files to load" in err[0]
