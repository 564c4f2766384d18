"""getOVFEntities answers from a listing encoded once per index (api.ovf.OvfApi)."""

from __future__ import annotations

import gc
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
        index.entities.add({"id": entity_id, "name": name})
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


def test_listings_kept_are_bounded_in_bytes_oldest_first() -> None:
    api = OvfApi(None)  # type: ignore[arg-type]
    indexes = {f"sd{i}": contents(f"vm{i}") for i in range(4)}
    size = len(api._listing("probe", contents("vm0")).json)
    api._listings.clear()
    api.LISTINGS_BYTES = 3 * size + size // 2  # room for three of them
    kept = {sd: api._listing(sd, index) for sd, index in indexes.items()}
    assert list(api._listings) == ["sd1", "sd2", "sd3"]  # the first listed went first
    assert api._listing("sd3", indexes["sd3"]) is kept["sd3"]
    assert api._listing("sd0", indexes["sd0"]) is not kept["sd0"]
    # One larger than the whole budget is answered, not kept.
    api.LISTINGS_BYTES = size // 2
    big = contents("big")
    assert json.loads(api._listing("sd0", big).json)["entities"][0]["name"] == "big"
    assert not api._listings


def test_a_listing_goes_with_its_index() -> None:
    # The index cache (OvfIndex) letting an index go frees its listing too.
    api = OvfApi(None)  # type: ignore[arg-type]
    index = contents("vm")
    api._listing("sd", index)
    other = contents("other")
    api._listing("sd-other", other)
    del index
    gc.collect()
    api._listing("sd-other", other)  # any later listing trims what is gone
    assert list(api._listings) == ["sd-other"]
