"""OVF_STORE volumes on a domain: finding them, judging them, choosing one (blocking).

An OVF_STORE is a single-volume image whose volume has ``DISKTYPE=OVFS`` (or,
for stores an older engine made, a description with ``"Disk Description":
"OVF_STORE"``). Its description carries the engine's JSON state::

    {"Updated":true,"Size":20480,"Last Updated":"Thu Feb 18 00:23:07 UTC 2016",
     "Storage Domains":[{"uuid":"<sd>"}],"Disk Description":"OVF_STORE"}

A store is *good* when ``Updated`` is true and ``Size`` says how many bytes of
it are the tar. Readers take the newest good store (by ``Last Updated``) and
fall back to the next; writers never write the newest one that reads, so a
torn or refused upload can never destroy the last readable copy.
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from vdsmlite.storage import constants as sc
from vdsmlite.storage.sd import CreateVolumeRequest, Domain, VolumeState

log = logging.getLogger("vdsmlite.storage.ovfstore")

DISK_DESCRIPTION = "Disk Description"
OVF_STORE = "OVF_STORE"
UPDATED = "Updated"
SIZE = "Size"
LAST_UPDATED = "Last Updated"
STORAGE_DOMAINS = "Storage Domains"
DEFAULT_STORE_SIZE = 128 * sc.MiB
STORES_PER_DOMAIN = 2

_MONTHS = {m: i for i, m in enumerate(
    ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"], 1)}
_JAVA_DATE = re.compile(
    r"^\w{3} (\w{3}) +(\d{1,2}) (\d{2}):(\d{2}):(\d{2}) (\S+) (\d{4})$")


def java_date(when: float | None = None) -> str:
    """java.util.Date.toString() in UTC, the format the engine writes and parses."""
    t = datetime.fromtimestamp(time.time() if when is None else when, UTC)
    return t.strftime("%a %b %d %H:%M:%S UTC %Y")


def next_stamp(stores: list[Store], now: float | None = None) -> str:
    """A Last Updated later than every store's, good or not.

    The format has one-second resolution; two writes in the same second would
    tie and a reader could take the older store as the newer. So the stamp is a
    logical clock: now, or one second after the newest stamp seen if that is
    not earlier. The store being written counts too: the same bytes written
    again into it within a second must still make a new (volume, Last Updated,
    Size), which is what an index is kept by.
    """
    when = time.time() if now is None else now
    for store in stores:
        seen = parse_java_date(store.last_updated)
        if seen is not None:
            when = max(when, seen.timestamp() + 1)
    return java_date(when)


def parse_java_date(text: Any) -> datetime | None:
    """Lenient parse; time zone abbreviations are ambiguous (IST...) and taken as UTC."""
    if not isinstance(text, str):
        return None
    m = _JAVA_DATE.match(text.strip())
    if not m or m.group(1) not in _MONTHS:
        return None
    try:
        return datetime(int(m.group(7)), _MONTHS[m.group(1)], int(m.group(2)),
                        int(m.group(3)), int(m.group(4)), int(m.group(5)), tzinfo=UTC)
    except ValueError:
        return None


def description(sd_uuid: str, *, updated: bool, size: int | None = None,
                last_updated: str | None = None) -> str:
    """The store's description JSON (compact, the engine's keys; within 210 bytes)."""
    d: dict[str, Any] = {UPDATED: updated}
    if size is not None:
        d[SIZE] = size
    if last_updated is not None:
        d[LAST_UPDATED] = last_updated
    d[STORAGE_DOMAINS] = [{"uuid": sd_uuid}]
    d[DISK_DESCRIPTION] = OVF_STORE
    text = json.dumps(d, separators=(",", ":"))
    assert len(text.encode()) <= sc.DESCRIPTION_SIZE, text
    return text


def parse_description(text: str) -> dict[str, Any] | None:
    text = text.strip()
    if not (text.startswith("{") and text.endswith("}")):
        return None
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


@dataclass(frozen=True)
class Store:
    img: str
    vol: str
    capacity: int
    description: dict[str, Any]
    # The volume as `find_stores` read it: a writer holding the domain's upload lock
    # and SDM lease updates its description through it, without reading it again.
    state: VolumeState | None = field(default=None, compare=False, hash=False, repr=False)

    @property
    def updated(self) -> bool:
        return self.description.get(UPDATED) is True

    @property
    def size(self) -> int | None:
        size = self.description.get(SIZE)
        return size if isinstance(size, int) and not isinstance(size, bool) and size > 0 \
            else None

    @property
    def last_updated(self) -> str | None:
        value = self.description.get(LAST_UPDATED)
        return value if isinstance(value, str) else None

    @property
    def good(self) -> bool:
        return self.updated and self.size is not None and self.size <= self.capacity

    def sort_key(self) -> tuple[int, datetime]:
        when = parse_java_date(self.last_updated) or datetime.min.replace(tzinfo=UTC)
        return (1 if self.good else 0, when)

    def info(self) -> dict[str, Any]:
        return {"imageID": self.img, "volumeID": self.vol, "capacity": self.capacity,
                "updated": self.updated, "size": self.size, "lastUpdated": self.last_updated}


def is_store(state: VolumeState) -> bool:
    if state.md is None:
        return False
    if state.md.disktype == "OVFS":
        return True
    desc = parse_description(state.md.description)
    return desc is not None and desc.get(DISK_DESCRIPTION) == OVF_STORE


def find_stores(dom: Domain,
                scanned: dict[str, dict[str, VolumeState]] | None = None) -> list[Store]:
    """Every OVF_STORE of the domain (single-volume images only, as the engine requires),
    from `scanned` (Domain.scan) or one fresh scan of the domain."""
    stores = []
    if scanned is None:
        scanned = dom.scan()
    for img, volumes in sorted(scanned.items()):
        if len(volumes) != 1:
            continue
        state = next(iter(volumes.values()))
        if not is_store(state) or state.md is None or state.legality != sc.LEGAL:
            continue
        desc = parse_description(state.md.description) or {}
        stores.append(Store(img, state.uuid, state.md.capacity, desc, state))
    return stores


def by_preference(stores: list[Store]) -> list[Store]:
    """Readers' order: good stores newest first, then the rest."""
    return sorted(stores, key=lambda s: s.sort_key(), reverse=True)


def pick_target(stores: list[Store], keep: Store | None) -> Store:
    """Writers' choice: never `keep` (the newest store that reads, found by the
    caller) or, if nothing is known to read, never the newest good store; of the
    rest, not-good ones first, then the oldest. A newest good store that does not
    read is overwritten before an older one that does."""
    if keep is None:
        newest = by_preference(stores)
        keep = newest[0] if newest and newest[0].good else None
    candidates = [s for s in stores if s != keep]
    if not candidates:
        raise ValueError("no OVF_STORE may be written without risking the last good one")
    newer_than_keep = [] if keep is None else [
        s for s in candidates if s.good and s.sort_key() > keep.sort_key()]
    return min(candidates, key=lambda s: (s not in newer_than_keep, s.sort_key()))


def create_store(dom: Domain, size: int = DEFAULT_STORE_SIZE) -> Store:
    """One more OVF_STORE volume, as the engine creates them (RAW, DISKTYPE=OVFS)."""
    block = dom.read_storage_type().is_block
    img, vol = str(uuid.uuid4()), str(uuid.uuid4())
    req = CreateVolumeRequest(
        img_uuid=img, vol_uuid=vol, capacity=size, format=sc.VolumeFormat.RAW,
        prealloc=sc.Allocation.PREALLOCATED if block else sc.Allocation.SPARSE,
        disktype="OVFS",
        description=json.dumps({"DiskAlias": OVF_STORE, "DiskDescription": OVF_STORE},
                               separators=(",", ":")),
        parent_img=sc.BLANK_UUID, parent_vol=sc.BLANK_UUID, initial_size=None, legal=True,
        sequence=0)
    dom.create_volume(req, lambda _: None)
    log.info("created OVF_STORE volume %s/%s on %s", img, vol, dom.uuid)
    state = dom.volume(img, vol)
    assert state.md is not None
    return Store(img, vol, state.md.capacity, parse_description(state.md.description) or {})


def ensure_stores(dom: Domain, count: int = STORES_PER_DOMAIN) -> list[Store]:
    """At least `count` stores, creating what is missing (one store alone would have
    to be overwritten in place, risking the only good copy)."""
    stores = find_stores(dom)
    while len(stores) < count:
        stores.append(create_store(dom))
    return stores
