"""Builds the test guest's initramfs (busybox-static, /init, /agent.sh) as an uncompressed cpio.

Uncompressed because decompression runs emulated on the development hosts (~30 s for
gzip). Written directly in the cpio "newc" format; no cpio tool needed. /bin/vsock (an
AF_VSOCK netcat; busybox has none) is compiled from guest/vsock.c with the host's gcc,
statically so it runs on the guest's bare busybox.

    python3 guest/initramfs.py OUT.cpio [--busybox /bin/busybox]
"""

from __future__ import annotations

import argparse
import os
import stat
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_BUSYBOX = "/bin/busybox"
VSOCK_SOURCE = os.path.join(HERE, "vsock.c")

FSTAB = b"""proc /proc proc defaults 0 0
sysfs /sys sysfs defaults 0 0
devtmpfs /dev devtmpfs defaults 0 0
"""
PROFILE = b"export PATH=/bin:/sbin PS1='guest# '\n"


class CpioWriter:
    """Writes a newc ("070701") archive."""

    def __init__(self, out) -> None:
        self.out = out
        self.ino = 1

    def _entry(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0),
               nlink: int = 1) -> None:
        fields = [self.ino, mode, 0, 0, nlink, 0, len(data), 0, 0, rdev[0], rdev[1],
                  len(name) + 1, 0]
        header = b"070701" + b"".join(f"{v:08x}".encode() for v in fields)
        self.ino += 1
        blob = header + name.encode() + b"\x00"
        blob += b"\x00" * (-len(blob) % 4)
        blob += data + b"\x00" * (-len(data) % 4)
        self.out.write(blob)

    def dir(self, name: str) -> None:
        self._entry(name, stat.S_IFDIR | 0o755, nlink=2)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self._entry(name, stat.S_IFREG | mode, data)

    def symlink(self, name: str, target: str) -> None:
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def chardev(self, name: str, major: int, minor: int, mode: int = 0o600) -> None:
        self._entry(name, stat.S_IFCHR | mode, rdev=(major, minor))

    def trailer(self) -> None:
        self._entry("TRAILER!!!", 0, nlink=1)


def busybox_applets(busybox: str) -> list[str]:
    out = subprocess.run([busybox, "--list-full"], check=True, capture_output=True, text=True)
    return [line.strip() for line in out.stdout.splitlines() if line.strip()]


def vsock_gcc_command(out_path: str) -> list[str]:
    return ["gcc", "-static", "-O2", "-Wall", "-o", out_path, VSOCK_SOURCE]


def compile_vsock(out_path: str) -> str:
    """Compile guest/vsock.c to `out_path` (static, for the guest); return the path."""
    need = "install Debian's gcc and libc6-dev"
    try:
        result = subprocess.run(vsock_gcc_command(out_path), capture_output=True, text=True)
    except FileNotFoundError:
        raise SystemExit(f"gcc not found (it builds the guest's /bin/vsock): {need}") from None
    if result.returncode != 0:
        # Without libc6-dev this is "stdio.h: No such file" or "cannot find -lc".
        errors = [line for line in result.stderr.splitlines()
                  if "error" in line or "cannot find -l" in line]
        detail = (errors or result.stderr.splitlines() or ["no output"])[0]
        raise SystemExit(f"compiling guest/vsock.c failed ({need}): {detail}")
    sys.stderr.write(result.stderr)   # warnings, if any
    return out_path


def build(out_path: str, busybox: str = DEFAULT_BUSYBOX) -> str:
    """Write the initramfs to `out_path` (atomically) and return the path."""
    if not os.path.exists(busybox):
        raise SystemExit(f"{busybox} not found: install Debian's busybox-static")
    with open(busybox, "rb") as f:
        busybox_data = f.read()
    with open(os.path.join(HERE, "init"), "rb") as f:
        init = f.read()
    with tempfile.TemporaryDirectory() as build_dir:   # compiling takes well under a second
        with open(compile_vsock(os.path.join(build_dir, "vsock")), "rb") as f:
            vsock = f.read()
    tmp = out_path + ".tmp"
    with open(tmp, "wb") as out:
        w = CpioWriter(out)
        for d in ("bin", "sbin", "usr", "usr/bin", "usr/sbin", "dev", "proc", "sys", "tmp",
                  "etc", "root", "mnt", "run"):
            w.dir(d)
        w.chardev("dev/console", 5, 1)
        w.chardev("dev/null", 1, 3, 0o666)
        w.file("bin/busybox", busybox_data, 0o755)
        for applet in busybox_applets(busybox):
            if applet not in ("bin/busybox", "bin/lspci", "usr/bin/lspci", "bin/vsock"):
                w.symlink(applet, "/bin/busybox")
        w.file("init", init, 0o755)
        with open(os.path.join(HERE, "agent.sh"), "rb") as f:
            w.file("agent.sh", f.read())
        with open(os.path.join(HERE, "lspci"), "rb") as f:
            w.file("bin/lspci", f.read(), 0o755)
        w.file("bin/vsock", vsock, 0o755)
        w.file("etc/fstab", FSTAB)
        w.file("etc/profile", PROFILE)
        w.file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n")
        w.file("etc/group", b"root:x:0:\n")
        w.trailer()
    os.replace(tmp, out_path)
    return out_path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("--busybox", default=DEFAULT_BUSYBOX)
    args = parser.parse_args()
    build(args.out, args.busybox)
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
