"""Volume and image operations: what Volume.* and Image.* do, start to finish.

Long changes (create, delete, extend, image delete) return a task id at once
and run as jobs; the cheap checks run before the job starts so bad input is
refused immediately with its own code. Every change to an image runs under
that image's lock (a create and a delete of one image never interleave) and
under the domain's SDM lease (no other host changes the domain meanwhile).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from vdsmlite import errors
from vdsmlite.blocking import RunBlocking
from vdsmlite.imagelocks import LockTable
from vdsmlite.jobs import Job, JobRegistry
from vdsmlite.sdm.lease import SdmLease
from vdsmlite.storage import constants as sc
from vdsmlite.storage import image as imagemod
from vdsmlite.storage.domains import DomainStore
from vdsmlite.storage.image import Image
from vdsmlite.storage.pool import PoolManager
from vdsmlite.storage.sd import CreateVolumeRequest, Domain, VolumeState
from vdsmlite.storage.users import ImageKey, StorageUsers


class VolumeService:
    def __init__(self, *, domains: DomainStore, pools: PoolManager, jobs: JobRegistry,
                 image_locks: LockTable, sdm: SdmLease, users: StorageUsers,
                 run_blocking: RunBlocking) -> None:
        self._domains = domains
        self._users = users
        self._pools = pools
        self._jobs = jobs
        self._image_locks = image_locks
        self._sdm = sdm
        self._run_blocking = run_blocking

    async def domain(self, sd_uuid: str, sp_uuid: str | None = None) -> Domain:
        """The domain (358 if unknown), checked to be in `sp_uuid` unless that is blank."""
        dom: Domain = await self._run_blocking(self._domains.get, sd_uuid)
        if sp_uuid is not None and sp_uuid != sc.BLANK_UUID:
            pools = await self._run_blocking(dom.pools)
            if sp_uuid not in pools:
                raise errors.StorageDomainNotInPool(sp_uuid, sd_uuid)
        return dom

    async def start_job(self, verb: str, description: str, dom: Domain, img_uuid: str,
                        work: Callable[[Job], Any]) -> str:
        """Run blocking `work` as a job under the image lock and the domain's SDM lease;
        a host that may not take the lease is refused now, not in the job."""
        await self._sdm.require_host_id(dom)

        async def body(job: Job) -> None:
            async with self._image_locks.hold((dom.uuid, img_uuid)), self._sdm.hold(dom):
                await self._run_blocking(work, job)

        return (await self._jobs.start(body, description=description, verb=verb)).id

    # --- volumes -------------------------------------------------------------------

    async def create(self, sp_uuid: str, req: CreateVolumeRequest, sd_uuid: str) -> str:
        dom = await self.domain(sd_uuid, sp_uuid)
        if req.format == sc.VolumeFormat.RAW and req.prealloc == sc.Allocation.SPARSE and \
                (await self._run_blocking(dom.read_storage_type)).is_block:
            raise errors.IncorrectFormat(req.vol_uuid,
                                         "RAW volumes on block must be PREALLOCATED")
        await self._run_blocking(Image(dom, req.img_uuid).validate_create, req)

        def work(job: Job) -> None:
            dom.create_volume(req, lambda p: job.update(progress=p))

        return await self.start_job("Volume.create",
                                    f"create volume {req.vol_uuid} in image {req.img_uuid}",
                                    dom, req.img_uuid, work)

    async def state(self, sd_uuid: str, img_uuid: str, vol_uuid: str, *,
                    with_children: bool = False) -> VolumeState:
        dom = await self.domain(sd_uuid)
        if with_children:
            return await self._run_blocking(Image(dom, img_uuid).volume, vol_uuid)
        return await self._run_blocking(dom.volume, img_uuid, vol_uuid)

    async def update(self, sd_uuid: str, sp_uuid: str, img_uuid: str, vol_uuid: str,
                     **changes: object) -> None:
        """Rewrite metadata fields of one volume (description, legality)."""
        dom = await self.domain(sd_uuid, sp_uuid)
        async with self._image_locks.hold((sd_uuid, img_uuid)), self._sdm.hold(dom):
            await self._run_blocking(lambda: dom.update_volume(img_uuid, vol_uuid, **changes))

    async def delete(self, sd_uuid: str, sp_uuid: str, img_uuid: str, vol_uuid: str, *,
                     post_zero: bool, force: bool) -> str:
        dom = await self.domain(sd_uuid, sp_uuid)
        state = await self._run_blocking(Image(dom, img_uuid).check_deletable, vol_uuid,
                                         force)
        if not (state.legality == sc.ILLEGAL and not state.children and
                state.md is not None):
            # A running VM's image: only a volume a live merge left out of its chain
            # (ILLEGAL, nothing above it) may go; a VM never runs an ILLEGAL volume.
            self._users.require_unused(ImageKey(sd_uuid, img_uuid), "delete a volume")

        def work(job: Job) -> None:
            dom.delete_volume(img_uuid, vol_uuid, post_zero=post_zero, force=force,
                              progress=lambda p: job.update(progress=p))

        return await self.start_job("Volume.delete", f"delete volume {vol_uuid}", dom,
                                    img_uuid, work)

    async def extend(self, sd_uuid: str, sp_uuid: str, img_uuid: str, vol_uuid: str,
                     new_size: int) -> str:
        dom = await self.domain(sd_uuid, sp_uuid)
        state = await self._run_blocking(dom.volume, img_uuid, vol_uuid)
        if state.md is not None and new_size < state.md.capacity:
            raise errors.VolumeResizeValueError(new_size)

        def work(job: Job) -> None:
            dom.extend_volume(img_uuid, vol_uuid, new_size)

        return await self.start_job("Volume.extendSize",
                                    f"extend volume {vol_uuid} to {new_size}", dom, img_uuid,
                                    work)

    # --- images ----------------------------------------------------------------------

    async def prepare_image(self, sd_uuid: str, sp_uuid: str, img_uuid: str, vol_uuid: str, *,
                            allow_illegal: bool) -> dict[str, Any]:
        """Image.prepare: the chain under `vol_uuid` activated, in VDSM's answer shape."""
        dom = await self.domain(sd_uuid, sp_uuid)

        def prepare() -> dict[str, Any]:
            chain = Image(dom, img_uuid).prepare(vol_uuid, allow_illegal=allow_illegal)
            base = self._pools.domain_path(sp_uuid, dom) / sc.DOMAIN_IMAGES / img_uuid
            vols = []
            for state in chain:
                entry: dict[str, Any] = {"domainID": dom.uuid, "imageID": img_uuid,
                                         "volumeID": state.uuid,
                                         "path": str(base / state.uuid)}
                if state.lease is not None:
                    entry.update(leasePath=state.lease[0], leaseOffset=state.lease[1])
                vols.append(entry)
            path = str(base / vol_uuid)
            kind = "block" if dom.read_storage_type().is_block else "file"
            return {"path": path, "info": {"type": kind, "path": path},
                    "imgVolumesInfo": vols}

        return await self._run_blocking(prepare)

    async def teardown_image(self, sd_uuid: str, img_uuid: str, vol_uuid: str | None) -> None:
        self._users.require_unused(ImageKey(sd_uuid, img_uuid), "tear down")
        dom = await self.domain(sd_uuid)
        await self._run_blocking(Image(dom, img_uuid).teardown, vol_uuid)

    async def delete_image(self, sd_uuid: str, sp_uuid: str, img_uuid: str, *,
                           post_zero: bool) -> str:
        dom = await self.domain(sd_uuid, sp_uuid)
        volumes = await self._run_blocking(dom.volume_ids, img_uuid)
        if not volumes:
            raise errors.ImageDoesNotExistInSD(img_uuid, sd_uuid)
        self._users.require_unused(ImageKey(sd_uuid, img_uuid), "delete the image")

        def work(job: Job) -> None:
            Image(dom, img_uuid).delete(post_zero=post_zero,
                                        progress=lambda p: job.update(progress=p))

        return await self.start_job("Image.delete", f"delete image {img_uuid}", dom, img_uuid,
                                    work)

    # --- the domain as a whole -----------------------------------------------------------

    async def dump(self, sd_uuid: str) -> dict[str, Any]:
        dom = await self.domain(sd_uuid)
        return await self._run_blocking(imagemod.dump, dom)
