"""StorageDomain.getSnapshotOverview: what takes how much space on a domain, and whose.

For every image of the domain its chain (base first) with each volume's capacity,
size on storage, creation time, description, legality and parent, joined with the
domain's OVF_STORE: the VM or Template the disk belongs to, the disk alias, and the
snapshot (description, date) each volume is. Images no OVF names are listed as
unattached (floating disks, or leftovers the engine no longer knows).

Fast on big domains: the volumes come from one `Domain.scan` (block: one ``lvs`` and
one read of the metadata area; file: one walk of the images directory), the OVF_STORE
from `OvfService`'s cache of parsed stores.
"""

from __future__ import annotations

from typing import Any

from vdsmlite.blocking import RunBlocking
from vdsmlite.sdm.ovfstore import OvfService, StoreContents
from vdsmlite.sdm.volumes import VolumeService
from vdsmlite.storage import ovfstore
from vdsmlite.storage.sd import VolumeState


def _ordered(states: dict[str, VolumeState]) -> list[VolumeState]:
    """The image's volumes base first along parent links; volumes off the chain (a
    broken or branched image) after, by id."""
    roots = [s for s in states.values()
             if s.md is None or s.md.parent not in states]
    out: list[VolumeState] = []
    seen: set[str] = set()
    pending = sorted(roots, key=lambda s: s.uuid)
    while pending:
        state = pending.pop(0)
        if state.uuid in seen:
            continue
        seen.add(state.uuid)
        out.append(state)
        pending[:0] = [states[c] for c in sorted(state.children) if c not in seen]
    out.extend(s for v, s in sorted(states.items()) if v not in seen)
    return out


def _volume(state: VolumeState, snapshot: dict[str, Any] | None) -> dict[str, Any]:
    md = state.md
    return {
        "volumeID": state.uuid,
        "parent": md.parent if md is not None else "",
        "capacity": md.capacity if md is not None else 0,
        "truesize": state.true_size,
        "apparentsize": state.apparent_size,
        "ctime": md.ctime if md is not None else 0,
        "description": md.description if md is not None else "",
        "legality": state.legality,
        "voltype": md.voltype if md is not None else "",
        "format": md.format if md is not None else "",
        "generation": md.generation if md is not None else 0,
        "snapshot": snapshot,
    }


def build(sd_uuid: str, scanned: dict[str, dict[str, VolumeState]],
          contents: StoreContents | None) -> dict[str, Any]:
    # image id -> (entity, disk) from the store's summaries
    owners: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {}
    if contents is not None:
        for entity in contents.entities.summaries():
            for disk in entity.get("disks", []):
                if disk.get("imageId"):
                    owners.setdefault(disk["imageId"], (entity, disk))
    images: list[dict[str, Any]] = []
    total = 0
    count = 0
    for img, states in sorted(scanned.items()):
        owner = owners.get(img)
        store = any(ovfstore.is_store(s) for s in states.values())
        snapshots: dict[str, dict[str, Any]] = {}
        vol_snapshots: dict[str, str] = {}
        entity_view = disk_view = None
        if owner is not None:
            entity, disk = owner
            snapshots = {s["id"]: s for s in entity.get("snapshots", [])}
            vol_snapshots = disk.get("volumeSnapshots") or {}
            entity_view = {"id": entity["id"], "name": entity.get("name"),
                           "type": entity.get("type")}
            disk_view = {"diskId": disk.get("diskId"), "alias": disk.get("alias"),
                         "description": disk.get("description")}
        volumes = []
        size = 0
        for state in _ordered(states):
            snap_id = vol_snapshots.get(state.uuid)
            snap = None
            if snap_id:
                found = snapshots.get(snap_id, {})
                snap = {"id": snap_id, "type": found.get("type"),
                        "description": found.get("description"),
                        "creationDate": found.get("creationDate")}
            volumes.append(_volume(state, snap))
            size += state.true_size
        total += size
        count += len(volumes)
        images.append({
            "imageID": img,
            "attached": owner is not None,
            "ovfStore": store,
            "entity": entity_view,
            "disk": disk_view,
            "truesize": size,
            "volumes": volumes,
        })
    return {
        "storagedomainID": sd_uuid,
        "store": contents.describe() if contents is not None else None,
        "images": images,
        "volumes": count,
        "truesize": total,
    }


class SnapshotOverview:
    def __init__(self, *, volumes: VolumeService, ovf: OvfService,
                 run_blocking: RunBlocking) -> None:
        self._volumes = volumes
        self._ovf = ovf
        self._run_blocking = run_blocking

    async def overview(self, sd_uuid: str) -> dict[str, Any]:
        dom = await self._volumes.domain(sd_uuid)
        scanned = await self._run_blocking(dom.scan)
        contents = await self._ovf.contents(sd_uuid, scanned=scanned)
        return await self._run_blocking(build, sd_uuid, scanned, contents)

