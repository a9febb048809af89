"""Finding a VMM's device processes from a test."""

from __future__ import annotations

import os


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (children, their children, ...), read from /proc."""
    out: list[int] = []
    todo = [pid]
    while todo:
        parent = todo.pop()
        try:
            with open(f"/proc/{parent}/task/{parent}/children") as f:
                children = [int(c) for c in f.read().split()]
        except OSError:
            continue
        out += children
        todo += children
    return out


def jailed_processes(pid: int) -> list[int]:
    """The jailed device processes below `pid`: those in a PID namespace other than its
    own (a root VMM forks each device straight into one; a VMM run by a user has a
    process in between, still in its namespace)."""
    own = os.readlink(f"/proc/{pid}/ns/pid")
    jailed = []
    for child in descendants(pid):
        try:
            if os.readlink(f"/proc/{child}/ns/pid") != own:
                jailed.append(child)
        except OSError:
            pass
    return jailed


def device_process(pid: int) -> int:
    """The jailed process of a DeviceProcess whose pid is `pid`: itself when the VMM
    forked it into its namespace, or else the child its jail's first process waits for."""
    if os.readlink(f"/proc/{pid}/ns/pid") != os.readlink("/proc/self/ns/pid"):
        return pid
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return int(f.read().split()[0])
