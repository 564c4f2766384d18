"""LVM, through one door.

Every LVM command vdsmlite runs is built here, with an explicit ``--config``
that limits LVM to exactly the devices the caller names (a shared SAN must
never be scanned wholesale, and the host's own VGs must never be touched), no
udev synchronisation (udevd may not run) and no metadata backups in /etc.
Reports are read with ``--reportformat json``. Failures become VDSM LVM
errors in the callers.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from vdsmlite.storage import commands

LVM_TIMEOUT = 120.0
# LVM's own regex syntax delimits with '|'; device paths outside this alphabet are refused.
_SAFE_PATH = re.compile(r"^/dev/[A-Za-z0-9/_.:+-]+$")
_ENV = {"LVM_SUPPRESS_FD_WARNINGS": "1"}


class LVMError(Exception):
    def __init__(self, message: str, result: commands.Result | None = None) -> None:
        super().__init__(message)
        self.result = result


def _escape(path: str) -> str:
    if not _SAFE_PATH.match(path):
        raise LVMError(f"refusing unexpected device path {path!r}")
    return re.sub(r"([.+])", r"\\\1", path)


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
    return [name, "--config", config(devices), *args]


def run(name: str, devices: Sequence[str], *args: str, check: bool = True,
        timeout: float = LVM_TIMEOUT) -> commands.Result:
    """Run one LVM command confined to `devices` (blocking)."""
    try:
        return commands.run(command(name, devices, *args), timeout=timeout, env=_ENV,
                            check=check)
    except commands.CommandError as e:
        raise LVMError(str(e), e.result) from None


def _report(out: str, section: str) -> list[dict[str, Any]]:
    try:
        doc = json.loads(out)
    except ValueError as e:
        raise LVMError(f"cannot parse LVM report: {e}") from None
    rows: list[dict[str, Any]] = []
    for report in doc.get("report", []):
        rows.extend(report.get(section, []))
    return rows


@dataclass(frozen=True)
class PV:
    name: str
    uuid: str
    vg_name: str
    vg_uuid: str
    size: int
    pe_start: int


def pvs(devices: Sequence[str]) -> dict[str, PV]:
    """PVs among `devices`, by device path. Devices that are not PVs are absent."""
    if not devices:
        return {}
    # rc != 0 happens when one of many devices cannot be read; the report still
    # lists the others, which is what a listing wants.
    result = run("pvs", devices, "--reportformat", "json", "--units", "b", "--nosuffix",
                 "-o", "pv_name,pv_uuid,vg_name,vg_uuid,pv_size,pe_start", check=False)
    if not result.out.strip():
        if result.rc != 0:
            raise LVMError(f"pvs failed: {result.err.strip()[-300:]}", result)
        return {}
    out = {}
    for row in _report(result.out, "pv"):
        pv = PV(row["pv_name"], row["pv_uuid"], row.get("vg_name", ""), row.get("vg_uuid", ""),
                int(row.get("pv_size") or 0), int(row.get("pe_start") or 0))
        out[pv.name] = pv
    return out
