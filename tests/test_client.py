"""vdsmlite.client's reply decoding: large replies decoded with the collector paused."""

from __future__ import annotations

import gc
import json
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from vdsmlite.client import LARGE_REPLY, decode_reply


def listing_reply(entities: int) -> bytes:
    """A getOVFEntities-like reply: many small dicts, lists and strings."""
    items = [{"id": str(uuid.uuid4()), "name": f"vm-{i}", "memory": 4096,
              "disks": [{"imageId": str(uuid.uuid4()), "size": 1 << 40,
                         "volumeIds": [str(uuid.uuid4()) for _ in range(2)]}]}
             for i in range(entities)]
    return json.dumps({"jsonrpc": "2.0", "id": 1,
                       "result": {"entities": items, "invalidEntities": []}}).encode()


@pytest.fixture
def collections() -> Iterator[list[int]]:
    """The generation of every cyclic collection that starts while the test runs."""
    seen: list[int] = []

    def on_gc(phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            seen.append(info["generation"])

    gc.callbacks.append(on_gc)
    try:
        yield seen
    finally:
        gc.callbacks.remove(on_gc)


def test_a_large_reply_is_decoded_without_a_collection(collections: list[int]) -> None:
    body = listing_reply(5000)
    assert len(body) > LARGE_REPLY
    # The same decoding without the pause collects (so the check below can fail).
    assert json.loads(body) == decode_reply(body)
    assert collections, "json.loads of this reply ran no collection: the check is void"
    collections.clear()
    decode_reply(body)
    assert collections == []
    assert gc.isenabled()


def test_a_small_reply_leaves_the_collector_alone() -> None:
    assert decode_reply(b'{"result": [1, 2]}') == {"result": [1, 2]}
    assert gc.isenabled()


def test_a_bad_large_reply_raises_and_the_collector_runs_again() -> None:
    body = listing_reply(5000)[:-1]
    with pytest.raises(ValueError):
        decode_reply(body)
    assert gc.isenabled()


def test_a_collector_the_application_disabled_stays_disabled() -> None:
    gc.disable()
    try:
        decode_reply(listing_reply(5000))
        assert not gc.isenabled()
    finally:
        gc.enable()


@pytest.mark.parametrize("text", [
    b"[18446744073709551616, -9223372036854775809]",  # beyond 64 bits: still integers
    b"[NaN, Infinity, 1e400]",
    b'{"a": 1, "a": 2}',
])
def test_decoding_is_the_standard_librarys(text: bytes) -> None:
    padded = b'{"pad": "' + b"x" * LARGE_REPLY + b'", "value": ' + text + b"}"
    got = decode_reply(padded)["value"]
    want = json.loads(text)
    assert repr(got) == repr(want)  # types too: 18446744073709551616, not 1.8e+19
