"""The short CI run of every fuzz target, and a replay of every saved crashing input.

Each target fuzzes for CROSVM_FUZZ_SECONDS (default 5) and must find nothing; each
input saved under fuzz/regressions/<target>/ must pass through `one_input` (except
those listed in that directory's KNOWN_OPEN, whose fix belongs to another package:
they are strict xfails, so the fix shows up as a failure to remove the entry).
"""

from __future__ import annotations

import logging
import os

import pytest

from fuzz import runner

SECONDS = float(os.environ.get("CROSVM_FUZZ_SECONDS", "5"))
TARGETS = runner.targets()


def _regressions():
    for name in TARGETS:
        open_bugs = runner.known_open(name)
        for path in runner.regression_inputs(name):
            base = os.path.basename(path)
            marks = [pytest.mark.xfail(strict=True, reason=open_bugs[base])] if base in open_bugs else []
            yield pytest.param(name, path, id=f"{name}/{base}", marks=marks)


def test_targets_are_discovered():
    assert {"virtqueue", "block", "rng", "console", "virtio_pci", "pci_config", "pmem",
            "proxy_reply", "keyvalue", "net", "balloon", "vsock", "fs", "p9"} <= set(TARGETS)


@pytest.mark.parametrize("name", TARGETS)
def test_fuzz_target_finds_nothing(name, tmp_path):
    result = runner.run_target(name, seconds=SECONDS, crash_dir=str(tmp_path / "crashes"))
    assert (result.inputs > 0, result.failures) == (True, []), result.log[-3000:]


@pytest.mark.parametrize("name,path", list(_regressions()))
def test_saved_crash_input_passes(name, path):
    with open(path, "rb") as f:
        data = f.read()
    module = runner.load(name)
    logging.disable(logging.CRITICAL)
    try:
        runner.run_bounded(module.one_input, data)
    finally:
        logging.disable(logging.NOTSET)
