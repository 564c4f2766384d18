"""Volume.* and Image.*: create, inspect, change, prepare and delete volumes.

Params are checked and turned into requests here; the operations, their jobs,
locks and leases are `sdm.volumes.VolumeService`'s.
"""

from __future__ import annotations

from typing import Any

from vdsmlite import errors
from vdsmlite.api.base import verb
from vdsmlite.sdm.volumes import VolumeService
from vdsmlite.storage import constants as sc
from vdsmlite.storage.sd import CreateVolumeRequest
from vdsmlite.storage.volmeta import truncate_description


class VolumesApi:
    def __init__(self, volumes: VolumeService) -> None:
        self._volumes = volumes

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
        req = CreateVolumeRequest(
            img_uuid=imageID, vol_uuid=volumeID,
            # capacity rounded up to 4 KiB, as VDSM does
            capacity=-(-size // 4096) * 4096,
            format=sc.VolumeFormat[sc.VolFormat(volFormat).name],
            prealloc=sc.Allocation[sc.VolType(preallocate).name],
            disktype=diskType, description=desc, parent_img=srcImgUUID, parent_vol=srcVolUUID,
            initial_size=initialSize, legal=legal, sequence=sequence)
        return await self._volumes.create(storagepoolID, req, storagedomainID)

    @verb("Volume.getInfo")
    async def get_info(self, *, volumeID: str, storagepoolID: str, storagedomainID: str,
                       imageID: str) -> dict[str, Any]:
        state = await self._volumes.state(storagedomainID, imageID, volumeID,
                                          with_children=True)
        return state.info(storagedomainID)

    @verb("Volume.getSize")
    async def get_size(self, *, volumeID: str, storagepoolID: str, storagedomainID: str,
                       imageID: str) -> dict[str, str]:
        state = await self._volumes.state(storagedomainID, imageID, volumeID)
        return {"apparentsize": str(state.apparent_size), "truesize": str(state.true_size)}

    @verb("Volume.setDescription")
    async def set_description(self, *, volumeID: str, storagepoolID: str, storagedomainID: str,
                              imageID: str, description: str) -> bool:
        await self._volumes.update(storagedomainID, storagepoolID, imageID, volumeID,
                                   description=truncate_description(description))
        return True

    @verb("Volume.setLegality")
    async def set_legality(self, *, volumeID: str, storagepoolID: str, storagedomainID: str,
                           imageID: str, legality: str) -> bool:
        await self._volumes.update(storagedomainID, storagepoolID, imageID, volumeID,
                                   legality=legality)
        return True

    @verb("Volume.delete")
    async def delete(self, *, volumeID: str, storagepoolID: str, storagedomainID: str,
                     imageID: str, postZero: bool, force: bool, discard: bool) -> str:
        return await self._volumes.delete(storagedomainID, storagepoolID, imageID, volumeID,
                                          post_zero=postZero, force=force)

    @verb("Volume.extendSize")
    async def extend_size(self, *, volumeID: str, storagepoolID: str, storagedomainID: str,
                          imageID: str, newSize: int) -> str:
        return await self._volumes.extend(storagedomainID, storagepoolID, imageID, volumeID,
                                          newSize)

    # --- Image ---------------------------------------------------------------------------

    @verb("Image.prepare")
    async def prepare(self, *, storagepoolID: str, storagedomainID: str, imageID: str,
                      volumeID: str, allowIllegal: bool) -> dict[str, Any]:
        return await self._volumes.prepare_image(storagedomainID, storagepoolID, imageID,
                                                 volumeID, allow_illegal=allowIllegal)

    @verb("Image.teardown")
    async def teardown(self, *, storagepoolID: str, storagedomainID: str, imageID: str,
                       volumeID: str | None) -> bool:
        await self._volumes.teardown_image(storagedomainID, imageID, volumeID)
        return True

    @verb("Image.delete")
    async def delete_image(self, *, imageID: str, storagepoolID: str, storagedomainID: str,
                           postZero: bool, force: bool, discard: bool) -> str:
        return await self._volumes.delete_image(storagedomainID, storagepoolID, imageID,
                                                post_zero=postZero)
