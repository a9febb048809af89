"""The validated VM configuration that `crosvm run` builds from its arguments."""

from __future__ import annotations

import math
import os
import stat
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


@dataclass
class PmemOption:
    """One `--pmem` option (or a deprecated --pmem-device/--rw-pmem-device)."""

    path: str
    ro: bool = False
    root: bool = False


@dataclass
class NetOption:
    """One `--net` option: a TAP by name, by fd, or one pycrosvm creates (host-ip=)."""

    tap_name: str | None = None
    tap_fd: int | None = None
    host_ip: str | None = None
    netmask: str | None = None
    mac: str | None = None
    vhost_net: bool = False
    vq_pairs: int = 1
    mrg_rxbuf: bool = False
    passt: bool = False
    passt_socket: str | None = None


MAX_NET_VQ_PAIRS = 16

VHOST_VSOCK_DEVICE = "/dev/vhost-vsock"
VSOCK_CID_MIN = 3               # 0, 1, 2: hypervisor, local, host
VSOCK_CID_MAX = 0xFFFFFFFE      # 0xFFFFFFFF: VMADDR_CID_ANY
SUN_PATH_MAX = 107              # sockaddr_un.sun_path, less its NUL
UDS_PORT_SUFFIX_MAX = len("_4294967295")  # guest connections to port P go to PATH_P


@dataclass
class VsockOption:
    """The `--vsock` option (or the deprecated --cid/--vhost-vsock-device/--vhost-vsock-fd):
    vhost-vsock through `device`, or a userspace device bridged to Unix sockets at
    `uds_path`. With neither given, `device` is /dev/vhost-vsock, so a valid option has
    exactly one of the two set."""

    cid: int
    device: str | None = None
    uds_path: str | None = None

    def __post_init__(self) -> None:
        if self.device is None and self.uds_path is None:
            self.device = VHOST_VSOCK_DEVICE


VHOST_USER_TYPES = ("block", "net", "console", "rng", "vsock", "fs")
MAX_VHOST_USER_QUEUE_SIZE = 32768  # virtio's largest split ring


@dataclass
class VhostUserOption:
    """One `--vhost-user TYPE,socket=PATH` (or --vhost-user-blk SOCK, ...)."""

    type: str
    socket: str
    max_queue_size: int | None = None
    tag: str | None = None


def validate_vhost_user(devices: list[VhostUserOption]) -> None:
    for d in devices:
        size = d.max_queue_size
        if size is not None and not (0 < size <= MAX_VHOST_USER_QUEUE_SIZE
                                     and size & (size - 1) == 0):
            raise ConfigError(f"vhost-user: max-queue-size={size}: expected a power of two "
                              f"from 1 to {MAX_VHOST_USER_QUEUE_SIZE}")
        if d.tag is not None and d.type != "fs":
            raise ConfigError(f"vhost-user: tag= is for type fs, not {d.type}")
        if d.tag is not None and not 0 < len(d.tag.encode()) <= FS_TAG_MAX:
            raise ConfigError(f"vhost-user: tag {d.tag!r} must be 1 to {FS_TAG_MAX} bytes")


def parse_vhost_user_fs(text: str) -> VhostUserOption:
    """crosvm's `--vhost-user-fs SOCK:TAG`."""
    sock, sep, tag = text.rpartition(":")
    if not sep or not sock or not tag:
        raise ConfigError(f"vhost-user-fs: {text!r}: expected SOCK:TAG")
    return VhostUserOption(type="fs", socket=sock, tag=tag)


FS_TAG_MAX = 36        # virtio-fs config space: tag[36]
P9_TAG_MAX = 255       # a 9P mount tag is a u16-length string; kept short like fs
SHARED_DIR_CACHE = ("never", "auto", "always")
MAX_SHARED_DIRS = 16


@dataclass
class SharedDirOption:
    """One `--shared-dir SRC:TAG[:key=value...]`: a host directory the guest mounts by
    TAG, over virtio-9p (type=p9, the default) or virtio-fs (type=fs)."""

    src: str
    tag: str
    type: str = "p9"
    uidmap: str = ""        # "inner outer count[,...]"; default "0 EUID 1"
    gidmap: str = ""        # default "0 EGID 1"
    uid: int = 0            # the device's own identity inside its user namespace
    gid: int = 0
    cache: str = "auto"
    timeout: float = 5.0
    writeback: bool = False
    dax: bool = False
    posix_acl: bool = True
    ascii_casefold: bool = False
    negative_timeout: float | None = None
    privileged_quota_uids: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.uidmap = self.uidmap or f"0 {os.geteuid()} 1"
        self.gidmap = self.gidmap or f"0 {os.getegid()} 1"


def _shared_dir_bool(key: str, value: str | None) -> bool:
    if value is None:  # a bare `key` (ascii_casefold) means true, as crosvm
        return True
    if value not in ("true", "false"):
        raise ConfigError(f"shared-dir: {key}={value}: expected true or false")
    return value == "true"


def _shared_dir_number(key: str, value: str | None, kind: type = int) -> int | float:
    try:
        number = kind(value or "")
    except ValueError:
        raise ConfigError(f"shared-dir: {key}={value}: expected a number") from None
    if not math.isfinite(number) or number < 0 or number >= 1 << 32:
        raise ConfigError(f"shared-dir: {key}={value}: out of range")
    return number


def parse_shared_dir(text: str) -> SharedDirOption:
    """crosvm's `--shared-dir` syntax: fields separated by `:`; the first two are the
    source directory and the tag."""
    parts = text.split(":")
    if len(parts) < 2 or not parts[0] or not parts[1]:
        raise ConfigError(f"shared-dir: {text!r}: expected SRC:TAG[:key=value...]")
    opt = SharedDirOption(src=parts[0], tag=parts[1])
    seen: set[str] = set()
    for item in parts[2:]:
        key, eq, value = item.partition("=")
        value = value if eq else None
        if key in seen:
            raise ConfigError(f"shared-dir: {key} is given more than once")
        seen.add(key)
        if key in ("type", "cache", "uidmap", "gidmap") and value is None:
            raise ConfigError(f"shared-dir: {key} needs a value ({key}=...)")
        if key == "type":
            if value not in ("p9", "fs"):
                raise ConfigError(f"shared-dir: type={value}: expected p9 or fs")
            opt.type = value
        elif key == "cache":
            if value not in SHARED_DIR_CACHE:
                raise ConfigError(f"shared-dir: cache={value}: expected one of "
                                  f"{', '.join(SHARED_DIR_CACHE)}")
            opt.cache = value
        elif key in ("uidmap", "gidmap"):
            from crosvm.devices.virtio.fs.idmap import IdMap, IdMapError
            try:
                IdMap.parse(value)
            except IdMapError as e:
                raise ConfigError(f"shared-dir: {key}={value}: {e}") from None
            setattr(opt, key, value)
        elif key in ("uid", "gid"):
            setattr(opt, key, _shared_dir_number(key, value))
        elif key in ("timeout", "negative_timeout"):
            setattr(opt, key, float(_shared_dir_number(key, value, float)))
        elif key in ("writeback", "dax", "posix_acl", "ascii_casefold"):
            setattr(opt, key, _shared_dir_bool(key, value))
        elif key == "privileged_quota_uids":
            opt.privileged_quota_uids = [int(_shared_dir_number(key, u))
                                         for u in (value or "").split()]
        else:
            raise ConfigError(f"shared-dir: unknown option {key!r} (expected type, uidmap, "
                              "gidmap, uid, gid, cache, timeout, writeback, dax, posix_acl, "
                              "privileged_quota_uids, ascii_casefold, negative_timeout)")
    if opt.ascii_casefold and opt.negative_timeout is not None:
        raise ConfigError("shared-dir: ascii_casefold and negative_timeout cannot be used "
                          "together (a negative lookup would hide a name of another case)")
    return opt


def validate_shared_dirs(dirs: list[SharedDirOption]) -> None:
    """What the parser cannot know: the source exists, tags fit and are unique."""
    from crosvm.devices.virtio.fs.idmap import IdMap
    if len(dirs) > MAX_SHARED_DIRS:
        raise ConfigError(f"shared-dir: at most {MAX_SHARED_DIRS} are supported")
    tags: set[str] = set()
    for d in dirs:
        if not os.path.isdir(d.src):
            what = "is not a directory" if os.path.exists(d.src) else "does not exist"
            raise ConfigError(f"shared-dir: {d.src} {what}")
        limit = FS_TAG_MAX if d.type == "fs" else P9_TAG_MAX
        if len(d.tag.encode()) > limit:
            raise ConfigError(f"shared-dir: tag {d.tag!r} is longer than {limit} bytes")
        if d.tag in tags:
            raise ConfigError(f"shared-dir: tag {d.tag!r} is used twice")
        tags.add(d.tag)
        if d.dax:
            raise ConfigError("shared-dir: dax=true is not supported by this VMM")
        if IdMap.parse(d.uidmap).to_host(d.uid) is None:
            raise ConfigError(f"shared-dir: uid={d.uid} is not mapped by uidmap={d.uidmap}")
        if IdMap.parse(d.gidmap).to_host(d.gid) is None:
            raise ConfigError(f"shared-dir: gid={d.gid} is not mapped by gidmap={d.gidmap}")


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
    pmems: list[PmemOption] = field(default_factory=list)
    nets: list[NetOption] = field(default_factory=list)
    vsock: VsockOption | None = None
    shared_dirs: list[SharedDirOption] = field(default_factory=list)
    vhost_user: list[VhostUserOption] = field(default_factory=list)
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
        if sum(d.root for d in self.disks) + sum(p.root for p in self.pmems) > 1:
            raise ConfigError("only one block or pmem device can be the root device")
        validate_nets(self.nets)
        validate_vsock(self.vsock)
        validate_shared_dirs(self.shared_dirs)
        validate_vhost_user(self.vhost_user)

    def virtio_consoles(self) -> list[SerialParameters]:
        return [p for p in self.serial_ports() if p.hardware == "virtio-console"]

    def root_pmem(self) -> tuple[int, PmemOption] | None:
        """(index, device) of the `root` pmem device; index 0 is /dev/pmem0."""
        for i, p in enumerate(self.pmems):
            if p.root:
                return i, p
        return None

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


def validate_nets(nets: list[NetOption]) -> None:
    """crosvm's --net rules: exactly one of tap-name, tap-fd, host-ip+netmask+mac (or
    our passt / passt-socket)."""
    from crosvm.devices.virtio.net_proto import parse_mac
    from crosvm.net.tap import prefix_length
    import ipaddress
    for n in nets:
        modes = [k for k, v in (("tap-name", n.tap_name), ("tap-fd", n.tap_fd),
                                ("host-ip", n.host_ip), ("passt", n.passt or None),
                                ("passt-socket", n.passt_socket)) if v is not None]
        if len(modes) != 1:
            raise ConfigError("net: give exactly one of tap-name=, tap-fd=, "
                              "host-ip=,netmask=,mac=, passt or passt-socket= "
                              f"(got {', '.join(modes) or 'none'})")
        if modes[0].startswith("passt") and (n.vq_pairs != 1 or n.vhost_net):
            raise ConfigError("net: passt gives one queue pair and no vhost-net")
        if n.host_ip is not None:
            if n.netmask is None or n.mac is None:
                raise ConfigError("net: host-ip= needs netmask= and mac= too")
            try:
                ipaddress.IPv4Address(n.host_ip)
            except ValueError:
                raise ConfigError(f"net: invalid host-ip '{n.host_ip}'") from None
            try:
                prefix_length(n.netmask)
            except ValueError:
                raise ConfigError(f"net: invalid netmask '{n.netmask}'") from None
        elif n.netmask is not None:
            raise ConfigError("net: netmask= only goes with host-ip=")
        if n.mac is not None:
            try:
                parse_mac(n.mac)
            except ValueError as e:
                raise ConfigError(f"net: {e}") from None
        if n.tap_fd is not None and n.tap_fd < 0:
            raise ConfigError(f"net: invalid tap-fd {n.tap_fd}")
        if not 1 <= n.vq_pairs <= MAX_NET_VQ_PAIRS:
            raise ConfigError(f"net: vq-pairs must be between 1 and {MAX_NET_VQ_PAIRS}, "
                              f"not {n.vq_pairs}")
        if n.tap_fd is not None and n.vq_pairs > 1:
            raise ConfigError("net: tap-fd= gives one queue; vq-pairs must be 1 with it")


def validate_vsock(vsock: VsockOption | None) -> None:
    """crosvm's CID range; device= or our uds-path=, whose Unix socket names must fit."""
    if vsock is None:
        return
    if not VSOCK_CID_MIN <= vsock.cid <= VSOCK_CID_MAX:
        raise ConfigError(f"vsock: invalid cid {vsock.cid}: a guest CID is between "
                          f"{VSOCK_CID_MIN} and {VSOCK_CID_MAX} (0, 1, 2 and "
                          f"{VSOCK_CID_MAX + 1} are reserved)")
    if vsock.device is not None and vsock.uds_path is not None:
        raise ConfigError("vsock: device= and uds-path= cannot both be given (device= is "
                          "vhost-vsock, uds-path= a userspace vsock on Unix sockets)")
    if vsock.device is not None and not vsock.device:
        raise ConfigError("vsock: device= must not be empty")
    path = vsock.uds_path
    if path is None:
        return
    if not path:
        raise ConfigError("vsock: uds-path= must not be empty")
    try:
        size = len(os.fsencode(path))
    except UnicodeError:
        raise ConfigError(f"vsock: uds-path {path!r} is not a valid file name") from None
    if "\0" in path:
        raise ConfigError(f"vsock: uds-path {path!r} contains a NUL byte")
    if size + UDS_PORT_SUFFIX_MAX > SUN_PATH_MAX:
        raise ConfigError(f"vsock: uds-path {path} is {size} bytes; it must be at most "
                          f"{SUN_PATH_MAX - UDS_PORT_SUFFIX_MAX} so that PATH plus a "
                          f"`_<port>` suffix (up to {UDS_PORT_SUFFIX_MAX} bytes) fits a "
                          f"Unix socket address ({SUN_PATH_MAX} bytes)")
    directory = os.path.dirname(path) or "."
    if not os.path.isdir(directory):
        what = "is not a directory" if os.path.exists(directory) else "does not exist"
        raise ConfigError(f"vsock: the directory of uds-path {path}, {directory}, {what}")
    # Guest connections go to PATH_<port>: another VM's PATH_<n> must not be one of them.
    base = os.path.basename(path)
    stem, _, tail = base.rpartition("_")
    if stem and tail.isdigit():
        raise ConfigError(f"vsock: uds-path {path} ends in _<number>, which is what guest "
                          "connections to the host use; pick a name without it")
    # The sandboxed device can reach every socket in that directory: it must be the
    # VM's own, not one shared with other programs (/tmp, /run/user/UID, /).
    real = os.path.realpath(directory)
    st = os.stat(real)
    if real == "/" or st.st_mode & (stat.S_ISVTX | stat.S_IWOTH):
        raise ConfigError(f"vsock: uds-path {path} is in {real}, a directory shared with "
                          "other programs (world-writable, sticky or /); the device can "
                          "reach every socket there: use a directory of the VM's own")


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
