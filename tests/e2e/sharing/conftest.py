"""One VM per sandbox mode for everything that crosses between host and guest files
and sockets: vsock and the shared directories (virtio-9p, virtio-fs, and a virtio-fs
share with uid/gid maps). Boots are slow here; the package's modules share the VM."""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest

from tests.e2e.sharing.layout import (CID, FS_TAG, GUEST_GID, GUEST_UID, HOST_GID, HOST_UID,
                                      MIB, MOUNTS, OUTSIDE_SECRET, P9_TAG, UGID_MOUNT,
                                      UGID_TAG, make_share, make_ugid_share)
from tests.guest_vm import GuestVm


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
    extra = ("--vsock", f"cid={CID},uds-path={uds}",
             "--shared-dir", f"{shares['p9']}:{P9_TAG}",
             "--shared-dir", f"{shares['fs']}:{FS_TAG}:type=fs",
             "--shared-dir", f"{ugid}:{UGID_TAG}:type=fs:uidmap={GUEST_UID} {HOST_UID} 1:"
                             f"gidmap={GUEST_GID} {HOST_GID} 1:uid={GUEST_UID}:gid={GUEST_GID}")
    if request.param == "disable-sandbox":
        extra += ("--disable-sandbox",)
    try:
        with GuestVm(kernel, initramfs, workdir, cpus=2, mem=256, extra_args=extra) as g:
            g.wait_ready()
            g.uds = uds
            g.workdir = workdir
            g.shares = shares
            g.ugid_share = ugid
            g.payload = payload
            g.mounted = g.run(
                f"mkdir -p {MOUNTS['p9']} {MOUNTS['fs']} {UGID_MOUNT} && "
                f"mount -t 9p -o trans=virtio,version=9p2000.L {P9_TAG} {MOUNTS['p9']} && "
                f"mount -t virtiofs {FS_TAG} {MOUNTS['fs']} && "
                f"mount -t virtiofs {UGID_TAG} {UGID_MOUNT}")
            yield g
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
