"""SDM.* (VDSM's host jobs on volumes) and StorageDomain.getSnapshotOverview.

SDM.merge and SDM.update_volume return at once; the work runs as the host job named
by ``job_id`` (Host.getJobs, ``|jobs|status|<id>`` events).
"""

from __future__ import annotations

from typing import Any

from vdsmlite import errors
from vdsmlite.api.base import verb
from vdsmlite.sdm.merge import SdmJobs, VolumeAttributes
from vdsmlite.sdm.overview import SnapshotOverview
from vdsmlite.storage.merge import Endpoint, Subchain


class SdmApi:
    def __init__(self, jobs: SdmJobs, overview: SnapshotOverview) -> None:
        self._jobs = jobs
        self._overview = overview

    @verb("SDM.merge")
    async def merge(self, *, job_id: str, subchain_info: dict[str, Any],
                    merge_bitmaps: bool) -> bool:
        if merge_bitmaps:
            raise errors.UnsupportedOperation("qcow2 bitmaps are not supported")
        sub = Subchain(sd_id=subchain_info["sd_id"], img_id=subchain_info["img_id"],
                       top_id=subchain_info["top_id"], base_id=subchain_info["base_id"],
                       base_generation=subchain_info.get("base_generation"))
        await self._jobs.merge(job_id, sub)
        return True

    @verb("SDM.update_volume")
    async def update_volume(self, *, job_id: str, vol_info: dict[str, Any],
                            vol_attr: dict[str, Any]) -> bool:
        attrs = VolumeAttributes(legality=vol_attr.get("legality"),
                                 description=vol_attr.get("description"),
                                 generation=vol_attr.get("generation"),
                                 type=vol_attr.get("type"))
        await self._jobs.update_volume(
            job_id, Endpoint(vol_info["sd_id"], vol_info["img_id"], vol_info["vol_id"],
                             vol_info["generation"]), attrs)
        return True

    @verb("StorageDomain.getSnapshotOverview")
    async def snapshot_overview(self, *, storagedomainID: str) -> dict[str, Any]:
        return await self._overview.overview(storagedomainID)
