"""The VDSM error catalog: VDSM's message format, and no dead classes."""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import pytest

from vdsmlite import errors
from vdsmlite.rpc import errors as rpc_errors

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parent.parent
CATALOG = ROOT / "vdsmlite" / "errors.py"


def test_message_format_is_vdsms() -> None:
    e = errors.StorageDomainDoesNotExist("c2a6d7c8-8d81-4e01-9ed4-7eb670713448")
    assert e.to_json() == {
        "code": 358,
        "message": "Storage domain does not exist: ('c2a6d7c8-8d81-4e01-9ed4-7eb670713448',)"}
    assert str(errors.ImageDoesNotExistInSD("i", "d")) == \
        "Image does not exist in domain: 'image=i, domain=d'"
    assert str(errors.StorageServerAccessPermissionError("/x")) == (
        f"{errors.StorageServerAccessPermissionError.msg}: 'path = /x'")


def test_typed_errors_survive_pickling() -> None:
    """Typed constructors pass their arguments on unchanged: pickling still rebuilds them."""
    for e in (errors.AcquireLockFailure("SDM", -1, "", "gone"),
              errors.StoragePoolMasterNotFound("sp", None),
              errors.InvalidParameterException("size", 7)):
        again = pickle.loads(pickle.dumps(e))
        assert type(again) is type(e) and again.to_json() == e.to_json()


def test_codes_stay_below_the_engines_range() -> None:
    assert all(cls.code <= 5000 for cls in errors.all_vdsm_errors())


def test_protocol_errors_live_with_the_rpc_layer() -> None:
    assert not any(name.startswith("JsonRpc") for name in vars(errors))
    assert rpc_errors.JsonRpcInvalidParams("p", "bad").to_json() == {
        "code": -32602, "message": "Invalid params: p: bad",
        "data": {"param": "p", "reason": "bad"}}


def test_every_error_is_raised_somewhere_or_reserved() -> None:
    """A class nothing names outside the catalog must say what it is kept for."""
    sources = [p for p in (ROOT / "vdsmlite").rglob("*.py") if p != CATALOG]
    sources.append(ROOT / "vdsmlite" / "rpc" / "schema.yml")
    named = set(re.findall(r"\w+", "\n".join(p.read_text() for p in sources)))
    dead = [cls.__name__ for cls in errors.all_vdsm_errors()
            if cls.__name__ not in named
            and not cls.__subclasses__()
            and not (cls.__doc__ or "").startswith("Reserved for ")]
    assert dead == []
