"""The rules both VM request forms share: field syntax, disk naming, limits.

`virt.domxml` (libvirt XML with oVirt metadata) and `virt.legacy` (VDSM's
device dicts) read different spellings of the same VM; this room holds what
must come out the same whichever form came in: how a UUID, a GUID, a name or a
number is checked, how a disk's target name follows from its bus and index
(VDSM's ``drivename``), and the checks run on the finished disks and VM.

Errors: a malformed or contradictory value is `InvalidParameter` (91), an
absent required one `MissingParameter` (11), both naming the field; something
well-formed that this agent cannot run (network disks, payloads, ...) is the
verb's own error, passed in by the caller as ``unsupported`` (9 for VM.create,
45/46 for hot(un)plug).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from vdsmlite.errors import InvalidParameter, MissingParameter, VdsmError
from vdsmlite.ids import parse_uuid
from vdsmlite.storage.devices import GUID_RE
from vdsmlite.virt.definition import (
    DiskBus,
    DiskDevice,
    DiskFormat,
    DiskSpec,
    LeaseSpec,
    LunSource,
    NicModel,
    RngSource,
    VmDefinition,
    VolumeSource,
    WatchdogAction,
    WatchdogSpec,
)

# Upper bounds that no machine type reaches; they are sanity limits on the
# request, not a check against this host (the engine may overcommit).
MAX_MEMORY_MIB = 16 * 1024 * 1024  # 16 TiB
MAX_VCPUS = 4096
MAX_NAME = 255

# The request's bus words. VDSM's "ide" is served by the q35 AHCI controller, so
# it lands on SATA; its names keep the "hd" prefix the engine gave them.
BUSES = {"virtio": DiskBus.VIRTIO, "scsi": DiskBus.SCSI, "sata": DiskBus.SATA,
         "ide": DiskBus.SATA}
# Target name prefix per request bus word (VDSM's drivename table, minus fdc).
PREFIXES = {"virtio": "vd", "scsi": "sd", "sata": "sd", "ide": "hd"}

_DEV_NAME_RE = re.compile(r"^(vd|sd|hd)([a-z]{1,3})$")
# qemu and CPU model/flag/machine names: nothing that could end a qemu option.
_WORD_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
# Disk serials reach the guest and the qemu command line; the engine sends image UUIDs.
_SERIAL_RE = re.compile(r"^[A-Za-z0-9_.:+-]{1,64}$")
_ADDRESS_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,32}$")
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")

_MAC_RE = re.compile(r"^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}$")
# Engine network names (and libvirt's vdsm-<name> bridges): no blanks, commas or slashes.
_NETWORK_RE = re.compile(r"^[A-Za-z0-9_.:+@-]{1,256}$")
# The request's NIC model words; VDSM's "pv" is virtio.
NIC_MODELS = {"pv": NicModel.VIRTIO, "virtio": NicModel.VIRTIO, "e1000": NicModel.E1000,
              "e1000e": NicModel.E1000E, "rtl8139": NicModel.RTL8139}
# The RNG source words, and the device paths libvirt's <backend> names for them.
RNG_SOURCES = {"urandom": RngSource.URANDOM, "random": RngSource.RANDOM,
               "hwrng": RngSource.HWRNG, "/dev/urandom": RngSource.URANDOM,
               "/dev/random": RngSource.RANDOM, "/dev/hwrng": RngSource.HWRNG}
WATCHDOG_MODELS = ("i6300esb",)
MAX_NICS = 16
# Devices for a display: the VM runs with "-display none" and no VGA, so these
# are listed as ignored with a note that the VM runs headless.
HEADLESS = ("graphics", "video")

_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


def invalid(field: str, problem: str) -> InvalidParameter:
    return InvalidParameter(f"{field}: {problem}")


def missing(field: str) -> MissingParameter:
    return MissingParameter(field)


def uuid(value: Any, field: str) -> str:
    if value is None or value == "":
        raise missing(field)
    canonical = parse_uuid(value)
    if canonical is None:
        raise invalid(field, f"not a UUID: {value!r}")
    return canonical


def guid(value: Any, field: str) -> str:
    """A LUN GUID, in the alphabet the device layer offers (it becomes a path)."""
    if value is None or value == "":
        raise missing(field)
    if not isinstance(value, str) or not GUID_RE.match(value):
        raise invalid(field, f"not a LUN GUID: {value!r}")
    return value


def vm_name(value: Any, field: str) -> str:
    if value is None or value == "":
        raise missing(field)
    if (not isinstance(value, str) or len(value) > MAX_NAME or _CONTROL_RE.search(value)
            or value != value.strip()):
        raise invalid(field, f"not a VM name (1-{MAX_NAME} characters, no control "
                             f"characters, no surrounding blanks): {value!r}")
    return value


def word(value: Any, field: str) -> str:
    """A CPU model, CPU flag or machine type name."""
    if not isinstance(value, str) or not _WORD_RE.match(value):
        raise invalid(field, f"not a valid name: {value!r}")
    return value


def serial(value: Any, field: str) -> str:
    if not isinstance(value, str) or not _SERIAL_RE.match(value):
        raise invalid(field, f"not a disk serial (letters, digits, _.:+-, at most 64): "
                             f"{value!r}")
    return value


def boolean(value: Any, field: str) -> bool:
    """Engines send booleans as JSON booleans or as strings ("true", "False")."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        if value.strip().lower() in _TRUE:
            return True
        if value.strip().lower() in _FALSE:
            return False
    raise invalid(field, f"not a boolean: {value!r}")


def integer(value: Any, field: str, *, minimum: int = 0, maximum: int | None = None) -> int:
    """Engines send numbers as JSON numbers or as decimal strings ("4096")."""
    if isinstance(value, bool):  # bool is an int to Python, never to the engine
        raise invalid(field, f"not an integer: {value!r}")
    if isinstance(value, int):
        number = value
    elif isinstance(value, str) and value.strip().isascii() and value.strip().isdigit():
        number = int(value.strip())
    else:
        raise invalid(field, f"not an integer: {value!r}")
    if number < minimum or (maximum is not None and number > maximum):
        bounds = f"at least {minimum}" if maximum is None else f"{minimum}..{maximum}"
        raise invalid(field, f"{number} out of range ({bounds})")
    return number


def address(value: Any, field: str) -> dict[str, str] | None:
    """A device address as the engine gave it: flat words, kept as strings."""
    if value is None or value in ("", {}):
        return None
    if not isinstance(value, dict):
        raise invalid(field, f"not an address mapping: {value!r}")
    out: dict[str, str] = {}
    for key, item in value.items():
        text = str(item) if isinstance(item, int) and not isinstance(item, bool) else item
        if (not isinstance(key, str) or not _ADDRESS_RE.match(key)
                or not isinstance(text, str) or not _ADDRESS_RE.match(text)):
            raise invalid(field, f"not an address entry: {key!r}={item!r}")
        out[key] = text
    return out


def mac(value: Any, field: str) -> str:
    """A NIC's MAC address: six octets, unicast (a multicast source address is
    invalid on Ethernet and qemu refuses it); kept in lower case."""
    if value is None or value == "":
        raise missing(field)
    if not isinstance(value, str) or not _MAC_RE.match(value):
        raise invalid(field, f"not a MAC address (six hex octets, xx:xx:xx:xx:xx:xx): "
                             f"{value!r}")
    if int(value[:2], 16) & 1:
        raise invalid(field, f"{value} is a multicast address; a NIC needs a unicast one")
    return value.lower()


def nic_model(value: Any, field: str) -> NicModel:
    if value is None or value == "":
        raise missing(field)
    if value not in NIC_MODELS:
        raise invalid(field, f"unknown NIC model {value!r} (one of {', '.join(NIC_MODELS)})")
    return NIC_MODELS[value]


def network(value: Any, field: str) -> str:
    """The engine's network name of a NIC ("" when it gave none)."""
    if value is None or value == "":
        return ""
    if not isinstance(value, str) or not _NETWORK_RE.match(value):
        raise invalid(field, f"not a network name: {value!r}")
    return value


def rng_source(value: Any, field: str) -> RngSource:
    if value not in RNG_SOURCES:
        raise invalid(field, f"unknown RNG source {value!r} (urandom, random or hwrng)")
    return RNG_SOURCES[value]


def watchdog(model: Any, action: Any, field: str, ignored: list[str]) -> WatchdogSpec:
    """A watchdog from its model and action words (libvirt's defaults when absent)."""
    model = model or "i6300esb"
    if model not in WATCHDOG_MODELS:
        raise invalid(f"{field} model", f"unknown watchdog model {model!r} "
                                        f"(only {', '.join(WATCHDOG_MODELS)} runs here)")
    action = action or "reset"
    try:
        act = WatchdogAction(action)
    except ValueError:
        raise invalid(f"{field} action", f"unknown watchdog action {action!r} (one of "
                                         f"{', '.join(a.value for a in WatchdogAction)})"
                      ) from None
    if act is WatchdogAction.DUMP:
        ignored.append("watchdog action dump (runs as pause)")
    return WatchdogSpec(model=model, action=act)


def bus(value: Any, field: str) -> DiskBus:
    if value is None or value == "":
        raise missing(field)
    if value not in BUSES:
        raise invalid(field, f"unknown bus {value!r} (one of {', '.join(BUSES)})")
    return BUSES[value]


def disk_name(iface: str, index: int) -> str:
    """VDSM's target name for a bus word and index: ("virtio", 0) -> "vda"."""
    letters = ""
    i = index
    while i >= 0:  # base 26 without a zero digit, as the kernel names sd/vd devices
        letters = chr(ord("a") + i % 26) + letters
        i = i // 26 - 1
    return PREFIXES[iface] + letters


def disk_index(name: Any, field: str) -> int:
    """The index a target name stands for: "sdb" -> 1, "hdc" -> 2, "vdaa" -> 26."""
    match = _DEV_NAME_RE.match(name) if isinstance(name, str) else None
    if match is None:
        raise invalid(field, f"not a disk target name (vd/sd/hd and letters): {name!r}")
    index = 0
    for char in match.group(2):
        index = index * 26 + (ord(char) - ord("a") + 1)
    return index - 1


def cpu_topology(sockets: int | None, cores: int | None, threads: int | None,
                 total: int, field: str) -> None:
    """qemu needs sockets * cores * threads to be the VM's maximum vCPU count."""
    if sockets is None or cores is None or threads is None:
        return
    if sockets * cores * threads != total:
        raise invalid(field, f"{sockets} sockets * {cores} cores * {threads} threads "
                             f"is not the VM's {total} vCPUs")


def check_disk(disk: DiskSpec, field: str, unsupported: type[VdsmError]) -> DiskSpec:
    """What a single disk must be, whichever form described it."""
    if disk.is_lun and disk.format is not DiskFormat.RAW:
        raise invalid(field, "a direct LUN is used raw, not as qcow2 (format cow)")
    if disk.device is DiskDevice.LUN:
        if not disk.is_lun:
            raise invalid(field, "device 'lun' passes a whole LUN through; give its GUID, "
                                 "not a domain volume")
        if disk.bus is not DiskBus.SCSI:
            # virtio-blk SCSI passthrough is gone from qemu; only virtio-scsi can.
            raise unsupported(f"{field}: device 'lun' (SCSI passthrough) needs bus scsi, "
                              f"not {disk.bus}")
    elif disk.sgio is not None or disk.scsi_reservation:
        raise invalid(field, "sgio and SCSI reservations apply only to device 'lun'")
    if disk.device is DiskDevice.CDROM and not isinstance(disk.source, VolumeSource):
        raise invalid(field, "a CD-ROM's image must be a domain volume")
    return disk


def check_disks(disks: Iterable[DiskSpec], field: str) -> list[DiskSpec]:
    """What the VM's disks must be together: distinct names, indexes, boot orders."""
    names: set[str] = set()
    slots: set[tuple[DiskBus, int]] = set()
    boots: set[int] = set()
    out = list(disks)
    for disk in out:
        if disk.name in names:
            raise invalid(field, f"two disks with target name {disk.name}")
        if (disk.bus, disk.index) in slots:
            raise invalid(field, f"two disks with index {disk.index} on bus {disk.bus} "
                                 f"(the second is {disk.name})")
        if disk.boot_order is not None and disk.boot_order in boots:
            raise invalid(field, f"two disks with boot order {disk.boot_order} "
                                 f"(the second is {disk.name})")
        names.add(disk.name)
        slots.add((disk.bus, disk.index))
        if disk.boot_order is not None:
            boots.add(disk.boot_order)
    return out


def check_vm(vm: VmDefinition, field: str) -> VmDefinition:
    """What the VM as a whole must be, whichever form described it."""
    total = vm.max_vcpus if vm.max_vcpus is not None else vm.vcpus
    if vm.max_vcpus is not None and vm.vcpus > vm.max_vcpus:
        raise invalid(field, f"{vm.vcpus} vCPUs is more than the maximum {vm.max_vcpus}")
    cpu_topology(vm.cpu_sockets, vm.cpu_cores, vm.cpu_threads, total, field)
    if vm.boot_devices and any(d.boot_order is not None for d in vm.disks):
        # libvirt refuses the mix too: the two boot orders cannot be merged.
        raise invalid(field, "both a whole-VM boot order (os/boot) and per-disk boot "
                             "orders")
    check_disks(vm.disks, field)
    if len(vm.nics) > MAX_NICS:
        raise invalid(field, f"{len(vm.nics)} NICs; at most {MAX_NICS}")
    macs: set[str] = set()
    boots = {d.boot_order for d in vm.disks if d.boot_order is not None}
    for nic in vm.nics:
        if nic.mac in macs:
            raise invalid(field, f"two NICs with MAC address {nic.mac}")
        macs.add(nic.mac)
        if nic.boot_order is not None:
            if nic.boot_order in boots:
                raise invalid(field, f"two devices with boot order {nic.boot_order} "
                                     f"(the second is NIC {nic.mac})")
            boots.add(nic.boot_order)
    if vm.boot_devices and any(n.boot_order is not None for n in vm.nics):
        raise invalid(field, "both a whole-VM boot order (os/boot) and per-NIC boot "
                             "orders")
    return vm


def source_of(pdiv: dict[str, Any], lun: Any, field: str) -> VolumeSource | LunSource | None:
    """A disk's source from its ids: a domain volume, a LUN GUID, or None for neither.

    ``pdiv`` holds the poolID/domainID/imageID/volumeID that were given (any subset).
    """
    given = {k: v for k, v in pdiv.items() if v not in (None, "")}
    if given and lun not in (None, ""):
        if len(given) == 4:
            raise invalid(field, "both a domain volume (poolID/domainID/imageID/volumeID) "
                                 "and a LUN GUID")
        # A LUN may carry imageID (== its GUID) for the engine's sake; that is all.
        if set(given) - {"imageID"}:
            raise invalid(field, f"a LUN GUID with volume ids {sorted(given)}")
        given = {}
    if given:
        absent = [k for k in ("poolID", "domainID", "imageID", "volumeID") if k not in given]
        if absent:
            raise invalid(field, f"a domain volume needs poolID, domainID, imageID and "
                                 f"volumeID; {', '.join(absent)} missing")
        return VolumeSource(pool_id=uuid(given["poolID"], f"{field}.poolID"),
                            domain_id=uuid(given["domainID"], f"{field}.domainID"),
                            image_id=uuid(given["imageID"], f"{field}.imageID"),
                            volume_id=uuid(given["volumeID"], f"{field}.volumeID"))
    if lun not in (None, ""):
        return LunSource(guid=guid(lun, f"{field}.GUID"))
    return None


# The engine's placeholders for what only the running host knows (VDSM fills them from
# the domain's lease index): LEASE-PATH:<leaseId>:<sdId>, LEASE-OFFSET:<leaseId>:<sdId>.
_PLACEHOLDERS = ("LEASE-PATH:", "LEASE-OFFSET:")


def lease(sd_id: Any, lease_id: Any, path: Any, offset: Any, field: str) -> LeaseSpec:
    """A VM lease; `path`/`offset` absent or placeholders mean "look it up"."""
    sd = uuid(sd_id, f"{field}.sd_id")
    key = uuid(lease_id, f"{field}.lease_id")
    if isinstance(path, str) and path.startswith(_PLACEHOLDERS):
        path = None
    if isinstance(offset, str) and offset.startswith(_PLACEHOLDERS):
        offset = None
    if path in (None, ""):
        if offset not in (None, ""):
            raise invalid(field, "a lease offset without its path")
        return LeaseSpec(sd_id=sd, lease_id=key)
    if offset in (None, ""):
        offset = 0  # libvirt's default: a volume's own .lease file starts with it
    if not isinstance(path, str) or not path.startswith("/") or "\0" in path:
        raise invalid(f"{field}.path", f"not an absolute path: {path!r}")
    return LeaseSpec(sd_id=sd, lease_id=key, path=path,
                     offset=integer(offset, f"{field}.offset"))
