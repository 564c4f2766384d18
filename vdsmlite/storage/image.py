"""Images: a chain of volumes on one domain, and the rules that keep it a chain.

An image is what a VM sees as one disk: a base volume and the snapshots
stacked on it (each volume's metadata names its parent; the leaf has no
child). The domain layouts (`filesd`, `blocksd`) store volumes; this module
knows how they hang together:

* which chain a leaf stands on (base first), and that it has no gaps or loops;
* what a new volume may be (a snapshot is COW, in the same image, on a legal
  parent no smaller than itself) and what may be deleted (no children, no
  shared template volume unless forced);
* preparing a whole chain for use, rolled back when a volume fails, and the
  matching teardown, leaf first;
* deleting a whole image leaf first, so no volume ever loses its parent;
* the per-volume view `StorageDomain.dump` returns.

Blocking (metadata reads, LVM): callers run it in the executor. Structural
changes run under the domain's lock, taken by the layouts.
"""

from __future__ import annotations

from typing import Any

from vdsmlite import errors
from vdsmlite.storage import constants as sc
from vdsmlite.storage.sd import CreateVolumeRequest, Domain, Progress, VolumeState


class Image:
    """One image of `dom`; holds nothing storage does not (re-read on every call)."""

    def __init__(self, dom: Domain, img_uuid: str) -> None:
        self.dom = dom
        self.uuid = img_uuid

    def volumes(self) -> dict[str, VolumeState]:
        """Every volume of the image by UUID, with its children filled in."""
        return self.dom.volumes(self.uuid)

    def volume(self, vol_uuid: str) -> VolumeState:
        """One volume with its children; 201 if it is not in this image."""
        states = self.volumes()
        if vol_uuid not in states:
            raise errors.VolumeDoesNotExist(vol_uuid)
        return states[vol_uuid]

    def leaves(self) -> list[VolumeState]:
        return [s for s in self.volumes().values() if not s.children]

    def chain(self, leaf_uuid: str) -> list[VolumeState]:
        """The volumes under `leaf_uuid`, base first, leaf last."""
        states = self.volumes()
        if leaf_uuid not in states:
            raise errors.VolumeDoesNotExist(leaf_uuid)
        chain: list[VolumeState] = []
        current: str | None = leaf_uuid
        while current and current != sc.BLANK_UUID:
            state = states.get(current)
            if state is None:
                raise errors.ImageIsNotLegalChain(self.uuid, f"missing volume {current}")
            if state in chain:
                raise errors.ImageIsNotLegalChain(self.uuid, "loop in chain")
            chain.append(state)
            current = state.md.parent if state.md else None
        return list(reversed(chain))

    # --- rules for changes ------------------------------------------------------------

    def validate_create(self, req: CreateVolumeRequest) -> VolumeState | None:
        """Checks common to both layouts; returns the parent's state for snapshots."""
        dom = self.dom
        if dom.find_volume_image(req.vol_uuid) is not None:
            raise errors.VolumeAlreadyExists(req.vol_uuid)
        if req.capacity < 1:
            raise errors.CreateVolumeSizeError(req.capacity)
        if req.disktype not in sc.DISK_TYPES:
            raise errors.InvalidParameterException("diskType", req.disktype)
        if req.initial_size is not None and req.initial_size > req.capacity:
            raise errors.InvalidParameterException("initialSize", req.initial_size)
        # Metadata that cannot fit its 512-byte block (a long non-ASCII description)
        # is refused now, before anything is made on storage.
        dom.new_metadata(req, req.capacity, sc.ILLEGAL).to_bytes()
        if not req.has_parent:
            return None
        if req.parent_img not in (req.img_uuid, sc.BLANK_UUID):
            # Template clones (a parent in another image) need the parent shared into
            # the new image; not supported yet.
            raise errors.UnsupportedOperation(
                "snapshot parent must be in the same image", req.parent_img)
        if req.format != sc.VolumeFormat.COW:
            raise errors.IncorrectFormat(req.vol_uuid, "a snapshot must be COW")
        try:
            parent = dom.volume(req.img_uuid, req.parent_vol)
        except errors.VolumeDoesNotExist as e:
            # The parent is what is missing, whatever the layout said.
            raise errors.VolumeDoesNotExist(req.parent_vol) from e
        if parent.legality != sc.LEGAL or parent.md is None:
            raise errors.ImageIsNotLegalChain(req.img_uuid, f"parent {req.parent_vol} illegal")
        if req.capacity < parent.md.capacity:
            raise errors.InvalidParameterException(
                "size", f"{req.capacity} < parent capacity {parent.md.capacity}")
        return parent

    def check_deletable(self, vol_uuid: str, force: bool) -> VolumeState:
        state = self.volume(vol_uuid)
        if state.children and not force:
            raise errors.VolumeImageHasChildren(vol_uuid, ",".join(state.children))
        if state.md is not None and state.md.voltype == sc.SHARED and not force:
            raise errors.CannotDeleteVolume(vol_uuid, "shared (template) volume")
        return state

    def relink_parent_after_delete(self, parent_uuid: str) -> None:
        """A parent that lost its last child becomes a leaf again."""
        if parent_uuid == sc.BLANK_UUID:
            return
        try:
            parent = self.volume(parent_uuid)
        except errors.VolumeDoesNotExist:
            return
        if not parent.children and parent.md is not None and parent.md.voltype == sc.INTERNAL:
            self.dom.update_volume(self.uuid, parent_uuid, voltype=sc.LEAF)

    # --- use ------------------------------------------------------------------------

    def prepare(self, leaf_uuid: str, *, allow_illegal: bool = False) -> list[VolumeState]:
        """Activate the chain under `leaf_uuid` (base first); all or nothing."""
        chain = self.chain(leaf_uuid)
        if not allow_illegal:
            for state in chain:
                if state.legality != sc.LEGAL:
                    raise errors.PrepareIllegalVolumeError(state.uuid)
        prepared: list[str] = []
        try:
            for state in chain:
                self.dom.prepare_volume(self.uuid, state.uuid)
                prepared.append(state.uuid)
        except BaseException:
            for done in reversed(prepared):
                self.dom.teardown_volume(self.uuid, done)
            raise
        return chain

    def teardown(self, leaf_uuid: str | None = None) -> None:
        """Release the chain under `leaf_uuid` (default: the image's leaf), leaf first."""
        if leaf_uuid is None:
            leaves = self.leaves()
            if not leaves:
                return
            leaf_uuid = leaves[0].uuid
        for state in reversed(self.chain(leaf_uuid)):
            self.dom.teardown_volume(self.uuid, state.uuid)

    def delete(self, *, post_zero: bool, progress: Progress) -> None:
        """Delete every volume, leaves first, so no volume is deleted under a child."""
        remaining = self.volumes()
        total = len(remaining)
        while remaining:
            leaves = [v for v, s in remaining.items() if not s.children]
            if not leaves:
                raise errors.ImageIsNotLegalChain(self.uuid, "no leaf volume (loop?)")
            for vol_uuid in leaves:
                self.dom.delete_volume(self.uuid, vol_uuid, post_zero=post_zero, force=True,
                                       progress=lambda p: None)
            remaining = self.volumes()
            progress(100 * (total - len(remaining)) / total)


def dump(dom: Domain) -> dict[str, Any]:
    """StorageDomain.dump: the domain's info and every volume's metadata, by volume."""
    volumes: dict[str, Any] = {}
    for img in dom.image_ids():
        for vol_uuid, state in dom.volumes(img).items():
            entry: dict[str, Any] = {"image": img, "status": state.status,
                                     "legality": state.legality,
                                     "apparentsize": state.apparent_size,
                                     "truesize": state.true_size}
            if state.md is not None:
                md = state.md
                entry.update(capacity=md.capacity, ctime=md.ctime,
                             description=md.description, disktype=md.disktype,
                             format=md.format, generation=md.generation,
                             sequence=md.sequence, parent=md.parent, type=md.type,
                             voltype=md.voltype)
            if state.slot is not None:
                entry["mdslot"] = state.slot
            volumes[vol_uuid] = entry
    return {"metadata": dom.info(), "volumes": volumes}
