"""Reading oVirt OVF documents (one VM or template each) into the `model`.

An OVF_STORE volume holds one ``<uuid>.ovf`` per VM or template. We read them to
list entities and to know which images and volumes each one owns, so the reader
copes with every dialect seen in the wild:

* the OVF namespace is spelled with and without a trailing slash (some 4.2
  engines wrote it without, BZ 1518887), so it is detected from the root;
* the engine nests everything in ``Content xsi:type="ovf:VirtualSystem_Type"`` and
  ``Section xsi:type="ovf:..._Type"``, while virt-v2v and the engine's OVA export
  write ``VirtualSystem``, ``DiskSection``, ``OperatingSystemSection``... elements
  (OVA export also puts them in the default OVF namespace and spells
  ``rasd:InstanceID`` with a capital D). Sections are found by type or name, never
  by position: affinity sections may precede the OS section (HA bug 1545105);
* the engine lists every volume of every snapshot chain (one ``Disk`` and one
  hardware ``Item`` each); they are folded into one `Disk` per image, described by
  its leaf (active) volume, with the whole chain in `Disk.volume_ids`.

Identifiers differ between dialects. Engine OVFs: ``Disk ovf:diskId`` is the
*volume* id and ``ovf:fileRef`` is ``<image>/<volume>``; the entity id is the
``ovf:id`` of the OS section (``Content ovf:id`` is the constant ``out``). OVA-style
OVFs (virt-v2v ``-o rhv-upload``/``-o vdsm`` with the oVirt flavour, engine OVA
export): ``ovf:diskId`` is the *disk* (image) id, ``ovf:fileRef`` the bare volume
id, and the entity id is ``VirtualSystem ovf:id`` (the OS section's ``ovf:id`` is a
DMTF OS number there). Direct LUN disks appear only as ``File`` + ``Disk`` with
``ovf:disk_storage_type="LUN"``, never in the hardware section.

Documents come only through the gate in `safexml`; what it cannot check without a
tree (the entity id, the fields' shapes) is checked here, and an error never
quotes the input at length.
"""

from __future__ import annotations

import math
import re
from typing import Any, NamedTuple, cast

from lxml import etree

from vdsmlite.ids import BLANK_UUID, UUID_PATTERN
from vdsmlite.ovf.model import Disk, Entity, OvfError, Snapshot, excerpt
from vdsmlite.ovf.safexml import OVF_NAMESPACES, read_envelope
from vdsmlite.ovf.values import flag as _flag
from vdsmlite.ovf.values import integer as _int
from vdsmlite.ovf.values import text as _text

RASD_NS = "http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData"
XSI_NS = "http://www.w3.org/2001/XMLSchema-instance"
OVIRT_NS = "http://www.ovirt.org/ovf"


def parse(data: bytes) -> Entity:
    """The summary of one OVF document; OvfError if it is refused or uninterpretable."""
    root, ns = read_envelope(data)
    return _read_entity(root, ns)


# --- reading the tree ------------------------------------------------------------------
#
# One pass over the few levels that matter, with dictionary lookups on the exact tag and
# attribute names lxml hands out: no XPath, no per-element namespace splitting.

# Element names we read. Engine OVFs leave them unqualified, OVA exports put them in
# the default (OVF) namespace; both spellings map to the bare name. Unknown tags map
# to nothing, so the table never grows with the input.
_NAMES = (
    "References", "File", "Section", "DiskSection", "Disk", "Content", "VirtualSystem",
    "OperatingSystemSection", "VirtualHardwareSection", "SnapshotsSection", "Item",
    "Snapshot", "Name", "Description", "CreationDate", "TemplateId", "TemplateName",
    "TemplateType", "Origin", "Type", "Memory",
)
_LOCAL: dict[Any, str] = {name: name for name in _NAMES}
_LOCAL.update({f"{{{ns}}}{name}": name for ns in OVF_NAMESPACES for name in _NAMES})

_GENERAL = frozenset({"Name", "Description", "CreationDate", "TemplateId", "TemplateName",
                      "Origin"})
_SNAPSHOT_FIELDS = frozenset({"Type", "Description", "CreationDate", "Memory"})
# <Memory> of a snapshot: memDumpSD,memDumpPool,memDumpDiskId,memDumpVolId,
# memConfDiskId,memConfVolId; the engine takes the disks at these positions.
_MEMORY_DISK_POSITIONS = (2, 4)

# The rasd children of a hardware Item we read (ResourceType is looked up on its own).
_RESOURCE_TYPE = f"{{{RASD_NS}}}ResourceType"
_RASD: dict[Any, str] = {
    f"{{{RASD_NS}}}{name}": name
    for name in ("InstanceId", "VirtualQuantity", "AllocationUnits", "num_of_sockets",
                 "cpu_per_socket", "threads_per_cpu", "max_num_of_vcpus", "StorageId",
                 "Parent")
}
_RASD[f"{{{RASD_NS}}}InstanceID"] = "InstanceId"  # OVA export spelling

_RT_CPU = "3"
_RT_MEMORY = "4"
_RT_DISK_IMAGE = "17"
_RESOURCE_TYPES = frozenset({_RT_CPU, _RT_MEMORY, _RT_DISK_IMAGE})

_XSI_TYPE = f"{{{XSI_NS}}}type"
_OVIRT_ID = f"{{{OVIRT_NS}}}id"

# ovf:-prefixed attribute names -> bare names, for each namespace spelling.
_OVF_ATTRS = (
    "id", "diskId", "fileRef", "parentRef", "size", "actual_size", "capacity",
    "capacityAllocationUnits", "populatedSize", "format", "volume-format", "disk-interface",
    "boot", "read-only", "shareable", "disk-alias", "disk-description", "lun_id",
    "device_size", "disk_storage_type", "vm_snapshot_id",
)
_ATTR_NAMES = {ns: {f"{{{ns}}}{name}": name for name in _OVF_ATTRS} for ns in OVF_NAMESPACES}

_FORMAT_URIS = {
    "http://www.vmware.com/specifications/vmdk.html#sparse": "RAW",
    "http://www.gnome.org/~markmc/qcow-image-format.html": "COW",
}

# Allocation units: DMTF programmatic units ("byte * 2^30") or the engine's words.
_UNITS_RE = re.compile(r"\s*bytes?\s*(?:\*\s*2\s*\^\s*(\d{1,2}))?\s*", re.IGNORECASE)
_NAMED_UNITS = {"kilobytes": 10, "kb": 10, "kib": 10, "megabytes": 20, "mb": 20, "mib": 20,
                "gigabytes": 30, "gb": 30, "gib": 30}
_MIB_SHIFT = 20
_GIB_SHIFT = 30

_UUID_RE = re.compile(rf"\s*({UUID_PATTERN})\s*")


def _kind(el: etree._Element, name: str) -> str:
    """What a named element is: Section/Content by xsi:type (sans _Type), others by name."""
    if name not in ("Section", "Content"):
        return name
    xsi_type = el.get(_XSI_TYPE)
    if xsi_type is None:
        # Content always holds the virtual system; a typeless Section means nothing.
        return "VirtualSystem" if name == "Content" else ""
    return xsi_type.rpartition(":")[2].removesuffix("_Type")


def _attrs(el: etree._Element, names: dict[str, str]) -> dict[str, str]:
    """The ovf: attributes of `el` by bare name, stripped, empty ones dropped."""
    # One pass over the attributes beats a namespaced lookup per attribute.
    found = {}
    # lxml hands out str for documents parsed from bytes; the stubs also allow bytes.
    items = cast("list[tuple[str, str]]", el.items())
    for key, raw in items:
        name = names.get(key)
        if name is not None:
            value = raw.strip()
            if value:
                found[name] = value
    return found



def _stripped(value: str | None) -> str | None:
    if value is None:
        return None
    return value.strip() or None




def _unit_shift(units: str | None, default: int) -> int | None:
    """log2 of the allocation unit in bytes; `default` if unset, None if not understood."""
    if units is None or not units.strip():
        return default
    named = _NAMED_UNITS.get(units.strip().lower())
    if named is not None:
        return named
    match = _UNITS_RE.fullmatch(units)
    return int(match.group(1) or 0) if match else None


def _scaled(text: str | None, shift: int) -> int | None:
    """A count of 2**shift-byte units -> bytes. Old virt-v2v wrote decimals ("40.0")."""
    if text is None:
        return None
    try:
        value = int(text)
    except ValueError:
        try:
            number = float(text) * (1 << shift)
        except ValueError:
            return None
        return int(number) if math.isfinite(number) and number >= 0 else None
    return value << shift if value >= 0 else None


def _canonical_uuid(text: str | None) -> str | None:
    if text is None:
        return None
    match = _UUID_RE.fullmatch(text)
    return match.group(1).lower() if match else None


def _architecture(os_name: str | None) -> str | None:
    if os_name is None:
        return None
    lowered = os_name.lower()
    if "ppc64" in lowered:
        return "ppc64"
    if "s390x" in lowered:
        return "s390x"
    return "x86_64"


def _rasd_fields(item: etree._Element) -> dict[str, str]:
    fields: dict[str, str] = {}
    for child in item:
        name = _RASD.get(child.tag)
        # First wins: the newest writer repeats StorageId once per domain holding the image.
        if name is not None and name not in fields and child.text:
            text = child.text.strip()
            if text:
                fields[name] = text
    return fields


def _cpus(fields: dict[str, str]) -> int | None:
    sockets = _int(fields.get("num_of_sockets"))
    if sockets is None:
        return _int(fields.get("VirtualQuantity"))
    cores = _int(fields.get("cpu_per_socket"))
    threads = _int(fields.get("threads_per_cpu"))
    return sockets * (1 if cores is None else cores) * (1 if threads is None else threads)


def _memory_mb(fields: dict[str, str]) -> int | None:
    quantity = _int(fields.get("VirtualQuantity"))
    if quantity is None or quantity < 0:
        return None
    # The engine writes "MegaBytes" and its reader ignores the units: do the same
    # with units we do not understand.
    shift = _unit_shift(fields.get("AllocationUnits"), _MIB_SHIFT)
    if shift is None:
        shift = _MIB_SHIFT
    if shift >= _MIB_SHIFT:
        return quantity << (shift - _MIB_SHIFT)
    return quantity >> (_MIB_SHIFT - shift)


def _read_entity(root: etree._Element, ns: str) -> Entity:
    names = _ATTR_NAMES[ns]
    id_key = f"{{{ns}}}id"
    storage_type_key = f"{{{ns}}}disk_storage_type"
    # File id -> its ovf:disk_storage_type, the only thing we need from References.
    files: dict[str, str | None] = {}
    disks: list[dict[str, str]] = []
    system = None
    for child in root:
        name = _LOCAL.get(child.tag)
        if name is None:
            continue
        kind = _kind(child, name)
        if kind == "References":
            for file_el in child:
                file_id = file_el.get(id_key)
                if file_id is not None and _LOCAL.get(file_el.tag) == "File":
                    files.setdefault(file_id.strip(), _stripped(file_el.get(storage_type_key)))
        elif kind == "DiskSection":
            disks.extend(_attrs(d, names) for d in child if _LOCAL.get(d.tag) == "Disk")
        elif kind == "VirtualSystem" and system is None:
            system = child
    if system is None:
        raise OvfError("OVF has no virtual system (Content or VirtualSystem element)")

    general: dict[str, str | None] = {}
    is_template_type = False
    os_section = hardware = snapshots_section = None
    for child in system:
        name = _LOCAL.get(child.tag)
        if name is None:
            continue
        if name in _GENERAL:
            general.setdefault(name, _text(child))
            continue
        kind = _kind(child, name)
        if kind == "TemplateType":
            is_template_type = True
        elif kind == "OperatingSystemSection" and os_section is None:
            os_section = child
        elif kind == "VirtualHardwareSection" and hardware is None:
            hardware = child
        elif kind == "SnapshotsSection" and snapshots_section is None:
            snapshots_section = child

    # Engine OVFs: the OS section carries the id (Content ovf:id is "out"). OVA style:
    # VirtualSystem carries it and the OS section's ovf:id may be a DMTF OS number.
    raw_id = system.get(id_key) if _LOCAL.get(system.tag) == "VirtualSystem" else None
    if raw_id is None and os_section is not None:
        raw_id = os_section.get(id_key)
    entity_id = _canonical_uuid(raw_id)
    if entity_id is None:
        detail = "missing" if raw_id is None else f"not a UUID: {excerpt(repr(raw_id))}"
        raise OvfError(f"OVF entity id is {detail}")

    os_name = None if os_section is None else _os_name(os_section)
    hw = _Hardware(None, None, None, {}) if hardware is None else _read_hardware(hardware)
    snapshots = () if snapshots_section is None else _read_snapshots(snapshots_section, id_key)
    active = next((s.id for s in snapshots if s.type == "ACTIVE"), None)

    template_id = general.get("TemplateId")
    is_template = is_template_type or _canonical_uuid(template_id) == entity_id
    return Entity(
        id=entity_id,
        name=general.get("Name"),
        type="TEMPLATE" if is_template else "VM",
        description=general.get("Description"),
        os=os_name,
        architecture=_architecture(os_name),
        memory_mb=hw.memory_mb,
        cpus=hw.cpus,
        max_cpus=hw.max_cpus,
        creation_date=general.get("CreationDate"),
        template_id=template_id,
        template_name=general.get("TemplateName"),
        origin=_int(general.get("Origin")),
        snapshots=snapshots,
        disks=_read_disks(disks, files, hw.disk_items, active),
    )


def _os_name(section: etree._Element) -> str | None:
    for child in section:
        if _LOCAL.get(child.tag) == "Description":
            text = _text(child)
            if text is not None:
                return text
            break
    # OVA export: ovirt:id is the oVirt os id when there is no description.
    return _stripped(section.get(_OVIRT_ID))


class _Hardware(NamedTuple):
    memory_mb: int | None
    cpus: int | None
    max_cpus: int | None
    # rasd:InstanceId (a volume id) -> the fields of that disk image Item
    disk_items: dict[str, dict[str, str]]


def _read_hardware(section: etree._Element) -> _Hardware:
    memory_mb = cpus = max_cpus = None
    cpu_seen = memory_seen = False
    disk_items: dict[str, dict[str, str]] = {}
    # Device Items (NICs, controllers, channels...) outnumber the three kinds we read:
    # find every ResourceType in C and look closer only at those.
    for type_el in section.iterdescendants(_RESOURCE_TYPE):
        resource_type = _text(type_el)
        if resource_type not in _RESOURCE_TYPES:
            continue
        item = type_el.getparent()
        if item is None or item.getparent() is not section or _LOCAL.get(item.tag) != "Item":
            continue
        fields = _rasd_fields(item)
        # First CPU and memory Items win, as in the engine and the HA agent.
        if resource_type == _RT_CPU and not cpu_seen:
            cpu_seen = True
            cpus = _cpus(fields)
            max_cpus = _int(fields.get("max_num_of_vcpus"))
        elif resource_type == _RT_MEMORY and not memory_seen:
            memory_seen = True
            memory_mb = _memory_mb(fields)
        elif resource_type == _RT_DISK_IMAGE and "InstanceId" in fields:
            disk_items.setdefault(fields["InstanceId"], fields)
    return _Hardware(memory_mb, cpus, max_cpus, disk_items)


def _read_snapshots(section: etree._Element, id_key: str) -> tuple[Snapshot, ...]:
    snapshots = []
    for el in section:
        if _LOCAL.get(el.tag) != "Snapshot":
            continue
        snapshot_id = _stripped(el.get(id_key))
        if snapshot_id is None:
            raise OvfError("Snapshot element without ovf:id")
        fields: dict[str, str | None] = {}
        for child in el:
            name = _LOCAL.get(child.tag)
            if name in _SNAPSHOT_FIELDS:
                fields.setdefault(name, _text(child))
        snapshots.append(Snapshot(id=snapshot_id, type=fields.get("Type"),
                                  description=fields.get("Description"),
                                  creation_date=fields.get("CreationDate"),
                                  memory_disks=_memory_disks(fields.get("Memory"))))
    return tuple(snapshots)


def _memory_disks(text: str | None) -> tuple[str, ...]:
    """The memory dump and metadata disk ids of a snapshot's <Memory> list. The engine
    fails on a short list; a summary only lists what is there: positions that are
    missing, blank or not a UUID (or the empty GUID) name no disk."""
    if not text:
        return ()
    guids = text.split(",")
    out = []
    for pos in _MEMORY_DISK_POSITIONS:
        disk = _canonical_uuid(guids[pos].strip()) if pos < len(guids) else None
        if disk is not None and disk != BLANK_UUID and disk not in out:
            out.append(disk)
    return tuple(out)


class _Volume(NamedTuple):
    """One Disk element: a volume of an image, or a LUN."""

    attrs: dict[str, str]         # its ovf: attributes by bare name
    volume_id: str
    parent_id: str | None
    storage_type: str


def _read_disks(disks: list[dict[str, str]], files: dict[str, str | None],
                disk_items: dict[str, dict[str, str]],
                active_snapshot: str | None) -> tuple[Disk, ...]:
    # ("image", image id) or ("lun", disk id) -> its Disk elements, in order of first
    # appearance; ("volume", volume id) for the odd image disk without a fileRef.
    groups: dict[tuple[str, str], list[_Volume]] = {}
    for attrs in disks:
        disk_id = attrs.get("diskId")
        if disk_id is None:
            raise OvfError("Disk element without ovf:diskId")
        file_ref = attrs.get("fileRef")
        image_part, slash, volume_part = (file_ref or "").rpartition("/")
        if slash:
            image_id, volume_id = image_part, volume_part
        elif file_ref:
            # OVA style: diskId is the disk and fileRef the volume (for a LUN, the disk).
            image_id, volume_id = disk_id, file_ref
        else:
            image_id, volume_id = None, disk_id

        # The engine marks LUNs on the File; OVA export also on the Disk.
        storage_type = (files.get(volume_id) or attrs.get("disk_storage_type")
                        or "IMAGE").upper()
        if storage_type == "LUN":
            key = ("lun", disk_id)
            parent_id = None
        else:
            key = ("image", image_id) if image_id is not None else ("volume", volume_id)
            parent_ref = attrs.get("parentRef")
            parent_id = parent_ref.rpartition("/")[2] if parent_ref else None
            if parent_id is None:
                item_parent = disk_items.get(volume_id, {}).get("Parent")
                if item_parent != BLANK_UUID:
                    parent_id = item_parent
        groups.setdefault(key, []).append(_Volume(attrs, volume_id, parent_id, storage_type))

    return tuple(
        _lun_disk(key[1], volumes[0]) if key[0] == "lun"
        else _image_disk(key[1] if key[0] == "image" else None, volumes, disk_items,
                         active_snapshot)
        for key, volumes in groups.items()
    )


def _lun_disk(disk_id: str, volume: _Volume) -> Disk:
    attrs = volume.attrs
    return Disk(
        disk_id=disk_id,
        image_id=None,
        volume_ids=(),
        domain_id=None,
        alias=attrs.get("disk-alias"),
        description=attrs.get("disk-description"),
        # Older engines wrote the LUN size (GiB) as device_size; newer ones nothing.
        size=_scaled(attrs.get("device_size"), _GIB_SHIFT),
        actual_size=None,
        format=None,
        interface=attrs.get("disk-interface"),
        boot=_flag(attrs.get("boot")),
        read_only=_flag(attrs.get("read-only")),
        shareable=_flag(attrs.get("shareable")),
        lun_guid=attrs.get("lun_id") or disk_id,
        storage_type=volume.storage_type,
    )


def _image_disk(image_id: str | None, volumes: list[_Volume],
                disk_items: dict[str, dict[str, str]], active_snapshot: str | None) -> Disk:
    leaf = _leaf(volumes, active_snapshot)
    by_id: dict[str, _Volume] = {}
    for volume in volumes:
        by_id.setdefault(volume.volume_id, volume)
    # Walk parents from the leaf back to the base (guarding against loops), then put
    # the base first; volumes off that chain, if any, go before it so the leaf is last.
    chain: list[str] = []
    current: _Volume | None = leaf
    while current is not None and current.volume_id not in chain:
        chain.append(current.volume_id)
        current = by_id.get(current.parent_id) if current.parent_id else None
    off_chain = [volume_id for volume_id in by_id if volume_id not in chain]
    chain.reverse()

    domain_id = None
    for volume_id in reversed(chain):
        storage_id = disk_items.get(volume_id, {}).get("StorageId")
        if storage_id is not None and storage_id != BLANK_UUID:
            domain_id = storage_id
            break

    attrs = leaf.attrs
    capacity = attrs.get("capacity")
    if capacity is not None:
        # OVA style; DMTF's default unit is the byte (virt-v2v writes bytes, no unit).
        shift = _unit_shift(attrs.get("capacityAllocationUnits"), 0)
        size = None if shift is None else _scaled(capacity, shift)
    else:
        size = _scaled(attrs.get("size"), _GIB_SHIFT)
    populated = attrs.get("populatedSize")
    if populated is not None:
        actual_size = _scaled(populated, 0)
    else:
        actual_size = _scaled(attrs.get("actual_size"), _GIB_SHIFT)
    volume_format: str | None = attrs.get("volume-format", "").upper()
    if volume_format not in ("RAW", "COW"):
        volume_format = _FORMAT_URIS.get(attrs.get("format", ""))

    return Disk(
        disk_id=attrs.get("diskId") or leaf.volume_id,
        image_id=image_id,
        volume_ids=(*off_chain, *chain),
        domain_id=domain_id,
        alias=attrs.get("disk-alias"),
        description=attrs.get("disk-description"),
        size=size,
        actual_size=actual_size,
        format=volume_format,
        interface=attrs.get("disk-interface"),
        boot=_flag(attrs.get("boot")),
        read_only=_flag(attrs.get("read-only")),
        shareable=_flag(attrs.get("shareable")),
        lun_guid=None,
        storage_type=leaf.storage_type,
        volume_snapshots=tuple((v.volume_id, v.attrs["vm_snapshot_id"]) for v in volumes
                               if v.attrs.get("vm_snapshot_id")),
    )


def _leaf(volumes: list[_Volume], active_snapshot: str | None) -> _Volume:
    """The active volume: the one no other volume names as its parent.

    With a broken chain several qualify; prefer the one owned by the ACTIVE snapshot,
    then the last listed (the engine lists a chain base first).
    """
    parents = {volume.parent_id for volume in volumes}
    leaves = [volume for volume in volumes if volume.volume_id not in parents] or volumes
    if len(leaves) > 1 and active_snapshot is not None:
        owned = [v for v in leaves if v.attrs.get("vm_snapshot_id") == active_snapshot]
        leaves = owned or leaves
    return leaves[-1]
