"""Type specs of the API schema, compiled into coercers.

A spec is a mapping from the schema file, e.g. ``{type: size}`` or
``{type: list, items: {type: uuid}}``. `compile_spec` turns it into a function
``coerce(value, path) -> value`` that accepts every spelling VDSM's engine sends
(ints or names for enums, ``"false"`` for booleans, numeric strings for sizes)
and returns one canonical Python value, or raises `JsonRpcInvalidParams` naming
the offending field (``connectionParams[0].port``).

The same specs describe return values; `check_return` validates those in
development mode so the schema and the code cannot drift apart unnoticed.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

from vdsmlite.ids import parse_uuid
from vdsmlite.rpc.errors import JsonRpcInvalidParams

Coercer = Callable[[Any, str], Any]

_INT_RE = re.compile(r"^[+-]?[0-9]+$")

PRIMITIVES = ("any", "string", "int", "number", "size", "boolean", "uuid", "list", "map", "object")
SPEC_KEYS = {
    "type", "doc", "items", "values", "properties", "additional", "min", "max",
    "maxLength", "minLength", "pattern", "nullable", "keys",
}


class SchemaEnum:
    """A named VDSM enum: ``{NFS: 1, FCP: 2}`` or string-valued ``{COW: COW}``."""

    def __init__(self, name: str, values: Mapping[str, Any], doc: str = "") -> None:
        self.name = name
        self.doc = doc
        self.values: dict[str, Any] = dict(values)
        self._by_name = {k.upper(): v for k, v in self.values.items()}
        self._by_value = {v: v for v in self.values.values()}
        self._names_by_value = {v: k for k, v in self.values.items()}
        self.int_valued = all(isinstance(v, int) for v in self.values.values())

    def coerce(self, value: Any, path: str) -> Any:
        is_int = isinstance(value, int) and not isinstance(value, bool)
        if self.int_valued and is_int and value in self._by_value:
            return value
        if isinstance(value, str):
            if not self.int_valued and value in self._by_value:
                return value
            if value.upper() in self._by_name:
                return self._by_name[value.upper()]
            if self.int_valued and _INT_RE.match(value.strip()) and int(value) in self._by_value:
                return int(value)
        allowed = ", ".join(f"{k}({v})" if self.int_valued else k for k, v in self.values.items())
        raise _bad(path, f"{value!r} is not a valid {self.name}; expected one of {allowed}")

    def name_of(self, value: Any) -> str:
        return self._names_by_value[value]

    def describe(self) -> dict[str, Any]:
        return {"doc": self.doc, "values": self.values}


def _bad(path: str, reason: str) -> JsonRpcInvalidParams:
    return JsonRpcInvalidParams(path or "params", reason)


def _join(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else key


def _tname(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean",
             int: "an integer", float: "a number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def compile_spec(
    spec: Mapping[str, Any],
    enums: Mapping[str, SchemaEnum],
    types: Mapping[str, Mapping[str, Any]],
    where: str,
) -> Coercer:
    """Compile one spec; `where` names it in schema errors (a broken schema fails at load)."""
    unknown = set(spec) - SPEC_KEYS - {"name", "default", "required"}
    if unknown:
        raise ValueError(f"{where}: unknown spec keys {sorted(unknown)}")
    tname = spec.get("type")
    if not isinstance(tname, str):
        raise ValueError(f"{where}: spec needs a 'type'")
    nullable = bool(spec.get("nullable", False))

    inner: Coercer
    if tname in enums:
        inner = enums[tname].coerce
    elif tname in types:
        inner = compile_spec(types[tname], enums, types, f"{where} -> {tname}")
    elif tname == "any":
        def inner(v: Any, p: str) -> Any:
            return v
    elif tname == "string":
        inner = _string(spec)
    elif tname == "int":
        inner = _int(spec)
    elif tname == "number":
        def inner(v: Any, p: str) -> Any:
            if isinstance(v, bool) or not isinstance(v, int | float):
                raise _bad(p, f"expected a number, got {_tname(v)}")
            return v
    elif tname == "size":
        inner = _size(spec)
    elif tname == "boolean":
        inner = _boolean
    elif tname == "uuid":
        inner = _uuid
    elif tname == "list":
        if "items" not in spec:
            raise ValueError(f"{where}: list needs 'items'")
        inner = _list(compile_spec(spec["items"], enums, types, f"{where}[]"), spec)
    elif tname == "map":
        if "values" not in spec:
            raise ValueError(f"{where}: map needs 'values'")
        keys = _uuid if spec.get("keys") == "uuid" else None
        inner = _map(compile_spec(spec["values"], enums, types, f"{where}{{}}"), keys)
    elif tname == "object":
        inner = _object(spec, enums, types, where)
    else:
        raise ValueError(f"{where}: unknown type {tname!r}")

    if not nullable:
        return inner

    def maybe_null(v: Any, p: str) -> Any:
        return None if v is None else inner(v, p)

    return maybe_null


def _string(spec: Mapping[str, Any]) -> Coercer:
    max_len = spec.get("maxLength")
    min_len = spec.get("minLength", 0)
    pattern = re.compile(spec["pattern"]) if "pattern" in spec else None

    def coerce(v: Any, p: str) -> str:
        # The engine sends numbers as strings and sometimes strings as numbers
        # (ports, tpgt); a number where a string is expected is accepted as text.
        if isinstance(v, int | float) and not isinstance(v, bool):
            v = str(v)
        if not isinstance(v, str):
            raise _bad(p, f"expected a string, got {_tname(v)}")
        if "\x00" in v:
            raise _bad(p, "must not contain NUL characters")
        if len(v) < min_len:
            raise _bad(p, f"must be at least {min_len} characters")
        if max_len is not None and len(v.encode()) > max_len:
            raise _bad(p, f"must be at most {max_len} bytes")
        if pattern is not None and not pattern.fullmatch(v):
            raise _bad(p, f"{v!r} does not match {pattern.pattern}")
        return v

    return coerce


def _to_int(v: Any, p: str, what: str) -> int:
    if isinstance(v, bool):
        raise _bad(p, f"expected {what}, got a boolean")
    if isinstance(v, int):
        return v
    if isinstance(v, float) and v.is_integer():
        return int(v)
    if isinstance(v, str) and _INT_RE.match(v.strip()):
        return int(v)
    raise _bad(p, f"expected {what}, got {v!r}")


def _int(spec: Mapping[str, Any]) -> Coercer:
    lo, hi = spec.get("min"), spec.get("max")

    def coerce(v: Any, p: str) -> int:
        n = _to_int(v, p, "an integer")
        if lo is not None and n < lo:
            raise _bad(p, f"must be >= {lo}, got {n}")
        if hi is not None and n > hi:
            raise _bad(p, f"must be <= {hi}, got {n}")
        return n

    return coerce


def _size(spec: Mapping[str, Any]) -> Coercer:
    lo = spec.get("min", 0)
    hi = spec.get("max", 2**63 - 1)

    def coerce(v: Any, p: str) -> int:
        n = _to_int(v, p, "a size in bytes (integer or numeric string)")
        if n < lo:
            raise _bad(p, f"must be >= {lo} bytes, got {n}")
        if n > hi:
            raise _bad(p, f"must be <= {hi} bytes, got {n}")
        return n

    return coerce


def _boolean(v: Any, p: str) -> bool:
    if isinstance(v, bool):
        return v
    if isinstance(v, str) and v.strip().lower() in ("true", "false"):
        return v.strip().lower() == "true"
    if isinstance(v, int) and v in (0, 1):
        return bool(v)
    raise _bad(p, f"expected a boolean (true/false or \"true\"/\"false\"), got {v!r}")


def _uuid(v: Any, p: str) -> str:
    u = parse_uuid(v)
    if u is None:
        raise _bad(p, f"expected a UUID, got {v!r}")
    return u


def _list(item: Coercer, spec: Mapping[str, Any]) -> Coercer:
    max_items = spec.get("max")

    def coerce(v: Any, p: str) -> list[Any]:
        if not isinstance(v, list | tuple):
            raise _bad(p, f"expected a list, got {_tname(v)}")
        if max_items is not None and len(v) > max_items:
            raise _bad(p, f"at most {max_items} items allowed, got {len(v)}")
        return [item(x, _join(p, i)) for i, x in enumerate(v)]

    return coerce


def _map(value: Coercer, key: Coercer | None) -> Coercer:
    def coerce(v: Any, p: str) -> dict[str, Any]:
        if not isinstance(v, dict):
            raise _bad(p, f"expected an object, got {_tname(v)}")
        out = {}
        for k, x in v.items():
            kk = key(k, _join(p, str(k))) if key else k
            out[kk] = value(x, _join(p, str(k)))
        return out

    return coerce


def _object(
    spec: Mapping[str, Any],
    enums: Mapping[str, SchemaEnum],
    types: Mapping[str, Mapping[str, Any]],
    where: str,
) -> Coercer:
    props = spec.get("properties", {})
    additional = spec.get("additional", True)
    fields: list[tuple[str, Coercer, bool, Any]] = []
    for name, pspec in props.items():
        has_default = "default" in pspec
        required = pspec.get("required", not has_default)
        fields.append((name, compile_spec(pspec, enums, types, f"{where}.{name}"),
                       required, pspec.get("default")))

    def coerce(v: Any, p: str) -> dict[str, Any]:
        if not isinstance(v, dict):
            raise _bad(p, f"expected an object, got {_tname(v)}")
        out = dict(v) if additional else {}
        for name, fc, required, default in fields:
            if name in v:
                out[name] = fc(v[name], _join(p, name))
            elif required:
                raise _bad(_join(p, name), "missing required field")
            else:
                out[name] = default
        if not additional:
            extra = sorted(set(v) - set(props))
            if extra:
                raise _bad(_join(p, extra[0]), "unknown field")
        return out

    return coerce


def check_return(
    value: Any,
    spec: Mapping[str, Any],
    enums: Mapping[str, SchemaEnum],
    types: Mapping[str, Mapping[str, Any]],
    path: str = "result",
) -> list[str]:
    """Problems with a verb's return value against its spec (empty = conforms).

    Returns are checked structurally and without coercion: what the handler
    produced must already be what the wire promises.
    """
    tname = spec["type"]
    if value is None and spec.get("nullable"):
        return []
    if tname in types:
        return check_return(value, types[tname], enums, types, path)
    if tname in enums:
        enum = enums[tname]
        ok = value in enum.values.values() or value in enum.values
        return [] if ok else [f"{path}: {value!r} is not a {tname}"]
    expect: dict[str, Any] = {
        "string": str, "int": int, "number": (int, float), "boolean": bool, "uuid": str,
        "size": (int, str), "list": list, "map": dict, "object": dict,
    }
    if tname == "any":
        return []
    is_bool_number = tname in ("int", "number") and isinstance(value, bool)
    if not isinstance(value, expect[tname]) or is_bool_number:
        return [f"{path}: expected {tname}, got {_tname(value)}"]
    problems: list[str] = []
    if tname == "uuid" and parse_uuid(value) is None:
        problems.append(f"{path}: {value!r} is not a UUID")
    elif tname == "list":
        for i, x in enumerate(value):
            problems += check_return(x, spec["items"], enums, types, f"{path}[{i}]")
    elif tname == "map":
        for k, x in value.items():
            problems += check_return(x, spec["values"], enums, types, f"{path}.{k}")
    elif tname == "object":
        for name, pspec in spec.get("properties", {}).items():
            if name in value:
                problems += check_return(value[name], pspec, enums, types, f"{path}.{name}")
            elif pspec.get("required", "default" not in pspec):
                problems.append(f"{path}.{name}: missing")
        if not spec.get("additional", True):
            for extra in sorted(set(value) - set(spec.get("properties", {}))):
                problems.append(f"{path}.{extra}: not in schema")
    return problems
