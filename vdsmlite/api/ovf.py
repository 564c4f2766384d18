"""StorageDomain OVF verbs: what the domain's OVF_STORE says, and single-entity edits.

VDSM has no words for these (the engine parses OVF_STOREs itself); they follow
VDSM's style so a host-side tool - the hosted-engine agent, an importer - can
ask the host directly what VMs and Templates a domain carries.
"""

from __future__ import annotations

from typing import Any

from vdsmlite import errors
from vdsmlite.api.base import verb
from vdsmlite.jobs import Job
from vdsmlite.ovf import tarstream
from vdsmlite.ovfservice import OvfService
from vdsmlite.services import Services
from vdsmlite.storage import streamio


class OvfApi:
    def __init__(self, services: Services, ovf: OvfService) -> None:
        self._s = services
        self._ovf = ovf

    @verb("StorageDomain.getOVFEntities")
    async def get_entities(self, *, storagedomainID: str) -> dict[str, Any]:
        contents = await self._ovf.contents(storagedomainID)
        if contents is None:
            return {"store": None, "lastUpdated": None, "entities": [], "invalidEntities": []}
        return {"store": contents.describe(), "lastUpdated": contents.store.last_updated,
                "entities": sorted(contents.entities.values(), key=lambda e: e["id"]),
                "invalidEntities": [{"id": entity_id, "error": why}
                                    for entity_id, why in sorted(contents.invalid.items())]}

    @verb("StorageDomain.getOVFEntity")
    async def get_entity(self, *, storagedomainID: str, entityID: str) -> dict[str, Any]:
        contents = await self._ovf.contents(storagedomainID)
        if contents is None or entityID not in contents.entities:
            raise errors.MissingOvfFileFromVM(entityID)
        dom = await self._s.run_blocking(self._s.domains.get, storagedomainID)
        store = contents.store
        assert store.size is not None

        def read_one() -> bytes:
            path = dom.prepare_volume(store.img, store.vol)
            try:
                block_size, _ = dom.geometry()
                chunks = streamio.read_chunks(str(path), store.size or 0, block_size)
                for name, data in tarstream.iter_members(chunks, store.size or 0):
                    if name.lower() == f"{entityID}.ovf":
                        return data
            finally:
                dom.teardown_volume(store.img, store.vol)
            raise errors.MissingOvfFileFromVM(entityID)

        data = await self._s.run_blocking(read_one)
        return {"entity": contents.entities[entityID], "ovf": data.decode("utf-8"),
                "store": contents.describe()}

    @verb("StorageDomain.getUnregisteredDisks")
    async def get_unregistered_disks(self, *, storagedomainID: str) -> list[dict[str, Any]]:
        return await self._ovf.unregistered_disks(storagedomainID)

    async def _edit(self, sd: str, entity: str, ovf: bytes | None, what: str) -> dict[str, Any]:
        async def body(job: Job) -> dict[str, Any]:
            return await self._ovf.replace_entity(sd, entity, ovf, job)

        job = self._s.jobs.start(body, description=f"{what} OVF of {entity} on {sd}",
                                 verb=f"StorageDomain.{what}OVFEntity")
        await job.wait()
        if job.error is not None:
            raise job.error
        return job.result  # type: ignore[no-any-return]

    @verb("StorageDomain.updateOVFEntity")
    async def update_entity(self, *, storagedomainID: str, entityID: str,
                            ovf: str) -> dict[str, Any]:
        return await self._edit(storagedomainID, entityID, ovf.encode("utf-8"), "update")

    @verb("StorageDomain.removeOVFEntity")
    async def remove_entity(self, *, storagedomainID: str, entityID: str) -> dict[str, Any]:
        return await self._edit(storagedomainID, entityID, None, "remove")
