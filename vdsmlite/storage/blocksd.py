"""Block storage domains: one LVM VG per domain on iSCSI/FC LUNs.

Layout (VDSM's V5): VG name = sdUUID, 128 MiB extents; domain metadata in VG
tags ``MDT_<KEY>=<value>`` sealed with ``_SHA_CKSUM``; special LVs
``metadata, ids, leases, inbox, outbox, xleases, master``; one LV per volume
named by its UUID, tagged ``IU_<img>``, ``PU_<parent>``, ``MD_<slot>``; the
volume's metadata in its 8 KiB slot of the ``metadata`` LV at
``1 MiB + slot * 8 KiB``, written with O_DIRECT; its lease in the ``leases`` LV
at ``(100 + slot) * alignment``.

Volume create order: one ``lvcreate`` that reserves the slot and carries
``OVIRT_VOL_INITIALIZING`` together with the IU/PU/MD tags (so an interrupted
create is always findable), the metadata slot written ILLEGAL, the data
formatted (qcow2), the lease, metadata LEGAL, and finally the INITIALIZING tag
removed. Anything still carrying the tag is reported ILLEGAL, and delete
removes it cleanly.

This host keeps the domain's ``metadata``, ``ids`` and ``leases`` LVs active
while it serves the domain; volume LVs are active only between
Image.prepare and Image.teardown (reference-counted by the Activator).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vdsmlite import cancel, errors, failpoints
from vdsmlite.ids import parse_uuid
from vdsmlite.storage import (
    clusterlock,
    commands,
    directio,
    lvm,
    persistent,
    qemuimg,
    xleases,
)
from vdsmlite.storage import constants as sc
from vdsmlite.storage import devices as devmod
from vdsmlite.storage.activation import Activator
from vdsmlite.storage.image import Image
from vdsmlite.storage.sd import (
    K_VGUUID,
    CreateVolumeRequest,
    Domain,
    Progress,
    VolumeState,
    initial_metadata,
)
from vdsmlite.storage.volmeta import VolumeMetadata

log = logging.getLogger("vdsmlite.storage.blocksd")

REMOVED_PREFIX = "_remove_me_"
HELD_LVS = (sc.METADATA, sc.IDS, sc.LEASES)

GuidOf = Callable[[str], str]


def _lvm_error(cls: type[errors.VdsmError], what: str, e: lvm.LVMError) -> errors.VdsmError:
    return cls(what, (e.stderr or str(e)).strip()[-300:])


class BlockDomain(Domain):
    def __init__(self, sd_uuid: str, devices: list[str], activator: Activator,
                 repository: Path, guid_of: GuidOf) -> None:
        super().__init__(sd_uuid)
        self.devices = devices
        self.activator = activator
        self.repository = repository
        self.guid_of = guid_of
        self._held: set[str] = set()
        # PV data offsets and the extent size never change for a domain's PVs.
        self._layout: tuple[dict[str, int], int] | None = None

    @property
    def path(self) -> Path:
        return self.repository / "mnt" / sc.BLOCKSD_DIR / self.uuid

    # --- LVM views ------------------------------------------------------------------

    def vg(self) -> lvm.VG:
        try:
            found = lvm.vgs(self.devices, [self.uuid])
        except lvm.LVMError as e:
            raise _lvm_error(errors.StorageDomainAccessError, self.uuid, e) from e
        if self.uuid not in found:
            raise errors.StorageDomainDoesNotExist(self.uuid)
        return found[self.uuid]

    def lvs(self, names: list[str] | None = None) -> dict[str, lvm.LV]:
        try:
            return lvm.lvs(self.uuid, self.devices, names or [])
        except lvm.LVMError as e:
            raise _lvm_error(errors.StorageDomainAccessError, self.uuid, e) from e

    def lv(self, name: str) -> lvm.LV:
        found = self.lvs([name])
        if name not in found:
            raise errors.LogicalVolumeDoesNotExistError(f"{self.uuid}/{name}")
        return found[name]

    def layout(self) -> tuple[dict[str, int], int]:
        """(pe_start per PV, extent size), read once."""
        if self._layout is None:
            pe_starts = {name: pv.pe_start for name, pv in lvm.pvs(self.devices).items()}
            self._layout = (pe_starts, self.vg().extent_size)
        return self._layout

    def _pe_starts(self) -> dict[str, int]:
        return self.layout()[0]

    def _activate(self, lv: lvm.LV) -> Path:
        pe_starts, extent = self.layout()
        return self.activator.acquire(lv, pe_starts, extent, self.devices)

    def _release(self, name: str) -> None:
        self.activator.release(self.uuid, name, self.devices)

    def held_path(self, name: str) -> Path:
        """A special LV this host keeps active while serving the domain."""
        with self.lock:
            if name not in self._held:
                self._activate(self.lv(name))
                self._held.add(name)
            return self.activator.link(self.uuid, name)

    def lockspace(self) -> tuple[str, str, int] | None:
        return self.uuid, str(self.held_path(sc.IDS)), 0

    def leases_path(self) -> str:
        return str(self.held_path(sc.LEASES))

    def xleases_path(self) -> str:
        return str(self.held_path(sc.XLEASES))

    def health_path(self) -> Path:
        return self.held_path(sc.METADATA)

    def close(self) -> None:
        with self.lock:
            for name in list(self._held):
                with contextlib.suppress(errors.VdsmError, lvm.LVMError):
                    self._release(name)
                self._held.discard(name)

    # --- metadata -----------------------------------------------------------------------

    def read_metadata(self) -> dict[str, str]:
        vg = self.vg()
        if sc.TAG_DOMAIN not in vg.tags:
            raise errors.StorageDomainDoesNotExist(self.uuid)
        return persistent.parse_tags(vg.tags)

    def write_metadata(self, md: dict[str, str]) -> None:
        with self.lock:
            vg = self.vg()
            old = set(persistent.metadata_tags(vg.tags))
            new = set(persistent.dump_tags(md))
            try:
                lvm.vg_change_tags(self.uuid, self.devices, remove=sorted(old - new),
                                   add=sorted(new - old))
            except lvm.LVMError as e:
                raise _lvm_error(errors.MetaDataGeneralError, self.uuid, e) from e

    def _type_info(self, md: dict[str, str]) -> dict[str, Any]:
        pvs = {k: v for k, v in md.items() if k.startswith("PV") and k[2:].isdigit()}
        first = pvs.get("PV0", "")
        guid = first.split(",")[0].removeprefix("pv:") if first else ""
        return {"vguuid": md.get(K_VGUUID, ""), "state": "OK", "metadataDevice": guid,
                "vgMetadataDevice": guid}

    def stats(self) -> dict[str, Any]:
        vg = self.vg()
        return {
            "disktotal": str(vg.size), "diskfree": str(vg.free),
            "mdasize": str(vg.mda_size), "mdafree": str(vg.mda_free),
            "mdavalid": vg.mda_size >= 64 * sc.MiB,
            "mdathreshold": vg.mda_free >= 0.2 * vg.mda_size,
        }

    # --- volume metadata slots ------------------------------------------------------

    def _slot_offset(self, slot: int) -> int:
        return sc.METADATA_BASE_V5 + slot * sc.METADATA_SLOT_SIZE_V5

    def read_slot(self, slot: int) -> bytes:
        block_size, _ = self.geometry()
        size = max(sc.METADATA_SIZE, block_size)
        return directio.read(self.held_path(sc.METADATA), self._slot_offset(slot), size,
                             block_size)

    def write_slot(self, slot: int, data: bytes) -> None:
        block_size, _ = self.geometry()
        size = max(sc.METADATA_SIZE, block_size)
        try:
            directio.write(self.held_path(sc.METADATA), self._slot_offset(slot),
                           data.ljust(size, b"\0"), block_size)
        except OSError as e:
            raise errors.VolumeMetadataWriteError(f"slot {slot}", str(e)) from e

    def _free_slot(self, lvs: dict[str, lvm.LV]) -> int:
        used = set()
        for lv in lvs.values():
            value = lv.tag_value(sc.TAG_SLOT)
            if value is not None and value.isdigit():
                used.add(int(value))
        slot = sc.FIRST_SLOT_V5
        while slot in used:
            slot += 1
        if slot >= sc.MAX_SLOTS_V5:
            raise errors.NoSpaceLeftOnDomain(self.uuid)
        return slot

    # --- volumes ------------------------------------------------------------------------

    def _volume_lvs(self) -> dict[str, lvm.LV]:
        return {name: lv for name, lv in self.lvs().items()
                if name not in sc.SPECIAL_LVS and lv.tag_value(sc.TAG_IMAGE) is not None}

    def image_ids(self) -> list[str]:
        images = {lv.tag_value(sc.TAG_IMAGE) for lv in self._volume_lvs().values()}
        return sorted(i for i in images if i and parse_uuid(i) == i)

    def volume_ids(self, img_uuid: str) -> list[str]:
        return sorted(name for name, lv in self._volume_lvs().items()
                      if lv.tag_value(sc.TAG_IMAGE) == img_uuid)

    def _state(self, lv: lvm.LV) -> VolumeState:
        img = lv.tag_value(sc.TAG_IMAGE) or ""
        slot_tag = lv.tag_value(sc.TAG_SLOT)
        slot = int(slot_tag) if slot_tag and slot_tag.isdigit() else None
        md, problem = None, None
        if slot is None:
            problem = "no metadata slot"
        else:
            try:
                md = VolumeMetadata.from_bytes(self.read_slot(slot))
            except errors.VolumeMetadataReadError as e:
                problem = str(e)
        _, alignment = self.geometry()
        lease = None
        if slot is not None:
            lease = (str(self.activator.link(self.uuid, sc.LEASES)),
                     (sc.RESERVED_LEASES + slot) * alignment)
        return VolumeState(uuid=lv.name, image=img, md=md, apparent_size=lv.size,
                           true_size=lv.size, initializing=sc.TAG_INITIALIZING in lv.tags,
                           lease=lease, slot=slot, problem=problem, located=lv)

    def volume(self, img_uuid: str, vol_uuid: str) -> VolumeState:
        lv = self.lvs([vol_uuid]).get(vol_uuid)
        if lv is None or lv.tag_value(sc.TAG_IMAGE) != img_uuid:
            raise errors.VolumeDoesNotExist(vol_uuid)
        return self._state(lv)

    def volumes(self, img_uuid: str) -> dict[str, VolumeState]:
        # One lvs call for the whole image instead of one per volume.
        states = {name: self._state(lv) for name, lv in self._volume_lvs().items()
                  if lv.tag_value(sc.TAG_IMAGE) == img_uuid}
        for state in states.values():
            if state.md is not None and state.md.parent in states:
                states[state.md.parent].children.append(state.uuid)
        return states

    def scan(self) -> dict[str, dict[str, VolumeState]]:
        """Every volume by image from one ``lvs`` report and one read of the metadata
        area (all used slots at once), not a command or a read per volume."""
        lvs = self._volume_lvs()
        slots: dict[str, int] = {}
        for name, lv in lvs.items():
            value = lv.tag_value(sc.TAG_SLOT)
            if value is not None and value.isdigit():
                slots[name] = int(value)
        block_size, alignment = self.geometry()
        area = b""
        if slots:
            end = self._slot_offset(max(slots.values()) + 1)
            area = directio.read(self.held_path(sc.METADATA), sc.METADATA_BASE_V5,
                                 end - sc.METADATA_BASE_V5, block_size)
        leases = str(self.activator.link(self.uuid, sc.LEASES))
        out: dict[str, dict[str, VolumeState]] = {}
        for name, lv in lvs.items():
            img = lv.tag_value(sc.TAG_IMAGE) or ""
            if parse_uuid(img) != img:
                continue
            slot = slots.get(name)
            md, problem, lease = None, None, None
            if slot is None:
                problem = "no metadata slot"
            else:
                start = self._slot_offset(slot) - sc.METADATA_BASE_V5
                try:
                    md = VolumeMetadata.from_bytes(
                        area[start:start + max(sc.METADATA_SIZE, block_size)])
                except errors.VolumeMetadataReadError as e:
                    problem = str(e)
                lease = (leases, (sc.RESERVED_LEASES + slot) * alignment)
            out.setdefault(img, {})[name] = VolumeState(
                uuid=name, image=img, md=md, apparent_size=lv.size, true_size=lv.size,
                initializing=sc.TAG_INITIALIZING in lv.tags, lease=lease, slot=slot,
                problem=problem, located=lv)
        for states in out.values():
            for state in states.values():
                if state.md is not None and state.md.parent in states:
                    states[state.md.parent].children.append(state.uuid)
        return out

    def set_parent(self, img_uuid: str, vol_uuid: str, parent_uuid: str) -> None:
        """The parent lives twice on block domains: the PU_ tag and the metadata slot.
        The tag first: a reader that finds them different trusts the metadata."""
        with self.lock:
            lv = self.lv(vol_uuid)
            old = [t for t in lv.tags if t.startswith(sc.TAG_PARENT)]
            new = sc.TAG_PARENT + parent_uuid
            if old != [new]:
                try:
                    lvm.lv_change_tags(self.uuid, vol_uuid, self.devices,
                                       remove=[t for t in old if t != new], add=[new])
                except lvm.LVMError as e:
                    raise _lvm_error(errors.MetaDataGeneralError, vol_uuid, e) from e
            self.update_volume(img_uuid, vol_uuid, parent=parent_uuid)

    def ensure_allocation(self, img_uuid: str, vol_uuid: str, size: int) -> None:
        with self.lock:
            self._grow_lv(self.lv(vol_uuid), size)

    def _grow_lv(self, lv: lvm.LV, size: int) -> None:
        """Extend `lv` to at least `size` bytes (caller holds the lock); an active LV
        is refreshed under its user."""
        if size <= lv.size:
            return
        vg = self.vg()
        if -(-(size - lv.size) // vg.extent_size) > vg.free_count:
            raise errors.NoSpaceLeftOnDomain(self.uuid)
        log.info("extending LV %s/%s from %d to %d bytes", self.uuid, lv.name, lv.size, size)
        try:
            lvm.lvextend(self.uuid, lv.name, size, self.devices)
        except lvm.LVMError as e:
            raise errors.LogicalVolumeExtendError(self.uuid, lv.name, size) from e
        pe_starts, extent = self.layout()
        self.activator.refresh(self.lv(lv.name), pe_starts, extent, self.devices)

    def find_volume_image(self, vol_uuid: str) -> str | None:
        lv = self.lvs([vol_uuid]).get(vol_uuid)
        return None if lv is None else lv.tag_value(sc.TAG_IMAGE)

    def set_volume_metadata(self, img_uuid: str, vol_uuid: str, md: VolumeMetadata) -> None:
        state = self.volume(img_uuid, vol_uuid)
        if state.slot is None:
            raise errors.VolumeMetadataWriteError(vol_uuid, "no metadata slot")
        self.write_slot(state.slot, md.to_bytes())

    def _write_volume_metadata(self, state: VolumeState, md: VolumeMetadata) -> None:
        if state.slot is None:
            raise errors.VolumeMetadataWriteError(state.uuid, "no metadata slot")
        self.write_slot(state.slot, md.to_bytes())

    def _lv_size(self, req: CreateVolumeRequest) -> int:
        if req.format == sc.VolumeFormat.RAW:
            return req.capacity
        if req.prealloc == sc.Allocation.PREALLOCATED:
            return req.initial_size or req.capacity
        if req.initial_size:
            return int(req.initial_size * sc.COW_OVERHEAD)
        return min(sc.VOLUME_CHUNK, int(req.capacity * sc.COW_OVERHEAD) + sc.MiB)

    def _image_link(self, img_uuid: str, vol_uuid: str) -> Path:
        return self.images_dir() / img_uuid / vol_uuid

    def _link_volume(self, img_uuid: str, vol_uuid: str) -> Path:
        link = self._image_link(img_uuid, vol_uuid)
        link.parent.mkdir(parents=True, exist_ok=True)
        target = self.activator.link(self.uuid, vol_uuid)
        if not (link.is_symlink() and os.readlink(link) == str(target)):
            with contextlib.suppress(FileNotFoundError):
                link.unlink()
            link.symlink_to(target)
        return link

    def _unlink_volume(self, img_uuid: str, vol_uuid: str) -> None:
        link = self._image_link(img_uuid, vol_uuid)
        with contextlib.suppress(FileNotFoundError):
            link.unlink()
        with contextlib.suppress(OSError):
            link.parent.rmdir()

    def _undo_create(self, req: CreateVolumeRequest, made: list[str]) -> None:
        # The LV, its metadata slot, its link.
        log.info("volume %s: create stopped, removing what it made", req.vol_uuid)
        with self.lock:
            lv = self.lvs([req.vol_uuid]).get(req.vol_uuid)
            if lv is not None and lv.tag_value(sc.TAG_IMAGE) == req.img_uuid:
                slot = lv.tag_value(sc.TAG_SLOT)
                pe_starts, extent = self.layout()
                self.activator.unmap(lv, pe_starts, extent, self.devices)
                lvm.lvremove(self.uuid, [req.vol_uuid], self.devices)
                if slot is not None:
                    self.write_slot(int(slot), b"")
            self._unlink_volume(req.img_uuid, req.vol_uuid)
            if "parent" in made:
                Image(self, req.img_uuid).relink_parent_after_delete(req.parent_vol)

    def _create_volume(self, req: CreateVolumeRequest, progress: Progress,
                       made: list[str]) -> None:
        if req.format == sc.VolumeFormat.RAW and req.prealloc == sc.Allocation.SPARSE:
            raise errors.IncorrectFormat(req.vol_uuid, "RAW volumes on block must be "
                                         "PREALLOCATED")
        if req.format == sc.VolumeFormat.RAW and req.initial_size is not None:
            raise errors.InvalidParameterException("initialSize", "not allowed for RAW")
        with self.lock:
            parent = Image(self, req.img_uuid).validate_create(req)
            size = self._lv_size(req)
            # No free-space pre-check: lvcreate refuses atomically and its
            # "insufficient free space" becomes 397 below.
            slot = self._free_slot(self.lvs())
            tags = [sc.TAG_INITIALIZING, sc.TAG_IMAGE + req.img_uuid,
                    sc.TAG_PARENT + req.parent_vol, sc.TAG_SLOT + str(slot)]
            made.append("lv")  # a stopped lvcreate may still have made it
            try:
                lvm.lvcreate(self.uuid, req.vol_uuid, size, self.devices, tags=tags)
            except lvm.LVMError as e:
                if "already exists" in e.stderr:
                    raise errors.VolumeAlreadyExists(req.vol_uuid) from e
                if "insufficient free space" in e.stderr.lower():
                    raise errors.NoSpaceLeftOnDomain(self.uuid) from e
                raise _lvm_error(errors.CannotCreateLogicalVolume, req.vol_uuid, e) from e
            lv = self.lv(req.vol_uuid)
            capacity = req.capacity
            if req.format == sc.VolumeFormat.RAW:
                capacity = lv.size  # VDSM records the real LV size for RAW block volumes
            failpoints.hit("volume.create.after_data")
            md = self.new_metadata(req, capacity, sc.ILLEGAL)
            self.write_slot(slot, md.to_bytes())
        failpoints.hit("volume.create.after_metadata")
        progress(30)
        if req.format == sc.VolumeFormat.COW:
            self._format_qcow2(req, parent, lv)
        progress(60)
        cancel.check()
        if parent is not None and parent.md is not None and parent.md.voltype == sc.LEAF:
            made.append("parent")
            self.update_volume(req.img_uuid, parent.uuid, voltype=sc.INTERNAL)
        cancel.check()
        block_size, alignment = self.geometry()
        clusterlock.init_resource(self.uuid, req.vol_uuid, self.held_path(sc.LEASES),
                             (sc.RESERVED_LEASES + slot) * alignment, sector=block_size,
                             align=alignment)
        failpoints.hit("volume.create.after_lease")
        progress(80)
        cancel.check()
        # The last step is not stopped half way: once begun, the volume is complete.
        with self.lock, cancel.shielded():
            if req.legal:
                self.write_slot(slot, md.replace(legality=sc.LEGAL).to_bytes())
            try:
                lvm.lv_change_tags(self.uuid, req.vol_uuid, self.devices,
                                   remove=[sc.TAG_INITIALIZING])
            except lvm.LVMError as e:
                raise _lvm_error(errors.VolumeCreationError, req.vol_uuid, e) from e

    def _format_qcow2(self, req: CreateVolumeRequest, parent: VolumeState | None,
                      lv: lvm.LV) -> None:
        acquired = [lv.name]
        try:
            self._activate(lv)
            link = self._link_volume(req.img_uuid, req.vol_uuid)
            backing = backing_fmt = None
            if parent is not None and parent.md is not None:
                self._link_volume(req.img_uuid, parent.uuid)
                backing = parent.uuid
                backing_fmt = "qcow2" if parent.md.format == sc.VolumeFormat.COW else "raw"
            qemuimg.create(str(link), qemuimg.QCOW2, req.capacity, backing=backing,
                           backing_fmt=backing_fmt, cwd=str(link.parent))
        except qemuimg.QemuImgError as e:
            raise errors.VolumeCreationError(req.vol_uuid, str(e)) from e
        finally:
            with cancel.shielded():
                for name in acquired:
                    with contextlib.suppress(errors.VdsmError):
                        self._release(name)

    def delete_volume(self, img_uuid: str, vol_uuid: str, *, post_zero: bool, force: bool,
                      progress: Progress) -> None:
        with self.lock:
            state = Image(self, img_uuid).check_deletable(vol_uuid, force)
            lv = self.lv(vol_uuid)
            if state.md is not None and state.slot is not None:
                self.write_slot(state.slot, state.md.replace(legality=sc.ILLEGAL).to_bytes())
        if post_zero:
            # Stoppable between chunks; a stopped delete leaves the volume ILLEGAL and
            # whole (LV, slot), which a second delete removes.
            path = self._activate(lv)
            try:
                block_size, _ = self.geometry()
                directio.zero(path, 0, lv.size, block_size,
                              progress=lambda done, total: progress(80 * done / total))
            finally:
                with cancel.shielded():
                    self._release(vol_uuid)
        cancel.check()
        # Removing is quick and not stopped half way (no LV without its slot cleared).
        with self.lock, cancel.shielded():
            pe_starts, extent = self.layout()
            self.activator.unmap(lv, pe_starts, extent, self.devices)
            try:
                lvm.lvremove(self.uuid, [vol_uuid], self.devices)
            except lvm.LVMError as e:
                raise _lvm_error(errors.CannotRemoveLogicalVolume, vol_uuid, e) from e
            if state.slot is not None:
                # The slot is free once the MD_ tag is gone; clearing it keeps a later
                # reader from mistaking stale text for a volume.
                self.write_slot(state.slot, b"")
            self._unlink_volume(img_uuid, vol_uuid)
            progress(95)
            if state.md is not None:
                Image(self, img_uuid).relink_parent_after_delete(state.md.parent)

    def _grow_volume(self, img_uuid: str, vol_uuid: str, md: VolumeMetadata,
                     new_size: int) -> int:
        lv = self.lv(vol_uuid)
        capacity = new_size
        if md.format == sc.VolumeFormat.RAW or md.type == sc.Allocation.PREALLOCATED:
            vg = self.vg()
            needed = -(-(new_size - lv.size) // vg.extent_size)
            if needed > vg.free_count:
                raise errors.NoSpaceLeftOnDomain(self.uuid)
            if new_size > lv.size:
                try:
                    lvm.lvextend(self.uuid, vol_uuid, new_size, self.devices)
                except lvm.LVMError as e:
                    raise errors.LogicalVolumeExtendError(self.uuid, vol_uuid,
                                                          new_size) from e
                lv = self.lv(vol_uuid)
                pe_starts, extent = self.layout()
                self.activator.refresh(lv, pe_starts, extent, self.devices)
            if md.format == sc.VolumeFormat.RAW:
                capacity = lv.size
        if md.format == sc.VolumeFormat.COW:
            link = self._activate(lv)
            try:
                qemuimg.resize(str(link), qemuimg.QCOW2, new_size)
            except qemuimg.QemuImgError as e:
                raise errors.VolumeExtendingError(vol_uuid, str(e)) from e
            finally:
                self._release(vol_uuid)
        return capacity

    def ensure_lv_size(self, img_uuid: str, vol_uuid: str, size: int) -> None:
        """Grow a volume's LV to at least `size` bytes (its capacity unchanged): the
        room a live merge needs in its base. An active LV is refreshed under its user."""
        with self.lock:
            lv = self.lv(vol_uuid)
            if lv.tag_value(sc.TAG_IMAGE) != img_uuid:
                raise errors.VolumeDoesNotExist(vol_uuid)
            self._grow_lv(lv, size)

    def prepare_volume(self, img_uuid: str, vol_uuid: str) -> Path:
        lv = self.lv(vol_uuid)
        if lv.tag_value(sc.TAG_IMAGE) != img_uuid:
            raise errors.VolumeDoesNotExist(vol_uuid)
        self._activate(lv)
        return self._link_volume(img_uuid, vol_uuid)

    def prepare_read_volume(self, state: VolumeState) -> Path:
        lv = state.located
        if not isinstance(lv, lvm.LV) or lv.name != state.uuid or \
                lv.tag_value(sc.TAG_IMAGE) != state.image:
            return self.prepare_volume(state.image, state.uuid)
        self._activate(lv)
        return self._link_volume(state.image, state.uuid)

    def teardown_volume(self, img_uuid: str, vol_uuid: str) -> None:
        refs_before = self.activator.refs(self.uuid, vol_uuid)
        self._release(vol_uuid)
        if refs_before <= 1:
            link = self._image_link(img_uuid, vol_uuid)
            with contextlib.suppress(FileNotFoundError):
                link.unlink()

    def format(self) -> None:
        with self.lock:
            self.close()
            pe_starts, extent = self.layout()
            for lv in self.lvs().values():
                self.activator.unmap(lv, pe_starts, extent, self.devices)
            try:
                lvm.vgremove(self.uuid, self.devices)
                lvm.pvremove(self.devices)
            except lvm.LVMError as e:
                raise _lvm_error(errors.VolumeGroupRemoveError, self.uuid, e) from e
            shutil.rmtree(self.path, ignore_errors=True)


# --- creation --------------------------------------------------------------------------


def device_block_size(node: str) -> int:
    """The logical block size the kernel reports for a block device."""
    name = os.path.basename(os.path.realpath(node))
    return int(Path(f"/sys/class/block/{name}/queue/logical_block_size").read_text())


def check_new_vg(name: str, guids: list[str], nodes: dict[str, str], *,
                 force: bool) -> list[str]:
    """The device nodes of `guids` (GUID -> node in `nodes`) if they can become VG
    `name`: all visible, distinct, one block size, big enough, and free unless `force`."""
    if not guids:
        raise errors.InvalidParameterException("devlist", "empty")
    missing = [g for g in guids if g not in nodes]
    if missing:
        raise errors.InaccessiblePhysDev(missing)
    devices = [nodes[g] for g in guids]
    if len(set(devices)) != len(devices):
        raise errors.InvalidParameterException("devlist", "duplicate devices")
    if lvm.vgs(devices, [name]):
        raise errors.VolumeGroupAlreadyExistsError(name)
    sizes = {device_block_size(d) for d in devices}
    if len(sizes) != 1:
        raise errors.VolumeGroupBlockSizeError(name, sorted(sizes))
    luns = [lun for lun in devmod.discover() if lun.guid in set(guids)]
    total = sum(lun.capacity for lun in luns)
    if total < sc.MIN_VG_SIZE:
        raise errors.VolumeGroupSizeError(name, f"{total} < {sc.MIN_VG_SIZE} bytes")
    if not force:
        statuses = devmod.statuses(luns, check=True)
        used = [g for g, st in statuses.items() if st.state != "free"]
        if used:
            raise errors.VolumeGroupCreateError(name, ",".join(used),
                                                "LUNs are in use (force=true to wipe)")
    return devices


def create_vg(name: str, devices: list[str], *, force: bool) -> str:
    """LVMVolumeGroup.create: PVs + VG tagged UNREADY; returns the VG UUID."""
    try:
        lvm.pvcreate(devices, metadata_size=sc.VG_METADATA_SIZE, force=force)
        # Only the first PV carries VG metadata (VDSM keeps the others' areas ignored).
        lvm.run("pvchange", devices, "--metadataignore", "n", devices[0])
        lvm.vgcreate(name, devices, extent_size=sc.VG_EXTENT_SIZE,
                     tags=[sc.TAG_DOMAIN_UNREADY])
    except lvm.LVMError as e:
        raise errors.VolumeGroupCreateError(name, ",".join(devices), e.stderr.strip()[-300:]) \
            from e
    return lvm.vgs(devices, [name])[name].uuid


def create_block_domain(
    *, vg_name: str, devices: list[str], storage_type: sc.StorageType, name: str,
    domain_class: sc.DomainClass, block_size: int, alignment: int, io_timeout: int,
    activator: Activator, repository: Path, guid_of: GuidOf,
) -> BlockDomain:
    vg = lvm.vgs(devices, [vg_name])[vg_name]
    if set(vg.tags) != {sc.TAG_DOMAIN_UNREADY}:
        raise errors.VolumeGroupHasDomainTag(vg_name, ",".join(vg.tags))
    if lvm.lvs(vg_name, devices):
        raise errors.StorageDomainNotEmpty(vg_name)
    pvs = lvm.pvs(devices)
    first_pv = vg.pv_names[0]
    sizes = {
        sc.LEASES: sc.LEASES_SLOTS * alignment,
        sc.IDS: sc.SPECIAL_LV_SIZES_MIB[sc.IDS] * sc.MiB,
        sc.INBOX: sc.SPECIAL_LV_SIZES_MIB[sc.INBOX] * sc.MiB,
        sc.OUTBOX: sc.SPECIAL_LV_SIZES_MIB[sc.OUTBOX] * sc.MiB,
        sc.XLEASES: sc.XLEASES_SLOTS * alignment,
        sc.MASTER: sc.MASTER_LV_SIZE,
    }
    needed = sc.METADATA_LV_SIZE + sum(-(-s // vg.extent_size) * vg.extent_size
                                       for s in sizes.values())
    if vg.free < needed:
        raise errors.VolumeGroupSizeError(vg_name, f"needs {needed} bytes, has {vg.free}")
    try:
        # metadata first, on the PV holding the VG metadata, so PV0 maps from extent 0.
        lvm.lvcreate(vg_name, sc.METADATA, sc.METADATA_LV_SIZE, devices, on_pv=first_pv)
        for lv_name, size in sizes.items():
            lvm.lvcreate(vg_name, lv_name, size, devices)
    except lvm.LVMError as e:
        raise errors.StorageDomainCreationError(vg_name, e.stderr.strip()[-300:]) from e

    domain = BlockDomain(vg_name, devices, activator, repository, guid_of)
    try:
        # Zero what VDSM zeroes: the metadata area (slots) and the mailboxes.
        block = max(block_size, 512)
        directio.zero(domain.held_path(sc.METADATA), 0, sc.RESERVED_METADATA_SIZE, block)
        for box in (sc.INBOX, sc.OUTBOX):
            path = domain._activate(domain.lv(box))
            try:
                directio.zero(path, 0, -(-sc.RESERVED_MAILBOX_SIZE // block) * block, block)
            finally:
                domain._release(box)
        master = domain._activate(domain.lv(sc.MASTER))
        try:
            commands.run(["mkfs", "-t", "ext3", "-q", "-F", "-E", "nodiscard", str(master)],
                         timeout=600)
        finally:
            domain._release(sc.MASTER)
        clusterlock.init_lockspace(vg_name, domain.held_path(sc.IDS), sector=block_size,
                              align=alignment, io_timeout=io_timeout)
        clusterlock.init_resource(vg_name, sc.SDM_LEASE_NAME, domain.held_path(sc.LEASES),
                             sc.SDM_LEASE_SLOT * alignment, sector=block_size, align=alignment)
        # VDSM formats the external leases index at creation (format_external_leases).
        xleases.format_index(vg_name, domain.xleases_path(), alignment=alignment,
                             block_size=block_size)
        extra = {K_VGUUID: vg.uuid}
        mapoffset = 0
        for i, pv_name in enumerate(vg.pv_names):
            pv = pvs[pv_name]
            extra[f"PV{i}"] = (f"pv:{guid_of(pv_name)},uuid:{pv.uuid},pestart:0,"
                               f"pecount:{pv.pe_count},mapoffset:{mapoffset}")
            mapoffset += pv.pe_count
        md = initial_metadata(sd_uuid=vg_name, storage_type=storage_type, name=name,
                              domain_class=domain_class, block_size=block_size,
                              alignment=alignment, extra=extra)
        lvm.vg_change_tags(vg_name, devices, add=persistent.dump_tags(md))
        lvm.vg_change_tags(vg_name, devices, add=[sc.TAG_DOMAIN],
                           remove=[sc.TAG_DOMAIN_UNREADY])
    except (lvm.LVMError, commands.CommandError, OSError) as e:
        domain.close()
        raise errors.StorageDomainCreationError(vg_name, str(e)[-300:]) from e
    except BaseException:
        domain.close()
        raise
    return domain
