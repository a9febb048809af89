"""The `crosvm run` command line: any argv, parsed and validated, never a traceback.

Input: arguments separated by NUL bytes (argv cannot hold NUL). An argument whose first
byte is below 0x20 is an option from the real option table (that byte picks it) with
the rest as its value, so the fuzzer reaches every option's grammar quickly; any other
argument is taken as raw bytes, decoded as Python decodes argv (undecodable bytes
become surrogates).
"""

from __future__ import annotations

from crosvm.cli.options import RUN_OPTIONS
from fuzz.cli_harness import argv_from, check, run_standalone

_GLOBAL = ["--log-level", "--no-syslog", "--extended-status", "--help", "-h"]
VOCABULARY = ([f"--{o.long}" for o in RUN_OPTIONS] + [f"-{o.short}" for o in RUN_OPTIONS
                                                     if o.short] + _GLOBAL + ["--"])


def one_input(data: bytes) -> None:
    args = argv_from(data, VOCABULARY)
    if args and args[0] in _GLOBAL:  # global options go before the command
        check(args[:2] + ["run"] + args[2:])
    else:
        check(["run"] + args)


if __name__ == "__main__":
    run_standalone(one_input)
