"""`crosvm run --cfg FILE`: any file content (JSON or not), never a traceback, bounded.

The input is written to a file that is given as --cfg; its `cfg` includes resolve
next to it (the fuzzer may include the file itself, or /dev/zero)."""

from __future__ import annotations

import os
import tempfile

from fuzz.cli_harness import check, run_standalone

_DIR = tempfile.mkdtemp(prefix="fuzz_cfg_")
PATH = os.path.join(_DIR, "vm.json")


def one_input(data: bytes) -> None:
    with open(PATH, "wb") as f:
        f.write(data)
    check(["run", "--cfg", PATH, "vmlinux"])


if __name__ == "__main__":
    run_standalone(one_input)
