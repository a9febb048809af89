"""The VMM side of the control socket: a SOCK_SEQPACKET listener, one JSON request and
one JSON response per message, as crosvm's serde-serialized `VmRequest`/`VmResponse`
(`"Exit"` -> `"Ok"`, `{"DiskCommand": {...}}` -> ...).

One thread serves every client from a poll loop, so no client can hold up another:
each connection gets CLIENT_TIMEOUT to send a request, a request must fit in
MAX_MESSAGE and nest at most MAX_DEPTH deep, and when MAX_CLIENTS connections are
open the oldest is dropped for the newcomer, so `crosvm stop` always gets through.
Whatever a client sends, or a handler raises, ends as an `ErrString` response or a
closed connection, never as a dead server.
"""

from __future__ import annotations

import atexit
import errno
import inspect
import json
import logging
import os
import select
import socket
import stat
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

from crosvm.base import boundedjson

log = logging.getLogger(__name__)

MAX_MESSAGE = 65536
MAX_DEPTH = 16          # crosvm's deepest request (a balloon config) nests 4 levels
MAX_CLIENTS = 16
# Requests being worked out on threads at once (a `balloon --wait` holds one for up to
# 110 s, even after its client left); fewer than MAX_CLIENTS, so an idle connection to
# drop for a newcomer (`crosvm stop`) always exists.
MAX_DEFERRED = 8
CLIENT_TIMEOUT = 5.0    # seconds a connection may stay open without sending a request

# A unit variant ("Exit") calls its handler with no argument; any other variant
# ({"Name": payload}) calls it with the payload. The return value is the response.
# Handlers run on the server thread and must not block (start the work, answer at
# once): a handler that waits holds up every other client, `stop` included.
Handler = Callable[..., object]


class Deferred:
    """A handler's answer that takes time (waiting for the guest or a device process):
    `work()` runs on a thread of its own and its return value is the response. The
    client's connection stays open meanwhile, without a deadline; other clients are
    served as usual. At most MAX_DEFERRED run at once; beyond that a request is
    refused with "busy"."""

    def __init__(self, work: Callable[[], object]) -> None:
        self.work = work


def socket_path(path: str) -> str:
    """crosvm's rule: for a directory, the socket is `crosvm-<pid>.sock` inside it."""
    if os.path.isdir(path):
        return os.path.join(path, f"crosvm-{os.getpid()}.sock")
    return path


def err_string(message: str) -> dict[str, str]:
    """The `VmResponse::ErrString` response."""
    return {"ErrString": message}


def parse_request(raw: bytes) -> tuple[str, Any, bool]:
    """(name, payload, is_unit) of one serde-JSON `VmRequest`; raises ValueError."""
    request = boundedjson.loads(raw, MAX_MESSAGE, MAX_DEPTH)
    # serde writes a unit variant as "Name" and the others as {"Name": payload}.
    if isinstance(request, str):
        return request, None, True
    if isinstance(request, dict) and len(request) == 1:
        name, payload = next(iter(request.items()))
        return name, payload, False
    raise ValueError("expected \"Name\" or {\"Name\": arguments}")


def _bind(path: str) -> socket.socket:
    """A listening socket at `path`. A socket file left by a VMM that was killed
    (nothing accepts on it) is replaced; a live one, or any other file, is kept."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    try:
        try:
            sock.bind(path)
        except OSError as e:
            if e.errno != errno.EADDRINUSE or not _stale(path):
                raise
            os.unlink(path)
            sock.bind(path)
        sock.listen(MAX_CLIENTS)
    except OSError as e:
        sock.close()
        raise OSError(e.errno, f"control socket {path}: {e.strerror or e}") from None
    return sock


def _stale(path: str) -> bool:
    """True for a socket file nobody listens on; OSError naming the problem otherwise."""
    if not stat.S_ISSOCK(os.lstat(path).st_mode):
        raise OSError(errno.EEXIST, "the path exists and is not a socket")
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(path)
        except ConnectionRefusedError:
            return True
        except OSError as e:
            raise OSError(errno.EADDRINUSE, f"in use by another program ({e.strerror})") \
                from None
    raise OSError(errno.EADDRINUSE, "another VM is listening there")


@dataclass
class _Client:
    sock: socket.socket
    deadline: float
    busy: bool = False  # a Deferred answer is being worked out


class ControlServer:
    """Serves requests on `path` in a thread; `handlers` maps a request name to its
    Handler."""

    def __init__(self, path: str, handlers: dict[str, Handler]) -> None:
        self.path = socket_path(path)
        self.handlers = handlers
        self.sock = _bind(self.path)
        st = os.stat(self.path)
        self._ident = (st.st_dev, st.st_ino)
        # Removed on every way out of the process that runs Python's exit handlers
        # (return, exception, sys.exit, a stop signal), not only through close().
        atexit.register(self._remove_socket)
        self._stop_r, self._stop_w = os.pipe2(os.O_CLOEXEC)
        self._clients: dict[int, _Client] = {}
        self._done_r, self._done_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._done: list[tuple[_Client, object]] = []
        self._done_lock = threading.Lock()
        self._deferred_running = 0  # Deferred threads started and not finished
        self._thread = threading.Thread(target=self._serve, name="vm_control", daemon=True)

    def start(self) -> None:
        self._thread.start()

    # -- the poll loop ----------------------------------------------------------------
    def _serve(self) -> None:
        self.sock.setblocking(False)
        poller = select.poll()
        poller.register(self.sock, select.POLLIN)
        poller.register(self._stop_r, select.POLLIN)
        poller.register(self._done_r, select.POLLIN)
        try:
            while True:
                try:
                    if not self._serve_once(poller):
                        return
                except Exception as e:  # noqa: BLE001 - the server must outlive any bug
                    log.error("control socket: unexpected error: %s: %s",
                              type(e).__name__, e)
                    time.sleep(0.1)  # a bug that repeats must not become a busy loop
        finally:
            for fd in list(self._clients):
                self._drop(poller, fd)

    def _serve_once(self, poller: select.poll) -> bool:
        """Waits for and handles one batch of events; False when asked to stop."""
        now = time.monotonic()
        for fd, client in list(self._clients.items()):
            if client.deadline <= now and not client.busy:
                log.warning("control socket: a client sent no request in %.0f s; dropped",
                            CLIENT_TIMEOUT)
                self._drop(poller, fd)
        timeout = None
        waiting = [c.deadline for c in self._clients.values() if not c.busy]
        if waiting:
            next_deadline = min(waiting)
            timeout = max(0, int((next_deadline - now) * 1000) + 1)
        for fd, events in poller.poll(timeout):
            if fd == self._stop_r:
                return False
            if fd == self._done_r:
                self._finish_deferred(poller)
                continue
            if fd == self.sock.fileno():
                self._accept(poller)
            elif fd in self._clients:
                self._read(poller, fd, events)
        return True

    def _accept(self, poller: select.poll) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:  # EMFILE and the like: the listener itself is fine
                log.warning("control socket: accept failed: %s", e.strerror)
                return
            conn.setblocking(False)
            idle = [fd for fd, c in self._clients.items() if not c.busy]
            if len(self._clients) >= MAX_CLIENTS and idle:
                # Never one waiting for its answer: that request is under way.
                oldest = min(idle, key=lambda fd: self._clients[fd].deadline)
                log.warning("control socket: more than %d clients; dropped the oldest",
                            MAX_CLIENTS)
                self._read(poller, oldest, 0)  # a request it already sent is answered
                self._drop(poller, oldest)
            self._clients[conn.fileno()] = _Client(conn, time.monotonic() + CLIENT_TIMEOUT)
            poller.register(conn, select.POLLIN)

    def _read(self, poller: select.poll, fd: int, events: int) -> None:
        client = self._clients.get(fd)
        if client is None:
            return
        try:
            raw, _, flags, _ = client.sock.recvmsg(MAX_MESSAGE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._drop(poller, fd)
            return
        if not raw:
            self._drop(poller, fd)  # the client is gone
            return
        if flags & socket.MSG_TRUNC:
            log.warning("control socket: a request larger than %d bytes; dropped the client",
                        MAX_MESSAGE)
            self._send(client, err_string(f"request too large (limit {MAX_MESSAGE} bytes)"))
            self._drop(poller, fd)
            return
        client.deadline = time.monotonic() + CLIENT_TIMEOUT
        if client.busy:  # one request at a time per connection, as crosvm's Tube
            self._send(client, err_string("a request is already in progress"))
            return
        response, well_formed = self._answer(raw)
        if isinstance(response, Deferred):
            with self._done_lock:
                room = self._deferred_running < MAX_DEFERRED
                if room:
                    self._deferred_running += 1
            if room:
                client.busy = True
                try:
                    threading.Thread(target=self._run_deferred, args=(client, response),
                                     name="vm_control_deferred", daemon=True).start()
                    return
                except RuntimeError as e:  # no thread could be started
                    client.busy = False
                    with self._done_lock:
                        self._deferred_running -= 1
                    response = err_string(f"cannot start the request: {e}")
            response = err_string(f"busy: {MAX_DEFERRED} requests are in progress")
        if not self._send(client, response) or not well_formed:
            self._drop(poller, fd)

    def _run_deferred(self, client: _Client, deferred: Deferred) -> None:
        response: object = err_string("request failed")
        try:
            response = deferred.work()
        except Exception as e:  # noqa: BLE001 - reported to the client, like a handler's
            log.warning("control socket: a request failed: %s: %s", type(e).__name__, e)
            response = err_string(f"request failed: {e}")
        finally:
            with self._done_lock:
                self._done.append((client, response))
                self._deferred_running -= 1
        try:
            os.write(self._done_w, b"x")
        except OSError:
            pass  # the pipe is full: the server is already due to look

    def _finish_deferred(self, poller: select.poll) -> None:
        try:
            while os.read(self._done_r, 4096):
                pass
        except (BlockingIOError, OSError):
            pass
        with self._done_lock:
            done, self._done = self._done, []
        for client, response in done:
            fd = client.sock.fileno()
            if self._clients.get(fd) is not client:
                continue  # the client went away meanwhile
            client.busy = False
            client.deadline = time.monotonic() + CLIENT_TIMEOUT
            if not self._send(client, response):
                self._drop(poller, fd)

    @staticmethod
    def _send(client: _Client, response: object) -> bool:
        try:
            data = json.dumps(response).encode()
        except (TypeError, ValueError) as e:
            data = json.dumps(err_string(f"response not serializable: {e}")).encode()
        try:
            client.sock.send(data)
            return True
        except OSError:  # the client went away, or does not read its answers
            return False

    def _drop(self, poller: select.poll, fd: int) -> None:
        client = self._clients.pop(fd, None)
        if client is None:
            return
        try:
            poller.unregister(fd)
        except KeyError:
            pass
        client.sock.close()

    # -- requests ---------------------------------------------------------------------
    def respond(self, raw: bytes) -> object:
        """The response to one raw request; never raises."""
        return self._answer(raw)[0]

    def _answer(self, raw: bytes) -> tuple[object, bool]:
        """(response, whether the request was well-formed: a client that sends garbage
        is answered, then dropped)."""
        try:
            name, payload, unit = parse_request(raw)
        except ValueError as e:
            return err_string(f"malformed request: {e}"), False
        handler = self.handlers.get(name)
        if handler is None:
            return err_string(f"unsupported request {name[:64]!r}"), True
        try:
            inspect.signature(handler).bind(*(() if unit else (payload,)))
        except TypeError:
            return err_string(f"{name} {'needs arguments' if unit else 'takes no arguments'}"
                              ), True
        except ValueError:
            pass  # no signature to check (a builtin): let the call say
        try:
            return (handler() if unit else handler(payload)), True
        except Exception as e:  # noqa: BLE001 - a handler bug must not end the server
            log.warning("control socket: %s failed: %s: %s", name, type(e).__name__, e)
            return err_string(f"{name} failed: {e}"), True

    # -- shutdown ---------------------------------------------------------------------
    def close(self) -> None:
        os.write(self._stop_w, b"x")
        if self._thread.is_alive():
            self._thread.join(2.0)
        self.sock.close()
        for fd in (self._stop_r, self._stop_w, self._done_r, self._done_w):
            os.close(fd)
        self._remove_socket()
        atexit.unregister(self._remove_socket)

    def _remove_socket(self) -> None:
        """Unlinks the socket file if it is still ours (not one a later VM bound)."""
        try:
            st = os.stat(self.path)
            if (st.st_dev, st.st_ino) == self._ident:
                os.unlink(self.path)
        except OSError:
            pass
