"""What an OVF says: the data model the reader fills, and the error for refusing one.

An OVF_STORE holds one ``<uuid>.ovf`` per VM or template. `Entity` is what we know
about one of them - enough to list a domain's VMs and templates and to tell which
images and volumes each owns; `Disk` and `Snapshot` are its parts. Every form here
is a plain frozen value with ``to_dict()``, the shape the verbs return and the
worker processes send back.

This is the floor of the package: no XML, no I/O, so every other room (the gate in
`safexml`, the `reader`, the archive in `tarstream`, the `workers`) can use it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import orjson

# How much of a value an error message may quote: the input is untrusted and may be
# huge, so errors say what is wrong without echoing it.
_EXCERPT = 200


class OvfError(ValueError):
    """An OVF we refuse or cannot interpret; the message never quotes the input at length."""


def excerpt(text: str) -> str:
    """`text` cut short enough to quote in an `OvfError`."""
    return text if len(text) <= _EXCERPT else text[:_EXCERPT] + "..."


def compact_json(value: Any) -> bytes:
    """`value` as compact JSON on one line (strings escape their newlines): how an
    index keeps a summary (`Entity.to_dict()`, see `sdm.entityset`) and its record.
    orjson, or json where orjson refuses: an integer beyond 64 bits, which a hostile
    OVF's disk size or the engine's metadata.json may hold."""
    try:
        return orjson.dumps(value)
    except TypeError:
        return json.dumps(value, separators=(",", ":")).encode()


@dataclass(frozen=True, slots=True)
class Disk:
    """One disk of an entity: an image (all its volumes) or a direct LUN.

    Attributes come from the image's leaf volume. Sizes are bytes.
    """

    disk_id: str                  # ovf:diskId: the leaf volume id in engine OVFs, the disk
                                  # (image) id in OVA-style ones, the disk id for a LUN
    image_id: str | None          # image group id; None for LUNs
    volume_ids: tuple[str, ...]   # the image's volumes, base first, leaf (active) last;
                                  # () for LUNs
    domain_id: str | None         # rasd:StorageId of the leaf's hardware Item (None if
                                  # absent or blank, as virt-v2v may leave it)
    alias: str | None
    description: str | None
    size: int | None              # virtual size
    actual_size: int | None
    format: str | None            # "RAW" or "COW"
    interface: str | None         # e.g. "VirtIO_SCSI"
    boot: bool
    read_only: bool
    shareable: bool
    lun_guid: str | None          # LUNs only: lun_id, or the disk id without one
    storage_type: str             # "IMAGE", "LUN" (or another engine DiskStorageType name)
    # (volume id, ovf:vm_snapshot_id) of the volumes that name their owning snapshot;
    # detail of the chain, not part of what makes two disks the same disk
    volume_snapshots: tuple[tuple[str, str], ...] = field(default=(), compare=False)

    def to_dict(self) -> dict[str, Any]:
        return {
            "diskId": self.disk_id,
            "imageId": self.image_id,
            "volumeIds": list(self.volume_ids),
            "domainId": self.domain_id,
            "alias": self.alias,
            "description": self.description,
            "size": self.size,
            "actualSize": self.actual_size,
            "format": self.format,
            "interface": self.interface,
            "boot": self.boot,
            "readOnly": self.read_only,
            "shareable": self.shareable,
            "lunGuid": self.lun_guid,
            "storageType": self.storage_type,
            "volumeSnapshots": dict(self.volume_snapshots),
        }


@dataclass(frozen=True, slots=True)
class Snapshot:
    """A VM snapshot from the SnapshotsSection (templates have none)."""

    id: str
    type: str | None
    description: str | None
    creation_date: str | None
    # Image ids of the snapshot's memory dump and memory metadata disks (its <Memory>
    # six-GUID list, items 2 and 4, as the engine's OvfUtils.fetchMemoryDisks reads it);
    # () for a snapshot without memory
    memory_disks: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "type": self.type, "description": self.description,
                "creationDate": self.creation_date, "memoryDisks": list(self.memory_disks)}


@dataclass(frozen=True, slots=True)
class Entity:
    """The VM or template one OVF describes."""

    id: str                       # lower-case canonical UUID
    name: str | None
    type: str                     # "VM" or "TEMPLATE"
    description: str | None
    os: str | None                # oVirt os name, e.g. "rhel_7x64"
    architecture: str | None      # derived from os; None without one
    memory_mb: int | None
    cpus: int | None              # sockets * cores * threads
    max_cpus: int | None
    creation_date: str | None     # as written: "yyyy/MM/dd HH:mm:ss", UTC
    template_id: str | None       # a VM's base template; a template's own id
    template_name: str | None
    origin: int | None
    snapshots: tuple[Snapshot, ...]
    disks: tuple[Disk, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "type": self.type,
            "description": self.description,
            "os": self.os,
            "architecture": self.architecture,
            "memory": self.memory_mb,
            "cpus": self.cpus,
            "maxCpus": self.max_cpus,
            "creationDate": self.creation_date,
            "templateId": self.template_id,
            "templateName": self.template_name,
            "origin": self.origin,
            "snapshots": [s.to_dict() for s in self.snapshots],
            "disks": [d.to_dict() for d in self.disks],
        }
