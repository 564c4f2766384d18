"""getOVFEntities answers from a listing encoded once per index (api.ovf.OvfApi)."""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest

from vdsmlite.api.ovf import OvfApi
from vdsmlite.sdm.ovfindex import StoreContents
from vdsmlite.storage.ovfstore import Store

pytestmark = pytest.mark.unit


def contents(*names: str) -> StoreContents:
    store = Store(str(uuid.uuid4()), str(uuid.uuid4()), 1 << 20,
                  {"Updated": True, "Size": 10240, "Last Updated": "Thu Feb 18 00:23:07 UTC 2016"})
    index = StoreContents(store)
    for name in names:
        entity_id = str(uuid.uuid4())
        index.entities[entity_id] = {"id": entity_id, "name": name}
    index.invalid["0f0e7f63-5e67-4b1c-9d8f-2e1d1a1c6b01"] = "not well-formed"
    return index


def decoded(api: OvfApi, sd: str, index: StoreContents) -> Any:
    return json.loads(api._listing(sd, index).json)


def test_one_index_is_encoded_once_and_a_new_index_anew() -> None:
    api = OvfApi(None)  # type: ignore[arg-type]  # _listing needs no service
    first = contents("b", "a")
    encoded = api._listing("sd", first)
    assert api._listing("sd", first) is encoded
    listing = json.loads(encoded.json)
    assert [e["id"] for e in listing["entities"]] == sorted(first.entities)
    assert listing["invalidEntities"] == [{"id": "0f0e7f63-5e67-4b1c-9d8f-2e1d1a1c6b01",
                                           "error": "not well-formed"}]
    assert listing["store"]["volumeID"] == first.store.vol
    # An upload or an edit makes a new index: the listing follows it at once.
    second = contents("c")
    assert [e["name"] for e in decoded(api, "sd", second)["entities"]] == ["c"]
    assert api._listing("sd", second) is not encoded


def test_listings_kept_are_bounded_oldest_first() -> None:
    api = OvfApi(None)  # type: ignore[arg-type]
    indexes = {f"sd{i}": contents(f"vm{i}") for i in range(OvfApi.LISTINGS_KEPT + 1)}
    kept = {sd: api._listing(sd, index) for sd, index in indexes.items()}
    assert list(api._listings) == list(indexes)[1:]  # the first listed went first
    assert api._listing("sd0", indexes["sd0"]) is not kept["sd0"]
    assert api._listing(f"sd{OvfApi.LISTINGS_KEPT}",
                        indexes[f"sd{OvfApi.LISTINGS_KEPT}"]) is kept[f"sd{OvfApi.LISTINGS_KEPT}"]
