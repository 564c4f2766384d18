"""A VM as vdsmlite runs it: one definition, whatever form the engine sent.

`VM.create` arrives as libvirt domain XML with oVirt metadata (what engines
written for VDSM 4.x send, `virt.domxml`) or as VDSM's legacy device dicts
(`virt.legacy`). Both become a `VmDefinition`; everything after that (the
qemu command line, hot plug, recovery after an agent restart) reads only
this. It is plain data, serialisable to JSON (`to_dict`/`from_dict`) so the
agent can keep it in its run dir beside the qemu process it describes.

Besides disks it carries the devices qemu runs next to them: NICs (`NicSpec`,
attached to the netdev `[virt] nic_backend` names), a virtio RNG, a balloon, a
watchdog and a console. Fields added after vm.json files were first written
have defaults, so an older vm.json still reads (without those devices).

A disk's source is either a domain volume (pool, domain, image, volume: the
domain layer prepares its chain) or a direct LUN given by its GUID (resolved
through udev to a device node). Paths are filled in when the storage is
prepared (`DiskSpec.path`), never taken from the request.
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass, field
from typing import Any


class DiskBus(enum.StrEnum):
    """Where the disk plugs in: VDSM's ``iface`` / libvirt's ``<target bus=>``."""

    VIRTIO = "virtio"  # virtio-blk-pci, one PCIe slot per disk
    SCSI = "scsi"  # scsi-hd on the VM's virtio-scsi controller
    SATA = "sata"  # ide-hd on the q35 AHCI controller (VDSM's "ide" maps here)


class DiskDevice(enum.StrEnum):
    """libvirt's ``<disk device=>``: a LUN is passed through as SCSI where it can be."""

    DISK = "disk"
    LUN = "lun"
    CDROM = "cdrom"


class DiskFormat(enum.StrEnum):
    RAW = "raw"
    COW = "cow"  # qcow2


class ErrorPolicy(enum.StrEnum):
    """What an I/O error does to the VM: libvirt's ``<driver error_policy=>``.

    VDSM's ``propagateErrors`` says the same in other words: "off" is STOP,
    "on" is ENOSPACE, "report" is REPORT.
    """

    STOP = "stop"  # pause the VM on any error (the engine may extend and resume)
    ENOSPACE = "enospace"  # pause on ENOSPC only, report other errors to the guest
    REPORT = "report"  # report every error to the guest (CD-ROMs)


class Sgio(enum.StrEnum):
    """For a passed-through LUN: whether unprivileged SG_IO commands reach the device."""

    FILTERED = "filtered"
    UNFILTERED = "unfiltered"  # what the engine asks for a "privileged SCSI I/O" LUN


@dataclass(frozen=True)
class VolumeSource:
    """A volume of a storage domain; its chain is prepared through the domain layer."""

    pool_id: str
    domain_id: str
    image_id: str
    volume_id: str


@dataclass(frozen=True)
class LunSource:
    """A direct LUN: any block device this host sees, named by its GUID."""

    guid: str


@dataclass(frozen=True)
class LeaseSpec:
    """An HA VM's lease: sanlock resource `lease_id` in the lockspace of domain `sd_id`,
    a slot of that domain's ``xleases`` volume. The engine usually sends placeholders
    for `path` and `offset` (only the host running the VM knows where the volume is
    mapped); they are resolved from the domain's lease index before the VM starts."""

    sd_id: str
    lease_id: str
    path: str | None = None
    offset: int | None = None


@dataclass
class DiskSpec:
    """One disk as requested; `path` (and `chain`) once its storage is prepared."""

    name: str  # target dev: vda, sdb, ...
    bus: DiskBus
    index: int  # unique per bus
    source: VolumeSource | LunSource
    device: DiskDevice = DiskDevice.DISK
    format: DiskFormat = DiskFormat.RAW
    readonly: bool = False
    shared: bool = False
    serial: str | None = None
    boot_order: int | None = None
    # PCI (virtio) or drive (scsi/sata) address as the engine gave it, kept for the
    # VM's info; qemu assigns its own where it cannot honour it.
    address: dict[str, str] | None = None
    error_policy: ErrorPolicy = ErrorPolicy.STOP
    device_id: str | None = None  # the engine's id of the device (its deviceId/alias)
    # LUN passthrough only (device LUN): SG_IO filtering, and whether qemu should run
    # a managed persistent-reservation helper (libvirt's <reservations managed='yes'>,
    # what the engine sends for a LUN with "SCSI reservation" on).
    sgio: Sgio | None = None
    scsi_reservation: bool = False
    # Filled when prepared: the path qemu opens and, for volumes, the chain base first.
    path: str | None = None
    chain: list[str] = field(default_factory=list)

    @property
    def is_lun(self) -> bool:
        return isinstance(self.source, LunSource)

    @property
    def propagate_errors(self) -> bool:
        """True when I/O errors reach the guest instead of pausing the VM."""
        return self.error_policy is not ErrorPolicy.STOP


class NicModel(enum.StrEnum):
    """The guest-visible NIC model (VDSM's ``nicModel``, libvirt's ``<model type=>``).

    VDSM's "pv" is virtio. Each maps to one qemu device (`vdsmlite.virt.qemu`)."""

    VIRTIO = "virtio"
    E1000 = "e1000"
    E1000E = "e1000e"
    RTL8139 = "rtl8139"


class RngSource(enum.StrEnum):
    """Where the guest's virtio RNG reads from: VDSM's ``specParams.source``."""

    URANDOM = "urandom"  # /dev/urandom
    RANDOM = "random"  # /dev/random
    HWRNG = "hwrng"  # /dev/hwrng, which the host must have


class WatchdogAction(enum.StrEnum):
    """What the guest watchdog does when it fires (libvirt's/VDSM's words)."""

    RESET = "reset"
    NONE = "none"
    PAUSE = "pause"
    POWEROFF = "poweroff"
    SHUTDOWN = "shutdown"
    INJECT_NMI = "inject-nmi"
    # libvirt pauses, dumps the guest's core and resumes; qemu alone has no dump
    # action, so this runs as PAUSE (noted in the VM's ignored devices).
    DUMP = "dump"


class ConsoleTarget(enum.StrEnum):
    """How the guest sees its console: a 16550 serial port or a virtio console."""

    SERIAL = "serial"
    VIRTIO = "virtio"


@dataclass
class NicSpec:
    """One NIC: what the guest sees (model, MAC, link) and the network it is meant for.

    `order` is its position among the VM's NICs; qemu ids derive from it (``net0``),
    so the command line is the same wherever the definition runs (migration)."""

    mac: str  # lower case, six octets, unicast
    model: NicModel
    network: str  # the engine's network name ("ovirtmgmt"); "" if none given
    order: int
    link_up: bool = True
    device_id: str | None = None
    boot_order: int | None = None


@dataclass
class RngSpec:
    source: RngSource = RngSource.URANDOM
    # Rate limit (virtio-rng-pci max-bytes per period ms), when the engine sets one.
    period_ms: int | None = None
    max_bytes: int | None = None
    device_id: str | None = None


@dataclass
class BalloonSpec:
    """A virtio memory balloon (a request for model "none" is no BalloonSpec at all)."""

    device_id: str | None = None


@dataclass
class WatchdogSpec:
    model: str = "i6300esb"  # the only model run here
    action: WatchdogAction = WatchdogAction.RESET
    device_id: str | None = None


@dataclass
class ConsoleSpec:
    """The guest console, served on ``console.sock`` in the VM's run dir."""

    target: ConsoleTarget = ConsoleTarget.SERIAL
    device_id: str | None = None


@dataclass
class VmDefinition:
    vm_id: str
    name: str
    memory_mib: int
    vcpus: int
    max_vcpus: int | None = None
    # Guest CPU topology; when given, sockets * cores * threads == max_vcpus (or vcpus).
    cpu_sockets: int | None = None
    cpu_cores: int | None = None
    cpu_threads: int | None = None
    cpu_model: str | None = None  # None: qemu's default for the accelerator; "host": passthrough
    # Feature flags on top of the model, qemu's spelling: "+vmx", "-svm".
    cpu_flags: list[str] = field(default_factory=list)
    machine: str | None = None  # None: q35
    uefi: bool = False  # boot OVMF instead of SeaBIOS (libvirt <os firmware='efi'>/<loader>)
    # Legacy whole-VM boot order (libvirt <os><boot dev=>: "hd", "cdrom", "network", "fd");
    # engines since 4.2 send per-disk `DiskSpec.boot_order` instead, never both.
    boot_devices: list[str] = field(default_factory=list)
    launch_paused: bool = False
    disks: list[DiskSpec] = field(default_factory=list)
    nics: list[NicSpec] = field(default_factory=list)
    rng: RngSpec | None = None
    balloon: BalloonSpec | None = None
    watchdog: WatchdogSpec | None = None
    console: ConsoleSpec | None = None
    # Runs only while it holds this lease (qemu owns it; see virt.leaseexec).
    lease: LeaseSpec | None = None
    # What the request carried that this agent does not run (graphics, NICs, ...):
    # accepted, listed in the VM's info so nobody thinks it is there.
    ignored: list[str] = field(default_factory=list)
    # Which form it came in ("xml" or "dict") and, for XML, the document as sent.
    source_form: str = "dict"
    source_xml: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return _encode(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> VmDefinition:
        disks = [_disk_from_dict(d) for d in data.get("disks", [])]
        lease = data.get("lease")
        fields = {f.name for f in dataclasses.fields(cls)}
        # Devices absent from an older vm.json are simply not there.
        devices: dict[str, Any] = {
            "nics": [NicSpec(**{**n, "model": NicModel(n["model"])})
                     for n in data.get("nics") or []],
            "rng": _optional(data.get("rng"), lambda r: RngSpec(
                **{**r, "source": RngSource(r["source"])})),
            "balloon": _optional(data.get("balloon"), lambda b: BalloonSpec(**b)),
            "watchdog": _optional(data.get("watchdog"), lambda w: WatchdogSpec(
                **{**w, "action": WatchdogAction(w["action"])})),
            "console": _optional(data.get("console"), lambda c: ConsoleSpec(
                **{**c, "target": ConsoleTarget(c["target"])})),
        }
        return cls(**{**{k: v for k, v in data.items() if k in fields}, "disks": disks,
                      "lease": LeaseSpec(**lease) if lease else None, **devices})


def _optional(value: Any, make: Any) -> Any:
    return None if value is None else make(value)


def _encode(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _encode(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_encode(v) for v in value]
    if isinstance(value, enum.Enum):
        return value.value
    return value


def _disk_from_dict(d: dict[str, Any]) -> DiskSpec:
    src = d["source"]
    source: VolumeSource | LunSource = (LunSource(**src) if "guid" in src
                                        else VolumeSource(**src))
    sgio = d.get("sgio")
    return DiskSpec(**{**d, "source": source, "bus": DiskBus(d["bus"]),
                       "device": DiskDevice(d["device"]), "format": DiskFormat(d["format"]),
                       "error_policy": ErrorPolicy(d.get("error_policy", ErrorPolicy.STOP)),
                       "sgio": None if sgio is None else Sgio(sgio)})
