"""Cold merge: the data of a part of an image's chain committed into the volume below it,
for an image no VM is using (SDM.merge).

``base <- [v1 <- ... <-] top [<- child]``: after the merge `base` holds what `top`
showed, `child` (if any) names `base` as its parent, and `top` (with every volume
between) is ILLEGAL for the engine to delete. VDSM only merges a top whose parent is
the base; vdsmlite also takes a longer part (``qemu-img commit -b`` commits all of it).

Crash safety is VDSM's: the data step only ever makes `base` a superset - ``qemu-img
commit -b`` leaves `top` untouched, so the chain seen from the leaf reads the same
bytes before, during and after it - and the metadata changes only at the end. The
steps, each safe to repeat:

1. `base` is marked ILLEGAL: the mark of a merge in progress. An image whose merge was
   interrupted cannot be prepared for a VM (its base is ILLEGAL) until a retry ends it.
2. `base` grows to `top`'s capacity; on block domains its LV is extended to what
   ``qemu-img measure`` says the merged data needs (VDSM's merge.prepare).
3. ``qemu-img commit`` of `top` into `base`.
4. `top` (and the volumes between) ILLEGAL; the child rebased (``qemu-img rebase -u``)
   onto `base`, then its metadata parent (and PU_ tag) set to `base`.
5. `base` LEGAL with its generation increased, in one metadata write (VDSM's
   volume operation): the merge is complete.

A retry of the same SDM.merge after a crash at any point repeats the steps and ends in
the same state: the generation changes only in step 5, so the engine's
``base_generation`` still matches; an ILLEGAL `top` is accepted; a child already moved
to `base` leaves a `top` without children, merged as a leaf (step 4 then only marks it).

Blocking (qemu-img, LVM, metadata I/O): run from a job, under the image lock, the SDM
lease and the base volume's lease.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

from vdsmlite import errors, failpoints
from vdsmlite.storage import constants as sc
from vdsmlite.storage import qemuimg
from vdsmlite.storage.image import Image
from vdsmlite.storage.sd import Domain, VolumeState

log = logging.getLogger("vdsmlite.storage.merge")

Progress = Callable[[float], None]


@dataclass(frozen=True)
class Subchain:
    sd_id: str
    img_id: str
    top_id: str
    base_id: str
    base_generation: int | None = None


class Endpoint(NamedTuple):
    """One volume and the generation the caller expects (VDSM's vol_info)."""

    sd_id: str
    img_id: str
    vol_id: str
    generation: int


@dataclass
class Plan:
    chain: list[VolumeState]  # base first, top last
    child: VolumeState | None  # the volume above top, if top is not the leaf

    @property
    def base(self) -> VolumeState:
        return self.chain[0]

    @property
    def top(self) -> VolumeState:
        return self.chain[-1]


def next_generation(gen: int) -> int:
    return (gen + 1) % (sc.MAX_GENERATION + 1)


def _md(state: VolumeState) -> object:
    if state.md is None:
        raise errors.VolumeMetadataReadError(state.uuid, state.problem or "no metadata")
    return state.md


def plan(dom: Domain, sub: Subchain) -> Plan:
    """Check the subchain (VDSM's SubchainInfo.validate plus the generation) and say
    which volumes the merge touches."""
    states = Image(dom, sub.img_id).volumes()
    for vol in (sub.base_id, sub.top_id):
        if vol not in states:
            raise errors.VolumeIsNotInChain(sub.sd_id, sub.img_id, vol)
    if sub.base_id == sub.top_id:
        raise errors.WrongParentVolume(sub.base_id, sub.top_id)
    chain: list[VolumeState] = []
    current = states[sub.top_id]
    while True:
        _md(current)
        assert current.md is not None
        chain.append(current)
        if current.uuid == sub.base_id:
            break
        parent = current.md.parent
        if parent not in states or any(s.uuid == parent for s in chain):
            raise errors.WrongParentVolume(sub.base_id, sub.top_id)
        current = states[parent]
    chain.reverse()
    for state in chain:
        assert state.md is not None
        if state.md.voltype == sc.SHARED:
            raise errors.SharedVolumeNonWritable(state.uuid)
    base_md = chain[0].md
    assert base_md is not None
    if sub.base_generation is not None and base_md.generation != sub.base_generation:
        raise errors.GenerationMismatch(sub.base_generation, base_md.generation)
    children = [s for s in states.values()
                if s.md is not None and s.md.parent == sub.top_id]
    if len(children) > 1:
        raise errors.ImageIsNotLegalChain(
            sub.img_id, f"volume {sub.top_id} has several children")
    return Plan(chain=chain, child=children[0] if children else None)


def _fmt(state: VolumeState) -> str:
    assert state.md is not None
    return qemuimg.QCOW2 if state.md.format == sc.VolumeFormat.COW else qemuimg.RAW


def _extend_base(dom: Domain, p: Plan, paths: dict[str, str], block: bool) -> None:
    """VDSM's merge.prepare: grow base to top's capacity and, on block, its LV to what
    the merged data needs (a leaf-to-be also gets one allocation chunk)."""
    base, top = p.base, p.top
    assert base.md is not None and top.md is not None
    img = base.image
    if top.md.capacity > base.md.capacity:
        log.info("merge: growing base %s to the capacity of top %s (%d)", base.uuid,
                 top.uuid, top.md.capacity)
        dom.extend_volume(img, base.uuid, top.md.capacity)
    if not block or base.md.format != sc.VolumeFormat.COW:
        return
    measure = qemuimg.measure_subchain([(paths[s.uuid], _fmt(s)) for s in p.chain],
                                       block=True)
    required = int(measure["required"]) + int(measure.get("bitmaps", 0))
    capacity = max(top.md.capacity, base.md.capacity)
    size = required + (sc.VOLUME_CHUNK if p.child is None else 0)
    size = min(size, int(capacity * sc.COW_OVERHEAD) + sc.MiB)
    size = max(size, required)
    log.info("merge: base %s needs %d bytes (measured %d)", base.uuid, size, required)
    dom.ensure_allocation(img, base.uuid, size)


def run(dom: Domain, sub: Subchain, progress: Progress,
        check: Callable[[], None] = lambda: None) -> None:
    """The whole cold merge (see the module doc); `check` raises if a lease was lost."""
    p = plan(dom, sub)
    base, top = p.base, p.top
    img = sub.img_id
    between = p.chain[1:]  # top and everything between it and base
    log.info("cold merge of %s into %s (image %s, %s)", [s.uuid for s in between],
             base.uuid, img, "leaf" if p.child is None else f"child {p.child.uuid}")

    # 1. the merge-in-progress mark
    if base.legality != sc.ILLEGAL:
        dom.update_volume(img, base.uuid, legality=sc.ILLEGAL)
    failpoints.hit("merge.after_mark")
    progress(5)

    leaf = p.child.uuid if p.child is not None else top.uuid
    # Torn down volume by volume after: the chain under `leaf` changes on the way.
    prepared = Image(dom, img).prepare(leaf, allow_illegal=True)
    try:
        img_dir = dom.images_dir() / img
        paths = {s.uuid: str(img_dir / s.uuid) for s in p.chain}
        block = dom.read_storage_type().is_block
        # 2. room for the merged data
        try:
            _extend_base(dom, p, paths, block)
        except qemuimg.QemuImgError as e:
            raise errors.MergeFailed(f"measure: {e}") from e
        check()
        progress(10)
        failpoints.hit("merge.before_commit")
        # 3. the data
        try:
            qemuimg.commit(paths[top.uuid], _fmt(top), paths[base.uuid], cwd=str(img_dir))
        except qemuimg.QemuImgError as e:
            raise errors.MergeFailed(f"qemu-img commit: {e}") from e
        failpoints.hit("merge.after_commit")
        check()
        progress(85)
        # 4. the volumes merged away, and the child moved onto base
        for state in between:
            if state.legality != sc.ILLEGAL:
                dom.update_volume(img, state.uuid, legality=sc.ILLEGAL)
        failpoints.hit("merge.after_illegal")
        if p.child is not None:
            child = p.child
            assert child.md is not None
            if child.md.format == sc.VolumeFormat.COW:
                try:
                    qemuimg.rebase_unsafe(str(img_dir / child.uuid), base.uuid, _fmt(base),
                                          cwd=str(img_dir))
                except qemuimg.QemuImgError as e:
                    raise errors.MergeFailed(f"qemu-img rebase: {e}") from e
            failpoints.hit("merge.after_rebase")
            dom.set_parent(img, child.uuid, base.uuid)
        failpoints.hit("merge.after_relink")
        progress(95)
    finally:
        for state in reversed(prepared):
            dom.teardown_volume(img, state.uuid)
    # 5. done: base usable again, its generation moved on (one write)
    fresh = dom.volume(img, base.uuid)
    assert fresh.md is not None
    dom.update_volume(img, base.uuid, legality=sc.LEGAL,
                      generation=next_generation(fresh.md.generation))
    log.info("cold merge into %s done", base.uuid)
