"""VMs on real qemu through the agent: direct LUNs and domain volumes, hot plug,
refusals that leave nothing behind, and VMs that outlive the agent.

One simulated host (its own sanlock daemon), a block domain with one volume,
and spare loop LUNs, built once for the module. Every VM is launched paused
(no guest OS; it saves the CPU) and inspected through its second QMP monitor
(``[virt] debug_monitor``), independent of the agent's own QMP connection.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import signal
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.helpers import code_of, run
from tests.storage_helpers import (
    BLANK,
    MiB,
    make_block_domain,
    new_id,
    read_direct,
)
from tests.vm_helpers import VmEnv, listening_ports, qmp, vm_host, wait_status
from tests.vm_requests import FORMS, Disk, dict_params, drive_dict, hotplug_xml, xml_params
from vdsmlite.client import ServerError

pytestmark = pytest.mark.root

DESTINATION_TIMEOUT = 5.0  # [virt] migration_destination_timeout of the module's host


@pytest.fixture(scope="module")
def vmenv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VmEnv]:
    # No migration here: incoming ones are given up after a few seconds (the test).
    with vm_host(tmp_path_factory.mktemp("vm"), "vmhost", unplug_timeout=1.0,
                 migration_destination_timeout=DESTINATION_TIMEOUT,
                 # Incoming migrations on every address (the default is the one the
                 # source names, or the agent's own).
                 migration_listen="0.0.0.0") as (
            host, farm, vm_run_dir):
        dom = make_block_domain(host.agent, farm)
        img, vol = dom.create_volume(size=512 * MiB)
        luns = farm.create(4, "256M")
        yield VmEnv(host, dom, img, vol, luns, vm_run_dir)


@pytest.fixture
def vms(vmenv: VmEnv) -> Iterator[list[str]]:
    """VM ids a test creates; destroyed after it, whatever happened."""
    created: list[str] = []
    yield created
    with vmenv.client as c:
        listed = set(c.call("Host.getVMList", {"onlyUUID": True}))
        for vm_id in created:
            if vm_id in listed:
                try:
                    c.call("VM.destroy", {"vmID": vm_id})
                except ServerError as e:
                    if e.code != 1:  # a destroy the test sent may just have finished
                        raise


def lv_link(env: VmEnv, vol: str) -> Path:
    return env.host.agent.run_dir / "lv" / env.dom.sd / vol


def assert_nothing_left(env: VmEnv, vm_id: str) -> None:
    """No VM listed, no VM dir (so no qemu), the block volume not prepared."""
    with env.client as c:
        assert vm_id not in c.call("Host.getVMList", {"onlyUUID": True})
    assert not env.vm_dir(vm_id).exists()
    assert not lv_link(env, env.vol).exists()


# --- create -------------------------------------------------------------------------


@pytest.mark.parametrize("form", ["xml", "dict"])
def test_create_with_guid_disks_and_a_block_volume(vmenv: VmEnv, vms: list[str],
                                                   form: str) -> None:
    ro_lun, shared_lun = vmenv.luns[0], vmenv.luns[1]
    disks = [Disk("sda", "scsi", guid=ro_lun.guid, readonly=True, serial="ro-lun"),
             Disk("sdb", "scsi", guid=shared_lun.guid, shared=True, serial="shared-lun"),
             Disk("vda", "virtio", volume=(vmenv.dom.sd, vmenv.img, vmenv.vol), boot=1,
                  serial="boot-disk")]
    vm_id = new_id()
    vms.append(vm_id)
    with vmenv.client as c:
        info = c.call("VM.create", {"vmID": vm_id, "vmParams": FORMS[form](vm_id, disks)})
        assert info["status"] == "WaitForLaunch" and info["vmId"] == vm_id
        stats = wait_status(c, vm_id, "Paused")
        info = c.call("VM.getInfo", {"vmID": vm_id})
    assert int(stats["pid"]) > 0 and set(stats["disks"]) == {"sda", "sdb", "vda"}
    assert "machine pc-q35-rhel8.6.0 (runs as q35)" in info["ignoredDevices"]
    assert "graphics vnc (runs headless)" in info["ignoredDevices"] or form == "dict"
    assert [(d["macAddr"], d["network"]) for d in info["devices"]
            if d["type"] == "interface"] == [("00:1a:4a:16:01:51", "ovirtmgmt")]
    paths = {d["name"]: d["path"] for d in info["devices"] if d["type"] == "disk"}
    assert paths["sda"] == ro_lun.loop and paths["sdb"] == shared_lun.loop

    # What qemu runs is exactly what was asked.
    block = {b["qdev"]: b for b in qmp(vmenv, vm_id, "query-block")}
    nodes = {n["node-name"]: n for n in qmp(vmenv, vm_id, "query-named-block-nodes")}
    assert nodes["sda-storage"]["file"] == ro_lun.loop and nodes["sda-storage"]["ro"]
    assert nodes["sdb-storage"]["file"] == shared_lun.loop and not nodes["sdb-storage"]["ro"]
    assert os.path.realpath(nodes["vda-storage"]["file"]) == \
        os.path.realpath(lv_link(vmenv, vmenv.vol))
    assert block["disk-sda"]["inserted"]["ro"] and not block["disk-sdb"]["inserted"]["ro"]
    for qdev, want in (("disk-sda", ("scsi-hd", "ro-lun", None)),
                       ("disk-sdb", ("scsi-hd", "shared-lun", None))):
        path = f"/machine/peripheral/{qdev}"
        got = (qmp(vmenv, vm_id, "qom-get", {"path": path, "property": "type"}),
               qmp(vmenv, vm_id, "qom-get", {"path": path, "property": "serial"}), None)
        assert got == want
    vda = "/machine/peripheral/disk-vda"
    assert qmp(vmenv, vm_id, "qom-get", {"path": vda, "property": "type"}) == "virtio-blk-pci"
    assert qmp(vmenv, vm_id, "qom-get", {"path": vda, "property": "serial"}) == "boot-disk"
    assert qmp(vmenv, vm_id, "qom-get", {"path": vda, "property": "bootindex"}) == 1
    assert qmp(vmenv, vm_id, "qom-get", {"path": "/machine/peripheral/disk-sdb",
                                         "property": "share-rw"})

    # Bytes written through the VM's disk are on the LUN.
    pattern = 0xA5 if form == "xml" else 0x5A
    qmp(vmenv, vm_id, "human-monitor-command",
        {"command-line": f'qemu-io -d disk-sdb "write -P {pattern} 4096 4096"'})
    qmp(vmenv, vm_id, "human-monitor-command",
        {"command-line": 'qemu-io -d disk-sdb "flush"'})
    assert read_direct(shared_lun.loop, 4096, 4096) == bytes([pattern]) * 4096

    with vmenv.client as c:
        # VDSM's Bridge answers both with {"vmList": {}} (VM_running_state_change_Ret).
        assert c.call("VM.cont", {"vmID": vm_id}) == {"vmList": {}}
        wait_status(c, vm_id, "Up")
        assert c.call("VM.pause", {"vmID": vm_id}) == {"vmList": {}}
        wait_status(c, vm_id, "Paused")
        # In use: the image is not torn down or deleted, the LUN not made a PV.
        image = {"storagepoolID": BLANK, "storagedomainID": vmenv.dom.sd,
                 "imageID": vmenv.img}
        assert code_of(lambda: c.call("Image.teardown", {**image, "volumeID": vmenv.vol})) \
            == 203
        assert code_of(lambda: c.call("Image.delete", {**image, "postZero": False,
                                                       "force": True})) == 203
        assert code_of(lambda: c.call("LVMVolumeGroup.create", {
            "name": new_id(), "devlist": [ro_lun.guid], "force": True})) == 203
        c.call("VM.destroy", {"vmID": vm_id})
    pid = int(stats["pid"])
    assert not Path(f"/proc/{pid}").exists()
    assert_nothing_left(vmenv, vm_id)


# --- refusals -----------------------------------------------------------------------


def test_refusals_leave_nothing_behind(vmenv: VmEnv, vms: list[str]) -> None:
    vol = Disk("vda", "virtio", volume=(vmenv.dom.sd, vmenv.img, vmenv.vol))
    free = vmenv.luns[2]

    def create(disks: list[Disk], form: str = "dict", **tweak: Any) -> int:
        vm_id = new_id()
        params = FORMS[form](vm_id, disks)
        if form == "dict":
            for key, value in tweak.items():
                params["devices"][-2 if key == "lun_format" else 0]["format"] = value
        with vmenv.client as c:
            code = code_of(lambda: c.call("VM.create", {"vmID": vm_id, "vmParams": params}))
        assert_nothing_left(vmenv, vm_id)
        return code

    # A GUID this host does not see (the volume before it was prepared: rolled back).
    assert create([vol, Disk("sda", "scsi", guid="36001405deadbeefdeadbeefdeadbeef")]) == 37
    # A LUN that is a PV of a storage domain's VG.
    assert vmenv.dom.lun is not None
    assert create([vol, Disk("sda", "scsi", guid=vmenv.dom.lun.guid)]) == 203
    # Duplicate index on one bus; a LUN that is not raw.
    assert create([Disk("sda", "scsi", guid=free.guid),
                   Disk("sda", "scsi", guid=vmenv.luns[3].guid)], form="xml") == 91
    assert create([vol, Disk("sda", "scsi", guid=free.guid)], lun_format="cow") == 91

    # A LUN used read-write by another VM, unless both share it.
    first = new_id()
    vms.append(first)
    with vmenv.client as c:
        c.call("VM.create", {"vmID": first, "vmParams": dict_params(
            first, [Disk("sda", "scsi", guid=free.guid)])})
        wait_status(c, first, "Paused")
    assert create([vol, Disk("sda", "scsi", guid=free.guid)]) == 203
    assert create([Disk("sda", "scsi", guid=free.guid, shared=True)]) == 203
    # Read-only next to a writer is refused too; two readers would not be.
    assert create([Disk("sda", "scsi", guid=free.guid, readonly=True)]) == 203
    with vmenv.client as c:
        assert code_of(lambda: c.call("VM.create", {"vmID": first, "vmParams": dict_params(
            first, [Disk("sda", "scsi", guid=vmenv.luns[3].guid)])})) == 4
        assert code_of(lambda: c.call("VM.getStats", {"vmID": new_id()})) == 1
        # This host has no TLS: it neither sends nor takes an encrypted migration.
        assert code_of(lambda: c.call("VM.migrate", {"vmID": first, "params": {
            "dst": "127.0.0.1:1", "encrypted": True}})) == 91
        assert c.call("VM.getStats", {"vmID": first})[0]["status"] == "Paused"
    for incoming, code in (({"encrypted": True}, 12), ({"address": "a b"}, 91),
                           ({"encrypted": "yes"}, 91), ("tls", 91)):
        vm_id = new_id()
        request = {"vmID": vm_id, "params": {**dict_params(vm_id, [vol]),
                                             "incoming": incoming}}
        with vmenv.client as c:
            assert code_of(functools.partial(c.call, "VM.migrationCreate", request)) == code
        assert_nothing_left(vmenv, vm_id)


def test_two_vms_share_a_lun_when_both_say_so(vmenv: VmEnv, vms: list[str]) -> None:
    lun = vmenv.luns[3]
    ids = [new_id(), new_id()]
    vms.extend(ids)
    with vmenv.client as c:
        for vm_id in ids:
            c.call("VM.create", {"vmID": vm_id, "vmParams": xml_params(
                vm_id, [Disk("sda", "scsi", guid=lun.guid, shared=True)])})
        for vm_id in ids:
            wait_status(c, vm_id, "Paused")


# --- hot plug -----------------------------------------------------------------------


def test_hotplug_and_unplug(vmenv: VmEnv, vms: list[str]) -> None:
    vm_id = new_id()
    vms.append(vm_id)
    lun, other = vmenv.luns[2], vmenv.luns[3]
    with vmenv.client as c:
        c.call("VM.create", {"vmID": vm_id, "vmParams": xml_params(
            vm_id, [Disk("sda", "scsi", guid=lun.guid)])})
        wait_status(c, vm_id, "Paused")
        # A SCSI LUN, engine XML: plugged, then unplugged (SCSI needs no guest).
        plug = hotplug_xml(vm_id, Disk("sdb", "scsi", guid=other.guid, serial="hot"))
        info = c.call("VM.hotplugDisk", {"vmID": vm_id, "params": plug})
        assert {d["name"] for d in info["devices"] if d["type"] == "disk"} == {"sda", "sdb"}
        nodes = {n["node-name"] for n in qmp(vmenv, vm_id, "query-named-block-nodes")}
        assert {"sdb-storage", "sdb-format"} <= nodes
        info = c.call("VM.hotunplugDisk", {"vmID": vm_id, "params": plug})
        assert {d["name"] for d in info["devices"] if d["type"] == "disk"} == {"sda"}
        nodes = {n["node-name"] for n in qmp(vmenv, vm_id, "query-named-block-nodes")}
        assert not {"sdb-storage", "sdb-format"} & nodes
        # Unplugged means released: another VM may now write that LUN.
        other_vm = new_id()
        vms.append(other_vm)
        c.call("VM.create", {"vmID": other_vm, "vmParams": dict_params(
            other_vm, [Disk("sda", "scsi", guid=other.guid)])})
        wait_status(c, other_vm, "Paused")
        c.call("VM.destroy", {"vmID": other_vm})
        # A failed plug (an unknown GUID) leaves nothing.
        bad = {"vmId": vm_id, "drive": drive_dict(
            Disk("sdc", "scsi", guid="36001405deadbeefdeadbeefdeadbeef"))}
        assert code_of(lambda: c.call("VM.hotplugDisk", {"vmID": vm_id, "params": bad})) == 37
        # The domain volume as a virtio disk, legacy drive dict: plugged; its unplug needs
        # a guest to acknowledge, which an OS-less VM never does: 46, still attached.
        drive = {"vmId": vm_id, "drive": drive_dict(
            Disk("vdb", "virtio", volume=(vmenv.dom.sd, vmenv.img, vmenv.vol)))}
        c.call("VM.hotplugDisk", {"vmID": vm_id, "params": drive})
        assert lv_link(vmenv, vmenv.vol).exists()
        assert code_of(lambda: c.call("VM.hotunplugDisk", {"vmID": vm_id,
                                                           "params": drive})) == 46
        info = c.call("VM.getInfo", {"vmID": vm_id})
        assert {d["name"] for d in info["devices"] if d["type"] == "disk"} == {"sda", "vdb"}
        c.call("VM.destroy", {"vmID": vm_id})
    assert_nothing_left(vmenv, vm_id)


# --- events -------------------------------------------------------------------------


def test_every_status_change_is_an_event(vmenv: VmEnv, vms: list[str]) -> None:
    vm_id = new_id()
    vms.append(vm_id)
    name = f"|virt|VM_status|{vm_id}"
    url = vmenv.host.agent.url
    assert url is not None

    async def lifecycle() -> list[str]:
        seen: list[str] = []
        async with aiohttp.ClientSession() as s, s.ws_connect(url + "/jsonrpc") as ws:
            async def call(n: int, method: str, params: dict[str, Any]) -> None:
                await ws.send_str(json.dumps({"jsonrpc": "2.0", "id": n, "method": method,
                                              "params": params}))

            await call(1, "VM.create", {"vmID": vm_id, "vmParams": dict_params(
                vm_id, [Disk("sda", "scsi", guid=vmenv.luns[3].guid)])})
            next_step = {"Paused": (2, "VM.cont"), "Up": (3, "VM.destroy")}
            while not seen or seen[-1] != "Down":
                msg = json.loads((await asyncio.wait_for(ws.receive(), 30)).data)
                if "error" in msg:
                    raise AssertionError(msg)
                if msg.get("method") != name:
                    continue
                status = msg["params"][vm_id]["status"]
                seen.append(status)
                if status in next_step:
                    n, method = next_step.pop(status)
                    await call(n, method, {"vmID": vm_id})
        return seen

    assert run(lifecycle()) == ["WaitForLaunch", "Paused", "Up", "Down"]


# --- the agent goes away, the VMs stay ------------------------------------------------


def test_vms_survive_an_agent_killed_and_are_recovered(vmenv: VmEnv, vms: list[str]) -> None:
    a, b = new_id(), new_id()
    vms.extend([a, b])
    with vmenv.client as c:
        c.call("VM.create", {"vmID": a, "vmParams": xml_params(a, [
            Disk("sda", "scsi", guid=vmenv.luns[2].guid),
            Disk("vda", "virtio", volume=(vmenv.dom.sd, vmenv.img, vmenv.vol))])})
        c.call("VM.create", {"vmID": b, "vmParams": dict_params(b, [
            Disk("sda", "scsi", guid=vmenv.luns[3].guid)])})
        pids = {vm: int(wait_status(c, vm, "Paused")["pid"]) for vm in (a, b)}
        c.call("VM.cont", {"vmID": b})
        wait_status(c, b, "Up")
    agent = vmenv.host.agent
    agent.kill()  # SIGKILL: no clean shutdown at all
    agent.start()
    with vmenv.client as c:
        assert set(c.call("Host.getVMList", {"onlyUUID": True})) >= {a, b}
        stats = {s["vmId"]: s for s in c.call("Host.getAllVmStats")}
        assert stats[a]["status"] == "Paused" and stats[b]["status"] == "Up"
        assert {vm: int(stats[vm]["pid"]) for vm in (a, b)} == pids
        assert set(stats[a]["disks"]) == {"sda", "vda"}
        # Recovered means held again: the image is still refused to a teardown.
        assert code_of(lambda: c.call("Image.teardown", {
            "storagepoolID": BLANK, "storagedomainID": vmenv.dom.sd, "imageID": vmenv.img,
            "volumeID": vmenv.vol})) == 203
        # qemu killed behind the agent's back: Down, with what is known (an adopted
        # qemu is not the new agent's child: no exit status, but its pid and log).
        os.kill(pids[b], signal.SIGKILL)
        down = wait_status(c, b, "Down")
        assert down["exitCode"] == 1
        assert f"qemu (pid {pids[b]}) exited" in down["exitMessage"]
        c.call("VM.destroy", {"vmID": a})
        c.call("VM.destroy", {"vmID": b})
    assert_nothing_left(vmenv, a)


def test_a_vm_that_died_while_the_agent_was_away_is_down(vmenv: VmEnv,
                                                          vms: list[str]) -> None:
    vm_id = new_id()
    vms.append(vm_id)
    with vmenv.client as c:
        c.call("VM.create", {"vmID": vm_id, "vmParams": dict_params(vm_id, [
            Disk("vda", "virtio", volume=(vmenv.dom.sd, vmenv.img, vmenv.vol))])})
        pid = int(wait_status(c, vm_id, "Paused")["pid"])
    agent = vmenv.host.agent
    agent.stop()
    os.kill(pid, signal.SIGKILL)
    agent.start()
    with vmenv.client as c:
        stats = c.call("VM.getStats", {"vmID": vm_id})[0]
        assert stats["status"] == "Down" and stats["exitCode"] == 1
        assert "while the agent was away" in stats["exitMessage"]
        # Its storage was released at recovery.
        assert not lv_link(vmenv, vmenv.vol).exists()
        c.call("VM.destroy", {"vmID": vm_id})
    assert_nothing_left(vmenv, vm_id)


def test_an_incoming_migration_nobody_finishes_is_given_up(vmenv: VmEnv,
                                                         vms: list[str]) -> None:
    """VM.migrationCreate as a source agent sends it, then nothing (its host gone): after
    migration_destination_timeout the copy here is destroyed, its storage released."""
    vm_id = new_id()
    vms.append(vm_id)
    with vmenv.client as c:
        reply = c.call("VM.migrationCreate", {"vmID": vm_id, "params": dict_params(vm_id, [
            Disk("vda", "virtio", volume=(vmenv.dom.sd, vmenv.img, vmenv.vol))])})
        # The engine's form names no address; qemu listens on every one (migration_listen
        # here) and the URI names the host.
        host, port = reply["migrationUri"].removeprefix("tcp:").rsplit(":", 1)
        assert host == socket.getfqdn() and 49152 <= int(port) <= 49215
        stats = c.call("VM.getStats", {"vmID": vm_id})[0]
        assert stats["status"] == "Migration Destination"
        pid = int(stats["pid"])
        assert int(port) in listening_ports(pid)
        assert lv_link(vmenv, vmenv.vol).exists()
        down = wait_status(c, vm_id, "Down", timeout=DESTINATION_TIMEOUT + 60)
        assert down["exitReason"] == 8 and down["exitCode"] == 1
        assert "Timed out" in down["exitMessage"]
        assert not Path(f"/proc/{pid}").exists()
        assert not lv_link(vmenv, vmenv.vol).exists()
        # A source that comes back too late is told no; its own copy is the VM.
        assert code_of(lambda: c.call("VM.migrationFinish",
                                      {"vmID": vm_id, "resume": True})) == 12
        c.call("VM.destroy", {"vmID": vm_id})
    assert_nothing_left(vmenv, vm_id)
