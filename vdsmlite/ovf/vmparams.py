"""An oVirt VM OVF as VDSM's legacy ``vmParams`` dict: start a VM from its OVF.

`convert` reads one ``<vm id>.ovf`` (as found in an OVF_STORE) and returns the
dict `vdsmlite.virt.legacy.parse_vm_params` takes, with warnings saying what was
left out or guessed. It does what ovirt-hosted-engine-ha's ``ovf2VmParams``
does for the hosted-engine VM, so a host can start any VM the way the HA agent
starts that one:

* ``vmId`` from the OS section's ``ovf:id`` (``VirtualSystem ovf:id`` in the
  OVA-style layout), ``vmName`` from ``Name``, ``memSize`` (MiB) from the
  memory Item (rasd:ResourceType 4), the CPU topology from the CPU Item (3),
  ``cpuType``/``emulatedMachine`` from ``CustomCpuName``/``CustomEmulatedMachine``,
  ``display`` from ``DefaultDisplayType``; ``memGuaranteedSize`` and
  ``maxMemSize`` from ``MinAllocatedMem`` and ``MaxMemorySizeMb``;
* ``devices`` in hardware-section order: disks (domain volumes, poolID blank so
  the VM starts without a connected pool), the first CD-ROM (empty, as the HA
  agent makes it), NICs, controllers, console, video, graphics, rng, watchdog and
  balloon Items; direct LUN disks (which have no Item) after them; a VM lease;
  an rng and a console device when the OVF has none;
* ``xmlBase64``: the engine's libvirt XML (``EngineXml``) when it is "safe" - its
  disk is exclusive and it holds a lease - as the HA agent passes it. The dict is
  complete without it: this agent starts VMs from the dict.

Top-level numbers are ints; device fields keep VDSM's string spellings ("0",
"true") as the engine and the HA agent send them. Keys without a value are left
out, in devices too. Addresses are dicts (VDSM's form), not the engine's
``{type=pci, slot=0x06}`` strings the HA agent writes into its vm.conf.

Fixed relative to the HA agent (ovf.md 3.6): an OS section anywhere in Content;
``DefaultDisplayType`` missing (taken from the graphics device) or 3/4 (bochs is
VNC, none is headless); a disk without ``BootOrder``; boot orders that follow
the OVF's (the HA agent adds one to the raw value, so a non-boot disk, 0, became
1 and booted first) with the first bootable disk chosen when no disk has one;
distinct disk indexes (the HA agent gives every disk index 0); ``threads_per_cpu``
(vCPUs are sockets * cores * threads); the ``VirtIO_SCSI`` interface (iface
``scsi``, not ``virtio_scsi``); snapshot chains (one device per disk, on its
active volume, not one per volume); direct LUNs; the OVA-style layout
(``VirtualSystem``, ``DiskSection``, ``ovf:capacity``, disk id in ``diskId`` and
bare volume id in ``fileRef``); NICs without a MAC dropped with a warning.

The document goes through `safexml` (no DTD, no entities, no network), the
nested EngineXml too; the tree is walked once, by tag lookups in fixed tables.
"""

from __future__ import annotations

import base64
import functools
import re
from dataclasses import dataclass, field
from typing import Any, NamedTuple, cast

from lxml import etree

from vdsmlite.errors import OvfConversionError
from vdsmlite.ids import BLANK_UUID, parse_uuid
from vdsmlite.ovf.model import OvfError, excerpt
from vdsmlite.ovf.reader import RASD_NS, XSI_NS
from vdsmlite.ovf.safexml import OVF_NAMESPACES, read_document, read_envelope
from vdsmlite.ovf.values import flag as _flag
from vdsmlite.ovf.values import integer as _int
from vdsmlite.ovf.values import text as _text


@dataclass(frozen=True, slots=True)
class Conversion:
    """VDSM legacy ``vmParams`` and what the conversion dropped or guessed."""

    params: dict[str, Any]
    warnings: list[str] = field(default_factory=list)


def convert(ovf: bytes | str, *, domain_id: str | None = None) -> Conversion:
    """The ``vmParams`` of the VM one OVF describes.

    ``domain_id`` is the storage domain of disks whose OVF names none (virt-v2v
    leaves ``rasd:StorageId`` blank); such disks are dropped, with a warning,
    without it. OvfConversionError (code 1000) if the document is not a
    well-formed, DTD-free OVF, or lacks the VM id, name or memory.
    """
    data = ovf.encode("utf-8") if isinstance(ovf, str) else ovf
    try:
        root, ns = read_envelope(data)
    except OvfError as e:
        raise OvfConversionError(f"OVF: {e}") from e
    return _Converter(ns, parse_uuid(domain_id) if domain_id else None).run(root)


# --- names -----------------------------------------------------------------------------
#
# Engine OVFs leave elements unqualified and put the Item fields in rasd:; OVA exports
# qualify elements with the OVF namespace and virt-v2v writes rasd:Device. Every
# spelling of a name we read maps to its bare name; unknown tags map to nothing.

_NAMES = (
    # envelope and sections
    "References", "File", "Section", "DiskSection", "Disk", "Content", "VirtualSystem",
    "OperatingSystemSection", "VirtualHardwareSection", "SnapshotsSection", "Snapshot",
    # Content fields
    "Name", "DefaultDisplayType", "default_display_type", "CustomCpuName", "UseHostCpu",
    "CustomEmulatedMachine", "MinAllocatedMem", "MaxMemorySizeMb", "LeaseDomainId",
    "EngineXml", "Type",
    # Item fields
    "Item", "ResourceType", "ResourceSubType", "InstanceId", "VirtualQuantity",
    "AllocationUnits", "num_of_sockets", "cpu_per_socket", "threads_per_cpu",
    "max_num_of_vcpus", "StorageId", "Parent", "HostResource", "MACAddress", "Connection",
    "Linked", "Device", "Address", "BootOrder", "IsReadOnly", "Alias", "SpecParams",
)
_LOCAL: dict[Any, str] = {}
for _ns in ("", *(f"{{{ns}}}" for ns in (*OVF_NAMESPACES, RASD_NS))):
    _LOCAL.update({f"{_ns}{name}": name for name in _NAMES})
    _LOCAL[f"{_ns}InstanceID"] = "InstanceId"  # OVA export spelling

_CONTENT_FIELDS = frozenset({
    "Name", "DefaultDisplayType", "default_display_type", "CustomCpuName", "UseHostCpu",
    "CustomEmulatedMachine", "MinAllocatedMem", "MaxMemorySizeMb", "LeaseDomainId",
    "EngineXml"})

_DISK_ATTRS = ("diskId", "fileRef", "parentRef", "volume-format", "format", "disk-interface",
               "boot", "read-only", "shareable", "lun_id", "vm_snapshot_id",
               "disk_storage_type", "scsi_reservation")
_XSI_TYPE = f"{{{XSI_NS}}}type"

# libvirt XML names in EngineXml.
_OVIRT_VM_NS = "http://ovirt.org/vm/1.0"
_VM_DEVICE = f"{{{_OVIRT_VM_NS}}}device"
_VM_SHARED = f"{{{_OVIRT_VM_NS}}}shared"

# --- values ----------------------------------------------------------------------------

# Engine DisplayType ordinals -> VDSM display: cirrus and vga are VNC, qxl is SPICE,
# bochs (3) is VNC-only, none (4) is headless (no display).
_DISPLAY = {0: "vnc", 1: "qxl", 2: "vnc", 3: "vnc", 4: None}
_GRAPHICS_DISPLAY = {"spice": "qxl", "vnc": "vnc"}

# Engine VmInterfaceType ordinals -> VDSM nicModel.
_NIC_MODELS = ("rtl8139_pv", "rtl8139", "e1000", "pv", "spaprVlan", "pciPassthrough")

# Engine DiskInterface names -> VDSM iface.
_IFACES = {"ide": "ide", "virtio": "virtio", "virtio_scsi": "scsi", "spapr_vscsi": "scsi",
           "sata": "sata"}
_FORMAT_URIS = {
    "http://www.vmware.com/specifications/vmdk.html#sparse": "raw",
    "http://www.gnome.org/~markmc/qcow-image-format.html": "cow",
}

# Hardware Items without a <Type>: what their ResourceType is (engine reader's rule).
_TYPE_OF_RESOURCE = {"17": ("disk", "disk"), "15": ("disk", "cdrom"),
                     "10": ("interface", "bridge"), "20": ("video", None),
                     "32768": ("video", None), "26": ("graphics", None),
                     "24": ("graphics", None)}

# What the HA agent gives the CD-ROM, whatever the OVF says: an empty drive on IDE.
_CDROM = {"index": "2", "iface": "ide",
          "address": {"controller": "0", "target": "0", "unit": "0", "bus": "1",
                      "type": "drive"},
          "readonly": "true", "deviceId": "8c3179ac-b322-4f5c-9449-c52e3665e0ae",
          "path": "", "device": "cdrom", "shared": "false", "type": "disk"}
_CDROM_INDEX = 2  # disk indexes skip it, as VDSM's hdc is the CD-ROM

_SPICE_CHANNELS = "smain,sdisplay,sinputs,scursor,splayback,srecord,ssmartcard,susbredir"

# AllocationUnits of the memory Item -> log2 of the unit in MiB.
_MEMORY_UNITS = {"megabytes": 0, "mb": 0, "mib": 0, "gigabytes": 10, "gb": 10, "gib": 10}
_UNITS_RE = re.compile(r"\s*bytes?\s*\*\s*2\s*\^\s*(\d{1,2})\s*", re.IGNORECASE)
_MIB_SHIFT = 20


class _Volume(NamedTuple):
    """One DiskSection Disk: a volume of an image, or a direct LUN."""

    attrs: dict[str, str]
    image_id: str | None
    volume_id: str
    parent_id: str | None
    is_lun: bool


class _Item(NamedTuple):
    """One hardware Item: its fields by bare name (first wins) and SpecParams."""

    fields: dict[str, str]
    spec: etree._Element | None





def _address(text: str | None) -> dict[str, str] | None:
    """The engine's map string "{type=pci, slot=0x06}" as VDSM's address dict."""
    if text is None:
        return None
    return dict(_address_items(text)) or None


@functools.lru_cache(maxsize=1024)
def _address_items(text: str) -> tuple[tuple[str, str], ...]:
    # Cached: a cluster's VMs share a handful of slot layouts, and this is a fifth of
    # the walk otherwise. ValueError (not cached) if it is not a flat map.
    body = text.strip().removeprefix("{").removesuffix("}")
    out = []
    for part in body.split(","):
        key, eq, value = part.partition("=")
        if not eq or not key.strip():
            raise ValueError(part)
        out.append((key.strip(), value.strip()))
    return tuple(out)


def _spec(el: etree._Element) -> dict[str, Any]:
    """SpecParams children as a dict; nested maps as nested dicts, empty values dropped."""
    out: dict[str, Any] = {}
    for child in el:
        if not isinstance(child.tag, str):
            continue
        key = child.tag.rpartition("}")[2]
        if len(child):
            nested = _spec(child)
            if nested:
                out[key] = nested
        elif child.text is not None and child.text.strip():
            out[key] = child.text.strip()
    return out


def _memory_shift(units: str | None) -> int | None:
    """log2 of AllocationUnits in MiB (may be negative); 0 if unset, None if unknown."""
    if units is None:
        return 0
    named = _MEMORY_UNITS.get(units.strip().lower())
    if named is not None:
        return named
    match = _UNITS_RE.fullmatch(units)
    return int(match.group(1)) - _MIB_SHIFT if match else None


class _Converter:
    """One conversion: the state a walk of one OVF fills in."""

    def __init__(self, ns: str, default_domain: str | None) -> None:
        self.attr_names = {f"{{{ns}}}{name}": name for name in _DISK_ATTRS}
        self.id_key = f"{{{ns}}}id"
        self.storage_type_key = f"{{{ns}}}disk_storage_type"
        self.default_domain = default_domain
        self.warnings: list[str] = []
        self.vm_id = ""

    def warn(self, text: str) -> None:
        self.warnings.append(text)

    # -- the walk --

    def run(self, root: etree._Element) -> Conversion:
        files: dict[str, str] = {}  # File ovf:id -> ovf:disk_storage_type
        disks: list[dict[str, str]] = []
        system = None
        for child in root:
            name = _LOCAL.get(child.tag)
            if name is None:
                continue
            kind = self._kind(child, name)
            if kind == "References":
                for file_el in child:
                    file_id = file_el.get(self.id_key)
                    storage = file_el.get(self.storage_type_key)
                    if file_id and storage:
                        files[file_id.strip()] = storage.strip().upper()
            elif kind == "DiskSection":
                disks.extend(self._attrs(d) for d in child if _LOCAL.get(d.tag) == "Disk")
            elif kind == "VirtualSystem" and system is None:
                system = child
        if system is None:
            raise OvfConversionError("OVF: no virtual system (Content or VirtualSystem)")

        general: dict[str, str] = {}
        os_section = hardware = snapshots = None
        for child in system:
            name = _LOCAL.get(child.tag)
            if name is None:
                continue
            if name in _CONTENT_FIELDS:
                # EngineXml keeps its text as is; the rest is stripped.
                text = child.text if name == "EngineXml" else _text(child)
                if text and name not in general:
                    general[name] = text
                continue
            kind = self._kind(child, name)
            if kind == "OperatingSystemSection" and os_section is None:
                os_section = child
            elif kind == "VirtualHardwareSection" and hardware is None:
                hardware = child
            elif kind == "SnapshotsSection" and snapshots is None:
                snapshots = child

        self.vm_id = self._vm_id(system, os_section)
        name = general.get("Name")
        if name is None:
            raise OvfConversionError(f"OVF of VM {self.vm_id}: no name (Content/Name)")
        params: dict[str, Any] = {"vmId": self.vm_id, "vmName": name}
        items = [] if hardware is None else self._items(hardware)
        self._memory(params, items, general)
        self._cpus(params, items, general)
        self._display(params, items, general)
        params["spiceSecureChannels"] = _SPICE_CHANNELS
        lease_sd = self._uuid(general.get("LeaseDomainId"), "LeaseDomainId")
        engine_xml = general.get("EngineXml")
        if engine_xml is not None:
            lease_sd = self._engine_xml(params, engine_xml, lease_sd)
        volumes = self._volumes(disks, files)
        params["devices"] = self._devices(items, volumes, self._active_snapshot(snapshots),
                                          lease_sd)
        return Conversion(params, self.warnings)

    def _kind(self, el: etree._Element, name: str) -> str:
        """Section/Content by xsi:type (sans _Type), other elements by name."""
        if name not in ("Section", "Content"):
            return name
        xsi_type = el.get(_XSI_TYPE)
        if xsi_type is None:
            return "VirtualSystem" if name == "Content" else ""
        return xsi_type.rpartition(":")[2].removesuffix("_Type")

    def _attrs(self, el: etree._Element) -> dict[str, str]:
        found = {}
        # lxml hands out str for documents parsed from bytes; the stubs also allow bytes.
        items = cast("list[tuple[str, str]]", el.items())
        for key, raw in items:
            name = self.attr_names.get(key)
            if name is not None and raw.strip():
                found[name] = raw.strip()
        return found

    def _uuid(self, text: str | None, what: str) -> str | None:
        if text is None:
            return None
        value = parse_uuid(text)
        if value is None:
            self.warn(f"{what} is not a UUID ({excerpt(repr(text))}): ignored")
        return None if value == BLANK_UUID else value

    def _vm_id(self, system: etree._Element, os_section: etree._Element | None) -> str:
        # OVA style: VirtualSystem carries the id (its OS section's may be a DMTF OS
        # number). Engine: Content's ovf:id is "out" and the OS section carries it.
        raw = system.get(self.id_key) if _LOCAL.get(system.tag) == "VirtualSystem" else None
        if raw is None and os_section is not None:
            raw = os_section.get(self.id_key)
        vm_id = parse_uuid(raw.strip()) if raw else None
        if vm_id is None:
            detail = "none" if raw is None else f"not a UUID: {excerpt(repr(raw))}"
            raise OvfConversionError(
                f"OVF: no VM id (ovf:id of the OperatingSystemSection or VirtualSystem: "
                f"{detail})")
        return vm_id

    def _items(self, hardware: etree._Element) -> list[_Item]:
        # The hot loop of a conversion: every child of every Item, one lookup each.
        local = _LOCAL.get
        items = []
        for item in hardware:
            if local(item.tag) != "Item":
                continue
            fields: dict[str, str] = {}
            spec = None
            for child in item:
                name = local(child.tag)
                if name is None:
                    continue
                if name == "SpecParams":
                    spec = child
                elif name not in fields:
                    # First wins: the newest writer repeats StorageId per domain.
                    text = child.text
                    if text is not None:
                        text = text.strip()
                        if text:
                            fields[name] = text
            items.append(_Item(fields, spec))
        return items

    # -- VM-wide values --

    def _memory(self, params: dict[str, Any], items: list[_Item],
                general: dict[str, str]) -> None:
        memory = next((i.fields for i in items if i.fields.get("ResourceType") == "4"), None)
        where = f"OVF of VM {self.vm_id}"
        if memory is None:
            raise OvfConversionError(f"{where}: no memory (Item with rasd:ResourceType 4)")
        quantity = _int(memory.get("VirtualQuantity"))
        if quantity is None or quantity <= 0:
            raise OvfConversionError(
                f"{where}: memory rasd:VirtualQuantity is not a positive integer: "
                f"{excerpt(repr(memory.get('VirtualQuantity')))}")
        units = memory.get("AllocationUnits")
        shift = _memory_shift(units)
        if shift is None:
            # The engine ignores the units it writes ("MegaBytes"); do so too, but say so.
            self.warn(f"memory rasd:AllocationUnits {excerpt(repr(units))} not understood: "
                      f"{quantity} taken as MiB")
            shift = 0
        mib = quantity << shift if shift >= 0 else quantity >> -shift
        if mib <= 0:
            raise OvfConversionError(f"{where}: memory is less than 1 MiB")
        params["memSize"] = mib
        for key, name in (("memGuaranteedSize", "MinAllocatedMem"),
                          ("maxMemSize", "MaxMemorySizeMb")):
            value = _int(general.get(name))
            if value is not None and value > 0:
                params[key] = value
            elif name in general:
                self.warn(f"{name} {excerpt(repr(general[name]))} is not a positive "
                          f"integer: {key} left out")

    def _cpus(self, params: dict[str, Any], items: list[_Item],
              general: dict[str, str]) -> None:
        cpu = next((i.fields for i in items if i.fields.get("ResourceType") == "3"), None)
        if cpu is None:
            self.warn("no CPU (Item with rasd:ResourceType 3): 1 vCPU")
            params["smp"] = 1
        else:
            sockets = _int(cpu.get("num_of_sockets"))
            cores = _int(cpu.get("cpu_per_socket")) or 1
            threads = _int(cpu.get("threads_per_cpu")) or 1
            if sockets is not None and sockets > 0 and cores > 0 and threads > 0:
                params["smp"] = sockets * cores * threads
                params["smpCoresPerSocket"] = cores
                params["smpThreadsPerCore"] = threads
            else:
                # Old writers: only the total (as the engine reader falls back to).
                total = _int(cpu.get("VirtualQuantity"))
                if total is None or total <= 0:
                    self.warn("CPU Item has neither rasd:num_of_sockets nor "
                              "rasd:VirtualQuantity: 1 vCPU")
                    total = 1
                params["smp"] = total
                cores = threads = 1
            max_text = cpu.get("max_num_of_vcpus")
            max_vcpus = _int(max_text)
            if max_text is None:
                pass
            elif (max_vcpus is None or max_vcpus < params["smp"]
                  or max_vcpus % (cores * threads)):
                # The guest's topology must hold the maximum in whole sockets.
                self.warn(f"rasd:max_num_of_vcpus {excerpt(repr(max_text))} is not whole "
                          f"sockets of {cores} cores * {threads} threads at or above "
                          f"{params['smp']} vCPUs: maxVCpus left out")
            else:
                params["maxVCpus"] = max_vcpus
        if _flag(general.get("UseHostCpu")):
            params["cpuType"] = "hostPassthrough"
        elif "CustomCpuName" in general:
            params["cpuType"] = general["CustomCpuName"]
        if "CustomEmulatedMachine" in general:
            params["emulatedMachine"] = general["CustomEmulatedMachine"]

    def _display(self, params: dict[str, Any], items: list[_Item],
                 general: dict[str, str]) -> None:
        # Templates spell it default_display_type.
        field_name = ("DefaultDisplayType" if "DefaultDisplayType" in general
                      else "default_display_type")
        raw = general.get(field_name)
        ordinal = _int(raw)
        if ordinal in _DISPLAY:
            display = _DISPLAY[ordinal]
            if display is not None:
                params["display"] = display
            return
        graphics = next((i.fields.get("Device") for i in items
                         if i.fields.get("Type") == "graphics"), None)
        display = _GRAPHICS_DISPLAY.get(graphics or "")
        what = "no DefaultDisplayType" if raw is None else \
            f"{field_name} {excerpt(repr(raw))} unknown"
        if display is None:
            self.warn(f"{what} and no graphics device: display left out")
        else:
            self.warn(f"{what}: display {display!r} from the {graphics} graphics device")
            params["display"] = display

    def _engine_xml(self, params: dict[str, Any], text: str, lease_sd: str | None) -> str | None:
        """Pass the engine's libvirt XML on as the HA agent does; the VM lease it holds."""
        if "<lease" not in text:
            # Without a lease element it is neither passed on nor holds a VM lease:
            # no need to parse it (most EngineXml: only HE VMs with a lease differ).
            self.warn("EngineXml not passed on as xmlBase64: it holds no lease")
            return lease_sd
        try:
            domain = read_document(text.encode("utf-8"))
        except OvfError as e:
            self.warn(f"EngineXml ignored: {e}")
            return lease_sd
        devices = next((c for c in domain if c.tag == "devices"), None)
        leases = [] if devices is None else [c for c in devices if c.tag == "lease"]
        for lease in leases:
            fields = {c.tag: _text(c) for c in lease if isinstance(c.tag, str)}
            # A lease keyed by the VM id is the VM lease; one keyed by a volume is that
            # disk's volume lease, which comes with the volume, not as a device.
            if lease_sd is None and parse_uuid(fields.get("key")) == self.vm_id:
                lease_sd = parse_uuid(fields.get("lockspace"))
        if devices is not None:
            # libvirt refuses console aliases longer than this (BZ 1560666).
            for console in devices:
                if console.tag == "console" and console.get("type") == "pty":
                    for alias in console:
                        name = alias.get("name") if alias.tag == "alias" else None
                        if name and len(name) > 24:
                            alias.set("name", name[:24])
        shared = next((el for el in domain.iter(_VM_DEVICE)
                       if el.get("devtype") == "disk"), None)
        shared_text = None
        if shared is not None:
            shared_text = next((_text(c) for c in shared if c.tag == _VM_SHARED), None)
        if shared_text == "exclusive" and leases:
            xml = etree.tostring(domain, xml_declaration=True, encoding="UTF-8")
            params["xmlBase64"] = base64.standard_b64encode(xml).decode("ascii")
        else:
            self.warn("EngineXml not passed on as xmlBase64: it is used only when its disk "
                      "is exclusive and it holds a lease")
        return lease_sd

    # -- disks --

    def _volumes(self, disks: list[dict[str, str]], files: dict[str, str]) -> list[_Volume]:
        volumes = []
        for attrs in disks:
            disk_id = attrs.get("diskId")
            if disk_id is None:
                self.warn("Disk without ovf:diskId: dropped")
                continue
            file_ref = attrs.get("fileRef", "")
            image_part, slash, volume_part = file_ref.rpartition("/")
            if slash:  # engine: <image>/<volume>, diskId is the volume
                image_id, volume_id = image_part, volume_part
            elif file_ref:  # OVA style: diskId is the image, fileRef the volume
                image_id, volume_id = disk_id, file_ref
            else:
                image_id, volume_id = None, disk_id
            storage = files.get(volume_id) or attrs.get("disk_storage_type", "IMAGE")
            parent_ref = attrs.get("parentRef")
            parent_id = parent_ref.rpartition("/")[2] if parent_ref else None
            volumes.append(_Volume(attrs, image_id, volume_id, parent_id,
                                   storage.upper() == "LUN"))
        return volumes

    def _active_snapshot(self, section: etree._Element | None) -> str | None:
        """The id of the ACTIVE snapshot, which owns the running volumes."""
        if section is None:
            return None
        for snapshot in section:
            if _LOCAL.get(snapshot.tag) != "Snapshot":
                continue
            for child in snapshot:
                if _LOCAL.get(child.tag) == "Type" and _text(child) == "ACTIVE":
                    return snapshot.get(self.id_key)
        return None

    @staticmethod
    def _leaf(chain: list[_Volume], item_parents: dict[str, str],
              active_snapshot: str | None) -> _Volume:
        """The active volume of one image's volumes.

        The engine lists every volume of a snapshot chain (one Disk and one Item each)
        and links them child to parent: ``ovf:parentRef`` is the parent's fileRef, the
        Item's ``rasd:Parent`` the parent volume (blank for the base). The active
        volume is the one no other volume names as parent. With a broken chain several
        qualify: the one the ACTIVE snapshot owns (``ovf:vm_snapshot_id``) wins, then
        the last listed (the engine lists a chain base first).
        """
        parents = set()
        for volume in chain:
            parents.add(volume.parent_id or item_parents.get(volume.volume_id))
        leaves = [v for v in chain if v.volume_id not in parents] or chain
        if len(leaves) > 1 and active_snapshot is not None:
            leaves = [v for v in leaves
                      if v.attrs.get("vm_snapshot_id") == active_snapshot] or leaves
        return leaves[-1]

    def _devices(self, items: list[_Item], volumes: list[_Volume],
                 active_snapshot: str | None, lease_sd: str | None) -> list[dict[str, Any]]:
        by_volume = {v.volume_id: v for v in volumes if not v.is_lun}
        by_disk_id = {v.attrs["diskId"]: v for v in volumes if not v.is_lun}
        # Volumes by image (a volume without one stands alone).
        images: dict[str, list[_Volume]] = {}
        for volume in by_volume.values():
            images.setdefault(volume.image_id or volume.volume_id, []).append(volume)
        item_of_volume: dict[str, _Item] = {}
        item_parents: dict[str, str] = {}

        # Devices in hardware order; an image disk is a placeholder at its first Item,
        # built once all Items of its chain are known.
        devices: list[dict[str, Any]] = []
        disk_slots: list[tuple[dict[str, Any], _Volume]] = []
        seen_images: set[str] = set()
        cdrom = rng = console = False
        dropped: dict[str, int] = {}
        for item in items:
            f = item.fields
            kind, device = f.get("Type"), f.get("Device")
            if kind is None:
                kind, default = _TYPE_OF_RESOURCE.get(f.get("ResourceType", ""), (None, None))
                if kind is None:
                    continue  # CPU, memory, USB policy: not devices
                device = device or default
            if kind == "disk" and device in ("disk", None):
                matched = self._volume_of(f, by_volume, by_disk_id)
                if matched is None:
                    self.warn(f"disk Item {f.get('InstanceId')}: no Disk in the DiskSection "
                              f"with that volume: dropped")
                    continue
                item_of_volume.setdefault(matched.volume_id, item)
                parent = f.get("Parent")
                if parent and parent != BLANK_UUID:
                    item_parents[matched.volume_id] = parent
                image_key = matched.image_id or matched.volume_id
                if image_key not in seen_images:
                    seen_images.add(image_key)
                    slot: dict[str, Any] = {}
                    devices.append(slot)
                    disk_slots.append((slot, matched))
            elif kind == "disk" and device == "cdrom":
                if not cdrom:
                    devices.append(dict(_CDROM))
                    cdrom = True
            elif kind == "interface":
                nic = self._nic(item, device)
                if nic is not None:
                    devices.append(nic)
            elif kind == "controller":
                ctrl = self._device(item, kind, device)
                if ctrl.get("device") == "virtio-scsi":
                    ctrl["device"] = "scsi"
                if ctrl.get("device") == "scsi":
                    ctrl["model"] = ctrl.get("specParams", {}).get("model", "virtio-scsi")
                devices.append(ctrl)
            elif kind == "video":
                devices.append({**self._device(item, kind, device), "alias": "video0"})
            elif kind == "rng":
                dev = self._device(item, kind, device)
                alias = f.get("Alias")
                if alias:
                    dev["alias"] = alias
                # The engine keeps the rng model in Device only.
                dev.setdefault("model", dev.get("device"))
                devices.append(dev)
                rng = True
            elif kind in ("console", "graphics", "watchdog"):
                devices.append(self._device(item, kind, device))
                console = console or kind == "console"
            elif kind == "balloon":
                dev = self._device(item, kind, device or "memballoon")
                dev.setdefault("specParams", {}).setdefault("model", "virtio")
                devices.append(dev)
            else:
                label = f"{kind}/{device}" if device else kind
                dropped[label] = dropped.get(label, 0) + 1

        disks = [(slot, self._image_disk(images[v.image_id or v.volume_id], item_of_volume,
                                         item_parents, active_snapshot))
                 for slot, v in disk_slots]
        # Direct LUNs have no Item: they follow the Items' devices.
        for volume in volumes:
            if volume.is_lun:
                slot = {}
                devices.append(slot)
                disks.append((slot, self._lun_disk(volume)))
        self._number_disks([(slot, built) for slot, built in disks if built is not None])
        for slot, built in disks:
            if built is not None:
                slot.update(built[0])
        devices = [d for d in devices if d]

        if not rng:
            devices.append({"type": "rng", "device": "virtio", "model": "virtio",
                            "specParams": {"source": "urandom"}})
        if not console:
            devices.append({"type": "console", "device": "console"})
        if lease_sd is not None:
            devices.append({"type": "lease", "device": "lease", "lease_id": self.vm_id,
                            "sd_id": lease_sd})
        if dropped:
            listed = ", ".join(f"{k} x{n}" if n > 1 else k for k, n in dropped.items())
            self.warn(f"hardware Items not converted (by Type/Device): {listed}")
        return devices

    def _volume_of(self, f: dict[str, str], by_volume: dict[str, _Volume],
                   by_disk_id: dict[str, _Volume]) -> _Volume | None:
        # Engine: InstanceId is the volume (== diskId). OVA style: InstanceId is the
        # volume (== fileRef) and diskId the image; OVA export: HostResource
        # "ovf:/disk/<diskId>".
        for ref in (f.get("InstanceId"), f.get("HostResource")):
            if ref is None:
                continue
            key = ref.removeprefix("ovf:/disk/").rpartition("/")[2]
            volume = by_volume.get(key) or by_disk_id.get(key)
            if volume is not None:
                return volume
        return None

    def _image_disk(self, chain: list[_Volume], item_of_volume: dict[str, _Item],
                    item_parents: dict[str, str], active_snapshot: str | None,
                    ) -> tuple[dict[str, Any], int | None, bool] | None:
        """One disk device on its image's active volume; with its OVF boot order."""
        leaf = self._leaf(chain, item_parents, active_snapshot)
        # The leaf's own Item, or (odd writers) the first Item of the chain.
        item = item_of_volume.get(leaf.volume_id) or next(
            item_of_volume[v.volume_id] for v in chain if v.volume_id in item_of_volume)
        f = item.fields
        attrs = leaf.attrs
        image_id = leaf.image_id
        name = f"disk {image_id or leaf.volume_id}"
        domain_id = None
        for volume in (leaf, *chain):
            storage = item_of_volume.get(volume.volume_id)
            candidate = storage.fields.get("StorageId") if storage else None
            if candidate and candidate != BLANK_UUID:
                domain_id = candidate
                break
        if domain_id is None:
            if self.default_domain is None:
                self.warn(f"{name}: no rasd:StorageId and no domain given: dropped")
                return None
            domain_id = self.default_domain
        if image_id is None:
            self.warn(f"{name}: no image id (ovf:fileRef): dropped")
            return None
        disk: dict[str, Any] = {
            "type": "disk", "device": "disk",
            "iface": self._iface(attrs, name),
            "format": self._format(attrs, name),
            "poolID": BLANK_UUID,  # the VM may start before the pool is connected
            "domainID": domain_id, "imageID": image_id, "volumeID": leaf.volume_id,
            "deviceId": image_id,
            "readonly": (f.get("IsReadOnly") or attrs.get("read-only", "false")).lower(),
            "shared": "shared" if _flag(attrs.get("shareable")) else "exclusive",
            "propagateErrors": "off",
        }
        address = self._address(f, name)
        if address is not None:
            disk["address"] = address
        return disk, _int(f.get("BootOrder")), _flag(attrs.get("boot"))

    def _lun_disk(self, volume: _Volume) -> tuple[dict[str, Any], int | None, bool] | None:
        attrs = volume.attrs
        name = f"LUN disk {attrs['diskId']}"
        guid = attrs.get("lun_id")
        if guid is None:
            self.warn(f"{name}: no ovf:lun_id: dropped")
            return None
        iface = self._iface(attrs, name)
        disk: dict[str, Any] = {
            # SCSI passthrough needs virtio-scsi; on another bus the LUN is a plain disk.
            "type": "disk", "device": "lun" if iface == "scsi" else "disk",
            "GUID": guid, "iface": iface, "format": "raw", "deviceId": attrs["diskId"],
            "readonly": attrs.get("read-only", "false").lower(),
            "shared": "shared" if _flag(attrs.get("shareable")) else "exclusive",
            "propagateErrors": "off",
        }
        if iface == "scsi" and _flag(attrs.get("scsi_reservation")):
            disk["managed_reservation"] = "true"
        return disk, None, _flag(attrs.get("boot"))

    def _iface(self, attrs: dict[str, str], name: str) -> str:
        raw = attrs.get("disk-interface")
        iface = _IFACES.get((raw or "").lower())
        if iface is None:
            what = "no ovf:disk-interface" if raw is None else \
                f"ovf:disk-interface {excerpt(repr(raw))} unknown"
            self.warn(f"{name}: {what}: ide (the engine's default)")
            iface = "ide"
        return iface

    def _format(self, attrs: dict[str, str], name: str) -> str:
        fmt = attrs.get("volume-format", "").lower()
        if fmt in ("raw", "cow"):
            return fmt
        guessed = _FORMAT_URIS.get(attrs.get("format", ""))
        if guessed is None:
            self.warn(f"{name}: neither ovf:volume-format nor ovf:format says raw or cow: "
                      f"raw")
            guessed = "raw"
        return guessed

    def _number_disks(self, disks: list[tuple[dict[str, Any],
                                              tuple[dict[str, Any], int | None, bool]]]) -> None:
        """Indexes and boot orders, in device order.

        Indexes count up and skip 2 (the CD-ROM's hdc), so names never clash. Boot
        orders follow the OVF's BootOrder (0 or none: not a boot disk), renumbered
        1.. since NICs and the CD-ROM get none here; when no disk has one, the first
        disk marked ovf:boot (else the first disk) boots, with a warning.
        """
        index = 0
        for _slot, (disk, _order, _boot) in disks:
            if index == _CDROM_INDEX:
                index += 1
            disk["index"] = str(index)
            index += 1
        ranked = sorted((order, n) for n, (_s, (_d, order, _b)) in enumerate(disks)
                        if order is not None and order > 0)
        for rank, (_order, n) in enumerate(ranked, 1):
            disks[n][1][0]["bootOrder"] = str(rank)
        if not ranked and disks:
            first = next((d for _s, (d, _o, boot) in disks if boot), disks[0][1][0])
            first["bootOrder"] = "1"
            self.warn(f"no disk has a BootOrder: disk {first.get('imageID') or first['GUID']} "
                      f"boots first")

    # -- other devices --

    def _address(self, f: dict[str, str], name: str) -> dict[str, str] | None:
        try:
            return _address(f.get("Address"))
        except ValueError:
            self.warn(f"{name}: rasd:Address {excerpt(repr(f.get('Address')))} is not "
                      f"an engine address map: left out")
            return None

    def _device(self, item: _Item, kind: str, device: str | None) -> dict[str, Any]:
        f = item.fields
        dev: dict[str, Any] = {"type": kind}
        if device is not None:
            dev["device"] = device
        if "InstanceId" in f:
            dev["deviceId"] = f["InstanceId"]
        address = self._address(f, f"{kind} {f.get('InstanceId')}")
        if address is not None:
            dev["address"] = address
        if item.spec is not None:
            spec = _spec(item.spec)
            if spec:
                dev["specParams"] = spec
        return dev

    def _nic(self, item: _Item, device: str | None) -> dict[str, Any] | None:
        f = item.fields
        mac = f.get("MACAddress")
        if mac is None or mac == "None":
            self.warn(f"NIC {f.get('InstanceId')} on {f.get('Connection')}: no "
                      f"rasd:MACAddress: dropped")
            return None
        nic = self._device(item, "interface", device or "bridge")
        model = f.get("ResourceSubType")
        ordinal = _int(model)
        if ordinal is not None and 0 <= ordinal < len(_NIC_MODELS):
            nic["nicModel"] = _NIC_MODELS[ordinal]
        elif model in _NIC_MODELS:  # the engine reader takes the name too
            nic["nicModel"] = model
        elif model is not None:
            self.warn(f"NIC {mac}: rasd:ResourceSubType {excerpt(repr(model))} unknown: "
                      f"nicModel left out")
        nic["macAddr"] = mac
        if "Connection" in f:
            nic["network"] = f["Connection"]
        if "Linked" in f:
            nic["linkActive"] = f["Linked"].lower()
        return nic
