"""Schema type coercion: every spelling VDSM's engine sends, and clear refusals."""

from __future__ import annotations

from typing import Any

import pytest

from vdsmlite.rpc.errors import JsonRpcInvalidParams
from vdsmlite.rpc.types import SchemaEnum, check_return, compile_spec

pytestmark = pytest.mark.unit

ENUMS = {
    "StorageType": SchemaEnum("StorageType", {"UNKNOWN": 0, "NFS": 1, "FCP": 2, "ISCSI": 3}),
    "Format": SchemaEnum("Format", {"COW": "COW", "RAW": "RAW"}),
}
TYPES: dict[str, Any] = {
    "Conn": {"type": "object", "properties": {
        "id": {"type": "uuid"},
        "port": {"type": "int", "min": 1, "max": 65535},
        "user": {"type": "string", "default": ""},
    }},
}


def coerce(spec: dict[str, Any], value: Any) -> Any:
    return compile_spec(spec, ENUMS, TYPES, "test")(value, "p")


def refused(spec: dict[str, Any], value: Any) -> JsonRpcInvalidParams:
    with pytest.raises(JsonRpcInvalidParams) as e:
        coerce(spec, value)
    return e.value


@pytest.mark.parametrize(("value", "expected"), [
    (True, True), (False, False), ("true", True), ("false", False), ("False", False),
    ("TRUE", True), (1, True), (0, False),
])
def test_boolean_spellings(value: Any, expected: bool) -> None:
    assert coerce({"type": "boolean"}, value) is expected


@pytest.mark.parametrize("value", ["yes", "", None, 2, [], "1"])
def test_boolean_refuses(value: Any) -> None:
    refused({"type": "boolean"}, value)


@pytest.mark.parametrize(("value", "expected"), [
    (134217728, 134217728), ("134217728", 134217728), (" 42 ", 42), (0, 0), (1024.0, 1024),
])
def test_size_accepts_ints_and_numeric_strings(value: Any, expected: int) -> None:
    assert coerce({"type": "size"}, value) == expected


@pytest.mark.parametrize("value", [-1, "-5", "1.5", 1.5, "1e9", "12abc", True, None, "", [1]])
def test_size_refuses(value: Any) -> None:
    refused({"type": "size"}, value)


def test_int_bounds() -> None:
    spec = {"type": "int", "min": 1, "max": 250}
    assert coerce(spec, "250") == 250
    assert "must be <= 250" in refused(spec, 251).reason
    assert "must be >= 1" in refused(spec, "0").reason


@pytest.mark.parametrize(("value", "expected"), [
    (3, 3), ("3", 3), ("ISCSI", 3), ("iscsi", 3), ("NFS", 1),
])
def test_int_enum_accepts_ints_names_and_numeric_strings(value: Any, expected: int) -> None:
    assert coerce({"type": "StorageType"}, value) == expected


@pytest.mark.parametrize("value", [9, "9", "SAN", True, None, 3.5])
def test_int_enum_refuses(value: Any) -> None:
    err = refused({"type": "StorageType"}, value)
    assert "ISCSI(3)" in err.reason  # tells the caller what is allowed


def test_string_enum() -> None:
    assert coerce({"type": "Format"}, "cow") == "COW"
    assert coerce({"type": "Format"}, "RAW") == "RAW"
    refused({"type": "Format"}, 4)


def test_uuid_normalized_to_lower_case() -> None:
    u = "5C4EEED4-F2A7-490A-AB57-A0D6F3A711CC"
    assert coerce({"type": "uuid"}, u) == u.lower()
    for bad in ("5c4eeed4f2a7490aab57a0d6f3a711cc", "../../etc", "", 5, None):
        refused({"type": "uuid"}, bad)


def test_string_rules() -> None:
    assert coerce({"type": "string"}, "x") == "x"
    assert coerce({"type": "string"}, 3260) == "3260"  # engines mix up numbers and strings
    refused({"type": "string"}, None)
    refused({"type": "string"}, {"a": 1})
    assert "NUL" in refused({"type": "string"}, "a\x00b").reason
    assert "at most 3 bytes" in refused({"type": "string", "maxLength": 3}, "abcd").reason
    refused({"type": "string", "pattern": "[a-z]+"}, "ABC")


def test_nested_errors_name_the_path() -> None:
    spec = {"type": "list", "items": {"type": "Conn"}}
    ok = coerce(spec, [{"id": "5e5a1a8c-3b8e-4b0e-9a43-2f8a0c5b7d11", "port": "3260"}])
    assert ok == [{"id": "5e5a1a8c-3b8e-4b0e-9a43-2f8a0c5b7d11", "port": 3260, "user": ""}]
    err = refused(spec, [{"id": "5e5a1a8c-3b8e-4b0e-9a43-2f8a0c5b7d11", "port": "x"}])
    assert err.param == "p[0].port"
    err = refused(spec, [{"port": 1}])
    assert err.param == "p[0].id"
    assert err.reason == "missing required field"


def test_closed_object_refuses_unknown_fields() -> None:
    spec = {"type": "object", "additional": False, "properties": {"a": {"type": "int"}}}
    assert coerce(spec, {"a": 1}) == {"a": 1}
    assert refused(spec, {"a": 1, "b": 2}).param == "p.b"


def test_map_with_uuid_keys() -> None:
    spec = {"type": "map", "keys": "uuid", "values": {"type": "int"}}
    sd = "C2A6D7C8-8D81-4E01-9ED4-7EB670713448"
    assert coerce(spec, {sd: "2"}) == {sd.lower(): 2}
    refused(spec, {"not-a-uuid": 1})


def test_nullable() -> None:
    assert coerce({"type": "int", "nullable": True}, None) is None
    refused({"type": "int"}, None)


def test_list_limits() -> None:
    spec = {"type": "list", "items": {"type": "int"}, "max": 2}
    assert coerce(spec, ("1", 2)) == [1, 2]
    refused(spec, [1, 2, 3])
    refused(spec, "1,2")


def test_broken_specs_fail_at_compile_time() -> None:
    for spec in ({"type": "nosuch"}, {"type": "list"}, {}, {"type": "int", "bogus": 1}):
        with pytest.raises(ValueError):
            compile_spec(spec, ENUMS, TYPES, "test")


def test_check_return() -> None:
    spec = {"type": "object", "properties": {"id": {"type": "uuid"}, "n": {"type": "int"}}}
    assert check_return({"id": "5e5a1a8c-3b8e-4b0e-9a43-2f8a0c5b7d11", "n": 1}, spec,
                        ENUMS, TYPES) == []
    problems = check_return({"id": "x", "n": True}, spec, ENUMS, TYPES)
    assert problems == ["result.id: 'x' is not a UUID", "result.n: expected int, got a boolean"]
    assert check_return({"id": "5e5a1a8c-3b8e-4b0e-9a43-2f8a0c5b7d11"}, spec, ENUMS, TYPES) \
        == ["result.n: missing"]
