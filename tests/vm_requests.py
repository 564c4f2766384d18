"""The VM requests tests send, in both forms an engine sends them: domain XML with
ovirt-vm metadata (VDSM 4.x) and the legacy device dicts; `Disk` describes one drive,
the builders turn a list of them into ``VM.create`` params, a hot plug or a drive dict."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.storage_helpers import BLANK

NS = "http://ovirt.org/vm/1.0"


@dataclass
class Disk:
    name: str  # sda, vda, ...
    bus: str
    guid: str | None = None
    volume: tuple[str, str, str] | None = None  # (domain, image, volume)
    readonly: bool = False
    shared: bool = False
    serial: str | None = None
    boot: int | None = None

    @property
    def index(self) -> int:
        return ord(self.name[-1]) - ord("a")


def xml_params(vm_id: str, disks: list[Disk]) -> dict[str, Any]:
    """What an engine written for VDSM 4.x sends: domain XML with ovirt-vm metadata."""
    devices, meta = [], []
    for d in disks:
        kind = "lun" if d.guid else "disk"
        source = (f"<source dev='/dev/mapper/{d.guid}'/>" if d.guid else
                  "<source dev='/rhev/data-center/mnt/blockSD/x/images/y/z'/>")
        extra = ("<readonly/>" if d.readonly else "") + ("<shareable/>" if d.shared else "")
        extra += f"<serial>{d.serial}</serial>" if d.serial else ""
        extra += f"<boot order='{d.boot}'/>" if d.boot else ""
        devices.append(f"<disk type='block' device='{kind}'>{source}"
                       f"<target dev='{d.name}' bus='{d.bus}'/>"
                       f"<driver name='qemu' type='raw' error_policy='stop'/>{extra}</disk>")
        if d.guid:
            body = f"<ovirt-vm:GUID>{d.guid}</ovirt-vm:GUID>"
        else:
            assert d.volume is not None
            sd, img, vol = d.volume
            body = (f"<ovirt-vm:poolID>{BLANK}</ovirt-vm:poolID>"
                    f"<ovirt-vm:domainID>{sd}</ovirt-vm:domainID>"
                    f"<ovirt-vm:imageID>{img}</ovirt-vm:imageID>"
                    f"<ovirt-vm:volumeID>{vol}</ovirt-vm:volumeID>")
        meta.append(f"<ovirt-vm:device devtype='disk' name='{d.name}'>{body}"
                    "</ovirt-vm:device>")
    xml = f"""<domain type='kvm' xmlns:ovirt-vm='{NS}'>
  <name>vm-{vm_id[:8]}</name><uuid>{vm_id}</uuid>
  <memory unit='KiB'>131072</memory><currentMemory unit='KiB'>131072</currentMemory>
  <vcpu current='1'>2</vcpu>
  <os><type arch='x86_64' machine='pc-q35-rhel8.6.0'>hvm</type></os>
  <metadata><ovirt-vm:vm><ovirt-vm:launchPaused>true</ovirt-vm:launchPaused>
    {''.join(meta)}</ovirt-vm:vm></metadata>
  <devices>{''.join(devices)}
    <graphics type='vnc' port='-1' autoport='yes'/>
    <interface type='bridge'><mac address='00:1a:4a:16:01:51'/><source bridge='ovirtmgmt'/>
      <model type='virtio'/></interface>
  </devices>
</domain>"""
    return {"vmId": vm_id, "xml": xml}


def drive_dict(d: Disk) -> dict[str, Any]:
    out: dict[str, Any] = {"type": "disk", "device": "lun" if d.guid else "disk",
                           "iface": d.bus, "index": str(d.index), "format": "raw",
                           "readonly": str(d.readonly).lower(),
                           "shared": "shared" if d.shared else "false",
                           "propagateErrors": "off"}
    if d.guid:
        out["GUID"] = d.guid
    else:
        assert d.volume is not None
        sd, img, vol = d.volume
        out.update(poolID=BLANK, domainID=sd, imageID=img, volumeID=vol)
    if d.serial:
        out["serial"] = d.serial
    if d.boot:
        out["bootOrder"] = str(d.boot)
    return out


def dict_params(vm_id: str, disks: list[Disk]) -> dict[str, Any]:
    """The legacy device-dict form (seed 004)."""
    return {"vmId": vm_id, "vmName": f"vm-{vm_id[:8]}", "memSize": "128", "smp": "1",
            "maxVCpus": "2", "emulatedMachine": "pc-q35-rhel8.6.0", "launchPaused": "true",
            "devices": [drive_dict(d) for d in disks] +
                       [{"type": "interface", "device": "bridge", "network": "ovirtmgmt",
                         "nicModel": "pv", "macAddr": "00:1a:4a:16:01:51"}]}


FORMS = {"xml": xml_params, "dict": dict_params}


def hotplug_xml(vm_id: str, d: Disk) -> dict[str, Any]:
    full = xml_params(vm_id, [d])["xml"]
    disk = full[full.index("<disk "):full.index("</disk>") + len("</disk>")]
    meta = full[full.index("<ovirt-vm:device "):full.index("</ovirt-vm:device>") +
                len("</ovirt-vm:device>")]
    return {"vmId": vm_id, "xml": f"<hotplug xmlns:ovirt-vm='{NS}'><devices>{disk}</devices>"
                                  f"<metadata><ovirt-vm:vm>{meta}</ovirt-vm:vm></metadata>"
                                  "</hotplug>"}


# --- VM.migrate as the engine sends it --------------------------------------------------

# The migration policies ovirt-engine ships (its MigrationPolicies config value).
MIGRATION_POLICIES: list[dict[str, Any]] = json.loads(
    (Path(__file__).parent / "data" / "engine-requests" / "migration_policies.json")
    .read_text())["policies"]


def migration_policy(name: str) -> dict[str, Any]:
    return next(p for p in MIGRATION_POLICIES if p["name"] == name)


def engine_schedule(policy: dict[str, Any]) -> dict[str, Any]:
    """A policy's ``convergenceSchedule`` as the engine sends it (its
    ConvergenceSchedule.from and asMap): the convergence items become stalling steps
    with their stalling limit, the last items stalling steps with limit -1, the
    initial items init actions."""
    config = policy["config"]

    def action(item: dict[str, Any]) -> dict[str, Any]:
        return {"name": item["action"], "params": item["params"]}

    return {
        "init": [action(i) for i in config.get("initialItems") or []],
        "stalling": [{"limit": i["stallingLimit"], "action": action(i["convergenceItem"])}
                     for i in config.get("convergenceItems") or []]
        + [{"limit": -1, "action": action(i)} for i in config.get("lastItems") or []],
    }


def engine_migrate_params(vm_id: str, src: str, dst: str, *, dstqemu: str,
                          encrypted: bool, max_bandwidth: int,
                          policy: str = "Minimal downtime") -> dict[str, Any]:
    """VM.migrate's params with every member ovirt-engine's MigrateBrokerVDSCommand
    puts, typed as it types them (some booleans as strings, some not)."""
    chosen = migration_policy(policy)
    return {
        "vmId": vm_id, "src": src, "dst": dst, "method": "online", "tunneled": "false",
        "abortOnError": "true", "dstqemu": dstqemu, "autoConverge": "true",
        "compressed": "false", "encrypted": encrypted, "consoleAddress": dstqemu,
        "maxBandwidth": max_bandwidth, "parallel": 0, "zerocopy": False,
        "convergenceSchedule": engine_schedule(chosen),
        "enableGuestEvents": chosen["enableGuestEvents"], "incomingLimit": 2,
        "outgoingLimit": 2, "cpusets": ["0"], "numaNodesets": ["0"],
    }
