"""Test harness: boots the test guest with `crosvm run` through `crosvm.Vm` (the path
users take) and drives its agent (guest/agent.sh on COM2, `crosvm.agent`).

What is the tests' own: this host's kernel command line, the guest modes of guest/init,
kill (not stop) on exit, and running again a command that this host's nested KVM killed
at its start (PLATFORM_FAULT_CODE).
"""

from __future__ import annotations

import os
import shlex
import sys

from crosvm.agent import AgentError, ExecResult
from crosvm.api import Vm

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_GUEST = os.path.join(os.path.dirname(REPO), "shared", "guest")
# The command line this host's emulator needs (../shared/guest/README.md).
HOST_CMDLINE = ("console=ttyS0 panic=-1 noxsave clearcpuid=cx16,smap,popcnt nokaslr "
                "no_int3_selftest tsc=reliable noreplace-smp quiet")

BOOT_TIMEOUT = float(os.environ.get("CROSVM_TEST_BOOT_TIMEOUT", "300"))
COMMAND_TIMEOUT = float(os.environ.get("CROSVM_TEST_COMMAND_TIMEOUT", "120"))

# This host's nested KVM (kvm_pvm) now and then starts a guest process whose first TLS
# read sees zeros: static busybox dies in glibc's __ctype_init before main ("segfault at
# 0", these code bytes). It is the platform, not the VMM: QEMU on the same host and
# kernel shows it at the same rate (~1 in 150 process starts, 2 vCPUs). Such a process
# did nothing yet, so a command it killed is run again; see GuestVm.run.
PLATFORM_FAULT_CODE = "64 48 8b 00 <48> 8b 00 48 8b 70 38"
PLATFORM_FAULT_RETRIES = 3

GuestError = AgentError        # the names the tests use
CommandResult = ExecResult


def test_kernel(kind: str = "vmlinux") -> str | None:
    """$CROSVM_TEST_KERNEL (for vmlinux) or ../shared/guest/<kind>, if it exists."""
    if kind == "vmlinux" and os.environ.get("CROSVM_TEST_KERNEL"):
        path = os.environ["CROSVM_TEST_KERNEL"]
    else:
        path = os.path.join(SHARED_GUEST, kind)
    return path if os.path.exists(path) else None


class GuestVm(Vm):
    """One running test VM (launched at once). Use as a context manager; it is killed
    on exit. A control socket with `control_socket` (or `--socket` in `extra_args`)."""

    def __init__(self, kernel: str, initrd: str | None, workdir: str, cpus: int = 1,
                 mem: int = 256, params: tuple[str, ...] = (), extra_args: tuple[str, ...] = (),
                 console_hardware: str = "serial", mode: str = "agent",
                 env: dict[str, str] | None = None, entry: str = "crosvm",
                 pass_fds: tuple[int, ...] = (), prefix: tuple[str, ...] = (),
                 blocks: tuple[str, ...] = (), control_socket: bool = False) -> None:
        """`initrd=None` boots from a root disk in `extra_args`; `mode` is guest/init's
        (agent, shell, demo, exit); the rest as `crosvm.Vm`'s."""
        host_cmdline = os.environ.get("CROSVM_TEST_CMDLINE", HOST_CMDLINE)
        if console_hardware != "serial":
            # crosvm adds console=hvc0 itself; ttyS0 must not win as /dev/console.
            host_cmdline = " ".join(w for w in host_cmdline.split() if w != "console=ttyS0")
        # For debugging a run, e.g. "--seccomp-log-failures".
        debug_args = tuple(shlex.split(os.environ.get("CROSVM_TEST_EXTRA_ARGS", "")))
        super().__init__(kernel, initrd=initrd, mem=mem, cpus=cpus, blocks=blocks,
                         params=(host_cmdline, f"pycrosvm.mode={mode}", *params),
                         extra_args=(*extra_args, *debug_args), agent=True, workdir=workdir,
                         control_socket=control_socket, console_hardware=console_hardware, env=env,
                         pass_fds=pass_fds, prefix=prefix, entry=entry)
        self._platform_faults = 0  # platform faults in the guest's log, last we looked
        self.launch()

    def wait_ready(self, timeout: float = BOOT_TIMEOUT) -> None:
        super().wait_ready(timeout)

    def run(self, command: str, timeout: float = COMMAND_TIMEOUT) -> ExecResult:
        """Run a shell command in the guest and return its output and status. Output is
        text: the agent drops NUL bytes (hash binary data in the guest). Besides the
        shell, the agent's `wait_for FILE TEXT [SECONDS]` is there (guest/agent.sh).

        A command that failed while the guest kernel logged a new platform fault
        (PLATFORM_FAULT_CODE) is run again, up to PLATFORM_FAULT_RETRIES times."""
        result = self.exec(command, timeout)
        for _ in range(PLATFORM_FAULT_RETRIES):
            if result.returncode == 0 or not self._new_platform_fault(timeout):
                break
            print(f"guest_vm: {command!r} hit the host's known process-start fault; "
                  f"running it again", file=sys.stderr)
            result = self.exec(command, timeout)
        return result

    def _new_platform_fault(self, timeout: float) -> bool:
        """Whether the guest kernel logged a platform fault since the last look."""
        seen = self.exec(f"dmesg | grep -c -F '{PLATFORM_FAULT_CODE}'", timeout)
        try:
            count = int(seen.stdout.strip())
        except ValueError:
            return False  # the check itself did not run: do not guess
        new = count > self._platform_faults
        self._platform_faults = count
        return new

    def wait_exit(self, timeout: float = BOOT_TIMEOUT) -> int:
        return self.wait(timeout)

    def close(self) -> None:
        self.kill()  # a test VM has nothing to flush: no need to wait for a stop
        super().close()
