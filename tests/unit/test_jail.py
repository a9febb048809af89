"""The device jail: namespaces, pivot_root, capabilities, NO_NEW_PRIVS (needs root or
unprivileged user namespaces, no KVM)."""

from __future__ import annotations

import json
import os
import threading

import pytest

from crosvm.jail import Jail, ensure_pivot_root
from crosvm.jail.jail import IdMapRequest
from tests.support.procs import jailed_processes


def jailed_probe(tmp_path, fork: str) -> dict:
    """Fork (`Jail.fork`, as DeviceProcess does, or plain `os.fork`, the way a VMM that
    may not make PID namespaces ends up), jail, run probes inside, return their results
    (and the jailed pid's status)."""
    root = str(tmp_path / "empty")
    ensure_pivot_root(root)
    r, w = os.pipe()
    go_r, go_w = os.pipe()
    id_map = IdMapRequest() if os.geteuid() == 0 else None  # as DeviceProcess does
    jail = Jail(pivot_root=root)
    pid = jail.fork() if fork == "jail.fork" else os.fork()
    if pid == 0:
        os.close(r)
        os.close(go_w)
        try:
            jail.enter(None, id_map)
            import ctypes
            import resource
            results = {"pid": os.getpid(), "listdir": os.listdir("/"),
                       "dumpable": ctypes.CDLL(None).prctl(3, 0, 0, 0, 0),  # PR_GET_DUMPABLE
                       "core_limit": list(resource.getrlimit(resource.RLIMIT_CORE))}
            for name, probe in (("open_host_path", lambda: open("/etc/passwd").close()),
                                ("execve", lambda: os.execv("/bin/sh", ["sh"])),
                                ("mkdir_in_root", lambda: os.mkdir("/new")),
                                ("allocate_16mib", lambda: bytearray(16 << 20)),
                                ("allocate_1gib", lambda: bytearray(1 << 30))):
                try:
                    probe()
                    results[name] = "allowed"
                except OSError as e:
                    results[name] = e.errno
                except MemoryError:
                    results[name] = "MemoryError"
            os.write(w, json.dumps(results).encode())
            os.read(go_r, 1)   # stay alive while the parent reads /proc
        finally:
            os._exit(0)
    os.close(w)
    os.close(go_r)
    if id_map is not None:
        id_map.serve(pid)
    results = json.loads(os.read(r, 4096))
    (device,) = jailed_processes(os.getpid())
    results["device_is_child"] = device == pid
    status = dict(line.split(":", 1) for line in open(f"/proc/{device}/status"))
    results["status"] = {k: v.strip() for k, v in status.items()}
    results["root_ino"] = os.stat(f"/proc/{device}/root").st_ino
    results["root_mount"] = [line.split() for line in open(f"/proc/{device}/mountinfo")
                             if line.split()[4] == "/"]
    # The forking thread is back in its own PID namespace: it can start threads.
    thread = threading.Thread(target=lambda: None)
    thread.start()
    thread.join()
    results["empty_ino"] = os.stat(root).st_ino
    os.write(go_w, b"x")
    _, wait_status = os.waitpid(pid, 0)
    results["exit"] = os.waitstatus_to_exitcode(wait_status)
    return results


def user_namespaces_available() -> bool:
    """Root can always create one; others only where the kernel allows it."""
    if os.geteuid() == 0:
        return True
    try:
        with open("/proc/sys/kernel/unprivileged_userns_clone") as f:
            return f.read().strip() == "1"
    except FileNotFoundError:
        return os.path.exists("/proc/self/ns/user")


@pytest.fixture(scope="module", params=["jail.fork", "os.fork"])
def probe(request, tmp_path_factory):
    # Only a missing precondition skips; a failure inside the jail fails the tests.
    if not user_namespaces_available():
        pytest.skip("user namespaces are not available to this user")
    return {"fork": request.param, **jailed_probe(tmp_path_factory.mktemp("jail"),
                                                  request.param)}


def test_root_vmm_forks_the_device_straight_into_its_pid_namespace(probe):
    if os.geteuid() != 0:
        pytest.skip("only root may make PID namespaces without a user namespace")

    # jail.fork: no process in between; os.fork: the jail adds one to wait for it.
    assert probe["device_is_child"] == (probe["fork"] == "jail.fork")


def test_jailed_process_is_pid_1_of_its_namespace(probe):
    assert probe["pid"] == 1


def test_jailed_root_is_the_empty_pivot_directory(probe):
    assert (probe["listdir"], probe["root_ino"]) == ([], probe["empty_ino"])


def test_jailed_process_cannot_open_host_paths(probe):
    assert probe["open_host_path"] == 2   # ENOENT: the host tree is not there


def test_jailed_process_cannot_execve(probe):
    assert probe["execve"] != "allowed"


def test_jailed_process_has_no_capabilities(probe):
    assert probe["status"]["CapEff"] == "0000000000000000"
    assert probe["status"]["CapBnd"] == "0000000000000000"


def test_jailed_process_has_no_new_privs(probe):
    assert probe["status"]["NoNewPrivs"] == "1"


def test_jailed_process_of_root_runs_as_an_unused_unprivileged_id(probe):
    from crosvm.jail.jail import JAIL_ID
    expected = JAIL_ID if os.geteuid() == 0 else os.getuid()
    uids = probe["status"]["Uid"].split()
    gids = probe["status"]["Gid"].split()

    assert (set(uids), set(gids)) == ({str(expected)}, {str(JAIL_ID if os.geteuid() == 0
                                                             else os.getgid())})


def test_jailed_root_is_mounted_read_only(probe):
    (root,) = probe["root_mount"]

    assert "ro" in root[5].split(",")


def test_jailed_process_cannot_write_its_root(probe):
    assert probe["mkdir_in_root"] == 30  # EROFS: the remount, not only permissions


def test_jailed_process_heap_is_limited(probe):
    assert (probe["allocate_16mib"], probe["allocate_1gib"]) == ("allowed", "MemoryError")


def test_jailed_process_is_not_dumpable_and_has_no_core(probe):
    assert (probe["dumpable"], probe["core_limit"]) == (0, [0, 0])


def test_jailed_process_exit_is_mirrored(probe):
    assert probe["exit"] == 0


def test_missing_pivot_root_is_created(tmp_path):
    path = tmp_path / "a" / "b"

    ensure_pivot_root(str(path))

    assert path.is_dir()


def test_uncreatable_pivot_root_names_option(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    from crosvm.jail import JailError
    with pytest.raises(JailError, match="--pivot-root"):
        ensure_pivot_root(str(blocker / "sub"))
