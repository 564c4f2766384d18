"""The entity index of OVF_STOREs: built after the commit, kept across restarts.

What `getOVFEntities`, `getOVFEntity`, `getUnregisteredDisks` and the snapshot
overview need of a store is its *index*: every entity's summary, every
``.ovf`` that does not parse with the reason, ``info.json`` and the VM
statuses of ``metadata.json``. Uploads do not build it - they only check the
archive's framing, at disk speed - so it is built once the store is committed:

* the archive is cut at member boundaries (`ArchiveSummary.splits`, known from
  the upload's scan, or from a scan of the volume for a store this host did not
  write) and each range goes to a parser process, which reads its bytes from
  the volume itself: no document is copied between processes;
* the index is keyed by the store's identity - (domain, volume, ``Last
  Updated``, ``Size``) - and written under the state directory, so it is
  rebuilt only when the store changes, not after an agent restart;
* a build is a job (``Host.getJobs`` shows its bytes done); a reader that asks
  while one runs waits for it and never sees half an index; the end is
  published as ``|ovfstore|indexed|<sdUUID>`` with how many entities were
  indexed and which ``.ovf`` members failed.

A store whose framing does not validate, or that cannot be read, is
*unreadable*: remembered as such, so readers fall back to the next store and
writers overwrite it rather than the store that still reads.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import xxhash

from vdsmlite import errors, fsutil
from vdsmlite.blocking import RunBlocking
from vdsmlite.ids import parse_uuid
from vdsmlite.jobs import Job, JobRegistry
from vdsmlite.ovf import tarstream
from vdsmlite.ovf.model import OvfError, compact_json
from vdsmlite.ovf.workers import IndexedMember, OvfWorkers
from vdsmlite.sdm.entityset import EntitySet
from vdsmlite.storage import ovfstore, streamio, volumestream
from vdsmlite.storage.sd import Domain, OpenVolume

log = logging.getLogger("vdsmlite.sdm.ovfindex")

INDEXED_EVENT = "|ovfstore|indexed|"
# 2: one summary per line after the record, XXH3 digests (1: the summaries inside it,
# as dicts; crc32)
FORMAT = 2
# Failures named in the event and the upload reply; the listing has all of them.
FAILURES_NAMED = 100

# (domain, image, volume, Size, Last Updated): a store's identity. A new commit
# changes Last Updated, so an index is never taken for another version of a store.
StoreKey = tuple[str, str, str, int | None, str | None]

Publish = Callable[[str, dict[str, Any]], None]


def store_key(sd_uuid: str, store: ovfstore.Store) -> StoreKey:
    return (sd_uuid, store.img, store.vol, store.size, store.last_updated)


@dataclass
class StoreContents:
    """A store's index."""

    store: ovfstore.Store
    # of the archive's bytes (ArchiveSummary.digest, computed as the store was written
    # or scanned): an index kept on disk is checked against the store with it
    digest: str | None = None
    entities: EntitySet = field(default_factory=EntitySet)
    statuses: dict[str, Any] = field(default_factory=dict)
    # <uuid>.ovf members that are not a readable OVF: id -> why
    invalid: dict[str, str] = field(default_factory=dict)
    # <uuid>.ovf members: id -> (offset of the member's header, size), so one can be
    # read without the rest (an id missing: read by scanning the store)
    members: dict[str, tuple[int, int]] = field(default_factory=dict)
    info: Any = None
    # Every UUID written anywhere in the invalid OVFs' text (lower case); read from the
    # store the first time floating disks are asked for (None: not read yet)
    invalid_mentions: frozenset[str] | None = None

    def describe(self) -> dict[str, Any]:
        return {"imageID": self.store.img, "volumeID": self.store.vol,
                "size": self.store.size, "lastUpdated": self.store.last_updated}

    def report(self) -> dict[str, Any]:
        """How the index went: the upload reply's and the event's words."""
        return {"entities": len(self.entities), "failedCount": len(self.invalid),
                "failed": [{"id": entity_id, "error": why} for entity_id, why
                           in sorted(self.invalid.items())[:FAILURES_NAMED]]}

    def edited(self, store: ovfstore.Store, summary: tarstream.ArchiveSummary,
               entity_id: str, entity: dict[str, Any] | None,
               members: dict[str, tuple[int, int]]) -> StoreContents:
        """The index of `store`, written as this one's store with one entity replaced
        (or removed: `entity` None) - `summary` is its scan, `members` where the
        writer put each ``.ovf``."""
        contents = StoreContents(store, info=summary.info, digest=summary.digest,
                                 members=members)
        contents.entities = self.entities.without(entity_id)
        contents.invalid = {k: v for k, v in self.invalid.items() if k != entity_id}
        if entity is not None:
            contents.entities.add(entity)
        contents.set_statuses(summary.metadata)
        return contents

    def set_statuses(self, metadata: Any) -> None:
        if isinstance(metadata, dict):
            statuses = metadata.get("VM Status")
            if isinstance(statuses, dict):
                self.statuses = {str(k).lower(): v for k, v in statuses.items()}
        self.entities.set_statuses(self.statuses)


class UnreadableStore(Exception):
    """The store's archive does not validate or cannot be read."""


class OvfIndex:
    CACHE_ENTRIES = 16
    RANGES_QUEUED = 2  # byte ranges given to each parser process ahead of its results

    def __init__(self, *, workers: OvfWorkers, jobs: JobRegistry, run_blocking: RunBlocking,
                 state_dir: Path, publish: Publish) -> None:
        self._workers = workers
        self._jobs = jobs
        self._run_blocking = run_blocking
        self._dir = state_dir / "ovf-index"
        self._publish = publish
        self._memory: OrderedDict[StoreKey, StoreContents] = OrderedDict()
        self._building: dict[StoreKey, asyncio.Future[StoreContents]] = {}
        self._unreadable: dict[StoreKey, str] = {}
        self._tasks: set[asyncio.Future[Any]] = set()

    # --- asking ------------------------------------------------------------------------

    async def get(self, dom: Domain, store: ovfstore.Store) -> StoreContents:
        """The store's index: from memory, from a build under way, from disk, or built
        now. UnreadableStore if the store does not validate."""
        key = store_key(dom.uuid, store)
        why = self._unreadable.get(key)
        if why is not None:
            raise UnreadableStore(why)
        cached = self._memory.get(key)
        if cached is not None:
            self._memory.move_to_end(key)
            return cached
        building = self._building.get(key)
        if building is None:
            kept = await self._run_blocking(self._load, key, store)
            # Another reader may have built it or started to meanwhile: one build each.
            if key in self._memory:
                return self._memory[key]
            building = self._building.get(key) or self._start(dom, store, None, kept)
        # Shielded: a reader that goes away must not stop the build others wait for.
        return await asyncio.shield(building)

    def known_readable(self, sd_uuid: str, store: ovfstore.Store) -> bool | None:
        """True if the store validated (an index exists or is being built from a
        validated scan), False if it did not, None if nobody looked yet."""
        key = store_key(sd_uuid, store)
        if key in self._unreadable:
            return False
        if key in self._memory or key in self._building:
            return True
        return None

    # --- after a commit ------------------------------------------------------------------

    def after_commit(self, dom: Domain, store: ovfstore.Store,
                     summary: tarstream.ArchiveSummary,
                     held: volumestream.Held | None = None) -> None:
        """Index a store just written and validated (`summary` from its scan); `held`:
        its volume, prepared by the writer for the index (released when it is built,
        or fails)."""
        self._start(dom, store, summary, held=held)

    def put(self, dom: Domain, contents: StoreContents) -> None:
        """Take the index of a store made here without parsing it (an edit's: see
        `StoreContents.edited`); kept on disk in the background."""
        key = store_key(dom.uuid, contents.store)
        self._remember(key, contents)
        self._background(self._run_blocking(self._save, key, contents))

    async def forget_domain(self, sd_uuid: str) -> None:
        """Drop what is kept of a domain that no longer exists (formatted): its
        indexes in memory and on disk."""
        for key in [k for k in self._memory if k[0] == sd_uuid]:
            del self._memory[key]
        for key in [k for k in self._unreadable if k[0] == sd_uuid]:
            del self._unreadable[key]
        if parse_uuid(sd_uuid) == sd_uuid:  # it becomes a file name
            await self._run_blocking(self._remove_kept, sd_uuid)

    def _remove_kept(self, sd_uuid: str) -> None:
        for path in self._dir.glob(f"{sd_uuid}.*.json"):
            try:
                path.unlink()
            except OSError as e:
                log.warning("cannot remove the kept index %s: %s", path, e)

    async def close(self) -> None:
        """Wait for what is left in the background (saving an index, the end of a
        build whose job is over): the index on disk is written whole or not at all."""
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    def _background(self, awaitable: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(awaitable)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # --- building ------------------------------------------------------------------------

    def _start(self, dom: Domain, store: ovfstore.Store,
               summary: tarstream.ArchiveSummary | None,
               kept: StoreContents | None = None, *,
               held: volumestream.Held | None = None) -> asyncio.Future[StoreContents]:
        key = store_key(dom.uuid, store)
        result: asyncio.Future[StoreContents] = asyncio.get_running_loop().create_future()
        self._building[key] = result

        built: list[StoreContents] = []

        async def body(job: Job) -> dict[str, Any]:
            try:
                async with self._opened(dom, store, held) as volume:
                    contents, fresh = await self._build(dom, store, summary, kept, job,
                                                        volume=volume)
                    built.append(contents)
                    result.set_result(contents)  # readers need not wait for the disk
                if fresh:
                    # Kept on disk within the job: when the job ends, the daemon's work
                    # for this store has ended too.
                    await self._run_blocking(self._save, key, contents)
            except (tarstream.TarError, OvfError) as e:
                # What a store that does not read looks like: a failed job, not a crash.
                raise errors.InvalidOvfStore(f"OVF_STORE {store.vol}: {e}") from e
            except OSError as e:
                # The volume went away (deleted, its domain deactivated) or I/O failed.
                raise errors.GeneralException(f"cannot read OVF_STORE {store.vol}: {e}") \
                    from e
            return built[0].report()

        job = self._jobs.launch(body, description=f"index OVF_STORE {store.vol} of {dom.uuid}",
                               verb="StorageDomain.getOVFEntities")

        async def finish() -> None:
            await job.wait()
            if held is not None:
                await held.release(self._run_blocking)  # if the job never ran
            self._building.pop(key, None)
            if job.error is None or result.done():
                return  # built (a failure to keep it on disk is only logged)
            error = job.error
            if isinstance(error, errors.InvalidOvfStore):
                self._unreadable[key] = error.message
                result.set_exception(UnreadableStore(error.message))
            elif isinstance(error, errors.VdsmError):
                # Not known to be the store's fault (the volume could not be prepared,
                # an I/O error): unreadable now, asked again next time.
                result.set_exception(UnreadableStore(error.message))
            else:
                result.set_exception(error)
            result.exception()  # retrieved: nobody may be waiting

        self._background(finish())
        return result

    async def _build(self, dom: Domain, store: ovfstore.Store,
                     summary: tarstream.ArchiveSummary | None, kept: StoreContents | None,
                     job: Job, *, volume: OpenVolume) -> tuple[StoreContents, bool]:
        """Index the store (`summary`: its scan, if it was just written here; `kept`:
        its index as kept on disk, believed only if the store's bytes are still the
        ones indexed); (the index, whether it is new: not yet kept on disk)."""
        assert store.size is not None
        started = time.monotonic()
        # bytes_done: the store's bytes read once (a scan and the parsers each count
        # for half when both read it).
        scanned = summary is None
        if summary is None:
            summary = await self._run_blocking(self._scan, volume, store.size, job)
        if kept is not None and kept.digest == summary.digest:
            self._remember(store_key(dom.uuid, store), kept)
            log.info("OVF_STORE %s/%s of %s: kept index of %d entities checked in "
                     "%.2fs", store.img, store.vol, dom.uuid, len(kept.entities),
                     time.monotonic() - started)
            return kept, False
        if kept is not None:
            log.warning("OVF_STORE %s/%s of %s changed since it was indexed (same "
                        "Last Updated and Size, other bytes); indexing it again",
                        store.img, store.vol, dom.uuid)
        contents = StoreContents(store, info=summary.info, digest=summary.digest)
        ranges = itertools.pairwise([*summary.splits, summary.members_end])
        # A few ranges queued per parser, not all of them (512 for 1 GiB) at once: the
        # event loop submits each as one finishes instead of all in one step, and the
        # results are filed as they come rather than held until their turn.
        in_flight: collections.deque[tuple[int, asyncio.Future[list[IndexedMember]]]] = \
            collections.deque()

        def submit_next() -> None:
            for start, end in itertools.islice(ranges, 1):
                in_flight.append((end, asyncio.wrap_future(self._workers.index(
                    str(volume.path), start, end, volume.block_size))))

        for _ in range(self.RANGES_QUEUED * self._workers.processes):
            submit_next()
        try:
            while in_flight:
                end, future = in_flight[0]
                members = await future
                in_flight.popleft()
                submit_next()
                _file(contents, members)
                job.update(bytes_done=(store.size + end) // 2 if scanned else end)
        finally:
            for _, future in in_flight:
                future.cancel()
        contents.set_statuses(summary.metadata)
        key = store_key(dom.uuid, store)
        self._remember(key, contents)
        elapsed = time.monotonic() - started
        log.info("OVF_STORE %s/%s of %s indexed: %d entities, %d failed, in %.2fs",
                 store.img, store.vol, dom.uuid, len(contents.entities), len(contents.invalid),
                 elapsed)
        if contents.invalid:
            log.warning("OVF_STORE %s/%s: %d OVFs cannot be read, e.g. %s", store.img,
                        store.vol, len(contents.invalid), next(iter(contents.invalid.items())))
        self._publish(f"{INDEXED_EVENT}{dom.uuid}", {
            "storagedomainID": dom.uuid, **contents.describe(), **contents.report(),
            "seconds": round(elapsed, 3)})
        return contents, True

    @contextlib.asynccontextmanager
    async def _opened(self, dom: Domain, store: ovfstore.Store,
                      held: volumestream.Held | None) -> AsyncIterator[OpenVolume]:
        """The store's volume for the build: the one its writer held for it, or
        prepared here."""
        if held is None:
            async with volumestream.opened(dom, store.img, store.vol,
                                           self._run_blocking) as volume:
                yield volume
            return
        try:
            yield held.volume
        finally:
            await held.release(self._run_blocking)

    @staticmethod
    def _scan(volume: OpenVolume, size: int, job: Job) -> tarstream.ArchiveSummary:
        """Validate a store this host did not write (framing and DTD scan, as an
        upload is checked), finding where to split it."""
        validator = tarstream.TarValidator(size, digest=True)
        done = 0
        for chunk in streamio.read_chunks(str(volume.path), size, volume.block_size):
            validator.feed(chunk)
            done += len(chunk)
            job.update(bytes_done=done // 2)  # half the work: the parsers do the rest
        return validator.finish()

    def _remember(self, key: StoreKey, contents: StoreContents) -> None:
        # Readers want a domain's newest store; an older one only if the newest stops
        # reading, and then its kept index loads from disk. So older stores' indexes
        # (and earlier versions of this volume's) are dropped, not left to age out: one
        # of 88,000 entities holds ~100 MiB.
        newer = contents.store.sort_key()
        for old in [k for k, c in self._memory.items()
                    if k[0] == key[0] and k != key and
                    (k[:3] == key[:3] or c.store.sort_key() < newer)]:
            del self._memory[old]
        self._memory[key] = contents
        self._memory.move_to_end(key)
        while len(self._memory) > self.CACHE_ENTRIES:
            self._memory.popitem(last=False)

    # --- on disk ---------------------------------------------------------------------------

    def _path(self, key: StoreKey) -> Path | None:
        sd, _, vol, _, _ = key
        # Ids from the domain's metadata; checked anyway, since they become a file name.
        if parse_uuid(sd) != sd or parse_uuid(vol) != vol:
            return None
        return self._dir / f"{sd}.{vol}.json"

    def _save(self, key: StoreKey, contents: StoreContents) -> None:
        """Keep the index on disk."""
        path = self._path(key)
        if path is None:
            return
        if contents.digest is None:  # every store written or scanned here has one
            log.warning("not keeping the index of OVF_STORE %s: no digest of its bytes",
                        key[2])
            return
        # One line of everything but the summaries, then one line per summary, as the
        # index keeps them (see `EntitySet`): loading splits the lines and parses none,
        # so their digest is kept to tell that they are the lines written.
        summaries = b"\n".join(contents.entities.encoded())
        record = {"format": FORMAT, "key": list(key), "digest": contents.digest,
                  "info": contents.info, "statuses": contents.statuses,
                  "invalid": contents.invalid, "members": contents.members,
                  "ids": contents.entities.ids(), "summaries": _digest(summaries)}
        try:
            data = compact_json(record) + b"\n" + summaries
            self._dir.mkdir(parents=True, exist_ok=True)
            fsutil.write_file_durably(path, data)
        except (OSError, TypeError) as e:
            # Only costs a rebuild after the next restart.
            log.warning("cannot keep the index of OVF_STORE %s: %s", key[2], e)

    def _load(self, key: StoreKey, store: ovfstore.Store) -> StoreContents | None:
        path = self._path(key)
        if path is None:
            return None
        try:
            head, _, summaries = path.read_bytes().partition(b"\n")
            record = orjson.loads(head)
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            log.warning("ignoring the kept index %s: %s", path, e)
            return None
        if not isinstance(record, dict) or record.get("format") != FORMAT or \
                record.get("key") != list(key):
            return None  # another version of the store, or of this index: rebuilt
        digest = record.get("digest")
        ids = record.get("ids")
        if not isinstance(digest, str) or not isinstance(ids, list):
            return None
        try:
            if _digest(summaries) != record.get("summaries"):
                raise ValueError("its summaries are not the ones written")
            entities = EntitySet.from_encoded(ids, summaries.split(b"\n") if ids else [])
        except ValueError as e:
            log.warning("ignoring the kept index %s: %s", path, e)
            return None
        contents = StoreContents(store, digest=digest, info=record.get("info"),
                                 entities=entities, invalid=record.get("invalid") or {})
        contents.set_statuses({"VM Status": record.get("statuses") or {}})
        contents.members = {k: (v[0], v[1]) for k, v in (record.get("members") or {}).items()}
        return contents


def _file(contents: StoreContents, members: list[IndexedMember]) -> None:
    for member_id, offset, size, indexed in members:
        contents.members[member_id] = (offset, size)
        if isinstance(indexed, str):
            contents.invalid[member_id] = indexed
        else:
            contents.entities.add_encoded(*indexed)


def _digest(data: bytes) -> str:
    return xxhash.xxh3_128_hexdigest(data)
