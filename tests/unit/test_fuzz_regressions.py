"""Inputs that broke a fuzz target's rules (found by fuzzing, or listed in issue 10 and
failing on the code before it), run through the target's own `one_input`, which
raises on a finding."""

from __future__ import annotations

import pytest

from fuzz import fuzz_cfg, fuzz_cli, fuzz_control, fuzz_policy


@pytest.mark.parametrize("data", [
    b"\x01\n\x00",  # --mem '\n': the error quoted the newline, two lines on stderr
], ids=["mem-newline"])
def test_cli_finding_stays_fixed(data):
    fuzz_cli.one_input(data)


@pytest.mark.parametrize("data", [
    b'{"hypervisor": {"kvm": 5}}',  # AttributeError traceback
    b'{"cpus": ' + b"9" * 5000 + b"}",  # ValueError from int(): traceback
], ids=["variant-not-object", "5000-digits"])
def test_cfg_finding_stays_fixed(data):
    fuzz_cfg.one_input(data)


@pytest.mark.parametrize("data", [
    b"[" * 1000,  # RecursionError ended the server thread; stop timed out after it
], ids=["1000-brackets"])
def test_control_finding_stays_fixed(data):
    fuzz_control.one_input(data)


@pytest.mark.parametrize("data", [
    b"read: return \xc2\xb2",  # '\u00b2'.isdigit() but int() refuses it: traceback
], ids=["superscript-errno"])
def test_policy_finding_stays_fixed(data):
    fuzz_policy.one_input(data)
