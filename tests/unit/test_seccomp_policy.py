"""Seccomp policy files (minijail's format) and their compilation with libseccomp."""

from __future__ import annotations

from pathlib import Path

import pytest

from crosvm.jail.jail import DEFAULT_SECCOMP_POLICY_DIR
from crosvm.jail.policy import PolicyError, load_policy, parse_expression, parse_value
from crosvm.jail.seccomp import (ACT_ALLOW, ACT_KILL_PROCESS, CMP_EQ, CMP_MASKED_EQ, CMP_NE,
                                 ArgCmp, Rule, SeccompError, act_errno, compile_filter)


def test_one_allows_the_syscall_unconditionally():
    assert parse_expression("read", "1") == [Rule("read", ACT_ALLOW)]


def test_return_fails_the_syscall_with_that_errno():
    assert parse_expression("openat", "return ENOENT") == [Rule("openat", act_errno(2))]


def test_return_accepts_a_number():
    assert parse_expression("clone3", "return 38") == [Rule("clone3", act_errno(38))]


def test_or_of_equalities_gives_one_rule_each():
    rules = parse_expression("madvise", "arg2 == MADV_DONTNEED || arg2 == 8")

    assert [r.cmps for r in rules] == [(ArgCmp(2, CMP_EQ, 4),), (ArgCmp(2, CMP_EQ, 8),)]


def test_ampersand_tests_each_bit_of_the_mask():
    rules = parse_expression("x", "arg0 & 0x5")

    assert [r.cmps for r in rules] == [(ArgCmp(0, CMP_MASKED_EQ, 1, 1),),
                                       (ArgCmp(0, CMP_MASKED_EQ, 4, 4),)]


def test_in_allows_only_bits_inside_the_value():
    rules = parse_expression("mmap", "arg2 in ~PROT_EXEC")

    assert rules == [Rule("mmap", ACT_ALLOW, (ArgCmp(2, CMP_MASKED_EQ, 4, 0),))]


def test_semicolon_return_fails_what_the_expression_does_not_allow():
    rules = parse_expression("ioctl", "arg1 == 5; return EPERM")

    assert rules == [Rule("ioctl", ACT_ALLOW, (ArgCmp(1, CMP_EQ, 5),)),
                     Rule("ioctl", act_errno(1), (ArgCmp(1, CMP_NE, 5),))]


def test_same_argument_twice_in_the_negation_is_rejected():
    with pytest.raises(PolicyError, match="compared twice"):
        parse_expression("ioctl", "arg1 == 5 || arg1 == 6; return EPERM")


def test_values_combine_names_numbers_and_negation():
    assert parse_value("PROT_READ|PROT_WRITE|0x10") == 0x13
    assert parse_value("~0") == (1 << 64) - 1


def test_unknown_constant_names_file_and_line(tmp_path):
    path = tmp_path / "dev.policy"
    path.write_text("read: 1\nmmap: arg2 == PROT_BOGUS\n")

    with pytest.raises(PolicyError, match=r"dev.policy:2: unknown constant 'PROT_BOGUS'"):
        load_policy(path)


def test_include_is_found_next_to_the_including_file(tmp_path):
    (tmp_path / "common_device.policy").write_text("read: 1\n")
    (tmp_path / "dev.policy").write_text(
        "@include /usr/share/policy/crosvm/common_device.policy\nwrite: 1\n")

    assert load_policy(tmp_path / "dev.policy").syscalls() == {"read", "write"}


def test_syscall_listed_twice_is_an_error(tmp_path):
    path = tmp_path / "dev.policy"
    path.write_text("read: 1\n# again\nread: 1\n")

    with pytest.raises(PolicyError, match="dev.policy:3: read is already in the policy"):
        load_policy(path)


def test_missing_policy_file_is_named(tmp_path):
    with pytest.raises(PolicyError, match="nope.policy"):
        load_policy(tmp_path / "nope.policy")


def test_unknown_syscall_fails_compilation():
    with pytest.raises(SeccompError, match="unknown syscall 'not_a_syscall'"):
        compile_filter([Rule("not_a_syscall", ACT_ALLOW)], ACT_KILL_PROCESS)


@pytest.mark.parametrize("path", sorted(Path(DEFAULT_SECCOMP_POLICY_DIR).glob("*.policy")),
                         ids=lambda p: p.stem)
def test_shipped_policy_compiles_to_bpf(path):
    bpf = compile_filter(load_policy(path).rules, ACT_KILL_PROCESS)

    assert len(bpf) % 8 == 0 and 8 < len(bpf) <= 4096 * 8


def test_every_device_policy_includes_the_common_one():
    common = load_policy(Path(DEFAULT_SECCOMP_POLICY_DIR) / "common_device.policy").syscalls()
    for path in Path(DEFAULT_SECCOMP_POLICY_DIR).glob("*.policy"):
        if path.stem in ("base_device", "vhost_user_backend"):  # common's base; a widening
            continue
        assert common <= load_policy(path).syscalls(), path.name


def test_vhost_user_backend_widening_adds_only_accepting_and_shared_mappings():
    widening = load_policy(Path(DEFAULT_SECCOMP_POLICY_DIR) / "vhost_user_backend.policy")

    assert widening.syscalls() == {"accept4", "getsockname", "mmap"}


@pytest.mark.parametrize("device", ["block", "net", "console", "fs", "vsock"])
def test_every_back_end_device_policy_compiles_widened(device):
    from crosvm.jail import Jail

    assert Jail().filter_for(f"{device}_device", "vhost_user_backend")


def test_common_policy_allows_no_process_creation_sockets_or_exec():
    allowed = load_policy(Path(DEFAULT_SECCOMP_POLICY_DIR) / "common_device.policy").syscalls()

    assert not allowed & {"fork", "vfork", "execve", "execveat", "socket", "ptrace",
                          "connect", "bind", "mount", "unshare", "setns", "process_vm_writev"}


def test_file_server_policy_allows_no_process_creation_sockets_or_exec():
    allowed = load_policy(Path(DEFAULT_SECCOMP_POLICY_DIR) / "file_server.policy").syscalls()

    assert not allowed & {"fork", "vfork", "execve", "execveat", "socket", "ptrace",
                          "connect", "bind", "mount", "unshare", "setns", "process_vm_writev",
                          "setrlimit"}


def test_test_probe_policy_loads_with_its_includes():
    probe = Path(__file__).resolve().parent.parent / "support" / "sandbox_probe.policy"

    common = load_policy(Path(DEFAULT_SECCOMP_POLICY_DIR) / "common_device.policy").syscalls()
    assert load_policy(probe).syscalls() == common


def test_return_of_a_constant_that_is_not_an_errno_is_rejected():
    with pytest.raises(PolicyError, match="bad errno 'PROT_READ'"):
        parse_expression("openat", "return PROT_READ")
