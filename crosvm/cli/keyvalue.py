"""crosvm's key=value option grammar (serde_keyvalue), parsed into typed dicts.

    --block disk.img,ro,block-size=4096     first key omitted, bare boolean
    --serial type=file,path="a,b.log"        quoted strings may hold commas
    --hypervisor kvm[device=/dev/kvm]        an enum variant with fields
    --cpus clusters=[[0,1],[2,3]]            nested lists

Errors name the position (0-based, as crosvm does) of the offending text.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

BARE_STOP = ",[]="
MAX_LENGTH = 16384   # one option value; PATH_MAX is 4096
MAX_NESTING = 8      # `[` levels; crosvm's deepest schema (cpu clusters) uses 2
INT_MIN, INT_MAX = -(1 << 63), (1 << 64) - 1   # what an i64 or u64 key can hold
_INT = re.compile(r"[+-]?(?:0[xX][0-9a-fA-F]{1,16}|0[oO][0-7]{1,22}|0[bB][01]{1,64}|[0-9]{1,20})")


class KeyValueError(ValueError):
    """A malformed or invalid key=value string."""


@dataclass
class Variant:
    """`name[fields]`: an enum variant that carries key=value fields."""

    name: str
    items: list["Item"]


@dataclass
class Item:
    key: str | None
    value: Any            # str, True (bare key), list[Item], or Variant
    pos: int                 # where the item (its key, if any) starts
    quoted: bool = False
    vpos: int = -1           # where its value starts

    def __post_init__(self) -> None:
        if self.vpos < 0:
            self.vpos = self.pos


class _Parser:
    def __init__(self, text: str) -> None:
        self.s = text
        self.i = 0
        self.depth = 0

    def error(self, msg: str, pos: int | None = None) -> KeyValueError:
        return KeyValueError(f"{msg} at position {self.i if pos is None else pos}")

    def peek(self) -> str:
        return self.s[self.i] if self.i < len(self.s) else ""

    def word(self) -> str:
        start = self.i
        while self.i < len(self.s) and self.s[self.i] not in BARE_STOP:
            if self.s[self.i] in "\"'":
                raise self.error("unexpected quote in unquoted string")
            self.i += 1
        return self.s[start:self.i]

    def quoted(self) -> str:
        q = self.s[self.i]
        start = self.i
        self.i += 1
        out = []
        while True:
            if self.i >= len(self.s):
                raise self.error("unterminated string", start)
            c = self.s[self.i]
            if c == q:
                self.i += 1
                return "".join(out)
            if c == "\\" and q == '"':
                nxt = self.s[self.i + 1:self.i + 2]
                if nxt not in ('"', "\\"):
                    raise self.error("invalid escape sequence in string")
                out.append(nxt)
                self.i += 2
                continue
            out.append(c)
            self.i += 1

    def value(self) -> tuple[Any, bool]:
        c = self.peek()
        if c in ("\"", "'"):
            return self.quoted(), True
        if c == "[":
            return self.bracketed(), False
        w = self.word()
        if self.peek() == "[":
            return Variant(w, self.bracketed()), False
        return w, False

    def bracketed(self) -> list[Item]:
        start = self.i
        self.depth += 1
        if self.depth > MAX_NESTING:
            raise self.error(f"brackets nest deeper than {MAX_NESTING} levels")
        self.i += 1
        items = self.items(closing="]")
        if self.peek() != "]":
            raise self.error("expected ']'", self.i if self.i < len(self.s) else start)
        self.i += 1
        self.depth -= 1
        return items

    def items(self, closing: str = "") -> list[Item]:
        items: list[Item] = []
        while True:
            if self.i >= len(self.s) or (closing and self.peek() == closing):
                if items and self.s[self.i - 1] == ",":
                    raise self.error("expected a value after ','")
                return items
            pos = self.i
            c = self.peek()
            if c in ("\"", "'", "["):
                value, quoted = self.value()
                items.append(Item(None, value, pos, quoted))
            else:
                w = self.word()
                if self.peek() == "=":
                    if not w:
                        raise self.error("expected a key before '='", pos)
                    self.i += 1
                    vpos = self.i
                    value, quoted = self.value()
                    items.append(Item(w, value, pos, quoted, vpos))
                elif self.peek() == "[":
                    items.append(Item(None, Variant(w, self.bracketed()), pos))
                else:
                    if not w:
                        raise self.error("expected a value")
                    items.append(Item(None, w, pos))
            if self.i >= len(self.s):
                return items
            c = self.peek()
            if c == ",":
                self.i += 1
                continue
            if closing and c == closing:
                return items
            raise self.error("expected ','")


def parse(text: str) -> list[Item]:
    """Parse a whole option value into items (no schema applied)."""
    if len(text) > MAX_LENGTH:
        raise KeyValueError(f"value longer than {MAX_LENGTH} characters")
    p = _Parser(text)
    items = p.items()
    if p.i != len(text):
        raise p.error("unexpected character")
    return items


# --- typed conversion -------------------------------------------------------------

def parse_int(text: str) -> int:
    """Integers as crosvm takes them: optional sign, 0x/0o/0b prefixes, ASCII digits
    only (Python's int() would take any Unicode digit and `_` separators), and within
    i64/u64 range."""
    if not _INT.fullmatch(text):
        raise ValueError(f"invalid number '{text[:40]}'")
    neg = text.startswith("-")
    body = text.lstrip("+-")
    base = {"x": 16, "o": 8, "b": 2}.get(body[1:2].lower(), 10) if body[:1] == "0" else 10
    value = int(body[2:] if base != 10 else body, base)
    return check_int_range(-value if neg else value)


def check_int_range(value: int) -> int:
    if not INT_MIN <= value <= INT_MAX:
        raise ValueError(f"number {value} is out of range")
    return value


def parse_bool(text: str) -> bool:
    if text == "true":
        return True
    if text == "false":
        return False
    raise ValueError(f"expected 'true' or 'false', not '{text}'")


@dataclass
class Field:
    """One key of an option: its kebab-case name, type and default."""

    name: str
    type: str = "str"                     # str | path | int | bool | enum | raw
    default: Any = None
    help: str = ""
    choices: tuple[str, ...] = ()
    aliases: tuple[str, ...] = ()
    required: bool = False


@dataclass
class Schema:
    """The keys of an option; the first may be given without its key."""

    fields: list[Field]
    first_key_optional: bool = True
    _by_name: dict[str, Field] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        for f in self.fields:
            self._by_name[f.name] = f
            for a in f.aliases:
                self._by_name[a] = f

    def lookup(self, key: str) -> Field | None:
        return self._by_name.get(key)

    def names(self) -> str:
        return ", ".join(f"`{f.name}`" for f in self.fields)


def convert(f: Field, value: Any) -> Any:
    """A raw value (str/True from the command line, or a JSON value) as `f`'s type."""
    if f.type == "bool":
        if value is True or value is False:
            return value
        if isinstance(value, str):
            return parse_bool(value)
        raise ValueError(f"expected a boolean for `{f.name}`")
    if value is True:
        raise ValueError(f"`{f.name}` needs a value")
    if f.type == "int":
        if isinstance(value, bool):
            raise ValueError(f"expected a number for `{f.name}`")
        if isinstance(value, int):
            return check_int_range(value)
        if isinstance(value, str):
            return parse_int(value)
        raise ValueError(f"expected a number for `{f.name}`")
    if f.type == "enum":
        if not isinstance(value, str) or value not in f.choices:
            raise ValueError(f"invalid value '{value}' for `{f.name}`, expected one of "
                             + ", ".join(f.choices))
        return value
    if f.type == "raw":
        return value
    if not isinstance(value, str):
        raise ValueError(f"expected a string for `{f.name}`")
    return value


def from_items(schema: Schema, items: list[Item]) -> dict[str, Any]:
    """Apply a schema to parsed items; returns {field name: typed value}, defaults filled."""
    out: dict[str, Any] = {}
    for idx, item in enumerate(items):
        key = item.key
        value = item.value
        if key is None:
            bare = isinstance(value, str) and not item.quoted
            f = schema.lookup(value) if bare else None
            if f is not None and f.type == "bool" and not (idx == 0 and schema.fields[0].type != "bool"
                                                           and schema.first_key_optional):
                key, value = value, True
            elif idx == 0 and schema.first_key_optional:
                key = schema.fields[0].name
            elif f is None and bare:
                raise KeyValueError(f"unknown field `{value}`, expected one of {schema.names()} "
                                    f"at position {item.pos}")
            else:
                raise KeyValueError(f"`{value}` is not a boolean field (write key=value) "
                                    f"at position {item.pos}")
        f = _field(schema, key, "", f" at position {item.pos}")
        if f.name in out:
            raise KeyValueError(f"duplicate field `{f.name}` at position {item.pos}")
        if isinstance(value, (list, Variant)) and f.type != "raw":
            raise KeyValueError(f"`{f.name}` does not take a list at position {item.vpos}")
        out[f.name] = _convert(f, value, "", f" at position {item.vpos}")
    return out


def _field(schema: Schema, key: str, prefix: str, suffix: str) -> Field:
    """The schema's field for `key`; the error names the valid keys and where it was."""
    f = schema.lookup(key)
    if f is None:
        raise KeyValueError(f"{prefix}unknown field `{key}`, expected one of "
                            f"{schema.names()}{suffix}")
    return f


def _convert(f: Field, value: Any, prefix: str, suffix: str) -> Any:
    try:
        return convert(f, value)
    except ValueError as e:
        raise KeyValueError(f"{prefix}{e}{suffix}") from None


def from_mapping(schema: Schema, mapping: dict[str, Any]) -> dict[str, Any]:
    """Validate a JSON object against a schema (unknown keys are errors)."""
    out: dict[str, Any] = {}
    for key, value in mapping.items():
        f = _field(schema, key, "", "")
        if f.name in out:
            raise KeyValueError(f"duplicate field `{f.name}`")
        out[f.name] = _convert(f, value, "", "")
    return out


def with_defaults(schema: Schema, values: dict[str, Any], where: str) -> dict[str, Any]:
    out = {}
    for f in schema.fields:
        if f.name in values:
            out[f.name] = values[f.name]
        elif f.required:
            raise KeyValueError(f"{where}: missing field `{f.name}`")
        else:
            out[f.name] = f.default
    return out
