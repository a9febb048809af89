"""JSON from untrusted hosts (--cfg files, control messages) with hard limits.

`json.loads` recurses once per nesting level and turns any run of digits into an
int, so a few kilobytes of `[` or of `9` cost a RecursionError or seconds of CPU. Here
the text is checked first (UTF-8, size, nesting depth), integers longer than a u64/i64
and the non-standard NaN/Infinity are refused while parsing, and every string in the
result must be valid Unicode without NUL (a `"\\ud800"` escape decodes to a lone
surrogate that no file name or kernel command line can hold).
"""

from __future__ import annotations

import json
import re
from typing import Any

MAX_INT_DIGITS = 20  # 2**64 - 1 has 20 digits
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.DOTALL)
_BRACKET = re.compile(r"[\[\]{}]")


class JsonLimitError(ValueError):
    """The text is not JSON within the limits; the message says what is wrong, without
    naming the source (the caller does, once)."""


def _int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise JsonLimitError(f"a number of {len(text)} digits is out of range")
    return int(text)


def _constant(name: str) -> Any:
    raise JsonLimitError(f"{name} is not a JSON value")


def _nesting(text: str) -> int:
    """The deepest bracket nesting, counting brackets outside strings only."""
    depth = deepest = 0
    for m in _BRACKET.finditer(_STRING.sub('""', text)):
        if m.group() in "[{":
            depth += 1
            deepest = max(deepest, depth)
        else:
            depth -= 1
    return deepest


def loads(data: bytes, max_size: int, max_depth: int) -> Any:
    """Parses `data` as JSON within the limits; raises JsonLimitError."""
    if len(data) > max_size:
        raise JsonLimitError(f"larger than {max_size} bytes")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise JsonLimitError(f"not valid UTF-8 (byte {e.start})") from None
    if _nesting(text) > max_depth:
        raise JsonLimitError(f"nests deeper than {max_depth} levels")
    try:
        value = json.loads(text, parse_int=_int, parse_constant=_constant)
    except json.JSONDecodeError as e:
        raise JsonLimitError(f"invalid JSON at line {e.lineno} column {e.colno}: "
                             f"{e.msg}") from None
    except RecursionError:  # unreachable after the depth check; kept as a last guard
        raise JsonLimitError(f"nests deeper than {max_depth} levels") from None
    _check_strings(value)
    return value


def check_text(s: str) -> None:
    """Refuses a string no file name, kernel parameter or message may hold."""
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        raise JsonLimitError(f"string {s[:40]!r} is not valid UTF-8 (a lone surrogate)") \
            from None
    if "\0" in s:
        raise JsonLimitError(f"string {s[:40]!r} contains a NUL character")


def _check_strings(value: Any) -> None:
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, str):
            check_text(v)
        elif isinstance(v, list):
            stack.extend(v)
        elif isinstance(v, dict):
            stack.extend(v.keys())
            stack.extend(v.values())
