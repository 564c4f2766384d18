"""NICs, RNG, balloon, watchdog and console: read from both request forms, refused
when malformed, and turned into qemu devices (no qemu is started here)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from vdsmlite import errors
from vdsmlite.virt import domxml, legacy, qemu
from vdsmlite.virt.definition import (
    BalloonSpec,
    ConsoleSpec,
    ConsoleTarget,
    NicModel,
    NicSpec,
    RngSource,
    RngSpec,
    VmDefinition,
    WatchdogAction,
    WatchdogSpec,
)

pytestmark = pytest.mark.unit

VM_ID = "7a1c2b3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d"
NIC_ID = "13134458-7b83-408d-a1cf-973d4bc48728"
RUN = Path("/run/vdsmlite/vm/x")


def xml_vm(devices: str) -> VmDefinition:
    return domxml.parse_domain(f"""<domain type='kvm'>
  <name>vm1</name><uuid>{VM_ID}</uuid><memory unit='MiB'>256</memory>
  <devices>{devices}</devices></domain>""", VM_ID)


def dict_vm(*devices: dict[str, Any]) -> VmDefinition:
    return legacy.parse_vm_params({"vmId": VM_ID, "vmName": "vm1", "memSize": "256",
                                   "devices": list(devices)})


NIC_XML = f"""<interface type='bridge'><mac address='00:1A:4A:16:01:00'/>
  <source bridge='ovirtmgmt'/><model type='virtio'/><link state='up'/>
  <alias name='ua-{NIC_ID}'/></interface>
<interface type='network'><mac address='00:1a:4a:16:01:01'/>
  <source network='vdsm-backend'/><model type='e1000'/><link state='down'/>
  <boot order='2'/></interface>"""
OTHER_XML = """<rng model='virtio'><rate period='2000' bytes='1234'/>
  <backend model='random'>/dev/random</backend></rng>
<memballoon model='virtio'><stats period='5'/></memballoon>
<watchdog model='i6300esb' action='poweroff'/>
<console type='pty'><target type='serial' port='0'/></console>
<graphics type='vnc' port='-1'/><video><model type='qxl'/></video>
<sound model='ich6'/>"""

NIC_DICTS = [
    {"type": "interface", "device": "bridge", "nicModel": "pv", "macAddr": "00:1A:4A:16:01:00",
     "network": "ovirtmgmt", "linkActive": "true", "deviceId": NIC_ID,
     "address": {"type": "pci", "slot": "0x03"}},
    {"type": "interface", "device": "bridge", "nicModel": "e1000",
     "macAddr": "00:1a:4a:16:01:01", "network": "backend", "linkActive": False,
     "bootOrder": "2"},
]
OTHER_DICTS = [
    {"type": "rng", "device": "virtio", "model": "virtio",
     "specParams": {"source": "random", "period": "2000", "bytes": "1234"}},
    {"type": "balloon", "device": "memballoon", "specParams": {"model": "virtio"}},
    {"type": "watchdog", "device": "watchdog",
     "specParams": {"model": "i6300esb", "action": "poweroff"}},
    {"type": "console", "device": "console"},
    {"type": "graphics", "device": "vnc"}, {"type": "video", "device": "qxl"},
    {"type": "sound", "device": "ich6"},
]

WANT_NICS = [NicSpec(mac="00:1a:4a:16:01:00", model=NicModel.VIRTIO, network="ovirtmgmt",
                     order=0, link_up=True, device_id=NIC_ID),
             NicSpec(mac="00:1a:4a:16:01:01", model=NicModel.E1000, network="backend",
                     order=1, link_up=False, boot_order=2)]


@pytest.mark.parametrize("form", ["xml", "dict"])
def test_both_forms_read_the_same_devices(form: str) -> None:
    vm = (xml_vm(NIC_XML + OTHER_XML) if form == "xml"
          else dict_vm(*NIC_DICTS, *OTHER_DICTS))
    assert vm.nics == WANT_NICS
    assert vm.rng == RngSpec(source=RngSource.RANDOM, period_ms=2000, max_bytes=1234)
    assert vm.balloon == BalloonSpec()
    assert vm.watchdog == WatchdogSpec(model="i6300esb", action=WatchdogAction.POWEROFF)
    assert vm.console == ConsoleSpec(target=ConsoleTarget.SERIAL)
    assert "graphics vnc (runs headless)" in vm.ignored
    assert "video qxl (runs headless)" in vm.ignored
    assert any(w.startswith("sound") for w in vm.ignored)
    assert not [w for w in vm.ignored if w.split()[0] in
                ("interface", "rng", "memballoon", "balloon", "watchdog", "console")]


def test_defaults_and_no_balloon() -> None:
    vm = dict_vm({"type": "balloon", "device": "memballoon", "specParams": {"model": "none"}},
                 {"type": "watchdog", "device": "watchdog"},
                 {"type": "rng", "device": "virtio"})
    assert vm.balloon is None
    assert vm.watchdog == WatchdogSpec()  # i6300esb, reset: libvirt's defaults
    assert vm.rng == RngSpec(source=RngSource.URANDOM)
    vm = xml_vm("<memballoon model='none'/><watchdog model='i6300esb' action='dump'/>"
                "<interface type='bridge'><mac address='52:54:00:00:00:01'/></interface>")
    assert vm.balloon is None
    assert vm.watchdog is not None and vm.watchdog.action is WatchdogAction.DUMP
    assert "watchdog action dump (runs as pause)" in vm.ignored
    assert vm.nics[0].model is NicModel.RTL8139 and vm.nics[0].network == ""  # libvirt's
    assert "interface hostdev" in xml_vm("<interface type='hostdev'/>").ignored


def nic(**kw: Any) -> dict[str, Any]:
    return {**NIC_DICTS[0], **kw}


@pytest.mark.parametrize(("devices", "error", "match"), [
    ([nic(macAddr="00:1a:4a:16:01")], errors.InvalidParameter,
     r"devices\[0\].macAddr: not a MAC"),
    ([nic(macAddr="01:1a:4a:16:01:00")], errors.InvalidParameter,
     r"devices\[0\].macAddr: .*multicast"),
    ([nic(macAddr="")], errors.MissingParameter, r"devices\[0\].macAddr"),
    ([nic(nicModel="ne2k_pci")], errors.InvalidParameter,
     r"devices\[0\].nicModel: unknown NIC model 'ne2k_pci'"),
    ([nic(network="a b")], errors.InvalidParameter, r"devices\[0\].network"),
    ([nic(linkActive="maybe")], errors.InvalidParameter, r"devices\[0\].linkActive"),
    ([nic(), nic(deviceId=None)], errors.InvalidParameter, "two NICs with MAC"),
    ([{"type": "rng", "specParams": {"source": "egd"}}], errors.InvalidParameter,
     r"devices\[0\].specParams.source: unknown RNG source 'egd'"),
    ([{"type": "rng", "specParams": {"bytes": "-1"}}], errors.InvalidParameter,
     r"devices\[0\].specParams.bytes"),
    ([{"type": "balloon", "specParams": {"model": "xen"}}], errors.InvalidParameter,
     r"devices\[0\].specParams.model: unknown balloon model"),
    ([{"type": "watchdog", "specParams": {"model": "ib700"}}], errors.InvalidParameter,
     r"devices\[0\].specParams model: unknown watchdog model 'ib700'"),
    ([{"type": "watchdog", "specParams": {"action": "explode"}}], errors.InvalidParameter,
     r"devices\[0\].specParams action: unknown watchdog action 'explode'"),
    ([{"type": "console", "specParams": {"consoleType": "tty"}}], errors.InvalidParameter,
     r"devices\[0\].specParams.consoleType"),
    ([{"type": "rng"}, {"type": "rng"}], errors.InvalidParameter,
     r"devices\[1\]: a second rng"),
])
def test_legacy_refusals(devices: list[dict[str, Any]], error: type[errors.VdsmError],
                         match: str) -> None:
    with pytest.raises(error, match=match):
        dict_vm(*devices)


@pytest.mark.parametrize(("devices", "error", "match"), [
    ("<interface type='bridge'><mac address='zz:1a:4a:16:01:00'/></interface>",
     errors.InvalidParameter, "interface 0 <mac address>: not a MAC"),
    ("<interface type='bridge'/>", errors.MissingParameter, "interface 0 <mac address>"),
    ("<interface type='bridge'><mac address='00:1a:4a:16:01:00'/><model type='pcnet'/>"
     "</interface>", errors.InvalidParameter, "interface 0 <model type>: unknown NIC model"),
    ("<interface type='bridge'><mac address='00:1a:4a:16:01:00'/><link state='sideways'/>"
     "</interface>", errors.InvalidParameter, "<link state>"),
    ("<rng model='virtio'><backend model='random'>/dev/zero</backend></rng>",
     errors.InvalidParameter, "<rng> <backend>: unknown RNG source '/dev/zero'"),
    ("<rng model='virtio'><backend model='egd' type='tcp'/></rng>", errors.CannotCreateVM,
     "RNG backend 'egd'"),
    ("<memballoon model='xen'/>", errors.InvalidParameter, "<memballoon model>"),
    ("<watchdog model='diag288' action='reset'/>", errors.InvalidParameter,
     "<watchdog> model: unknown watchdog model 'diag288'"),
    ("<watchdog model='i6300esb' action='explode'/>", errors.InvalidParameter,
     "<watchdog> action"),
    ("<console type='pty'><target type='sclp'/></console>", errors.InvalidParameter,
     "<console> <target type>"),
])
def test_xml_refusals(devices: str, error: type[errors.VdsmError], match: str) -> None:
    with pytest.raises(error, match=match):
        xml_vm(devices)


def test_old_vm_json_without_devices_still_reads() -> None:
    vm = dict_vm(*NIC_DICTS, *OTHER_DICTS)
    data = json.loads(json.dumps(vm.to_dict()))
    assert VmDefinition.from_dict(data) == vm
    for key in ("nics", "rng", "balloon", "watchdog", "console"):
        data.pop(key)
    old = VmDefinition.from_dict(data)
    assert old.nics == [] and old.rng is old.balloon is old.watchdog is old.console is None


# --- the command line -------------------------------------------------------------------


def devices_of(argv: list[str], flag: str = "-device") -> list[dict[str, Any]]:
    return [json.loads(argv[i + 1]) for i, a in enumerate(argv) if a == flag]


def test_command_line_devices() -> None:
    vm = dict_vm(*NIC_DICTS, *OTHER_DICTS)
    argv = qemu.command_line(vm, run_dir=RUN, hotplug_slots=2)
    devs = {d["id"]: d for d in devices_of(argv)}
    # NICs take the first root ports, then the hot plug slots: 2 + 2 ports.
    assert [i for i in devs if i.startswith("rp")] == ["rp1", "rp2", "rp3", "rp4"]
    assert devs["net0"] == {"driver": "virtio-net-pci", "id": "net0", "bus": "rp1",
                            "addr": "0x0", "mac": "00:1a:4a:16:01:00"}
    assert devs["net1"] == {"driver": "e1000", "id": "net1", "bus": "rp2", "addr": "0x0",
                            "mac": "00:1a:4a:16:01:01", "bootindex": 2}
    assert not devices_of(argv, "-netdev")  # default backend: nothing attached
    assert devices_of(argv, "-object") == [{"qom-type": "rng-random", "id": "rng0-backend",
                                            "filename": "/dev/random"}]
    assert devs["rng0"] == {"driver": "virtio-rng-pci", "id": "rng0", "bus": "pcie.0",
                            "rng": "rng0-backend", "max-bytes": 1234, "period": 2000}
    assert devs["balloon0"]["driver"] == "virtio-balloon-pci"
    assert devs["watchdog0"]["driver"] == "i6300esb"
    assert argv[argv.index("-action") + 1] == "watchdog=poweroff"
    assert devs["console0"] == {"driver": "isa-serial", "id": "console0",
                                "chardev": "charconsole0"}
    assert f"path={RUN}/console.sock" in argv[argv.index("-chardev", argv.index(
        "-chardev") + 1) + 1]
    # A pure function of the definition and the config: what migration relies on.
    again = VmDefinition.from_dict(json.loads(json.dumps(vm.to_dict())))
    assert qemu.command_line(again, run_dir=RUN, hotplug_slots=2) == argv


@pytest.mark.parametrize(("backend", "netdevs"), [
    ("user", [{"type": "user", "id": "hostnet0"}, {"type": "user", "id": "hostnet1"}]),
    ("bridge", [{"type": "bridge", "id": "hostnet0", "br": "ovirtmgmt"},
                {"type": "bridge", "id": "hostnet1", "br": "backend"}]),
    ("bridge:br0", [{"type": "bridge", "id": "hostnet0", "br": "br0"},
                    {"type": "bridge", "id": "hostnet1", "br": "br0"}]),
])
def test_nic_backends(backend: str, netdevs: list[dict[str, Any]]) -> None:
    argv = qemu.command_line(dict_vm(*NIC_DICTS), run_dir=RUN, hotplug_slots=0,
                             nic_backend=backend)
    assert devices_of(argv, "-netdev") == netdevs
    nics = [d for d in devices_of(argv) if d["id"].startswith("net")]
    assert [n["netdev"] for n in nics] == ["hostnet0", "hostnet1"]


@pytest.mark.parametrize("backend", ["tap", "bridge:", "bridge:a,b", "bridge:x" * 9, "User"])
def test_bad_nic_backend(backend: str) -> None:
    with pytest.raises(errors.CannotCreateVM, match="nic backend"):
        qemu.command_line(dict_vm(*NIC_DICTS), run_dir=RUN, nic_backend=backend)


def test_root_ports_counted_with_nics_and_disks_after_them() -> None:
    nics = [nic(macAddr=f"00:1a:4a:16:02:{n:02x}", deviceId=None) for n in range(10)]
    vm = dict_vm(*nics)
    qemu.command_line(vm, run_dir=RUN, hotplug_slots=qemu.MAX_ROOT_PORTS - 10)
    with pytest.raises(errors.CannotCreateVM, match="10 NICs, 0 virtio disks and 15 hot "
                                                    "plug slots need 25 root ports"):
        qemu.command_line(vm, run_dir=RUN, hotplug_slots=qemu.MAX_ROOT_PORTS - 9)


def test_console_virtio_and_watchdog_dump_runs_as_pause() -> None:
    vm = xml_vm("<console type='pty'><target type='virtio'/></console>"
                "<watchdog model='i6300esb' action='dump'/>")
    argv = qemu.command_line(vm, run_dir=RUN, hotplug_slots=0)
    devs = {d["id"]: d for d in devices_of(argv)}
    assert devs["virtio-serial0"]["driver"] == "virtio-serial-pci"
    assert devs["console0"] == {"driver": "virtconsole", "id": "console0",
                                "chardev": "charconsole0", "bus": "virtio-serial0.0"}
    assert argv[argv.index("-action") + 1] == "watchdog=pause"


def test_hwrng_refused_when_the_host_has_none(monkeypatch: pytest.MonkeyPatch) -> None:
    vm = dict_vm({"type": "rng", "specParams": {"source": "hwrng"}})
    monkeypatch.setattr(qemu.os.path, "exists", lambda path: path != "/dev/hwrng")
    with pytest.raises(errors.CannotCreateVM, match="no /dev/hwrng"):
        qemu.command_line(vm, run_dir=RUN)
    monkeypatch.setattr(qemu.os.path, "exists", lambda path: True)
    argv = qemu.command_line(vm, run_dir=RUN)
    assert devices_of(argv, "-object")[0]["filename"] == "/dev/hwrng"
