"""crosvm's key=value grammar."""

import pytest

from crosvm.cli import keyvalue as kv
from crosvm.cli.options import SERIAL_SCHEMA

BLOCK = kv.Schema([kv.Field("path", "path", required=True), kv.Field("ro", "bool", False),
                   kv.Field("root", "bool", False), kv.Field("block-size", "int", 512,
                                                            aliases=("block_size",)),
                   kv.Field("id", "str")])


def parse(schema, text):
    return kv.from_items(schema, kv.parse(text))


def test_first_key_may_be_omitted():
    assert parse(BLOCK, "disk.img") == {"path": "disk.img"}


def test_bare_key_means_true():
    assert parse(BLOCK, "disk.img,ro,root") == {"path": "disk.img", "ro": True, "root": True}


def test_explicit_boolean_false():
    assert parse(BLOCK, "path=d,ro=false") == {"path": "d", "ro": False}


def test_keys_in_any_order():
    assert parse(BLOCK, "ro=true,path=d") == {"ro": True, "path": "d"}


def test_numbers_take_prefixes():
    assert parse(BLOCK, "d,block-size=0x1000")["block-size"] == 4096
    assert parse(BLOCK, "d,block-size=0o10")["block-size"] == 8
    assert parse(BLOCK, "d,block-size=0b100")["block-size"] == 4


def test_negative_number():
    assert kv.parse_int("-12") == -12


def test_snake_case_alias_accepted():
    assert parse(BLOCK, "d,block_size=4096")["block-size"] == 4096


def test_double_quoted_string_keeps_commas_and_escapes():
    assert parse(BLOCK, 'path="a,b\\"c"') == {"path": 'a,b"c'}


def test_single_quoted_string_is_literal():
    assert parse(BLOCK, "path='a\\b,c'") == {"path": "a\\b,c"}


def test_unknown_key_is_rejected_with_position():
    with pytest.raises(kv.KeyValueError, match=r"unknown field `bogus`.*at position 2"):
        parse(BLOCK, "d,bogus=1")


def test_duplicate_key_is_rejected():
    with pytest.raises(kv.KeyValueError, match="duplicate field `ro`"):
        parse(BLOCK, "d,ro,ro=false")


def test_bad_boolean_value_names_position():
    with pytest.raises(kv.KeyValueError, match="expected 'true' or 'false'.*position 5"):
        parse(BLOCK, "d,ro=yes")


def test_bad_number_is_rejected():
    with pytest.raises(kv.KeyValueError, match="invalid number"):
        parse(BLOCK, "d,block-size=12ab")


def test_unterminated_quote_is_rejected():
    with pytest.raises(kv.KeyValueError, match="unterminated string at position 5"):
        parse(BLOCK, 'path="abc')


def test_quote_inside_unquoted_string_is_rejected():
    with pytest.raises(kv.KeyValueError, match="unexpected quote"):
        parse(BLOCK, 'pa"th=x')


def test_missing_comma_after_quoted_value():
    with pytest.raises(kv.KeyValueError, match="expected ','"):
        parse(BLOCK, 'path="a"ro')


def test_trailing_comma_is_rejected():
    with pytest.raises(kv.KeyValueError, match="expected a value after ','"):
        parse(BLOCK, "d,")


def test_nested_lists_parse():
    items = kv.parse("clusters=[[0,2],[1,3]]")

    assert items[0].key == "clusters"
    assert [[i.value for i in inner.value] for inner in items[0].value] == [["0", "2"], ["1", "3"]]


def test_variant_with_fields():
    items = kv.parse("kvm[device=/dev/kvm]")

    assert items[0].value.name == "kvm"
    assert items[0].value.items[0].key == "device"
    assert items[0].value.items[0].value == "/dev/kvm"


def test_missing_required_field():
    with pytest.raises(kv.KeyValueError, match="missing field `path`"):
        kv.with_defaults(BLOCK, {}, "block")


def test_serial_enum_value_checked():
    with pytest.raises(kv.KeyValueError, match="invalid value 'tcp' for `type`"):
        parse(SERIAL_SCHEMA, "type=tcp")


def test_serial_first_value_is_type():
    assert parse(SERIAL_SCHEMA, "stdout,console,num=2") == {
        "type": "stdout", "console": True, "num": 2}


def test_non_boolean_bare_word_after_first_is_rejected():
    with pytest.raises(kv.KeyValueError, match="`num` is not a boolean field"):
        parse(SERIAL_SCHEMA, "stdout,num")


from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("ab=,[]\"'\\ 0x1-")), max_size=30))
def test_any_input_parses_or_raises_keyvalue_error(text):
    try:
        parse(BLOCK, text)
    except kv.KeyValueError:
        pass
