"""Volume.* and Image.*: create, inspect, change, prepare and delete volumes.

Long operations (create, delete, extend, image delete) return a task id at
once and run as jobs; cheap checks happen before the task starts so that bad
input is refused immediately with its own code. Every change to an image runs
under that image's lock, so a create and a delete of the same image never
interleave.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from vdsmlite import errors
from vdsmlite.api.base import verb
from vdsmlite.jobs import Job
from vdsmlite.locking import sdm
from vdsmlite.services import Services
from vdsmlite.storage import constants as sc
from vdsmlite.storage.sd import CreateVolumeRequest, Domain
from vdsmlite.storage.volmeta import truncate_description


class VolumesApi:
    def __init__(self, services: Services) -> None:
        self._s = services

    async def _domain(self, sd_uuid: str, sp_uuid: str | None = None) -> Domain:
        dom = await self._s.run_blocking(self._s.domains.get, sd_uuid)
        if sp_uuid is not None and sp_uuid != sc.BLANK_UUID:
            pools = await self._s.run_blocking(dom.pools)
            if sp_uuid not in pools:
                raise errors.StorageDomainNotInPool(sp_uuid, sd_uuid)
        return dom

    async def _start(self, verb_name: str, description: str, dom: Domain, img_uuid: str,
                     work: Callable[[Job], Any]) -> str:
        """Run `work` as a job, under the image lock and the domain's SDM lease."""
        await sdm.require_host_id(self._s, dom)  # refused now, not in the job

        async def body(job: Job) -> None:
            async with self._s.image_locks.hold((dom.uuid, img_uuid)), \
                    sdm.hold(self._s, dom):
                await self._s.run_blocking(work, job)

        return self._s.jobs.start(body, description=description, verb=verb_name).id

    # --- Volume ------------------------------------------------------------------------

    @verb("Volume.create")
    async def create(self, *, volumeID: str, storagepoolID: str, storagedomainID: str,
                     imageID: str, size: int, volFormat: int, preallocate: int, diskType: str,
                     desc: str, srcImgUUID: str, srcVolUUID: str, initialSize: int | None,
                     addBitmaps: bool, legal: bool, sequence: int, bitmap: Any) -> str:
        if addBitmaps or bitmap is not None:
            raise errors.UnsupportedOperation("qcow2 bitmaps are not supported")
        if volFormat not in (sc.VolFormat.COW, sc.VolFormat.RAW):
            raise errors.IncorrectFormat(volumeID, f"volFormat {volFormat}")
        dom = await self._domain(storagedomainID, storagepoolID)
        req = CreateVolumeRequest(
            img_uuid=imageID, vol_uuid=volumeID,
            # capacity rounded up to 4 KiB, as VDSM does
            capacity=-(-size // 4096) * 4096,
            format=sc.VolFormat(volFormat).name, prealloc=sc.VolType(preallocate).name,
            disktype=diskType, description=desc, parent_img=srcImgUUID, parent_vol=srcVolUUID,
            initial_size=initialSize, legal=legal, sequence=sequence)
        if req.format == "RAW" and req.prealloc == "SPARSE" and \
                await self._s.run_blocking(lambda: dom.storage_type.is_block):
            raise errors.IncorrectFormat(volumeID, "RAW volumes on block must be PREALLOCATED")
        await self._s.run_blocking(dom.validate_create, req)

        def work(job: Job) -> None:
            dom.create_volume(req, lambda p: job.update(progress=p))

        return await self._start("Volume.create",
                                 f"create volume {volumeID} in image {imageID}", dom, imageID,
                                 work)

    @verb("Volume.getInfo")
    async def get_info(self, *, volumeID: str, storagepoolID: str, storagedomainID: str,
                       imageID: str) -> dict[str, Any]:
        dom = await self._domain(storagedomainID)
        state = await self._s.run_blocking(dom.volume_with_children, imageID, volumeID)
        return state.info(storagedomainID)

    @verb("Volume.getSize")
    async def get_size(self, *, volumeID: str, storagepoolID: str, storagedomainID: str,
                       imageID: str) -> dict[str, str]:
        dom = await self._domain(storagedomainID)
        state = await self._s.run_blocking(dom.volume, imageID, volumeID)
        return {"apparentsize": str(state.apparent_size), "truesize": str(state.true_size)}

    async def _update(self, sd_uuid: str, sp_uuid: str, img_uuid: str, vol_uuid: str,
                      **changes: object) -> None:
        dom = await self._domain(sd_uuid, sp_uuid)
        async with self._s.image_locks.hold((sd_uuid, img_uuid)), sdm.hold(self._s, dom):
            await self._s.run_blocking(lambda: dom.update_volume(img_uuid, vol_uuid, **changes))

    @verb("Volume.setDescription")
    async def set_description(self, *, volumeID: str, storagepoolID: str, storagedomainID: str,
                              imageID: str, description: str) -> bool:
        await self._update(storagedomainID, storagepoolID, imageID, volumeID,
                           description=truncate_description(description))
        return True

    @verb("Volume.setLegality")
    async def set_legality(self, *, volumeID: str, storagepoolID: str, storagedomainID: str,
                           imageID: str, legality: str) -> bool:
        await self._update(storagedomainID, storagepoolID, imageID, volumeID, legality=legality)
        return True

    @verb("Volume.delete")
    async def delete(self, *, volumeID: str, storagepoolID: str, storagedomainID: str,
                     imageID: str, postZero: bool, force: bool, discard: bool) -> str:
        dom = await self._domain(storagedomainID, storagepoolID)
        await self._s.run_blocking(dom.check_deletable, imageID, volumeID, force)

        def work(job: Job) -> None:
            dom.delete_volume(imageID, volumeID, post_zero=postZero, force=force,
                              progress=lambda p: job.update(progress=p))

        return await self._start("Volume.delete", f"delete volume {volumeID}", dom, imageID,
                                 work)

    @verb("Volume.extendSize")
    async def extend_size(self, *, volumeID: str, storagepoolID: str, storagedomainID: str,
                          imageID: str, newSize: int) -> str:
        dom = await self._domain(storagedomainID, storagepoolID)
        state = await self._s.run_blocking(dom.volume, imageID, volumeID)
        if state.md is not None and newSize < state.md.capacity:
            raise errors.VolumeResizeValueError(newSize)

        def work(job: Job) -> None:
            dom.extend_volume(imageID, volumeID, newSize)

        return await self._start("Volume.extendSize",
                                 f"extend volume {volumeID} to {newSize}", dom, imageID, work)

    # --- Image ---------------------------------------------------------------------------

    @verb("Image.prepare")
    async def prepare(self, *, storagepoolID: str, storagedomainID: str, imageID: str,
                      volumeID: str, allowIllegal: bool) -> dict[str, Any]:
        dom = await self._domain(storagedomainID, storagepoolID)
        return await self._s.run_blocking(self._prepare, dom, storagepoolID, imageID, volumeID,
                                          allowIllegal)

    def _prepare(self, dom: Domain, sp_uuid: str, img_uuid: str, vol_uuid: str,
                 allow_illegal: bool) -> dict[str, Any]:
        chain = dom.chain(img_uuid, vol_uuid)
        if not allow_illegal:
            for state in chain:
                if state.legality != sc.LEGAL:
                    raise errors.PrepareIllegalVolumeError(state.uuid)
        prepared = []
        try:
            for state in chain:
                dom.prepare_volume(img_uuid, state.uuid)
                prepared.append(state.uuid)
        except BaseException:
            for done in reversed(prepared):
                dom.teardown_volume(img_uuid, done)
            raise
        base = self._s.pools.domain_path(sp_uuid, dom) / sc.DOMAIN_IMAGES / img_uuid
        vols = []
        for state in chain:
            entry = {"domainID": dom.uuid, "imageID": img_uuid, "volumeID": state.uuid,
                     "path": str(base / state.uuid)}
            if state.lease is not None:
                entry.update(leasePath=state.lease[0], leaseOffset=state.lease[1])
            vols.append(entry)
        path = str(base / vol_uuid)
        kind = "block" if dom.storage_type.is_block else "file"
        return {"path": path, "info": {"type": kind, "path": path}, "imgVolumesInfo": vols}

    @verb("Image.teardown")
    async def teardown(self, *, storagepoolID: str, storagedomainID: str, imageID: str,
                       volumeID: str | None) -> bool:
        dom = await self._domain(storagedomainID)
        await self._s.run_blocking(self._teardown, dom, imageID, volumeID)
        return True

    @staticmethod
    def _teardown(dom: Domain, img_uuid: str, vol_uuid: str | None) -> None:
        if vol_uuid is None:
            leaves = [s.uuid for s in dom.volumes(img_uuid).values() if not s.children]
            if not leaves:
                return
            vol_uuid = leaves[0]
        for state in reversed(dom.chain(img_uuid, vol_uuid)):
            dom.teardown_volume(img_uuid, state.uuid)

    @verb("Image.delete")
    async def delete_image(self, *, imageID: str, storagepoolID: str, storagedomainID: str,
                           postZero: bool, force: bool, discard: bool) -> str:
        dom = await self._domain(storagedomainID, storagepoolID)
        volumes = await self._s.run_blocking(dom.volume_ids, imageID)
        if not volumes:
            raise errors.ImageDoesNotExistInSD(imageID, storagedomainID)

        def work(job: Job) -> None:
            # Leaves first, so no volume is ever deleted under a child.
            remaining = dom.volumes(imageID)
            total = len(remaining)
            while remaining:
                leaves = [v for v, s in remaining.items() if not s.children]
                if not leaves:
                    raise errors.ImageIsNotLegalChain(imageID, "no leaf volume (loop?)")
                for vol_uuid in leaves:
                    dom.delete_volume(imageID, vol_uuid, post_zero=postZero, force=True,
                                      progress=lambda p: None)
                remaining = dom.volumes(imageID)
                job.update(progress=100 * (total - len(remaining)) / total)

        return await self._start("Image.delete", f"delete image {imageID}", dom, imageID,
                                 work)
