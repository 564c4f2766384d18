"""OVF_STORE operations: upload with a commit protocol, validated reads, entities.

The commit protocol (the engine's, enforced here) makes a torn upload harmless:

1. pick a store that is not the newest good one (creating stores if the
   domain has fewer than two);
2. mark it ``Updated:false`` (durable) before writing a byte;
3. stream the tar into it with O_DIRECT, validating every byte as it goes;
4. fdatasync; only a complete, valid archive gets past this point;
5. mark it ``Updated:true`` with ``Size`` and ``Last Updated``.

A crash, a cut connection, a stalled client or an invalid archive stops
before step 5, leaving the target ``Updated:false`` and the previous good
store untouched and still served. Uploads to one domain are serialized.

Reads take the newest good store, validate it completely before serving
(falling back to the next store if it is unreadable), and remember what they
found keyed by the store's identity, so listing thousands of entities twice
costs one pass.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from vdsmlite import errors
from vdsmlite.jobs import Job
from vdsmlite.locking import sdm
from vdsmlite.locking.leases import Lease
from vdsmlite.ovf import reader as ovfreader
from vdsmlite.ovf import tarstream
from vdsmlite.ovf.model import OvfError
from vdsmlite.ovf.workers import OvfBatcher, OvfWorkers, Summary
from vdsmlite.services import Services
from vdsmlite.storage import ovfstore, streamio
from vdsmlite.storage.sd import Domain

log = logging.getLogger("vdsmlite.ovfservice")


@dataclass
class StoreContents:
    """What a validated store holds."""

    store: ovfstore.Store
    entities: dict[str, dict[str, Any]] = field(default_factory=dict)
    statuses: dict[str, Any] = field(default_factory=dict)
    # <uuid>.ovf members that are well-formed XML but not a readable OVF: id -> why
    invalid: dict[str, str] = field(default_factory=dict)
    info: Any = None

    def describe(self) -> dict[str, Any]:
        return {"imageID": self.store.img, "volumeID": self.store.vol,
                "size": self.store.size, "lastUpdated": self.store.last_updated}


class OvfService:
    CACHE_ENTRIES = 16

    def __init__(self, services: Services) -> None:
        self._s = services
        self._cache: OrderedDict[tuple[Any, ...], StoreContents] = OrderedDict()

    @property
    def stall_timeout(self) -> float:
        return self._s.config.storage.upload_stall_timeout

    # --- uploads ---------------------------------------------------------------------

    async def upload(self, sd_uuid: str, body: AsyncIterator[bytes], *, length: int | None,
                     job: Job) -> dict[str, Any]:
        """The commit protocol above; returns what was stored."""
        dom = await self._s.run_blocking(self._s.domains.get, sd_uuid)
        async with self._s.image_locks.hold(("ovf", sd_uuid)), sdm.hold(self._s, dom) as lease:
            stores = await self._s.run_blocking(ovfstore.ensure_stores, dom)
            target = ovfstore.pick_target(stores)
            if length is not None and length > target.capacity:
                raise errors.OvfStoreTooLarge(f"{length} bytes for a {target.capacity} byte "
                                              "OVF_STORE volume")
            start = time.monotonic()
            await self._s.run_blocking(
                dom.update_volume, target.img, target.vol,
                description=ovfstore.description(sd_uuid, updated=False,
                                                 last_updated=target.last_updated))
            size, summary = await self._write(dom, target, body, job, validate=True,
                                              lease=lease)
            assert summary is not None
            stamp = ovfstore.next_stamp([s for s in stores if s != target])
            await self._s.run_blocking(
                dom.update_volume, target.img, target.vol,
                description=ovfstore.description(sd_uuid, updated=True, size=size,
                                                 last_updated=stamp))
            elapsed = time.monotonic() - start
            log.info("OVF_STORE %s/%s of %s updated: %d bytes, %d entities in %.2fs",
                     target.img, target.vol, sd_uuid, size, len(summary.entity_ids), elapsed)
            return {"storagedomainID": sd_uuid, "imageID": target.img, "volumeID": target.vol,
                    "size": size, "entities": len(summary.entity_ids), "lastUpdated": stamp,
                    "seconds": round(elapsed, 3), "taskID": job.id}

    async def write_volume(self, sd_uuid: str, img_uuid: str, vol_uuid: str,
                           body: AsyncIterator[bytes], *, length: int | None, job: Job) -> int:
        """The VDSM door: raw bytes into a given volume (the engine drives the
        description itself). OVF_STORE volumes still only take a valid archive."""
        dom = await self._s.run_blocking(self._s.domains.get, sd_uuid)
        async with self._s.image_locks.hold(("ovf", sd_uuid)), sdm.hold(self._s, dom) as lease:
            state = await self._s.run_blocking(dom.volume, img_uuid, vol_uuid)
            if state.md is None:
                raise errors.VolumeDoesNotExist(vol_uuid)
            store = ovfstore.Store(img_uuid, vol_uuid, state.md.capacity, {})
            if length is not None and length > store.capacity:
                raise errors.OvfStoreTooLarge(f"{length} bytes for a {store.capacity} byte "
                                              f"volume {vol_uuid}")
            size, _ = await self._write(dom, store, body, job,
                                        validate=ovfstore.is_store(state), lease=lease)
            return size

    async def _write(self, dom: Domain, store: ovfstore.Store, body: AsyncIterator[bytes],
                     job: Job, *, validate: bool, lease: Lease | None
                     ) -> tuple[int, tarstream.ArchiveSummary | None]:
        path = await self._s.run_blocking(dom.prepare_volume, store.img, store.vol)
        try:
            block_size, _ = await self._s.run_blocking(dom.geometry)
            validator = (tarstream.TarValidator(store.capacity,
                                                check_xml=self._s.ovf_workers.check)
                         if validate else None)
            writer = streamio.DirectWriter(
                str(path), store.capacity, block_size, self._s.run_blocking,
                inspect=validator.feed if validator else None)
            await writer.open()
            try:
                async for chunk in _with_stall_timeout(body, self.stall_timeout):
                    if lease is not None:
                        lease.check()  # another host may own the domain now: stop
                    await writer.write(chunk)
                    job.update(bytes_done=writer.written)
                size = await writer.finish()
                # Waits for the last XML checks in the parser processes.
                summary = await self._s.run_blocking(validator.finish) if validator else None
            except BaseException:
                await writer.abort()
                if validator is not None:
                    validator.abandon()
                raise
            return size, summary
        except streamio.CapacityExceeded as e:
            raise errors.OvfStoreTooLarge(str(e)) from None
        except tarstream.TarError as e:
            cls = errors.OvfStoreTooLarge if e.too_large else errors.InvalidOvfStore
            raise cls(str(e)) from None
        except (aiohttp.ClientPayloadError, ConnectionError, asyncio.IncompleteReadError) as e:
            raise errors.TransferInterrupted(str(e) or type(e).__name__) from None
        finally:
            await self._s.run_blocking(dom.teardown_volume, store.img, store.vol)

    # --- reads -------------------------------------------------------------------------

    async def contents(self, sd_uuid: str, job: Job | None = None) -> StoreContents | None:
        """The newest store that validates, with its entities; None if there is none."""
        dom = await self._s.run_blocking(self._s.domains.get, sd_uuid)
        stores = await self._s.run_blocking(ovfstore.find_stores, dom)
        for store in ovfstore.by_preference(stores):
            if not store.good:
                continue
            key = (sd_uuid, store.img, store.vol, store.size, store.last_updated)
            cached = self._cache.get(key)
            if cached is not None:
                self._cache.move_to_end(key)
                return cached
            try:
                contents = await self._s.run_blocking(self._load, dom, store, job)
            except (tarstream.TarError, OvfError, OSError, errors.VdsmError) as e:
                log.warning("OVF_STORE %s/%s of %s is unreadable (%s); trying the next one",
                            store.img, store.vol, sd_uuid, e)
                continue
            self._cache[key] = contents
            while len(self._cache) > self.CACHE_ENTRIES:
                self._cache.popitem(last=False)
            return contents
        return None

    def _load(self, dom: Domain, store: ovfstore.Store, job: Job | None) -> StoreContents:
        assert store.size is not None
        start = time.monotonic()
        contents = StoreContents(store)
        summaries = _Summaries(self._s.ovf_workers, contents)
        path = dom.prepare_volume(store.img, store.vol)
        try:
            block_size, _ = dom.geometry()
            # Every OVF is parsed in full by the workers, which checks it as strictly
            # as the upload did, so the framing here need not check the XML again.
            validator = tarstream.TarValidator(store.size, on_member=summaries.add,
                                               validate_xml=False)
            done = 0
            for chunk in streamio.read_chunks(str(path), store.size, block_size):
                validator.feed(chunk)
                done += len(chunk)
                if job is not None:
                    job.update(bytes_done=done)
            summary = validator.finish()
            summaries.finish()
        finally:
            summaries.cancel()
            dom.teardown_volume(store.img, store.vol)
        contents.info = summary.info
        if isinstance(summary.metadata, dict):
            statuses = summary.metadata.get("VM Status")
            if isinstance(statuses, dict):
                contents.statuses = {str(k).lower(): v for k, v in statuses.items()}
        for entity_id, entity in contents.entities.items():
            entity["status"] = contents.statuses.get(entity_id)
        log.info("OVF_STORE %s/%s read: %d bytes, %d entities in %.2fs", store.img, store.vol,
                 store.size, len(contents.entities), time.monotonic() - start)
        if contents.invalid:
            log.warning("OVF_STORE %s/%s: %d of %d OVFs cannot be read, e.g. %s",
                        store.img, store.vol, len(contents.invalid),
                        len(contents.invalid) + len(contents.entities),
                        next(iter(contents.invalid.items())))
        return contents

    async def read_stream(self, sd_uuid: str, job: Job
                          ) -> tuple[StoreContents, AsyncIterator[bytes]]:
        """The newest good tar as chunks (validated first, so it is never half-bad)."""
        contents = await self.contents(sd_uuid, job)
        if contents is None:
            raise errors.MissingOvfFileFromVM(sd_uuid, "no good OVF_STORE on the domain")
        dom = await self._s.run_blocking(self._s.domains.get, sd_uuid)
        return contents, self._stream_volume(dom, contents.store, job)

    async def volume_range(self, sd_uuid: str, img_uuid: str, vol_uuid: str,
                           length: int) -> tuple[Domain, ovfstore.Store]:
        """The VDSM door's GET: check that the first `length` bytes can be read."""
        dom = await self._s.run_blocking(self._s.domains.get, sd_uuid)
        state = await self._s.run_blocking(dom.volume, img_uuid, vol_uuid)
        if state.md is None or length > state.md.capacity:
            raise errors.InvalidParameterException("Range", length)
        return dom, ovfstore.Store(img_uuid, vol_uuid, state.md.capacity,
                                   {"Size": length, "Updated": True})

    def stream_volume(self, dom: Domain, store: ovfstore.Store,
                      job: Job) -> AsyncIterator[bytes]:
        return self._stream_volume(dom, store, job)

    async def _stream_volume(self, dom: Domain, store: ovfstore.Store,
                             job: Job) -> AsyncIterator[bytes]:
        assert store.size is not None
        path = await self._s.run_blocking(dom.prepare_volume, store.img, store.vol)
        try:
            block_size, _ = await self._s.run_blocking(dom.geometry)
            chunks = streamio.read_chunks(str(path), store.size, block_size)
            done = 0
            try:
                while True:
                    chunk = await self._s.run_blocking(next, chunks, None)
                    if chunk is None:
                        break
                    done += len(chunk)
                    job.update(bytes_done=done)
                    yield chunk
            finally:
                await self._s.run_blocking(chunks.close)
        finally:
            await self._s.run_blocking(dom.teardown_volume, store.img, store.vol)

    # --- single entities -------------------------------------------------------------

    async def replace_entity(self, sd_uuid: str, entity_id: str, ovf: bytes | None,
                             job: Job) -> dict[str, Any]:
        """Write a new store with one entity updated (ovf) or removed (None)."""
        if ovf is not None:
            entity = await self._s.run_blocking(ovfreader.parse, ovf)
            if entity.id != entity_id:
                raise errors.InvalidParameterException(
                    "ovf", f"OVF is for entity {entity.id}, not {entity_id}")
        contents = await self.contents(sd_uuid)
        if ovf is None and (contents is None or entity_id not in contents.entities):
            raise errors.MissingOvfFileFromVM(entity_id)
        dom = await self._s.run_blocking(self._s.domains.get, sd_uuid)
        members = self._rebuilt_members(dom, sd_uuid, contents, entity_id, ovf)
        return await self.upload(sd_uuid, self._as_async(members), length=None, job=job)

    def _rebuilt_members(self, dom: Domain, sd_uuid: str, contents: StoreContents | None,
                         entity_id: str, ovf: bytes | None) -> Iterator[bytes]:
        writer = tarstream.TarWriter(int(time.time()))
        target = f"{entity_id}.ovf"
        replaced = False
        if contents is None:
            # A first store: the info.json the engine would have written.
            info = json.dumps({"Last Updated": ovfstore.java_date(),
                               "Storage Domains": [{"uuid": sd_uuid}]}, indent=2).encode()
            yield from writer.member(tarstream.INFO, info)
            source: Iterator[tuple[str, bytes]] = iter(())
        else:
            source = self._members_of(dom, contents.store)
        for name, data in source:
            if name.lower() == target:
                replaced = True
                if ovf is not None:
                    yield from writer.member(target, ovf)
                continue
            if name == tarstream.METADATA and ovf is not None and not replaced:
                yield from writer.member(target, ovf)  # new entities go before metadata.json
                replaced = True
            yield from writer.member(name, data)
        if ovf is not None and not replaced:
            yield from writer.member(target, ovf)
        yield from writer.end()

    def _members_of(self, dom: Domain, store: ovfstore.Store) -> Iterator[tuple[str, bytes]]:
        assert store.size is not None
        path = dom.prepare_volume(store.img, store.vol)
        try:
            block_size, _ = dom.geometry()
            yield from tarstream.iter_members(
                streamio.read_chunks(str(path), store.size, block_size), store.size)
        finally:
            dom.teardown_volume(store.img, store.vol)

    async def _as_async(self, gen: Iterator[bytes]) -> AsyncIterator[bytes]:
        """A blocking generator (disk reads) driven from the executor."""
        try:
            while True:
                chunk = await self._s.run_blocking(next, gen, None)
                if chunk is None:
                    return
                yield chunk
        finally:
            await self._s.run_blocking(gen.close)

    # --- floating disks -----------------------------------------------------------------

    async def unregistered_disks(self, sd_uuid: str) -> list[dict[str, Any]]:
        contents = await self.contents(sd_uuid)
        dom = await self._s.run_blocking(self._s.domains.get, sd_uuid)
        return await self._s.run_blocking(_floating, dom, contents)


class _Summaries:
    """Files each of a store's OVFs' summary from the parser processes - or the
    reason there is none - in `contents`."""

    def __init__(self, workers: OvfWorkers, contents: StoreContents) -> None:
        self._contents = contents
        self._batches = OvfBatcher(
            lambda docs: workers.summarize([data for _, data in docs]), self._file)
        self.finish = self._batches.finish
        self.cancel = self._batches.cancel

    def add(self, name: str, data: bytes) -> None:
        # Handed every member; only the OVFs have summaries.
        if name.endswith(".ovf"):
            self._batches.add(name, data)

    def _file(self, names: list[str], results: list[Summary]) -> None:
        for name, result in zip(names, results, strict=True):
            if isinstance(result, dict):
                self._contents.entities[result["id"]] = result
            else:
                self._contents.invalid[name[:-4].lower()] = result


def _floating(dom: Domain, contents: StoreContents | None) -> list[dict[str, Any]]:
    claimed: set[str] = set()
    if contents is not None:
        for entity in contents.entities.values():
            for disk in entity.get("disks", []):
                if disk.get("imageId"):
                    claimed.add(disk["imageId"])
    out = []
    for img in dom.image_ids():
        if img in claimed:
            continue
        volumes = dom.volumes(img)
        if any(ovfstore.is_store(v) for v in volumes.values()):
            continue
        leaf = next((v for v in volumes.values() if not v.children), None)
        if leaf is None or leaf.md is None:
            continue
        desc = ovfstore.parse_description(leaf.md.description) or {}
        out.append({
            "imageID": img,
            "volumeIDs": [s.uuid for s in dom.chain(img, leaf.uuid)],
            "alias": desc.get("DiskAlias") or "",
            "description": desc.get("DiskDescription", leaf.md.description if not desc else ""),
            "capacity": leaf.md.capacity,
            "format": leaf.md.format,
            "diskType": leaf.md.disktype,
            "legality": leaf.legality,
        })
    return out


async def _with_stall_timeout(body: AsyncIterator[bytes], timeout: float
                              ) -> AsyncIterator[bytes]:
    it = body.__aiter__()
    while True:
        try:
            chunk = await asyncio.wait_for(it.__anext__(), timeout)
        except StopAsyncIteration:
            return
        except TimeoutError:
            with contextlib.suppress(Exception):
                await it.aclose()  # type: ignore[attr-defined]
            raise errors.TransferStalled(f"no data for {timeout:.0f}s") from None
        yield chunk

