"""User-mode networking through passt (Debian's `passt`): no root, no TAP.

pycrosvm starts passt as a child (or connects to a running one's socket) and speaks
its qemu-style stream protocol: each Ethernet frame prefixed by its 32-bit big-endian
length. passt gives the guest DHCP, DNS forwarding and outbound TCP/UDP, with the
gateway address mapped to the host's loopback. passt stops with the VM; if it dies
first, the VMM logs it.
"""

from __future__ import annotations

import logging
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import threading
import time

log = logging.getLogger(__name__)

PASST = "passt"
START_TIMEOUT = 10.0


class PasstError(Exception):
    """passt could not be started or reached; the message says why."""


class Passt:
    """A connected passt socket, and the passt child when pycrosvm started it."""

    def __init__(self, socket_path: str | None = None) -> None:
        self.proc: subprocess.Popen | None = None
        self._dir: str | None = None
        self._stopping = False
        if socket_path is None:
            socket_path = self._start()
        self.sock = self._connect(socket_path)

    def _start(self) -> str:
        binary = shutil.which(PASST)
        if binary is None:
            raise PasstError("net: passt is not installed (Debian package `passt`)")
        self._dir = tempfile.mkdtemp(prefix="crosvm-passt-")
        if os.geteuid() == 0:
            # passt refuses to stay root and becomes `nobody`, who must create the socket.
            nobody = pwd.getpwnam("nobody")
            os.chown(self._dir, nobody.pw_uid, nobody.pw_gid)
        path = os.path.join(self._dir, "passt.sock")
        # -f: stay in the foreground (our child); -1: quit when the VM disconnects.
        self.proc = subprocess.Popen([binary, "-f", "-1", "-q", "-s", path],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, close_fds=True)
        deadline = time.monotonic() + START_TIMEOUT
        while not os.path.exists(path):
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace").strip()
                lines = [l for l in err.splitlines() if "syslog" not in l]
                self.close()  # its directory too
                raise PasstError(f"net: passt exited with status {self.proc.returncode} "
                                 f"before opening its socket: {lines[-1] if lines else ''}")
            if time.monotonic() > deadline:
                self.close()
                raise PasstError(f"net: passt did not open {path} within {START_TIMEOUT:g} s")
            time.sleep(0.05)
        return path

    def _connect(self, path: str) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        for _ in range(100):  # passt binds a moment before it listens
            try:
                sock.connect(path)
                break
            except (ConnectionRefusedError, FileNotFoundError) as e:
                if self.proc is None:  # a running passt's socket: it is there or not
                    sock.close()
                    raise PasstError(f"net: cannot connect to passt at {path}: "
                                     f"{e.strerror}") from None
                time.sleep(0.05)
            except OSError as e:
                sock.close()
                self.close()  # a passt we started, and its directory
                raise PasstError(f"net: cannot connect to passt at {path}: {e.strerror}") from None
        else:
            sock.close()
            self.close()
            raise PasstError(f"net: passt at {path} does not accept connections")
        sock.setblocking(False)
        return sock

    def watch(self) -> None:
        """Log passt's death if it comes before the VM's end, and keep reading its
        stderr: a full pipe would block passt, and with it the guest's network."""
        proc = self.proc
        if proc is None:
            return

        def drain() -> None:
            for line in proc.stderr:
                log.debug("passt: %s", line.decode(errors="replace").rstrip()[:200])
        threading.Thread(target=drain, name="passt_stderr", daemon=True).start()

        def wait() -> None:
            code = proc.wait()
            if not self._stopping:
                log.error("passt (pid %d) exited with status %d while the VM runs: the "
                          "guest's user-mode network is gone", proc.pid, code)
        threading.Thread(target=wait, name="passt_watch", daemon=True).start()

    @property
    def fd(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        self._stopping = True
        if getattr(self, "sock", None) is not None:
            self.sock.close()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None
