"""run_config: build the VM a Config describes, run it, and say how it ended."""

from __future__ import annotations

import logging
import os
import select
import signal
import termios
import tty
from typing import Sequence

from crosvm.arch.x86_64 import layout as L
from crosvm.arch.x86_64 import regs as R
from crosvm.arch.x86_64.acpi import PmPorts
from crosvm.arch.x86_64.boot import BASE_CMDLINE, BootError, initrd_addr_max, write_boot_data
from crosvm.arch.x86_64.cpuid import adjust_cpuid, phys_address_bits
from crosvm.base import Event
from crosvm.base.unix_socket import remove_socket
from crosvm.config import Config, ConfigError
from crosvm.devices.acpi import AcpiPm
from crosvm.devices.bus import Bus
from crosvm.devices.cmos import Cmos
from crosvm.devices.i8042 import I8042
from crosvm.devices.serial import Serial
from crosvm.devices.pci import PciDevice
from crosvm.devices.proxy import (BusProxy, DeviceProcess, HostRequests, PciProxy,
                                  describe_status, killing_signal)
from crosvm.devices.pvpanic import PvPanic
from crosvm.devices.serial_device import InputThread, SerialError, open_input, open_output
from crosvm.devices.virtio.balloon import Balloon
from crosvm.devices.virtio.rng import Rng
from crosvm.disk.disk_file import DiskError
from crosvm.hypervisor.kvm import Kvm, KvmError, KvmVm
from crosvm.jail import Jail, JailError, ensure_pivot_root
from crosvm.jail.seccomp import SeccompAuditLog, syscall_name
from crosvm.kernel_loader import KernelLoaderError, load_initrd, load_kernel
from crosvm.vm_memory import GuestMemory, GuestMemoryError
from crosvm.vm_control.signals import install_stop_signals
from crosvm.vmm.exit import ExitCode, ExitState
from crosvm.vmm.pci import PciSetup
from crosvm.vmm.vcpu import VcpuThread, install_kick_handler

log = logging.getLogger("crosvm")

# Devices a VM may not have (disks, net, vsock, pmem, virtio-console, shared dirs) and
# the control socket are imported when a VM has them: every module costs start-up time.

SERIAL_PORTS = {1: 0x3F8, 2: 0x2F8, 3: 0x3E8, 4: 0x2E8}
SERIAL_IRQS = {1: 4, 2: 3, 3: 4, 4: 3}
SERIAL_PORT_LEN = 8
CMOS_PORT = 0x70
I8042_IRQ = 1
EARLYCON = "earlycon=uart8250,io,0x3f8"


class SetupError(Exception):
    """The VM could not be built from a valid-looking config (bad file, KVM failure)."""

    def __init__(self, message: str, code: ExitCode = ExitCode.ERROR) -> None:
        super().__init__(message)
        self.code = code


def kernel_cmdline(cfg: Config) -> str:
    """crosvm's order: the base line, serial console options, the root disk, -p params."""
    parts = [BASE_CMDLINE]
    for p in cfg.serial_ports():
        if p.console:
            tty = "hvc" if p.hardware == "virtio-console" else "ttyS"
            parts.append(f"console={tty}{p.num - 1}")
        if p.earlycon:
            parts.append(f"earlycon=uart8250,io,{SERIAL_PORTS[p.num]:#x}")
    root = cfg.root_disk()
    if root is not None:
        index, disk = root
        parts.append(f"root=/dev/vd{chr(ord('a') + index)} {'ro' if disk.ro else 'rw'}")
    pmem_root = cfg.root_pmem()
    if pmem_root is not None:
        index, pmem = pmem_root
        parts.append(f"root=/dev/pmem{index} {'ro' if pmem.ro else 'rw'}")
    parts.extend(cfg.params)
    return " ".join(parts)


def _input_starter(fd: int, sink, name: str):
    """Starts host input where the device runs (inside its process when sandboxed)."""
    return lambda: InputThread(fd, sink, name).start()


class Vm:
    """A built VM: memory, buses, devices and vCPUs, ready to `run()`."""

    def __init__(self, cfg: Config, extra_pci_devices: Sequence[PciDevice] = ()) -> None:
        """`extra_pci_devices` are added after the command line's devices (for library
        users and tests; the CLI has no way to add them)."""
        self.cfg = cfg
        self.extra_pci_devices = list(extra_pci_devices)
        self.exit_state = ExitState()
        self.io_bus = Bus()
        self.mmio_bus = Bus()
        self._closers: list = []
        self._input_threads: list[InputThread] = []
        self._serials: list[Serial] = []
        self.processes: list[DeviceProcess] = []
        self.jail: Jail | None = None
        self.audit: SeccompAuditLog | None = None
        if not cfg.disable_sandbox:
            ensure_pivot_root(cfg.pivot_root)
            self.jail = Jail(pivot_root=cfg.pivot_root,
                             seccomp_log_failures=cfg.seccomp_log_failures)
            if cfg.seccomp_policy_dir is not None:
                self.jail.seccomp_policy_dir = cfg.seccomp_policy_dir
            # Every policy this VM needs, compiled before anything else is touched: a bad
            # policy file is an invalid argument, found without opening KVM.
            for policy in self._seccomp_policies():
                self.jail.filter_for(policy)
            self.audit = SeccompAuditLog()  # before any device runs: only this run counts
            self._closers.append(self.audit.close)
        self.kvm = Kvm(cfg.hypervisor_device)
        self.vm = KvmVm(self.kvm)
        self.mem_size = cfg.mem_mib << 20
        self.mem = GuestMemory(L.ram_ranges(self.mem_size))
        for region in self.mem.regions:
            self.vm.add_memory_region(region.guest_addr, region.size, region.host_address())
        self.vm.set_identity_map_addr(L.IDENTITY_MAP_ADDR)
        self.vm.set_tss_addr(L.TSS_ADDR)
        self.vm.create_irq_chip()
        self.vm.create_pit()
        self.pm_ports = PmPorts()
        self._irq_events: dict[int, Event] = {}
        self._cpuid = self.kvm.supported_cpuid()
        try:
            self._add_devices()
            self._add_pci_devices()
            for proc in self.processes:  # each device unshared while the next was forked
                proc.map_ids()
        except BaseException:
            # A library caller that catches this must not be left with device processes
            # waiting in their jails for a map (the CLI's exit would kill them anyway).
            for proc in self.processes:
                proc.shutdown()
                proc.reap(timeout=1.0)
                proc.close()
            raise
        self._load()
        self.vcpus = [self._create_vcpu(i) for i in range(cfg.cpus)]
        self.control: ControlServer | None = None
        if cfg.socket:  # after every device fork: no device process inherits it
            from crosvm.vm_control.handlers import vm_handlers
            from crosvm.vm_control.server import ControlServer
            self.control = ControlServer(cfg.socket, vm_handlers(self))
            self._closers.append(self.control.close)

    def _seccomp_policies(self) -> list[str]:
        cfg = self.cfg
        policies = [Serial.seccomp_policy, PvPanic.seccomp_policy]
        if cfg.disks:
            from crosvm.devices.virtio.block import Block
            policies.append(Block.seccomp_policy)
        if cfg.pmems:
            from crosvm.devices.virtio.pmem import Pmem
            policies.append(Pmem.seccomp_policy)
        if not cfg.no_rng:
            policies.append(Rng.seccomp_policy)
        if not cfg.no_balloon:
            policies.append(Balloon.seccomp_policy)
        if cfg.virtio_consoles():
            from crosvm.devices.virtio.console import Console
            policies.append(Console.seccomp_policy)
        if cfg.nets:
            from crosvm.devices.virtio.net import Net
            policies.append(Net.seccomp_policy)
        if cfg.vsock is not None:
            from crosvm.devices.virtio.vsock import Vsock
            policies.append(Vsock.seccomp_policy)
        if cfg.vhost_user:
            from crosvm.devices.virtio.vhost_user import VhostUserFrontend
            policies.append(VhostUserFrontend.seccomp_policy)
        return policies + [d.seccomp_policy for d in self.extra_pci_devices if d.seccomp_policy]

    def irq_event(self, irq: int) -> Event:
        """The irqfd for an edge-triggered ISA interrupt line (shared by its devices)."""
        if irq not in self._irq_events:
            event = Event()
            self.vm.register_irqfd(event.fd, irq)
            self._irq_events[irq] = event
        return self._irq_events[irq]

    # -- device processes -------------------------------------------------------
    def _device_died(self, what: str) -> None:
        self.exit_state.request(ExitCode.VM_CRASH, f"device process died: {what}")

    def _spawn(self, device: object, name: str, keep_fds: list[int], host: HostRequests,
               start=None) -> DeviceProcess:
        proc = DeviceProcess(device, name, keep_fds, self.jail, host, start)
        self.processes.append(proc)
        return proc

    def _spawn_pci(self, device: PciDevice, name: str, keep_fds: list[int],
                   host: HostRequests, start=None) -> PciDevice:
        return PciProxy(self._spawn(device, name, keep_fds, host, start), device, host,
                        self._device_died)

    def _check_processes(self, grace: float = 0.0) -> None:
        """A device process that ended on its own is a crash of the VM (exit 33).

        With `grace`, a process whose socket already failed is waited for that long,
        so the report says how it died."""
        for proc in self.processes:
            if proc.status is not None:
                continue
            status = proc.reap(grace, kill=False) if grace and proc.dead else proc.poll()
            if status is None:
                continue
            proc.dead = True
            proc.status = status
            how = describe_status(status)
            if killing_signal(status) == signal.SIGSYS:
                how = self._seccomp_kill(proc.name)
            log.error("device %s (pid %d) %s", proc.name, proc.pid, how)
            self.exit_state.explain(ExitCode.VM_CRASH, f"device {proc.name} {how}")

    def _seccomp_kill(self, name: str) -> str:
        nr = self.audit.killing_syscall(name) if self.audit is not None else None
        if nr is None:
            return ("killed by SIGSYS: a syscall outside its seccomp policy (the kernel's "
                    "audit log names it; /dev/kmsg was not readable or had no record)")
        return (f"killed by SIGSYS: syscall {syscall_name(nr)} ({nr}) is outside its "
                f"seccomp policy")

    def _report_logged_syscalls(self) -> None:
        """Under --seccomp-log-failures: what each device would have been killed for."""
        if self.audit is None or not self.cfg.seccomp_log_failures:
            return
        for proc in self.processes:
            nrs = self.audit.logged_syscalls(proc.name)
            if nrs:
                log.warning("device %s made syscalls outside its seccomp policy: %s", proc.name,
                            ", ".join(f"{syscall_name(n)} ({n})" for n in sorted(nrs)))

    def _add_devices(self) -> None:
        cfg = self.cfg
        for params in cfg.uarts():
            out = open_output(params)
            if out is not None:
                self._closers.append(out.close)
            irq = self.irq_event(SERIAL_IRQS[params.num])
            label = f"serial{params.num}"
            serial = Serial(irq, out, label=label)
            in_fd = open_input(params, out)
            if self.jail is None:
                self.io_bus.insert(serial, SERIAL_PORTS[params.num], SERIAL_PORT_LEN)
                self._serials.append(serial)
                if in_fd is not None:
                    self._input_threads.append(InputThread(in_fd, serial, f"{label}_input"))
                continue
            fds = [irq.fd] + (out.fds() if out is not None else [])
            start = None
            if in_fd is not None:
                fds.append(in_fd)
                start = _input_starter(in_fd, serial, f"{label}_input")
            host = HostRequests()  # a UART asks nothing of the VMM
            proc = self._spawn(serial, label, fds, host, start)
            self.io_bus.insert(BusProxy(proc, label, host, self._device_died),
                               SERIAL_PORTS[params.num], SERIAL_PORT_LEN)
        if not cfg.no_rtc:
            below = min(self.mem_size, L.END_ADDR_BEFORE_32BITS)
            self.io_bus.insert(Cmos(below, self.mem_size - below), CMOS_PORT, 2)
        if not cfg.no_i8042:
            i8042 = I8042(self.exit_state.reset, self.irq_event(I8042_IRQ))
            self.io_bus.insert(i8042, 0x60, 1)
            self.io_bus.insert(i8042, 0x64, 1)
        pm = AcpiPm(self.pm_ports, self.exit_state.poweroff, self.exit_state.reset,
                    sci=lambda level: self.vm.set_irq_line(self.pm_ports.sci_irq, level))
        for base, length in pm.ranges():
            self.io_bus.insert(pm, base, length)
        self.acpi_pm = pm

    def _add_pci_devices(self) -> None:
        """Bus 0 in a fixed order, so one command line always gives the same `lspci`."""
        cfg = self.cfg
        self.pci = PciSetup(self.vm, self.mem, self.io_bus, self.mmio_bus, self.mem_size,
                            phys_address_bits(self._cpuid), reset_port=self.acpi_pm,
                            spawn=self._spawn_pci if self.jail is not None else None)
        self._closers.append(self.pci.close)
        self.block_targets: list[PciDevice] = []  # by disk index, for `crosvm disk`
        if cfg.disks:
            from crosvm.devices.virtio.block import Block
            from crosvm.disk import open_disk
        for disk in cfg.disks:
            image = open_disk(disk.path, read_only=disk.ro, direct=disk.direct,
                              sparse=disk.sparse)
            self.block_targets.append(self._bus_target(self.pci.add_virtio(
                Block(image, disk.block_size,
                      disk.id.encode() if disk.id is not None else None))))
        for params in cfg.pmems:
            self.pci.add_virtio(self._pmem(params.path, params.ro))
        if not cfg.no_rng:
            self.pci.add_virtio(Rng())
        self.balloon_target: PciDevice | None = None  # for `crosvm balloon`
        if not cfg.no_balloon:
            self.balloon_target = self._bus_target(self.pci.add_virtio(
                Balloon(page_reporting=cfg.balloon_page_reporting)))
        for params in cfg.virtio_consoles():
            from crosvm.devices.virtio.console import open_console
            console = open_console(params, f"console{params.num}")
            if console.out is not None:
                self._closers.append(console.out.close)
            self.pci.add_virtio(console.device, console.keep_fds, console.start)
        for i, params in enumerate(cfg.nets):
            if params.passt or params.passt_socket:
                self.pci.add_virtio(self._passt_net(params, f"net{i}"))
                continue
            from crosvm.devices.virtio.net import Net
            from crosvm.devices.virtio.net_proto import net_mtu
            from crosvm.net.tap import open_net_taps
            tap, mac = open_net_taps(params)
            self.pci.add_virtio(Net(tap.fds, mac, mtu=net_mtu(tap.mtu()),
                                    mrg_rxbuf=params.mrg_rxbuf, label=f"net{i}"))
        if cfg.vsock is not None:
            self.pci.add_virtio(self._vsock(cfg.vsock))
        for share in cfg.shared_dirs:
            self.pci.add_virtio(_shared_dir_device(share))
        for i, params in enumerate(cfg.vhost_user):
            from crosvm.devices.virtio.vhost_user import VhostUserFrontend
            self.pci.add_virtio(VhostUserFrontend(
                params.type, params.socket, self.mem, params.max_queue_size, params.tag,
                label=f"vhost-user-{params.type}{i}"))

        def panic_exit(code: int) -> None:
            if code == ExitCode.GUEST_PANIC:  # the only exit a pvpanic device may ask for
                self.exit_state.request(ExitCode.GUEST_PANIC, "the guest kernel panicked")

        host = HostRequests(exit=panic_exit)
        self.pci.add(PvPanic(lambda: host.request_exit(ExitCode.GUEST_PANIC)), host)
        for device in self.extra_pci_devices:
            self.pci.add(device)

    def _bus_target(self, device: PciDevice) -> PciDevice:
        """What serves `device` on the bus: itself, or the proxy to its process (which
        shares its config object)."""
        for target in self.pci.root.devices.values():
            if target is device or target.config is device.config:
                return target
        raise LookupError(device.debug_label())

    def virtio_targets(self) -> list[PciDevice]:
        """Every virtio device as the VMM reaches it (for `suspend --full`)."""
        return [self._bus_target(d) for d in self.pci.devices if hasattr(d, "control")]

    def _pmem(self, path: str, read_only: bool) -> "Pmem":
        """Map the file above RAM in its own KVM slot (read-only for ro) and make its device."""
        from crosvm.devices.virtio.pmem import ADDRESS_ALIGN, Pmem, PmemFile
        pmem_file = PmemFile(path, read_only)
        try:
            address = self.pci.allocate_high(pmem_file.size, ADDRESS_ALIGN)
        except ValueError as e:
            pmem_file.close()
            raise DiskError(f"pmem {path}: does not fit the guest address space: {e}") from e
        try:
            self.vm.add_memory_region(address, pmem_file.size, pmem_file.host_address,
                                      read_only=read_only)
        except BaseException:
            pmem_file.close()
            raise
        device = Pmem(pmem_file, address)  # closed with the PCI devices
        log.debug("pmem %s: %#x bytes at guest %#x", path, pmem_file.size, address)
        return device

    def _vsock(self, params) -> "Vsock":
        """The userspace device for uds-path=; vhost-vsock is refused with the reason."""
        from crosvm.devices.virtio.vsock import Vsock, VsockError
        if params.uds_path is None:
            if not os.path.exists(params.device):
                raise VsockError(f"vsock: vhost-vsock needs {params.device}, which does not "
                                 "exist on this host (load the vhost_vsock module, or use "
                                 "uds-path=PATH for pycrosvm's userspace vsock device)")
            raise VsockError(f"vsock: vhost-vsock ({params.device}) is not supported yet; "
                             "use uds-path=PATH for pycrosvm's userspace vsock device")
        device = Vsock(params.cid, params.uds_path)
        self._closers.append(lambda: remove_socket(device.uds_path, device.socket_id))
        return device

    def _passt_net(self, params, label: str) -> "Net":
        from crosvm.devices.virtio.net import Net
        from crosvm.devices.virtio.net_proto import parse_mac
        from crosvm.net.passt import Passt
        passt = Passt(params.passt_socket)
        self._closers.append(passt.close)
        passt.watch()
        mac = parse_mac(params.mac) if params.mac is not None else None
        return Net([os.dup(passt.fd)], mac, mrg_rxbuf=params.mrg_rxbuf, label=label,
                   stream=True)

    def _load(self) -> None:
        cfg = self.cfg
        kernel = load_kernel(self.mem, cfg.kernel)
        initrd = None
        if cfg.initrd:
            initrd = load_initrd(self.mem, cfg.initrd, kernel.end, initrd_addr_max(kernel))
        write_boot_data(self.mem, kernel, kernel_cmdline(cfg), self.mem_size, initrd,
                        cfg.cpus, self.pm_ports, i8042=not cfg.no_i8042, rtc=not cfg.no_rtc,
                        pci=self.pci.layout())
        self.kernel = kernel

    def _create_vcpu(self, index: int) -> VcpuThread:
        vcpu = self.vm.create_vcpu(index)
        vcpu.set_cpuid(adjust_cpuid(self._cpuid, index, self.cfg.cpus))
        vcpu.set_msrs(R.boot_msrs(phys_address_bits(self._cpuid)))
        R.setup_fpu(vcpu)
        R.setup_lint(vcpu)
        if index == 0:
            # The BSP starts in long mode at the kernel entry; APs wait for INIT/SIPI.
            R.setup_sregs(self.mem, vcpu)
            R.setup_regs(vcpu, self.kernel.entry)
        return VcpuThread(vcpu, self.mem, self.io_bus, self.mmio_bus, self.exit_state)

    def _exit_request(self) -> str:
        self.exit_state.request(ExitCode.SUCCESS, "stopped through the control socket")
        return "Ok"

    def stop(self) -> None:
        """Ask the VM to stop as `crosvm stop` does (exit code 0)."""
        self.exit_state.request(ExitCode.SUCCESS)

    def run(self) -> ExitCode:
        install_kick_handler()
        # SIGHUP/SIGINT/SIGTERM stop the VM like `crosvm stop` (terminal restored, socket
        # removed); SIGUSR1/2 are logged and ignored.
        install_stop_signals(lambda name: self.exit_state.request(ExitCode.SUCCESS,
                                                                  f"stopped by {name}"))
        self.exit_state.add_listener(self._kick_all)
        waker = Event()
        self.exit_state.add_listener(waker.signal)
        for t in self._input_threads:
            t.start()
        if self.control is not None:
            self.control.start()
        for v in self.vcpus:
            v.start()
        try:
            self._wait_for_exit(waker)
        except KeyboardInterrupt:
            self.exit_state.request(ExitCode.SUCCESS)
        finally:
            waker.close()
        self._check_processes(grace=1.0)  # name the device (and syscall) that ended the run
        self._kick_all()
        for v in self.vcpus:
            v.join(5.0)
        return self.exit_state.code

    def _wait_for_exit(self, waker: Event) -> None:
        """Sleep until an exit is requested or a device process ends. Nothing wakes the
        VMM's main thread while the guest runs: each device process is watched through
        a pidfd (on kernels without pidfds, by looking every half second)."""
        poller = select.poll()
        poller.register(waker.fd, select.POLLIN)
        watched: dict[int, DeviceProcess] = {}
        timeout = None
        try:
            for proc in self.processes:
                try:
                    fd = os.pidfd_open(proc.pid)
                except OSError:
                    timeout = 500
                    continue
                watched[fd] = proc
                poller.register(fd, select.POLLIN)
            while not self.exit_state.is_set():
                ready = poller.poll(timeout)
                if any(fd in watched for fd, _ in ready) or timeout is not None:
                    self._check_processes()
                for fd in [fd for fd, proc in watched.items() if proc.status is not None]:
                    poller.unregister(fd)
                    os.close(fd)
                    del watched[fd]
        finally:
            for fd in watched:
                os.close(fd)

    def _kick_all(self) -> None:
        for v in self.vcpus:
            v.kick()

    def close(self) -> None:
        self._report_logged_syscalls()
        for proc in self.processes:
            proc.shutdown()
        for proc in self.processes:
            if proc.status is None:
                proc.status = proc.reap()
            proc.close()
        for t in self._input_threads:
            t.stop()
        for s in self._serials:
            s.close()
        for close in self._closers:
            close()


class RawTerminal:
    """Puts a terminal stdin into raw mode for the guest's console, restoring it after."""

    def __init__(self, wanted: bool) -> None:
        self.saved = None
        if wanted and os.isatty(0):
            self.saved = termios.tcgetattr(0)
            tty.setraw(0)

    def restore(self) -> None:
        if self.saved is not None:
            termios.tcsetattr(0, termios.TCSADRAIN, self.saved)


def run_config(cfg: Config, extra_pci_devices: Sequence[PciDevice] = ()) -> ExitCode:
    """Build and run a VM; log why it failed or stopped; return crosvm's exit code."""
    try:
        cfg.validate()
        vm = Vm(cfg, extra_pci_devices)
    except (ConfigError, KernelLoaderError, BootError, DiskError, JailError) as e:
        log.error("%s", e)
        return ExitCode.INVALID_ARGS
    except _setup_errors() as e:  # evaluated only when something was raised
        log.error("failed to set up the VM: %s", e)
        return ExitCode.ERROR
    terminal = RawTerminal(any(p.stdin for p in cfg.serial_ports()))
    try:
        code = vm.run()
    finally:
        terminal.restore()
        vm.close()
    if vm.exit_state.message:
        log.info("exiting with %s (%d): %s", code.name, code, vm.exit_state.message)
    else:
        log.info("exiting with %s (%d)", code.name, code)
    return code


def _setup_errors() -> tuple[type[BaseException], ...]:
    """The errors that mean "the host could not give the VM what it asked for" (exit 1),
    imported only when one was raised: their modules are optional devices'."""
    from crosvm.devices.virtio.vhost_user import VhostUserError
    from crosvm.devices.virtio.vsock import VsockError
    from crosvm.net.passt import PasstError
    from crosvm.net.tap import TapError
    return (KvmError, GuestMemoryError, SerialError, TapError, PasstError, VsockError,
            VhostUserError, OSError)


def _shared_dir_device(share):
    """The virtio-fs or virtio-9p device for one --shared-dir (imported only when a VM
    has one: the file servers are the largest device modules)."""
    if share.type == "fs":
        from crosvm.devices.virtio.fs.device import Fs
        return Fs(share)
    from crosvm.devices.virtio.p9 import P9
    return P9(share)
