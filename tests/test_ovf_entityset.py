"""An index's entity summaries kept as JSON bytes (sdm.entityset), in memory and on disk."""

from __future__ import annotations

import gc
import json
import uuid
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.ovf_helpers import entity_ovf
from vdsmlite.ovf.model import compact_json
from vdsmlite.ovf.reader import parse
from vdsmlite.sdm.entityset import EntitySet
from vdsmlite.sdm.ovfindex import OvfIndex, StoreContents, store_key
from vdsmlite.storage.ovfstore import Store

pytestmark = pytest.mark.unit


def summary(name: str) -> dict[str, Any]:
    """A real summary: an engine-style OVF through the reader, with a fresh id."""
    _, doc = entity_ovf(name)
    return parse(doc).to_dict()


def filled(*summaries: dict[str, Any]) -> EntitySet:
    entities = EntitySet()
    for s in summaries:  # as a parser process ships them
        entities.add_encoded(s["id"], compact_json(s))
    return entities


def test_summaries_read_back_whole_with_their_status() -> None:
    vm, other = summary("vm"), summary("other")
    entities = filled(vm, other)
    entities.set_statuses({vm["id"]: 1})
    assert len(entities) == 2 and vm["id"] in entities and "nope" not in entities
    assert entities[vm["id"]] == {**vm, "status": 1}
    assert entities.get(other["id"]) == {**other, "status": None}
    assert entities.get(str(uuid.uuid4())) is None
    assert list(entities.summaries()) == sorted(
        [{**vm, "status": 1}, {**other, "status": None}], key=lambda e: e["id"])
    # The listing's pieces: each summary's JSON as it is, "status" added last.
    listed = orjson.loads(orjson.dumps(entities.fragments()))
    assert listed == list(entities.summaries())
    assert [list(e)[-1] for e in listed] == ["status", "status"]


def test_an_odd_status_or_size_is_still_valid_json() -> None:
    # metadata.json and the OVFs are other people's data: an integer beyond 64 bits
    # (orjson refuses them) is kept all the same.
    vm = summary("vm")
    vm["disks"] = [{"imageId": None, "size": 1 << 70}]
    entities = filled(vm)
    entities.set_statuses({vm["id"]: {"odd": [1 << 65, "é"]}})
    listed = json.loads(orjson.dumps(entities.fragments()))
    assert listed[0]["disks"][0]["size"] == 1 << 70
    assert listed[0]["status"] == {"odd": [1 << 65, "é"]}
    assert entities[vm["id"]]["disks"][0]["size"] == 1 << 70


def test_an_edit_copies_the_set_and_leaves_the_original() -> None:
    vm, other = summary("vm"), summary("other")
    entities = filled(vm, other)
    edited = entities.without(vm["id"])
    edited.add({**other, "name": "renamed", "status": "ignored"})
    assert vm["id"] in entities and vm["id"] not in edited
    assert entities[other["id"]]["name"] == "other"
    assert edited[other["id"]]["name"] == "renamed"
    assert edited[other["id"]]["status"] is None  # statuses come from metadata.json only


def test_a_large_index_adds_no_objects_for_the_collector_to_walk() -> None:
    # Why summaries are kept as bytes: as dicts, 10,000 of them were ~75,000 tracked
    # objects, each walked by every full collection while the daemon stood still.
    template = summary("vm")
    encoded = []
    for _ in range(10_000):
        one = dict(template, id=str(uuid.uuid4()))
        encoded.append((one["id"], compact_json(one)))
    gc.collect()
    before = len(gc.get_objects())
    entities = EntitySet()
    for entity_id, data in encoded:
        entities.add_encoded(entity_id, data)
    gc.collect()
    assert len(gc.get_objects()) - before < 10
    assert len(entities) == 10_000


# --- kept on disk (OvfIndex._save/_load) ---------------------------------------------


def kept_index(tmp_path: Path) -> OvfIndex:
    # Only the state directory is used by saving and loading.
    return OvfIndex(workers=None, jobs=None, run_blocking=None,  # type: ignore[arg-type]
                    state_dir=tmp_path, publish=None)  # type: ignore[arg-type]


def saved(tmp_path: Path) -> tuple[OvfIndex, Store, StoreContents]:
    store = Store(str(uuid.uuid4()), str(uuid.uuid4()), 1 << 20,
                  {"Updated": True, "Size": 10240,
                   "Last Updated": "Thu Feb 18 00:23:07 UTC 2016"})
    vm, other = summary("vm"), summary("other")
    contents = StoreContents(store, digest="1234", entities=filled(vm, other),
                             invalid={str(uuid.uuid4()): "not well-formed"})
    contents.members = {vm["id"]: (512, 100), other["id"]: (1536, 200)}
    contents.set_statuses({"VM Status": {vm["id"].upper(): 2}})
    index = kept_index(tmp_path)
    sd = str(uuid.uuid4())
    index._save(store_key(sd, store), contents)
    return index, store, contents


def test_an_index_kept_on_disk_loads_as_it_was(tmp_path: Path) -> None:
    index, store, contents = saved(tmp_path)
    [path] = (tmp_path / "ovf-index").iterdir()
    key = store_key(path.name.split(".")[0], store)
    loaded = index._load(key, store)
    assert loaded is not None
    assert list(loaded.entities.summaries()) == list(contents.entities.summaries())
    assert loaded.invalid == contents.invalid and loaded.members == contents.members
    assert loaded.statuses == contents.statuses and loaded.digest == "1234"
    # Another version of the store (its Last Updated) has no kept index.
    assert index._load((*key[:4], "Fri Feb 19 00:23:07 UTC 2016"), store) is None


def test_an_empty_index_is_kept_too(tmp_path: Path) -> None:
    store = Store(str(uuid.uuid4()), str(uuid.uuid4()), 1 << 20,
                  {"Updated": True, "Size": 10240, "Last Updated": "now"})
    index = kept_index(tmp_path)
    key = store_key(str(uuid.uuid4()), store)
    index._save(key, StoreContents(store, digest="7"))
    loaded = index._load(key, store)
    assert loaded is not None and len(loaded.entities) == 0


@pytest.mark.parametrize("damage", ["a summary's bytes", "a summary line lost",
                                    "the header cut"])
def test_a_damaged_kept_index_is_ignored_not_served(tmp_path: Path, damage: str) -> None:
    # The summaries are put into replies unparsed: lines that are not the ones written
    # must not reach a client as broken JSON. The index is then built again.
    index, store, _ = saved(tmp_path)
    [path] = (tmp_path / "ovf-index").iterdir()
    data = path.read_bytes()
    if damage == "a summary's bytes":
        data = data.replace(b'"name":"vm"', b'"name":"v\x00')
    elif damage == "a summary line lost":
        data = data[:data.rindex(b"\n")]
    else:
        data = data[:40]
    path.write_bytes(data)
    assert index._load(store_key(path.name.split(".")[0], store), store) is None


def test_an_index_kept_by_the_previous_format_is_rebuilt_not_misread(tmp_path: Path) -> None:
    # Format 1 (before summaries were kept as bytes): the whole index as one JSON
    # object, its summaries inside as objects, a crc32 of the store.
    index, store, contents = saved(tmp_path)
    [path] = (tmp_path / "ovf-index").iterdir()
    key = store_key(path.name.split(".")[0], store)
    path.write_bytes(orjson.dumps({
        "format": 1, "key": list(key), "crc32": 1234, "info": None, "statuses": {},
        "entities": list(contents.entities.summaries()), "invalid": {}, "members": {}}))
    assert index._load(key, store) is None
