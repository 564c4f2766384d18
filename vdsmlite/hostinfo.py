"""Facts about this host, read from /proc, /sys and /etc (all blocking reads)."""

from __future__ import annotations

import os
import platform
from pathlib import Path

ISCSI_INITIATOR_FILE = Path("/etc/iscsi/initiatorname.iscsi")
FC_HOST_DIR = Path("/sys/class/fc_host")


def iscsi_initiator_name() -> str:
    """The host's iSCSI initiator name (``InitiatorName=`` line), or ""."""
    try:
        for line in ISCSI_INITIATOR_FILE.read_text().splitlines():
            key, _, value = line.partition("=")
            if key.strip() == "InitiatorName":
                return value.strip()
    except OSError:
        pass
    return ""


def fc_hbas() -> list[dict[str, str]]:
    """FC HBA ports as VDSM reports them in HBAInventory["FC"]."""
    out: list[dict[str, str]] = []
    try:
        hosts = sorted(FC_HOST_DIR.iterdir())
    except OSError:
        return out
    for host in hosts:
        def attr(name: str, host: Path = host) -> str:
            try:
                return (host / name).read_text().strip()
            except OSError:
                return ""
        wwpn, wwnn = attr("port_name"), attr("node_name")
        out.append({
            "wwpn": wwpn.removeprefix("0x"),
            "wwnn": wwnn.removeprefix("0x"),
            "model": attr("symbolic_name") or attr("device/model"),
        })
    return out


def meminfo() -> dict[str, int]:
    """/proc/meminfo in KiB."""
    out = {}
    with open("/proc/meminfo") as f:
        for line in f:
            key, _, rest = line.partition(":")
            fields = rest.split()
            if fields:
                out[key] = int(fields[0])
    return out


def os_release() -> dict[str, str]:
    info = {"name": platform.system(), "version": "", "release": ""}
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            key, _, value = line.partition("=")
            value = value.strip().strip('"')
            if key == "NAME":
                info["name"] = value
            elif key == "VERSION_ID":
                info["version"] = value
            elif key == "VERSION_CODENAME":
                info["release"] = value
    except OSError:
        pass
    return info


def kvm_enabled() -> bool:
    return os.path.exists("/dev/kvm")
