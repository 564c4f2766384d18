"""SDM.* host jobs on volumes: cold merge (SDM.merge) and SDM.update_volume.

Both are VDSM's SDM verbs: the engine names the job (``job_id``), the verb returns at
once and the job is followed in ``Host.getJobs`` and ``|jobs|status|<id>`` events.
Cheap checks (domain, volumes, generation, a VM using the image) refuse at once with
their own codes; the job repeats them under its locks, which are what every metadata
change takes - the image lock, the domain's SDM lease - plus, as in VDSM, the lease of
the volume being changed (the base of a merge).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from vdsmlite import errors
from vdsmlite.blocking import RunBlocking
from vdsmlite.imagelocks import LockTable
from vdsmlite.jobs import Job, JobRegistry
from vdsmlite.locking.leases import LeaseManager
from vdsmlite.sdm.lease import SdmLease
from vdsmlite.sdm.volumes import VolumeService
from vdsmlite.storage import constants as sc
from vdsmlite.storage import merge
from vdsmlite.storage.merge import Endpoint, Subchain
from vdsmlite.storage.sd import Domain
from vdsmlite.storage.users import ImageKey, StorageUsers
from vdsmlite.storage.volmeta import truncate_description


@dataclass(frozen=True)
class VolumeAttributes:
    """VDSM's validators.VolumeAttributes: what SDM.update_volume may change."""

    legality: str | None = None
    description: str | None = None
    generation: int | None = None
    type: str | None = None

    def validate(self) -> None:
        if (self.legality, self.description, self.generation, self.type) == (None,) * 4:
            raise errors.InvalidParameterException("vol_attr", "no attributes to update")
        if self.type is not None and self.type != sc.SHARED:
            raise errors.InvalidParameterException("vol_attr.type", self.type)
        if self.legality is not None and self.legality not in (sc.LEGAL, sc.ILLEGAL):
            raise errors.InvalidParameterException("vol_attr.legality", self.legality)
        if self.generation is not None and not 0 <= self.generation <= sc.MAX_GENERATION:
            raise errors.InvalidParameterException("vol_attr.generation", self.generation)


def update_attributes(dom: Domain, img: str, vol: str, generation: int,
                      attrs: VolumeAttributes) -> None:
    """VDSM's Volume.update_attributes: the generation must match; the new one is
    attrs.generation or the next; type only LEAF -> SHARED for a volume without parent;
    legality must change. One metadata write."""
    with dom.lock:
        state = dom.volume(img, vol)
        md = state.md
        if md is None:
            raise errors.VolumeMetadataReadError(vol, state.problem or "no metadata")
        if generation != md.generation:
            raise errors.GenerationMismatch(generation, md.generation)
        changes: dict[str, object] = {}
        if attrs.type is not None:
            if md.voltype != sc.LEAF:
                raise errors.InvalidVolumeUpdate(
                    vol, f"{md.voltype} Volume cannot be updated to {attrs.type}")
            if md.parent != sc.BLANK_UUID:
                raise errors.InvalidVolumeUpdate(
                    vol, f"Volume with parent {md.parent} cannot update to {attrs.type}")
            changes["voltype"] = attrs.type
        if attrs.legality is not None:
            if md.legality == attrs.legality:
                raise errors.InvalidVolumeUpdate(
                    vol, f"{md.legality} Volume cannot be updated to {attrs.legality}")
            changes["legality"] = attrs.legality
        if attrs.description is not None:
            changes["description"] = truncate_description(attrs.description)
        changes["generation"] = (attrs.generation if attrs.generation is not None
                                 else merge.next_generation(md.generation))
        dom.set_volume_metadata(img, vol, md.replace(**changes))


class SdmJobs:
    def __init__(self, *, volumes: VolumeService, jobs: JobRegistry, image_locks: LockTable,
                 sdm: SdmLease, leases: LeaseManager, users: StorageUsers,
                 run_blocking: RunBlocking) -> None:
        self._volumes = volumes
        self._jobs = jobs
        self._image_locks = image_locks
        self._sdm = sdm
        self._leases = leases
        self._users = users
        self._run_blocking = run_blocking

    @contextlib.asynccontextmanager
    async def _volume_lease(self, dom: Domain, img: str, vol: str) -> AsyncIterator[Any]:
        """The volume's own lease (VDSM's VolumeLease); nothing on local domains."""
        lockspace = await self._run_blocking(dom.lockspace)
        state = await self._run_blocking(dom.volume, img, vol)
        if lockspace is None or state.lease is None:
            yield None
            return
        async with self._leases.hold(dom.uuid, vol, [state.lease]) as lease:
            yield lease

    async def _start(self, job_id: str, verb: str, description: str, *, dom: Domain, img: str,
               vol: str, work: Callable[[Job, Callable[[], None]], None]) -> None:
        if self._jobs.find(job_id) is not None:
            raise errors.JobExists(job_id)

        async def body(job: Job) -> None:
            async with self._image_locks.hold((dom.uuid, img)), \
                    self._sdm.hold(dom) as sdm_lease, \
                    self._volume_lease(dom, img, vol) as vol_lease:
                def check() -> None:
                    for lease in (sdm_lease, vol_lease):
                        if lease is not None:
                            lease.check()
                await self._run_blocking(work, job, check)

        await self._jobs.start(body, description=description, verb=verb, job_id=job_id,
                               persist=False)

    async def merge(self, job_id: str, sub: Subchain) -> None:
        dom = await self._volumes.domain(sub.sd_id)
        self._users.require_unused(ImageKey(sub.sd_id, sub.img_id), "merge (cold)")
        await self._sdm.require_host_id(dom)
        await self._run_blocking(merge.plan, dom, sub)

        def work(job: Job, check: Callable[[], None]) -> None:
            # Checked again under the locks: a VM may have started meanwhile.
            self._users.require_unused(ImageKey(sub.sd_id, sub.img_id), "merge (cold)")
            merge.run(dom, sub, lambda p: job.update(progress=p), check)

        await self._start(job_id, "SDM.merge",
                          f"merge_subchain {sub.top_id} into {sub.base_id} (image {sub.img_id})",
                          dom=dom, img=sub.img_id, vol=sub.base_id, work=work)

    async def update_volume(self, job_id: str, endpoint: Endpoint,
                            attrs: VolumeAttributes) -> None:
        sd_id, img, vol, generation = endpoint
        attrs.validate()
        dom = await self._volumes.domain(sd_id)
        await self._sdm.require_host_id(dom)
        await self._run_blocking(dom.volume, img, vol)

        def work(job: Job, check: Callable[[], None]) -> None:
            update_attributes(dom, img, vol, generation, attrs)

        await self._start(job_id, "SDM.update_volume", f"update_volume {vol}", dom=dom,
                          img=img, vol=vol, work=work)
