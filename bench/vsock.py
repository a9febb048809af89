"""virtio-vsock throughput: the userspace device (hybrid vsock) vs. a host Unix-socket copy.

No guest kernel: a virtqueue driver (crosvm.devices.virtio.driver) plays the guest's
vsock transport in this process, and the device's worker runs in a forked child sharing
guest memory (as net.py and block.py do, so the driver's Python does not share an
interpreter with it). The host programs are forked processes of their own. Cases, 64 KiB
chunks:

  * host -> guest: a host program connects to the device's uds_path, writes
    `CONNECT <port>`, reads `OK <port>`, then writes 64 KiB chunks as fast as it can.
    The harness is the guest: it answers the REQUEST with a RESPONSE giving 1 MiB of
    credit, keeps 128 receive buffers of 64 KiB + header posted, counts the payload of
    each RW packet (reading its header, not copying the data), re-posts the buffer, and
    sends CREDIT_UPDATE with fwd_cnt = bytes consumed whenever half its buffer was
    consumed since the last one (as a guest driver does).
  * guest -> host: a host reader listens on `<uds_path>_<port>` and reads everything;
    the harness connects (REQUEST), then keeps RW packets of 64 KiB in flight (every
    chain points at the same header and payload buffers), within the credit the device
    grants (buf_alloc and fwd_cnt of every packet it sends, i.e. its CREDIT_UPDATEs),
    counting each chain's payload when the device returns it.

The limit for both: the same writer and reader processes on a plain
socketpair(AF_UNIX, SOCK_STREAM), moving the same 64 KiB chunks. The device cases run
three busy processes (host program, device worker, guest harness) where the limit runs
two; on a 2-core machine that is part of the price of the device. "worker CPU" and
"guest CPU" are what the device process and the harness used over the measured window,
as a share of one core (a worker well under 100% is waiting on wake-ups, not computing).
The harness reads used rings through UsedRing, not QueueDriver.used(): see there why.

    python3 bench/vsock.py [SECONDS_PER_CASE] [--profile]     (no root needed)

--profile runs the device cases again with cProfile in the worker thread of the forked
device process and prints its hottest functions (the throughput under the profiler is
not comparable).
"""

from __future__ import annotations

import os
import select
import signal
import socket
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from crosvm.base import Event  # noqa: E402
from crosvm.devices.virtio import virtio_device as V  # noqa: E402
from crosvm.devices.virtio import vsock as VS  # noqa: E402
from crosvm.devices.virtio import vsock_proto as P  # noqa: E402
from crosvm.devices.virtio.driver import QueueDriver  # noqa: E402
from crosvm.devices.virtio.queue import VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE  # noqa: E402
from crosvm.vm_memory import GuestMemory  # noqa: E402

MEM_SIZE = 64 << 20
CID = 3
CHUNK = 64 << 10
RX_DEPTH = 128           # receive buffers posted, host -> guest
GUEST_BUF_ALLOC = 1 << 20  # the guest's receive buffer (the device's credit)
GUEST_PORT_IN = 5000     # the guest program host connections go to
GUEST_PORT_OUT = 1000    # the guest's port for its connection to the host
HOST_PORT = 5001         # where the host reader listens (`<uds_path>_5001`)
U32 = 0xFFFF_FFFF


class Line:
    def __init__(self) -> None:
        self.trigger = Event()
        self.resample = Event()


class UsedRing:
    """A queue's used ring read as a guest driver reads it, but guarded against a torn
    index: the device publishes used->idx with struct.pack_into
    (crosvm/devices/virtio/queue.py, Queue.add_used), which zeroes the field and then
    stores it a byte at a time, so a concurrent reader can see 0 or half an index.
    QueueDriver.used() trusts what it reads and then walks ~65,000 stale entries (the
    harness re-posts buffers the device still owns and loses count). Here an index is
    taken only when two reads agree and it is at most a queue ahead."""

    def __init__(self, drv: QueueDriver) -> None:
        self.drv = drv
        view = drv.mem.slice(drv.queue.used_ring, 4 + 8 * drv.size)
        self.idx = view.cast("H")     # [1] is used->idx: one 16-bit load
        self.elems = view.cast("I")   # [1 + 2 * slot] id, [2 + 2 * slot] len
        view.release()

    def __call__(self) -> list[tuple[int, int]]:
        drv, idx_view = self.drv, self.idx
        seen, size = drv.used_seen, drv.size
        for _ in range(100_000):
            idx = idx_view[1]
            if idx == idx_view[1] and (idx - seen) & 0xFFFF <= size:
                break
        else:
            raise SystemExit(f"used->idx stays at {idx}, {(idx - seen) & 0xFFFF} ahead of "
                             f"the {seen} seen (queue size {size})")
        elems, out = self.elems, []
        while seen != idx:
            slot = 1 + 2 * (seen % size)
            out.append((elems[slot], elems[slot + 1]))
            seen = (seen + 1) & 0xFFFF
        drv.used_seen = seen
        return out

    def release(self) -> None:
        self.idx.release()
        self.elems.release()


class Guest:
    """Guest memory, the three queues' drivers, their kick events and the INTx line."""

    def __init__(self) -> None:
        self.mem = GuestMemory([(0, MEM_SIZE)])
        self.drivers = [QueueDriver(self.mem, size=VS.QUEUE_SIZE, base=(1 + 16 * i) << 20)
                        for i in range(3)]
        for d in self.drivers:
            d.data_start = d.next_free = d.next_free + (64 << 10)
        self.kicks = [Event() for _ in self.drivers]
        self.line = Line()
        self.used = [UsedRing(d) for d in self.drivers]

    def wait(self, what: str) -> None:
        if not select.select([self.line.trigger.fd], [], [], 2.0)[0]:
            raise SystemExit(f"the vsock worker stopped answering ({what})")
        self.line.trigger.wait()

    def header(self, src_port: int, dst_port: int, op: int, length: int = 0,
               fwd_cnt: int = 0) -> bytes:
        return P.HDR.pack(CID, P.HOST_CID, src_port, dst_port, length, P.TYPE_STREAM, op, 0,
                          GUEST_BUF_ALLOC, fwd_cnt)

    def close(self) -> None:
        for u in self.used:
            u.release()
        self.mem.close()


def start_device(dev: VS.Vsock, guest: Guest, profile: str | None) -> tuple[int, int]:
    """Fork the device's worker into a child; returns its pid and the fd that stops it
    when closed. With `profile`, the worker thread runs under cProfile and dumps its
    stats there when stopped."""
    stop_r, stop_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(stop_w)
            if profile:
                import cProfile
                prof = cProfile.Profile()
                run = V.QueueWorker._run

                def profiled(self) -> None:
                    prof.enable()
                    try:
                        run(self)
                    finally:
                        prof.disable()
                        prof.dump_stats(profile)

                V.QueueWorker._run = profiled  # before the thread is made
            dev.activate(guest.mem, V.Interrupt(None, guest.line),
                         [(i, d.queue, k) for i, (d, k) in
                          enumerate(zip(guest.drivers, guest.kicks))])
            os.read(stop_r, 1)
            if profile:
                dev.worker.stop()
        finally:
            os._exit(0)
    os.close(stop_r)
    dev.listener.close()  # the child's copy listens; this process never accepts
    return pid, stop_w


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process `pid` so far (all its threads)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Window:
    """The measured interval: wall time, and the CPU the worker and the harness used."""

    def __init__(self, pid: int, seconds: float) -> None:
        self.pid = pid
        self.start = time.perf_counter()
        self.end_at = self.start + seconds
        self.cpu = (cpu_seconds(pid), time.process_time())

    def result(self, nbytes: int) -> tuple[float, float, float]:
        """(MB/s, worker CPU, harness CPU), CPU as a fraction of one core."""
        elapsed = time.perf_counter() - self.start
        worker, harness = cpu_seconds(self.pid), time.process_time()
        return (nbytes / elapsed / 1e6, (worker - self.cpu[0]) / elapsed,
                (harness - self.cpu[1]) / elapsed)


def stop_device(pid: int, stop: int) -> None:
    os.close(stop)
    _, status = os.waitpid(pid, 0)
    if status != 0:
        raise SystemExit(f"the vsock device process ended with status {status:#x}")


# -- host programs (forked processes) --------------------------------------------------
def fork(fn, *args) -> int:
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            fn(*args)
        except (BrokenPipeError, ConnectionResetError):
            pass
        except BaseException:
            import traceback
            traceback.print_exc()
            code = 1
        finally:
            os._exit(code)
    return pid


def end(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    os.waitpid(pid, 0)


def writer(sock: socket.socket) -> None:
    """The host program: 64 KiB chunks, as fast as the socket takes them."""
    chunk = bytes(CHUNK)
    while True:
        sock.sendall(chunk)


def connect_and_write(path: str, port: int) -> None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)
    sock.sendall(f"CONNECT {port}\n".encode())
    line = b""
    while not line.endswith(b"\n"):
        more = sock.recv(1)
        if not more:
            raise SystemExit("the device closed the connection instead of answering OK")
        line += more
    if not line.startswith(b"OK "):
        raise SystemExit(f"unexpected answer {line!r}")
    writer(sock)


def reader(sock: socket.socket, seconds: float | None = None, report: int = -1) -> None:
    """The host reader: everything, 64 KiB at a time, until EOF. With `report`, it
    writes `bytes elapsed` there for the `seconds` after its first byte."""
    buf = bytearray(CHUNK)
    total = 0
    start = deadline = None
    while True:
        n = sock.recv_into(buf)
        if not n:
            return
        if start is None:
            start = time.perf_counter()
            deadline = start + seconds if seconds else None
            n = 0  # the window starts after the first read
        total += n
        if deadline is not None and time.perf_counter() >= deadline:
            os.write(report, f"{total} {time.perf_counter() - start}".encode())
            os.close(report)
            deadline = None


def accept_and_read(listener: socket.socket) -> None:
    sock, _ = listener.accept()
    listener.close()
    reader(sock)


# -- cases -----------------------------------------------------------------------------
def host_case(seconds: float) -> float:
    """MB/s from a writer process to a reader process over a socketpair (the limit)."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    report_r, report_w = os.pipe()
    rpid = fork(reader, b, seconds, report_w)
    os.close(report_w)
    wpid = fork(writer, a)
    a.close()
    b.close()
    try:
        if not select.select([report_r], [], [], seconds + 5)[0]:
            raise SystemExit("the host reader did not report")
        nbytes, elapsed = os.read(report_r, 64).split()
    finally:
        end(wpid)
        end(rpid)
        os.close(report_r)
    return int(nbytes) / float(elapsed) / 1e6


def host_to_guest(seconds: float, tmp: str,
                  profile: str | None = None) -> tuple[float, float, float]:
    """MB/s from a host program through the device to the guest harness (and the CPU
    the worker and the harness used, as Window.result)."""
    path = os.path.join(tmp, "h2g.sock")
    dev = VS.Vsock(CID, path)
    dev.ack_features(V.BASE_FEATURES | 1 << P.F_STREAM)
    g = Guest()
    mem, rx, tx = g.mem, g.drivers[VS.RX], g.drivers[VS.TX]
    size = P.HDR_LEN + CHUNK
    rx_addr = []
    for i in range(RX_DEPTH):
        rx_addr.append(rx.alloc(size, 4096))
        rx.write_desc(i, rx_addr[i], size, VIRTQ_DESC_F_WRITE, 0)
        rx.publish(i)
    tx_free = list(range(tx.size))  # one descriptor per control packet
    tx_addr = [tx.alloc(64) for _ in range(tx.size)]

    def send(h: bytes) -> None:
        slot = tx_free.pop()
        mem.write(tx_addr[slot], h)
        tx.write_desc(slot, tx_addr[slot], P.HDR_LEN, 0, 0)
        tx.publish(slot)
        g.kicks[VS.TX].signal()

    pid, stop = start_device(dev, g, profile)
    g.kicks[VS.RX].signal()
    wpid = fork(connect_and_write, path, GUEST_PORT_IN)
    host_port = None
    nbytes = consumed = told = 0
    window = None
    try:
        while window is None or time.perf_counter() < window.end_at:
            g.wait("host -> guest")
            for head, _ in g.used[VS.TX]():
                tx_free.append(head)
            used = g.used[VS.RX]()
            for head, _ in used:
                h = P.HDR.unpack(mem.read(rx_addr[head], P.HDR_LEN))
                op = h[6]
                if op == P.OP_RW:
                    nbytes += h[4]
                    consumed = (consumed + h[4]) & U32
                elif op == P.OP_REQUEST and host_port is None:
                    host_port = h[2]
                    send(g.header(GUEST_PORT_IN, host_port, P.OP_RESPONSE))
                    window = Window(pid, seconds)
                elif op in (P.OP_RST, P.OP_SHUTDOWN):
                    raise SystemExit(f"the device sent {P.OP_NAMES[op]}")
                rx.publish(head)
            if used:
                g.kicks[VS.RX].signal()
            if (consumed - told) & U32 >= GUEST_BUF_ALLOC // 2:
                send(g.header(GUEST_PORT_IN, host_port, P.OP_CREDIT_UPDATE, fwd_cnt=consumed))
                told = consumed
        result = window.result(nbytes)
    finally:
        end(wpid)
        stop_device(pid, stop)
        g.close()
    return result


def guest_to_host(seconds: float, tmp: str,
                  profile: str | None = None) -> tuple[float, float, float]:
    """MB/s from the guest harness through the device to a host reader process (and
    the CPU the worker and the harness used)."""
    path = os.path.join(tmp, "g2h.sock")
    dev = VS.Vsock(CID, path)
    dev.ack_features(V.BASE_FEATURES | 1 << P.F_STREAM)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    if os.path.lexists(f"{path}_{HOST_PORT}"):
        os.unlink(f"{path}_{HOST_PORT}")  # the previous run's
    listener.bind(f"{path}_{HOST_PORT}")
    listener.listen(1)
    rpid = fork(accept_and_read, listener)
    listener.close()
    g = Guest()
    mem, rx, tx = g.mem, g.drivers[VS.RX], g.drivers[VS.TX]
    # Control packets from the device: small buffers, as a guest's.
    rx_addr = []
    for i in range(64):
        rx_addr.append(rx.alloc(P.HDR_LEN + 4096))
        rx.write_desc(i, rx_addr[i], P.HDR_LEN + 4096, VIRTQ_DESC_F_WRITE, 0)
        rx.publish(i)
    # Data: slot i is descriptors 2i (header) and 2i+1 (payload), all on the same bytes;
    # the last slot carries the REQUEST.
    rw_hdr, payload = tx.alloc(64), tx.alloc(CHUNK, 4096)
    mem.write(rw_hdr, g.header(GUEST_PORT_OUT, HOST_PORT, P.OP_RW, CHUNK))
    slots = tx.size // 2 - 1
    for i in range(slots):
        tx.write_desc(2 * i, rw_hdr, P.HDR_LEN, VIRTQ_DESC_F_NEXT, 2 * i + 1)
        tx.write_desc(2 * i + 1, payload, CHUNK, 0, 0)
    tx_free = list(range(slots))
    req = tx.alloc(64)
    mem.write(req, g.header(GUEST_PORT_OUT, HOST_PORT, P.OP_REQUEST))
    tx.write_desc(2 * slots, req, P.HDR_LEN, 0, 0)

    pid, stop = start_device(dev, g, profile)
    tx.publish(2 * slots)
    g.kicks[VS.RX].signal()
    g.kicks[VS.TX].signal()
    peer_alloc = peer_fwd = sent = 0
    connected = False
    nbytes = 0
    window = None
    try:
        while window is None or time.perf_counter() < window.end_at:
            posted = False
            while connected and tx_free and ((sent - peer_fwd) & U32) + CHUNK <= peer_alloc:
                tx.publish(2 * tx_free.pop())
                sent = (sent + CHUNK) & U32
                posted = True
            if posted:
                g.kicks[VS.TX].signal()
            g.wait("guest -> host")
            for head, _ in g.used[VS.TX]():
                if head != 2 * slots:
                    tx_free.append(head // 2)
                    nbytes += CHUNK
            used = g.used[VS.RX]()
            for head, _ in used:
                h = P.HDR.unpack(mem.read(rx_addr[head], P.HDR_LEN))
                op = h[6]
                if h[2] == HOST_PORT and h[3] == GUEST_PORT_OUT:
                    if op in (P.OP_RST, P.OP_SHUTDOWN):
                        raise SystemExit(f"the device sent {P.OP_NAMES[op]}")
                    if op == P.OP_RESPONSE:
                        connected = True
                        window = Window(pid, seconds)
                    peer_alloc, peer_fwd = h[8], h[9]
                rx.publish(head)
            if used:
                g.kicks[VS.RX].signal()
        result = window.result(nbytes)
    finally:
        stop_device(pid, stop)
        end(rpid)
        g.close()
    return result


def print_profile(path: str, title: str) -> None:
    import pstats
    print(f"\n--- device worker profile, {title} ---")
    stats = pstats.Stats(path).strip_dirs()
    stats.sort_stats("tottime").print_stats(15)
    print("cumulative, the device's own functions:")
    stats.sort_stats("cumulative").print_stats(
        r"vsock\.py|vsock_proto|queue\.py|descriptor_utils|virtio_device|guest_memory", 12)


def main() -> int:
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    profile = "--profile" in sys.argv
    seconds = float(args[0]) if args else 5.0
    print(f"{seconds:g} s per case, {CHUNK >> 10} KiB chunks; guest: {RX_DEPTH} receive "
          f"buffers, {GUEST_BUF_ALLOC >> 10} KiB buffer; device: {P.BUF_ALLOC >> 10} KiB "
          "per connection; device worker in a forked (unjailed) child, host programs in "
          f"their own processes; {os.cpu_count()} CPUs\n")
    print(f"{'case':<16} {'device MB/s':>12} {'host MB/s':>10} {'device/host':>11} "
          f"{'worker CPU':>10} {'guest CPU':>9}")
    with tempfile.TemporaryDirectory() as tmp:
        for name, device in (("host -> guest", host_to_guest), ("guest -> host", guest_to_host)):
            dev_mbs, worker_cpu, guest_cpu = device(seconds, tmp)
            host_mbs = host_case(seconds)
            print(f"{name:<16} {dev_mbs:>12,.0f} {host_mbs:>10,.0f} {dev_mbs / host_mbs:>11.2f} "
                  f"{worker_cpu:>10.0%} {guest_cpu:>9.0%}", flush=True)
        if profile:
            for name, device in (("host -> guest", host_to_guest),
                                 ("guest -> host", guest_to_host)):
                stats = os.path.join(tmp, "worker.prof")
                mbs, _, _ = device(seconds, tmp, stats)
                print_profile(stats, f"{name} ({mbs:,.0f} MB/s under the profiler)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
