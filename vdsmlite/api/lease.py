"""Lease.*: external (VM and job) leases on a domain's xleases volume.

``lease`` params are ``{sd_id, lease_id}`` (both UUIDs, checked by the schema);
the operations are `sdm.xleases.ExternalLeases`'s.
"""

from __future__ import annotations

from typing import Any

from vdsmlite import errors
from vdsmlite.api.base import verb
from vdsmlite.sdm.xleases import ExternalLeases


class LeaseApi:
    def __init__(self, leases: ExternalLeases) -> None:
        self._leases = leases

    @verb("Lease.create")
    async def create(self, *, lease: dict[str, str], metadata: dict[str, Any] | None) -> str:
        if metadata is not None:
            # VDSM writes it to the lease's LVB (job leases); vdsmlite keeps no LVB.
            raise errors.UnsupportedOperation("lease metadata (LVB) is not supported")
        return await self._leases.create(lease["sd_id"], lease["lease_id"])

    @verb("Lease.delete")
    async def delete(self, *, lease: dict[str, str]) -> str:
        return await self._leases.delete(lease["sd_id"], lease["lease_id"])

    @verb("Lease.info")
    async def info(self, *, lease: dict[str, str]) -> dict[str, Any]:
        info = await self._leases.lease_info(lease["sd_id"], lease["lease_id"])
        return {"sd_id": info.lockspace, "lease_id": info.resource, "path": info.path,
                "offset": info.offset}

    @verb("Lease.status")
    async def status(self, *, lease: dict[str, str]) -> dict[str, Any]:
        return await self._leases.status(lease["sd_id"], lease["lease_id"])

    @verb("Lease.rebuild_leases")
    async def rebuild(self, *, sd_id: str) -> str:
        return await self._leases.rebuild(sd_id)
