"""Seccomp policy files in minijail's format, as crosvm writes them.

    # a comment
    @include /usr/share/policy/crosvm/common_device.policy
    read: 1
    openat: return ENOENT
    clone: arg0 & CLONE_THREAD
    mmap: arg2 in ~PROT_EXEC
    madvise: arg2 == MADV_DONTNEED || arg2 == MADV_FREE
    fcntl: arg1 == F_GETFL && arg2 == 0 || arg1 == F_SETFL

An expression is an OR (`||`) of ANDs (`&&`) of `argN OP VALUE`, where OP is one of
`== != < <= > >=`, `&` (any bit of VALUE set) or `in` (no bit outside VALUE set). VALUE
is a number or a constant name, possibly `~`-negated, joined with `|`. `return N`
fails the syscall with errno N (a number or a name such as ENOENT). `@include` names
a file by its base name, looked up next to the including file, so crosvm's absolute
include paths work unchanged. `@frequency` hints are ignored.
"""

from __future__ import annotations

import errno
import fcntl
import math
import mmap
import os
import re
import signal
import socket
import termios
from dataclasses import dataclass, field

from crosvm.base.hostfile import HostFileError, read_host_file
from crosvm.jail.seccomp import (ACT_ALLOW, CMP_EQ, CMP_GE, CMP_GT, CMP_LE, CMP_LT,
                                 CMP_MASKED_EQ, CMP_NE, ArgCmp, Rule, act_errno)

MASK64 = (1 << 64) - 1
MAX_INCLUDE_DEPTH = 8
MAX_POLICY_BYTES = 1 << 20
MAX_POLICY_FILES = 64   # files one policy may load, includes counted
MAX_LINE_RULES = 256    # rules one line may expand to (crosvm's policies need < 20)
MAX_RULES = 8192        # rules in one policy with its includes
_NUMBER = re.compile(r"-?(?:0[xX][0-9a-fA-F]+|0[bB][01]+|0[oO]?[0-7]+|[1-9][0-9]*|0)")


class PolicyError(Exception):
    """A policy file is wrong; the message names the file and line."""


def _constants() -> dict[str, int]:
    table: dict[str, int] = {}
    for module, prefixes in ((mmap, ("PROT_", "MAP_", "MADV_")), (os, ("O_", "EFD_", "MFD_")),
                             (fcntl, ("F_",)), (socket, ("AF_", "SOCK_", "MSG_")),
                             (termios, ("FIO", "TC", "TIOC"))):
        for name in dir(module):
            value = getattr(module, name)
            if name.startswith(prefixes) and isinstance(value, int):
                table[name] = int(value)
    table.update({s.name: int(s) for s in signal.Signals})
    table.update({name: value for name, value in errno.__dict__.items()
                  if name.startswith("E") and isinstance(value, int)})
    table.update({
        # linux/sched.h
        "CLONE_VM": 0x100, "CLONE_FS": 0x200, "CLONE_FILES": 0x400, "CLONE_SIGHAND": 0x800,
        "CLONE_THREAD": 0x10000, "CLONE_SYSVSEM": 0x40000, "CLONE_SETTLS": 0x80000,
        "CLONE_PARENT_SETTID": 0x100000, "CLONE_CHILD_CLEARTID": 0x200000,
        # linux/falloc.h
        "AT_EMPTY_PATH": 0x1000,
        "FALLOC_FL_KEEP_SIZE": 1, "FALLOC_FL_PUNCH_HOLE": 2, "FALLOC_FL_ZERO_RANGE": 0x10,
        # linux/if_tun.h
        "TUNSETOFFLOAD": 0x400454D0,
        # linux/futex.h
        "FUTEX_WAIT": 0, "FUTEX_WAKE": 1, "FUTEX_PRIVATE_FLAG": 128,
    })
    return table


CONSTANTS = _constants()
_ERRNOS = {name: number for number, name in errno.errorcode.items()}
_OPS = {"==": CMP_EQ, "!=": CMP_NE, "<": CMP_LT, "<=": CMP_LE, ">": CMP_GT, ">=": CMP_GE}


@dataclass
class Policy:
    """The rules of one policy file with its includes, in file order."""

    rules: list[Rule] = field(default_factory=list)

    def syscalls(self) -> set[str]:
        return {r.syscall for r in self.rules}


def parse_value(text: str) -> int:
    """`PROT_READ|PROT_WRITE`, `~PROT_EXEC`, `0x1f`, `-1` -> a 64-bit value."""
    value = 0
    for term in text.split("|"):
        term = term.strip()
        negate = term.startswith("~")
        if negate:
            term = term[1:].strip()
        if term in CONSTANTS:
            v = CONSTANTS[term]
        elif _NUMBER.fullmatch(term) and len(term) <= 70:  # ASCII digits, 64 bits at most
            v = int(term, 8) if re.fullmatch(r"-?0[0-7]+", term) else int(term, 0)
        else:
            raise PolicyError(f"unknown constant {term[:40]!r}")
        if not -(1 << 63) <= v <= MASK64:
            raise PolicyError(f"{term[:40]} does not fit in 64 bits")
        value |= (~v if negate else v) & MASK64
    return value


def _parse_atom(text: str) -> list[ArgCmp]:
    """One `argN OP VALUE`; `&` with several bits is an OR of single-bit tests."""
    words = text.split(None, 2)
    if len(words) != 3 or not words[0].startswith("arg") or not words[0][3:].isdigit():
        raise PolicyError(f"expected `argN OP VALUE`, got {text!r}")
    arg = int(words[0][3:])
    if arg > 5:
        raise PolicyError(f"{words[0]}: a syscall has arguments arg0-arg5")
    op, value = words[1], parse_value(words[2])
    if op in _OPS:
        return [ArgCmp(arg, _OPS[op], value)]
    if op == "in":
        return [ArgCmp(arg, CMP_MASKED_EQ, ~value & MASK64, 0)]
    if op == "&":
        bits = [1 << i for i in range(64) if value >> i & 1]
        if not bits:
            raise PolicyError(f"{text!r}: `&` with 0 never holds")
        return [ArgCmp(arg, CMP_MASKED_EQ, bit, bit) for bit in bits]
    raise PolicyError(f"unknown operator {op!r} in {text!r}")


def _negate(cmp: ArgCmp) -> list[ArgCmp]:
    """The comparisons whose OR is NOT `cmp`."""
    if cmp.op == CMP_MASKED_EQ:
        bits = [1 << i for i in range(64) if cmp.a >> i & 1]
        # Some masked bit differs from the wanted value.
        return [ArgCmp(cmp.arg, CMP_MASKED_EQ, bit, (cmp.b & bit) ^ bit) for bit in bits]
    opposite = {CMP_EQ: CMP_NE, CMP_NE: CMP_EQ, CMP_LT: CMP_GE, CMP_GE: CMP_LT,
                CMP_LE: CMP_GT, CMP_GT: CMP_LE}
    return [ArgCmp(cmp.arg, opposite[cmp.op], cmp.a)]


def _products(groups: list[list[ArgCmp]]) -> list[tuple[ArgCmp, ...]]:
    """AND of ORs -> OR of ANDs (one choice from each group); refuses to expand past
    MAX_LINE_RULES (`arg0 & 0xff.. && arg1 & 0xff..` would be 4096 rules)."""
    count = math.prod(len(g) for g in groups)
    if count > MAX_LINE_RULES:
        raise PolicyError(f"the expression expands to {count} rules (at most "
                          f"{MAX_LINE_RULES}); test fewer bits with `&`, or split it")
    out: list[tuple[ArgCmp, ...]] = [()]
    for group in groups:
        out = [alt + (c,) for alt in out for c in group]
    return out


def _rules(syscall: str, action: int, conjunctions: list[tuple[ArgCmp, ...]]) -> list[Rule]:
    rules = []
    for conj in conjunctions:
        args = [c.arg for c in conj]
        if len(set(args)) != len(args):
            raise PolicyError("one argument compared twice in an AND; libseccomp cannot "
                              "compile that")
        rules.append(Rule(syscall, action, conj))
    return rules


def _parse_return(text: str) -> int:
    name = text[len("return"):].strip()
    code = int(name) if name.isascii() and name.isdigit() and len(name) <= 5 \
        else _ERRNOS.get(name)
    if code is None or code >= 4096:
        raise PolicyError(f"bad errno {name!r}")
    return act_errno(code)


def parse_expression(syscall: str, text: str) -> list[Rule]:
    """The rules for one policy line's right-hand side.

    `EXPR; return N` allows the calls EXPR matches and fails the others with errno N;
    the others are expressed as the negation of EXPR, so each conjunction of that
    negation may compare an argument only once (libseccomp's limit)."""
    text = text.strip()
    if text == "1":
        return [Rule(syscall, ACT_ALLOW)]
    if text.startswith("return"):
        return [Rule(syscall, _parse_return(text))]
    text, _, otherwise = text.partition(";")
    # Each `||` term is an AND of atoms; a multi-bit `&` atom is itself an OR.
    terms = [[_parse_atom(atom.strip()) for atom in term.split("&&")]
             for term in text.split("||")]
    allowed = [c for t in terms for c in _products(t)]
    if len(allowed) > MAX_LINE_RULES:
        raise PolicyError(f"the expression expands to {len(allowed)} rules (at most "
                          f"{MAX_LINE_RULES}); split it")
    rules = _rules(syscall, ACT_ALLOW, allowed)
    if otherwise.strip():
        if not otherwise.strip().startswith("return"):
            raise PolicyError(f"expected `; return N`, got {otherwise.strip()!r}")
        # NOT (T1 || T2 ...) = AND over terms of (OR over the term's negated atoms).
        negated = [[n for group in term for n in _negate_group(group)] for term in terms]
        rules += _rules(syscall, _parse_return(otherwise.strip()), _products(negated))
    return rules


def _negate_group(group: list[ArgCmp]) -> list[ArgCmp]:
    """NOT of one atom. A multi-bit `&` atom (an OR of bit tests) negates to one test:
    none of its bits set."""
    if len(group) == 1:
        return _negate(group[0])
    mask = 0
    for cmp in group:
        mask |= cmp.a
    return [ArgCmp(group[0].arg, CMP_MASKED_EQ, mask, 0)]


def load_policy(path: "str | os.PathLike[str]", _depth: int = 0, _state: dict | None = None) -> Policy:
    """Parses a policy file and its includes (each a regular file of at most
    MAX_POLICY_BYTES; at most MAX_POLICY_FILES files and MAX_RULES rules in all)."""
    path = os.fspath(path)
    state = {"files": 0, "rules": 0} if _state is None else _state
    if _depth > MAX_INCLUDE_DEPTH:
        raise PolicyError(f"{path}: includes nested deeper than {MAX_INCLUDE_DEPTH}")
    state["files"] += 1
    if state["files"] > MAX_POLICY_FILES:
        raise PolicyError(f"{path}: more than {MAX_POLICY_FILES} policy files included")
    try:
        lines = read_host_file(path, "policy file", MAX_POLICY_BYTES).decode().splitlines()
    except HostFileError as e:
        raise PolicyError(str(e)) from None
    except UnicodeDecodeError as e:
        raise PolicyError(f"{path}: not valid UTF-8 (byte {e.start})") from None
    policy = Policy()
    seen: dict[str, int] = {}
    pending = ""
    for number, raw in enumerate(lines, 1):
        line = pending + raw.split("#", 1)[0].strip()
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        pending = ""
        if not line:
            continue
        if line.startswith("@include"):
            included = os.path.join(os.path.dirname(path),
                                    os.path.basename(line[len("@include"):].strip()))
            for rule in load_policy(included, _depth + 1, state).rules:  # errors name it
                seen.setdefault(rule.syscall, number)
                policy.rules.append(rule)
            continue
        if line.startswith("@frequency"):
            continue
        try:
            name, sep, expr = line.partition(":")
            name = name.strip()
            if not sep or not name.isascii() or not name.replace("_", "").isalnum():
                raise PolicyError(f"expected `syscall: expression`, got {line[:80]!r}")
            if name in seen:
                raise PolicyError(f"{name} is already in the policy (line {seen[name]})")
            seen[name] = number
            rules = parse_expression(name, expr)
        except PolicyError as e:
            raise PolicyError(f"{path}:{number}: {e}") from None
        state["rules"] += len(rules)
        if state["rules"] > MAX_RULES:
            raise PolicyError(f"{path}:{number}: more than {MAX_RULES} rules in the policy")
        policy.rules.extend(rules)
    return policy
