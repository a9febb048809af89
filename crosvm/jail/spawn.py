"""Forking a device into its own (jailed) process: what a VMM's device process and a
`crosvm devices` back-end have in common."""

from __future__ import annotations

import gc
import logging
import os
import resource
import signal
from typing import Callable

from crosvm.jail.jail import (PR_SET_PDEATHSIG, IdMapRequest, Jail, JailConfig, prctl,
                              set_name)

log = logging.getLogger(__name__)


def close_fds_except(keep: set[int]) -> None:
    """Close every fd of this process that is not in `keep`."""
    limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    last = 0
    for fd in sorted(keep) + [limit]:
        if fd > last:
            os.closerange(last, fd)
        last = fd + 1


def spawn(name: str, body: Callable[[], None], keep_fds: set[int], jail: Jail | None,
          seccomp_filter: bytes | None = None,
          config: JailConfig | None = None) -> tuple[int, IdMapRequest | None]:
    """Fork a child that keeps only `keep_fds` (and stderr, for its log), dies with its
    parent, is named `name`, is jailed when `jail` is given (`seccomp_filter` compiled
    before, `config` the device's jail needs) and then runs `body`; it exits 0 when
    `body` returns, 1 when it raises (logged). Returns the child's pid and, for a
    root parent's jailed child, the id-map request the parent must serve
    (`IdMapRequest.serve(pid)`) before the child goes on."""
    config = config or JailConfig()
    id_map = (IdMapRequest(config.uid_map, config.gid_map)
              if jail is not None and os.geteuid() == 0 else None)
    # Objects that exist now are never collected in the child: its collector would
    # write to every one of them and copy the parent's whole heap into the child.
    gc.freeze()
    try:
        pid = jail.fork() if jail is not None else os.fork()
    except BaseException:
        gc.unfreeze()
        raise
    if pid == 0:
        status = 1
        try:
            prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
            # Ctrl-C on the terminal is for the parent (which then stops its children).
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            # stdin and stdout are /dev/null unless kept: a stray print must not land in
            # a socket that took the number 1 (the fds opened after the close would).
            null = os.open("/dev/null", os.O_RDWR)
            for fd in (0, 1):
                if fd not in keep_fds:
                    os.dup2(null, fd)
            os.close(null)
            close_fds_except(keep_fds | {0, 1, 2} | set(id_map.child_fds() if id_map else ()))
            set_name(name)
            if jail is not None:
                jail.enter(seccomp_filter, id_map, config=config)
            body()
            status = 0
        except BaseException:  # noqa: BLE001 - report and die, never return to the parent
            log.exception("%s: device process failed", name)
        finally:
            os._exit(status)
    gc.unfreeze()  # in the parent the collector keeps collecting what existed at the fork
    return pid, id_map
