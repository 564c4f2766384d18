"""A store's entity summaries, each kept as its JSON bytes.

Why bytes and not dicts: a summary as dicts and lists is 7-8 objects the
garbage collector tracks (the entity, its disks, their volume lists, its
snapshots...), so an index of 88,000 entities held that way is ~670,000 of
them, and every full collection walks all of them in every index kept, holding
the GIL: 0.4 s per such index measured here, during which the daemon answers
nothing, checks no lease and receives no upload. A bytes object is not tracked:
the same index is a handful of tracked objects (a full collection 0.002 s), a
quarter of the memory (90 MiB against 360), and its listing splices the bytes
into the reply unparsed (`orjson.Fragment`). A summary is decoded only when one
is asked for, or when all are walked (the snapshot overview, floating disks).

Where the bytes come from: the parser processes encode each summary
(`ovf.model.compact_json`) and ship the bytes; an edit encodes its one
entity here; an index kept on disk is one summary per line, split back apart.

The VM statuses of the store's ``metadata.json`` are kept beside the
summaries and added to each one as it is read, as its last key ``"status"``
(where the listing has always had it).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import orjson

from vdsmlite.ovf.model import compact_json

_STATUS_KEY = b',"status":'


class EntitySet:
    """Entity id -> its summary (``Entity.to_dict()`` plus ``"status"``)."""

    __slots__ = ("_encoded", "_statuses")

    def __init__(self) -> None:
        # id -> the summary's JSON without "status": a JSON object, never empty (it
        # has an "id"), never a newline in it (`compact_json` escapes them)
        self._encoded: dict[str, bytes] = {}
        self._statuses: dict[str, Any] = {}

    def __len__(self) -> int:
        return len(self._encoded)

    def __contains__(self, entity_id: object) -> bool:
        return entity_id in self._encoded

    def __iter__(self) -> Iterator[str]:
        return iter(self._encoded)

    # --- filling -------------------------------------------------------------------

    def add_encoded(self, entity_id: str, encoded: bytes) -> None:
        """Take a summary as `compact_json` wrote it (in a parser process)."""
        self._encoded[entity_id] = encoded

    def add(self, summary: dict[str, Any]) -> None:
        summary = {k: v for k, v in summary.items() if k != "status"}
        # A copy: orjson's own result keeps several KiB of slack per object (700 MiB
        # for 88,000 summaries of 1 KiB, measured), fine for a moment, not to keep.
        self._encoded[summary["id"]] = bytes(memoryview(compact_json(summary)))

    def without(self, entity_id: str) -> EntitySet:
        """A copy without `entity_id` (the summaries are shared: bytes never change)."""
        other = EntitySet()
        other._encoded = {k: v for k, v in self._encoded.items() if k != entity_id}
        other._statuses = self._statuses
        return other

    def set_statuses(self, statuses: dict[str, Any]) -> None:
        self._statuses = statuses

    # --- reading -------------------------------------------------------------------

    def get(self, entity_id: str) -> dict[str, Any] | None:
        encoded = self._encoded.get(entity_id)
        if encoded is None:
            return None
        summary: dict[str, Any] = orjson.loads(encoded)
        summary["status"] = self._statuses.get(entity_id)
        return summary

    def __getitem__(self, entity_id: str) -> dict[str, Any]:
        summary = self.get(entity_id)
        if summary is None:
            raise KeyError(entity_id)
        return summary

    def summaries(self) -> Iterator[dict[str, Any]]:
        """Every summary, decoded, in id order (each a new dict: the caller's)."""
        for entity_id in sorted(self._encoded):
            summary = self.get(entity_id)
            assert summary is not None
            yield summary

    def fragments(self) -> list[orjson.Fragment]:
        """Every summary as a piece of JSON to put into a reply as it is, in id order."""
        status_json: dict[str, bytes] = {}  # statuses repeat: each encoded once
        result = []
        for entity_id in sorted(self._encoded):
            status = self._statuses.get(entity_id)
            key = repr(status)
            encoded = status_json.get(key)
            if encoded is None:
                encoded = status_json[key] = _status_json(status)
            result.append(orjson.Fragment(self._encoded[entity_id][:-1] + encoded))
        return result

    # --- kept on disk --------------------------------------------------------------

    def ids(self) -> list[str]:
        return list(self._encoded)

    def encoded(self) -> list[bytes]:
        """The summaries' JSON, in the order of `ids`."""
        return list(self._encoded.values())

    @classmethod
    def from_encoded(cls, ids: list[str], encoded: list[bytes]) -> EntitySet:
        if len(ids) != len(encoded):
            raise ValueError(f"{len(ids)} ids for {len(encoded)} summaries")
        entities = cls()
        for entity_id, summary in zip(ids, encoded, strict=True):
            if not (summary.startswith(b"{") and summary.endswith(b"}")):
                raise ValueError(f"the summary of {entity_id} is not a JSON object")
            entities._encoded[entity_id] = summary
        return entities


def _status_json(status: Any) -> bytes:
    """The tail that adds `"status": <status>` to a summary's JSON object."""
    return _STATUS_KEY + compact_json(status) + b"}"
