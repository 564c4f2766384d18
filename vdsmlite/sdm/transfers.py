"""Any volume's bytes through VDSM's image door (``PUT /`` and ``GET /``).

The engine writes and reads OVF_STORE volumes this way (its UploadStream and
RetrieveImageData commands), but the door takes any volume of an image: the
named one, or the image's only volume. Writes run under the domain's OVF
image lock and SDM lease; a write into an OVF_STORE volume is still
validated as an archive while it streams (the engine flips the store's
``Updated`` flag around it itself).
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from vdsmlite import errors
from vdsmlite.blocking import RunBlocking
from vdsmlite.imagelocks import LockTable
from vdsmlite.jobs import Job
from vdsmlite.sdm.lease import SdmLease
from vdsmlite.sdm.ovfstore import OvfService
from vdsmlite.storage import ovfstore, streamio, volumestream
from vdsmlite.storage.domains import DomainStore
from vdsmlite.storage.sd import Domain


class ImageTransfers:
    def __init__(self, *, domains: DomainStore, image_locks: LockTable, sdm: SdmLease,
                 ovf: OvfService, run_blocking: RunBlocking) -> None:
        self._domains = domains
        self._image_locks = image_locks
        self._sdm = sdm
        self._ovf = ovf
        self._run_blocking = run_blocking

    async def _target(self, sd_uuid: str, img_uuid: str,
                      vol_uuid: str | None) -> tuple[Domain, str]:
        """The domain and the volume a transfer names (or the image's only volume)."""
        dom: Domain = await self._run_blocking(self._domains.get, sd_uuid)
        volumes = await self._run_blocking(dom.volume_ids, img_uuid)
        if not volumes:
            raise errors.ImageDoesNotExistInSD(img_uuid, sd_uuid)
        if vol_uuid is not None:
            if vol_uuid not in volumes:
                raise errors.VolumeDoesNotExist(vol_uuid)
            return dom, vol_uuid
        if len(volumes) != 1:
            # VDSM streams only into single-volume images (CopyImageError, 261).
            raise errors.CopyImageError(img_uuid,
                                        f"image has {len(volumes)} volumes; name Volume-Id")
        return dom, volumes[0]

    async def write(self, sd_uuid: str, img_uuid: str, vol_uuid: str | None,
                    body: streamio.Source, *, length: int | None, job: Job,
                    check_xml: bool = False) -> int:
        """Raw bytes into the volume from offset 0; returns how many, once durable.
        Into an OVF_STORE, validated as its archive (`check_xml`: every ``.ovf``
        parsed as well)."""
        dom, vol_uuid = await self._target(sd_uuid, img_uuid, vol_uuid)
        async with self._image_locks.hold(("ovf", sd_uuid)), self._sdm.hold(dom) as lease:
            state = await self._run_blocking(dom.volume, img_uuid, vol_uuid)
            if state.md is None:
                raise errors.VolumeDoesNotExist(vol_uuid)
            capacity = state.md.capacity
            if length is not None and length > capacity:
                raise errors.OvfStoreTooLarge(f"{length} bytes for a {capacity} byte "
                                              f"volume {vol_uuid}")
            size, _ = await self._ovf.write_store(dom, img_uuid, vol_uuid, body, job,
                                                  capacity=capacity,
                                                  validate=ovfstore.is_store(state),
                                                  lease=lease, check_xml=check_xml)
            return size

    async def open_read(self, sd_uuid: str, img_uuid: str, vol_uuid: str | None,
                        length: int) -> tuple[Domain, str]:
        """Check that the first `length` bytes of the volume can be read (before the
        answer's status line goes out); returns what `read` needs."""
        dom, vol_uuid = await self._target(sd_uuid, img_uuid, vol_uuid)
        state = await self._run_blocking(dom.volume, img_uuid, vol_uuid)
        if state.md is None or length > state.md.capacity:
            raise errors.InvalidParameterException("Range", length)
        return dom, vol_uuid

    def read(self, dom: Domain, img_uuid: str, vol_uuid: str, length: int,
             job: Job) -> AsyncIterator[bytes]:
        """The first `length` bytes, read with O_DIRECT, progress in `job`."""
        return volumestream.read(dom, img_uuid, vol_uuid, length,
                                 run_blocking=self._run_blocking,
                                 progress=lambda done: job.update(bytes_done=done))
