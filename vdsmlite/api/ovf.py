"""StorageDomain OVF verbs: what the domain's OVF_STORE says, and single-entity edits.

VDSM has no words for these (the engine parses OVF_STOREs itself); they follow
VDSM's style so a host-side tool - the hosted-engine agent, an importer - can
ask the host directly what VMs and Templates a domain carries.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

from vdsmlite.api.base import verb
from vdsmlite.rpc.encoded import Encoded
from vdsmlite.sdm.ovfindex import StoreContents
from vdsmlite.sdm.ovfstore import OvfService


class OvfApi:
    # Encoded listings kept (the last domains listed): one of 10,000 entities is
    # about 10 MB.
    LISTINGS_KEPT = 4

    def __init__(self, ovf: OvfService) -> None:
        self._ovf = ovf
        # domain -> (the index it was made from, the listing encoded)
        self._listings: OrderedDict[str, tuple[StoreContents, Encoded]] = \
            OrderedDict()

    @verb("StorageDomain.getOVFEntities")
    async def get_entities(self, *, storagedomainID: str) -> dict[str, Any] | Encoded:
        contents = await self._ovf.contents(storagedomainID)
        if contents is None:
            return {"store": None, "lastUpdated": None, "entities": [], "invalidEntities": []}
        return self._listing(storagedomainID, contents)

    def _listing(self, sd_uuid: str, contents: StoreContents) -> Encoded:
        """The listing of `contents`, encoded once while it is the domain's index.

        An index never changes once made (an edit or an upload makes a new one),
        so its listing is the same bytes until then. Encoding it again per call
        cost a sort and 10,000 dicts walked; worse, in a daemon holding large
        indexes, the garbage collector's full passes over them (millions of
        objects) that those allocations set off.
        """
        kept = self._listings.get(sd_uuid)
        if kept is not None and kept[0] is contents:
            self._listings.move_to_end(sd_uuid)
            return kept[1]
        listing = Encoded({
            "store": contents.describe(), "lastUpdated": contents.store.last_updated,
            "entities": sorted(contents.entities.values(), key=lambda e: e["id"]),
            "invalidEntities": [{"id": entity_id, "error": why}
                                for entity_id, why in sorted(contents.invalid.items())]})
        self._listings[sd_uuid] = (contents, listing)
        self._listings.move_to_end(sd_uuid)
        while len(self._listings) > self.LISTINGS_KEPT:
            self._listings.popitem(last=False)
        return listing

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
