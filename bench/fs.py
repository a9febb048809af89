"""Shared-directory servers: metadata operations per second and 1 MiB sequential
read/write MB/s through the virtio-fs and virtio-9p devices vs. direct host syscalls.

No guest kernel: this process plays the guest driver (crosvm.devices.virtio.driver),
encoding FUSE and 9P2000.L requests by hand from the protocols, and the device runs its
real worker in a forked child sharing guest memory through the memfd (jailed as in the
sandbox when run as root, else unjailed). Requests go `DEPTH` at a time, as a guest
with several processes (or readahead) keeps them in flight. Cases:

  * stat: FUSE LOOKUP of a name; 9P walk + getattr + clunk (what the Linux clients
    send for a stat of an uncached name) — vs. os.stat
  * create+unlink: FUSE CREATE, RELEASE, UNLINK, FORGET; 9P walk, lcreate, clunk,
    unlinkat — vs. os.open(O_CREAT), os.close, os.unlink
  * 1 MiB sequential read / write of a file in the page cache: FUSE READ/WRITE of 1 MiB;
    9P reads/writes of msize-sized pieces — vs. os.preadv/os.pwritev of 1 MiB

    python3 bench/fs.py [SECONDS_PER_CASE]
"""

from __future__ import annotations

import os
import select
import struct
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from crosvm.base import Event  # noqa: E402
from crosvm.config import SharedDirOption  # noqa: E402
from crosvm.devices.virtio.driver import QueueDriver  # noqa: E402
from crosvm.devices.virtio.queue import VIRTQ_DESC_F_WRITE  # noqa: E402
from crosvm.devices.virtio.virtio_device import Interrupt  # noqa: E402
from crosvm.jail import Jail, ensure_pivot_root  # noqa: E402
from crosvm.jail.jail import DEFAULT_PIVOT_ROOT, IdMapRequest  # noqa: E402
from crosvm.vm_memory import GuestMemory  # noqa: E402

MIB = 1 << 20
BIG_SIZE = 64 * MIB
FILES = 1000
DEPTH = 16
MEM_SIZE = 96 * MIB
PAYLOAD_AT = 88 * MIB  # the guest's pages holding data to write (1 MiB), never reallocated
MSIZE = 512 * 1024
REPLY_HEAD = 256


class Line:
    def __init__(self) -> None:
        self.trigger = Event()
        self.resample = Event()


class Guest:
    """The driver side of one device: its request queue, with whole batches in flight."""

    def __init__(self, kind: str, share: str, jailed: bool) -> None:
        self.mem = GuestMemory([(0, MEM_SIZE)])
        # fs: hiprio (FORGET) then the request queue; p9: one queue.
        self.drivers = [QueueDriver(self.mem, size=256, base=0x10000 + i * 0x10000)
                        for i in range(2 if kind == "fs" else 1)]
        for d in self.drivers:  # buffers live after every queue's rings
            d.next_free = d.data_start = 0x100000 + (MEM_SIZE - 0x100000) // 2 * (
                self.drivers.index(d))
        self.kicks = [Event() for _ in self.drivers]
        self.line = Line()
        self.pid, self.stop = self._start(kind, share, jailed)

    def _start(self, kind: str, share: str, jailed: bool) -> tuple[int, int]:
        option = SharedDirOption(src=share, tag="bench", type=kind)
        if kind == "fs":
            from crosvm.devices.virtio.fs.device import Fs as Device
        else:
            from crosvm.devices.virtio.p9 import P9 as Device
        device = Device(option)
        jail = Jail() if jailed else None
        seccomp = jail.filter_for(device.seccomp_policy) if jail else None
        config = device.jail_config()
        id_map = IdMapRequest(config.uid_map, config.gid_map) if jailed else None
        stop_r, stop_w = os.pipe()
        pid = os.fork()
        if pid == 0:
            try:
                os.close(stop_w)
                if jail is not None:
                    ensure_pivot_root(DEFAULT_PIVOT_ROOT)
                    jail.enter(seccomp, id_map, config=config)
                queues = [(i, d.queue, k) for i, (d, k) in enumerate(zip(self.drivers,
                                                                          self.kicks))]
                device.activate(self.mem, Interrupt(None, self.line), queues)
                os.read(stop_r, 1)
            finally:
                os._exit(0)
        os.close(stop_r)
        if id_map is not None:
            id_map.serve(pid)
        return pid, stop_w

    def batch(self, requests: list[tuple[bytes, int]], queue: int = -1) -> list[bytes]:
        """Post every (request, reply size) on `queue`, kick once, wait for all; the
        replies in order: their first REPLY_HEAD bytes (a guest's driver does not copy
        the data it asked the device to put in its pages; neither does this one)."""
        drv = self.drivers[queue]
        drv.next_free = drv.data_start
        heads = {}
        for i, request in enumerate(requests):
            data, reply = request[0], request[1]
            header = drv.alloc(len(data))
            self.mem.write(header, data)
            descs = [(header, len(data), 0)]
            if len(request) > 2:  # data already in guest pages (a page cache), not copied
                descs.append((*request[2], 0))
            reply_at = drv.alloc(reply) if reply else 0
            if reply:
                descs.append((reply_at, reply, VIRTQ_DESC_F_WRITE))
            heads[drv.add_descriptors(descs)] = (i, reply_at)
        self.kicks[queue].signal()
        out: list[bytes] = [b""] * len(requests)
        self.used_lengths = [0] * len(requests)
        left = len(requests)
        while left:
            if not select.select([self.line.trigger.fd], [], [], 5.0)[0]:
                raise SystemExit("the device stopped answering")
            self.line.trigger.wait()
            for head, length in drv.used():
                i, addr = heads[head]
                out[i] = self.mem.read(addr, min(length, REPLY_HEAD)) if length else b""
                self.used_lengths[i] = length
                left -= 1
        return out

    def close(self) -> None:
        os.close(self.stop)
        _, status = os.waitpid(self.pid, 0)
        if status:
            raise SystemExit(f"the device process ended with status {status:#x}")
        self.mem.close()


# --- FUSE (include/uapi/linux/fuse.h) ---------------------------------------------
FUSE_LOOKUP, FUSE_FORGET, FUSE_UNLINK, FUSE_OPEN, FUSE_READ, FUSE_WRITE = 1, 2, 10, 14, 15, 16
FUSE_RELEASE, FUSE_INIT, FUSE_CREATE = 18, 26, 35
IN_HEADER = struct.Struct("<IIQQIIII")
OUT_HEADER = struct.Struct("<IiQ")
ENTRY_OUT_NODEID = struct.Struct("<Q")


class Fuse:
    def __init__(self, guest: Guest) -> None:
        self.g = guest
        self.unique = 0
        (init,) = self.g.batch([self.req(FUSE_INIT, 0, struct.pack("<IIII", 7, 31, MIB, 0))],
                               1)
        self.check(init)

    def req(self, opcode: int, nodeid: int, body: bytes, extra: int = 0) -> tuple[bytes, int]:
        """The request's header and arguments (`extra` bytes of data follow in their
        own buffer)."""
        self.unique += 1
        return (IN_HEADER.pack(IN_HEADER.size + len(body) + extra, opcode, self.unique,
                               nodeid, 0, 0, 1, 0) + body, 4096)

    @staticmethod
    def check(reply: bytes) -> bytes:
        _, error, _ = OUT_HEADER.unpack_from(reply)
        if error:
            raise SystemExit(f"FUSE error {error}")
        return reply[OUT_HEADER.size:]

    def lookup(self, parent: int, names: list[str]) -> list[int]:
        replies = self.g.batch([self.req(FUSE_LOOKUP, parent, n.encode() + b"\0")
                                for n in names], 1)
        return [ENTRY_OUT_NODEID.unpack_from(self.check(r))[0] for r in replies]

    def open(self, nodeid: int, flags: int) -> int:
        (r,) = self.g.batch([self.req(FUSE_OPEN, nodeid, struct.pack("<II", flags, 0))], 1)
        return struct.unpack_from("<Q", self.check(r))[0]


def fuse_cases(g: Guest, share: str) -> dict[str, float]:
    f = Fuse(g)
    (d,) = f.lookup(1, ["d"])
    (d2,) = f.lookup(1, ["d2"])
    (big,) = f.lookup(1, ["big"])
    names = [f"f{i}" for i in range(FILES)]

    def stat(i: int) -> int:
        f.lookup(d, [names[(i + k) % FILES] for k in range(DEPTH)])
        return DEPTH

    def create_unlink(i: int) -> int:
        new = [f"n{i}_{k}" for k in range(DEPTH)]
        created = g.batch([f.req(FUSE_CREATE, d2, struct.pack("<IIII", os.O_WRONLY, 0o100644,
                                                                0, 0) + n.encode() + b"\0")
                           for n in new], 1)
        nodes, fhs = [], []
        for r in created:
            body = f.check(r)
            nodes.append(ENTRY_OUT_NODEID.unpack_from(body)[0])
            fhs.append(struct.unpack_from("<Q", body, 128)[0])  # open_out after entry_out
        g.batch([f.req(FUSE_RELEASE, node, struct.pack("<QIIQ", fh, os.O_WRONLY, 0, 0))
                 for node, fh in zip(nodes, fhs)], 1)
        g.batch([f.req(FUSE_UNLINK, d2, n.encode() + b"\0") for n in new], 1)
        g.batch([(f.req(FUSE_FORGET, node, struct.pack("<Q", 1))[0], 0) for node in nodes], 0)
        return DEPTH

    read_fh = f.open(big, os.O_RDONLY)
    write_fh = f.open(big, os.O_WRONLY)
    blocks = BIG_SIZE // MIB

    def read(i: int) -> int:
        replies = g.batch([(f.req(FUSE_READ, big, struct.pack(
            "<QQIIQII", read_fh, ((i + k) % blocks) * MIB, MIB, 0, 0, 0, 0))[0],
            OUT_HEADER.size + MIB) for k in range(4)], 1)
        for r in replies:
            f.check(r)
        return sum(n - OUT_HEADER.size for n in g.used_lengths)

    def write(i: int) -> int:
        replies = g.batch([(f.req(FUSE_WRITE, big, struct.pack(
            "<QQIIQII", write_fh, ((i + k) % blocks) * MIB, MIB, 0, 0, 0, 0), MIB)[0],
            64, (PAYLOAD_AT, MIB)) for k in range(4)], 1)
        return sum(struct.unpack_from("<I", f.check(r))[0] for r in replies)

    return {"stat": stat, "create+unlink": create_unlink, "read": read, "write": write}


# --- 9P2000.L -----------------------------------------------------------------------
TVERSION, TATTACH, TWALK, TGETATTR, TLCREATE, TLOPEN = 100, 104, 110, 24, 14, 12
TREAD, TWRITE, TCLUNK, TUNLINKAT, RLERROR = 116, 118, 120, 76, 7
NOFID = 0xFFFF_FFFF


def s9(text: str) -> bytes:
    data = text.encode()
    return struct.pack("<H", len(data)) + data


class P9:
    def __init__(self, guest: Guest) -> None:
        self.g = guest
        (r,) = self.g.batch([self.msg(TVERSION, struct.pack("<I", MSIZE) + s9("9P2000.L"))])
        self.msize = struct.unpack_from("<I", self.check(r))[0]
        self.check(self.g.batch([self.msg(TATTACH, struct.pack("<II", 0, NOFID) + s9("root")
                                          + s9("") + struct.pack("<I", 0))])[0])
        self.next_fid = 1

    def msg(self, kind: int, body: bytes, reply: int = 8192, extra: int = 0) -> tuple[bytes, int]:
        """The message's header and fields (`extra` bytes of data follow in their own
        buffer, as the Linux client's zero-copy writes do)."""
        return struct.pack("<IBH", 7 + len(body) + extra, kind, 1) + body, reply

    @staticmethod
    def check(reply: bytes) -> bytes:
        if reply[4] == RLERROR:
            raise SystemExit(f"9P error {struct.unpack_from('<I', reply, 7)[0]}")
        return reply[7:]

    def walk(self, fid: int, newfid: int, names: list[str]) -> tuple[bytes, int]:
        return self.msg(TWALK, struct.pack("<IIH", fid, newfid, len(names))
                        + b"".join(s9(n) for n in names))

    def fid(self) -> int:
        self.next_fid += 1
        return self.next_fid


def p9_cases(g: Guest, share: str) -> dict[str, float]:
    p = P9(g)
    dir2 = p.fid()
    p.check(g.batch([p.walk(0, dir2, ["d2"])])[0])
    fids = [p.fid() for _ in range(DEPTH)]

    def stat(i: int) -> int:
        reqs = []
        for k, fid in enumerate(fids):
            reqs += [p.walk(0, fid, ["d", f"f{(i + k) % FILES}"]),
                     p.msg(TGETATTR, struct.pack("<IQ", fid, 0x3FFF)),
                     p.msg(TCLUNK, struct.pack("<I", fid))]
        for r in g.batch(reqs):
            p.check(r)
        return DEPTH

    def create_unlink(i: int) -> int:
        reqs = []
        for k, fid in enumerate(fids):
            name = f"n{i}_{k}"
            reqs += [p.walk(dir2, fid, []),
                     p.msg(TLCREATE, struct.pack("<I", fid) + s9(name)
                           + struct.pack("<III", os.O_WRONLY | os.O_CREAT, 0o644, 0)),
                     p.msg(TCLUNK, struct.pack("<I", fid)),
                     p.msg(TUNLINKAT, struct.pack("<I", dir2) + s9(name) + struct.pack("<I", 0))]
        for r in g.batch(reqs):
            p.check(r)
        return DEPTH

    rfid, wfid = p.fid(), p.fid()
    for fid, flags in ((rfid, os.O_RDONLY), (wfid, os.O_WRONLY)):
        p.check(g.batch([p.walk(0, fid, ["big"])])[0])
        p.check(g.batch([p.msg(TLOPEN, struct.pack("<II", fid, flags))])[0])
    piece = p.msize - 24
    pieces = BIG_SIZE // piece

    def read(i: int) -> int:
        replies = g.batch([p.msg(TREAD, struct.pack("<IQI", rfid, ((i * 8 + k) % pieces) * piece,
                                                    piece), p.msize) for k in range(8)])
        return sum(struct.unpack_from("<I", p.check(r))[0] for r in replies)

    def write(i: int) -> int:
        replies = g.batch([(*p.msg(TWRITE, struct.pack("<IQI", wfid, ((i * 8 + k) % pieces)
                                                       * piece, piece), extra=piece),
                            (PAYLOAD_AT, piece)) for k in range(8)])
        return sum(struct.unpack_from("<I", p.check(r))[0] for r in replies)

    return {"stat": stat, "create+unlink": create_unlink, "read": read, "write": write}


# --- the limit: the same operations as host syscalls ----------------------------------
def host_cases(share: str) -> dict[str, object]:
    paths = [os.path.join(share, "d", f"f{i}") for i in range(FILES)]
    big = os.open(os.path.join(share, "big"), os.O_RDWR)
    buf = memoryview(bytearray(MIB))
    blocks = BIG_SIZE // MIB

    def stat(i: int) -> int:
        for k in range(DEPTH):
            os.stat(paths[(i + k) % FILES])
        return DEPTH

    def create_unlink(i: int) -> int:
        for k in range(DEPTH):
            path = os.path.join(share, "d2", f"h{i}_{k}")
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o644))
            os.unlink(path)
        return DEPTH

    def read(i: int) -> int:
        return sum(os.preadv(big, [buf], ((i + k) % blocks) * MIB) for k in range(4))

    def write(i: int) -> int:
        return sum(os.pwritev(big, [buf], ((i + k) % blocks) * MIB) for k in range(4))

    return {"stat": stat, "create+unlink": create_unlink, "read": read, "write": write}


def measure(fn, seconds: float) -> float:
    """Units (operations or bytes) per second."""
    done, i = 0, 0
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        done += fn(i)
        i += 1
    return done / (time.perf_counter() - start)


def main() -> int:
    seconds = float(sys.argv[1]) if len(sys.argv) > 1 else 3.0
    jailed = os.geteuid() == 0
    with tempfile.TemporaryDirectory(dir="/var/tmp") as share:
        os.chmod(share, 0o755)
        os.mkdir(os.path.join(share, "d"))
        os.mkdir(os.path.join(share, "d2"))
        for i in range(FILES):
            with open(os.path.join(share, "d", f"f{i}"), "w") as f:
                f.write("x")
        with open(os.path.join(share, "big"), "wb") as f:
            for _ in range(BIG_SIZE // MIB):
                f.write(b"\xa5" * MIB)
        limit = {name: measure(fn, seconds) for name, fn in host_cases(share).items()}
        print(f"share in the page cache; {DEPTH} metadata requests / 4 MiB of I/O in flight; "
              f"{seconds:g} s per case; device {'jailed (sandbox)' if jailed else 'unjailed'}\n")
        print(f"{'case':<16} {'virtio-fs':>12} {'virtio-9p':>12} {'host':>12} "
              f"{'fs/host':>8} {'9p/host':>8}   (goal: metadata 0.3, read 0.5)")
        results = {}
        for kind, cases in (("fs", fuse_cases), ("p9", p9_cases)):
            g = Guest(kind, share, jailed)
            try:
                results[kind] = {name: measure(fn, seconds)
                                 for name, fn in cases(g, share).items()}
            finally:
                g.close()
        for name in limit:
            scale, unit = (1e6, "MB/s") if name in ("read", "write") else (1, "ops/s")
            fs, p9, host = results["fs"][name], results["p9"][name], limit[name]
            print(f"{name + ' ' + unit:<16} {fs / scale:>12,.0f} {p9 / scale:>12,.0f} "
                  f"{host / scale:>12,.0f} {fs / host:>8.2f} {p9 / host:>8.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
