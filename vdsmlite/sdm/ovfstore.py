"""OVF_STORE operations: upload with a commit protocol, validated reads, entities.

The commit protocol (the engine's, enforced here) makes a torn upload harmless:

1. pick a store to write: never the newest store that reads (creating stores
   if the domain has fewer than two) - so if the newest good store is corrupt,
   it is the one overwritten, and the older one that reads survives;
2. mark it ``Updated:false`` (durable) before writing a byte;
3. stream the tar into it with O_DIRECT, its framing checked as it goes
   (`tarstream`; every ``.ovf`` parsed too with ``check_xml``);
4. fdatasync; only a complete, valid archive gets past this point;
5. mark it ``Updated:true`` with ``Size`` and ``Last Updated``;
6. index it (`ovfindex`): after the commit, in parser processes.

A crash, a cut connection, a stalled client or an invalid archive stops
before step 5, leaving the target ``Updated:false`` and the previous good
store untouched and still served. Uploads to one domain are serialized.

Reads take the newest good store whose index exists or can be built (falling
back to the next store if it is unreadable).
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Generator, Iterator
from typing import Any

from vdsmlite import errors, failpoints
from vdsmlite.blocking import RunBlocking
from vdsmlite.ids import UUID_PATTERN
from vdsmlite.imagelocks import LockTable
from vdsmlite.jobs import Job, JobRegistry
from vdsmlite.locking.leases import Lease
from vdsmlite.ovf import reader as ovfreader
from vdsmlite.ovf import tarstream
from vdsmlite.ovf.workers import OvfWorkers
from vdsmlite.sdm.lease import SdmLease
from vdsmlite.sdm.ovfindex import OvfIndex, StoreContents, UnreadableStore
from vdsmlite.storage import ovfstore, streamio, volumestream
from vdsmlite.storage.domains import DomainStore
from vdsmlite.storage.sd import Domain, VolumeState

log = logging.getLogger("vdsmlite.sdm.ovfstore")


class OvfService:
    def __init__(self, *, domains: DomainStore, image_locks: LockTable, sdm: SdmLease,
                 workers: OvfWorkers, index: OvfIndex, jobs: JobRegistry,
                 run_blocking: RunBlocking) -> None:
        self._domains = domains
        self._image_locks = image_locks
        self._sdm = sdm
        self._workers = workers
        self._index = index
        self._jobs = jobs
        self._run_blocking = run_blocking

    async def _domain(self, sd_uuid: str) -> Domain:
        dom: Domain = await self._run_blocking(self._domains.get, sd_uuid)
        return dom

    # --- uploads ---------------------------------------------------------------------

    async def upload(self, sd_uuid: str, body: streamio.Source, *, length: int | None,
                     job: Job, check_xml: bool = False,
                     wait_index: bool = False) -> dict[str, Any]:
        """The commit protocol above; returns what was stored, and how its index went
        if `wait_index` (else it is being built: see `OvfIndex`)."""

        async def given() -> streamio.Source:
            return body

        reply, committed = await self._commit(sd_uuid, given, length=length, job=job,
                                              check_xml=check_xml)
        if wait_index:
            committed_at = time.monotonic()
            dom = await self._domain(sd_uuid)
            try:
                contents = await self._index.get(dom, committed)
            except UnreadableStore as e:
                reply["index"] = {"state": "failed", "error": str(e)}
            else:
                reply["index"] = {"state": "ready", **contents.report(),
                                  # how long the index took once the store was committed
                                  "seconds": round(time.monotonic() - committed_at, 3)}
        return reply

    async def _commit(self, sd_uuid: str, make_body: Callable[[], Awaitable[streamio.Source]],
                      *, length: int | None, job: Job, check_xml: bool = False,
                      index: Callable[[ovfstore.Store, tarstream.ArchiveSummary], None]
                      | None = None) -> tuple[dict[str, Any], ovfstore.Store]:
        """The commit protocol, with the archive from `make_body`, called once this
        host holds the domain's upload lock and SDM lease: an archive derived from the
        store (an edit) is derived from the newest one, not from one a concurrent
        commit is overwriting. `index` makes the committed store's index (default:
        built from the store by the parser processes). Returns the reply and the
        store as committed."""
        asked = time.monotonic()
        dom = await self._domain(sd_uuid)
        async with self._image_locks.hold(("ovf", sd_uuid)), self._sdm.hold(dom) as lease:
            body = await make_body()
            stores = await self._run_blocking(ovfstore.ensure_stores, dom)
            target = ovfstore.pick_target(stores, keep=await self._readable_newest(dom, stores))
            if length is not None and length > target.capacity:
                raise errors.OvfStoreTooLarge(f"{length} bytes for a {target.capacity} byte "
                                              "OVF_STORE volume")
            start = time.monotonic()
            # Read with the stores under this lock and lease; a store made just now
            # by ensure_stores is read here.
            state = target.state or await self._run_blocking(dom.volume, target.img,
                                                             target.vol)
            state = await self._run_blocking(
                dom.update_read_volume, state,
                description=ovfstore.description(sd_uuid, updated=False,
                                                 last_updated=target.last_updated))
            timings = streamio.Timings()
            # The index job's preparation, made while the upload's is there too and
            # still under the lock and lease: on a block domain the job then runs no
            # lvs and maps no loop device of its own.
            held = (await volumestream.hold(dom, state, self._run_blocking)
                    if index is None else None)
            try:
                size, summary = await self.write_store(dom, target.img, target.vol, body, job,
                                                       capacity=target.capacity,
                                                       validate=True, lease=lease,
                                                       check_xml=check_xml, timings=timings,
                                                       state=state)
                assert summary is not None
                # Durable and validated, still Updated:false.
                failpoints.hit("ovfstore.commit.after_fdatasync")
                stamp = ovfstore.next_stamp(stores)
                text = ovfstore.description(sd_uuid, updated=True, size=size,
                                            last_updated=stamp)
                await self._run_blocking(dom.update_read_volume, state, description=text)
                failpoints.hit("ovfstore.commit.after_updated")
                committed = ovfstore.Store(target.img, target.vol, target.capacity,
                                           ovfstore.parse_description(text) or {})
                if index is not None:
                    index(committed, summary)
                else:
                    self._index.after_commit(dom, committed, summary, held)
                    held = None  # the index job's to release
            finally:
                if held is not None:
                    await held.release(self._run_blocking)
            elapsed = time.monotonic() - start
            # Before the volume is written: the upload lock, the SDM lease, the stores'
            # scan and which of them is readable.
            log.info("OVF_STORE %s/%s of %s updated: %d bytes, %d entities in %.2fs (%s), "
                     "%.2fs before it for the lock, lease and stores",
                     target.img, target.vol, sd_uuid, size, summary.entity_count, elapsed,
                     timings, start - asked)
            return {"storagedomainID": sd_uuid, "imageID": target.img, "volumeID": target.vol,
                    "size": size, "entities": summary.entity_count, "lastUpdated": stamp,
                    "seconds": round(elapsed, 3), "taskID": job.id,
                    "index": {"state": "building"}}, committed

    async def _readable_newest(self, dom: Domain,
                               stores: list[ovfstore.Store]) -> ovfstore.Store | None:
        """The newest good store that reads (validating it if nobody has): the one
        store a writer must not touch."""
        for store in ovfstore.by_preference(stores):
            if not store.good:
                continue
            readable = self._index.known_readable(dom.uuid, store)
            if readable is None:
                try:
                    await self._index.get(dom, store)
                    readable = True
                except UnreadableStore:
                    readable = False
            if readable:
                return store
        return None

    async def write_store(self, dom: Domain, img_uuid: str, vol_uuid: str,
                          body: streamio.Source, job: Job, *, capacity: int,
                          validate: bool, lease: Lease | None, check_xml: bool = False,
                          timings: streamio.Timings | None = None,
                          state: VolumeState | None = None,
                          ) -> tuple[int, tarstream.ArchiveSummary | None]:
        """Stream `body` into the volume, validated as an OVF_STORE archive if `validate`
        (every ``.ovf`` parsed too if `check_xml`), checking the lease before every
        buffer; (bytes written, what the archive holds)."""
        validator = (tarstream.TarValidator(
            capacity, check_xml=self._workers.check if check_xml else None, digest=True)
            if validate else None)
        try:
            size = await volumestream.write(
                dom, img_uuid, vol_uuid, body, capacity=capacity,
                run_blocking=self._run_blocking,
                inspect=validator.feed if validator else None,
                # another host may own the domain now: stop
                before_buffer=lease.check if lease is not None else None,
                progress=lambda done: job.update(bytes_done=done), timings=timings,
                state=state)
            # Waits for the last XML checks in the parser processes.
            summary = await self._run_blocking(validator.finish) if validator else None
        except BaseException as e:
            if validator is not None:
                validator.abandon()
            if isinstance(e, streamio.CapacityExceeded):
                raise errors.OvfStoreTooLarge(str(e)) from e
            if isinstance(e, tarstream.TarError):
                cls = errors.OvfStoreTooLarge if e.too_large else errors.InvalidOvfStore
                raise cls(str(e)) from e
            raise
        return size, summary

    # --- reads -------------------------------------------------------------------------

    async def contents(self, sd_uuid: str, *,
                       scanned: dict[str, dict[str, VolumeState]] | None = None,
                       ) -> StoreContents | None:
        """The index of the newest store that validates; None if there is none.
        `scanned`: the domain's volumes (Domain.scan) if the caller already read them."""
        dom = await self._domain(sd_uuid)
        stores = await self._run_blocking(ovfstore.find_stores, dom, scanned)
        for store in ovfstore.by_preference(stores):
            if not store.good:
                continue
            try:
                return await self._index.get(dom, store)
            except UnreadableStore as e:
                log.warning("OVF_STORE %s/%s of %s is unreadable (%s); trying the next one",
                            store.img, store.vol, sd_uuid, e)
        return None

    async def newest(self, sd_uuid: str) -> StoreContents:
        """The newest good store; 228 if the domain has none."""
        contents = await self.contents(sd_uuid)
        if contents is None:
            raise errors.MissingOvfFileFromVM(sd_uuid, "no good OVF_STORE on the domain")
        return contents

    async def read_stream(self, sd_uuid: str, contents: StoreContents,
                          job: Job) -> AsyncIterator[bytes]:
        """The store's tar as chunks (`contents` comes from `newest`, validated already)."""
        dom = await self._domain(sd_uuid)
        store = contents.store
        assert store.size is not None
        async for chunk in volumestream.read(dom, store.img, store.vol, store.size,
                                             run_blocking=self._run_blocking,
                                             progress=lambda done: job.update(bytes_done=done)):
            yield chunk

    async def entity(self, sd_uuid: str, entity_id: str) -> dict[str, Any]:
        """One entity of the newest good store: its summary and its OVF document."""
        contents = await self.contents(sd_uuid)
        if contents is None or entity_id not in contents.entities:
            raise errors.MissingOvfFileFromVM(entity_id)
        dom = await self._domain(sd_uuid)
        data = await self._run_blocking(self._read_member, dom, contents, entity_id)
        return {"entity": contents.entities[entity_id], "ovf": data.decode("utf-8"),
                "store": contents.describe()}

    def _read_member(self, dom: Domain, contents: StoreContents, entity_id: str) -> bytes:
        store = contents.store
        where = contents.members.get(entity_id)
        if where is not None:
            offset, size = where
            with dom.opened(store.img, store.vol) as volume:
                raw = streamio.read_range(str(volume.path), offset, tarstream.BLOCK + size,
                                          volume.block_size)
            try:
                header = tarstream.parse_header(raw[:tarstream.BLOCK], offset)
            except tarstream.TarError:
                header = None
            if header is not None and header.name.lower() == f"{entity_id}.ovf" and \
                    header.size == size:
                return raw[tarstream.BLOCK:]
            log.warning("OVF_STORE %s: %s is not at byte %d as indexed; reading the store",
                        store.vol, entity_id, offset)
        log.info("OVF_STORE %s: reading the store for %s (its place in the store is not indexed)",
                 store.vol, entity_id)
        for name, data in self._members_of(dom, store):
            if name.lower() == f"{entity_id}.ovf":
                return data
        raise errors.MissingOvfFileFromVM(entity_id)

    # --- single entities -------------------------------------------------------------

    async def edit_entity(self, sd_uuid: str, entity_id: str, ovf: bytes | None,
                          verb: str) -> dict[str, Any]:
        """`replace_entity` as a job (Host.getJobs shows it); returns what was stored."""
        what = "update" if ovf is not None else "remove"

        async def body(job: Job) -> dict[str, Any]:
            return await self.replace_entity(sd_uuid, entity_id, ovf, job)

        job = await self._jobs.start(
            body, description=f"{what} OVF of {entity_id} on {sd_uuid}", verb=verb)
        await job.wait()
        if job.error is not None:
            raise job.error
        result: dict[str, Any] = job.result
        return result

    async def replace_entity(self, sd_uuid: str, entity_id: str, ovf: bytes | None,
                             job: Job) -> dict[str, Any]:
        """Write a new store with one entity updated (ovf) or removed (None)."""
        summary: dict[str, Any] | None = None
        if ovf is not None:
            entity = await self._run_blocking(ovfreader.parse, ovf)
            if entity.id != entity_id:
                raise errors.InvalidParameterException(
                    "ovf", f"OVF is for entity {entity.id}, not {entity_id}")
            summary = entity.to_dict()
        base: list[StoreContents | None] = []
        members: dict[str, tuple[int, int]] = {}  # where the new store has each .ovf
        dom = await self._domain(sd_uuid)

        async def rebuilt() -> streamio.Source:
            # Under the upload lock (see `_commit`): two edits racing each other both
            # land, each on the store the other committed.
            contents = await self.contents(sd_uuid)
            if ovf is None and (contents is None or (entity_id not in contents.entities
                                                     and entity_id not in contents.invalid)):
                raise errors.MissingOvfFileFromVM(entity_id)
            base.append(contents)
            return streamio.ChunkSource(self._as_async(
                self._rebuilt_members(dom, sd_uuid, contents, entity_id, ovf,
                                      members=members)))

        def index(store: ovfstore.Store, archive: tarstream.ArchiveSummary) -> None:
            # The others' summaries are the base store's: only the edited one is new.
            source = base[0] if base[0] is not None else StoreContents(store)
            self._index.put(dom, source.edited(store, archive, entity_id, summary,
                                              members))

        reply, _ = await self._commit(sd_uuid, rebuilt, length=None, job=job, index=index)
        reply["index"] = {"state": "ready"}
        return reply

    def _rebuilt_members(self, dom: Domain, sd_uuid: str, contents: StoreContents | None,
                         entity_id: str, ovf: bytes | None, *,
                         members: dict[str, tuple[int, int]]
                         ) -> Generator[bytes, None, None]:
        """The new store's bytes; `members` gets where each ``.ovf`` member is in it
        (as an index build finds them), so the edited store's entities are read
        one by one, not by reading the store."""
        tar = tarstream.TarWriter(int(time.time()))

        def member(name: str, data: bytes) -> Iterator[bytes]:
            if name.endswith(".ovf"):
                members[name[:-4].lower()] = (tar.length, len(data))
            return tar.member(name, data)

        target = f"{entity_id}.ovf"
        replaced = False
        if contents is None:
            # A first store: the info.json the engine would have written.
            info = json.dumps({"Last Updated": ovfstore.java_date(),
                               "Storage Domains": [{"uuid": sd_uuid}]}, indent=2).encode()
            yield from member(tarstream.INFO, info)
            source: Iterator[tuple[str, bytes]] = iter(())
        else:
            source = self._members_of(dom, contents.store)
        for name, data in source:
            if name.lower() == target:
                replaced = True
                if ovf is not None:
                    yield from member(target, ovf)
                continue
            if name == tarstream.METADATA and ovf is not None and not replaced:
                yield from member(target, ovf)  # new entities go before metadata.json
                replaced = True
            yield from member(name, data)
        if ovf is not None and not replaced:
            yield from member(target, ovf)
        yield from tar.end()

    def _members_of(self, dom: Domain, store: ovfstore.Store) -> Iterator[tuple[str, bytes]]:
        assert store.size is not None
        with dom.opened(store.img, store.vol) as volume:
            yield from tarstream.iter_members(
                streamio.read_chunks(str(volume.path), store.size, volume.block_size),
                store.size)

    async def _as_async(self, gen: Generator[bytes, None, None]) -> AsyncIterator[bytes]:
        """A blocking generator (disk reads) driven from the executor."""
        try:
            while True:
                chunk = await self._run_blocking(next, gen, None)
                if chunk is None:
                    return
                yield chunk
        finally:
            await self._run_blocking(gen.close)

    # --- floating disks -----------------------------------------------------------------

    async def unregistered_disks(self, sd_uuid: str) -> list[dict[str, Any]]:
        """The domain's floating disks by the rules of `_floating`."""
        dom = await self._domain(sd_uuid)
        scanned = await self._run_blocking(dom.scan)
        contents = await self.contents(sd_uuid, scanned=scanned)
        if contents is not None and contents.invalid and contents.invalid_mentions is None:
            contents.invalid_mentions = await self._run_blocking(
                self._mentions, dom, contents)
        floating: list[dict[str, Any]] = await self._run_blocking(_floating, scanned,
                                                                  contents)
        return floating

    def _mentions(self, dom: Domain, contents: StoreContents) -> frozenset[str]:
        """Every UUID in the text of the store's OVFs that do not parse."""
        found: set[str] = set()
        for name, data in self._members_of(dom, contents.store):
            if name.endswith(".ovf") and name[:-4].lower() in contents.invalid:
                found.update(_uuids_in(data))
        return frozenset(found)


_UUID_BYTES = re.compile(UUID_PATTERN.encode())

# A memory disk of a snapshot or a hibernated VM as the engine describes it
# (MemoryUtils: its descriptions and aliases), for disks whose DISKTYPE does not say so.
_MEMORY_DESCRIPTION = re.compile(
    r"^(Memory snapshot disk for snapshot |(memory dump|metadata) for VM hibernation$)")
_MEMORY_ALIAS = re.compile(r"_(snapshot|hibernation)_(memory|metadata)$")
_MEMORY_DISK_TYPES = ("MEMD", "MEMM")


def _uuids_in(data: bytes) -> set[str]:
    """The UUIDs written in an OVF's bytes, lower case: in its bytes as they are (UTF-8
    and ASCII-compatible encodings) and, when it has NULs, decoded as UTF-16 too."""
    found = {m.group().decode().lower() for m in _UUID_BYTES.finditer(data)}
    if b"\0" in data:
        for encoding in ("utf-16", "utf-16-le", "utf-16-be"):
            text = data.decode(encoding, errors="replace").encode("utf-8", errors="replace")
            found.update(m.group().decode().lower() for m in _UUID_BYTES.finditer(text))
    return found


def _referenced(contents: StoreContents | None) -> set[str]:
    """Image ids the store's OVFs claim: every image disk of every entity, the memory
    dump and metadata disks of their snapshots, and - since what an OVF that does not
    parse refers to cannot be known - every UUID written anywhere in such an OVF."""
    claimed: set[str] = set()
    if contents is None:
        return claimed
    for entity in contents.entities.summaries():
        for disk in entity.get("disks", []):
            if disk.get("imageId"):
                claimed.add(disk["imageId"])
        for snapshot in entity.get("snapshots", []):
            claimed.update(snapshot.get("memoryDisks", []))
    claimed.update(contents.invalid_mentions or ())
    return claimed


def _is_memory_disk(state: VolumeState, desc: dict[str, Any] | None) -> bool:
    assert state.md is not None
    if state.md.disktype in _MEMORY_DISK_TYPES:
        return True
    description = str(desc.get("DiskDescription") or "") if desc else state.md.description
    alias = str(desc.get("DiskAlias") or "") if desc else ""
    return bool(_MEMORY_DESCRIPTION.match(description) or _MEMORY_ALIAS.search(alias))


def _floating(scanned: dict[str, dict[str, VolumeState]],
              contents: StoreContents | None) -> list[dict[str, Any]]:
    """The images the engine could register as floating disks (GetUnregisteredDisks):

    - not referenced by the newest good store (`_referenced`);
    - not an OVF_STORE, not a memory dump or metadata disk (DISKTYPE MEMD/MEMM, or
      the engine's description or alias for one);
    - exactly one volume: the engine skips images with snapshots
      (GetUnregisteredDiskQuery: "Skipping a disk with snapshots"), so they are not listed.
    """
    claimed = _referenced(contents)
    out = []
    for img, volumes in sorted(scanned.items()):
        if img in claimed or len(volumes) != 1:
            continue
        (leaf,) = volumes.values()
        if leaf.md is None or ovfstore.is_store(leaf):
            continue
        desc = ovfstore.parse_description(leaf.md.description)
        if _is_memory_disk(leaf, desc):
            continue
        desc = desc or {}
        out.append({
            "imageID": img,
            "volumeIDs": [leaf.uuid],
            "alias": desc.get("DiskAlias") or "",
            "description": desc.get("DiskDescription", leaf.md.description if not desc else ""),
            "capacity": leaf.md.capacity,
            "format": leaf.md.format,
            "diskType": leaf.md.disktype,
            "legality": leaf.legality,
        })
    return out
