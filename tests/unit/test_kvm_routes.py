"""KVM GSI routing table bookkeeping (no /dev/kvm: the ioctl is replaced)."""

from __future__ import annotations

import random
import threading
import time

from crosvm.hypervisor.kvm import kvm as K


def fake_vm(monkeypatch) -> tuple[K.KvmVm, list[set[int]]]:
    committed: list[set[int]] = []

    def slow_ioctl(fd, request, table):
        gsis = {table.entries[i].gsi for i in range(table.nr)}
        time.sleep(random.random() * 0.001)  # the real ioctl releases the GIL too
        committed.append(gsis)
        return 0

    monkeypatch.setattr(K, "ioctl_ref", slow_ioctl)
    vm = object.__new__(K.KvmVm)
    vm.fd = -1
    vm._routes = {}
    vm._routes_lock = threading.Lock()
    return vm, committed


def test_concurrent_msi_route_updates_never_commit_a_stale_table(monkeypatch):
    vm, committed = fake_vm(monkeypatch)

    def program(first_gsi: int) -> None:
        for gsi in range(first_gsi, first_gsi + 100):
            vm.set_msi_route(gsi, 0xFEE0_0000, gsi)

    threads = [threading.Thread(target=program, args=(base,)) for base in (24, 1024)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    # A route once committed never disappears from a later commit.
    lost = [i for i in range(1, len(committed)) if not committed[i] >= committed[i - 1]]
    assert (lost, committed[-1]) == ([], set(range(24, 124)) | set(range(1024, 1124)))
