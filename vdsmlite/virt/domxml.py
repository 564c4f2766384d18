"""The modern request form: libvirt domain XML with oVirt metadata.

Engines since 4.2 send ``VM.create(vmID, {"vmId": ..., "xml": "<domain ...>"})``
and ``VM.hotplugDisk/hotunplugDisk(vmID, {"vmId": ..., "xml": "<hotplug>..."})``.
The XML is written for libvirt; we run qemu ourselves, so this room reads what
decides the VM's identity, its disks and the devices run beside them (bridged
NICs, the virtio RNG, the balloon, the watchdog, the console) and lists the rest
in `VmDefinition.ignored` (graphics and video saying the VM runs headless).

What a disk *is* comes from ``<metadata><ovirt-vm:vm><ovirt-vm:device devtype="disk"
name="sda">``: a domain volume (poolID, domainID, imageID, volumeID) or a direct
LUN (GUID). The ``<source>`` path the engine predicted is never used: paths come
from preparing the storage on this host. The only exception is a ``device='lun'``
disk without metadata, whose GUID is read from ``/dev/mapper/<GUID>`` and checked
against the GUID alphabet.

The document is parsed with entities, DTDs and network off, and a DOCTYPE is
refused outright: engine XML never has one, and a hostile one is the classic
way to read host files (XXE) or exhaust memory (billion laughs).
"""

from __future__ import annotations

from typing import Any

from lxml import etree

from vdsmlite.errors import (
    CannotCreateVM,
    HotplugDiskFailed,
    HotunplugDiskFailed,
    VdsmError,
)
from vdsmlite.virt import checks
from vdsmlite.virt.checks import invalid, missing
from vdsmlite.virt.definition import (
    BalloonSpec,
    ConsoleSpec,
    ConsoleTarget,
    DiskDevice,
    DiskFormat,
    DiskSpec,
    ErrorPolicy,
    LeaseSpec,
    LunSource,
    NicModel,
    NicSpec,
    RngSpec,
    Sgio,
    VmDefinition,
    WatchdogSpec,
)

OVIRT_VM_NS = "http://ovirt.org/vm/1.0"
_VM = f"{{{OVIRT_VM_NS}}}"

# Engine XML is some 10 KiB; this leaves room for hundreds of devices.
MAX_XML_BYTES = 4 * 1024 * 1024

# libvirt's memory units, in bytes (KiB when no unit is given).
_UNITS = {
    "b": 1, "bytes": 1,
    "KB": 1000, "k": 1024, "KiB": 1024,
    "MB": 1000**2, "M": 1024**2, "MiB": 1024**2,
    "GB": 1000**3, "G": 1024**3, "GiB": 1024**3,
    "TB": 1000**4, "T": 1024**4, "TiB": 1024**4,
}
_MIB = 1024**2

# libvirt <cpu><feature policy=>: what qemu's +/- flag each policy is.
_FEATURE_POLICY = {"require": "+", "force": "+", "disable": "-", "forbid": "-"}

_ERROR_POLICIES = {p.value: p for p in ErrorPolicy}

# Top-level <domain> children this room reads; the rest is listed as ignored.
_READ = {"name", "uuid", "memory", "currentMemory", "vcpu", "cpu", "os", "metadata",
         "devices"}


def parse_domain(xml: str | bytes, vm_id: str) -> VmDefinition:
    """The VM a ``VM.create`` domain XML describes, for the verb's ``vmID``."""
    vm_id = checks.uuid(vm_id, "vmId")
    field = "vmParams.xml"
    root = _parse(xml, field)
    if root.tag != "domain":
        raise invalid(field, f"root element is <{root.tag}>, not <domain>")
    if root.get("type", "kvm") not in ("kvm", "qemu"):
        raise CannotCreateVM(f"{field}: domain type {root.get('type')!r}; only kvm runs here")
    ignored: list[str] = []

    name = checks.vm_name(_text(root, "name"), f"{field} <name>")
    uuid = checks.uuid(_text(root, "uuid"), f"{field} <uuid>")
    if uuid != vm_id:
        raise invalid(f"{field} <uuid>", f"{uuid} is not the vmId {vm_id}")

    memory = _memory_mib(root.find("memory"), f"{field} <memory>")
    if memory is None:
        raise missing(f"{field} <memory>")
    current = _memory_mib(root.find("currentMemory"), f"{field} <currentMemory>")
    if current is not None and current != memory:
        ignored.append(f"currentMemory {current} MiB (balloon target)")

    vcpus, max_vcpus = _vcpus(root.find("vcpu"), f"{field} <vcpu>")
    cpu = _cpu(root.find("cpu"), f"{field} <cpu>", ignored)
    machine, uefi, boot = _os(root.find("os"), f"{field} <os>", ignored)

    vm_meta = _vm_metadata(root)
    launch = _meta_child(vm_meta, "launchPaused")
    launch_paused = (checks.boolean(launch.text, f"{field} ovirt-vm:launchPaused")
                     if launch is not None else False)

    disks: list[DiskSpec] = []
    vm_lease: LeaseSpec | None = None
    nics: list[NicSpec] = []
    rng: RngSpec | None = None
    balloon: BalloonSpec | None = None
    watchdog: WatchdogSpec | None = None
    console: ConsoleSpec | None = None
    disk_meta = _disk_metadata(vm_meta, field)
    devices = root.find("devices")
    for elem in devices if devices is not None else ():
        if not isinstance(elem.tag, str):
            continue  # comments, processing instructions
        if elem.tag == "interface" and elem.get("type") in ("bridge", "network"):
            nics.append(_nic(elem, f"{field} interface {len(nics)}", len(nics)))
        elif elem.tag == "rng" and rng is None:
            rng = _rng(elem, f"{field} <rng>")
        elif elem.tag == "memballoon" and balloon is None:
            model = elem.get("model")
            if model == "virtio":
                balloon = BalloonSpec(device_id=_device_id(elem, {}, f"{field} <memballoon>"))
            elif model != "none":
                raise invalid(f"{field} <memballoon model>", f"unknown balloon model "
                                                             f"{model!r} (virtio or none)")
        elif elem.tag == "watchdog" and watchdog is None:
            where = f"{field} <watchdog>"
            watchdog = checks.watchdog(elem.get("model"), elem.get("action"), where, ignored)
            watchdog.device_id = _device_id(elem, {}, where)
        elif elem.tag == "console" and console is None:
            console = _console(elem, f"{field} <console>")
        elif elem.tag == "disk":
            disk = _disk(elem, disk_meta, field, CannotCreateVM)
            if isinstance(disk, str):
                ignored.append(disk)
            else:
                disks.append(disk)
        elif elem.tag == "lease":
            # Never dropped: an HA VM without its lease could run on two hosts at once.
            if vm_lease is not None:
                raise invalid(f"{field} <lease>", "a second VM lease; a VM has at most one")
            vm_lease = _lease(elem, f"{field} <lease>")
        elif elem.tag == "hostdev" and elem.get("type") == "scsi":
            # A SCSI hostdev is a disk by another name: it cannot be dropped quietly.
            raise CannotCreateVM(f"{field}: <{elem.tag}> devices are not supported "
                                 f"({_describe(elem)})")
        else:
            ignored.append(_describe(elem))
    for elem in root:
        if isinstance(elem.tag, str) and elem.tag not in _READ:
            ignored.append(_describe(elem))

    source_xml = xml.decode("utf-8", "replace") if isinstance(xml, bytes) else xml
    return checks.check_vm(VmDefinition(
        vm_id=vm_id, name=name, memory_mib=memory, vcpus=vcpus, max_vcpus=max_vcpus,
        cpu_sockets=cpu["sockets"], cpu_cores=cpu["cores"], cpu_threads=cpu["threads"],
        cpu_model=cpu["model"], cpu_flags=cpu["flags"], machine=machine, uefi=uefi,
        boot_devices=boot, launch_paused=launch_paused, disks=disks, nics=nics, rng=rng,
        balloon=balloon, watchdog=watchdog, console=console, lease=vm_lease, ignored=ignored,
        source_form="xml", source_xml=source_xml), field)


def _lease(elem: etree._Element, field: str) -> LeaseSpec:
    """libvirt's ``<lease><key>leaseId</key><lockspace>sdId</lockspace>
    <target path=... offset=.../></lease>`` (path/offset may be VDSM's placeholders)."""
    target = elem.find("target")
    return checks.lease(_text(elem, "lockspace"), _text(elem, "key"),
                        target.get("path") if target is not None else None,
                        target.get("offset") if target is not None else None, field)


def parse_hotplug(xml: str | bytes, vm_id: str, *, unplug: bool = False) -> DiskSpec:
    """The disk a ``VM.hotplugDisk`` (or, with ``unplug``, hotunplugDisk) XML names.

    The document holds one ``<devices><disk>`` and the ``<metadata>`` saying what
    it is, under any root element (the engine sends ``<hotplug>``).
    """
    checks.uuid(vm_id, "vmId")
    unsupported: type[VdsmError] = HotunplugDiskFailed if unplug else HotplugDiskFailed
    field = "params.xml"
    root = _parse(xml, field)
    disks = root.findall("devices/disk")
    if len(disks) != 1:
        raise invalid(field, f"{len(disks)} <devices><disk> elements; one disk per call")
    disk = _disk(disks[0], _disk_metadata(_vm_metadata(root), field), field, unsupported)
    if isinstance(disk, str):
        raise unsupported(f"{field}: nothing to plug ({disk})")
    return disk


def _parse(xml: str | bytes, field: str) -> etree._Element:
    if isinstance(xml, str):
        # lxml refuses str with an encoding declaration, which engine XML has.
        xml = xml.encode("utf-8")
    if not isinstance(xml, bytes):
        raise invalid(field, f"not an XML document: {type(xml).__name__}")
    if len(xml) > MAX_XML_BYTES:
        raise invalid(field, f"{len(xml)} bytes, more than {MAX_XML_BYTES}")
    if b"<!DOCTYPE" in xml:
        # Refused before libxml2 reads any entity declaration; the check after
        # parsing catches the same in encodings where these bytes differ.
        raise invalid(field, "a DOCTYPE (entity definitions are not accepted)")
    parser = etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False,
                             huge_tree=False, remove_comments=True, remove_pis=True)
    try:
        root = etree.fromstring(xml, parser)
    except etree.XMLSyntaxError as e:
        raise invalid(field, f"not well-formed XML: {e}") from e
    info = root.getroottree().docinfo
    # Any <!DOCTYPE>, with or without a subset, leaves an internalDTD behind.
    if info.internalDTD is not None or info.externalDTD is not None:
        raise invalid(field, "a DOCTYPE (entity definitions are not accepted)")
    return root


def _text(parent: etree._Element, tag: str) -> str | None:
    elem = parent.find(tag)
    if elem is None or elem.text is None:
        return None
    return elem.text.strip()


def _memory_mib(elem: etree._Element | None, field: str) -> int | None:
    if elem is None:
        return None
    unit = elem.get("unit", "KiB")
    if unit not in _UNITS:
        raise invalid(field, f"unknown unit {unit!r}")
    size = checks.integer(elem.text, field, minimum=1) * _UNITS[unit]
    if size % _MIB:
        raise invalid(field, f"{elem.text} {unit} is not a whole number of MiB")
    return checks.integer(size // _MIB, field, minimum=1, maximum=checks.MAX_MEMORY_MIB)


def _vcpus(elem: etree._Element | None, field: str) -> tuple[int, int | None]:
    """(vcpus, max_vcpus): <vcpu current='2'>16</vcpu> is 2 of at most 16."""
    if elem is None:
        return 1, None  # libvirt's default
    most = checks.integer(elem.text, field, minimum=1, maximum=checks.MAX_VCPUS)
    if elem.get("current") is None:
        return most, None
    return checks.integer(elem.get("current"), f"{field} current", minimum=1,
                          maximum=checks.MAX_VCPUS), most


def _cpu(elem: etree._Element | None, field: str, ignored: list[str]) -> dict[str, Any]:
    cpu: dict[str, Any] = {"model": None, "flags": [], "sockets": None, "cores": None,
                           "threads": None}
    if elem is None:
        return cpu
    mode = elem.get("mode", "custom")
    if mode == "host-passthrough":
        cpu["model"] = "host"
    elif mode == "host-model":
        # libvirt would expand the host's model; qemu's nearest is the host itself.
        cpu["model"] = "host"
        ignored.append("cpu host-model (run as host-passthrough)")
    elif mode == "custom":
        model = _text(elem, "model")
        if model:
            cpu["model"] = checks.word(model, f"{field} <model>")
    else:
        raise invalid(field, f"unknown cpu mode {mode!r}")
    for feature in elem.findall("feature"):
        name = checks.word(feature.get("name"), f"{field} <feature name>")
        policy = feature.get("policy", "require")
        if policy in _FEATURE_POLICY:
            cpu["flags"].append(_FEATURE_POLICY[policy] + name)
        elif policy == "optional":
            ignored.append(f"cpu feature {name} optional")
        else:
            raise invalid(f"{field} <feature {name}>", f"unknown policy {policy!r}")
    topology = elem.find("topology")
    if topology is not None:
        for key in ("sockets", "cores", "threads"):
            cpu[key] = checks.integer(topology.get(key), f"{field} <topology {key}>",
                                      minimum=1, maximum=checks.MAX_VCPUS)
        if topology.get("dies", "1") != "1":
            ignored.append(f"cpu topology dies={topology.get('dies')}")
    if elem.find("numa") is not None:
        ignored.append("cpu numa")
    return cpu


def _os(elem: etree._Element | None, field: str,
        ignored: list[str]) -> tuple[str | None, bool, list[str]]:
    """(machine, uefi, boot devices) from <os>."""
    if elem is None:
        return None, False, []
    machine = None
    kind = elem.find("type")
    if kind is not None:
        if (kind.text or "hvm").strip() != "hvm":
            raise CannotCreateVM(f"{field} <type>: {kind.text!r} guests; only hvm runs here")
        if kind.get("arch", "x86_64") != "x86_64":
            raise CannotCreateVM(f"{field} <type arch>: {kind.get('arch')!r}; only x86_64 "
                                 f"runs here")
        if kind.get("machine"):
            machine = checks.word(kind.get("machine"), f"{field} <type machine>")
    uefi = elem.get("firmware") == "efi"
    loader = elem.find("loader")
    if loader is not None:
        # The loader and NVRAM paths are the engine's guess at this host's files.
        uefi = uefi or loader.get("type") == "pflash"
        ignored.append("os loader path" + (" (secure boot)" if loader.get("secure") == "yes"
                                           else ""))
    if elem.find("nvram") is not None:
        ignored.append("os nvram")
    boot = []
    for entry in elem.findall("boot"):
        dev = entry.get("dev")
        if dev not in ("hd", "cdrom", "network", "fd"):
            raise invalid(f"{field} <boot dev>", f"unknown boot device {dev!r}")
        boot.append(dev)
    for child in elem:
        if isinstance(child.tag, str) and child.tag not in ("type", "boot", "loader",
                                                            "nvram"):
            ignored.append(f"os {child.tag}")
    return machine, uefi, boot


def _vm_metadata(root: etree._Element) -> etree._Element | None:
    meta = root.find("metadata")
    return None if meta is None else meta.find(f"{_VM}vm")


def _meta_child(vm_meta: etree._Element | None, tag: str) -> etree._Element | None:
    # Engine 4.2 wrote some ovirt-vm:vm children without the namespace prefix.
    if vm_meta is None:
        return None
    found = vm_meta.find(f"{_VM}{tag}")
    return found if found is not None else vm_meta.find(tag)


def _disk_metadata(vm_meta: etree._Element | None, field: str) -> dict[str, dict[str, Any]]:
    """Per target name: the disk's ovirt-vm:device children, by local name.

    Simple children become text; ones with children (payload, volumeChain, ...)
    become True, so the caller sees that they are there.
    """
    out: dict[str, dict[str, Any]] = {}
    if vm_meta is None:
        return out
    for dev in vm_meta.findall(f"{_VM}device"):
        if dev.get("devtype") != "disk":
            continue
        name = dev.get("name")
        if name in out:
            raise invalid(f"{field} ovirt-vm:device", f"two metadata entries for disk {name}")
        values: dict[str, Any] = {}
        for child in dev:
            if not isinstance(child.tag, str):
                continue
            key = etree.QName(child).localname
            values[key] = True if len(child) else (child.text or "").strip()
        out[str(name)] = values
    return out


def _disk(elem: etree._Element, metadata: dict[str, dict[str, Any]], field: str,
          unsupported: type[VdsmError]) -> DiskSpec | str:
    """One <disk>: its DiskSpec, or a string saying why nothing is attached."""
    target = elem.find("target")
    name = target.get("dev") if target is not None else None
    if not name:
        raise missing(f"{field} <disk><target dev>")
    where = f"{field} disk {name}"
    device = elem.get("device", "disk")
    if device == "floppy":
        raise unsupported(f"{where}: floppy drives (sysprep payloads) are not supported")
    if device not in ("disk", "lun", "cdrom"):
        raise invalid(f"{where} device", f"unknown device {device!r}")
    kind = elem.get("type", "file")
    if kind == "network":
        source = elem.find("source")
        protocol = source.get("protocol") if source is not None else None
        raise unsupported(f"{where}: network disks ({protocol}) are not supported")
    if kind not in ("file", "block"):
        raise unsupported(f"{where}: disks of type {kind!r} are not supported")

    bus_word = target.get("bus") if target is not None else None
    bus = checks.bus(bus_word, f"{where} <target bus>")
    index = checks.disk_index(name, f"{where} <target dev>")
    meta = metadata.get(name, {})
    source = elem.find("source")
    path = "" if source is None else (source.get("file") or source.get("dev") or "")

    if "payload" in meta or path == "PAYLOAD:":
        raise unsupported(f"{where}: payload disks (cloud-init/sysprep) are not supported")
    if "RBD" in meta:
        raise unsupported(f"{where}: Ceph RBD disks are not supported")
    if checks.boolean(meta.get("managed", "false"), f"{where} ovirt-vm:managed"):
        raise unsupported(f"{where}: managed block storage disks are not supported")
    shared = elem.find("shareable") is not None
    shared_meta = meta.get("shared")
    if shared_meta == "transient":
        raise unsupported(f"{where}: transient disks are not supported")
    if shared_meta not in (None, "", "true", "false", "none", "exclusive", "shared"):
        raise invalid(f"{where} ovirt-vm:shared", f"unknown value {shared_meta!r}")
    shared = shared or shared_meta in ("shared", "true")

    src = checks.source_of({k: meta.get(k) for k in ("poolID", "domainID", "imageID",
                                                     "volumeID")},
                           meta.get("GUID"), f"{where} ovirt-vm:device")
    if src is None and device == "lun" and kind == "block" and path.startswith("/dev/mapper/"):
        # No metadata: the GUID is the device-mapper name, and only that is used.
        src = LunSource(guid=checks.guid(path[len("/dev/mapper/"):], f"{where} <source dev>"))
    if src is None:
        if device == "cdrom" and not path:
            return f"cdrom {name} (empty)"
        raise invalid(f"{where} ovirt-vm:device",
                      "no domain volume (poolID, domainID, imageID, volumeID) nor LUN "
                      "(GUID) in its metadata; a path alone is not used")

    driver = elem.find("driver")
    fmt = driver.get("type", "raw") if driver is not None else "raw"
    if fmt not in ("raw", "qcow2"):
        raise invalid(f"{where} <driver type>", f"unknown format {fmt!r}")
    policy = driver.get("error_policy", "stop") if driver is not None else "stop"
    if policy not in _ERROR_POLICIES:
        raise invalid(f"{where} <driver error_policy>", f"unknown policy {policy!r}")

    boot = elem.find("boot")
    serial = _text(elem, "serial")
    sgio = elem.get("sgio")
    if sgio not in (None, "filtered", "unfiltered"):
        raise invalid(f"{where} sgio", f"unknown value {sgio!r}")
    reservations = source.find("reservations") if source is not None else None
    address = elem.find("address")

    disk = DiskSpec(
        name=name, bus=bus, index=index, source=src, device=DiskDevice(device),
        format=DiskFormat.COW if fmt == "qcow2" else DiskFormat.RAW,
        readonly=device == "cdrom" or elem.find("readonly") is not None,
        shared=shared,
        serial=checks.serial(serial, f"{where} <serial>") if serial else None,
        boot_order=(checks.integer(boot.get("order"), f"{where} <boot order>", minimum=1)
                    if boot is not None else None),
        address=checks.address(dict(address.attrib), f"{where} <address>")
        if address is not None else None,
        error_policy=_ERROR_POLICIES[policy],
        device_id=_device_id(elem, meta, where),
        sgio=Sgio(sgio) if sgio else None,
        scsi_reservation=reservations is not None and reservations.get("managed") == "yes",
    )
    if reservations is not None and reservations.get("managed") != "yes":
        raise unsupported(f"{where}: unmanaged SCSI reservations (a caller's helper "
                          f"socket) are not supported")
    return checks.check_disk(disk, where, unsupported)


def _nic(elem: etree._Element, where: str, order: int) -> NicSpec:
    """A bridged NIC: <interface type='bridge'> (or 'network', VDSM's vdsm-<net>)."""
    mac = elem.find("mac")
    model_elem = elem.find("model")
    # libvirt's default model for an x86 guest without <model> is rtl8139.
    model = (checks.nic_model(model_elem.get("type"), f"{where} <model type>")
             if model_elem is not None else NicModel.RTL8139)
    source = elem.find("source")
    if elem.get("type") == "bridge":
        net = source.get("bridge") if source is not None else None
    else:
        net = source.get("network") if source is not None else None
        # VDSM names the libvirt network of engine network X "vdsm-X".
        if net and net.startswith("vdsm-"):
            net = net[len("vdsm-"):]
    link = elem.find("link")
    state = link.get("state", "up") if link is not None else "up"
    if state not in ("up", "down"):
        raise invalid(f"{where} <link state>", f"unknown link state {state!r} (up or down)")
    boot = elem.find("boot")
    return NicSpec(
        mac=checks.mac(mac.get("address") if mac is not None else None,
                       f"{where} <mac address>"),
        model=model, network=checks.network(net, f"{where} <source>"), order=order,
        link_up=state == "up", device_id=_device_id(elem, {}, where),
        boot_order=(checks.integer(boot.get("order"), f"{where} <boot order>", minimum=1)
                    if boot is not None else None))


def _rng(elem: etree._Element, where: str) -> RngSpec:
    if elem.get("model", "virtio") != "virtio":
        raise invalid(f"{where} model", f"unknown RNG model {elem.get('model')!r} (virtio)")
    backend = elem.find("backend")
    if backend is None:
        raise missing(f"{where} <backend>")
    if backend.get("model", "random") != "random":
        # egd (a chardev to an entropy daemon) has no source file to read.
        raise CannotCreateVM(f"{where}: RNG backend {backend.get('model')!r} is not "
                             f"supported (random only)")
    rate = elem.find("rate")
    return RngSpec(
        source=checks.rng_source((backend.text or "/dev/random").strip(),
                                 f"{where} <backend>"),
        period_ms=(checks.integer(rate.get("period"), f"{where} <rate period>", minimum=1)
                   if rate is not None and rate.get("period") else None),
        max_bytes=(checks.integer(rate.get("bytes"), f"{where} <rate bytes>", minimum=1)
                   if rate is not None and rate.get("bytes") else None),
        device_id=_device_id(elem, {}, where))


def _console(elem: etree._Element, where: str) -> ConsoleSpec:
    """<console type='pty'>: the guest side is its <target type>; the host side is
    always a socket in the VM's run dir (there is no tty to hand out)."""
    target = elem.find("target")
    kind = (target.get("type") if target is not None else None) or "serial"
    if kind not in ("serial", "virtio"):
        raise invalid(f"{where} <target type>", f"unknown console type {kind!r} "
                                                f"(serial or virtio)")
    return ConsoleSpec(target=ConsoleTarget(kind), device_id=_device_id(elem, {}, where))


def _device_id(elem: etree._Element, meta: dict[str, Any], where: str) -> str | None:
    """The engine's device id: its "ua-<id>" alias, else ovirt-vm:deviceId."""
    alias = elem.find("alias")
    name = alias.get("name", "") if alias is not None else ""
    if name.startswith("ua-"):
        return checks.uuid(name[3:], f"{where} <alias name>")
    # Other aliases ("scsi0-0-0-0") are libvirt's own, from a running domain.
    if meta.get("deviceId"):
        return checks.uuid(meta["deviceId"], f"{where} ovirt-vm:deviceId")
    return None


def _describe(elem: etree._Element) -> str:
    """A short human name for an element left out: "interface bridge ovirtmgmt"."""
    words = [str(elem.tag), elem.get("type") or ""]
    if elem.tag == "interface":
        # What the NIC is plugged into says more than its model.
        source = elem.find("source")
        if source is not None:
            words.append(source.get("bridge") or source.get("network") or "")
        return " ".join(w for w in words if w)
    model = elem.get("model")
    model_elem = elem.find("model")
    if model is None and model_elem is not None:
        model = model_elem.get("type")
    if model:
        words.append(model)
    if elem.tag == "channel":
        target = elem.find("target")
        if target is not None and target.get("name"):
            words.append(target.get("name") or "")
    elif elem.tag in ("on_poweroff", "on_reboot", "on_crash") and elem.text:
        words.append(elem.text.strip())
    if elem.tag in checks.HEADLESS:
        words.append("(runs headless)")
    return " ".join(w for w in words if w)
