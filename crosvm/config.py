"""The validated VM configuration that `crosvm run` builds from its arguments."""

from __future__ import annotations

from dataclasses import dataclass, field

# Only what this VMM implements: crosvm's unix-stream type and its debugcon and
# legacy-virtio-console hardware are refused by the parser, not offered by --help.
SERIAL_TYPES = ("stdout", "syslog", "sink", "file", "unix")
SERIAL_HARDWARE = ("serial", "virtio-console")
MAX_SERIAL_PORTS = 4


class ConfigError(ValueError):
    """An invalid combination of options; the message is shown to the user."""


@dataclass
class SerialParameters:
    """One `--serial` option."""

    type: str = "sink"
    hardware: str = "serial"
    num: int = 1
    path: str | None = None
    input: str | None = None
    console: bool = False
    earlycon: bool = False
    stdin: bool = False
    out_timestamp: bool = False


@dataclass
class DiskOption:
    """One `--block` option (or a deprecated --disk/--rwdisk/--root/--rwroot)."""

    path: str
    ro: bool = False
    root: bool = False
    sparse: bool = True
    direct: bool = False
    block_size: int = 512
    id: str | None = None


MAX_DISKS = 26


def default_serial() -> SerialParameters:
    """crosvm's default: COM1 is a stdout console that reads stdin."""
    return SerialParameters(type="stdout", num=1, console=True, stdin=True)


@dataclass
class Config:
    """Everything `run_config` needs to build and run one VM."""

    kernel: str | None = None
    initrd: str | None = None
    params: list[str] = field(default_factory=list)
    cpus: int = 1
    mem_mib: int = 256
    serial: list[SerialParameters] = field(default_factory=list)
    no_i8042: bool = False
    no_rtc: bool = False
    no_rng: bool = False
    no_balloon: bool = False
    balloon_bias_mib: int = 0
    balloon_page_reporting: bool = False
    disable_sandbox: bool = False
    pivot_root: str = "/var/empty"
    socket: str | None = None  # the control socket (-s/--socket)
    seccomp_policy_dir: str | None = None  # None: the policies shipped with the package
    seccomp_log_failures: bool = False
    disks: list[DiskOption] = field(default_factory=list)
    hypervisor_device: str = "/dev/kvm"

    def serial_ports(self) -> list[SerialParameters]:
        """The --serial options as given (crosvm's default console when none are)."""
        return self.serial or [default_serial()]

    def uarts(self) -> list[SerialParameters]:
        """All four legacy UARTs, as crosvm always creates them: unnamed ones are sinks."""
        given = {p.num: p for p in self.serial_ports() if p.hardware == "serial"}
        return [given.get(num, SerialParameters(type="sink", num=num))
                for num in range(1, MAX_SERIAL_PORTS + 1)]

    def validate(self) -> None:
        if not self.kernel:
            raise ConfigError("a kernel image is required")
        if not 1 <= self.cpus <= 254:
            raise ConfigError(f"cpus must be between 1 and 254, not {self.cpus}")
        if self.mem_mib < 16:
            raise ConfigError(f"mem must be at least 16 MiB, not {self.mem_mib}")
        if self.mem_mib > 1 << 20:
            raise ConfigError(f"mem of {self.mem_mib} MiB is larger than this VMM supports")
        validate_serial(self.serial_ports())
        validate_disks(self.disks)

    def virtio_consoles(self) -> list[SerialParameters]:
        return [p for p in self.serial_ports() if p.hardware == "virtio-console"]

    def root_disk(self) -> tuple[int, DiskOption] | None:
        """(index, disk) of the `root` disk; index 0 is vda."""
        for i, d in enumerate(self.disks):
            if d.root:
                return i, d
        return None


def validate_disks(disks: list[DiskOption]) -> None:
    if len(disks) > MAX_DISKS:
        raise ConfigError(f"block: at most {MAX_DISKS} disks are supported, not {len(disks)}")
    if sum(d.root for d in disks) > 1:
        raise ConfigError("block: only one disk can be the root disk")
    for d in disks:
        if d.block_size < 512 or d.block_size & (d.block_size - 1):
            raise ConfigError(f"block: block-size {d.block_size} is not a power of two >= 512")
        if d.id is not None and len(d.id.encode(errors="replace")) > 20:
            raise ConfigError(f"block: id '{d.id}' is longer than 20 bytes")


def validate_serial(ports: list[SerialParameters]) -> None:
    """crosvm's rules for --serial."""
    seen: set[tuple[str, int]] = set()
    consoles = earlycons = stdins = 0
    for p in ports:
        if p.type not in SERIAL_TYPES:
            raise ConfigError(f"serial: invalid type '{p.type}' (expected one of "
                              f"{', '.join(SERIAL_TYPES)})")
        if p.hardware not in SERIAL_HARDWARE:
            raise ConfigError(f"serial: invalid hardware '{p.hardware}'")
        if not 1 <= p.num <= MAX_SERIAL_PORTS:
            raise ConfigError(f"serial: num must be between 1 and {MAX_SERIAL_PORTS}, not {p.num}")
        if (p.hardware, p.num) in seen:
            raise ConfigError(f"serial: num={p.num} is given more than once for "
                              f"hardware={p.hardware}")
        seen.add((p.hardware, p.num))
        if p.type in ("file", "unix") and not p.path:
            raise ConfigError(f"serial: type={p.type} needs path=")
        if p.stdin and p.input:
            raise ConfigError("serial: stdin and input= cannot both be given")
        if p.earlycon and p.hardware != "serial":
            raise ConfigError("serial: earlycon is only possible with hardware=serial")
        consoles += p.console
        earlycons += p.earlycon
        stdins += p.stdin
    if consoles > 1:
        raise ConfigError("serial: only one port can be the console")
    if earlycons > 1:
        raise ConfigError("serial: only one port can be earlycon")
    if stdins > 1:
        raise ConfigError("serial: only one port can read stdin")
