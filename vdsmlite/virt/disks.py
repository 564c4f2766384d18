"""A VM's disks made ready for qemu, and released after it: all or nothing.

For every disk of a definition (blocking; run in the executor):

* a domain volume: the domain (in the pool the request names, unless blank)
  prepares the chain under the volume (legal volumes only, rolled back if a
  volume fails); qemu opens the leaf in the image directory, where its
  backing chain resolves;
* a direct LUN: its GUID is resolved through udev to the device node; a GUID
  this host does not see is refused (37), so is a LUN that is a PV of a VG
  (a storage domain's or anyone's: a VM writing it would destroy the VG);

then the storage is held for the VM in `storage.users.StorageUsers` (a LUN
or image another VM writes is refused unless both share it). A failure at
any disk undoes every disk before it: nothing stays prepared or held.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from vdsmlite import errors
from vdsmlite.storage import constants as sc
from vdsmlite.storage import devices
from vdsmlite.storage.domains import DomainStore
from vdsmlite.storage.image import Image
from vdsmlite.storage.sd import Domain
from vdsmlite.storage.users import Hold, ImageKey, Key, LunKey, StorageUsers
from vdsmlite.virt.definition import DiskFormat, DiskSpec, LunSource, VolumeSource

log = logging.getLogger("vdsmlite.virt.disks")


def key_of(disk: DiskSpec) -> Key:
    src = disk.source
    if isinstance(src, LunSource):
        return LunKey(src.guid)
    return ImageKey(src.domain_id, src.image_id)


class DiskPreparer:
    def __init__(self, domains: DomainStore, users: StorageUsers) -> None:
        self._domains = domains
        self._users = users

    def prepare(self, vm_id: str, disks: Iterable[DiskSpec]) -> None:
        """Prepare and hold every disk (filling `path` and `chain`), or none."""
        disks = list(disks)
        # All LUNs at once: one udev lookup, at most one `pvs`, however many disks.
        luns = self._lun_nodes([d.source.guid for d in disks
                                if isinstance(d.source, LunSource)])
        done: list[DiskSpec] = []
        try:
            for disk in disks:
                if isinstance(disk.source, LunSource):
                    disk.path = luns[disk.source.guid]
                else:
                    self._prepare_volume(disk, disk.source)
                done.append(disk)
                self._users.acquire([Hold(vm_id, key_of(disk), disk.readonly, disk.shared)])
        except BaseException:
            self.release(vm_id, done)
            raise

    def release(self, vm_id: str, disks: Iterable[DiskSpec]) -> None:
        """Undo `prepare` for these disks; never raises (logs what it could not undo)."""
        for disk in reversed(list(disks)):
            self._users.release(vm_id, [key_of(disk)])
            src = disk.source
            if isinstance(src, VolumeSource) and disk.chain:
                try:
                    dom = self._domains.get(src.domain_id)
                    for vol in reversed(disk.chain):
                        dom.teardown_volume(src.image_id, vol)
                except errors.VdsmError as e:
                    log.warning("VM %s: cannot tear down %s/%s: %s", vm_id, src.domain_id,
                                src.image_id, e)
            disk.path = None
            disk.chain = []

    def adopt(self, vm_id: str, disks: Iterable[DiskSpec]) -> None:
        """Hold the storage of a VM recovered after an agent restart (its volumes are
        still prepared: activations outlive the agent) without preparing it again."""
        self._users.acquire(Hold(vm_id, key_of(d), d.readonly, d.shared) for d in disks)

    # --- one disk --------------------------------------------------------------------

    def _prepare_volume(self, disk: DiskSpec, src: VolumeSource) -> None:
        dom = self._domain(src)
        chain = Image(dom, src.image_id).prepare(src.volume_id)
        leaf = chain[-1]
        if leaf.md is not None and disk.format != _format_of(leaf.md.format):
            for state in reversed(chain):
                dom.teardown_volume(src.image_id, state.uuid)
            raise errors.CannotCreateVM(
                f"disk {disk.name}: volume {src.volume_id} is {leaf.md.format}, "
                f"the request says {disk.format}")
        disk.chain = [s.uuid for s in chain]
        disk.path = str(dom.images_dir() / src.image_id / src.volume_id)

    def domain(self, sd_id: str) -> Domain:
        """The domain a VM's volume is on (live snapshot and merge)."""
        return self._domains.get(sd_id)

    def _domain(self, src: VolumeSource) -> Domain:
        try:
            dom = self._domains.get(src.domain_id)
        except errors.StorageDomainDoesNotExist as e:
            raise errors.ImageFileNotFound(f"domain {src.domain_id}") from e
        if src.pool_id != sc.BLANK_UUID and src.pool_id not in dom.pools():
            raise errors.StorageDomainNotInPool(src.pool_id, src.domain_id)
        return dom

    @staticmethod
    def _lun_nodes(guids: list[str]) -> dict[str, str]:
        """GUID -> device node for every GUID; 37 for one this host does not see,
        203 for one that is a PV of a VG."""
        if not guids:
            return {}
        nodes = devices.resolve(guids)
        for guid in guids:
            if guid not in nodes:
                raise errors.LUNDoesNotExist(guid)
        owners = devices.pv_owners(nodes.values())
        for guid, node in nodes.items():
            if node in owners:
                raise errors.VolumeIsBusy(guid, f"the LUN is a PV of volume group "
                                                f"{owners[node]}")
        return nodes


def _format_of(md_format: str) -> DiskFormat:
    return DiskFormat.COW if md_format == sc.VolumeFormat.COW else DiskFormat.RAW
