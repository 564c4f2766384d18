"""OVF parsing: real samples, both layouts and namespace spellings, hostile input.

Expected values for the samples were read off the files themselves; for the four
hosted-engine samples they also match what ovirt-hosted-engine-ha's own test
(ovirt_hosted_engine_ha/lib/ovf/ovf2VmParams_test.py) expects the HA agent to read.
The samples are in tests/data/ovf-samples (SOURCES.md there says where each
comes from).
"""

from __future__ import annotations

import dataclasses
import json

import pytest
from lxml import etree

from tests.ovf_helpers import SAMPLES
from vdsmlite.ovf import safexml
from vdsmlite.ovf.model import Disk, Entity, OvfError, Snapshot
from vdsmlite.ovf.reader import parse
from vdsmlite.ovf.safexml import MAX_OVF_SIZE, OvfValidator

pytestmark = pytest.mark.unit


@pytest.fixture
def samples_present() -> None:
    # The samples ship with the tests; a missing sample set is a broken checkout,
    # never a reason to pass.
    assert SAMPLES.is_dir(), f"no OVF samples in {SAMPLES}"


needs_samples = pytest.mark.usefixtures("samples_present")

GIB = 2**30
BLANK = "00000000-0000-0000-0000-000000000000"
NS_SLASH = "http://schemas.dmtf.org/ovf/envelope/1/"
NS_NO_SLASH = "http://schemas.dmtf.org/ovf/envelope/1"


def sample(name: str) -> bytes:
    return (SAMPLES / name).read_bytes()


# --- the real samples ------------------------------------------------------------------

HE_36_DISK = Disk(
    disk_id="05f1031c-6c9a-48c3-9a62-930984e52e11",
    image_id="1b52d184-a370-48a7-8335-a4755b01ec0a",
    volume_ids=("05f1031c-6c9a-48c3-9a62-930984e52e11",),
    domain_id="475e7578-33a2-474f-8647-aa46f01200f9",
    alias="virtio-disk0", description=None,
    size=50 * GIB, actual_size=2 * GIB, format="RAW", interface="IDE",
    boot=False, read_only=False, shareable=False, lun_guid=None, storage_type="IMAGE",
)
HE_36_SNAPSHOTS = (
    Snapshot("47093b30-ef1b-4b7f-be3e-d2421fe7c6ef", "ACTIVE", "Active VM snapshot",
             "2015/06/12 08:01:11"),
    Snapshot("04d0a7b2-17b9-4b19-a749-6715e353d9c6", "NEXT_RUN",
             "Next Run configuration snapshot", "2015/06/13 20:03:58"),
)
HE_36 = Entity(
    id="50e59bbd-f829-4761-ba1b-6db1a6acc3b8", name="HostedEngine", type="VM",
    description=None, os="other_linux", architecture="x86_64",
    memory_mb=4096, cpus=1, max_cpus=None, creation_date="2015/06/12 08:01:11",
    template_id=BLANK, template_name="Blank", origin=6,
    snapshots=HE_36_SNAPSHOTS, disks=(HE_36_DISK,),
)

EXPECTED: dict[str, Entity] = {
    "he-ha-ovf_test-3.6.ovf": HE_36,
    # Same VM plus <rasd:max_num_of_vcpus>16</rasd:max_num_of_vcpus>.
    "he-ha-ovf_test_max_vcpu-3.6.ovf": Entity(
        id="50e59bbd-f829-4761-ba1b-6db1a6acc3b8", name="HostedEngine", type="VM",
        description=None, os="other_linux", architecture="x86_64",
        memory_mb=4096, cpus=1, max_cpus=16, creation_date="2015/06/12 08:01:11",
        template_id=BLANK, template_name="Blank", origin=6,
        snapshots=HE_36_SNAPSHOTS, disks=(HE_36_DISK,),
    ),
    "he-ha-ovf_test_v4.2.ovf": Entity(
        id="eccb9cb6-affd-4806-8200-708370581227", name="HostedEngine", type="VM",
        description=None, os="other_linux", architecture="x86_64",
        memory_mb=16384, cpus=12, max_cpus=16, creation_date="2018/02/26 17:17:31",
        template_id=BLANK, template_name="Blank", origin=6,
        snapshots=(Snapshot("a1638d3b-9eb4-47c6-8f4c-bb5eff43b54c", "ACTIVE", "Active VM",
                            "2018/02/26 17:17:31"),),
        disks=(Disk(
            disk_id="3ab9fff0-9aa1-4c2e-ad67-5e25d05cb86e",
            image_id="69a2b8c2-8d1c-4014-8f75-a85c16bc5b71",
            volume_ids=("3ab9fff0-9aa1-4c2e-ad67-5e25d05cb86e",),
            domain_id="ce880525-a44b-4248-8b63-d9e11b2f123a",
            alias="virtio-disk0", description=None,
            size=60 * GIB, actual_size=9 * GIB, format="RAW", interface="VirtIO",
            boot=False, read_only=False, shareable=False, lun_guid=None, storage_type="IMAGE",
        ),),
    ),
    # OVF namespace without the trailing slash.
    "he-ha-ovf_test_v4.2_unsafe.ovf": Entity(
        id="b4491372-8f8a-4e08-8524-f8fb986a548a", name="HostedEngine", type="VM",
        description=None, os="rhel_7x64", architecture="x86_64",
        memory_mb=4096, cpus=4, max_cpus=64, creation_date="2017/11/29 14:46:44",
        template_id=BLANK, template_name="Blank", origin=6,
        snapshots=(Snapshot("4e10e583-9880-40c4-9655-34b0586f2cca", "ACTIVE", "Active VM",
                            "2017/11/29 14:46:44"),),
        disks=(Disk(
            disk_id="81487a81-d27d-41b8-b3d1-139d38437f42",
            image_id="add49103-89de-4a7e-b22f-9768a324b8f9",
            volume_ids=("81487a81-d27d-41b8-b3d1-139d38437f42",),
            domain_id="1f71b5f9-5cfa-459c-8ec2-ee48c9731f60",
            alias="he_virtio_disk", description=None,
            size=50 * GIB, actual_size=3 * GIB, format="COW", interface="VirtIO",
            boot=False, read_only=False, shareable=False, lun_guid=None, storage_type="IMAGE",
        ),),
    ),
    # One image disk and one direct LUN (File disk_storage_type="LUN", lun_id, no Item).
    "engine-vmOvfData-vm-lun-snapshots.ovf": Entity(
        id="70f24c82-a7b8-4e0b-9192-cffd5705cf5c", name="exporttedVM", type="VM",
        description="fsdf", os="Unassigned", architecture="x86_64",
        memory_mb=1024, cpus=1, max_cpus=None, creation_date="2013/05/27 14:44:12",
        template_id=BLANK, template_name="Blank", origin=0,
        snapshots=(
            Snapshot("b60fcbad-d65a-4248-ae32-7f9411276df0", "ACTIVE", "Active VM",
                     "2013/05/27 14:44:12"),
            Snapshot("22eab740-c6ec-4edb-b417-c4ad9efe628a", "REGULAR", "snap",
                     "2017/09/10 13:22:45",
                     # <Memory> items 2 and 4: the memory dump and metadata disks
                     ("478f4e8d-48e1-4265-82dd-a7844b61d6cb",
                      "1fc95389-c167-42c5-8ef6-720f4f369331")),
        ),
        disks=(
            Disk(
                disk_id="f934b12c-1e22-4ad8-bbce-ec0b2a5defa4",
                image_id="8c634412-1e8b-4ef3-bc40-b67a456e9d2f",
                volume_ids=("f934b12c-1e22-4ad8-bbce-ec0b2a5defa4",),
                domain_id="7e2a7eac-3b76-4d45-a7dd-caae8fe0f588",
                alias="exporttedVM_Disk1", description=None,
                size=1 * GIB, actual_size=0, format="RAW", interface="VirtIO",
                boot=True, read_only=False, shareable=False, lun_guid=None,
                storage_type="IMAGE",
            ),
            Disk(
                disk_id="eb331cad-8842-48d9-9c56-40b893dc8b1e", image_id=None, volume_ids=(),
                domain_id=None, alias="MAorTestOnlyLun_Disk1", description="ef7c",
                size=5 * GIB,  # ovf:device_size="5"
                actual_size=None, format=None, interface="VirtIO_SCSI",
                boot=True, read_only=False, shareable=False,
                lun_guid="36001405bb1b5071cfb44a4e9576aef7c", storage_type="LUN",
            ),
        ),
    ),
    # virt-v2v, engine layout: ovf:capacity in bytes next to ovf:size in GiB, no snapshots.
    "engine-vmOvfData2-virt-v2v-vm.ovf": Entity(
        id="4a6237d9-05a0-4d5a-a7b1-ff01764a761f", name="sevenofnine", type="VM",
        description="generated by virt-v2v 2.3.4rhel=9,release=5.el9",
        os="windows_2019x64", architecture="x86_64",
        memory_mb=16384, cpus=8, max_cpus=None, creation_date="2023/10/26 20:56:35",
        template_id=BLANK, template_name="Blank", origin=1, snapshots=(),
        disks=(Disk(
            disk_id="e562465d-dc03-427f-8cc9-20fc1055424f",
            image_id="752b9199-8083-4e60-9be2-b2f13f54790f",
            volume_ids=("e562465d-dc03-427f-8cc9-20fc1055424f",),
            domain_id="dfe7c94d-f724-4bbc-9156-d47761f417c6",
            alias=None, description=None,
            size=214748364800, actual_size=None, format="RAW", interface="IDE",
            boot=True, read_only=False, shareable=False, lun_guid=None, storage_type="IMAGE",
        ),),
    ),
    # virt-v2v OVA-style layout: VirtualSystem ovf:id, diskId = the disk, fileRef = the
    # volume, StorageId left blank.
    "ost-virt-v2v-ova-style-test-vm.ovf": Entity(
        id="59f5dd98-212f-4324-9081-44c198c6653a", name="test-vm", type="VM",
        description="generated by virt-v2v 1.36.10rhel=7,release=6.16.rhvpreview.el7ev,libvirt",
        os="rhel_7x64", architecture="x86_64",
        memory_mb=2048, cpus=1, max_cpus=None, creation_date="2018/09/07 13:06:14",
        template_id=BLANK, template_name="Blank", origin=1, snapshots=(),
        disks=(Disk(
            disk_id="d551fb7d-de0a-4e25-bc4e-b1e0d5b14afc",
            image_id="d551fb7d-de0a-4e25-bc4e-b1e0d5b14afc",
            volume_ids=("99116050-8859-43a6-9399-7c08ae458e3b",),
            domain_id=None,
            alias=None, description=None,
            size=42949672960, actual_size=40 * GIB, format="RAW", interface="VirtIO",
            boot=True, read_only=False, shareable=False, lun_guid=None, storage_type="IMAGE",
        ),),
    ),
}


@needs_samples
def test_every_sample_has_expectations() -> None:
    assert sorted(p.name for p in SAMPLES.glob("*.ovf")) == sorted(EXPECTED)


@needs_samples
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_sample(name: str) -> None:
    assert parse(sample(name)) == EXPECTED[name]


# What ovf2VmParams_test.py expects the HA agent to read from the same files:
# vmId, vmName, memSize, smp, maxVCpus, and imageID/volumeID/domainID/format/iface of the disk.
HA_AGENT_EXPECTATIONS = {
    "he-ha-ovf_test-3.6.ovf": (
        "50e59bbd-f829-4761-ba1b-6db1a6acc3b8", "HostedEngine", 4096, 1, None,
        "1b52d184-a370-48a7-8335-a4755b01ec0a", "05f1031c-6c9a-48c3-9a62-930984e52e11",
        "475e7578-33a2-474f-8647-aa46f01200f9", "raw", "ide"),
    "he-ha-ovf_test_max_vcpu-3.6.ovf": (
        "50e59bbd-f829-4761-ba1b-6db1a6acc3b8", "HostedEngine", 4096, 1, 16,
        "1b52d184-a370-48a7-8335-a4755b01ec0a", "05f1031c-6c9a-48c3-9a62-930984e52e11",
        "475e7578-33a2-474f-8647-aa46f01200f9", "raw", "ide"),
    "he-ha-ovf_test_v4.2.ovf": (
        "eccb9cb6-affd-4806-8200-708370581227", "HostedEngine", 16384, 12, 16,
        "69a2b8c2-8d1c-4014-8f75-a85c16bc5b71", "3ab9fff0-9aa1-4c2e-ad67-5e25d05cb86e",
        "ce880525-a44b-4248-8b63-d9e11b2f123a", "raw", "virtio"),
    "he-ha-ovf_test_v4.2_unsafe.ovf": (
        "b4491372-8f8a-4e08-8524-f8fb986a548a", "HostedEngine", 4096, 4, 64,
        "add49103-89de-4a7e-b22f-9768a324b8f9", "81487a81-d27d-41b8-b3d1-139d38437f42",
        "1f71b5f9-5cfa-459c-8ec2-ee48c9731f60", "cow", "virtio"),
}


@needs_samples
@pytest.mark.parametrize("name", sorted(HA_AGENT_EXPECTATIONS))
def test_hosted_engine_samples_agree_with_the_ha_agent(name: str) -> None:
    entity = parse(sample(name))
    (disk,) = entity.disks
    assert disk.format is not None and disk.interface is not None
    got = (entity.id, entity.name, entity.memory_mb, entity.cpus, entity.max_cpus,
           disk.image_id, disk.volume_ids[-1], disk.domain_id, disk.format.lower(),
           disk.interface.lower())
    assert got == HA_AGENT_EXPECTATIONS[name]


@needs_samples
@pytest.mark.parametrize(("name", "old", "new"), [
    ("he-ha-ovf_test-3.6.ovf", NS_SLASH, NS_NO_SLASH),
    ("he-ha-ovf_test_v4.2_unsafe.ovf", NS_NO_SLASH, NS_SLASH),
    ("ost-virt-v2v-ova-style-test-vm.ovf", NS_SLASH, NS_NO_SLASH),
])
def test_either_namespace_spelling(name: str, old: str, new: str) -> None:
    data = sample(name)
    for quote in (b'"', b"'"):
        data = data.replace(b"xmlns:ovf=" + quote + old.encode() + quote,
                            b"xmlns:ovf=" + quote + new.encode() + quote)
    assert new.encode() + b'"' in data or new.encode() + b"'" in data
    assert parse(data) == EXPECTED[name]


@needs_samples
def test_to_dict_is_json_with_camel_case_keys() -> None:
    d = json.loads(json.dumps(parse(sample("engine-vmOvfData-vm-lun-snapshots.ovf")).to_dict()))
    assert list(d) == ["id", "name", "type", "description", "os", "architecture", "memory",
                       "cpus", "maxCpus", "creationDate", "templateId", "templateName",
                       "origin", "snapshots", "disks"]
    assert d["memory"] == 1024
    assert d["snapshots"][1] == {"id": "22eab740-c6ec-4edb-b417-c4ad9efe628a",
                                 "type": "REGULAR", "description": "snap",
                                 "creationDate": "2017/09/10 13:22:45",
                                 "memoryDisks": ["478f4e8d-48e1-4265-82dd-a7844b61d6cb",
                                                 "1fc95389-c167-42c5-8ef6-720f4f369331"]}
    assert d["disks"][0]["volumeIds"] == ["f934b12c-1e22-4ad8-bbce-ec0b2a5defa4"]
    assert d["disks"][1] == {
        "diskId": "eb331cad-8842-48d9-9c56-40b893dc8b1e", "imageId": None, "volumeIds": [],
        "domainId": None, "alias": "MAorTestOnlyLun_Disk1", "description": "ef7c",
        "size": 5 * GIB, "actualSize": None, "format": None, "interface": "VirtIO_SCSI",
        "boot": True, "readOnly": False, "shareable": False,
        "lunGuid": "36001405bb1b5071cfb44a4e9576aef7c", "storageType": "LUN", "volumeSnapshots": {},
    }


# --- synthetic engine-layout documents -------------------------------------------------

VM_ID = "3f2504e0-4f89-41d3-9a0c-0305e82c3301"
IMG = "a1b2c3d4-0000-4000-8000-000000000001"
BASE = "b0000000-0000-4000-8000-000000000001"
MID = "b0000000-0000-4000-8000-000000000002"
LEAF = "b0000000-0000-4000-8000-000000000003"
SD = "5d000000-0000-4000-8000-0000000000aa"
SNAP_ACTIVE = "5a000000-0000-4000-8000-000000000001"
SNAP_OLD = "5a000000-0000-4000-8000-000000000002"


def engine_ovf(*, files: str = "", disks: str = "", general: str = "", os_id: str = VM_ID,
               os_name: str = "rhel_8x64", items: str = "", sections: str = "",
               memory_units: str = "MegaBytes", memory: str = "4096",
               ns: str = NS_SLASH) -> bytes:
    return f"""<?xml version='1.0' encoding='UTF-8'?>
<ovf:Envelope xmlns:ovf="{ns}"
  xmlns:rasd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData"
  xmlns:vssd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_VirtualSystemSettingData"
  xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" ovf:version="4.4.0.0">
  <References>{files}</References>
  <NetworkSection><Info>List of networks</Info></NetworkSection>
  <Section xsi:type="ovf:DiskSection_Type"><Info>List of Virtual Disks</Info>{disks}</Section>
  <Content ovf:id="out" xsi:type="ovf:VirtualSystem_Type">
    {general}
    <Section xsi:type="ovf:AffinityGroupsSection_Type"><AffinityGroup ovf:name="a"/></Section>
    <Section ovf:id="{os_id}" ovf:required="false" xsi:type="ovf:OperatingSystemSection_Type">
      <Info>Guest Operating System</Info><Description>{os_name}</Description>
    </Section>
    <Section xsi:type="ovf:VirtualHardwareSection_Type">
      <Info>8 CPU, 4096 Memory</Info>
      <System><vssd:VirtualSystemType>ENGINE 4.4.0.0</vssd:VirtualSystemType></System>
      <Item>
        <rasd:Caption>8 virtual cpu</rasd:Caption>
        <rasd:InstanceId>1</rasd:InstanceId>
        <rasd:ResourceType>3</rasd:ResourceType>
        <rasd:num_of_sockets>2</rasd:num_of_sockets>
        <rasd:cpu_per_socket>2</rasd:cpu_per_socket>
        <rasd:threads_per_cpu>2</rasd:threads_per_cpu>
        <rasd:max_num_of_vcpus>32</rasd:max_num_of_vcpus>
        <rasd:VirtualQuantity>8</rasd:VirtualQuantity>
      </Item>
      <Item>
        <rasd:InstanceId>2</rasd:InstanceId>
        <rasd:ResourceType>4</rasd:ResourceType>
        <rasd:AllocationUnits>{memory_units}</rasd:AllocationUnits>
        <rasd:VirtualQuantity>{memory}</rasd:VirtualQuantity>
      </Item>
      {items}
    </Section>
    {sections}
  </Content>
</ovf:Envelope>
""".encode()


def image_volume(volume: str, parent: str | None, *, snapshot: str = SNAP_ACTIVE,
                 volume_format: str = "COW", size: str = "10", actual: str = "1",
                 alias: str = "vm_Disk1") -> tuple[str, str, str]:
    """File, Disk and Item of one volume of IMG, as the engine writes them."""
    parent_ref = f"{IMG}/{parent}" if parent else ""
    file = (f'<File ovf:href="{IMG}/{volume}" ovf:id="{volume}" ovf:size="1073741824" '
            f'ovf:description="Active VM" ovf:disk_storage_type="IMAGE"/>')
    disk = (f'<Disk ovf:diskId="{volume}" ovf:size="{size}" ovf:actual_size="{actual}" '
            f'ovf:vm_snapshot_id="{snapshot}" ovf:parentRef="{parent_ref}" '
            f'ovf:fileRef="{IMG}/{volume}" ovf:volume-format="{volume_format}" '
            f'ovf:volume-type="Sparse" ovf:disk-interface="VirtIO_SCSI" ovf:read-only="false" '
            f'ovf:shareable="false" ovf:boot="true" ovf:disk-alias="{alias}" '
            f'ovf:disk-description="root disk"/>')
    item = (f"<Item><rasd:Caption>{alias}</rasd:Caption>"
            f"<rasd:InstanceId>{volume}</rasd:InstanceId>"
            f"<rasd:ResourceType>17</rasd:ResourceType>"
            f"<rasd:HostResource>{IMG}/{volume}</rasd:HostResource>"
            f"<rasd:Parent>{parent or BLANK}</rasd:Parent>"
            f"<rasd:StorageId>{SD}</rasd:StorageId>"
            f"<Type>disk</Type><Device>disk</Device></Item>")
    return file, disk, item


SNAPSHOTS_SECTION = f"""
    <Section xsi:type="ovf:SnapshotsSection_Type">
      <Snapshot ovf:id="{SNAP_ACTIVE}"><Type>ACTIVE</Type><Description>Active VM</Description>
        <CreationDate>2024/01/02 03:04:05</CreationDate></Snapshot>
      <Snapshot ovf:id="{SNAP_OLD}"><Type>REGULAR</Type><Description>before upgrade</Description>
        <CreationDate>2024/01/01 00:00:00</CreationDate></Snapshot>
    </Section>"""


def chain_ovf(order: tuple[str, ...], *, parent_refs: bool = True) -> bytes:
    """A VM whose one image has the chain BASE <- MID <- LEAF, listed in `order`."""
    parents = {BASE: None, MID: BASE, LEAF: MID}
    volumes = {
        BASE: image_volume(BASE, None, snapshot=SNAP_OLD, volume_format="RAW", actual="4",
                           alias="base"),
        MID: image_volume(MID, BASE, snapshot=SNAP_OLD, actual="2", alias="mid"),
        LEAF: image_volume(LEAF, MID, size="20", actual="1"),
    }
    disks = "".join(volumes[v][1] for v in order)
    if not parent_refs:
        for volume in order:
            if parents[volume]:
                disks = disks.replace(f'ovf:parentRef="{IMG}/{parents[volume]}"',
                                      'ovf:parentRef=""')
    return engine_ovf(
        files="".join(volumes[v][0] for v in order), disks=disks,
        items="".join(volumes[v][2] for v in order),
        general="<Name>chained</Name><TemplateId>" + BLANK + "</TemplateId>",
        sections=SNAPSHOTS_SECTION,
    )


LEAF_DISK = Disk(
    disk_id=LEAF, image_id=IMG, volume_ids=(BASE, MID, LEAF), domain_id=SD, alias="vm_Disk1",
    description="root disk", size=20 * GIB, actual_size=1 * GIB, format="COW",
    interface="VirtIO_SCSI", boot=True, read_only=False, shareable=False, lun_guid=None,
    storage_type="IMAGE",
)


@pytest.mark.parametrize("order", [(BASE, MID, LEAF), (LEAF, BASE, MID), (MID, LEAF, BASE)])
def test_snapshot_chain_folds_into_one_disk_described_by_its_leaf(order: tuple[str, ...]) -> None:
    entity = parse(chain_ovf(order))
    assert entity.disks == (LEAF_DISK,)
    assert entity.snapshots == (
        Snapshot(SNAP_ACTIVE, "ACTIVE", "Active VM", "2024/01/02 03:04:05"),
        Snapshot(SNAP_OLD, "REGULAR", "before upgrade", "2024/01/01 00:00:00"),
    )
    assert (entity.cpus, entity.max_cpus, entity.memory_mb) == (8, 32, 4096)


def test_chain_from_rasd_parent_when_parent_ref_is_empty() -> None:
    assert parse(chain_ovf((LEAF, MID, BASE), parent_refs=False)).disks == (LEAF_DISK,)


def test_two_leaves_prefer_the_active_snapshot() -> None:
    # A broken chain: MID's parent (BASE) is listed, LEAF names no parent.
    _, base_disk, _ = image_volume(BASE, None, snapshot=SNAP_OLD, alias="base")
    _, leaf_disk, _ = image_volume(LEAF, None, alias="leaf")
    _, mid_disk, _ = image_volume(MID, BASE, snapshot=SNAP_OLD, alias="mid")
    data = engine_ovf(disks=leaf_disk + base_disk + mid_disk, sections=SNAPSHOTS_SECTION)
    (disk,) = parse(data).disks
    assert disk.alias == "leaf"
    assert disk.volume_ids == (BASE, MID, LEAF)


def test_lun_disk_without_lun_id_uses_the_disk_id() -> None:
    lun = "1e000000-0000-4000-8000-000000000001"
    file_, disk, item = image_volume(LEAF, None)
    data = engine_ovf(
        files=file_ + f'<File ovf:id="{lun}" ovf:href="{lun}" ovf:disk_storage_type="LUN"/>',
        disks=disk + f'<Disk ovf:diskId="{lun}" ovf:fileRef="{lun}" ovf:shareable="true" '
                     f'ovf:boot="false" ovf:disk-interface="VirtIO" ovf:read-only="true">'
                     '<Connection ovf:connection="192.0.2.1" ovf:iqn="iqn.x:y" ovf:port="3260" '
                     'xsi:storage_type="ISCSI" xsi:portal="1"/></Disk>',
        items=item,
    )
    image_disk, lun_disk = parse(data).disks
    assert image_disk.volume_ids == (LEAF,)
    assert lun_disk == Disk(
        disk_id=lun, image_id=None, volume_ids=(), domain_id=None, alias=None,
        description=None, size=None, actual_size=None, format=None, interface="VirtIO",
        boot=False, read_only=True, shareable=True, lun_guid=lun, storage_type="LUN",
    )


TEMPLATE_ID = "7e000000-0000-4000-8000-000000000001"


def test_template_by_template_type() -> None:
    # As OvfTemplateWriter writes it: TemplateId is the template's own id, TemplateType set.
    file_, disk, item = image_volume(LEAF, None)
    data = engine_ovf(
        files=file_, disks=disk, items=item, os_id=TEMPLATE_ID, os_name="rhel_9x64",
        general=f"""<Name>rhel9-golden</Name><Description>golden image</Description>
          <CreationDate>2024/05/06 07:08:09</CreationDate>
          <TemplateId>{TEMPLATE_ID}</TemplateId><TemplateName>rhel9-golden</TemplateName>
          <Origin>0</Origin><default_display_type>1</default_display_type>
          <IsDisabled>false</IsDisabled><TemplateType>TEMPLATE</TemplateType>
          <BaseTemplateId>{TEMPLATE_ID}</BaseTemplateId>
          <TemplateVersionNumber>1</TemplateVersionNumber>""",
    )
    entity = parse(data)
    assert (entity.id, entity.name, entity.type, entity.description) == (
        TEMPLATE_ID, "rhel9-golden", "TEMPLATE", "golden image")
    assert (entity.template_id, entity.template_name, entity.origin, entity.creation_date) == (
        TEMPLATE_ID, "rhel9-golden", 0, "2024/05/06 07:08:09")
    assert entity.snapshots == ()
    assert entity.disks == (dataclasses.replace(LEAF_DISK, volume_ids=(LEAF,), size=10 * GIB),)


def test_template_by_own_template_id_without_template_type() -> None:
    data = engine_ovf(os_id=TEMPLATE_ID,
                      general=f"<TemplateId>{TEMPLATE_ID.upper()}</TemplateId>")
    assert parse(data).type == "TEMPLATE"


def test_vm_made_from_a_template_is_a_vm() -> None:
    data = engine_ovf(general=f"<TemplateId>{TEMPLATE_ID}</TemplateId>"
                              "<TemplateName>rhel9-golden</TemplateName>")
    entity = parse(data)
    assert (entity.type, entity.template_id) == ("VM", TEMPLATE_ID)


def test_entity_id_is_lower_case() -> None:
    assert parse(engine_ovf(os_id=VM_ID.upper())).id == VM_ID


@pytest.mark.parametrize(("os_name", "arch"), [
    ("rhel_7x64", "x86_64"), ("rhel_8_ppc64", "ppc64"), ("rhel_7ppc64le", "ppc64"),
    ("rhel_8_s390x", "s390x"), ("other", "x86_64"),
])
def test_architecture_from_os(os_name: str, arch: str) -> None:
    assert parse(engine_ovf(os_name=os_name)).architecture == arch


def test_missing_optional_data_is_none() -> None:
    data = f"""<ovf:Envelope xmlns:ovf="{NS_SLASH}"
      xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance">
      <Content xsi:type="ovf:VirtualSystem_Type">
        <Section ovf:id="{VM_ID}" xsi:type="ovf:OperatingSystemSection_Type"/>
      </Content></ovf:Envelope>""".encode()
    assert parse(data) == Entity(
        id=VM_ID, name=None, type="VM", description=None, os=None, architecture=None,
        memory_mb=None, cpus=None, max_cpus=None, creation_date=None, template_id=None,
        template_name=None, origin=None, snapshots=(), disks=())


def test_lenient_numbers() -> None:
    # Old virt-v2v wrote decimal GiB; junk numbers become None, not errors.
    disk = (f'<Disk ovf:diskId="{LEAF}" ovf:fileRef="{IMG}/{LEAF}" ovf:size="40.5" '
            'ovf:actual_size="lots" ovf:volume-format="Unassigned" '
            'ovf:format="http://www.gnome.org/~markmc/qcow-image-format.html"/>')
    data = engine_ovf(disks=disk, general="<Origin>x</Origin>", memory="9" * 5000)
    entity = parse(data)
    (parsed,) = entity.disks
    assert (parsed.size, parsed.actual_size, parsed.format) == (int(40.5 * GIB), None, "COW")
    assert (parsed.boot, parsed.read_only, parsed.shareable) == (False, False, False)
    assert (entity.origin, entity.memory_mb) == (None, None)
    for size in ("1e308", "nan", "-1", "1" * 5000):
        (parsed,) = parse(engine_ovf(disks=disk.replace('"40.5"', f'"{size}"'))).disks
        assert parsed.size is None


@pytest.mark.parametrize(("units", "quantity", "expected"), [
    ("MegaBytes", "2048", 2048),
    ("byte * 2^20", "2048", 2048),
    ("byte * 2^30", "4", 4096),
    ("GigaBytes", "2", 2048),
    ("KiloBytes", "1048576", 1024),
    ("furlongs", "512", 512),  # not understood: MiB, as the engine assumes
])
def test_memory_allocation_units(units: str, quantity: str, expected: int) -> None:
    assert parse(engine_ovf(memory_units=units, memory=quantity)).memory_mb == expected


def test_cpus_fall_back_to_virtual_quantity() -> None:
    data = engine_ovf()
    for tag in (b"num_of_sockets", b"cpu_per_socket", b"threads_per_cpu"):
        start = data.index(b"<rasd:" + tag)
        end = data.index(b"</rasd:" + tag + b">") + len(tag) + 8
        data = data[:start] + data[end:]
    assert parse(data).cpus == 8


# --- OVA-style layout --------------------------------------------------------------------

OVA_DISK = "d1000000-0000-4000-8000-000000000001"
OVA_VOLUME = "0f000000-0000-4000-8000-000000000001"

# As the engine's OvfOvaWriter writes it: default namespace, rasd:InstanceID, ovf:capacity in
# GiB with its units, populatedSize in bytes, the OS section's ovf:id a DMTF OS number.
OVA_EXPORT = f"""<?xml version='1.0' encoding='UTF-8'?>
<Envelope xmlns="{NS_NO_SLASH}" xmlns:ovf="{NS_NO_SLASH}" xmlns:ovirt="http://www.ovirt.org/ovf"
  xmlns:rasd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData"
  xmlns:vssd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_VirtualSystemSettingData"
  xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" ovf:version="4.4.0.0">
  <References><File ovf:href="{OVA_VOLUME}" ovf:id="{OVA_VOLUME}" ovf:size="123456"/></References>
  <DiskSection><Info>List of Virtual Disks</Info>
    <Disk ovf:diskId="{OVA_DISK}" ovf:capacity="8" ovf:capacityAllocationUnits="byte * 2^30"
      ovf:populatedSize="123456" ovf:parentRef="" ovf:fileRef="{OVA_VOLUME}"
      ovf:format="http://www.gnome.org/~markmc/qcow-image-format.html" ovf:volume-format="COW"
      ovf:volume-type="Sparse" ovf:disk-interface="VirtIO" ovf:boot="true"
      ovf:pass-discard="false" ovf:disk-alias="exported_Disk1" ovf:wipe-after-delete="false"
      ovf:description="Active VM" ovf:disk_storage_type="IMAGE" ovf:cinder_volume_type=""/>
  </DiskSection>
  <VirtualSystem ovf:id="{VM_ID.upper()}">
    <Name>exported</Name><TemplateId>{BLANK}</TemplateId><TemplateName>Blank</TemplateName>
    <CreationDate>2024/02/03 04:05:06</CreationDate><Origin>3</Origin>
    <OperatingSystemSection ovf:id="80" ovirt:id="24" ovf:required="false">
      <Info>Guest Operating System</Info><Description>Red Hat Enterprise Linux 7.x x64</Description>
    </OperatingSystemSection>
    <VirtualHardwareSection><Info>2 CPU, 1024 Memory</Info>
      <Item><rasd:Caption>2 virtual cpu</rasd:Caption><rasd:InstanceID>1</rasd:InstanceID>
        <rasd:ResourceType>3</rasd:ResourceType><rasd:num_of_sockets>2</rasd:num_of_sockets>
        <rasd:cpu_per_socket>1</rasd:cpu_per_socket><rasd:threads_per_cpu>1</rasd:threads_per_cpu>
        <rasd:max_num_of_vcpus>16</rasd:max_num_of_vcpus>
        <rasd:VirtualQuantity>2</rasd:VirtualQuantity></Item>
      <Item><rasd:InstanceID>2</rasd:InstanceID><rasd:ResourceType>4</rasd:ResourceType>
        <rasd:AllocationUnits>MegaBytes</rasd:AllocationUnits>
        <rasd:VirtualQuantity>1024</rasd:VirtualQuantity></Item>
      <Item><rasd:Caption>exported_Disk1</rasd:Caption>
        <rasd:InstanceID>{OVA_VOLUME}</rasd:InstanceID><rasd:ResourceType>17</rasd:ResourceType>
        <rasd:HostResource>ovf:/disk/{OVA_DISK}</rasd:HostResource>
        <rasd:Parent>{BLANK}</rasd:Parent><rasd:StorageId>{SD}</rasd:StorageId></Item>
    </VirtualHardwareSection>
  </VirtualSystem>
</Envelope>
""".encode()


def test_ova_export_layout() -> None:
    assert parse(OVA_EXPORT) == Entity(
        id=VM_ID, name="exported", type="VM", description=None,
        os="Red Hat Enterprise Linux 7.x x64", architecture="x86_64",
        memory_mb=1024, cpus=2, max_cpus=16, creation_date="2024/02/03 04:05:06",
        template_id=BLANK, template_name="Blank", origin=3, snapshots=(),
        disks=(Disk(
            disk_id=OVA_DISK, image_id=OVA_DISK, volume_ids=(OVA_VOLUME,), domain_id=SD,
            alias="exported_Disk1", description=None, size=8 * GIB, actual_size=123456,
            format="COW", interface="VirtIO", boot=True, read_only=False, shareable=False,
            lun_guid=None, storage_type="IMAGE",
        ),),
    )


def test_ova_os_falls_back_to_ovirt_id() -> None:
    data = OVA_EXPORT.replace(b"<Description>Red Hat Enterprise Linux 7.x x64</Description>",
                              b"")
    assert parse(data).os == "24"


# --- structure we cannot interpret -------------------------------------------------------


@pytest.mark.parametrize(("data", "message"), [
    (engine_ovf(os_id="out"), "not a UUID"),
    (engine_ovf().replace(b"ovf:OperatingSystemSection_Type", b"ovf:Other_Type"), "missing"),
    (engine_ovf().replace(b"ovf:VirtualSystem_Type", b"ovf:VirtualSystemCollection_Type"),
     "no virtual system"),
    (engine_ovf(disks=f'<Disk ovf:fileRef="{IMG}/{LEAF}"/>'), "without ovf:diskId"),
    (engine_ovf(sections='<Section xsi:type="ovf:SnapshotsSection_Type"><Snapshot>'
                         "<Type>ACTIVE</Type></Snapshot></Section>"), "without ovf:id"),
])
def test_uninterpretable_structure(data: bytes, message: str) -> None:
    with pytest.raises(OvfError, match=message):
        parse(data)


# --- hostile and broken input ------------------------------------------------------------

XXE = f"""<?xml version="1.0"?>
<!DOCTYPE x [<!ENTITY e SYSTEM "file:///etc/passwd">]>
<ovf:Envelope xmlns:ovf="{NS_SLASH}" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance">
  <Content xsi:type="ovf:VirtualSystem_Type"><Name>&e;</Name>
    <Section ovf:id="{VM_ID}" xsi:type="ovf:OperatingSystemSection_Type"/></Content>
</ovf:Envelope>""".encode()

BILLION_LAUGHS = (
    b'<?xml version="1.0"?>\n<!DOCTYPE lolz [\n <!ENTITY lol "lol">\n'
    + b"".join(
        f' <!ENTITY lol{i} "{("&lol" + (str(i - 1) if i > 1 else "") + ";") * 10}">\n'.encode()
        for i in range(1, 10))
    + f']>\n<ovf:Envelope xmlns:ovf="{NS_SLASH}"><Name>&lol9;</Name></ovf:Envelope>'.encode()
)

EXTERNAL_DTD = (b'<?xml version="1.0"?>\n<!DOCTYPE x SYSTEM "http://127.0.0.1:9/x.dtd">\n'
                + f'<ovf:Envelope xmlns:ovf="{NS_SLASH}"/>'.encode())


@pytest.mark.parametrize("data", [XXE, BILLION_LAUGHS, EXTERNAL_DTD],
                         ids=["xxe", "billion-laughs", "external-dtd"])
def test_dtd_is_refused(data: bytes) -> None:
    # Refused on sight of the DTD markup: nothing is ever expanded or fetched.
    with pytest.raises(OvfError, match="DTD"):
        parse(data)
    with pytest.raises(OvfError, match="DTD"):
        OvfValidator().feed(data)


def test_doctype_hidden_by_another_encoding_is_refused() -> None:
    # Decoded as declared, this is an XXE reading a local file; we always decode UTF-8.
    utf7 = (b'<?xml version="1.0" encoding="UTF-7"?>+ADw-!DOCTYPE x +AFs-+ADw-!ENTITY e '
            b"SYSTEM +ACI-file:///etc/passwd+ACI-+AD4-+AF0-+AD4-+ADw-x+AD4-+ACY-e;+ADw-/x+AD4-")
    utf16 = XXE.replace(b'<?xml version="1.0"?>', b'<?xml version="1.0" encoding="UTF-16"?>')
    for data in (utf7, utf16.decode().encode("utf-16")):
        with pytest.raises(OvfError):
            parse(data)
        validator = OvfValidator()
        with pytest.raises(OvfError):
            validator.feed(data)
            validator.close()


def test_doctype_in_a_parsed_tree_is_refused() -> None:
    # Defence in depth behind the byte scan.
    root = etree.fromstring(b"<!DOCTYPE x><x/>")
    with pytest.raises(OvfError, match="DTD"):
        safexml._envelope_namespace(root)


@pytest.mark.parametrize(("first", "second"), [
    (b'<?xml version="1.0"?>\n<!DOC', b'TYPE x [<!ENTITY e SYSTEM "file:///etc/passwd">]>'),
    (b'<?xml version="1.0"?>\n<', b"!DOCTYPE x>"),
    (f'<ovf:Envelope xmlns:ovf="{NS_SLASH}"><!EN'.encode(), b'TITY e "x">'),
])
def test_dtd_markup_split_across_chunks_is_refused_before_feeding(first: bytes,
                                                                  second: bytes) -> None:
    validator = OvfValidator()
    validator.feed(first)
    with pytest.raises(OvfError, match="DTD"):
        validator.feed(second)
    with pytest.raises(OvfError, match="already refused"):
        validator.close()


def test_dtd_fed_byte_by_byte_is_refused_at_the_last_byte_of_the_marker() -> None:
    validator = OvfValidator()
    marker_end = XXE.index(b"<!DOCTYPE") + len(b"<!DOCTYPE")
    for i in range(marker_end - 1):
        validator.feed(XXE[i:i + 1])
    with pytest.raises(OvfError, match="DTD"):
        validator.feed(XXE[marker_end - 1:marker_end])


MALFORMED = [
    b"",
    b"not xml at all",
    f'<ovf:Envelope xmlns:ovf="{NS_SLASH}"><References>'.encode(),
    f'<ovf:Envelope xmlns:ovf="{NS_SLASH}"><a></b></ovf:Envelope>'.encode(),
    f'<ovf:Envelope xmlns:ovf="{NS_SLASH}">&undefined;</ovf:Envelope>'.encode(),
    b"\xff\xfe\x00garbage",
]


@pytest.mark.parametrize("data", MALFORMED)
def test_malformed_xml(data: bytes) -> None:
    with pytest.raises(OvfError, match="malformed"):
        parse(data)
    validator = OvfValidator()
    with pytest.raises(OvfError, match="malformed"):
        validator.feed(data)
        validator.close()


@needs_samples
def test_truncated_sample_is_malformed_and_the_parser_recovers() -> None:
    data = sample("he-ha-ovf_test_v4.2.ovf")
    with pytest.raises(OvfError, match="malformed"):
        parse(data[: len(data) // 2])
    assert parse(data) == EXPECTED["he-ha-ovf_test_v4.2.ovf"]


def test_error_messages_do_not_echo_the_input() -> None:
    huge_name = b"x" * 1_000_000
    for data in (b"<" + huge_name + b">", b"<" + huge_name + b"/>",
                 engine_ovf(os_id=huge_name.decode())):
        with pytest.raises(OvfError) as e:
            parse(data)
        assert len(str(e.value)) < 500


@pytest.mark.parametrize("data", [
    b"<Envelope/>",
    b'<ovf:Envelope xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/2/"/>',
    f'<ovf:Other xmlns:ovf="{NS_SLASH}"/>'.encode(),
    b"<html><body>not an ovf</body></html>",
])
def test_root_must_be_an_ovf_envelope(data: bytes) -> None:
    with pytest.raises(OvfError, match="not an OVF Envelope"):
        parse(data)
    # Refused as soon as the root start tag has arrived, at the latest on close.
    validator = OvfValidator()
    with pytest.raises(OvfError, match="not an OVF Envelope"):
        validator.feed(data)
        validator.close()


@needs_samples
def test_size_limit() -> None:
    data = sample("he-ha-ovf_test-3.6.ovf")
    # Whitespace broken up by comments: libxml2 refuses a single 10 MB text run by itself.
    padding = (b" " * (1024 * 1024 - 7) + b"<!---->") * (MAX_OVF_SIZE // (1024 * 1024))
    at_limit = data + padding[: MAX_OVF_SIZE - len(data)]
    assert len(at_limit) == MAX_OVF_SIZE
    assert parse(at_limit) == HE_36
    with pytest.raises(OvfError, match="limit"):
        parse(at_limit + b" ")

    validator = OvfValidator()
    chunk = 1024 * 1024
    validator.feed(data)
    for offset in range(len(data), MAX_OVF_SIZE, chunk):
        validator.feed(b" " * min(chunk, MAX_OVF_SIZE - offset))
    with pytest.raises(OvfError, match="limit"):
        validator.feed(b" ")


# --- streaming validation of good documents ---------------------------------------------


@needs_samples
@pytest.mark.parametrize("chunk", [1, 7, 4096, 1 << 20])
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_validator_accepts_samples_in_any_chunking(name: str, chunk: int) -> None:
    data = sample(name)
    validator = OvfValidator()
    for offset in range(0, len(data), chunk):
        validator.feed(data[offset:offset + chunk])
    validator.close()


def test_validator_accepts_synthetic_documents() -> None:
    for data in (OVA_EXPORT, chain_ovf((BASE, MID, LEAF))):
        validator = OvfValidator()
        validator.feed(data)
        validator.close()


def test_validator_cannot_be_reused() -> None:
    validator = OvfValidator()
    validator.feed(OVA_EXPORT)
    validator.close()
    with pytest.raises(OvfError, match="closed"):
        validator.feed(b" ")
    with pytest.raises(OvfError, match="closed"):
        validator.close()


@needs_samples
@pytest.mark.parametrize(("memory", "expected"), [
    # the engine's six GUIDs: dump domain, pool, dump disk, dump volume, metadata disk
    # and volume; only the disks (items 2 and 4) are kept, lower case
    ("A,B,478F4E8D-48E1-4265-82DD-A7844B61D6CB,v, 1fc95389-c167-42c5-8ef6-720f4f369331 ,w",
     ("478f4e8d-48e1-4265-82dd-a7844b61d6cb", "1fc95389-c167-42c5-8ef6-720f4f369331")),
    ("", ()),                                              # no memory
    ("a,b,478f4e8d-48e1-4265-82dd-a7844b61d6cb", ("478f4e8d-48e1-4265-82dd-a7844b61d6cb",)),
    (f"a,b,{BLANK},c,not-a-uuid,d", ()),                   # blank and junk name no disk
])
def test_snapshot_memory_disks(memory: str, expected: tuple[str, ...]) -> None:
    text = sample("engine-vmOvfData-vm-lun-snapshots.ovf").decode()
    start = text.index("<Memory>") + len("<Memory>")
    text = text[:start] + memory + text[text.index("</Memory>"):]
    snapshot = parse(text.encode()).snapshots[1]
    assert snapshot.memory_disks == expected
