"""One VM per sandbox mode for everything that crosses between host and guest files
and sockets: vsock, the shared directories (virtio-9p, virtio-fs, and a virtio-fs
share with uid/gid maps) and vhost-user devices served by QEMU's own back-ends
(qemu-storage-daemon: two disks, one of them to kill; virtiofsd). Boots are slow
here; the package's modules share the VM."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile

import pytest

from tests.e2e.sharing.layout import (CID, FS_TAG, GUEST_GID, GUEST_UID, HOST_GID, HOST_UID,
                                      MIB, MOUNTS, OUTSIDE_SECRET, P9_TAG, UGID_MOUNT,
                                      UGID_TAG, make_share, make_ugid_share)
from tests.conftest import make_ext4
from tests.e2e.sharing.layout import (VU_BLOCK_FILE, VU_BLOCK_MIB, VU_FS_TAG, VU_MOUNT,
                                      VU_VICTIM_MIB)
from tests.guest_vm import GuestVm
from tests.support.peers import storage_daemon, virtiofsd


@pytest.fixture(scope="package", params=["sandboxed", "disable-sandbox"])
def vm(request, kernel, initramfs):
    if os.geteuid() != 0:
        pytest.skip("the shares' owners and maps need root (CI runs as root)")
    # Not under pytest's 0700 tmp: the sandboxed devices are other users outside their
    # jails (vsock: JAIL_ID; the mapped share: HOST_UID) and must reach their directories.
    workdir = tempfile.mkdtemp(prefix="pcvm-share-")
    os.chmod(workdir, 0o755)
    with open(os.path.join(workdir, "outside.txt"), "wb") as f:
        f.write(OUTSIDE_SECRET)
    payload = (b"pycrosvm shared payload " * 44000)[:MIB]
    shares = {kind: os.path.join(workdir, kind) for kind in MOUNTS}
    for path in shares.values():
        make_share(path, payload)
    ugid = os.path.join(workdir, "ugid")
    make_ugid_share(ugid)
    uds = os.path.join(workdir, "v.sock")
    vu = {name: os.path.join(workdir, f"{name}.sock") for name in ("blk", "victim", "fs")}
    image = make_ext4(os.path.join(workdir, "vu-disk.img"), VU_BLOCK_MIB, VU_BLOCK_FILE)
    victim = make_ext4(os.path.join(workdir, "vu-victim.img"), VU_VICTIM_MIB)
    vu_share = os.path.join(workdir, "vu-share")
    make_share(vu_share, payload)
    extra = ("--vsock", f"cid={CID},uds-path={uds}",
             "--vhost-user", f"block,socket={vu['blk']}",
             "--vhost-user-blk", vu["victim"],
             "--vhost-user-fs", f"{vu['fs']}:{VU_FS_TAG}",
             "--shared-dir", f"{shares['p9']}:{P9_TAG}",
             "--shared-dir", f"{shares['fs']}:{FS_TAG}:type=fs",
             "--shared-dir", f"{ugid}:{UGID_TAG}:type=fs:uidmap={GUEST_UID} {HOST_UID} 1:"
                             f"gidmap={GUEST_GID} {HOST_GID} 1:uid={GUEST_UID}:gid={GUEST_GID}")
    if request.param == "disable-sandbox":
        extra += ("--disable-sandbox",)
    try:
        with contextlib.ExitStack() as backends:
            backends.enter_context(storage_daemon(image, vu["blk"],
                                                  os.path.join(workdir, "qsd.log")))
            victim_daemon = backends.enter_context(storage_daemon(
                victim, vu["victim"], os.path.join(workdir, "qsd-victim.log")))
            backends.enter_context(virtiofsd(vu_share, vu["fs"],
                                             os.path.join(workdir, "vfsd.log")))
            g = backends.enter_context(GuestVm(kernel, initramfs, workdir, cpus=2, mem=256,
                                               extra_args=extra))
            g.wait_ready()
            g.uds = uds
            g.workdir = workdir
            g.shares = shares
            g.ugid_share = ugid
            g.payload = payload
            g.vu_image, g.vu_share, g.victim_daemon = image, vu_share, victim_daemon
            # Each mount only if not there yet: a command the host's platform fault
            # killed half way is run again whole by the harness.
            mounts = [(f"-t virtiofs {VU_FS_TAG}", VU_MOUNT),
                      (f"-t 9p -o trans=virtio,version=9p2000.L {P9_TAG}", MOUNTS["p9"]),
                      (f"-t virtiofs {FS_TAG}", MOUNTS["fs"]),
                      (f"-t virtiofs {UGID_TAG}", UGID_MOUNT)]
            g.mounted = g.run(
                f"mkdir -p {' '.join(d for _, d in mounts)} && " + " && ".join(
                    f"{{ grep -q ' {d} ' /proc/mounts || mount {how} {d}; }}"
                    for how, d in mounts))
            yield g
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
