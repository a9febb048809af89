"""A file server's jail: the shared directory is the root (writable, nosuid, nodev),
the user namespace has the share's id maps, the process keeps the file capabilities
and has /proc/self/fd from before the pivot. Needs root (the maps name other ids)."""

from __future__ import annotations

import json
import os

import pytest

from crosvm.jail import Jail, ensure_pivot_root
from crosvm.jail.jail import FILE_SERVER_CAPS, IdMapRequest, JailConfig

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="maps other ids: needs root")

HOST_UID, HOST_GID, INNER_UID, INNER_GID = 1234, 1235, 5000, 6000


def jailed_share_probe(tmp_path) -> dict:
    share = tmp_path / "share"
    share.mkdir()
    (share / "inside.txt").write_text("inside\n")
    os.symlink("/etc/passwd", share / "evil")
    os.chown(share, HOST_UID, HOST_GID)
    os.chmod(tmp_path, 0o755)
    outside = tmp_path / "outside.txt"
    outside.write_text("outside\n")
    empty = str(tmp_path / "empty")
    ensure_pivot_root(empty)
    config = JailConfig(root=str(share), uid_map=f"{INNER_UID} {HOST_UID} 1\n",
                        gid_map=f"{INNER_GID} {HOST_GID} 1\n", uid=INNER_UID, gid=INNER_GID,
                        caps=FILE_SERVER_CAPS)
    proc_fds = []
    config.prepare = lambda: proc_fds.append(os.open("/proc/self/fd", os.O_PATH))
    r, w = os.pipe()
    go_r, go_w = os.pipe()
    id_map = IdMapRequest(config.uid_map, config.gid_map)
    pid = os.fork()
    if pid == 0:
        os.close(r)
        os.close(go_w)
        try:
            Jail(pivot_root=empty).enter(None, id_map, config=config)
            results = {"listdir": sorted(os.listdir("/")), "ids": [os.getuid(), os.getgid()]}
            for name, probe in (
                    ("read_inside", lambda: open("/inside.txt").read()),
                    ("read_host_passwd_via_symlink", lambda: open("/evil").read()),
                    ("read_outside_via_dotdot", lambda: open("/../outside.txt").read()),
                    ("create", lambda: open("/made.txt", "w").close()),
                    ("reopen_via_proc_fd", lambda: os.read(os.open(
                        str(os.open("/inside.txt", os.O_PATH)), os.O_RDONLY,
                        dir_fd=proc_fds[0]), 100).decode()),
                    ("mknod_char_device", lambda: os.mknod("/dev0", 0o600 | 0o020000,
                                                           os.makedev(1, 3)))):
                try:
                    results[name] = probe()
                except OSError as e:
                    results[name] = e.errno
            os.write(w, json.dumps(results).encode())
            os.read(go_r, 1)
        finally:
            os._exit(0)
    os.close(w)
    os.close(go_r)
    id_map.serve(pid)
    results = json.loads(os.read(r, 65536) or b"{}")
    grandchild = open(f"/proc/{pid}/task/{pid}/children").read().split()[0]
    status = dict(line.split(":", 1) for line in open(f"/proc/{grandchild}/status"))
    results["status"] = {k: v.strip() for k, v in status.items()}
    results["root_mount"] = [line.split() for line in open(f"/proc/{grandchild}/mountinfo")
                             if line.split()[4] == "/"]
    os.write(go_w, b"x")
    os.waitpid(pid, 0)
    results["made_owner"] = [(s.st_uid, s.st_gid) for s in [os.stat(share / "made.txt")]
                             ] if (share / "made.txt").exists() else None
    return results


@pytest.fixture(scope="module")
def probe(tmp_path_factory):
    return jailed_share_probe(tmp_path_factory.mktemp("sharejail"))


def test_share_jail_root_is_the_shared_directory(probe):
    assert probe["listdir"] == ["evil", "inside.txt"]


def test_share_jail_runs_as_the_given_ids_inside(probe):
    assert probe["ids"] == [INNER_UID, INNER_GID]


def test_share_jail_is_the_mapped_host_ids_outside(probe):
    assert (probe["status"]["Uid"].split()[0], probe["status"]["Gid"].split()[0]) == (
        str(HOST_UID), str(HOST_GID))


def test_share_jail_reads_inside(probe):
    assert probe["read_inside"] == "inside\n"


def test_share_jail_host_symlink_to_etc_passwd_points_nowhere(probe):
    assert probe["read_host_passwd_via_symlink"] == 2  # ENOENT: no /etc in the share


def test_share_jail_dotdot_stays_in_the_share(probe):
    assert probe["read_outside_via_dotdot"] == 2


def test_share_jail_creates_files_as_the_mapped_host_ids(probe):
    assert probe["made_owner"] == [(HOST_UID, HOST_GID)]


def test_share_jail_reopens_inodes_through_proc_self_fd(probe):
    assert probe["reopen_via_proc_fd"] == "inside\n"


def test_share_jail_cannot_make_device_nodes(probe):
    assert probe["mknod_char_device"] == 1  # EPERM: no CAP_MKNOD, and the mount is nodev


def test_share_jail_root_is_nosuid_nodev(probe):
    (root,) = probe["root_mount"]

    assert {"nosuid", "nodev"} <= set(root[5].split(","))


def test_share_jail_keeps_only_the_file_capabilities(probe):
    assert (int(probe["status"]["CapEff"], 16), int(probe["status"]["CapBnd"], 16)) == (
        FILE_SERVER_CAPS, FILE_SERVER_CAPS)


def test_share_jail_accepts_a_read_only_share(tmp_path):
    """A read-only mount stays read-only through the remount (a locked flag)."""
    share = tmp_path / "ro"
    share.mkdir()
    empty = str(tmp_path / "empty")
    ensure_pivot_root(empty)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            import ctypes
            libc = ctypes.CDLL(None, use_errno=True)
            libc.unshare(0x00020000)  # CLONE_NEWNS
            libc.mount(None, b"/", None, 1 << 14 | 1 << 18, None)  # MS_REC | MS_PRIVATE
            libc.mount(b"tmpfs", str(share).encode(), b"tmpfs", 1, b"size=64k")  # MS_RDONLY
            Jail(pivot_root=empty).enter(None, None, config=JailConfig(root=str(share)))
            try:
                open("/x", "w")
                result = b"writable"
            except OSError as e:
                result = str(e.errno).encode()
            os.write(w, result)
        except Exception as e:  # noqa: BLE001 - reported to the test
            os.write(w, repr(e).encode())
        finally:
            os._exit(0)
    os.close(w)
    result = os.read(r, 200).decode()
    os.waitpid(pid, 0)

    assert result == "30"  # EROFS: in the jail, and read-only
