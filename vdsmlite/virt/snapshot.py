"""Live snapshots (VM.snapshot): every listed drive of a running VM moves to the new
leaf the engine created for it, or none does.

For each drive the engine has already made the new qcow2 leaf with ``Volume.create``
(its parent the drive's current leaf). Here:

1. every drive is checked (a known volume disk, ``baseVolumeID`` its current leaf, the
   new volume a COW child of it) and its new volume prepared; direct LUNs are skipped,
   as VDSM skips them;
2. the overlays are added to qemu with ``blockdev-add`` (``backing: null``: qemu must
   not open the chain again under it; ``blockdev-snapshot`` links it to the running
   leaf), named `qemu.overlay_names`;
3. one QMP ``transaction`` of ``blockdev-snapshot`` actions moves all drives at once;
4. the definition follows (source volume, path, chain, format COW) and is saved.

A failure at any step removes the overlays added and tears the new volumes down, so
every drive stays on its old leaf and the new volumes are unused. Memory snapshots
(``snapMemory``) are refused: a VM here has no memory to save beyond qemu's.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any

from vdsmlite import errors
from vdsmlite.storage import constants as sc
from vdsmlite.storage.sd import Domain
from vdsmlite.virt import qemu
from vdsmlite.virt.definition import DiskFormat, DiskSpec, LunSource, VolumeSource
from vdsmlite.virt.qmp import QmpError, QmpSession

log = logging.getLogger("vdsmlite.virt.snapshot")


@dataclass
class SnapDrive:
    """One drive to snapshot: the disk, its domain and the new volume."""

    disk: DiskSpec
    dom: Domain
    new_vol: str
    path: str = ""
    block: bool = False
    prepared: bool = False


def parse_drives(snap_drives: list[dict[str, Any]]) -> list[dict[str, str]]:
    out = []
    for i, d in enumerate(snap_drives):
        if not isinstance(d, dict):
            raise errors.InvalidParameter(f"snapDrives[{i}] is not a map")
        out.append({k: str(v) for k, v in d.items()})
    return out


def match_drives(disks: list[DiskSpec], requested: list[dict[str, str]]
                 ) -> list[tuple[DiskSpec, str]]:
    """(disk, new volume) per requested volume drive; LUN drives skipped."""
    out: list[tuple[DiskSpec, str]] = []
    for i, req in enumerate(requested):
        if "GUID" in req or req.get("device") == "lun":
            continue  # VDSM skips direct LUNs: nothing of theirs to snapshot
        img, sd = req.get("imageID"), req.get("domainID")
        new_vol, base = req.get("volumeID"), req.get("baseVolumeID")
        if not (img and sd and new_vol):
            raise errors.InvalidParameter(f"snapDrives[{i}]: domainID, imageID and "
                                          "volumeID are required")
        disk = next((d for d in disks if isinstance(d.source, VolumeSource)
                     and d.source.image_id == img and d.source.domain_id == sd), None)
        if disk is None:
            if any(isinstance(d.source, LunSource) and d.source.guid == img for d in disks):
                continue
            raise errors.SnapshotFailed(f"snapDrives[{i}]: the VM has no disk of image "
                                        f"{img} on domain {sd}")
        assert isinstance(disk.source, VolumeSource)
        if base and base != disk.source.volume_id:
            raise errors.SnapshotFailed(f"disk {disk.name}: baseVolumeID {base} is not its "
                                        f"leaf {disk.source.volume_id}")
        if new_vol == disk.source.volume_id or new_vol in disk.chain:
            raise errors.SnapshotFailed(f"disk {disk.name}: {new_vol} is already in its "
                                        "chain")
        if any(d is disk for d, _ in out):
            raise errors.SnapshotFailed(f"disk {disk.name} listed twice")
        out.append((disk, new_vol))
    return out


def prepare(drives: list[SnapDrive]) -> None:
    """Blocking: check and prepare every new volume; all or nothing."""
    try:
        for d in drives:
            src = d.disk.source
            assert isinstance(src, VolumeSource)
            state = d.dom.volume(src.image_id, d.new_vol)
            md = state.md
            if md is None or state.legality != sc.LEGAL:
                raise errors.SnapshotFailed(f"disk {d.disk.name}: volume {d.new_vol} is "
                                            "not a legal volume")
            if md.parent != src.volume_id or md.format != sc.VolumeFormat.COW:
                raise errors.SnapshotFailed(
                    f"disk {d.disk.name}: volume {d.new_vol} is not a COW child of the "
                    f"leaf {src.volume_id} (parent {md.parent}, {md.format})")
            d.path = str(d.dom.prepare_volume(src.image_id, d.new_vol))
            d.prepared = True
            d.block = qemu.is_block_device(d.path)
    except errors.VdsmError as e:
        teardown(drives)
        if isinstance(e, errors.SnapshotFailed):
            raise
        raise errors.SnapshotFailed(f"{e.message}") from e
    except BaseException:
        teardown(drives)
        raise


def teardown(drives: list[SnapDrive]) -> None:
    """Blocking: release the new volumes prepared (never raises)."""
    for d in drives:
        if not d.prepared:
            continue
        src = d.disk.source
        assert isinstance(src, VolumeSource)
        try:
            d.dom.teardown_volume(src.image_id, d.new_vol)
        except errors.VdsmError as e:
            log.warning("cannot tear down %s/%s: %s", src.image_id, d.new_vol, e)
        d.prepared = False


def overlay_nodes(d: SnapDrive) -> list[dict[str, Any]]:
    names = qemu.overlay_names(d.disk.name, d.new_vol)
    cache = {"direct": True, "no-flush": False}
    return [
        {"driver": "host_device" if d.block else "file", "node-name": names.storage,
         "filename": d.path, "aio": "native", "cache": cache, "read-only": False},
        {"driver": "qcow2", "node-name": names.format, "file": names.storage,
         "cache": cache, "read-only": False, "backing": None},
    ]


async def switch(session: QmpSession, drives: list[SnapDrive]) -> None:
    """Add the overlays and move every drive onto its overlay in one transaction;
    on failure, nothing of it stays in qemu (raises SnapshotFailed)."""
    added: list[str] = []
    try:
        roots = await root_nodes(session)
        actions = []
        for d in drives:
            for node in overlay_nodes(d):
                await session.blockdev_add(node)
                added.append(node["node-name"])
            device = qemu.disk_names(d.disk.name).device
            if device not in roots:
                raise errors.SnapshotFailed(f"disk {d.disk.name}: not attached in qemu")
            actions.append({"type": "blockdev-snapshot", "data": {
                "node": roots[device], "overlay": qemu.overlay_names(d.disk.name,
                                                                     d.new_vol).format}})
        await session.execute("transaction", {"actions": actions})
    except (QmpError, errors.VdsmError) as e:
        for name in reversed(added):
            try:
                await session.blockdev_del(name)
            except QmpError as e2:
                log.error("%s: cannot remove overlay node %s: %s", session.name, name, e2)
        if isinstance(e, errors.SnapshotFailed):
            raise
        raise errors.SnapshotFailed(str(e)) from e


def commit_definition(drives: list[SnapDrive]) -> None:
    """The definition follows qemu: the new leaf is each drive's volume."""
    for d in drives:
        src = d.disk.source
        assert isinstance(src, VolumeSource)
        d.disk.source = dataclasses.replace(src, volume_id=d.new_vol)
        d.disk.chain = [*d.disk.chain, d.new_vol]
        d.disk.path = d.path
        d.disk.format = DiskFormat.COW
        d.prepared = False  # now the VM's: released with the disk


async def root_nodes(session: QmpSession) -> dict[str, str]:
    """qdev id -> the node-name of its root (active) node, from query-block."""
    out = {}
    for b in await session.query_block():
        qdev = b.get("qdev") or ""
        if qdev.endswith("/virtio-backend"):
            qdev = qdev.rsplit("/", 2)[-2]
        inserted = b.get("inserted")
        if inserted and inserted.get("node-name"):
            out[qdev] = inserted["node-name"]
    return out
