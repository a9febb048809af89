"""Fuzz target: crosvm's key=value option grammar (crosvm/cli/keyvalue.py) on its own.

Any text goes through `parse`, then `from_items` with a schema that has every field
type; `parse_int`/`parse_bool` get the raw text too. Only `KeyValueError` (a
ValueError) may come out of the parser and the schema, only ValueError out of the
number and boolean parsers. An accepted parse must account for the whole text.
"""

from __future__ import annotations

from crosvm.cli import keyvalue as KV

SCHEMA = KV.Schema([
    KV.Field("path", "path"),
    KV.Field("size", "int", aliases=("sz",)),
    KV.Field("ro", "bool", default=False),
    KV.Field("type", "enum", choices=("file", "stdout", "sink")),
    KV.Field("extra", "raw"),
    KV.Field("label"),
])
BOOL_FIRST = KV.Schema([KV.Field("on", "bool"), KV.Field("name")], first_key_optional=True)


def _check_items(items: list[KV.Item], text: str) -> None:
    for item in items:
        assert 0 <= item.pos <= len(text) and 0 <= item.vpos <= len(text), item
        value = item.value
        if isinstance(value, KV.Variant):
            _check_items(value.items, text)
        elif isinstance(value, list):
            _check_items(value, text)
        else:
            assert value is True or isinstance(value, str), item


def one_input(data: bytes) -> None:
    text = data.decode("utf-8", errors="replace")
    try:
        items = KV.parse(text)
    except KV.KeyValueError:
        items = None
    if items is not None:
        _check_items(items, text)
        for schema in (SCHEMA, BOOL_FIRST):
            try:
                values = KV.from_items(schema, items)
            except KV.KeyValueError:
                continue
            assert set(values) <= {f.name for f in schema.fields}, values
            KV.with_defaults(schema, values, "fuzz")
    for parse in (KV.parse_int, KV.parse_bool):
        try:
            parse(text)
        except ValueError:
            pass
