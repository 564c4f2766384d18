"""Live snapshots and live merges on real qemu, on a block domain (LUN drives skipped).

One simulated host, a block domain and spare loop LUNs, built once for the module.
VMs are launched paused (no guest OS); data goes in and is checked through qemu-io in
the VM's debug QMP monitor, qemu's chain is read there too (the agent holds the main
monitor).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import code_of
from tests.storage_helpers import (
    BLANK,
    DomainUnderTest,
    MiB,
    make_block_domain,
    make_localfs_domain,
    new_id,
)
from tests.vm_helpers import VmEnv, qmp, vm_host, wait_status
from tests.vm_requests import Disk, dict_params, hotplug_xml
from vdsmlite.client import Client, ServerError
from vdsmlite.virt.livemerge import _filename

pytestmark = pytest.mark.root

COW, RAW = 4, 5


@dataclass
class LmEnv(VmEnv):
    file_dom: DomainUnderTest | None = None

    def domain(self, kind: str) -> DomainUnderTest:
        if kind == "block":
            return self.dom
        assert self.file_dom is not None
        return self.file_dom


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LmEnv]:
    base = tmp_path_factory.mktemp("lm")
    with vm_host(base, "lmhost", unplug_timeout=1.0) as (host, farm, vm_run_dir):
        dom = make_block_domain(host.agent, farm)
        file_dom = make_localfs_domain(host.agent, base / "local")
        luns = farm.create(1, "64M")
        yield LmEnv(host, dom, "", "", luns, vm_run_dir, file_dom)


@pytest.fixture
def vms(env: LmEnv) -> Iterator[list[str]]:
    created: list[str] = []
    yield created
    with env.client as c:
        listed = set(c.call("Host.getVMList", {"onlyUUID": True}))
        for vm_id in created:
            if vm_id in listed:
                c.call("VM.destroy", {"vmID": vm_id})


# --- helpers -----------------------------------------------------------------------------


def start_vm(env: LmEnv, vms: list[str], disks: list[Disk]) -> str:
    vm_id = new_id()
    vms.append(vm_id)
    with env.client as c:
        c.call("VM.create", {"vmID": vm_id, "vmParams": dict_params(vm_id, disks)})
        wait_status(c, vm_id, "Paused")
    return vm_id


def qemu_io(env: LmEnv, vm_id: str, dev: str, cmd: str) -> str:
    qdev = f"/machine/peripheral/disk-{dev}/virtio-backend" if dev.startswith("vd") \
        else f"disk-{dev}"
    out: str = qmp(env, vm_id, "human-monitor-command",
                   {"command-line": f'qemu-io -d {qdev} "{cmd}"'})
    assert "error" not in out.lower() and "failed" not in out.lower(), out
    return out


def snapshot_volume(dom: DomainUnderTest, img: str, parent: str, size: int) -> str:
    _, vol = dom.create_volume(img, size=size, fmt=COW, parent=parent)
    return vol


def disk_info(c: Client, vm_id: str, name: str) -> dict[str, Any]:
    info = c.call("VM.getInfo", {"vmID": vm_id})
    return next(d for d in info["devices"] if d.get("name") == name)


def qemu_chain(env: LmEnv, vm_id: str, dev: str) -> tuple[str, list[str]]:
    """(root node-name, chain base first by filename) of a disk, as qemu runs it."""
    for b in qmp(env, vm_id, "query-block"):
        if f"disk-{dev}" in (b.get("qdev") or ""):
            chain, image = [], b["inserted"]["image"]
            while image is not None:
                chain.append(Path(_filename(image["filename"])).name)
                image = image.get("backing-image")
            return b["inserted"]["node-name"], chain[::-1]
    raise AssertionError(f"no disk {dev}")


def wait_for(what: Callable[[], Any], timeout: float = 120, desc: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = what()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {desc or what}")
        time.sleep(0.05)


def vm_jobs(c: Client, vm_id: str) -> dict[str, Any]:
    jobs: dict[str, Any] = c.call("VM.getStats", {"vmID": vm_id})[0]["vmJobs"]
    return jobs


def merge(c: Client, dom: DomainUnderTest, vm_id: str, img: str, *, base: str, top: str,
          bandwidth: int = 0) -> str:
    job = new_id()
    c.call("VM.merge", {"vmID": vm_id, "drive": {"poolID": BLANK, "domainID": dom.sd,
                                                 "imageID": img, "volumeID": top},
                        "baseVolUUID": base, "topVolUUID": top, "bandwidth": bandwidth,
                        "jobUUID": job})
    return job


def reconcile(c: Client, dom: DomainUnderTest, img: str, leaf: str) -> list[str]:
    chain: list[str] = c.call("Image.reconcileVolumeChain", {
        "storagepoolID": BLANK, "storagedomainID": dom.sd, "imageID": img,
        "leafVolID": leaf})
    return chain


# --- tests -------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["block", "file"])
def test_snapshots_then_internal_and_active_merge(env: LmEnv, vms: list[str],
                                                  kind: str) -> None:
    dom = env.domain(kind)
    img, vol0 = dom.create_volume(size=128 * MiB)  # raw base
    vm_id = start_vm(env, vms, [Disk("vda", "virtio", volume=(dom.sd, img, vol0)),
                                Disk("sda", "scsi", guid=env.luns[0].guid)])
    qemu_io(env, vm_id, "vda", "write -P 0xa1 0 64k")
    vol1 = snapshot_volume(dom, img, vol0, 128 * MiB)
    with env.client as c:
        # The LUN drive is skipped, as VDSM does.
        c.call("VM.snapshot", {"vmID": vm_id, "snapDrives": [
            {"domainID": dom.sd, "imageID": img, "volumeID": vol1,
             "baseVolumeID": vol0},
            {"GUID": env.luns[0].guid, "device": "lun"}]})
        vda = disk_info(c, vm_id, "vda")
        assert vda["volumeID"] == vol1 and vda["volumeChain"] == [vol0, vol1]
        assert vda["format"] == "cow"
    root, chain = qemu_chain(env, vm_id, "vda")
    assert chain == [vol0, vol1] and root != "vda-format"
    assert qemu_chain(env, vm_id, "sda")[0] == "sda-format"
    qemu_io(env, vm_id, "vda", "write -P 0xb2 64k 64k")
    vol2 = snapshot_volume(dom, img, vol1, 128 * MiB)
    with env.client as c:
        c.call("VM.snapshot", {"vmID": vm_id, "snapDrives": [
            {"domainID": dom.sd, "imageID": img, "volumeID": vol2}]})
    qemu_io(env, vm_id, "vda", "write -P 0xc3 128k 64k")
    assert qemu_chain(env, vm_id, "vda")[1] == [vol0, vol1, vol2]
    # What the VM runs is saved: vm.json says the new chain.
    assert vol2 in (env.vm_dir(vm_id) / "vm.json").read_text()

    with env.client as c:
        # Internal merge: vol1 into vol0; vol2 now sits on vol0.
        merge(c, dom, vm_id, img, base=vol0, top=vol1)
        wait_for(lambda: not vm_jobs(c, vm_id), desc="internal merge")
        assert qemu_chain(env, vm_id, "vda")[1] == [vol0, vol2]
        assert disk_info(c, vm_id, "vda")["volumeChain"] == [vol0, vol2]
        assert dom.info(img, vol2)["parent"] == vol0
        assert dom.info(img, vol1)["legality"] == "ILLEGAL"
        assert reconcile(c, dom, img, vol2) == [vol0, vol2]
        dom.delete_volume(img, vol1)  # while the VM runs on the rest of the image
        assert code_of(lambda: c.call("Volume.getInfo", dom.vol_params(img, vol1))) \
            == 201

        # Active merge with pivot: vol2 into vol0, vol0 the leaf again.
        merge(c, dom, vm_id, img, base=vol0, top=vol2)
        wait_for(lambda: not vm_jobs(c, vm_id), desc="active merge")
        root, chain = qemu_chain(env, vm_id, "vda")
        assert chain == [vol0]
        vda = disk_info(c, vm_id, "vda")
        assert vda["volumeID"] == vol0 and vda["volumeChain"] == [vol0]
        assert vda["format"] == "raw"
        assert dom.info(img, vol0)["voltype"] == "LEAF"
        assert dom.info(img, vol2)["legality"] == "ILLEGAL"
        assert reconcile(c, dom, img, vol0) == [vol0]
        dom.delete_volume(img, vol2)
    # Every byte of every layer is in the base now, read through the VM.
    for pattern, offset in ((0xa1, 0), (0xb2, 64 * 1024), (0xc3, 128 * 1024)):
        qemu_io(env, vm_id, "vda", f"read -P {pattern:#x} {offset} 64k")
    with env.client as c:
        assert wait_status(c, vm_id, "Paused")


def test_a_failed_snapshot_leaves_every_drive_on_its_leaf(env: LmEnv,
                                                         vms: list[str]) -> None:
    img_a, a0 = env.dom.create_volume(size=128 * MiB)
    img_b, b0 = env.dom.create_volume(size=128 * MiB)
    vm_id = start_vm(env, vms, [Disk("vda", "virtio", volume=(env.dom.sd, img_a, a0)),
                                Disk("vdb", "virtio", volume=(env.dom.sd, img_b, b0))])
    a1 = snapshot_volume(env.dom, img_a, a0, 128 * MiB)
    with env.client as c:
        code = code_of(lambda: c.call("VM.snapshot", {"vmID": vm_id, "snapDrives": [
            {"domainID": env.dom.sd, "imageID": img_a, "volumeID": a1},
            {"domainID": env.dom.sd, "imageID": img_b, "volumeID": new_id()}]}))
        assert code == 48
        for name, vol in (("vda", a0), ("vdb", b0)):
            assert disk_info(c, vm_id, name)["volumeChain"] == [vol]
            assert qemu_chain(env, vm_id, name) == (f"{name}-format", [vol])
    nodes = {n["node-name"] for n in qmp(env, vm_id, "query-named-block-nodes")}
    assert not any(n.startswith("vda-") and n not in ("vda-format", "vda-storage")
                   for n in nodes)
    # The new volume is unused: not prepared; the VM runs on and the volume can go
    # once it stops (a running VM's image keeps its volumes, but merged-away ones).
    assert not (env.host.agent.run_dir / "lv" / env.dom.sd / a1).exists()

    # Both new volumes exist, but qemu refuses the second drive inside the
    # transaction (a block job the agent does not know of holds vdb): neither moves.
    b1 = snapshot_volume(env.dom, img_b, b0, 128 * MiB)
    target = env.vm_dir(vm_id) / "mirror.raw"
    qmp(env, vm_id, "drive-mirror", {"job-id": "busy", "device": "vdb-format",
                                     "target": str(target), "format": "raw",
                                     "sync": "full", "speed": 1})
    try:
        with env.client as c:
            with pytest.raises(ServerError) as e:
                c.call("VM.snapshot", {"vmID": vm_id, "snapDrives": [
                    {"domainID": env.dom.sd, "imageID": img_a, "volumeID": a1},
                    {"domainID": env.dom.sd, "imageID": img_b, "volumeID": b1}]})
            assert e.value.code == 48 and "transaction" in str(e.value), e.value
            for name, vol in (("vda", a0), ("vdb", b0)):
                assert disk_info(c, vm_id, name)["volumeChain"] == [vol]
                assert qemu_chain(env, vm_id, name) == (f"{name}-format", [vol])
    finally:
        qmp(env, vm_id, "block-job-cancel", {"device": "busy", "force": True})
    nodes = {n["node-name"] for n in qmp(env, vm_id, "query-named-block-nodes")}
    assert not any(n.startswith(("vda-", "vdb-")) and not n.endswith(("-format", "-storage"))
                   for n in nodes), nodes
    for vol in (a1, b1):
        assert not (env.host.agent.run_dir / "lv" / env.dom.sd / vol).exists()
    with env.client as c:
        wait_status(c, vm_id, "Paused")
        c.call("VM.destroy", {"vmID": vm_id})
    env.dom.delete_volume(img_a, a1)
    env.dom.delete_volume(img_b, b1)


def test_throttled_merge_progress_abort_and_agent_restart(env: LmEnv,
                                                          vms: list[str]) -> None:
    img, vol0 = env.dom.create_volume(size=128 * MiB)
    vm_id = start_vm(env, vms, [Disk("vda", "virtio", volume=(env.dom.sd, img, vol0))])
    vol1 = snapshot_volume(env.dom, img, vol0, 128 * MiB)
    with env.client as c:
        c.call("VM.snapshot", {"vmID": vm_id, "snapDrives": [
            {"domainID": env.dom.sd, "imageID": img, "volumeID": vol1}]})
    qemu_io(env, vm_id, "vda", "write -P 0x5e 0 24M")
    vol2 = snapshot_volume(env.dom, img, vol1, 128 * MiB)
    with env.client as c:
        c.call("VM.snapshot", {"vmID": vm_id, "snapDrives": [
            {"domainID": env.dom.sd, "imageID": img, "volumeID": vol2}]})
        # 1 MiB/s: the merge runs long enough to be seen, then is cancelled.
        job = merge(c, env.dom, vm_id, img, base=vol0, top=vol1, bandwidth=1)
        seen = wait_for(lambda: vm_jobs(c, vm_id).get(job), desc="vmJobs entry")
        assert seen["id"] == job and seen["jobType"] == "block"
        assert seen["blockJobType"] == "commit" and seen["imgUUID"] == img
        assert seen["bandwidth"] == 1 and int(seen["end"]) > 0
        c.call("VM.mergeAbort", {"vmID": vm_id, "jobUUID": job})
        assert job not in vm_jobs(c, vm_id)
        assert disk_info(c, vm_id, "vda")["volumeChain"] == [vol0, vol1, vol2]
        assert env.dom.info(img, vol1)["legality"] == "LEGAL"
        assert code_of(lambda: c.call("VM.mergeAbort", {"vmID": vm_id, "jobUUID": job})) \
            == 66
    assert qemu_chain(env, vm_id, "vda")[1] == [vol0, vol1, vol2]

    with env.client as c:
        job = merge(c, env.dom, vm_id, img, base=vol0, top=vol1, bandwidth=1)
        wait_for(lambda: vm_jobs(c, vm_id).get(job), desc="vmJobs entry")
    env.host.agent.kill()  # SIGKILL during the merge
    env.host.agent.start()
    with env.client as c:
        assert job in vm_jobs(c, vm_id)  # found again from vm.json and qemu
        # Let it run at full speed now (the test's own monitor).
        qmp(env, vm_id, "block-job-set-speed", {"device": f"merge-{job}", "speed": 0})
        wait_for(lambda: not vm_jobs(c, vm_id), desc="recovered merge")
        assert disk_info(c, vm_id, "vda")["volumeChain"] == [vol0, vol2]
        assert env.dom.info(img, vol2)["parent"] == vol0
        assert env.dom.info(img, vol1)["legality"] == "ILLEGAL"
        assert reconcile(c, env.dom, img, vol2) == [vol0, vol2]
        wait_status(c, vm_id, "Paused")
    assert qemu_chain(env, vm_id, "vda")[1] == [vol0, vol2]
    qemu_io(env, vm_id, "vda", "read -P 0x5e 0 24M")

    # An active merge whose job got ready while the agent was away: pivoted at start.
    qemu_io(env, vm_id, "vda", "write -P 0x6f 1M 8M")
    with env.client as c:
        job = merge(c, env.dom, vm_id, img, base=vol0, top=vol2, bandwidth=1)
        wait_for(lambda: vm_jobs(c, vm_id).get(job), desc="vmJobs entry")
    env.host.agent.kill()
    qmp(env, vm_id, "block-job-set-speed", {"device": f"merge-{job}", "speed": 0})
    wait_for(lambda: [j for j in qmp(env, vm_id, "query-block-jobs")
                      if j["device"] == f"merge-{job}" and j["status"] == "ready"],
             desc="job ready")
    env.host.agent.start()
    with env.client as c:
        wait_for(lambda: not vm_jobs(c, vm_id), desc="recovered active merge")
        vda = disk_info(c, vm_id, "vda")
        assert vda["volumeID"] == vol0 and vda["volumeChain"] == [vol0]
        assert env.dom.info(img, vol2)["legality"] == "ILLEGAL"
        assert env.dom.info(img, vol0)["voltype"] == "LEAF"
    assert qemu_chain(env, vm_id, "vda")[1] == [vol0]
    assert not qmp(env, vm_id, "query-block-jobs")
    qemu_io(env, vm_id, "vda", "read -P 0x5e 0 1M")
    qemu_io(env, vm_id, "vda", "read -P 0x6f 1M 8M")
    qemu_io(env, vm_id, "vda", "read -P 0x5e 9M 15M")


def test_unplug_after_a_snapshot_and_reconcile_without_a_vm(env: LmEnv,
                                                            vms: list[str]) -> None:
    dom = env.domain("file")
    img, vol0 = dom.create_volume(size=128 * MiB)
    vm_id = start_vm(env, vms, [Disk("sda", "scsi", guid=env.luns[0].guid)])
    drive = hotplug_xml(vm_id, Disk("sdb", "scsi", volume=(dom.sd, img, vol0)))
    vol1 = snapshot_volume(dom, img, vol0, 128 * MiB)
    with env.client as c:
        c.call("VM.hotplugDisk", {"vmID": vm_id, "params": drive})
        c.call("VM.snapshot", {"vmID": vm_id, "snapDrives": [
            {"domainID": dom.sd, "imageID": img, "volumeID": vol1}]})
        assert qemu_chain(env, vm_id, "sdb")[1] == [vol0, vol1]
        # Unplugged with every node of it, the snapshot's overlay included.
        c.call("VM.hotunplugDisk", {"vmID": vm_id, "params": drive})
        nodes = {n["node-name"] for n in qmp(env, vm_id, "query-named-block-nodes")}
        assert not any(n.startswith("sdb-") for n in nodes), nodes
        # No VM runs the image: the chain as the qcow2 headers say.
        assert reconcile(c, dom, img, vol1) == [vol0, vol1]
        wait_status(c, vm_id, "Paused")
