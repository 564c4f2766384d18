"""The API schema: the only list of verbs that exist.

`schema.yml` (next to this module) declares every verb: its params with types
and defaults, its return shape, the VDSM errors it may raise, and its doc text.
Dispatch coerces params through it before a handler runs, the CLI builds its
help from it, and `Host.getVerbs` serves it to clients. A handler without a
schema entry, or a schema entry without a handler, stops the daemon at start.
"""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from vdsmlite import errors
from vdsmlite.rpc.errors import JsonRpcInvalidParams
from vdsmlite.rpc.types import Coercer, SchemaEnum, check_return, compile_spec


class SchemaError(Exception):
    """The schema file itself is broken (a bug, caught by tests and at start)."""


@dataclass(frozen=True)
class Param:
    name: str
    spec: dict[str, Any]
    coerce: Coercer
    required: bool
    default: Any
    doc: str

    def describe(self) -> dict[str, Any]:
        skip = ("name", "doc", "default", "required")
        out = {k: v for k, v in self.spec.items() if k not in skip}
        out.update(name=self.name, required=self.required, doc=self.doc)
        if not self.required:
            out["default"] = self.default
        return out


@dataclass(frozen=True)
class Verb:
    name: str
    doc: str
    params: tuple[Param, ...]
    returns: dict[str, Any]
    errors: tuple[type[errors.VdsmError], ...]
    # Long-running verbs that return a task id the caller polls with Task.getStatus.
    task: bool = False
    # Answers that can run to megabytes (thousands of entities or devices): encoded
    # off the event loop, which would otherwise stall every other call meanwhile.
    bulk: bool = False
    _by_name: dict[str, Param] = field(default_factory=dict, repr=False, compare=False)

    @property
    def namespace(self) -> str:
        return self.name.split(".", 1)[0]

    @property
    def method(self) -> str:
        return self.name.split(".", 1)[1]

    def coerce_params(self, params: list[Any] | dict[str, Any] | None) -> dict[str, Any]:
        """Validate and coerce call params into handler keyword arguments.

        Named params the schema does not know are ignored, as VDSM does: engines
        send extra keys (and VDSM only logs them), so rejecting them would break
        compatibility. Positional params follow the schema's order.
        """
        if params is None:
            params = {}
        if isinstance(params, list):
            if len(params) > len(self.params):
                raise JsonRpcInvalidParams(
                    "params", f"{self.name} takes at most {len(self.params)} positional params, "
                    f"got {len(params)}")
            params = {p.name: v for p, v in zip(self.params, params, strict=False)}
        out: dict[str, Any] = {}
        for p in self.params:
            if p.name in params:
                out[p.name] = p.coerce(params[p.name], p.name)
            elif p.required:
                raise JsonRpcInvalidParams(p.name, "missing required param")
            else:
                out[p.name] = copy.deepcopy(p.default)
        return out

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "doc": self.doc,
            "params": [p.describe() for p in self.params],
            "returns": self.returns,
            "errors": [{"name": e.__name__, "code": e.code, "message": e.msg} for e in self.errors],
            "task": self.task,
        }


class Schema:
    def __init__(self, doc: dict[str, Any], source: str) -> None:
        self.source = source
        if not isinstance(doc, dict) or not isinstance(doc.get("verbs"), dict):
            raise SchemaError(f"{source}: top level must have a 'verbs' mapping")
        self.enums: dict[str, SchemaEnum] = {
            name: SchemaEnum(name, e["values"], e.get("doc", ""))
            for name, e in doc.get("enums", {}).items()
        }
        self.types: dict[str, dict[str, Any]] = dict(doc.get("types", {}))
        clash = set(self.enums) & set(self.types)
        if clash:
            raise SchemaError(f"{source}: names both enum and type: {sorted(clash)}")
        by_name = {e.__name__: e for e in errors.all_vdsm_errors()}
        self.verbs: dict[str, Verb] = {}
        for name, v in doc["verbs"].items():
            self.verbs[name] = self._verb(name, v or {}, by_name)

    def _verb(self, name: str, v: dict[str, Any], known_errors: dict[str, Any]) -> Verb:
        if name.count(".") != 1:
            raise SchemaError(f"verb {name!r}: expected Namespace.method")
        unknown = set(v) - {"doc", "params", "returns", "errors", "task", "bulk"}
        if unknown:
            raise SchemaError(f"verb {name}: unknown keys {sorted(unknown)}")
        if not v.get("doc"):
            raise SchemaError(f"verb {name}: every verb needs doc text")
        params = []
        seen = set()
        for raw in v.get("params", []):
            pname = raw.get("name")
            if not pname or pname in seen:
                raise SchemaError(f"verb {name}: param without a name or duplicated: {raw}")
            seen.add(pname)
            where = f"{name}({pname})"
            try:
                coerce = compile_spec(raw, self.enums, self.types, where)
            except ValueError as e:
                raise SchemaError(str(e)) from e
            has_default = "default" in raw
            params.append(Param(
                name=pname,
                spec=dict(raw),
                coerce=coerce,
                required=not has_default,
                default=raw.get("default"),
                doc=raw.get("doc", ""),
            ))
        returns = v.get("returns") or {"type": "boolean"}
        try:
            compile_spec(returns, self.enums, self.types, f"{name} returns")
        except ValueError as e:
            raise SchemaError(str(e)) from e
        errs = []
        for ename in v.get("errors", []):
            if ename not in known_errors:
                raise SchemaError(f"verb {name}: unknown error {ename!r}")
            errs.append(known_errors[ename])
        return Verb(
            name=name,
            doc=v["doc"].strip(),
            params=tuple(params),
            returns=returns,
            errors=tuple(errs),
            task=bool(v.get("task", False)),
            bulk=bool(v.get("bulk", False)),
        )

    def check_return(self, verb: Verb, value: Any) -> list[str]:
        return check_return(value, verb.returns, self.enums, self.types)

    def namespaces(self) -> dict[str, list[Verb]]:
        out: dict[str, list[Verb]] = {}
        for verb in self.verbs.values():
            out.setdefault(verb.namespace, []).append(verb)
        return out

    def describe(self) -> dict[str, Any]:
        """The whole schema as JSON-able data (served by Host.getVerbs)."""
        return {
            "verbs": {name: v.describe() for name, v in sorted(self.verbs.items())},
            "enums": {name: e.describe() for name, e in sorted(self.enums.items())},
            "types": self.types,
        }


def load(path: Path | None = None) -> Schema:
    if path is None:
        return default_schema()
    with open(path) as f:
        return Schema(yaml.safe_load(f), str(path))


@functools.cache
def default_schema() -> Schema:
    text = resources.files("vdsmlite.rpc").joinpath("schema.yml").read_text()
    return Schema(yaml.safe_load(text), "vdsmlite/rpc/schema.yml")
