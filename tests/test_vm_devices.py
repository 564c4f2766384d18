"""A VM's NICs, RNG, balloon and watchdog on real qemu, seen through QMP.

The VM has no disk at all (none is needed to run qemu paused), so the module
needs only an agent: no sanlock, no storage domain, no LUN. It is launched
paused and inspected through its second QMP monitor (``[virt] debug_monitor``).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from fake_storage.agent import Agent
from fake_storage.children import kill_vms_left_in
from tests.storage_helpers import new_id
from tests.vm_helpers import debug_qmp, wait_status
from vdsmlite.client import Client

pytestmark = pytest.mark.root

MACS = ("00:1a:4a:16:01:10", "00:1a:4a:16:01:11")


@dataclass
class DevEnv:
    agent: Agent
    vm_run_dir: Path

    @property
    def client(self) -> Client:
        return self.agent.client()


@pytest.fixture(scope="module")
def devenv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevEnv]:
    base = tmp_path_factory.mktemp("vmdev")
    # Short: a QMP socket path must fit in 107 bytes.
    vm_run_dir = Path(tempfile.mkdtemp(prefix="vl-", dir="/tmp"))
    agent = Agent(base / "agent", config={"virt": {"run_dir": str(vm_run_dir),
                                                   "debug_monitor": True}})
    try:
        agent.start()
        yield DevEnv(agent, vm_run_dir)
    finally:
        if agent.proc is not None and agent.proc.poll() is None:
            with agent.client() as c:
                for vm in c.call("Host.getVMList", {"onlyUUID": True}):
                    c.call("VM.destroy", {"vmID": vm})
        agent.stop()
        kill_vms_left_in(vm_run_dir)
        shutil.rmtree(vm_run_dir, ignore_errors=True)


def params(vm_id: str) -> dict[str, Any]:
    """Legacy dicts as the OVF converter emits them."""
    return {"vmId": vm_id, "vmName": f"dev-{vm_id[:8]}", "memSize": "128", "smp": "1",
            "launchPaused": "true", "devices": [
                {"type": "interface", "device": "bridge", "nicModel": "pv",
                 "macAddr": MACS[0], "network": "ovirtmgmt", "linkActive": "true"},
                {"type": "interface", "device": "bridge", "nicModel": "e1000",
                 "macAddr": MACS[1], "network": "backend", "linkActive": "false"},
                {"type": "rng", "device": "virtio", "model": "virtio",
                 "specParams": {"source": "urandom"}},
                {"type": "balloon", "device": "memballoon", "specParams": {"model": "virtio"}},
                {"type": "watchdog", "device": "watchdog",
                 "specParams": {"model": "i6300esb", "action": "pause"}},
                {"type": "graphics", "device": "vnc"}]}



def qmp(env: DevEnv, vm_id: str, command: str, args: dict[str, Any] | None = None) -> Any:
    return debug_qmp(env.vm_run_dir / vm_id, command, args)


def qom_type(env: DevEnv, vm_id: str, qdev: str) -> str:
    return str(qmp(env, vm_id, "qom-get", {"path": f"/machine/peripheral/{qdev}",
                                           "property": "type"}))


def test_nics_rng_balloon_watchdog_in_qemu_and_an_old_vm_json(devenv: DevEnv) -> None:
    vm_id = new_id()
    with devenv.client as c:
        c.call("VM.create", {"vmID": vm_id, "vmParams": params(vm_id)})
        stats = wait_status(c, vm_id, "Paused")
        info = c.call("VM.getInfo", {"vmID": vm_id})
    nics = [d for d in info["devices"] if d["type"] == "interface"]
    assert [(n["name"], n["macAddr"], n["nicModel"], n["network"], n["linkActive"])
            for n in nics] == [("net0", MACS[0], "virtio", "ovirtmgmt", "true"),
                               ("net1", MACS[1], "e1000", "backend", "false")]
    assert {d["type"] for d in info["devices"]} == {"interface", "rng", "balloon",
                                                    "watchdog"}
    assert "graphics vnc (runs headless)" in info["ignoredDevices"]
    assert stats["network"]["net1"]["state"] == "down"

    # What qemu runs: the devices, on the ports and with the MACs asked for.
    peripherals = {p["name"]: p["type"] for p in
                   qmp(devenv, vm_id, "qom-list", {"path": "/machine/peripheral"})}
    assert {k: v for k, v in peripherals.items()
            if v.startswith("child<") and not k.startswith("rp")} == {
        "net0": "child<virtio-net-pci>", "net1": "child<e1000>",
        "rng0": "child<virtio-rng-pci>", "balloon0": "child<virtio-balloon-pci>",
        "watchdog0": "child<i6300esb>", "scsi0": "child<virtio-scsi-pci>"}
    for n, qdev in enumerate(("net0", "net1")):
        assert qmp(devenv, vm_id, "qom-get", {"path": f"/machine/peripheral/{qdev}",
                                              "property": "mac"}) == MACS[n]
        port = f"rp{n + 1}"  # NICs take the first root ports
        children = qmp(devenv, vm_id, "qom-list", {"path": f"/machine/peripheral/{port}/{port}"})
        assert any(p["name"].startswith("child[") for p in children)
    [rx] = qmp(devenv, vm_id, "query-rx-filter")  # virtio-net only
    assert (rx["name"], rx["main-mac"]) == ("net0", MACS[0])
    assert qmp(devenv, vm_id, "query-balloon")["actual"] == 128 * 1024 * 1024
    assert qom_type(devenv, vm_id, "rng0") == "virtio-rng-pci"
    pci = [dev for bus in qmp(devenv, vm_id, "query-pci") for dev in bus["devices"]]
    assert {d.get("qdev_id") for d in pci} >= {"rng0", "balloon0", "watchdog0"}
    # The watchdog's action, and the second NIC's link set down before the guest ran.
    assert "watchdog=pause" in " ".join(
        Path(f"/proc/{stats['pid']}/cmdline").read_bytes().decode().split("\0"))
    assert qmp(devenv, vm_id, "qom-get", {"path": "/machine/peripheral/rng0",
                                          "property": "rng"}) == "/objects/rng0-backend"
    # Hot plug slots are still free after the NICs' ports.
    ports = sorted(k for k, v in peripherals.items() if v == "child<pcie-root-port>")
    assert len(ports) == 2 + 8

    # An old agent's vm.json (no device fields) is still read after a restart: the
    # running VM is recovered, with only what that file described.
    devenv.agent.stop()
    saved_path = devenv.vm_run_dir / vm_id / "vm.json"
    saved = json.loads(saved_path.read_text())
    for key in ("nics", "rng", "balloon", "watchdog", "console"):
        saved["definition"].pop(key)
    saved_path.write_text(json.dumps(saved))
    devenv.agent.start()
    with devenv.client as c:
        again = wait_status(c, vm_id, "Paused")
        assert again["pid"] == stats["pid"]
        info = c.call("VM.getInfo", {"vmID": vm_id})
        assert not [d for d in info["devices"] if d["type"] == "interface"]
        c.call("VM.destroy", {"vmID": vm_id})
    assert not (devenv.vm_run_dir / vm_id).exists()
