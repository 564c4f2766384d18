"""StorageDomain OVF verbs: what the domain's OVF_STORE says, and single-entity edits.

VDSM has no words for these (the engine parses OVF_STOREs itself); they follow
VDSM's style so a host-side tool - the hosted-engine agent, an importer - can
ask the host directly what VMs and Templates a domain carries.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from typing import Any

from vdsmlite.api.base import verb
from vdsmlite.rpc.encoded import Encoded
from vdsmlite.sdm.ovfindex import StoreContents
from vdsmlite.sdm.ovfstore import OvfService


class OvfApi:
    # Bytes of encoded listings kept, all domains together: one of 10,000 entities is
    # about 10 MB; one larger than this is encoded per call, as any other result.
    LISTINGS_BYTES = 128 << 20

    def __init__(self, ovf: OvfService) -> None:
        self._ovf = ovf
        # domain -> (the index it was made from, the listing encoded); the index is
        # held weakly: when OvfIndex lets it go, its listing goes too
        self._listings: OrderedDict[str, tuple[weakref.ref[StoreContents], Encoded]] = \
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
        would cost a sort and a copy of every summary (kept as JSON: see
        `sdm.entityset`) each time.
        """
        self._trim()
        kept = self._listings.get(sd_uuid)
        if kept is not None and kept[0]() is contents:
            self._listings.move_to_end(sd_uuid)
            return kept[1]
        listing = Encoded({
            "store": contents.describe(), "lastUpdated": contents.store.last_updated,
            "entities": contents.entities.fragments(),
            "invalidEntities": [{"id": entity_id, "error": why}
                                for entity_id, why in sorted(contents.invalid.items())]})
        self._listings[sd_uuid] = (weakref.ref(contents), listing)
        self._listings.move_to_end(sd_uuid)
        self._trim()
        return listing

    def _trim(self) -> None:
        """Drop the listings of indexes gone, then the oldest past LISTINGS_BYTES (here,
        in the event loop, not in a weakref callback: a collection may run in any
        thread)."""
        for sd_uuid in [sd for sd, (index, _) in self._listings.items() if index() is None]:
            del self._listings[sd_uuid]
        total = sum(len(listing.json) for _, listing in self._listings.values())
        while total > self.LISTINGS_BYTES:
            _, (_, oldest) = self._listings.popitem(last=False)
            total -= len(oldest.json)

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
