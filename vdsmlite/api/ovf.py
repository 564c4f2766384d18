"""StorageDomain OVF verbs: what the domain's OVF_STORE says, and single-entity edits.

VDSM has no words for these (the engine parses OVF_STOREs itself); they follow
VDSM's style so a host-side tool - the hosted-engine agent, an importer - can
ask the host directly what VMs and Templates a domain carries.
"""

from __future__ import annotations

from typing import Any

from vdsmlite.api.base import verb
from vdsmlite.sdm.ovfstore import OvfService


class OvfApi:
    def __init__(self, ovf: OvfService) -> None:
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
        return await self._ovf.entity(storagedomainID, entityID)

    @verb("StorageDomain.getUnregisteredDisks")
    async def get_unregistered_disks(self, *, storagedomainID: str) -> list[dict[str, Any]]:
        return await self._ovf.unregistered_disks(storagedomainID)

    @verb("StorageDomain.updateOVFEntity")
    async def update_entity(self, *, storagedomainID: str, entityID: str,
                            ovf: str) -> dict[str, Any]:
        return await self._ovf.edit_entity(storagedomainID, entityID, ovf.encode("utf-8"),
                                           "StorageDomain.updateOVFEntity")

    @verb("StorageDomain.removeOVFEntity")
    async def remove_entity(self, *, storagedomainID: str, entityID: str) -> dict[str, Any]:
        return await self._ovf.edit_entity(storagedomainID, entityID, None,
                                           "StorageDomain.removeOVFEntity")
