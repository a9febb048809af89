"""The `crosvm run` options: names, key schemas and help, in one table.

Each option stores its value under `key` in a JSON-like dict, the same shape a
`--cfg` file uses, so the command line and config files merge by one rule.
"""

from __future__ import annotations

from dataclasses import dataclass

from crosvm.cli.keyvalue import Field, Schema
from crosvm.config import SERIAL_HARDWARE, SERIAL_TYPES, VHOST_USER_TYPES


@dataclass
class Option:
    """One command-line option."""

    long: str
    kind: str                      # flag | value | keyvalue | variant
    help: str
    short: str | None = None
    key: str | None = None         # key in the config dict (defaults to `long`)
    multi: bool = False            # may repeat; values form a list
    value_type: str = "str"        # for kind=value: str | path | int
    schema: Schema | None = None   # for kind=keyvalue
    variants: dict[str, Schema] | None = None  # for kind=variant
    metavar: str = "VALUE"
    in_config: bool = True         # may appear in a --cfg file
    deprecated: str | None = None  # the option to use instead
    implied: dict | None = None    # keys a deprecated alias sets (--root: root=true, ro=true)

    @property
    def config_key(self) -> str:
        return self.key or self.long


SERIAL_SCHEMA = Schema([
    Field("type", "enum", "sink", "where output goes (and input comes from for unix)",
          choices=SERIAL_TYPES),
    Field("hardware", "enum", "serial", "the emulated device", choices=SERIAL_HARDWARE),
    Field("num", "int", 1, "serial port number, 1 to 4 (COM1-COM4 / ttyS0-ttyS3)"),
    Field("path", "path", None, "file for type=file, socket for type=unix"),
    Field("input", "path", None, "file to read guest input from"),
    Field("console", "bool", False, "use this port as the kernel console"),
    Field("earlycon", "bool", False, "use this port for early kernel messages"),
    Field("stdin", "bool", False, "feed this port from crosvm's standard input"),
    Field("out-timestamp", "bool", False, "prefix each output line with a timestamp",
          aliases=("out_timestamp",)),
])

BLOCK_SCHEMA = Schema([
    Field("path", "path", None, "disk image", required=True),
    Field("ro", "bool", False, "read-only disk"),
    Field("root", "bool", False, "use as the root device (adds root=/dev/vdX)"),
    Field("sparse", "bool", True, "allow discard to free host blocks"),
    Field("direct", "bool", False, "open with O_DIRECT", aliases=("o_direct",)),
    Field("block-size", "int", 512, "reported block size in bytes", aliases=("block_size",)),
    Field("id", "str", None, "serial id, at most 20 bytes"),
])
# The deprecated aliases take the old keys only; ro/root come from the option itself.
OLD_DISK_SCHEMA = Schema([f for f in BLOCK_SCHEMA.fields if f.name not in ("ro", "root")])

PMEM_SCHEMA = Schema([
    Field("path", "path", None, "raw image file mapped as guest memory", required=True),
    Field("ro", "bool", False, "read-only (a read-only KVM memory slot)"),
    Field("root", "bool", False, "use as the root device (adds root=/dev/pmemN)"),
])
OLD_PMEM_SCHEMA = Schema([f for f in PMEM_SCHEMA.fields if f.name == "path"])
VHOST_USER_SCHEMA = Schema([
    Field("type", "enum", None, "the device: block, net, console, rng, vsock or fs",
          choices=VHOST_USER_TYPES, required=True),
    Field("socket", "path", None, "the back-end's Unix socket", required=True),
    Field("max-queue-size", "int", None, "the largest queue offered to the guest (default "
          "256)", aliases=("max_queue_size",)),
    Field("tag", "str", None, "fs: the mount tag, when the back-end does not give one"),
])
# --vhost-user-blk SOCK and friends: the socket only; the type comes from the option.
OLD_VHOST_USER_SCHEMA = Schema([f for f in VHOST_USER_SCHEMA.fields if f.name == "socket"])
NET_SCHEMA = Schema([
    Field("tap-name", "str", None, "an existing TAP, or a new persistent one, by name"),
    Field("tap-fd", "int", None, "an open TAP fd (IFF_TAP|IFF_NO_PI|IFF_VNET_HDR)"),
    Field("host-ip", "str", None, "create a TAP with this host address (needs netmask, mac)"),
    Field("netmask", "str", None, "netmask of host-ip"),
    Field("mac", "str", None, "the guest's MAC address"),
    Field("vhost-net", "bool", False, "move the queues into the kernel (/dev/vhost-net)"),
    Field("vq-pairs", "int", 1, "number of RX/TX queue pairs (multiqueue)"),
    Field("mrg-rxbuf", "bool", False, "offer mergeable receive buffers"),
    Field("passt", "bool", False, "user-mode networking: start passt (no root, no TAP)"),
    Field("passt-socket", "path", None, "user-mode networking through a running passt's "
          "socket"),
], first_key_optional=False)

VSOCK_SCHEMA = Schema([
    Field("cid", "int", None, "the guest's context id, 3 to 4294967294", required=True),
    Field("device", "path", None, "the vhost-vsock device (default: /dev/vhost-vsock; not "
          "with uds-path)"),
    Field("uds-path", "path", None, "a userspace vsock bridged to Unix sockets instead of "
          "vhost-vsock: host programs connect to PATH and send `CONNECT <port>\\n`; guest "
          "connections to CID 2 port P go to PATH_P"),
])

CPUS_SCHEMA = Schema([Field("num-cores", "int", 1, "number of vCPUs")])
MEM_SCHEMA = Schema([Field("size", "int", 256, "guest memory in MiB")])
KVM_SCHEMA = Schema([Field("device", "path", "/dev/kvm", "path to the KVM device")])

RUN_OPTIONS: list[Option] = [
    Option("cpus", "keyvalue", "vCPU configuration", short="c", schema=CPUS_SCHEMA,
           metavar="num-cores=N"),
    Option("mem", "keyvalue", "guest memory configuration", short="m", schema=MEM_SCHEMA,
           metavar="size=MiB"),
    Option("params", "value", "extra kernel command line (may repeat)", short="p", multi=True,
           metavar="PARAMS"),
    Option("initrd", "value", "initial ramdisk to load", short="i", value_type="path",
           metavar="PATH"),
    Option("kernel", "value", "kernel image (bzImage or ELF vmlinux); also the positional "
           "argument", value_type="path", metavar="PATH"),
    Option("serial", "keyvalue", "a serial port (may repeat)", multi=True, schema=SERIAL_SCHEMA,
           metavar="type=TYPE,..."),
    Option("block", "keyvalue", "a virtio block device (may repeat; vda, vdb, ... in order)",
           short="b", multi=True, schema=BLOCK_SCHEMA, metavar="PATH[,key=value...]"),
    Option("disk", "keyvalue", "read-only disk", short="d", key="block", multi=True,
           schema=OLD_DISK_SCHEMA, deprecated="--block PATH,ro", in_config=False,
           implied={"ro": True}, metavar="PATH"),
    Option("rwdisk", "keyvalue", "writable disk", key="block", multi=True,
           schema=OLD_DISK_SCHEMA, deprecated="--block PATH", in_config=False,
           implied={"ro": False}, metavar="PATH"),
    Option("root", "keyvalue", "read-only root disk", short="r", key="block", multi=True,
           schema=OLD_DISK_SCHEMA, deprecated="--block PATH,root,ro", in_config=False,
           implied={"ro": True, "root": True}, metavar="PATH"),
    Option("rwroot", "keyvalue", "writable root disk", key="block", multi=True,
           schema=OLD_DISK_SCHEMA, deprecated="--block PATH,root", in_config=False,
           implied={"ro": False, "root": True}, metavar="PATH"),
    Option("pmem", "keyvalue", "a virtio-pmem device backed by a raw image (may repeat; "
           "/dev/pmem0, /dev/pmem1, ... in order)", multi=True, schema=PMEM_SCHEMA,
           metavar="PATH[,ro][,root]"),
    Option("pmem-device", "keyvalue", "read-only pmem device", key="pmem", multi=True,
           schema=OLD_PMEM_SCHEMA, deprecated="--pmem PATH,ro", in_config=False,
           implied={"ro": True}, metavar="PATH"),
    Option("rw-pmem-device", "keyvalue", "writable pmem device", key="pmem", multi=True,
           schema=OLD_PMEM_SCHEMA, deprecated="--pmem PATH", in_config=False,
           implied={"ro": False}, metavar="PATH"),
    Option("net", "keyvalue", "a virtio-net device on a TAP (may repeat)", multi=True,
           schema=NET_SCHEMA, metavar="tap-name=NAME|tap-fd=N|host-ip=IP,netmask=M,mac=MAC|passt"),
    Option("tap-name", "value", "TAP by name", key="legacy-tap-name", multi=True,
           deprecated="--net tap-name=NAME", in_config=False, metavar="NAME"),
    Option("tap-fd", "value", "TAP by fd", key="legacy-tap-fd", multi=True, value_type="int",
           deprecated="--net tap-fd=N", in_config=False, metavar="N"),
    Option("host-ip", "value", "host address of a new TAP", key="legacy-host-ip",
           deprecated="--net host-ip=IP,netmask=M,mac=MAC", in_config=False, metavar="IP"),
    Option("netmask", "value", "netmask of --host-ip", key="legacy-netmask",
           deprecated="--net host-ip=IP,netmask=M,mac=MAC", in_config=False, metavar="MASK"),
    Option("mac", "value", "guest MAC of --host-ip", key="legacy-mac",
           deprecated="--net host-ip=IP,netmask=M,mac=MAC", in_config=False, metavar="MAC"),
    Option("vhost-net", "flag", "vhost-net for the legacy TAP options", key="legacy-vhost-net",
           deprecated="--net vhost-net=true", in_config=False),
    Option("net-vq-pairs", "value", "queue pairs for the legacy TAP options",
           key="legacy-net-vq-pairs", value_type="int", deprecated="--net vq-pairs=N",
           in_config=False, metavar="N"),
    Option("vsock", "keyvalue", "a virtio-vsock device (once: a guest has one CID)",
           schema=VSOCK_SCHEMA, metavar="cid=N[,device=PATH|uds-path=PATH]"),
    Option("cid", "value", "guest vsock CID", key="legacy-cid", value_type="int",
           deprecated="--vsock cid=N", in_config=False, metavar="N"),
    Option("vhost-vsock-device", "value", "vhost-vsock device for --cid",
           key="legacy-vhost-vsock-device", value_type="path",
           deprecated="--vsock cid=N,device=PATH", in_config=False, metavar="PATH"),
    Option("vhost-vsock-fd", "value", "open vhost-vsock fd for --cid",
           key="legacy-vhost-vsock-fd", value_type="int",
           deprecated="--vsock cid=N,device=/proc/self/fd/FD", in_config=False, metavar="FD"),
    Option("shared-dir", "value", "share a host directory with the guest (may repeat); "
           "fields separated by ':': type=p9|fs (default p9), uidmap=\"INNER OUTER COUNT\" "
           "(default \"0 EUID 1\"), gidmap=, uid=, gid= (the device's identity), "
           "cache=never|auto|always, timeout=S, writeback=BOOL, posix_acl=BOOL, "
           "ascii_casefold, negative_timeout=S. Guest: mount -t virtiofs TAG DIR, or "
           "mount -t 9p -o trans=virtio,version=9p2000.L TAG DIR", multi=True,
           metavar="SRC:TAG[:type=p9|fs][:key=value...]"),
    Option("vhost-user", "keyvalue", "a virtio device served by a vhost-user back-end "
           "(another process: `crosvm device`, qemu-storage-daemon, virtiofsd; may repeat)",
           multi=True, schema=VHOST_USER_SCHEMA,
           metavar="TYPE,socket=PATH[,max-queue-size=N][,tag=TAG]"),
    *(Option(f"vhost-user-{name}", "keyvalue", f"vhost-user {kind} back-end", key="vhost-user",
             multi=True, schema=OLD_VHOST_USER_SCHEMA, in_config=False,
             implied={"type": kind}, metavar="SOCK")
      for name, kind in (("blk", "block"), ("net", "net"), ("console", "console"),
                         ("vsock", "vsock"))),
    Option("vhost-user-fs", "value", "vhost-user virtio-fs back-end and the guest's mount tag",
           key="legacy-vhost-user-fs", multi=True, in_config=False, metavar="SOCK:TAG"),
    Option("hypervisor", "variant", "hypervisor backend", variants={"kvm": KVM_SCHEMA},
           metavar="kvm[device=PATH]"),
    Option("kvm-device", "value", "path to the KVM device", value_type="path",
           key="hypervisor", deprecated="--hypervisor kvm[device=PATH]", in_config=False,
           metavar="PATH"),
    Option("no-i8042", "flag", "do not emulate the i8042 keyboard controller"),
    Option("no-rtc", "flag", "do not emulate the CMOS real-time clock"),
    Option("no-rng", "flag", "do not add a virtio-rng device"),
    Option("no-balloon", "flag", "do not add a virtio-balloon device"),
    Option("balloon-bias-mib", "value", "how far to bias the memory balance between host "
           "and guest as the balloon inflates, in MiB (kept for the host's policy)",
           value_type="int", metavar="N"),
    Option("balloon-page-reporting", "flag", "let the guest report free pages to the "
           "balloon, which gives them back to the host"),
    Option("socket", "value", "path of the control socket (`crosvm stop PATH`); for a "
           "directory, crosvm-<pid>.sock inside it", short="s", value_type="path",
           metavar="PATH"),
    Option("disable-sandbox", "flag", "run every device in the VMM process, unjailed"),
    Option("pivot-root", "value", "empty directory the device jails pivot into "
           "(default /var/empty)", value_type="path", metavar="DIR"),
    Option("seccomp-policy-dir", "value", "directory of the devices' seccomp .policy files "
           "(default: the ones shipped in crosvm/seccomp/x86_64)", value_type="path",
           metavar="DIR"),
    Option("seccomp-log-failures", "flag", "log syscalls outside a device's seccomp policy "
           "(kernel audit log) instead of killing the device; for writing policies"),
    Option("cfg", "value", "JSON configuration file (may repeat; the command line wins)",
           multi=True, value_type="path", in_config=False, metavar="FILE"),
]

BY_LONG = {o.long: o for o in RUN_OPTIONS}
BY_SHORT = {o.short: o for o in RUN_OPTIONS if o.short}
BY_CONFIG_KEY = {o.config_key: o for o in RUN_OPTIONS if o.in_config}


def run_help() -> str:
    lines = ["Usage: crosvm run [OPTIONS] [KERNEL]", "",
             "Start a new VM with the given kernel image.", "", "Options:"]
    for o in RUN_OPTIONS:
        names = (f"-{o.short}, " if o.short else "    ") + f"--{o.long}"
        if o.kind != "flag":
            names += f" {o.metavar}"
        text = o.help + (f" (DEPRECATED: use {o.deprecated})" if o.deprecated else "")
        lines.append(f"  {names:<34} {text}")
        schemas = [o.schema] if o.schema else list((o.variants or {}).values())
        for schema in schemas:
            if o.kind == "keyvalue" and schema.first_key_optional:
                lines.append(f"  {'':<34}   Valid keys (the first key may be omitted):")
            else:
                lines.append(f"  {'':<34}   Valid keys:")
            for f in schema.fields:
                what = f.type if f.type != "enum" else "|".join(f.choices)
                default = "" if f.default in (None, False) else f" (default: {f.default})"
                lines.append(f"  {'':<34}     {f.name}={what} - {f.help}{default}")
    lines.append(f"  {'-h, --help':<34} show this help")
    return "\n".join(lines)
