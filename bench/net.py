"""virtio-net backend throughput: the device worker vs. the host's own TAP loop.

No guest kernel: a virtqueue driver (crosvm.devices.virtio.driver) plays the guest in
this process, and the net device's worker runs in a forked child sharing guest memory
(as block.py does, so the driver's Python does not share an interpreter with it). The
TAP lives in a network namespace the bench creates (it re-runs itself under
`ip netns exec`), so no frame leaves it. Cases:

  * transmit (guest -> TAP), 64-byte frames and 64 KiB TCP/IPv4 TSO frames (one vnet
    header with GSO_TCPV4 each): the limit is a host loop writing the same header+frame
    to the TAP fd;
  * receive (TAP -> guest), 64-byte UDP frames a sender process pushes through the
    namespace's stack to the TAP: the limit is a host loop reading the TAP fd while the
    same sender runs.

    python3 bench/net.py [SECONDS_PER_CASE]      (root: netns and TAP)
"""

from __future__ import annotations

import os
import select
import socket
import struct
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from crosvm.base import Event  # noqa: E402
from crosvm.devices.virtio import net_proto as P  # noqa: E402
from crosvm.devices.virtio.driver import QueueDriver  # noqa: E402
from crosvm.devices.virtio.queue import VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE  # noqa: E402
from crosvm.devices.virtio.net import Net  # noqa: E402
from crosvm.devices.virtio.virtio_device import BASE_FEATURES, Interrupt  # noqa: E402
from crosvm.net.tap import Tap, set_offload  # noqa: E402
from crosvm.vm_memory import GuestMemory  # noqa: E402

MEM_SIZE = 64 << 20
TAP_NAME = "bnet0"
HOST_IP, PEER_IP, PEER_MAC = "10.99.0.1", "10.99.0.2", "52:54:00:00:00:99"
DEPTH = 128
FEATURES = (BASE_FEATURES | 1 << P.F_CSUM | 1 << P.F_HOST_TSO4 | 1 << P.F_GUEST_CSUM
            | 1 << P.F_GUEST_TSO4)


class Line:
    def __init__(self) -> None:
        self.trigger = Event()
        self.resample = Event()


def small_frame() -> bytes:
    # To a MAC that is not the TAP's: the stack drops it as soon as it arrives.
    return P.VnetHeader().pack() + bytes.fromhex("525400000099525400000098" "88b5") + bytes(50)


def tso_frame() -> bytes:
    payload = 65000
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + 20 + payload, 1, 0x4000, 64, 6, 0,
                     socket.inet_aton(PEER_IP), socket.inet_aton("10.99.0.3"))
    tcp = struct.pack("!HHIIBBHHH", 1234, 5678, 1, 0, 5 << 4, 0x18, 65535, 0, 0)
    eth = bytes.fromhex("525400000099525400000098" "0800")
    hdr = P.VnetHeader(P.HDR_F_NEEDS_CSUM, P.GSO_TCPV4, 54, 1448, 34, 16)
    return hdr.pack() + eth + ip + tcp + bytes(payload)


def start_device(tap: Tap, mem: GuestMemory, drivers: list[QueueDriver], kicks: list[Event],
                 line: Line) -> tuple[int, int]:
    stop_r, stop_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(stop_w)
            net = Net(tap.fds, queue_size=drivers[0].size)
            net.ack_features(FEATURES)
            net.activate(mem, Interrupt(None, line),
                         [(i, d.queue, k) for i, (d, k) in enumerate(zip(drivers, kicks))])
            os.read(stop_r, 1)
        finally:
            os._exit(0)
    os.close(stop_r)
    return pid, stop_w


def device_case(tap: Tap, frame: bytes | None, seconds: float) -> tuple[float, float]:
    """Frames/s and MB/s through the device: transmit `frame`, or receive when None."""
    mem = GuestMemory([(0, MEM_SIZE)])
    drivers = [QueueDriver(mem, size=256, base=(1 + 16 * i) << 20) for i in range(3)]
    for d in drivers:
        d.data_start = d.next_free = d.next_free + (64 << 10)
    kicks, line = [Event() for _ in drivers], Line()
    rx, tx = drivers[0], drivers[1]
    index = 0 if frame is None else 1
    drv = drivers[index]
    # Every chain points at the same buffers, as the host loop writes (or reads into)
    # one buffer: both sides work on the same cache-warm bytes.
    if frame is None:
        bufs = [(drv.alloc(2048), 2048, VIRTQ_DESC_F_WRITE)]
    else:
        hdr, body = drv.alloc(P.VNET_HDR_LEN), drv.alloc(len(frame) - P.VNET_HDR_LEN, 4096)
        mem.write(hdr, frame[:P.VNET_HDR_LEN])
        mem.write(body, frame[P.VNET_HDR_LEN:])
        bufs = [(hdr, P.VNET_HDR_LEN, 0), (body, len(frame) - P.VNET_HDR_LEN, 0)]
    per = len(bufs)
    for i in range(DEPTH):
        for j, (addr, n, flags) in enumerate(bufs):
            more = VIRTQ_DESC_F_NEXT if j + 1 < per else 0
            drv.write_desc(per * i + j, addr, n, flags | more, per * i + j + 1)
        drv.publish(per * i)
    pid, stop = start_device(tap, mem, drivers, kicks, line)
    kicks[index].signal()
    done = nbytes = 0
    start = time.perf_counter()
    end = start + seconds
    while time.perf_counter() < end:
        if not select.select([line.trigger.fd], [], [], 2.0)[0]:
            raise SystemExit("the net worker stopped answering")
        line.trigger.wait()
        used = drv.used()
        for head, length in used:
            drv.publish(head)  # the same chain again
            nbytes += length if frame is None else len(frame) - P.VNET_HDR_LEN
        done += len(used)
        if used:
            kicks[index].signal()
    elapsed = time.perf_counter() - start
    os.close(stop)
    os.waitpid(pid, 0)
    mem.close()
    del rx, tx
    return done / elapsed, nbytes / elapsed / 1e6


def host_tx_case(tap: Tap, frame: bytes, seconds: float) -> tuple[float, float]:
    fd = tap.fds[0]
    done = 0
    start = time.perf_counter()
    end = start + seconds
    while time.perf_counter() < end:
        for _ in range(64):
            try:
                os.write(fd, frame)
            except BlockingIOError:
                continue
            done += 1
    elapsed = time.perf_counter() - start
    return done / elapsed, done * (len(frame) - P.VNET_HDR_LEN) / elapsed / 1e6


def host_rx_case(tap: Tap, seconds: float) -> tuple[float, float]:
    fd = tap.fds[0]
    buf = bytearray(65600)
    done = nbytes = 0
    start = time.perf_counter()
    end = start + seconds
    while time.perf_counter() < end:
        select.select([fd], [], [], 1.0)
        while True:
            try:
                n = os.readv(fd, [buf])
            except BlockingIOError:
                break
            done += 1
            nbytes += n - P.VNET_HDR_LEN
    elapsed = time.perf_counter() - start
    return done / elapsed, nbytes / elapsed / 1e6


SENDER = r"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
payload = bytes(22)   # 64-byte Ethernet frames
while True:
    try:
        s.sendto(payload, (sys.argv[1], 9))
    except OSError:
        pass
"""


def with_sender(fn, *args):
    sender = subprocess.Popen([sys.executable, "-c", SENDER, PEER_IP])
    try:
        time.sleep(0.2)
        return fn(*args)
    finally:
        sender.kill()
        sender.wait()


def drain(tap: Tap) -> None:
    while True:
        try:
            os.read(tap.fds[0], 65600)
        except BlockingIOError:
            return


def inner(seconds: float) -> int:
    tap = Tap.open(TAP_NAME)
    for cmd in (["ip", "link", "set", "lo", "up"],
                ["ip", "addr", "add", f"{HOST_IP}/24", "dev", TAP_NAME],
                ["ip", "link", "set", TAP_NAME, "up"],
                ["ip", "neigh", "add", PEER_IP, "lladdr", PEER_MAC, "dev", TAP_NAME]):
        subprocess.run(cmd, check=True)
    set_offload(tap.fds[0], P.TUN_F_CSUM | P.TUN_F_TSO4)
    print(f"TAP {TAP_NAME} in its own netns, {seconds:.0f} s per case, {DEPTH} chains in "
          "flight; device worker in a forked (unjailed) child\n")
    print(f"{'case':<34} {'device fr/s':>12} {'MB/s':>8} {'host fr/s':>12} {'MB/s':>8} "
          f"{'device/host':>11}")
    rows = [("transmit 64 B frames", lambda: device_case(tap, small_frame(), seconds),
             lambda: host_tx_case(tap, small_frame(), seconds)),
            ("transmit 64 KiB TSO4 frames", lambda: device_case(tap, tso_frame(), seconds),
             lambda: host_tx_case(tap, tso_frame(), seconds)),
            ("receive 64 B UDP frames", lambda: with_sender(device_case, tap, None, seconds),
             lambda: with_sender(host_rx_case, tap, seconds))]
    for name, device, host in rows:
        drain(tap)
        dev_fps, dev_mbs = device()
        drain(tap)
        host_fps, host_mbs = host()
        print(f"{name:<34} {dev_fps:>12,.0f} {dev_mbs:>8,.1f} {host_fps:>12,.0f} "
              f"{host_mbs:>8,.1f} {dev_fps / host_fps:>11.2f}")
    tap.close()
    return 0


def main() -> int:
    seconds = float(sys.argv[1]) if len(sys.argv) > 1 and sys.argv[1] != "--inner" else 5.0
    if "--inner" in sys.argv:
        return inner(float(sys.argv[-1]))
    if os.geteuid() != 0:
        print("bench/net.py needs root (a network namespace and a TAP)", file=sys.stderr)
        return 1
    ns = f"pcvm-bench-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        return subprocess.run(["ip", "netns", "exec", ns, sys.executable, __file__, "--inner",
                               str(seconds)]).returncode
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)


if __name__ == "__main__":
    sys.exit(main())
