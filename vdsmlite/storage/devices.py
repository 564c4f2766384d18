"""The host's LUNs, discovered through udev (pyudev) and sysfs.

A LUN is either a device-mapper multipath map (``dm/uuid`` = ``mpath-<WWID>``,
reported by its WWID with its slave paths) or a plain SCSI disk that carries
an identity (``ID_SERIAL``, ``ID_BUS=scsi``) and is not a path of a map.
Partitions, loop devices without an identity, LVM/dm devices that are not
multipath maps, and the disks this host boots from are not LUNs.

How a path is reached comes from udev's ``ID_PATH`` (path_id):
``ip-<portal>:<port>-iscsi-<iqn>-lun-<n>`` for iSCSI and
``...-fc-<wwpn>-lun-<n>`` for FC, enriched from the iSCSI session in sysfs
when there is one (tpgt, initiator, iface).

Discovery is one enumeration of the udev database plus sysfs reads: no
subprocess per device. Whether a LUN is free is decided from one `pvs` call for
all LUNs and in-process libblkid probes run in parallel.
"""

from __future__ import annotations

import enum
import logging
import os
import re
import stat
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pyudev

from vdsmlite.storage import blkid, directio, lvm, mountinfo

log = logging.getLogger("vdsmlite.storage.devices")



class DevType(enum.StrEnum):
    """How a LUN is reached, as VDSM's getDeviceList ``devtype`` says it."""

    ISCSI = "iSCSI"
    FCP = "FCP"  # VDSM's word for every path that is not an iSCSI session
    MIXED = "MIXED"


SYS_BLOCK = Path("/sys/class/block")
ISCSI_SESSIONS = Path("/sys/class/iscsi_session")
ISCSI_CONNECTIONS = Path("/sys/class/iscsi_connection")

# GUIDs become device-mapper names, LVM filter entries and qemu arguments:
# anything outside this alphabet is not offered.
GUID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$")

_ISCSI_PATH_RE = re.compile(
    r"-?ip-(?P<addr>\[[0-9A-Fa-f:.]+\]|[^:\[\]]+):(?P<port>\d+)-iscsi-(?P<iqn>.+)-lun-(?P<lun>\d+)$")
_FC_PATH_RE = re.compile(r"-fc-(?P<wwpn>0x[0-9A-Fa-f]+)-lun-(?P<lun>\d+)$")
_SESSION_RE = re.compile(r"/(session\d+)/")


@dataclass(frozen=True)
class IscsiTarget:
    address: str
    port: int
    iqn: str
    tpgt: int = 1
    iface: str = "default"
    initiator: str = ""


@dataclass(frozen=True)
class DevicePath:
    """One physical path to a LUN (a SCSI disk, or the loop device itself)."""

    name: str
    transport: DevType
    lun: int
    state: str
    iscsi: IscsiTarget | None = None
    wwpn: str | None = None


@dataclass
class Lun:
    guid: str
    name: str
    node: str
    capacity: int
    vendor: str
    product: str
    serial: str
    fwrev: str
    logical_block_size: int
    physical_block_size: int
    discard_max_bytes: int
    discard_zeroes_data: int
    multipath: bool
    paths: list[DevicePath] = field(default_factory=list)
    holders: list[str] = field(default_factory=list)

    @property
    def devtype(self) -> DevType:
        kinds = {p.transport for p in self.paths}
        if len(kinds) > 1:
            return DevType.MIXED
        return kinds.pop() if kinds else DevType.FCP


@dataclass(frozen=True)
class Status:
    state: str  # free / used / unknown
    pv: lvm.PV | None = None


def _sysattr(dev: pyudev.Device, name: str, default: str = "") -> str:
    try:
        value = dev.attributes.get(name)
    except (OSError, UnicodeDecodeError):
        return default
    if value is None:
        return default
    return value.decode(errors="replace").strip()


def _int_attr(dev: pyudev.Device, name: str, default: int = 0) -> int:
    try:
        return int(_sysattr(dev, name, str(default)) or default)
    except ValueError:
        return default


def _prop(dev: pyudev.Device, name: str) -> str:
    try:
        return dev.properties.get(name, "") or ""
    except (OSError, UnicodeDecodeError):
        return ""


# --- system disks --------------------------------------------------------------


def _disk_names_under(devnum: tuple[int, int]) -> set[str]:
    """Kernel names of the whole disks a device sits on (through partitions and dm)."""
    out: set[str] = set()
    try:
        real = Path(os.path.realpath(f"/sys/dev/block/{devnum[0]}:{devnum[1]}"))
    except OSError:
        return out
    pending = [real]
    seen: set[Path] = set()
    while pending:
        node = pending.pop()
        if node in seen or not node.exists():
            continue
        seen.add(node)
        if (node / "partition").exists():
            pending.append(node.parent)
            continue
        out.add(node.name)
        slaves = node / "slaves"
        if slaves.is_dir():
            pending.extend(Path(os.path.realpath(s)) for s in slaves.iterdir())
    return out


def system_disks() -> set[str]:
    """Disks the host itself runs from: /, /boot, /boot/efi, /var, /usr and swap."""
    devnums = set()
    for m in mountinfo.read():
        if m.mountpoint in ("/", "/boot", "/boot/efi", "/usr", "/var") and m.devnum[0] != 0:
            devnums.add(m.devnum)
    try:
        with open("/proc/swaps") as f:
            next(f, None)
            for line in f:
                path = line.split()[0]
                try:
                    st = os.stat(path)
                except OSError:
                    continue
                if os.path.isabs(path) and _is_block(st.st_mode):
                    devnums.add((os.major(st.st_rdev), os.minor(st.st_rdev)))
    except OSError:
        pass
    names: set[str] = set()
    for devnum in devnums:
        names |= _disk_names_under(devnum)
    return names


def _is_block(mode: int) -> bool:
    return stat.S_ISBLK(mode)


# --- paths -----------------------------------------------------------------------


def _iscsi_from_sysfs(dev: pyudev.Device) -> IscsiTarget | None:
    m = _SESSION_RE.search(dev.sys_path)
    if not m:
        return None
    session = ISCSI_SESSIONS / m.group(1)

    def read(p: Path) -> str:
        try:
            return p.read_text().strip()
        except OSError:
            return ""

    conns = sorted(ISCSI_CONNECTIONS.glob(f"connection{m.group(1)[7:]}:*"))
    address = read(conns[0] / "persistent_address") if conns else ""
    port = read(conns[0] / "persistent_port") if conns else ""
    iqn = read(session / "targetname")
    if not (address and iqn):
        return None
    return IscsiTarget(
        address=address, port=int(port or 3260), iqn=iqn,
        tpgt=int(read(session / "tpgt") or 1),
        iface=read(session / "ifacename") or "default",
        initiator=read(session / "initiatorname"))


def parse_id_path(id_path: str) -> tuple[DevType, int, IscsiTarget | None, str | None]:
    """(transport, lun, iscsi target, fc wwpn) from udev's ID_PATH."""
    m = _ISCSI_PATH_RE.search(id_path)
    if m:
        target = IscsiTarget(address=m.group("addr").strip("[]"), port=int(m.group("port")),
                             iqn=m.group("iqn"))
        return DevType.ISCSI, int(m.group("lun")), target, None
    m = _FC_PATH_RE.search(id_path)
    if m:
        return DevType.FCP, int(m.group("lun")), None, m.group("wwpn").lower()
    # VDSM reports every path that is not an iSCSI session as FCP.
    return DevType.FCP, 0, None, None


def _path_state(dev: pyudev.Device) -> str:
    state = _sysattr(dev, "device/state")
    if state:
        return "active" if state == "running" else "failed"
    # Devices without a SCSI state (loop LUNs): alive while they have a size.
    return "active" if _int_attr(dev, "size") > 0 else "failed"


def _device_path(dev: pyudev.Device, initiator: str) -> DevicePath:
    transport, lun, target, wwpn = parse_id_path(_prop(dev, "ID_PATH"))
    sysfs_target = _iscsi_from_sysfs(dev)
    if sysfs_target is not None:
        transport, target = DevType.ISCSI, sysfs_target
    elif target is not None and initiator:
        target = IscsiTarget(target.address, target.port, target.iqn, target.tpgt,
                             target.iface, initiator)
    return DevicePath(name=dev.sys_name, transport=transport, lun=lun,
                      state=_path_state(dev), iscsi=target, wwpn=wwpn)


# --- discovery ------------------------------------------------------------------


def _is_scsi_lun(dev: pyudev.Device) -> bool:
    return bool(_prop(dev, "ID_SERIAL")) and (
        _prop(dev, "ID_BUS") == "scsi" or bool(_prop(dev, "ID_SCSI")))


def _holders(dev: pyudev.Device) -> list[str]:
    try:
        return sorted(os.listdir(os.path.join(dev.sys_path, "holders")))
    except OSError:
        return []


def _make_lun(guid: str, top: pyudev.Device, node: str, paths: list[pyudev.Device], *,
              multipath: bool, initiator: str) -> Lun:
    ident = paths[0] if paths else top
    return Lun(
        guid=guid,
        name=top.sys_name,
        node=node,
        capacity=_int_attr(top, "size") * 512,  # sysfs counts 512-byte sectors always
        vendor=_prop(ident, "ID_VENDOR") or _sysattr(ident, "device/vendor"),
        product=_prop(ident, "ID_MODEL") or _sysattr(ident, "device/model"),
        serial=_prop(ident, "ID_SCSI_SERIAL") or _prop(ident, "ID_SERIAL_SHORT"),
        fwrev=_prop(ident, "ID_REVISION") or _sysattr(ident, "device/rev"),
        logical_block_size=_int_attr(top, "queue/logical_block_size", 512),
        physical_block_size=_int_attr(top, "queue/physical_block_size", 512),
        discard_max_bytes=_int_attr(top, "queue/discard_max_bytes"),
        discard_zeroes_data=_int_attr(top, "queue/discard_zeroes_data"),
        multipath=multipath,
        paths=[_device_path(p, initiator) for p in paths],
        holders=_holders(top),
    )


def discover(context: pyudev.Context | None = None, initiator: str = "") -> list[Lun]:
    """Every LUN visible on this host (blocking: udev database and sysfs reads)."""
    context = context or pyudev.Context()
    excluded = system_disks()
    disks = [d for d in context.list_devices(subsystem="block")
             if d.device_type == "disk" and d.sys_name not in excluded]
    by_name = {d.sys_name: d for d in disks}
    luns: list[Lun] = []
    claimed: set[str] = set()

    for dev in disks:
        dm_uuid = _sysattr(dev, "dm/uuid")
        if not dm_uuid.startswith("mpath-"):
            continue
        guid = dm_uuid[len("mpath-"):]
        if not GUID_RE.match(guid):
            log.warning("skipping multipath map %s: unusable WWID %r", dev.sys_name, guid)
            continue
        try:
            slave_names = sorted(os.listdir(os.path.join(dev.sys_path, "slaves")))
        except OSError:
            slave_names = []
        slaves = [by_name[s] for s in slave_names if s in by_name]
        claimed.update(slave_names)
        luns.append(_make_lun(guid, dev, f"/dev/mapper/{guid}", slaves, multipath=True,
                              initiator=initiator))

    for dev in disks:
        if dev.sys_name in claimed or dev.sys_name.startswith("dm-") or not _is_scsi_lun(dev):
            continue
        guid = _prop(dev, "ID_SERIAL")
        if not GUID_RE.match(guid):
            log.warning("skipping %s: unusable ID_SERIAL %r", dev.sys_name, guid)
            continue
        node = dev.device_node or f"/dev/{dev.sys_name}"
        luns.append(_make_lun(guid, dev, node, [dev], multipath=False, initiator=initiator))

    luns.sort(key=lambda lun: lun.guid)
    return luns


def find(guid: str, context: pyudev.Context | None = None) -> Lun | None:
    for lun in discover(context):
        if lun.guid == guid:
            return lun
    return None


BY_ID = Path("/dev/disk/by-id")
MAPPER = Path("/dev/mapper")


def resolve(guids: Iterable[str], context: pyudev.Context | None = None) -> dict[str, str]:
    """Device nodes of the LUNs named by `guids` that this host sees (blocking).

    The VM path: a handful of GUIDs, answered without enumerating every block
    device. A multipath map is ``/dev/mapper/<guid>`` (its dm uuid says so); a
    single-path LUN is ``/dev/disk/by-id/scsi-<guid>`` (udev's link; its udev
    ID_SERIAL must be the GUID). Only a GUID whose link is missing costs one
    `discover`. LUNs of the host's own system disks, or with no size (a
    detached device), are not offered, as `discover` would not offer them.
    """
    context = context or pyudev.Context()
    wanted = [g for g in dict.fromkeys(guids) if GUID_RE.match(g)]
    found: dict[str, str] = {}
    excluded = system_disks()
    for guid in wanted:
        node = _resolve_fast(context, guid, excluded)
        if node is not None:
            found[guid] = node
    missing = [g for g in wanted if g not in found]
    if missing:
        by_guid = {lun.guid: lun for lun in discover(context)}
        for guid in missing:
            lun = by_guid.get(guid)
            if lun is not None and present(lun):
                found[guid] = lun.node
    return found


def _resolve_fast(context: pyudev.Context, guid: str, excluded: set[str]) -> str | None:
    for link, ours in ((MAPPER / guid, _is_mpath_of), (BY_ID / f"scsi-{guid}", _is_lun_of)):
        try:
            dev = pyudev.Devices.from_device_file(context, str(link))
        except (OSError, ValueError, pyudev.DeviceNotFoundError):
            continue
        if dev.sys_name in excluded or _int_attr(dev, "size") <= 0 or not ours(dev, guid):
            continue
        return str(link) if link.parent == MAPPER else (dev.device_node or str(link))
    return None


def _is_mpath_of(dev: pyudev.Device, guid: str) -> bool:
    return _sysattr(dev, "dm/uuid") == f"mpath-{guid}"


def _is_lun_of(dev: pyudev.Device, guid: str) -> bool:
    return dev.device_type == "disk" and _is_scsi_lun(dev) and _prop(dev, "ID_SERIAL") == guid


def pv_owners(nodes: Iterable[str]) -> dict[str, str]:
    """Node -> the VG it is a PV of, for the nodes that are PVs of a VG (blocking).

    The PV label is looked for first (one 4 KiB direct read per device: another
    host may have just made it a PV, the page cache must not answer); only a
    device that carries one costs a `pvs` (one for all of them)."""
    members = [node for node in nodes if has_pv_label(node)]
    if not members:
        return {}
    return {node: pv.vg_name for node, pv in _pvs(members).items() if pv.vg_name}


# LVM writes its label in one of the first four 512-byte sectors: "LABELONE" at the
# start of the sector, the label type "LVM2 001" at byte 24 (lib/label/label.h).
_LABEL_ID = b"LABELONE"
_LVM2_LABEL = b"LVM2 001"


def has_pv_label(node: str) -> bool:
    """Whether the device starts with an LVM2 PV label; True if it cannot be read
    (let LVM have the last word rather than take a PV for free)."""
    try:
        head = directio.read(node, 0, 4096, block_size=4096)
    except OSError:
        return True
    return any(head[s:s + 8] == _LABEL_ID and head[s + 24:s + 32] == _LVM2_LABEL
               for s in range(0, 2048, 512))


# --- free or used --------------------------------------------------------------------


def _pvs(nodes: list[str]) -> dict[str, lvm.PV]:
    try:
        return lvm.pvs(nodes)
    except lvm.LVMError as e:
        log.warning("cannot read PVs of %d LUNs: %s", len(nodes), e)
        return {}


def _probe(lun: Lun) -> blkid.Signature | None:
    try:
        return blkid.probe(lun.node)
    except blkid.ProbeError:
        return None


def present(lun: Lun) -> bool:
    """Whether the LUN's device still exists with a size (a detached loop reads as 0)."""
    try:
        return int((SYS_BLOCK / lun.name / "size").read_text()) > 0
    except (OSError, ValueError):
        return False


def statuses(luns: Iterable[Lun], *, check: bool, threads: int = 8) -> dict[str, Status]:
    """Free/used status and PV identity per GUID (blocking).

    PV/VG identity always comes from one `pvs` call confined to these LUNs.
    With `check`, each LUN is also probed for signatures (in parallel threads):
    anything libblkid recognises, a PV, holders (dm/LVM on top) or a mount make
    it ``used``, as VDSM's `pvcreate --test` would refuse it. LUNs that
    disappeared since they were listed are left out.
    """
    luns = [lun for lun in luns if present(lun)]
    nodes = [lun.node for lun in luns]
    if not luns:
        return {}
    with ThreadPoolExecutor(max_workers=max(2, min(threads, len(luns) + 1)),
                            thread_name_prefix="probe") as pool:
        # pvs (a subprocess) and the signature probes are independent: overlap them.
        pvs_future = pool.submit(_pvs, nodes)
        signatures = dict(zip(nodes, pool.map(_probe, luns), strict=True)) if check else {}
        pvs = pvs_future.result()
    if not check:
        return {lun.guid: Status("unknown", pvs.get(lun.node)) for lun in luns}

    mounted = {m.devnum for m in mountinfo.read()}
    out = {}
    for lun in luns:
        pv = pvs.get(lun.node)
        sig = signatures[lun.node]
        if sig is None and not present(lun):
            continue  # vanished while we probed
        if sig is None:
            log.warning("cannot probe %s (%s); reporting it as used", lun.guid, lun.node)
            used = True
        else:
            used = pv is not None or not sig.blank or bool(lun.holders) or \
                _devnum(lun.node) in mounted
        out[lun.guid] = Status("used" if used else "free", pv)
    return out


def _devnum(node: str) -> tuple[int, int] | None:
    try:
        rdev = os.stat(node).st_rdev
    except OSError:
        return None
    return (os.major(rdev), os.minor(rdev))
