"""Real vhost-user back-ends from Debian's QEMU packages, started for a test:
qemu-storage-daemon exporting an image as vhost-user-blk, and QEMU's virtiofsd."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
from typing import Iterator

import pytest

QSD = "qemu-storage-daemon"
VIRTIOFSD = "/usr/lib/qemu/virtiofsd"
START_TIMEOUT = 30.0


def _require(program: str) -> str:
    path = shutil.which(program) or (program if os.access(program, os.X_OK) else None)
    if path is None:
        if os.environ.get("CI") or os.environ.get("CROSVM_REQUIRE_KERNEL"):
            pytest.fail(f"{program} is missing (scripts/setup.sh installs qemu-system-common)")
        pytest.skip(f"{program} is not installed (apt-get install qemu-system-common)")
    return path


def _wait_for_socket(proc: subprocess.Popen, path: str, log: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while not os.path.exists(path):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"{proc.args[0]} did not listen on {path}: "
                               f"{open(log).read()[-2000:]}")
        time.sleep(0.05)


@contextlib.contextmanager
def _daemon(args: list[str], socket_path: str, log: str,
            pass_fds: tuple[int, ...] = ()) -> Iterator[subprocess.Popen]:
    """`args` started with its output in `log`, yielded once it listens on
    `socket_path`, stopped (terminate, then kill) afterwards."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, pass_fds=pass_fds)
    try:
        _wait_for_socket(proc, socket_path, log)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def storage_daemon(image: str, socket_path: str, log: str):
    """qemu-storage-daemon exporting `image` (raw, writable) as vhost-user-blk."""
    return _daemon([_require(QSD), "--blockdev", f"driver=file,node-name=file0,filename={image}",
                    "--blockdev", "driver=raw,node-name=disk0,file=file0",
                    "--export", "type=vhost-user-blk,id=exp0,node-name=disk0,writable=on,"
                                f"addr.type=unix,addr.path={socket_path}"], socket_path, log)


def virtiofsd(source: str, socket_path: str, log: str):
    """QEMU's virtiofsd serving `source` (it needs root for its own sandbox)."""
    return _daemon([_require(VIRTIOFSD), f"--socket-path={socket_path}", "-o",
                    f"source={source}", "-o", "cache=auto"], socket_path, log)


def crosvm_backends(command: list[str], last_socket: str, log: str,
                    pass_fds: tuple[int, ...] = ()):
    """Our own back-ends: `crosvm device ...` or `crosvm devices ...` (`command` after
    `crosvm`), yielded once `last_socket` (the last one it binds) exists."""
    return _daemon([sys.executable, "-m", "crosvm", *command], last_socket, log, pass_fds)
