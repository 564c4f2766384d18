"""LVM, through one door.

Every LVM command vdsmlite runs is built here, with an explicit ``--config``
that limits LVM to exactly the devices the caller names (a shared SAN must
never be scanned wholesale, and the host's own VGs must never be touched), no
udev synchronisation (udevd may not run) and no metadata backups in /etc.
Reports are read with ``--reportformat json``. On hosts without
device-mapper (``/dev/mapper/control`` absent) every command also gets
``--driverloaded n`` so LVM edits metadata without trying to (de)activate.

Failures raise `LVMError`; callers map them to VDSM's LVM error codes
(`errors.CannotCreateLogicalVolume`, ...), so one failing command never
surfaces as a bare traceback.
"""

from __future__ import annotations

import functools
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from vdsmlite.storage import commands
from vdsmlite.units import MiB

LVM_TIMEOUT = 120.0
# LVM's own regex syntax delimits with '|'; device paths outside this alphabet are refused.
_SAFE_PATH = re.compile(r"^/dev/[A-Za-z0-9/_.:+-]+$")
_SAFE_NAME = re.compile(r"^[A-Za-z0-9_.+-][A-Za-z0-9_.+-]{0,127}$")
_SAFE_TAG = re.compile(r"^[A-Za-z0-9_+.\-/=!:#&]{1,1024}$")
_ENV = {"LVM_SUPPRESS_FD_WARNINGS": "1"}



class LVMError(Exception):
    def __init__(self, message: str, result: commands.Result | None = None) -> None:
        super().__init__(message)
        self.result = result

    @property
    def stderr(self) -> str:
        return self.result.err if self.result else ""


@functools.cache
def device_mapper_available() -> bool:
    """Whether the kernel's device-mapper answers (the node alone proves nothing:
    package installs create /dev/mapper/control even where the driver is absent)."""
    try:
        fd = os.open("/dev/mapper/control", os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    os.close(fd)
    return True


def _escape(path: str) -> str:
    if not _SAFE_PATH.match(path):
        raise LVMError(f"refusing unexpected device path {path!r}")
    return re.sub(r"([.+])", r"\\\1", path)


def check_name(name: str) -> str:
    if not _SAFE_NAME.match(name) or name in (".", ".."):
        raise LVMError(f"refusing LVM name {name!r}")
    return name


def check_tag(tag: str) -> str:
    if not _SAFE_TAG.match(tag):
        raise LVMError(f"refusing LVM tag {tag!r}")
    return tag


def config(devices: Sequence[str]) -> str:
    """The --config string confining LVM to `devices` (empty: no devices at all)."""
    accept = ", ".join(f'"a|^{_escape(d)}$|"' for d in sorted(set(devices)))
    filt = f"[{accept}, \"r|.*|\"]" if accept else '["r|.*|"]'
    return (
        "devices { "
        f"filter={filt} global_filter={filt} "
        "use_devicesfile=0 write_cache_state=0 obtain_device_list_from_udev=0 "
        'external_device_info_source="none" scan_lvs=0 hints="none" '
        'preferred_names=["^/dev/mapper/"] '
        "} global { use_lvmpolld=0 event_activation=0 } "
        "activation { udev_sync=0 udev_rules=0 monitoring=0 } "
        "backup { backup=0 archive=0 }"
    )


def command(name: str, devices: Sequence[str], *args: str) -> list[str]:
    argv = [name, "--config", config(devices)]
    if not device_mapper_available():
        argv += ["--driverloaded", "n"]
    return [*argv, *args]


def run(name: str, devices: Sequence[str], *args: str, check: bool = True,
        timeout: float = LVM_TIMEOUT) -> commands.Result:
    """Run one LVM command confined to `devices` (blocking)."""
    try:
        return commands.run(command(name, devices, *args), timeout=timeout, env=_ENV,
                            check=check)
    except commands.CommandError as e:
        raise LVMError(str(e), e.result) from e


def _report(out: str, section: str) -> list[dict[str, Any]]:
    try:
        doc = json.loads(out)
    except ValueError as e:
        raise LVMError(f"cannot parse LVM report: {e}") from e
    rows: list[dict[str, Any]] = []
    for report in doc.get("report", []):
        rows.extend(report.get(section, []))
    return rows


def _tags(text: str) -> tuple[str, ...]:
    return tuple(t for t in text.split(",") if t)


# --- PVs -------------------------------------------------------------------------


@dataclass(frozen=True)
class PV:
    name: str
    uuid: str
    vg_name: str
    vg_uuid: str
    size: int
    pe_start: int
    pe_count: int = 0


def pvs(devices: Sequence[str]) -> dict[str, PV]:
    """PVs among `devices`, by device path. Devices that are not PVs are absent."""
    if not devices:
        return {}
    # rc != 0 happens when one of many devices cannot be read; the report still
    # lists the others, which is what a listing wants.
    result = run("pvs", devices, "--reportformat", "json", "--units", "b", "--nosuffix",
                 "-o", "pv_name,pv_uuid,vg_name,vg_uuid,pv_size,pe_start,pv_pe_count",
                 check=False)
    if not result.out.strip():
        if result.rc != 0:
            raise LVMError(f"pvs failed: {result.err.strip()[-300:]}", result)
        return {}
    out = {}
    for row in _report(result.out, "pv"):
        pv = PV(row["pv_name"], row["pv_uuid"], row.get("vg_name", ""), row.get("vg_uuid", ""),
                int(row.get("pv_size") or 0), int(row.get("pe_start") or 0),
                int(row.get("pv_pe_count") or 0))
        out[pv.name] = pv
    return out


def pvcreate(devices: Sequence[str], *, metadata_size: int, force: bool) -> None:
    args = ["--metadatasize", f"{metadata_size // MiB}m", "--metadatacopies", "2",
            "--metadataignore", "y"]
    if force:
        # Wipe signatures without asking: the caller already decided (force=True).
        args += ["-ff", "--yes"]
    run("pvcreate", devices, *args, *devices)


def pvremove(devices: Sequence[str]) -> None:
    run("pvremove", devices, "-ff", "--yes", *devices)


# --- VGs -------------------------------------------------------------------------


@dataclass(frozen=True)
class VG:
    name: str
    uuid: str
    tags: tuple[str, ...]
    size: int
    free: int
    extent_size: int
    extent_count: int
    free_count: int
    mda_size: int
    mda_free: int
    pv_names: tuple[str, ...]


def vgs(devices: Sequence[str], names: Sequence[str] = ()) -> dict[str, VG]:
    """VGs on `devices` (optionally only `names`), by VG name."""
    if not devices:
        return {}
    result = run("vgs", devices, "--reportformat", "json", "--units", "b", "--nosuffix",
                 "-o", "vg_name,vg_uuid,vg_tags,vg_size,vg_free,vg_extent_size,"
                 "vg_extent_count,vg_free_count,vg_mda_size,vg_mda_free,pv_name",
                 *[check_name(n) for n in names], check=False)
    if not result.out.strip():
        if result.rc != 0 and names:
            return {}
        if result.rc != 0:
            raise LVMError(f"vgs failed: {result.err.strip()[-300:]}", result)
        return {}
    rows = _report(result.out, "vg")
    out: dict[str, VG] = {}
    for row in rows:
        name = row["vg_name"]
        pv_names = ((*out[name].pv_names, row["pv_name"]) if name in out
                    else (row["pv_name"],))
        out[name] = VG(
            name=name, uuid=row["vg_uuid"], tags=_tags(row.get("vg_tags", "")),
            size=int(row["vg_size"]), free=int(row["vg_free"]),
            extent_size=int(row["vg_extent_size"]), extent_count=int(row["vg_extent_count"]),
            free_count=int(row["vg_free_count"]), mda_size=int(row["vg_mda_size"] or 0),
            mda_free=int(row["vg_mda_free"] or 0), pv_names=pv_names)
    return out


def vgcreate(name: str, devices: Sequence[str], *, extent_size: int, tags: Sequence[str]) -> None:
    args = ["--physicalextentsize", f"{extent_size // MiB}m"]
    for tag in tags:
        args += ["--addtag", check_tag(tag)]
    run("vgcreate", devices, *args, check_name(name), *devices)


def vgremove(name: str, devices: Sequence[str]) -> None:
    run("vgremove", devices, "-f", check_name(name))


def vg_change_tags(name: str, devices: Sequence[str], *, add: Sequence[str] = (),
                   remove: Sequence[str] = ()) -> None:
    """Replace tags in one LVM transaction: all of them change, or none does."""
    args = []
    for tag in remove:
        args += ["--deltag", check_tag(tag)]
    for tag in add:
        args += ["--addtag", check_tag(tag)]
    if args:
        run("vgchange", devices, *args, check_name(name))


# --- LVs -------------------------------------------------------------------------


@dataclass(frozen=True)
class Segment:
    pv: str
    first_pe: int
    last_pe: int


@dataclass(frozen=True)
class LV:
    vg_name: str
    name: str
    uuid: str
    size: int
    tags: tuple[str, ...]
    attr: str
    segments: tuple[Segment, ...]

    def tag_value(self, prefix: str) -> str | None:
        for tag in self.tags:
            if tag.startswith(prefix):
                return tag[len(prefix):]
        return None


def _segments(ranges: str) -> list[Segment]:
    out = []
    for part in ranges.split():
        pv, _, extents = part.rpartition(":")
        first, _, last = extents.partition("-")
        out.append(Segment(pv, int(first), int(last or first)))
    return out


def lvs(vg_name: str, devices: Sequence[str], names: Sequence[str] = ()) -> dict[str, LV]:
    """LVs of a VG with tags and physical segments, by LV name."""
    targets = [f"{check_name(vg_name)}/{check_name(n)}" for n in names] or [check_name(vg_name)]
    result = run("lvs", devices, "--reportformat", "json", "--units", "b", "--nosuffix",
                 "-o", "vg_name,lv_name,lv_uuid,lv_size,lv_tags,lv_attr,seg_pe_ranges",
                 *targets, check=False)
    if not result.out.strip():
        if result.rc != 0 and not names:
            raise LVMError(f"lvs failed: {result.err.strip()[-300:]}", result)
        return {}
    out: dict[str, LV] = {}
    for row in _report(result.out, "lv"):
        name = row["lv_name"]
        segs = _segments(row.get("seg_pe_ranges", ""))
        if name in out:  # one row per segment
            prev = out[name]
            out[name] = LV(prev.vg_name, name, prev.uuid, prev.size, prev.tags, prev.attr,
                           (*prev.segments, *segs))
        else:
            out[name] = LV(row["vg_name"], name, row["lv_uuid"], int(row["lv_size"]),
                           _tags(row.get("lv_tags", "")), row.get("lv_attr", ""), tuple(segs))
    return out


def lvcreate(vg_name: str, name: str, size: int, devices: Sequence[str], *,
             tags: Sequence[str] = (), on_pv: str | None = None) -> None:
    """Create an inactive, unzeroed LV of `size` bytes (rounded up to MiB by us)."""
    size_mb = -(-size // MiB)
    args = ["--autobackup", "n", "--activate", "n", "--zero", "n", "--wipesignatures", "n",
            "--size", f"{size_mb}m", "--name", check_name(name)]
    for tag in tags:
        args += ["--addtag", check_tag(tag)]
    args.append(check_name(vg_name))
    if on_pv is not None:
        args.append(on_pv)
    run("lvcreate", devices, *args)


def lvremove(vg_name: str, names: Sequence[str], devices: Sequence[str]) -> None:
    run("lvremove", devices, "-f", "--autobackup", "n",
        *[f"{check_name(vg_name)}/{check_name(n)}" for n in names])


def lvextend(vg_name: str, name: str, size: int, devices: Sequence[str]) -> None:
    size_mb = -(-size // MiB)
    run("lvextend", devices, "--autobackup", "n", "--size", f"{size_mb}m",
        f"{check_name(vg_name)}/{check_name(name)}")


def lv_change_tags(vg_name: str, name: str, devices: Sequence[str], *,
                   add: Sequence[str] = (), remove: Sequence[str] = ()) -> None:
    args = []
    for tag in remove:
        args += ["--deltag", check_tag(tag)]
    for tag in add:
        args += ["--addtag", check_tag(tag)]
    if args:
        run("lvchange", devices, "--autobackup", "n", *args,
            f"{check_name(vg_name)}/{check_name(name)}")


def lv_activate(vg_name: str, name: str, devices: Sequence[str], active: bool) -> None:
    run("lvchange", devices, "--activate", "y" if active else "n",
        f"{check_name(vg_name)}/{check_name(name)}")
