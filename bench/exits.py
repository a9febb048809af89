"""VM exits handled per second: pycrosvm's vCPU loop vs. a bare C KVM_RUN loop.

The guest runs user-mode (CPL 3, IOPL 3) code doing `out` to port 0x80 in a loop, so
every iteration is one KVM_EXIT_IO. pycrosvm runs it through its real exit path
(`VcpuThread`, the `Bus`, a device); the C program is the limit on this host.

    python3 bench/exits.py [SECONDS]
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from crosvm.devices.bus import Bus, BusDevice  # noqa: E402
from crosvm.hypervisor.kvm import Kvm, KvmVm  # noqa: E402
from crosvm.hypervisor.kvm import bindings as B  # noqa: E402
from crosvm.vm_memory import GuestMemory  # noqa: E402
from crosvm.vmm.exit import ExitCode, ExitState  # noqa: E402
from crosvm.vmm.vcpu import VcpuThread, install_kick_handler  # noqa: E402

CODE_ADDR = 0x100000
CODE = bytes([0x66, 0xBA, 0x80, 0x00, 0xEE, 0xEB, 0xFD])   # mov $0x80,%dx; 1: out; jmp 1b


class Counter(BusDevice):
    def __init__(self) -> None:
        self.writes = 0

    def write(self, offset, address, data) -> None:
        self.writes += 1


def build_c() -> str:
    out_dir = os.path.join(os.path.dirname(HERE), ".cache")
    os.makedirs(out_dir, exist_ok=True)
    exe = os.path.join(out_dir, "kvm_pio_loop")
    src = os.path.join(HERE, "kvm_pio_loop.c")
    if not os.path.exists(exe) or os.path.getmtime(exe) < os.path.getmtime(src):
        subprocess.run(["gcc", "-O2", "-o", exe, src], check=True)
    return exe


def run_c(seconds: float) -> float:
    exe = build_c()
    out = subprocess.run([exe, str(seconds)], check=True, capture_output=True, text=True)
    return int(out.stdout) / seconds


def run_pycrosvm(seconds: float) -> float:
    kvm = Kvm()
    vm = KvmVm(kvm)
    mem = GuestMemory([(0, 4 << 20)])
    vm.add_memory_region(0, mem.size, mem.regions[0].host_address())
    vm.set_tss_addr(0xFFFB_D000)
    mem.write(CODE_ADDR, CODE)
    mem.write_int(0x9000, 0xA000 | 7, 8)
    mem.write_int(0xA000, 0xB000 | 7, 8)
    mem.write_int(0xB000, 0x0 | 0x87, 8)
    mem.write_int(0xB008, 0x200000 | 0x87, 8)
    vcpu = vm.create_vcpu(0)
    sregs = vcpu.get_sregs()
    sregs.cs = B.kvm_segment(base=0, limit=0xFFFFFFFF, selector=0x1B, type=0xB, present=1, dpl=3,
                             db=0, s=1, l=1, g=1)
    data = B.kvm_segment(base=0, limit=0xFFFFFFFF, selector=0x23, type=0x3, present=1, dpl=3,
                         db=1, s=1, l=0, g=1)
    sregs.ds = sregs.es = sregs.fs = sregs.gs = sregs.ss = data
    sregs.cr0, sregs.cr3, sregs.cr4, sregs.efer = 0x8000_0011, 0x9000, 0x20, 0x500
    vcpu.set_sregs(sregs)
    vcpu.set_regs(B.kvm_regs(rip=CODE_ADDR, rsp=0x200000, rflags=0x3002))
    io_bus = Bus()
    counter = Counter()
    io_bus.insert(counter, 0x80, 1)
    exit_state = ExitState()
    install_kick_handler()
    thread = VcpuThread(vcpu, mem, io_bus, Bus(), exit_state)
    exit_state.add_listener(thread.kick)
    thread.start()
    time.sleep(seconds)
    exit_state.request(ExitCode.SUCCESS)
    thread.join(5)
    return counter.writes / seconds


def main() -> int:
    seconds = float(sys.argv[1]) if len(sys.argv) > 1 else 5.0
    c_rate = run_c(seconds)
    py_rate = run_pycrosvm(seconds)
    print(f"{'VMM':<28}{'exits/s':>12}{'vs C':>10}")
    print(f"{'bare C KVM_RUN loop':<28}{c_rate:>12,.0f}{1.0:>10.2f}")
    print(f"{'pycrosvm VcpuThread + Bus':<28}{py_rate:>12,.0f}{py_rate / c_rate:>10.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
