"""The host side of the sharing VM: what is shared, under which tags, with which ids."""

from __future__ import annotations

import os

CID = 3
MIB = 1 << 20
P9_TAG, FS_TAG, UGID_TAG = "p9share", "fsshare", "ugidshare"
# Where the guest mounts each share (conftest.py mounts them at boot).
MOUNTS = {"p9": "/mnt/p9", "fs": "/mnt/fs"}
# crosvm's file_ugid: a share whose files belong to HOST_UID:HOST_GID, seen in the
# guest as GUEST_UID:GUEST_GID (uidmap/gidmap), served by the device as those ids.
HOST_UID, HOST_GID = 1234, 1235
GUEST_UID, GUEST_GID = 5000, 6000
UGID_MOUNT = "/mnt/ugid"
MANY_FILES = 1000
OUTSIDE_SECRET = b"outside the share: never reachable from the guest\n"
# vhost-user: an ext4 image exported by qemu-storage-daemon (vda), a second one whose
# daemon a test kills (vdb), and a directory virtiofsd serves under VU_FS_TAG.
VU_BLOCK_MIB, VU_VICTIM_MIB = 64, 32
VU_BLOCK_FILE = {"known.txt": b"served by qemu-storage-daemon\n"}
VU_FS_TAG = "vufs"
VU_MOUNT = "/mnt/vufs"
# Our own back-ends (`crosvm devices`, `crosvm device fs`) on our front-end: an ext4
# disk (vdc), a NIC on a TAP in the test's netns, a console, a shared directory, and
# in the sandboxed VM the vsock device.
OUR_BLOCK_MIB = 48
OUR_BLOCK_FILE = {"known.txt": b"served by crosvm devices\n"}
OUR_FS_TAG = "ourfs"
OUR_FS_MOUNT = "/mnt/ourfs"
OUR_NET_HOST, OUR_NET_GUEST = "10.78.0.1", "10.78.0.2"
OUR_CONSOLE_INPUT = b"to-guest\n"


def make_share(path: str, payload: bytes) -> None:
    """A shared directory: a payload file, 1000 small files, a directory to remove, and
    symlinks planted on the host that point out of it."""
    os.mkdir(path, 0o755)
    with open(os.path.join(path, "payload.bin"), "wb") as f:
        f.write(payload)
    os.mkdir(os.path.join(path, "many"))
    for i in range(MANY_FILES):
        with open(os.path.join(path, "many", f"f{i:04d}"), "w") as f:
            f.write(str(i))
    os.mkdir(os.path.join(path, "to_remove"))
    os.symlink("/etc/passwd", os.path.join(path, "evil_abs"))
    os.symlink("../outside.txt", os.path.join(path, "evil_rel"))


def make_ugid_share(path: str) -> None:
    os.mkdir(path, 0o755)
    with open(os.path.join(path, "owned.txt"), "w") as f:
        f.write("owned\n")
    for p in (path, os.path.join(path, "owned.txt")):
        os.chown(p, HOST_UID, HOST_GID)
