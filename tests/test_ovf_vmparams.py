"""OVF -> VDSM legacy vmParams (`vdsmlite.ovf.vmparams`): real samples, upstream's
expectations, the HA agent's breakages fixed, refusals.

The expected values for the four hosted-engine samples are those of
ovirt-hosted-engine-ha's own test, ovirt_hosted_engine_ha/lib/ovf/ovf2VmParams_test.py
at commit 9d39eb07c03a3db75ff08bf57981b0e8fef9d7cb (the commit the samples come
from, see tests/data/ovf-samples/SOURCES.md). Where we differ on purpose it is said
at the assertion: top-level numbers are ints, addresses are dicts, keys without a
value are left out, the 3.6 disk's boot order is the OVF's 1 (upstream adds one),
and balloon devices are converted.
"""

from __future__ import annotations

import base64
import pickle
import re
from pathlib import Path
from typing import Any

import pytest
from lxml import etree

from tests.ovf_helpers import SAMPLES
from vdsmlite.errors import InvalidParameterException, OvfConversionError
from vdsmlite.ids import BLANK_UUID
from vdsmlite.ovf.vmparams import Conversion, convert
from vdsmlite.virt.definition import LunSource, VolumeSource
from vdsmlite.virt.legacy import parse_vm_params

pytestmark = pytest.mark.unit

NS_SLASH = "http://schemas.dmtf.org/ovf/envelope/1/"
NS_NO_SLASH = "http://schemas.dmtf.org/ovf/envelope/1"
SOME_SD = "5d0e3e3e-6c8e-4a52-a1a3-1b6f0c9a1e01"

HE_36 = "he-ha-ovf_test-3.6.ovf"
HE_36_MAX = "he-ha-ovf_test_max_vcpu-3.6.ovf"
HE_42 = "he-ha-ovf_test_v4.2.ovf"
HE_42_UNSAFE = "he-ha-ovf_test_v4.2_unsafe.ovf"
LUN_SAMPLE = "engine-vmOvfData-vm-lun-snapshots.ovf"
V2V_ENGINE = "engine-vmOvfData2-virt-v2v-vm.ovf"
V2V_OVA = "ost-virt-v2v-ova-style-test-vm.ovf"


def sample(name: str) -> str:
    path = SAMPLES / name
    assert path.is_file(), f"missing OVF sample {path}"
    return path.read_text()


def devices(params: dict[str, Any], kind: str, device: str | None = None) -> list[dict]:
    return [d for d in params["devices"]
            if d["type"] == kind and (device is None or d.get("device") == device)]


def disk_devices(params: dict[str, Any]) -> list[dict]:
    return [d for d in devices(params, "disk") if d["device"] != "cdrom"]


def accepted(conv: Conversion) -> Any:
    """What VM.create's legacy form makes of it (it must take every conversion)."""
    return parse_vm_params(conv.params, conv.params["vmId"])


# --- every sample ----------------------------------------------------------------------

@pytest.mark.parametrize("path", sorted(SAMPLES.glob("*.ovf")), ids=lambda p: p.name)
def test_every_sample_converts_and_legacy_accepts_it(path: Path) -> None:
    conv = convert(path.read_bytes(), domain_id=SOME_SD)
    vm = accepted(conv)
    assert vm.vm_id == conv.params["vmId"]
    assert vm.memory_mib == conv.params["memSize"] > 0
    assert vm.disks, "every sample has a disk"
    assert sum(d.boot_order is not None for d in vm.disks) >= 1
    # str in, same out.
    assert convert(path.read_text(), domain_id=SOME_SD) == conv
    assert all(v is not None for d in conv.params["devices"] for v in d.values())
    assert all(v is not None for v in conv.params.values())


def test_there_are_seven_samples() -> None:
    assert len(list(SAMPLES.glob("*.ovf"))) == 7


# --- upstream's expected values for the hosted-engine samples ---------------------------

HE_EXPECTED = {
    HE_36: dict(vmId="50e59bbd-f829-4761-ba1b-6db1a6acc3b8", memSize=4096, smp=1,
                maxVCpus=None, cpuType="SandyBridge", emulatedMachine="rhel6.5.0",
                display="vnc",
                disk=("475e7578-33a2-474f-8647-aa46f01200f9",
                      "1b52d184-a370-48a7-8335-a4755b01ec0a",
                      "05f1031c-6c9a-48c3-9a62-930984e52e11", "raw", "ide"),
                macs=[("00:16:3e:43:ed:b5", "ovirtmgmt", "true"),
                      ("00:16:3e:43:ed:b6", "dummynet", "false")]),
    HE_42_UNSAFE: dict(vmId="b4491372-8f8a-4e08-8524-f8fb986a548a", memSize=4096, smp=4,
                       maxVCpus=64, cpuType="Haswell-noTSX",
                       emulatedMachine="pc-i440fx-rhel7.3.0", display="qxl",
                       disk=("1f71b5f9-5cfa-459c-8ec2-ee48c9731f60",
                             "add49103-89de-4a7e-b22f-9768a324b8f9",
                             "81487a81-d27d-41b8-b3d1-139d38437f42", "cow", "virtio"),
                       macs=[("00:16:3e:62:28:65", "ovirtmgmt", "true")]),
    HE_42: dict(vmId="eccb9cb6-affd-4806-8200-708370581227", memSize=16384, smp=12,
                maxVCpus=16, cpuType="Broadwell", emulatedMachine="pc-i440fx-rhel7.3.0",
                display="vnc",
                disk=("ce880525-a44b-4248-8b63-d9e11b2f123a",
                      "69a2b8c2-8d1c-4014-8f75-a85c16bc5b71",
                      "3ab9fff0-9aa1-4c2e-ad67-5e25d05cb86e", "raw", "virtio"),
                macs=[("00:16:3e:6a:7a:f9", "ovirtmgmt", "true")]),
}
HE_EXPECTED[HE_36_MAX] = {**HE_EXPECTED[HE_36], "maxVCpus": 16}

# Upstream's device order, as (type, device, deviceId); the default rng/console it adds
# have no id. Balloon Items, which upstream skips, are left out of the comparison.
HE_DEVICE_ORDER = {
    HE_36: [("disk", "disk", "1b52d184-a370-48a7-8335-a4755b01ec0a"),
            ("graphics", "spice", "546172ad-e415-400b-b079-91a033efd4b1"),
            ("disk", "cdrom", "8c3179ac-b322-4f5c-9449-c52e3665e0ae"),
            ("controller", "scsi", "243e6a18-ae41-47dc-af9e-29f2df1b3713"),
            ("interface", "bridge", "7442c4a6-c63d-4734-8a7e-3b2878efd7df"),
            ("interface", "bridge", "7442c4a6-c63d-4734-8a7e-3b2878efd7ef"),
            ("controller", "usb", "9ae636d9-f23f-4050-84c3-096c798b4851"),
            ("controller", "ide", "90cf38c4-ae28-45be-a38f-42f19ac83929"),
            ("controller", "virtio-serial", "e354e922-b612-49ca-9474-adacc2dc388e"),
            ("video", "cirrus", "d3c45090-2863-4faa-a9c4-58fdd1d06f19"),
            ("rng", "virtio", "e61f8f3b-8bf1-4b5f-9e3a-22d4e60a11ca"),
            ("console", "console", None)],
    HE_42_UNSAFE: [("disk", "disk", "add49103-89de-4a7e-b22f-9768a324b8f9"),
                   ("interface", "bridge", "542e02d2-b4fe-4241-8a27-1f7ba42dba7c"),
                   ("video", "qxl", "8644313b-fb30-44f5-b01a-5e0555a5d9ac"),
                   ("graphics", "spice", "7115e321-26af-4b2c-a0bf-d468561164a6"),
                   ("disk", "cdrom", "8c3179ac-b322-4f5c-9449-c52e3665e0ae"),
                   ("controller", "ide", "7ec1353f-1d5e-4327-9ce6-06848b83492a"),
                   ("rng", "virtio", "7f75c30c-7ece-48bc-8166-566809b543f9"),
                   ("controller", "usb", "d7a1852f-621a-40e9-a617-ae9d98efa5b1"),
                   ("controller", "virtio-serial", "5af61c67-0c82-4feb-a083-dcfcf670ad5a"),
                   ("controller", "scsi", "7a856b05-598f-46ec-996a-3c71ebb19014"),
                   ("console", "console", None)],
    HE_42: [("disk", "disk", "69a2b8c2-8d1c-4014-8f75-a85c16bc5b71"),
            ("interface", "bridge", "a959b3de-a059-4634-abcc-eb256be6898d"),
            ("graphics", "vnc", "569aff14-42ca-456e-ad7f-3d53ed512ed3"),
            ("disk", "cdrom", "8c3179ac-b322-4f5c-9449-c52e3665e0ae"),
            ("controller", "usb", "0473bfa4-604b-40d3-8ca4-b9ba55f4f8bd"),
            ("controller", "ide", "3443c210-d567-45b2-95f5-1812c1582e6c"),
            ("controller", "virtio-serial", "516eedee-53c2-4a85-bf12-54d41fd81f62"),
            ("controller", "scsi", "5fad56de-094c-4a08-8215-898df4d51b36"),
            ("console", "console", "c60aba6e-b6d8-448b-ab6e-8c7b5c29f351"),
            ("rng", "virtio", None)],
}
HE_DEVICE_ORDER[HE_36_MAX] = HE_DEVICE_ORDER[HE_36]


@pytest.mark.parametrize("name", sorted(HE_EXPECTED))
def test_hosted_engine_samples_give_upstreams_values(name: str) -> None:
    want = HE_EXPECTED[name]
    params = convert(sample(name)).params
    assert params["vmId"] == want["vmId"]
    assert params["vmName"] == "HostedEngine"
    # Upstream: strings ('4096'); ours: ints, as VDSM's schema has them.
    assert params["memSize"] == want["memSize"]
    assert params["smp"] == want["smp"]
    assert params.get("maxVCpus") == want["maxVCpus"]
    assert params["cpuType"] == want["cpuType"]
    assert params["emulatedMachine"] == want["emulatedMachine"]
    assert params["display"] == want["display"]
    assert params["spiceSecureChannels"] == (
        "smain,sdisplay,sinputs,scursor,splayback,srecord,ssmartcard,susbredir")

    [disk] = disk_devices(params)
    domain, image, volume, fmt, iface = want["disk"]
    assert disk == {
        "type": "disk", "device": "disk", "index": "0", "iface": iface, "format": fmt,
        "poolID": BLANK_UUID, "domainID": domain, "imageID": image, "volumeID": volume,
        "deviceId": image, "readonly": "false", "shared": "exclusive",
        "propagateErrors": "off", "bootOrder": "1",
        # Upstream: "{slot:0x06, bus:0x00, ...}" for its vm.conf; VDSM takes a dict.
        "address": {"type": "pci", "slot": "0x06", "bus": "0x00", "domain": "0x0000",
                    "function": "0x0"},
    }
    nics = devices(params, "interface")
    assert [(n["macAddr"], n["network"], n["linkActive"]) for n in nics] == want["macs"]
    assert {n["nicModel"] for n in nics} == {"pv"}
    order = [(d["type"], d["device"], d.get("deviceId")) for d in params["devices"]
             if d["type"] != "balloon"]
    assert order == HE_DEVICE_ORDER[name]
    [cdrom] = devices(params, "disk", "cdrom")
    assert cdrom == {"index": "2", "iface": "ide", "readonly": "true", "path": "",
                     "deviceId": "8c3179ac-b322-4f5c-9449-c52e3665e0ae", "device": "cdrom",
                     "shared": "false", "type": "disk",
                     "address": {"controller": "0", "target": "0", "unit": "0", "bus": "1",
                                 "type": "drive"}}
    for ctrl in devices(params, "controller", "scsi"):
        assert ctrl["model"] == "virtio-scsi"
    for video in devices(params, "video"):
        assert video["alias"] == "video0"
    [rng] = devices(params, "rng")
    assert rng["model"] == "virtio" and rng["specParams"] == {"source": "urandom"}

    vm = accepted(convert(sample(name)))
    assert [d.source for d in vm.disks] == [VolumeSource(BLANK_UUID, domain, image, volume)]
    assert vm.max_vcpus == want["maxVCpus"]


def test_the_42_sample_video_spec_params_are_upstreams() -> None:
    [video] = devices(convert(sample(HE_42_UNSAFE)).params, "video")
    assert video["specParams"] == {"heads": "1", "ram": "65536", "vgamem": "16384",
                                   "vram": "32768"}


def test_hosted_engine_36_disk_boots_at_the_ovfs_order() -> None:
    """Upstream says '2' (BootOrder 1 plus one); the OVF's order is 1, the only one."""
    conv = convert(sample(HE_36))
    assert disk_devices(conv.params)[0]["bootOrder"] == "1"
    assert not any("BootOrder" in w for w in conv.warnings)


def test_safe_engine_xml_is_passed_on_as_upstream_does() -> None:
    conv = convert(sample(HE_42))
    xml = base64.standard_b64decode(conv.params["xmlBase64"])
    assert xml.startswith(b"<?xml version='1.0' encoding='UTF-8'?>")
    domain = etree.fromstring(xml)
    assert domain.findtext("uuid") == "eccb9cb6-affd-4806-8200-708370581227"
    # libvirt's console alias limit (BZ 1560666), as upstream's expected XML has it.
    assert domain.find("devices/console/alias").get("name") == "ua-c60aba6e-b6d8-448b-ab"
    assert domain.findtext("devices/lease/key") == "3ab9fff0-9aa1-4c2e-ad67-5e25d05cb86e"
    # That lease is the disk's volume lease (keyed by the volume), not a VM lease.
    assert not devices(conv.params, "lease")


def test_unsafe_engine_xml_is_not_passed_on() -> None:
    conv = convert(sample(HE_42_UNSAFE))
    assert "xmlBase64" not in conv.params
    assert any("EngineXml" in w for w in conv.warnings)


def test_hostile_engine_xml_is_ignored_not_expanded() -> None:
    bomb = ('&lt;!DOCTYPE d [&lt;!ENTITY e "x"&gt;]&gt;&lt;domain&gt;&amp;e;'
            '&lt;devices&gt;&lt;lease/&gt;&lt;/devices&gt;&lt;/domain&gt;')
    text = re.sub(r"<EngineXml>.*?</EngineXml>", f"<EngineXml>{bomb}</EngineXml>",
                  sample(HE_42), flags=re.S)
    conv = convert(text)
    assert "xmlBase64" not in conv.params
    assert any("EngineXml ignored" in w and "DTD" in w for w in conv.warnings)


# --- disks: LUNs, snapshot chains, OVA style ------------------------------------------

def test_direct_lun_is_a_lun_device_by_guid() -> None:
    conv = convert(sample(LUN_SAMPLE))
    [image, lun] = disk_devices(conv.params)
    assert lun == {"type": "disk", "device": "lun", "GUID": "36001405bb1b5071cfb44a4e9576aef7c",
                   "iface": "scsi", "format": "raw", "propagateErrors": "off",
                   "deviceId": "eb331cad-8842-48d9-9c56-40b893dc8b1e", "readonly": "false",
                   "shared": "exclusive", "index": "1"}
    assert image["volumeID"] == "f934b12c-1e22-4ad8-bbce-ec0b2a5defa4"
    vm = accepted(conv)
    assert [(d.name, d.source) for d in vm.disks] == [
        ("vda", VolumeSource(BLANK_UUID, "7e2a7eac-3b76-4d45-a7dd-caae8fe0f588",
                             "8c634412-1e8b-4ef3-bc40-b67a456e9d2f",
                             "f934b12c-1e22-4ad8-bbce-ec0b2a5defa4")),
        ("sdb", LunSource("36001405bb1b5071cfb44a4e9576aef7c"))]
    assert devices(conv.params, "balloon") == [{
        "type": "balloon", "device": "memballoon", "specParams": {"model": "virtio"},
        "deviceId": "0ef21074-0908-4d2d-8355-5e82a3f49881"}]


IMG = "8c634412-1e8b-4ef3-bc40-b67a456e9d2f"
LEAF = "f934b12c-1e22-4ad8-bbce-ec0b2a5defa4"
BASE = "0b0b0b0b-1111-4222-8333-444444444444"
MID = "0c0c0c0c-1111-4222-8333-444444444444"


def chained(order: tuple[str, ...], *, parent_refs: bool = True) -> str:
    """The LUN sample with its image disk made a chain BASE <- MID <- LEAF.

    One Disk and one hardware Item per volume, as the engine writes them; `order` is
    the order of both; links by ovf:parentRef (and rasd:Parent always).
    """
    text = sample(LUN_SAMPLE)
    disk = re.search(r"<Disk ovf:diskId=\"" + LEAF + r"\"[^>]*/>", text).group(0)
    item = re.search(r"<Item>\s*<rasd:Caption>exporttedVM_Disk1.*?</Item>", text,
                     re.S).group(0)
    parent = {BASE: None, MID: BASE, LEAF: MID}
    disks, items = [], []
    for vol in order:
        ref = f"{IMG}/{parent[vol]}" if parent[vol] and parent_refs else ""
        disks.append(disk.replace(LEAF, vol).replace('ovf:parentRef=""',
                                                     f'ovf:parentRef="{ref}"'))
        items.append(item.replace(LEAF, vol).replace(
            f"<rasd:Parent>{BLANK_UUID}</rasd:Parent>",
            f"<rasd:Parent>{parent[vol] or BLANK_UUID}</rasd:Parent>"))
    return text.replace(disk, "".join(disks)).replace(item, "".join(items))


@pytest.mark.parametrize("order", [(BASE, MID, LEAF), (LEAF, MID, BASE), (MID, LEAF, BASE)])
@pytest.mark.parametrize("parent_refs", [True, False])
def test_snapshot_chain_gives_one_disk_on_its_active_volume(order: tuple[str, ...],
                                                            parent_refs: bool) -> None:
    conv = convert(chained(order, parent_refs=parent_refs))
    image_disks = [d for d in disk_devices(conv.params) if "imageID" in d]
    assert [(d["imageID"], d["volumeID"]) for d in image_disks] == [(IMG, LEAF)]
    assert [d.source.volume_id for d in accepted(conv).disks
            if isinstance(d.source, VolumeSource)] == [LEAF]


def test_ova_style_disk_needs_a_domain() -> None:
    conv = convert(sample(V2V_OVA))
    assert disk_devices(conv.params) == []
    assert any("rasd:StorageId" in w for w in conv.warnings)
    [disk] = disk_devices(convert(sample(V2V_OVA), domain_id=SOME_SD).params)
    # OVA style: diskId is the image, fileRef the bare volume.
    assert (disk["domainID"], disk["imageID"], disk["volumeID"]) == (
        SOME_SD, "d551fb7d-de0a-4e25-bc4e-b1e0d5b14afc", "99116050-8859-43a6-9399-7c08ae458e3b")
    assert disk["bootOrder"] == "1" and disk["iface"] == "virtio"


def test_ova_export_layout_in_the_default_namespace() -> None:
    """The engine's OVA export: OVF elements qualified, rasd:InstanceID."""
    text = sample(V2V_OVA)
    text = text.replace("<rasd:InstanceId>", "<rasd:InstanceID>").replace(
        "</rasd:InstanceId>", "</rasd:InstanceID>")
    for tag in ("References", "File", "NetworkSection", "Network", "DiskSection", "Disk",
                "VirtualSystem", "OperatingSystemSection", "VirtualHardwareSection", "Item",
                "Name", "Info", "Description", "DefaultDisplayType", "Type", "BootOrder"):
        text = re.sub(rf"<(/?){tag}([ >/])", rf"<\1ovf:{tag}\2", text)
    plain = convert(sample(V2V_OVA), domain_id=SOME_SD)
    assert convert(text, domain_id=SOME_SD) == plain


def test_virt_v2v_nic_without_mac_is_dropped_with_a_warning() -> None:
    conv = convert(sample(V2V_ENGINE))
    assert devices(conv.params, "interface") == []
    assert any("rasd:MACAddress" in w for w in conv.warnings)


# --- the HA agent's breakages ----------------------------------------------------------

@pytest.mark.parametrize(("name", "old", "new"), [
    (HE_36, NS_SLASH, NS_NO_SLASH), (HE_42, NS_SLASH, NS_NO_SLASH),
    (HE_42_UNSAFE, NS_NO_SLASH, NS_SLASH), (LUN_SAMPLE, NS_SLASH, NS_NO_SLASH),
])
def test_both_namespace_spellings_give_identical_params(name: str, old: str, new: str) -> None:
    text = sample(name)
    assert f'xmlns:ovf="{old}"' in text
    assert convert(text.replace(f'xmlns:ovf="{old}"', f'xmlns:ovf="{new}"')) == convert(text)


def test_os_section_after_the_hardware_and_memory_among_many_items() -> None:
    text = sample(LUN_SAMPLE)
    os_section = re.search(r"<Section ovf:id=[^>]*OperatingSystemSection_Type.*?</Section>",
                           text, re.S).group(0)
    memory = re.search(r"<Item>\s*<rasd:Caption>1024 MB.*?</Item>", text, re.S).group(0)
    moved = text.replace(os_section, "").replace(memory, "")
    moved = moved.replace("</Section>\n        <Section xsi:type=\"ovf:SnapshotsSection_Type\">",
                          f"{memory}</Section>{os_section}"
                          "<Section xsi:type=\"ovf:SnapshotsSection_Type\">")
    assert moved.index("OperatingSystemSection_Type") > moved.index("VirtualHardwareSection")
    assert convert(moved) == convert(text)


def test_missing_boot_order_and_display_type_do_not_crash() -> None:
    text = re.sub(r"<BootOrder>\d+</BootOrder>", "", sample(HE_36))
    text = re.sub(r"<DefaultDisplayType>\d+</DefaultDisplayType>", "", text)
    conv = convert(text)
    assert disk_devices(conv.params)[0]["bootOrder"] == "1"
    # Taken from the SPICE graphics device.
    assert conv.params["display"] == "qxl"
    assert any("BootOrder" in w for w in conv.warnings)
    assert any("DefaultDisplayType" in w for w in conv.warnings)
    accepted(conv)


@pytest.mark.parametrize(("value", "display"), [("0", "vnc"), ("1", "qxl"), ("2", "vnc"),
                                                ("3", "vnc"), ("4", None)])
def test_display_types(value: str, display: str | None) -> None:
    text = sample(HE_36).replace("<DefaultDisplayType>0<", f"<DefaultDisplayType>{value}<")
    conv = convert(text)
    assert conv.params.get("display") == display
    assert "display" in conv.params or display is None


def test_boot_orders_follow_the_ovf_and_non_boot_disks_get_none() -> None:
    """Two disks: BootOrder 0 (not bootable) must not boot before BootOrder 2."""
    text = chained((BASE, MID, LEAF))
    # Make the chain three separate images, with boot orders 0, 2, 5.
    for vol, img, boot in ((BASE, "1a1a1a1a-0000-4000-8000-000000000001", 0),
                           (MID, "1a1a1a1a-0000-4000-8000-000000000002", 2),
                           (LEAF, IMG, 5)):
        text = text.replace(f"{IMG}/{vol}", f"{img}/{vol}")
        text = re.sub(rf"(<rasd:InstanceId>{vol}</rasd:InstanceId>.*?<BootOrder>)0(<)",
                      rf"\g<1>{boot}\2", text, flags=re.S)
    text = re.sub(r'ovf:parentRef="[^"]*"', 'ovf:parentRef=""', text)
    text = re.sub(r"<rasd:Parent>[^<]*</rasd:Parent>", "", text)
    conv = convert(text)
    boots = {d["volumeID"]: d.get("bootOrder") for d in disk_devices(conv.params)
             if "volumeID" in d}
    assert boots == {BASE: None, MID: "1", LEAF: "2"}
    vm = accepted(conv)
    assert [d.name for d in vm.disks] == ["vda", "vdb", "vdd", "sde"]  # index 2 is the CD


def test_threads_per_cpu_are_honoured() -> None:
    text = sample(HE_42_UNSAFE).replace(
        "<rasd:num_of_sockets>1</rasd:num_of_sockets><rasd:cpu_per_socket>4</rasd:cpu_per_socket>"
        "<rasd:threads_per_cpu>1</rasd:threads_per_cpu><rasd:max_num_of_vcpus>64",
        "<rasd:num_of_sockets>2</rasd:num_of_sockets><rasd:cpu_per_socket>3</rasd:cpu_per_socket>"
        "<rasd:threads_per_cpu>2</rasd:threads_per_cpu><rasd:max_num_of_vcpus>24")
    conv = convert(text)
    assert (conv.params["smp"], conv.params["smpCoresPerSocket"],
            conv.params["smpThreadsPerCore"], conv.params["maxVCpus"]) == (12, 3, 2, 24)
    vm = accepted(conv)
    assert (vm.vcpus, vm.cpu_sockets, vm.cpu_cores, vm.cpu_threads) == (12, 4, 3, 2)


def test_max_vcpus_that_are_not_whole_sockets_are_left_out() -> None:
    text = sample(HE_42_UNSAFE).replace("<rasd:threads_per_cpu>1<", "<rasd:threads_per_cpu>2<")
    text = text.replace("<rasd:max_num_of_vcpus>64<", "<rasd:max_num_of_vcpus>66<")
    conv = convert(text)
    assert conv.params["smp"] == 8 and "maxVCpus" not in conv.params
    assert any("rasd:max_num_of_vcpus" in w for w in conv.warnings)
    accepted(conv)


def test_vm_lease_from_lease_domain_id() -> None:
    text = sample(HE_36).replace(
        "<UseLatestVersion>", f"<LeaseDomainId>{SOME_SD}</LeaseDomainId><UseLatestVersion>")
    [lease] = devices(convert(text).params, "lease")
    assert lease == {"type": "lease", "device": "lease",
                     "lease_id": "50e59bbd-f829-4761-ba1b-6db1a6acc3b8", "sd_id": SOME_SD}


def test_vm_lease_from_engine_xml() -> None:
    vm_id = "eccb9cb6-affd-4806-8200-708370581227"
    text = sample(HE_42).replace("&lt;key&gt;3ab9fff0-9aa1-4c2e-ad67-5e25d05cb86e",
                                 f"&lt;key&gt;{vm_id}")
    [lease] = devices(convert(text).params, "lease")
    assert lease == {"type": "lease", "device": "lease", "lease_id": vm_id,
                     "sd_id": "ce880525-a44b-4248-8b63-d9e11b2f123a"}


def test_watchdog() -> None:
    watchdog = ("<Item><rasd:ResourceType>0</rasd:ResourceType>"
                "<rasd:InstanceId>7d7d7d7d-0000-4000-8000-000000000001</rasd:InstanceId>"
                "<Type>watchdog</Type><Device>watchdog</Device><rasd:Address/>"
                "<SpecParams><model>i6300esb</model><action>reset</action></SpecParams></Item>")
    text = sample(LUN_SAMPLE).replace("</Item>\n        </Section>", f"</Item>{watchdog}</Section>")
    assert devices(convert(text).params, "watchdog") == [{
        "type": "watchdog", "device": "watchdog",
        "deviceId": "7d7d7d7d-0000-4000-8000-000000000001",
        "specParams": {"model": "i6300esb", "action": "reset"}}]


# --- refusals --------------------------------------------------------------------------

@pytest.mark.parametrize(("mutate", "named"), [
    (lambda t: re.sub(r"<Item>\s*<rasd:Caption>1024 MB.*?</Item>", "", t, flags=re.S),
     "no memory (Item with rasd:ResourceType 4)"),
    (lambda t: t.replace("<rasd:VirtualQuantity>1024<", "<rasd:VirtualQuantity>lots<"),
     "memory rasd:VirtualQuantity"),
    (lambda t: re.sub(r'<Section ovf:id="[^"]*"', "<Section", t),
     "no VM id (ovf:id of the OperatingSystemSection"),
    (lambda t: t.replace("<Name>exporttedVM</Name>", ""), "no name (Content/Name)"),
    (lambda t: t.replace("<Content ", "<Other ").replace("</Content>", "</Other>"),
     "no virtual system"),
    (lambda t: t[: len(t) // 2], "malformed OVF XML"),
    (lambda t: t.replace("<ovf:Envelope", '<!DOCTYPE x [<!ENTITY e "boom">]><ovf:Envelope'),
     "DTD"),
    (lambda t: "not xml at all", "malformed OVF XML"),
    (lambda t: "<domain/>", "not an OVF Envelope"),
])
def test_refusals_name_the_field(mutate: Any, named: str) -> None:
    with pytest.raises(OvfConversionError) as info:
        convert(mutate(sample(LUN_SAMPLE)))
    assert named in str(info.value)
    if "Item" in named:
        assert "70f24c82-a7b8-4e0b-9192-cffd5705cf5c" in str(info.value)


def test_conversion_error_is_vdsms_invalid_parameter() -> None:
    e = OvfConversionError("OVF of VM x: no memory (Item with rasd:ResourceType 4)")
    assert isinstance(e, InvalidParameterException)
    assert e.to_json() == {"code": 1000, "message": "Cannot convert OVF to VM parameters: "
                           "'OVF of VM x: no memory (Item with rasd:ResourceType 4)'"}
    again = pickle.loads(pickle.dumps(e))
    assert type(again) is OvfConversionError and again.to_json() == e.to_json()


def test_no_disk_at_all_is_a_warning_not_an_error() -> None:
    text = re.sub(r"<Disk [^>]*/>|<Disk [^>]*[^/]>.*?</Disk>", "", sample(LUN_SAMPLE),
                  flags=re.S)
    conv = convert(text)
    assert disk_devices(conv.params) == []
    assert any("no Disk in the DiskSection" in w for w in conv.warnings)
    assert accepted(conv).disks == []
