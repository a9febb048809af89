"""Runs fuzz targets under atheris (coverage-guided, libFuzzer), one subprocess per target.

A target is `fuzz/fuzz_<name>.py` with `one_input(data: bytes) -> None`, which raises
only on a finding. Each input runs under a time bound (an escaping `InputTimeout`,
raised from SIGALRM, is a finding; a watchdog thread saves the input and ends the
process if even that cannot interrupt it) and a memory bound (RLIMIT_DATA, so an
unbounded allocation is a `MemoryError`, and libFuzzer's -rss_limit_mb behind it).
Crashing inputs land in a crash directory; after a crash the target is restarted on
its corpus for the time left, so a run reports every failure it found.

    python3 -m fuzz.runner TARGET [--seconds S | --runs N] [--crash-dir DIR]
    python3 -m fuzz.runner --list
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import hashlib
import importlib
import mmap
import os
import resource
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

FUZZ_DIR = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(FUZZ_DIR)
REGRESSIONS = os.path.join(FUZZ_DIR, "regressions")
INPUT_TIMEOUT = 2.0          # seconds per input
DATA_LIMIT_MB = 1536         # RLIMIT_DATA of a fuzzing child
RSS_LIMIT_MB = 2048          # libFuzzer's own check, behind RLIMIT_DATA
MAX_LEN = 4096               # bytes per input (libFuzzer -max_len)


class InputTimeout(BaseException):
    """One input ran longer than its bound. A BaseException so that code under test
    catching `Exception` cannot swallow it."""


def targets() -> list[str]:
    """Every fuzz target, by name (fuzz/fuzz_<name>.py)."""
    names = [os.path.basename(p)[len("fuzz_"):-len(".py")]
             for p in glob.glob(os.path.join(FUZZ_DIR, "fuzz_*.py"))]
    return sorted(names)


def load(name: str):
    """The target's module (imports crosvm; not instrumented)."""
    return importlib.import_module(f"fuzz.fuzz_{name}")


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raise `InputTimeout` in the main thread if the block runs longer than `seconds`."""
    def expire(signum, frame):
        raise InputTimeout(f"input ran longer than {seconds:g} s")
    old = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def run_bounded(one_input: Callable[[bytes], None], data: bytes,
                seconds: float = INPUT_TIMEOUT) -> None:
    """One input under the per-input time bound (what the fuzzer and replays do)."""
    with time_limit(seconds):
        one_input(data)


def known_open(name: str) -> dict[str, str]:
    """Saved inputs whose bug is not fixed yet (in a package another change owns):
    fuzz/regressions/<name>/KNOWN_OPEN lines `file  reason`."""
    path = os.path.join(REGRESSIONS, name, "KNOWN_OPEN")
    if not os.path.exists(path):
        return {}
    out = {}
    with open(path) as f:
        for line in f:
            if line.strip() and not line.startswith("#"):
                file, _, reason = line.strip().partition(" ")
                out[file] = reason.strip()
    return out


def regression_inputs(name: str, include_open: bool = True) -> list[str]:
    """Saved crashing inputs of a target (fuzz/regressions/<name>/*)."""
    d = os.path.join(REGRESSIONS, name)
    skip = set() if include_open else set(known_open(name))
    return sorted(p for p in glob.glob(os.path.join(d, "*"))
                  if os.path.isfile(p) and os.path.basename(p) not in skip
                  and not os.path.basename(p).startswith(("README", "KNOWN_OPEN", ".")))


# -- the child: one target under atheris -------------------------------------------------

def _child(name: str, counter_path: str, crash_dir: str, timeout: float,
           libfuzzer_args: list[str]) -> None:
    import logging

    import atheris

    logging.disable(logging.CRITICAL)  # guest-triggered warnings are expected, by the million
    sys.path.insert(0, REPO)
    with atheris.instrument_imports(include=["crosvm"]):
        module = load(name)
    one_input = module.one_input

    fd = os.open(counter_path, os.O_RDWR)
    counter = mmap.mmap(fd, 8)
    os.close(fd)
    state = {"n": 0, "start": 0.0, "data": b""}

    def test_one(data: bytes) -> None:
        state["data"], state["start"] = data, time.monotonic()
        state["n"] += 1
        struct.pack_into("<Q", counter, 0, state["n"])
        with time_limit(timeout):
            one_input(data)
        state["start"] = 0.0

    def watchdog() -> None:
        # For a hang SIGALRM cannot break (a C call that does not return to Python).
        while True:
            time.sleep(timeout / 2)
            started = state["start"]
            if started and time.monotonic() - started > 3 * timeout:
                data = state["data"]
                path = os.path.join(crash_dir, "timeout-" + hashlib.sha1(data).hexdigest())
                with open(path, "wb") as f:
                    f.write(data)
                print(f"fuzz: input stuck for {3 * timeout:g} s; saved {path}", flush=True)
                os._exit(70)

    threading.Thread(target=watchdog, daemon=True).start()
    limit = DATA_LIMIT_MB << 20
    resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))
    # -timeout=0: libFuzzer's SIGALRM timer would fight ours.
    atheris.Setup([sys.argv[0], *libfuzzer_args, "-timeout=0"], test_one)
    atheris.Fuzz()


# -- the parent: restarts after crashes, counts inputs ------------------------------------

@dataclass
class FuzzResult:
    """What one target's run did."""

    target: str
    inputs: int = 0
    seconds: float = 0.0
    failures: list[str] = field(default_factory=list)  # crashing inputs saved
    log: str = ""

    @property
    def rate(self) -> float:
        return self.inputs / self.seconds if self.seconds else 0.0


def run_target(name: str, seconds: float | None = None, runs: int | None = None,
               crash_dir: str | None = None, corpus_dir: str | None = None,
               timeout: float = INPUT_TIMEOUT, max_restarts: int = 20,
               verbose: bool = False) -> FuzzResult:
    """Fuzz `name` for `seconds` (or `runs` inputs) in subprocesses; see FuzzResult."""
    if (seconds is None) == (runs is None):
        raise ValueError("give exactly one of seconds and runs")
    result = FuzzResult(name)
    crash_dir = crash_dir or os.path.join(tempfile.gettempdir(), "crosvm-fuzz-crashes", name)
    os.makedirs(crash_dir, exist_ok=True)
    own_corpus = corpus_dir is None
    corpus_dir = corpus_dir or tempfile.mkdtemp(prefix=f"crosvm-fuzz-{name}-")
    os.makedirs(corpus_dir, exist_ok=True)
    for seed in regression_inputs(name, include_open=False):  # fixed crashers make good seeds
        shutil.copy(seed, corpus_dir)
    start = time.monotonic()
    logs = []
    try:
        for _ in range(max_restarts + 1):
            left_s = None if seconds is None else seconds - (time.monotonic() - start)
            left_n = None if runs is None else runs - result.inputs
            if (left_s is not None and left_s < 0.5) or (left_n is not None and left_n <= 0):
                break
            before = set(os.listdir(crash_dir))
            n, rc, out = _run_child(name, crash_dir, corpus_dir, timeout, left_s, left_n,
                                    verbose)
            result.inputs += n
            logs.append(out)
            new = sorted(set(os.listdir(crash_dir)) - before)
            result.failures += [os.path.join(crash_dir, f) for f in new]
            if rc == 0:
                break
            if not new:  # died without saving an input: still a failure
                result.failures.append(f"<exit status {rc}, no input saved>")
                break
    finally:
        if own_corpus:
            shutil.rmtree(corpus_dir, ignore_errors=True)
    result.seconds = time.monotonic() - start
    result.log = "".join(logs)
    return result


def _run_child(name: str, crash_dir: str, corpus_dir: str, timeout: float,
               seconds: float | None, runs: int | None, verbose: bool) -> tuple[int, int, str]:
    with tempfile.NamedTemporaryFile(prefix="crosvm-fuzz-count-") as counter:
        counter.write(bytes(8))
        counter.flush()
        args = [corpus_dir, f"-artifact_prefix={crash_dir.rstrip('/')}/",
                f"-rss_limit_mb={RSS_LIMIT_MB}", f"-max_len={MAX_LEN}", "-print_final_stats=0"]
        if seconds is not None:
            args.append(f"-max_total_time={max(1, int(seconds))}")
        else:
            args.append(f"-runs={runs}")
        cmd = [sys.executable, "-m", "fuzz.runner", "--child", name, counter.name,
               crash_dir, str(timeout), "--", *args]
        env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
        hard = None if seconds is None else seconds + 60 + 3 * timeout
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, errors="replace",
                                start_new_session=True)
        try:
            out, _ = proc.communicate(timeout=hard)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate()
            out += "\nfuzz: the target did not stop; killed\n"
        if verbose:
            sys.stdout.write(out)
        with open(counter.name, "rb") as f:
            n = struct.unpack("<Q", f.read(8))[0]
    return n, proc.returncode, out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        name, counter_path, crash_dir, timeout = argv[1:5]
        rest = argv[5:]
        if rest[:1] == ["--"]:
            rest = rest[1:]
        _child(name, counter_path, crash_dir, float(timeout), rest)
        return 0
    p = argparse.ArgumentParser(prog="python3 -m fuzz.runner", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("target", nargs="?")
    p.add_argument("--list", action="store_true", help="list the targets")
    p.add_argument("--seconds", type=float)
    p.add_argument("--runs", type=int)
    p.add_argument("--crash-dir")
    p.add_argument("--corpus-dir")
    p.add_argument("--timeout", type=float, default=INPUT_TIMEOUT, help="seconds per input")
    p.add_argument("-v", "--verbose", action="store_true", help="show libFuzzer's output")
    a = p.parse_args(argv)
    if a.list or not a.target:
        print("\n".join(targets()))
        return 0
    if a.target not in targets():
        p.error(f"no target {a.target!r} (have: {', '.join(targets())})")
    if a.seconds is None and a.runs is None:
        a.seconds = 60.0
    r = run_target(a.target, a.seconds, a.runs, a.crash_dir, a.corpus_dir, a.timeout,
                   verbose=a.verbose)
    print(f"{r.target}: {r.inputs} inputs in {r.seconds:.1f} s ({r.rate:.0f}/s), "
          f"{len(r.failures)} failure(s)")
    for f in r.failures:
        print(f"  {f}")
    if r.failures and not a.verbose:
        print(r.log[-4000:])
    return 1 if r.failures else 0


if __name__ == "__main__":
    sys.exit(main())
