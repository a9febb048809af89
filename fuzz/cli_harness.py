"""Drives the real `crosvm` entry point for the CLI and --cfg targets, up to but not
including building a VM, and checks what issue 10 promises of every input: an exit
code from crosvm's table, at most one error line, never a traceback."""

from __future__ import annotations

import contextlib
import io
import os
import sys

from crosvm.cli import main as cli_main

# With the VM stubbed out, a run that parses is 0 and a rejected one 35; 1 would be an
# unexpected error caught by the boundary, which is itself a finding here.
EXPECTED_CODES = {0, 35}
# The only other lines a valid command line may log before the VM starts.
ALLOWED_LINES = ("is deprecated, use",)


def _no_vm(cfg) -> int:
    return 0


def argv_from(data: bytes, vocabulary: list[str], max_args: int = 64) -> list[str]:
    """Arguments separated by NUL bytes (argv cannot hold NUL). One whose first byte is
    below 0x20 is an option from `vocabulary` (that byte picks it) with the rest as its
    value; any other is raw bytes, decoded as Python decodes argv."""
    args: list[str] = []
    for token in data.split(b"\0")[:max_args]:
        if token and token[0] < 0x20:
            args.append(vocabulary[token[0] % len(vocabulary)])
            if len(token) > 1:
                args.append(os.fsdecode(token[1:]))
        else:
            args.append(os.fsdecode(token))
    return args


def run_crosvm(argv: list[str]) -> tuple[int, str]:
    """(exit code, stderr) of `crosvm ARGV` with the VM build replaced by `return 0`."""
    err, out = io.StringIO(), io.StringIO()
    saved = cli_main.start_vm
    cli_main.start_vm = _no_vm
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            code = cli_main.main(argv)
    finally:
        cli_main.start_vm = saved
    return code, err.getvalue()


def check(argv: list[str]) -> None:
    """Raises AssertionError if `crosvm ARGV` breaks a rule."""
    code, err = run_crosvm(argv)
    lines = [line for line in err.splitlines()
             if not any(allowed in line for allowed in ALLOWED_LINES)]
    assert code in EXPECTED_CODES, (argv, code, err)
    assert "Traceback" not in err, (argv, err)
    assert len(lines) <= 1, (argv, err)
    if code == 35:
        assert len(lines) == 1 and lines[0].startswith("crosvm: "), (argv, err)


def run_standalone(one_input, default_seconds: int = 60) -> None:
    """`python -m fuzz.fuzz_x [libFuzzer flags]`: fuzz with atheris."""
    import atheris
    atheris.instrument_all()  # coverage feedback for every module loaded so far
    args = sys.argv if any(a.startswith("-max_total_time") for a in sys.argv) else \
        sys.argv + [f"-max_total_time={default_seconds}"]
    atheris.Setup(args, one_input)
    atheris.Fuzz()
