"""The vCPU thread: KVM_RUN, decode the exit from the kvm_run page, dispatch, repeat."""

from __future__ import annotations

import ctypes
import errno
import logging
import signal
import threading

from crosvm.devices.bus import Bus
from crosvm.hypervisor.kvm import bindings as B
from crosvm.hypervisor.kvm.kvm import KvmVcpu
from crosvm.vm_memory import GuestMemory, GuestMemoryError
from crosvm.vmm.exit import ExitCode, ExitState

log = logging.getLogger("crosvm.vcpu")

_libc = ctypes.CDLL(None, use_errno=True)
_libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong]
_libc.ioctl.restype = ctypes.c_int
PR_SET_NAME = 15

# Signal used to kick a vCPU thread out of KVM_RUN (its handler does nothing).
KICK_SIGNAL = signal.SIGRTMIN + 1

# _IO(KVMIO, 0xad): tell the guest's kvmclock the vCPU was stopped by the host, so its
# soft-lockup watchdog does not count the pause.
KVM_KVMCLOCK_CTRL = 0xAEAD
PARK_POLL = 0.2  # how often a parked vCPU looks at the exit state

_MMIO_DATA_OFFSET = B.kvm_run.exit.offset + B._kvm_run_mmio.data.offset


def install_kick_handler() -> None:
    """Must run on the main thread before vCPU threads start."""
    signal.signal(KICK_SIGNAL, lambda *_: None)
    signal.siginterrupt(KICK_SIGNAL, True)


def translate_gva(mem: GuestMemory, cr3: int, gva: int) -> int | None:
    """Walk 4-level long-mode page tables; None when unmapped or outside RAM."""
    table = cr3 & 0x000F_FFFF_FFFF_F000
    for level, shift in enumerate((39, 30, 21, 12)):
        try:
            entry = mem.read_int(table + ((gva >> shift) & 0x1FF) * 8, 8)
        except GuestMemoryError:
            return None
        if not entry & 1:
            return None
        base = entry & 0x000F_FFFF_FFFF_F000
        if level in (1, 2) and entry & 0x80:  # 1 GiB or 2 MiB page
            return (base & ~((1 << shift) - 1)) | (gva & ((1 << shift) - 1))
        table = base
    return table | (gva & 0xFFF)


def instruction_bytes(mem: GuestMemory, vcpu: KvmVcpu, rip: int, count: int = 15) -> bytes:
    """Bytes at RIP, following the guest's page tables when paging is on."""
    sregs = vcpu.get_sregs()
    addr = translate_gva(mem, sregs.cr3, rip) if sregs.cr0 & 0x8000_0000 else rip
    if addr is None:
        return b""
    out = bytearray()
    for i in range(count):
        try:
            out += mem.read(addr + i, 1)
        except GuestMemoryError:
            break
    return bytes(out)


class VcpuThread:
    """Runs one vCPU until the VM exits. Python handles only the exits KVM cannot."""

    def __init__(self, vcpu: KvmVcpu, mem: GuestMemory, io_bus: Bus, mmio_bus: Bus,
                 exit_state: ExitState) -> None:
        self.vcpu = vcpu
        self.mem = mem
        self.io_bus = io_bus
        self.mmio_bus = mmio_bus
        self.exit_state = exit_state
        self.thread = threading.Thread(target=self._run, name=f"crosvm_vcpu{vcpu.id}",
                                       daemon=True)
        self._may_run = threading.Event()  # cleared by suspend(): park outside KVM_RUN
        self._may_run.set()
        self.parked = threading.Event()

    def suspend(self) -> None:
        """Park the vCPU outside KVM_RUN (`crosvm suspend`); `parked` is set once it is."""
        self._may_run.clear()
        self.kick()

    def resume(self) -> None:
        """Let a parked vCPU run again."""
        self._may_run.set()

    def is_parked(self) -> bool:
        """Parked, or not running at all (not started yet, or ended)."""
        return self.parked.is_set() or not self.thread.is_alive()

    def _park(self) -> None:
        self.parked.set()
        try:
            while not self._may_run.wait(PARK_POLL):
                if self.exit_state.is_set():
                    return
        finally:
            self.parked.clear()
        self.vcpu.run_page.immediate_exit = 0
        if _libc.ioctl(self.vcpu.fd, KVM_KVMCLOCK_CTRL, 0) < 0:
            # EINVAL: the guest has not set up kvmclock; nothing to tell it.
            log.debug("vcpu %d: KVM_KVMCLOCK_CTRL: errno %d", self.vcpu.id, ctypes.get_errno())

    def start(self) -> None:
        self.thread.start()

    def kick(self) -> None:
        """Make KVM_RUN return now (or at once next time it is entered)."""
        self.vcpu.run_page.immediate_exit = 1
        ident = self.thread.ident
        if ident is not None and self.thread.is_alive():
            try:
                signal.pthread_kill(ident, KICK_SIGNAL)
            except ProcessLookupError:
                pass

    def join(self, timeout: float | None = None) -> None:
        self.thread.join(timeout)

    def _crash(self, message: str) -> None:
        log.error("%s", message)
        self.exit_state.request(ExitCode.VM_CRASH, message)

    def _internal_error(self, run: B.kvm_run) -> None:
        internal = run.exit.internal
        regs = self.vcpu.get_regs()
        insn = instruction_bytes(self.mem, self.vcpu, regs.rip)
        data = " ".join(f"{internal.data[i]:#x}" for i in range(min(internal.ndata, 16)))
        self._crash(f"vcpu {self.vcpu.id}: KVM internal error (suberror {internal.suberror}) "
                    f"at RIP {regs.rip:#x}; instruction bytes: {insn.hex(' ') or 'unreadable'}"
                    + (f"; data: {data}" if data else ""))

    def _run(self) -> None:
        # The kernel's name for the thread (top -H, perf, /proc/PID/task/TID/comm), as
        # crosvm names its vCPU threads.
        _libc.prctl(PR_SET_NAME, self.thread.name.encode()[:15], 0, 0, 0)
        try:
            self._loop()
        except Exception as e:  # never leave the VM hanging on a dead vCPU
            log.exception("vcpu %d failed", self.vcpu.id)
            self.exit_state.request(ExitCode.VM_CRASH, f"vcpu {self.vcpu.id} failed: {e}")

    def _loop(self) -> None:
        vcpu = self.vcpu
        fd = vcpu.fd
        run = vcpu.run_page
        page = memoryview(vcpu.run_mmap)
        io_read = self.io_bus.read
        io_write = self.io_bus.write
        mmio = self.mmio_bus
        exit_state = self.exit_state
        ioctl = _libc.ioctl
        KVM_RUN = B.KVM_RUN
        may_run = self._may_run
        while not exit_state.is_set():
            if not may_run.is_set():
                self._park()
                continue
            if ioctl(fd, KVM_RUN, 0) < 0:
                err = ctypes.get_errno()
                if err in (errno.EINTR, errno.EAGAIN):
                    if run.immediate_exit and may_run.is_set() and not exit_state.is_set():
                        run.immediate_exit = 0  # a suspend kick that a resume overtook
                    continue
                self._crash(f"vcpu {vcpu.id}: KVM_RUN failed: errno {err}")
                return
            reason = run.exit_reason
            if reason == B.KVM_EXIT_IO:
                io = run.exit.io
                size = io.size
                port = io.port
                offset = io.data_offset
                out = io.direction == B.KVM_EXIT_IO_OUT
                for i in range(io.count):
                    view = page[offset + i * size:offset + (i + 1) * size]
                    if out:
                        io_write(port, view)
                    elif not io_read(port, view):
                        view[:] = b"\xff" * size   # nothing there: the bus floats high
            elif reason == B.KVM_EXIT_MMIO:
                m = run.exit.mmio
                length = min(m.len, 8)
                view = page[_MMIO_DATA_OFFSET:_MMIO_DATA_OFFSET + length]
                if m.is_write:
                    mmio.write(m.phys_addr, view)
                elif not mmio.read(m.phys_addr, view):
                    view[:] = b"\xff" * length
            elif reason == B.KVM_EXIT_INTR:
                continue
            elif reason == B.KVM_EXIT_SHUTDOWN:
                # A triple fault: the PC resets.
                exit_state.request(ExitCode.GUEST_RESET)
                return
            elif reason == B.KVM_EXIT_SYSTEM_EVENT:
                kind = run.exit.system_event.type
                if kind == B.KVM_SYSTEM_EVENT_SHUTDOWN:
                    exit_state.request(ExitCode.SUCCESS)
                elif kind == B.KVM_SYSTEM_EVENT_RESET:
                    exit_state.request(ExitCode.GUEST_RESET)
                else:
                    self._crash(f"vcpu {vcpu.id}: system event {kind}")
                return
            elif reason == B.KVM_EXIT_INTERNAL_ERROR:
                self._internal_error(run)
                return
            elif reason == B.KVM_EXIT_FAIL_ENTRY:
                fail = run.exit.fail_entry
                self._crash(f"vcpu {vcpu.id}: VM entry failed "
                            f"(reason {fail.hardware_entry_failure_reason:#x})")
                return
            elif reason == B.KVM_EXIT_HLT:
                # With the in-kernel irqchip HLT stays in the kernel; a HLT exit means the
                # vCPU has nothing left to run.
                log.info("vcpu %d halted", vcpu.id)
                return
            else:
                regs = vcpu.get_regs()
                self._crash(f"vcpu {vcpu.id}: unexpected exit reason {reason} "
                            f"at RIP {regs.rip:#x}")
                return
