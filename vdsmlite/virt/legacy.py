"""The legacy request form: VDSM's ``vmParams`` with a ``devices`` list of dicts.

Engines before 4.2 (and VDSM's own schema, `VmParameters`/`VmDiskDevice`) describe
a VM as flat keys (``vmName``, ``memSize`` in MiB, ``smp``, ``cpuType``...) and
its devices as dicts; a hot-plugged disk comes as ``params["drive"]``. Such
engines send numbers and booleans as strings as often as not, so both spellings
are taken. The result is the same `VmDefinition` `virt.domxml` makes of the
equivalent XML; disk names follow VDSM's rule (bus prefix + base-26 index:
virtio 0 -> vda, scsi 1 -> sdb, ide 2 -> hdc).

As in the XML form, a disk is a domain volume (poolID, domainID, imageID,
volumeID) or a direct LUN (GUID); a ``path`` in the dict is the engine's guess and
is never used. NICs (``type: interface``, ``device: bridge``), the virtio RNG, the
balloon, the watchdog and the console are run; other devices are accepted and
listed in `VmDefinition.ignored` (graphics and video saying the VM runs headless).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

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
    NicSpec,
    RngSpec,
    Sgio,
    VmDefinition,
    WatchdogSpec,
)

# VDSM's propagateErrors words (its "true"/"false" too) -> error policy.
_PROPAGATE = {"off": ErrorPolicy.STOP, "false": ErrorPolicy.STOP,
              "on": ErrorPolicy.ENOSPACE, "true": ErrorPolicy.ENOSPACE,
              "report": ErrorPolicy.REPORT}
# VDSM's shared words; "false" meant exclusive or none depending on host config,
# both of which are "not shareable" here.
_SHARED = {"false": False, "none": False, "exclusive": False, "true": True, "shared": True}
# VDSM's legacy cpuType words for the host CPU modes.
_HOST_CPU = {"hostPassthrough", "hostModel"}


def parse_vm_params(params: Mapping[str, Any], vm_id: str | None = None) -> VmDefinition:
    """The VM a legacy ``vmParams`` describes; ``vm_id`` is the verb's vmID, if any."""
    field = "vmParams"
    if not isinstance(params, Mapping):
        raise invalid(field, f"not a mapping: {type(params).__name__}")
    own = params.get("vmId")
    if own in (None, ""):
        own = vm_id
    vm_uuid = checks.uuid(own, f"{field}.vmId")
    if vm_id is not None and checks.uuid(vm_id, "vmId") != vm_uuid:
        raise invalid(f"{field}.vmId", f"{vm_uuid} is not the vmID {vm_id}")
    ignored: list[str] = []

    name = checks.vm_name(params.get("vmName"), f"{field}.vmName")
    if params.get("memSize") in (None, ""):
        raise missing(f"{field}.memSize")
    memory = checks.integer(params["memSize"], f"{field}.memSize", minimum=1,
                            maximum=checks.MAX_MEMORY_MIB)
    vcpus = checks.integer(params.get("smp", 1), f"{field}.smp", minimum=1,
                           maximum=checks.MAX_VCPUS)
    max_vcpus = _optional_int(params, "maxVCpus", field, minimum=1, maximum=checks.MAX_VCPUS)
    cores = _optional_int(params, "smpCoresPerSocket", field, minimum=1,
                          maximum=checks.MAX_VCPUS)
    threads = _optional_int(params, "smpThreadsPerCore", field, minimum=1,
                            maximum=checks.MAX_VCPUS)
    sockets = None
    if cores is not None or threads is not None:
        # The legacy form says cores and threads; sockets are what makes up the rest.
        cores, threads = cores or 1, threads or 1
        total = max_vcpus if max_vcpus is not None else vcpus
        if total % (cores * threads):
            raise invalid(f"{field}.smpCoresPerSocket",
                          f"{total} vCPUs are not whole sockets of {cores} cores * "
                          f"{threads} threads")
        sockets = total // (cores * threads)

    cpu_model, cpu_flags = _cpu_type(params.get("cpuType"), f"{field}.cpuType")
    machine = params.get("emulatedMachine")
    machine = checks.word(machine, f"{field}.emulatedMachine") if machine else None
    launch_paused = checks.boolean(params.get("launchPaused", False), f"{field}.launchPaused")

    devices = params.get("devices", [])
    if not isinstance(devices, list):
        raise invalid(f"{field}.devices", f"not a list: {type(devices).__name__}")
    disks: list[DiskSpec] = []
    vm_lease: LeaseSpec | None = None
    nics: list[NicSpec] = []
    singles: dict[str, Any] = {}  # rng, balloon, watchdog, console: one each
    for i, dev in enumerate(devices):
        where = f"{field}.devices[{i}]"
        if not isinstance(dev, Mapping):
            raise invalid(where, f"not a mapping: {type(dev).__name__}")
        kind = dev.get("type")
        if kind == "lease":
            # Never dropped: an HA VM without its lease could run on two hosts at once.
            if vm_lease is not None:
                raise invalid(where, "a second VM lease; a VM has at most one")
            vm_lease = checks.lease(dev.get("sd_id"), dev.get("lease_id"), dev.get("path"),
                                    dev.get("offset"), where)
        elif kind == "disk":
            disk = _drive(dev, where, CannotCreateVM)
            if isinstance(disk, str):
                ignored.append(disk)
            else:
                disks.append(disk)
        elif kind == "interface" and dev.get("device") in (None, "", "bridge"):
            nics.append(_nic(dev, where, len(nics)))
        elif kind in _SINGLES:
            if kind in singles:
                raise invalid(where, f"a second {kind} device")
            singles[kind] = _SINGLES[kind](dev, where, ignored)
        else:
            ignored.append(_describe(dev))
    balloon = singles.get("balloon")

    return checks.check_vm(VmDefinition(
        vm_id=vm_uuid, name=name, memory_mib=memory, vcpus=vcpus, max_vcpus=max_vcpus,
        cpu_sockets=sockets, cpu_cores=cores, cpu_threads=threads, cpu_model=cpu_model,
        cpu_flags=cpu_flags, machine=machine, launch_paused=launch_paused, disks=disks,
        nics=nics, rng=singles.get("rng"),
        balloon=balloon if isinstance(balloon, BalloonSpec) else None,
        watchdog=singles.get("watchdog"), console=singles.get("console"),
        lease=vm_lease, ignored=ignored, source_form="dict"), field)


def parse_drive(drive: Mapping[str, Any], *, unplug: bool = False) -> DiskSpec:
    """The disk of a legacy ``VM.hotplugDisk`` (or hotunplugDisk) ``params["drive"]``."""
    unsupported: type[VdsmError] = HotunplugDiskFailed if unplug else HotplugDiskFailed
    field = "params.drive"
    if not isinstance(drive, Mapping):
        raise invalid(field, f"not a mapping: {type(drive).__name__}")
    disk = _drive(drive, field, unsupported)
    if isinstance(disk, str):
        raise unsupported(f"{field}: nothing to plug ({disk})")
    return disk


def _optional_int(params: Mapping[str, Any], key: str, field: str, *, minimum: int,
                  maximum: int) -> int | None:
    value = params.get(key)
    if value in (None, ""):
        return None
    return checks.integer(value, f"{field}.{key}", minimum=minimum, maximum=maximum)


def _cpu_type(value: Any, field: str) -> tuple[str | None, list[str]]:
    """VDSM's cpuType is the model and its flags: "Haswell-noTSX,+vme,-hle"."""
    if value in (None, ""):
        return None, []
    if not isinstance(value, str):
        raise invalid(field, f"not a CPU type: {value!r}")
    model, *flags = (part.strip() for part in value.split(","))
    model = "host" if model in _HOST_CPU else checks.word(model, field)
    out = []
    for flag in flags:
        if flag[:1] not in ("+", "-"):
            raise invalid(field, f"CPU flag {flag!r} is neither +name nor -name")
        out.append(flag[0] + checks.word(flag[1:], field))
    return model, out


def _drive(dev: Mapping[str, Any], where: str,
           unsupported: type[VdsmError]) -> DiskSpec | str:
    """One disk dict: its DiskSpec, or a string saying why nothing is attached."""
    device = dev.get("device") or "disk"
    if device == "floppy":
        raise unsupported(f"{where}: floppy drives (sysprep payloads) are not supported")
    if device not in ("disk", "lun", "cdrom"):
        raise invalid(f"{where}.device", f"unknown device {device!r}")
    if dev.get("diskType") == "network" or dev.get("protocol"):
        raise unsupported(f"{where}: network disks ({dev.get('protocol')}) are not supported")
    spec = dev.get("specParams") or {}
    if isinstance(spec, Mapping) and spec.get("vmPayload"):
        raise unsupported(f"{where}: payload disks (cloud-init/sysprep) are not supported")
    if checks.boolean(dev.get("managed", False), f"{where}.managed"):
        raise unsupported(f"{where}: managed block storage disks are not supported")

    iface = dev.get("iface")
    bus = checks.bus(iface, f"{where}.iface")
    if dev.get("index") in (None, ""):
        raise missing(f"{where}.index")
    index = checks.integer(dev["index"], f"{where}.index", maximum=18277)  # up to "zzz"
    name = checks.disk_name(str(iface), index)

    shared_word = str(dev.get("shared", "false")).lower()
    if shared_word == "transient":
        raise unsupported(f"{where}: transient disks are not supported")
    if shared_word not in _SHARED:
        raise invalid(f"{where}.shared", f"unknown value {dev.get('shared')!r}")

    src = checks.source_of({k: dev.get(k) for k in ("poolID", "domainID", "imageID",
                                                    "volumeID")},
                           dev.get("GUID"), where)
    if src is None:
        if device == "cdrom" and not dev.get("path"):
            return f"cdrom {name} (empty)"
        raise invalid(where, "no domain volume (poolID, domainID, imageID, volumeID) nor "
                             "LUN (GUID); a path alone is not used")

    fmt = dev.get("format", "raw")
    if fmt not in ("raw", "cow"):
        raise invalid(f"{where}.format", f"unknown format {fmt!r} (raw or cow)")
    propagate = str(dev.get("propagateErrors", "off")).lower()
    if propagate not in _PROPAGATE:
        raise invalid(f"{where}.propagateErrors", f"unknown value {dev['propagateErrors']!r}")
    sgio = dev.get("sgio")
    if sgio not in (None, "", "filtered", "unfiltered"):
        raise invalid(f"{where}.sgio", f"unknown value {sgio!r}")
    boot = dev.get("bootOrder")
    serial = dev.get("serial")
    device_id = dev.get("deviceId")

    disk = DiskSpec(
        name=name, bus=bus, index=index, source=src, device=DiskDevice(device),
        format=DiskFormat(fmt),
        readonly=device == "cdrom" or checks.boolean(dev.get("readonly", False),
                                                    f"{where}.readonly"),
        shared=_SHARED[shared_word],
        serial=checks.serial(serial, f"{where}.serial") if serial else None,
        boot_order=(checks.integer(boot, f"{where}.bootOrder", minimum=1)
                    if boot not in (None, "") else None),
        address=checks.address(dev.get("address"), f"{where}.address"),
        error_policy=_PROPAGATE[propagate],
        device_id=checks.uuid(device_id, f"{where}.deviceId") if device_id else None,
        sgio=Sgio(sgio) if sgio else None,
        # VDSM's own name for libvirt's <reservations managed='yes'>.
        scsi_reservation=checks.boolean(dev.get("managed_reservation", False),
                                        f"{where}.managed_reservation"),
    )
    return checks.check_disk(disk, where, unsupported)


def _nic(dev: Mapping[str, Any], where: str, order: int) -> NicSpec:
    boot = dev.get("bootOrder")
    device_id = dev.get("deviceId")
    return NicSpec(
        mac=checks.mac(dev.get("macAddr"), f"{where}.macAddr"),
        model=checks.nic_model(dev.get("nicModel"), f"{where}.nicModel"),
        network=checks.network(dev.get("network"), f"{where}.network"),
        order=order,
        link_up=checks.boolean(dev.get("linkActive", True), f"{where}.linkActive"),
        device_id=checks.uuid(device_id, f"{where}.deviceId") if device_id else None,
        boot_order=(checks.integer(boot, f"{where}.bootOrder", minimum=1)
                    if boot not in (None, "") else None))


def _spec(dev: Mapping[str, Any], where: str) -> Mapping[str, Any]:
    spec = dev.get("specParams") or {}
    if not isinstance(spec, Mapping):
        raise invalid(f"{where}.specParams", f"not a mapping: {type(spec).__name__}")
    return spec


def _dev_id(dev: Mapping[str, Any], where: str) -> str | None:
    device_id = dev.get("deviceId")
    return checks.uuid(device_id, f"{where}.deviceId") if device_id else None


def _rng(dev: Mapping[str, Any], where: str, ignored: list[str]) -> RngSpec:
    spec = _spec(dev, where)
    model = dev.get("model") or dev.get("device") or "virtio"
    if model != "virtio":
        raise invalid(f"{where}.model", f"unknown RNG model {model!r} (virtio)")
    period, size = spec.get("period"), spec.get("bytes")
    return RngSpec(
        source=checks.rng_source(spec.get("source", "urandom"), f"{where}.specParams.source"),
        period_ms=(checks.integer(period, f"{where}.specParams.period", minimum=1)
                   if period not in (None, "") else None),
        max_bytes=(checks.integer(size, f"{where}.specParams.bytes", minimum=1)
                   if size not in (None, "") else None),
        device_id=_dev_id(dev, where))


def _balloon(dev: Mapping[str, Any], where: str, ignored: list[str]) -> BalloonSpec | str:
    """The balloon, or "none" when the engine asked for no balloon."""
    model = _spec(dev, where).get("model", "virtio")
    if model == "none":
        return "none"
    if model != "virtio":
        raise invalid(f"{where}.specParams.model", f"unknown balloon model {model!r} "
                                                   f"(virtio or none)")
    return BalloonSpec(device_id=_dev_id(dev, where))


def _watchdog(dev: Mapping[str, Any], where: str, ignored: list[str]) -> WatchdogSpec:
    spec = _spec(dev, where)
    wd = checks.watchdog(spec.get("model"), spec.get("action"), f"{where}.specParams",
                         ignored)
    wd.device_id = _dev_id(dev, where)
    return wd


def _console(dev: Mapping[str, Any], where: str, ignored: list[str]) -> ConsoleSpec:
    target = _spec(dev, where).get("consoleType", "serial")
    if target not in ("serial", "virtio"):
        raise invalid(f"{where}.specParams.consoleType", f"unknown console type {target!r} "
                                                         f"(serial or virtio)")
    return ConsoleSpec(target=ConsoleTarget(target), device_id=_dev_id(dev, where))


_SINGLES: dict[str, Any] = {"rng": _rng, "balloon": _balloon, "watchdog": _watchdog,
                            "console": _console}


def _describe(dev: Mapping[str, Any]) -> str:
    """A short human name for a device left out: "interface hostdev", "graphics vnc
    (runs headless)"."""
    words = [str(dev.get("type", "device")), str(dev.get("device", ""))]
    if dev.get("type") == "interface" and dev.get("network"):
        words.append(str(dev["network"]))
    if dev.get("type") in checks.HEADLESS:
        words.append("(runs headless)")
    return " ".join(w for w in words if w)
