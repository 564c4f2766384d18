"""Start a VM given only its UUID: its OVF from the OVF_STORE of a block domain.

One simulated host, one block domain, spare LUNs, built once. The store holds
every real OVF sample (tests/data/ovf-samples), each pointed at this domain
(its ``rasd:StorageId`` replaced) and the direct-LUN sample at a LUN of the
farm; the volumes its disks name are created with the samples' own image and
volume ids. Each VM is started with ``VM.create(vmID, {"vmId": vmID})`` and
what runs is checked against the running qemu (``query-*`` on its debug
monitor), not against what the agent says it did.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from fake_storage.cluster import SimHost
from fake_storage.lunfarm import FakeLun
from tests.ovf_helpers import SAMPLES, put_store, sample_id, store_tar
from tests.storage_helpers import (
    BLANK,
    COW,
    RAW,
    DomainUnderTest,
    MiB,
    make_block_domain,
    new_id,
    run_task,
)
from tests.vm_helpers import debug_qmp, vm_host, wait_status
from vdsmlite.client import Client, ServerError

pytestmark = pytest.mark.root

# The direct LUN the engine sample names (ovf:lun_id), replaced by one of the farm's.
SAMPLE_LUN = "36001405bb1b5071cfb44a4e9576aef7c"
UUID = r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"


@dataclass
class Sample:
    name: str
    vm_id: str
    ovf: bytes


@dataclass
class OvfEnv:
    host: SimHost
    dom: DomainUnderTest
    lun: FakeLun
    samples: dict[str, Sample]
    vm_run_dir: Path

    @property
    def client(self) -> Client:
        return self.host.agent.client()


def pointed_here(text: str, sd: str, lun: str) -> str:
    """A sample whose disks live on domain `sd` and whose direct LUN is `lun`."""
    text = re.sub(rf"(<rasd:StorageId>){UUID}(</rasd:StorageId>)", rf"\g<1>{sd}\g<2>", text)
    text = re.sub(rf'(ovf:storage_id="){UUID}(")', rf"\g<1>{sd}\g<2>", text)
    return text.replace(SAMPLE_LUN, lun)


@pytest.fixture(scope="module")
def ovfenv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OvfEnv]:
    with vm_host(tmp_path_factory.mktemp("fromovf"), "ovfhost") as (host, farm, vm_run_dir):
        dom = make_block_domain(host.agent, farm)
        [lun] = farm.create(1, "64M")
        samples = {}
        for path in sorted(SAMPLES.glob("*.ovf")):
            # The hosted-engine samples share one VM id: each gets its own.
            text = path.read_text()
            vm_id = new_id()
            text = text.replace(sample_id(text), vm_id)
            samples[path.stem] = Sample(path.stem, vm_id,
                                        pointed_here(text, dom.sd, lun.guid).encode())
        status, body = put_store(host.agent, dom.sd, store_tar(
            dom.sd, [(s.vm_id, s.ovf) for s in samples.values()]))
        assert status == 200, body
        env = OvfEnv(host, dom, lun, samples, vm_run_dir)
        for sample in samples.values():
            make_disks_of(env, sample.vm_id)
        yield env


def params_of(env: OvfEnv, vm_id: str, **kw: Any) -> dict[str, Any]:
    with env.client as c:
        found: dict[str, Any] = c.call("Host.getVMParamsFromOVF", {"vmID": vm_id, **kw})
    return found


def make_disks_of(env: OvfEnv, vm_id: str) -> None:
    """The volumes the VM's converted disks name, with the OVF's own ids."""
    made = set()
    with env.client as c:
        existing = set(c.call("StorageDomain.getImages", {"storagedomainID": env.dom.sd}))
        for dev in params_of(env, vm_id)["vmParams"]["devices"]:
            if dev.get("type") != "disk" or "volumeID" not in dev:
                continue
            img, vol = dev["imageID"], dev["volumeID"]
            if img in existing or (img, vol) in made:
                continue
            cow = dev.get("format") == "cow"
            run_task(c, "Volume.create", {
                "volumeID": vol, "storagepoolID": BLANK, "storagedomainID": env.dom.sd,
                "imageID": img, "size": str(256 * MiB), "volFormat": COW if cow else RAW,
                "preallocate": 2 if cow else 1, "diskType": "DATA", "desc": "",
                "srcImgUUID": BLANK, "srcVolUUID": BLANK})
            made.add((img, vol))



def qmp(env: OvfEnv, vm_id: str, command: str, args: dict[str, Any] | None = None) -> Any:
    return debug_qmp(env.vm_run_dir / vm_id, command, args)


@pytest.fixture
def started(ovfenv: OvfEnv) -> Iterator[list[str]]:
    ids: list[str] = []
    yield ids
    with ovfenv.client as c:
        running = set(c.call("Host.getVMList", {"onlyUUID": True}))
        for vm_id in ids:
            if vm_id in running:
                c.call("VM.destroy", {"vmID": vm_id})


def start_by_uuid(env: OvfEnv, vm_id: str, started: list[str], **extra: Any) -> dict[str, Any]:
    with env.client as c:
        info: dict[str, Any] = c.call("VM.create", {"vmID": vm_id, "vmParams": {
            "vmId": vm_id, "launchPaused": True, **extra}})
        started.append(vm_id)
        assert info["status"] == "WaitForLaunch"
        wait_status(c, vm_id, "Paused")
        out: dict[str, Any] = c.call("VM.getInfo", {"vmID": vm_id})
        return out


SAMPLE_NAMES = sorted(p.stem for p in SAMPLES.glob("*.ovf"))


@pytest.mark.parametrize("name", SAMPLE_NAMES)
def test_every_sample_starts_by_uuid_as_its_ovf_says(ovfenv: OvfEnv, started: list[str],
                                                     name: str) -> None:
    sample = ovfenv.samples[name]
    found = params_of(ovfenv, sample.vm_id)
    params = found["vmParams"]
    assert found["source"]["storagedomainID"] == ovfenv.dom.sd
    assert params["vmId"] == sample.vm_id

    info = start_by_uuid(ovfenv, sample.vm_id, started)
    vm = sample.vm_id
    # Memory and vCPUs as qemu runs them.
    memory = qmp(ovfenv, vm, "query-memory-size-summary")["base-memory"]
    assert memory == int(params["memSize"]) * MiB
    cpus = qmp(ovfenv, vm, "query-cpus-fast")
    assert len(cpus) == int(params.get("smp", 1))
    # Every disk the OVF names is open in qemu, on this host's volume or LUN.
    nodes = {n["node-name"]: n["file"] for n in qmp(ovfenv, vm, "query-named-block-nodes")}
    files = set(nodes.values())
    disks = [d for d in params["devices"] if d.get("type") == "disk"
             and d.get("device") in ("disk", "lun")]
    assert disks, "every sample has a disk"
    for dev in disks:
        if dev.get("GUID"):
            assert dev["GUID"] == ovfenv.lun.guid
            assert ovfenv.lun.loop in files
        else:
            assert any(dev["volumeID"] in f for f in files), (dev, files)
    # Every NIC with the OVF's MAC, in the OVF's order.
    macs = [d["macAddr"].lower() for d in params["devices"] if d.get("type") == "interface"]
    running = [qmp(ovfenv, vm, "qom-get", {"path": f"/machine/peripheral/net{i}",
                                           "property": "mac"}) for i in range(len(macs))]
    assert running == macs
    # What the conversion warned about is in the VM's info.
    for warning in found["warnings"]:
        assert f"OVF: {warning}" in info["ignoredDevices"]


def test_the_newest_ovf_is_what_starts(ovfenv: OvfEnv, started: list[str]) -> None:
    """updateOVFEntity commits a new store; the next start by UUID uses it."""
    sample = ovfenv.samples["he-ha-ovf_test_v4.2_unsafe"]
    before = params_of(ovfenv, sample.vm_id)
    new_memory = int(before["vmParams"]["memSize"]) // 2
    text = sample.ovf.decode()
    # The memory Item's VirtualQuantity, whatever comes between (AllocationUnits...).
    changed = re.sub(r"(<rasd:ResourceType>4</rasd:ResourceType>(?:(?!</Item>).)*?"
                     r"<rasd:VirtualQuantity>)\d+(</rasd:VirtualQuantity>)",
                     rf"\g<1>{new_memory}\g<2>", text, count=1, flags=re.S)
    assert changed != text
    with ovfenv.client as c:
        c.call("StorageDomain.updateOVFEntity", {
            "storagedomainID": ovfenv.dom.sd, "entityID": sample.vm_id, "ovf": changed})
    after = params_of(ovfenv, sample.vm_id)
    assert int(after["vmParams"]["memSize"]) == new_memory
    assert after["source"]["lastUpdated"] != before["source"]["lastUpdated"]
    start_by_uuid(ovfenv, sample.vm_id, started)
    assert qmp(ovfenv, sample.vm_id, "query-memory-size-summary")["base-memory"] == \
        new_memory * MiB
    # The store still holds the rest unchanged.
    other = ovfenv.samples["he-ha-ovf_test-3.6"]
    assert params_of(ovfenv, other.vm_id)["vmParams"]["vmId"] == other.vm_id


def code(call: Any) -> tuple[int, str]:
    with pytest.raises(ServerError) as e:
        call()
    return e.value.code, str(e.value)


def test_refusals_name_what_is_missing_and_start_nothing(ovfenv: OvfEnv) -> None:
    unknown = "0b0e9b3e-1f7a-4c4f-9a53-4e2f1b6a7c8d"
    with ovfenv.client as c:
        before = c.call("Host.getVMList", {"onlyUUID": True})
        # No store holds it: 320, with the id.
        err, text = code(lambda: c.call("VM.create", {"vmID": unknown,
                                                      "vmParams": {"vmId": unknown}}))
        assert err == 320 and unknown in text
        assert code(lambda: c.call("Host.getVMParamsFromOVF", {"vmID": unknown}))[0] == 320
        # A store on a domain that does not exist.
        assert code(lambda: c.call("Host.getVMParamsFromOVF", {
            "vmID": unknown, "storagedomainID": unknown}))[0] == 358
        # vmId and vmID disagree: 91 naming the field, before any store is read.
        sample = ovfenv.samples["he-ha-ovf_test-3.6"]
        err, text = code(lambda: c.call("VM.create", {"vmID": unknown,
                                                      "vmParams": {"vmId": sample.vm_id}}))
        assert err == 91 and "vmParams.vmId" in text
        assert c.call("Host.getVMList", {"onlyUUID": True}) == before


def test_an_ovf_without_memory_is_refused_naming_the_field(ovfenv: OvfEnv) -> None:
    sample = ovfenv.samples["he-ha-ovf_test-3.6"]
    vm_id = "5d1f6d0a-3c8e-4e62-9c1e-2a7b8f4d9e01"
    text = sample.ovf.decode().replace(sample.vm_id, vm_id)
    broken = re.sub(r"<Item>(?:(?!</Item>).)*?<rasd:ResourceType>4</rasd:ResourceType>"
                    r"(?:(?!</Item>).)*?</Item>", "", text, flags=re.S)
    assert broken != text
    with ovfenv.client as c:
        c.call("StorageDomain.updateOVFEntity", {
            "storagedomainID": ovfenv.dom.sd, "entityID": vm_id, "ovf": broken})
        err, message = code(lambda: c.call("VM.create", {"vmID": vm_id,
                                                         "vmParams": {"vmId": vm_id}}))
        assert "memory" in message.lower(), message
        assert vm_id not in c.call("Host.getVMList", {"onlyUUID": True})
        c.call("StorageDomain.removeOVFEntity", {
            "storagedomainID": ovfenv.dom.sd, "entityID": vm_id})
    assert err == 1000  # OvfConversionError, an InvalidParameterException


def test_an_ovf_whose_disk_this_host_cannot_find_is_refused(ovfenv: OvfEnv) -> None:
    """The OVF names a volume that is not on the domain: refused naming it, nothing
    prepared or started."""
    sample = ovfenv.samples["he-ha-ovf_test-3.6"]
    vm_id = new_id()
    disks = [d for d in params_of(ovfenv, sample.vm_id)["vmParams"]["devices"]
             if d.get("type") == "disk" and "volumeID" in d]
    missing_image = new_id()
    text = sample.ovf.decode().replace(sample.vm_id, vm_id).replace(disks[0]["imageID"],
                                                                    missing_image)
    with ovfenv.client as c:
        c.call("StorageDomain.updateOVFEntity", {
            "storagedomainID": ovfenv.dom.sd, "entityID": vm_id, "ovf": text})
        try:
            err, message = code(lambda: c.call("VM.create", {"vmID": vm_id,
                                                             "vmParams": {"vmId": vm_id}}))
            assert vm_id not in c.call("Host.getVMList", {"onlyUUID": True})
        finally:
            c.call("StorageDomain.removeOVFEntity", {
                "storagedomainID": ovfenv.dom.sd, "entityID": vm_id})
    assert err in (201, 254, 358), (err, message)  # VolumeDoesNotExist, ImageFileNotFound
    assert missing_image in message or disks[0]["volumeID"] in message, message
    assert not (ovfenv.vm_run_dir / vm_id).exists()
