"""One VM per sandbox mode for everything that crosses between host and guest files
and sockets: vsock, the shared directories (virtio-9p, virtio-fs, and a virtio-fs
share with uid/gid maps) and vhost-user devices served by QEMU's own back-ends
(qemu-storage-daemon: two disks, one of them to kill; virtiofsd) and by ours (`crosvm
devices`: a disk, a NIC, a console and, in the sandboxed VM, the vsock device — each
back-end jailed there and unjailed with --disable-sandbox; `crosvm device fs`). Boots
are slow here; the package's modules share the VM."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile

import pytest

from tests.e2e.sharing.layout import (CID, FS_TAG, GUEST_GID, GUEST_UID, HOST_GID, HOST_UID,
                                      MIB, MOUNTS, OUTSIDE_SECRET, P9_TAG, UGID_MOUNT,
                                      UGID_TAG, make_share, make_ugid_share)
from tests.conftest import make_ext4
from tests.e2e.sharing.layout import (VU_BLOCK_FILE, VU_BLOCK_MIB, VU_FS_TAG, VU_MOUNT,
                                      VU_VICTIM_MIB)
from tests.guest_vm import GuestVm
from tests.e2e.sharing.layout import (OUR_BLOCK_FILE, OUR_BLOCK_MIB, OUR_FS_MOUNT,
                                      OUR_FS_TAG, OUR_NET_HOST)
from tests.support.netns import on_netns_thread
from tests.support.peers import crosvm_backends, storage_daemon, virtiofsd


@pytest.fixture(scope="package")
def our_netns():
    """A network namespace holding the TAP our net back-end serves (every frame stays
    in it); the back-end itself runs outside, holding the TAP's fd."""
    if os.geteuid() != 0 or not os.path.exists("/dev/net/tun"):
        pytest.skip("network namespaces and TAP devices need root and /dev/net/tun")
    from crosvm.net.tap import Tap
    name = f"pcvm-vu-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        tap = on_netns_thread(lambda: Tap.open("pcvmvu0"), name)
        for cmd in (["ip", "link", "set", "lo", "up"],
                    ["ip", "addr", "add", f"{OUR_NET_HOST}/24", "dev", tap.name],
                    ["ip", "link", "set", tap.name, "up"]):
            subprocess.run(["ip", "netns", "exec", name, *cmd], check=True)
        yield name, tap
        tap.close()
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


@pytest.fixture(scope="package", params=["sandboxed", "disable-sandbox"])
def vm(request, kernel, initramfs, our_netns):
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
    sandboxed = request.param == "sandboxed"
    ours = {name: os.path.join(workdir, f"our-{name}.sock")
            for name in ("block", "net", "console", "vsock", "fs")}
    our_image = make_ext4(os.path.join(workdir, "our-disk.img"), OUR_BLOCK_MIB, OUR_BLOCK_FILE)
    our_share = os.path.join(workdir, "our-share")
    make_share(our_share, payload)
    console_out = os.path.join(workdir, "our-console.out")
    console_in = os.path.join(workdir, "our-console.in")
    os.mkfifo(console_in)  # the test writes it once a guest program reads hvc0
    tap_fd = our_netns[1].fds[0]
    devices = ["devices", "--block", f"vhost={ours['block']},path={our_image}",
               "--net", f"vhost={ours['net']},tap-fd={tap_fd}",
               "--serial", f"vhost={ours['console']},type=file,path={console_out},"
                           f"input={console_in}"]
    if sandboxed:  # the sandboxed VM's vsock is ours over vhost-user; the other's in-VMM
        devices += ["--vsock", f"vhost={ours['vsock']},cid={CID},uds-path={uds}"]
        vsock = ("--vhost-user", f"vsock,socket={ours['vsock']}")
    else:
        devices += ["--disable-sandbox"]
        vsock = ("--vsock", f"cid={CID},uds-path={uds}")
    extra = ("--vhost-user", f"block,socket={vu['blk']}",
             "--vhost-user-blk", vu["victim"],
             "--vhost-user-fs", f"{vu['fs']}:{VU_FS_TAG}",
             "--vhost-user", f"block,socket={ours['block']}",
             "--vhost-user", f"net,socket={ours['net']}",
             "--vhost-user", f"console,socket={ours['console']}",
             "--vhost-user", f"fs,socket={ours['fs']}",
             *vsock,  # last: the devices before it are numbered the same in both VMs
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
            last = ours["vsock"] if sandboxed else ours["console"]
            g_devices = backends.enter_context(crosvm_backends(
                devices, last, os.path.join(workdir, "devices.log"), pass_fds=(tap_fd,)))
            backends.enter_context(crosvm_backends(
                ["device", "fs", "--socket", ours["fs"], "--tag", OUR_FS_TAG,
                 "--shared-dir", our_share], ours["fs"], os.path.join(workdir, "fs.log")))
            g = backends.enter_context(GuestVm(kernel, initramfs, workdir, cpus=2, mem=256,
                                               extra_args=extra))
            g.wait_ready()
            g.uds = uds
            g.workdir = workdir
            g.shares = shares
            g.ugid_share = ugid
            g.payload = payload
            g.vu_image, g.vu_share, g.victim_daemon = image, vu_share, victim_daemon
            g.our_image, g.our_share = our_image, our_share
            g.console_out, g.console_in = console_out, console_in
            g.our_netns, g.devices_proc = our_netns[0], g_devices
            g.sandboxed = sandboxed
            # Whose descendant the vsock device is: the back-ends' or the VMM's.
            g.vsock_root = g_devices.pid if sandboxed else None
            # Each mount only if not there yet: a command the host's platform fault
            # killed half way is run again whole by the harness.
            mounts = [(f"-t virtiofs {VU_FS_TAG}", VU_MOUNT),
                      (f"-t virtiofs {OUR_FS_TAG}", OUR_FS_MOUNT),
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
