"""Seccomp policy files: parsed and compiled with libseccomp; only PolicyError or
SeccompError (one line naming the file and line) may come out, and no line may
expand past the compiler's bound."""

from __future__ import annotations

import os
import tempfile

from crosvm.jail.policy import MAX_RULES, PolicyError, load_policy
from crosvm.jail.seccomp import ACT_KILL_PROCESS, SeccompError, compile_filter
from fuzz.cli_harness import run_standalone

_DIR = tempfile.mkdtemp(prefix="fuzz_policy_")
PATH = os.path.join(_DIR, "device.policy")
# An include target next to the fuzzed file, as crosvm's policies include this one.
with open(os.path.join(_DIR, "common_device.policy"), "w") as _f:
    _f.write("read: 1\nwrite: 1\n")


def one_input(data: bytes) -> None:
    with open(PATH, "wb") as f:
        f.write(data)
    try:
        policy = load_policy(PATH)
    except PolicyError as e:
        assert "\n" not in str(e), str(e)
        return
    assert len(policy.rules) <= MAX_RULES
    try:
        compile_filter(policy.rules, ACT_KILL_PROCESS)
    except SeccompError:
        pass


if __name__ == "__main__":
    run_standalone(one_input)
