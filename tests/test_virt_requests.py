"""VM.create / VM.hotplugDisk requests, both forms, into one VmDefinition.

Real documents (tests/data/engine-xml, from oVirt's VDSM, see SOURCES.md) show
that what engines send is read; small hand-written documents pin each refusal.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import pytest
from lxml import etree

from vdsmlite import errors
from vdsmlite.virt import checks, domxml, legacy, requests
from vdsmlite.virt.definition import (
    ConsoleSpec,
    ConsoleTarget,
    DiskBus,
    DiskDevice,
    DiskFormat,
    DiskSpec,
    ErrorPolicy,
    LeaseSpec,
    LunSource,
    NicModel,
    NicSpec,
    RngSource,
    RngSpec,
    Sgio,
    VmDefinition,
    VolumeSource,
)

pytestmark = pytest.mark.unit

DATA = Path(__file__).parent / "data" / "engine-xml"

VM_ID = "7a1c2b3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d"
POOL = "59c4c3ee-0205-0227-0229-000000000155"
DOMAIN = "a67a8671-05fc-4e42-b147-f7d3a0496cd6"
IMAGE = "b07a37de-95d6-4682-84cd-c8c9201327e3"
VOLUME = "b3335e60-6d27-46e0-bed8-50e75cca6786"
DEVICE = "13134458-7b83-408d-a1cf-973d4bc48728"
GUID = "36001405b3b7829f14c1400d925eefebb"  # a LUN GUID from VDSM's tests


def read(name: str) -> str:
    return (DATA / name).read_text()


def uuid_of(xml: str) -> str:
    return str(etree.fromstring(xml.encode()).findtext("uuid"))


def without(xml: str, xpath: str) -> str:
    """The document with the elements `xpath` finds removed."""
    root = etree.fromstring(xml.encode())
    for elem in root.xpath(xpath, namespaces={"ovirt-vm": domxml.OVIRT_VM_NS}):
        elem.getparent().remove(elem)
    return etree.tostring(root, encoding="unicode")


def same_vm(vm: VmDefinition) -> dict[str, Any]:
    """What both forms must agree on: all but how the request was spelled."""
    data = vm.to_dict()
    for key in ("ignored", "source_form", "source_xml"):
        data.pop(key)
    return data


# -- a minimal domain to vary, one field per refusal --------------------------

PDIV_META = f"""<ovirt-vm:poolID>{POOL}</ovirt-vm:poolID>
  <ovirt-vm:domainID>{DOMAIN}</ovirt-vm:domainID>
  <ovirt-vm:imageID>{IMAGE}</ovirt-vm:imageID>
  <ovirt-vm:volumeID>{VOLUME}</ovirt-vm:volumeID>"""

SDA = """<disk type='file' device='disk'>
  <source file='/rhev/data-center/whatever'/>
  <target dev='sda' bus='scsi'/>
  <driver name='qemu' type='raw'/>
</disk>"""


def domain(disks: str = SDA, meta: str = f"<ovirt-vm:device devtype='disk' name='sda'>"
           f"{PDIV_META}</ovirt-vm:device>", *, uuid: str = VM_ID,
           memory: str = "<memory unit='MiB'>1024</memory>", vcpu: str = "<vcpu>2</vcpu>",
           os: str = "<os><type arch='x86_64' machine='q35'>hvm</type></os>",
           cpu: str = "", kind: str = "kvm", extra: str = "") -> str:
    return f"""<?xml version='1.0' encoding='UTF-8'?>
<domain type='{kind}' xmlns:ovirt-vm='http://ovirt.org/vm/1.0'>
  <name>vm1</name><uuid>{uuid}</uuid>{memory}{vcpu}{os}{cpu}{extra}
  <metadata><ovirt-vm:vm>{meta}</ovirt-vm:vm></metadata>
  <devices>{disks}</devices>
</domain>"""


def legacy_vm(*disks: dict[str, Any], **params: Any) -> dict[str, Any]:
    return {"vmId": VM_ID, "vmName": "vm1", "memSize": "1024", "smp": "2",
            "emulatedMachine": "q35", "devices": list(disks), **params}


PDIV = {"poolID": POOL, "domainID": DOMAIN, "imageID": IMAGE, "volumeID": VOLUME}
SDA_DICT = {"type": "disk", "device": "disk", "iface": "scsi", "index": "0", "format": "raw",
            **PDIV}


# -- real documents -------------------------------------------------------------

def test_running_domain_every_field() -> None:
    xml = read("vdsm-domain_disk_block.xml")
    vm = domxml.parse_domain(xml, "69B6B942-B5BF-4740-BB95-6752FFBD3BCF")
    assert vm == VmDefinition(
        vm_id="69b6b942-b5bf-4740-bb95-6752ffbd3bcf", name="a2", memory_mib=4096, vcpus=2,
        max_vcpus=16, cpu_sockets=16, cpu_cores=1, cpu_threads=1, cpu_model="Haswell-noTSX",
        cpu_flags=["+vme", "+f16c", "+rdrand", "+hypervisor", "+arat", "+xsaveopt", "+abm"],
        machine="pc-i440fx-rhel7.3.0", uefi=False, boot_devices=[], launch_paused=False,
        disks=[DiskSpec(
            name="sda", bus=DiskBus.SCSI, index=0,
            source=VolumeSource(POOL, DOMAIN, IMAGE, VOLUME), device=DiskDevice.DISK,
            format=DiskFormat.COW, readonly=False, shared=False, serial=IMAGE, boot_order=1,
            address={"type": "drive", "controller": "0", "bus": "0", "target": "0",
                     "unit": "0"},
            error_policy=ErrorPolicy.STOP, device_id=None)],
        nics=[NicSpec(mac="00:1a:4a:16:01:00", model=NicModel.VIRTIO, network="ovirtmgmt",
                      order=0)],
        rng=RngSpec(source=RngSource.URANDOM), balloon=None,
        ignored=vm.ignored, source_form="xml", source_xml=xml)
    # The predicted path in <source dev=> is not taken: it comes from preparing.
    assert vm.disks[0].path is None
    for what in ("graphics spice (runs headless)", "video qxl (runs headless)",
                 "controller scsi virtio-scsi",
                 "cdrom hdc (empty)", "clock", "features", "sysinfo smbios", "cpu numa"):
        assert what in vm.ignored
    # Run now, so no longer ignored; memballoon none is simply no balloon.
    assert not [w for w in vm.ignored if w.split()[0] in ("interface", "rng", "memballoon")]


@pytest.mark.parametrize(("name", "expect"), [
    ("vdsm-vm_compat41.xml", {"name": "a0_41", "memory_mib": 4096, "cpu_model": "Nehalem",
                              "disks": [("sda", DiskBus.SCSI, DiskFormat.RAW, DEVICE)]}),
    ("vdsm-vm_hibernated.xml", {"name": "a2", "machine": "pc-i440fx-rhel7.3.0",
                                "disks": [("sda", DiskBus.SCSI, DiskFormat.COW, None),
                                          ("sdb", DiskBus.SCSI, DiskFormat.RAW, None)]}),
    ("vdsm-vmTestsData-CONF_TO_DOMXML_X86_64.xml", {"name": "testVm", "memory_mib": 1024,
                                                    "vcpus": 1, "max_vcpus": 160,
                                                    "cpu_flags": ["-svm"], "disks": []}),
])
def test_real_domains(name: str, expect: dict[str, Any]) -> None:
    xml = read(name)
    vm = domxml.parse_domain(xml, uuid_of(xml))
    want_disks = expect.pop("disks")
    assert {k: getattr(vm, k) for k in expect} == expect
    assert [(d.name, d.bus, d.format, d.device_id) for d in vm.disks] == want_disks
    assert all(isinstance(d.source, VolumeSource) for d in vm.disks)


def test_engine_sent_xml_sysprep_floppy_refused_rest_read() -> None:
    """XML as an engine sends it: ua- aliases, memory without unit, no-prefix metadata."""
    xml = read("vdsm-vm_sysprep_floppy.xml")
    vm_id = "e9252f48-6b22-4c9b-8d9a-8531fcf71f4c"
    with pytest.raises(errors.CannotCreateVM, match="disk fda: floppy"):
        domxml.parse_domain(xml, vm_id)

    xml = without(xml, "devices/disk[@device='floppy']").replace(
        "<launchPaused>false</launchPaused>", "<launchPaused>true</launchPaused>")
    vm = domxml.parse_domain(xml, vm_id)
    assert (vm.name, vm.memory_mib, vm.vcpus, vm.max_vcpus) == ("windows_10", 4096, 1, 16)
    assert (vm.cpu_model, vm.cpu_sockets, vm.machine) == ("SandyBridge", 16,
                                                          "pc-i440fx-rhel7.5.0")
    assert vm.launch_paused is True
    [hda] = vm.disks
    assert (hda.name, hda.bus, hda.index, hda.format) == ("hda", DiskBus.SATA, 0,
                                                          DiskFormat.COW)
    assert hda.device_id == "93b063d7-d508-4e42-a8b0-c0d0f8f3b2c6"  # from ua-<id>
    assert hda.source == VolumeSource("d5e3519f-fdfc-46a6-899c-77b12393dc08",
                                      "b1504dab-e92b-43cb-963e-df14bbda9e33",
                                      "93b063d7-d508-4e42-a8b0-c0d0f8f3b2c6",
                                      "06a0064d-3d25-4a0f-ac2d-c9a7fe956f59")
    assert "sound ich6" in vm.ignored and "cdrom hdc (empty)" in vm.ignored


def test_hosted_engine_lease_and_disk_read() -> None:
    xml = read("vdsm-hostedengine.xml")
    vm_id = uuid_of(xml)
    vm = domxml.parse_domain(xml, vm_id)
    # VDSM's own sample holds the disk's volume lease: no offset, libvirt's 0.
    assert vm.lease == LeaseSpec(
        sd_id="7a9a1478-6a7c-465b-b0e5-598205be7faf",
        lease_id="0fa79d54-74ac-41bb-9936-c6ecdd947150",
        path="/rhev/data-center/mnt/NAS/7a9a1478-6a7c-465b-b0e5-598205be7faf/images/"
             "76b07256-29ce-4634-9f4a-db35d3bc61c6/0fa79d54-74ac-41bb-9936-c6ecdd947150.lease",
        offset=0)
    [vda] = vm.disks
    assert (vda.name, vda.bus, vda.index) == ("vda", DiskBus.VIRTIO, 0)
    assert isinstance(vda.source, VolumeSource)
    assert vda.source.pool_id == "00000000-0000-0000-0000-000000000000"  # no pool
    assert vda.address == {"type": "pci", "domain": "0x0000", "bus": "0x00",
                           "slot": "0x06", "function": "0x0"}
    assert "graphics vnc (runs headless)" in vm.ignored
    assert vm.console == ConsoleSpec(target=ConsoleTarget.VIRTIO)
    assert [(n.mac, n.network) for n in vm.nics] == [("00:1a:4a:16:10:9f", "ovirtmgmt")]


def test_hotplug_lun_real_document() -> None:
    disk = domxml.parse_hotplug(read("vdsm-device_test-BLOCK_DISK_HOTPLUG.xml"), VM_ID)
    assert disk == DiskSpec(
        name="sda", bus=DiskBus.SCSI, index=0, source=LunSource("lun1"),
        device=DiskDevice.LUN, format=DiskFormat.RAW, sgio=Sgio.UNFILTERED,
        scsi_reservation=True, error_policy=ErrorPolicy.STOP,
        address={"bus": "0", "controller": "0", "unit": "1", "type": "drive", "target": "0"})
    assert disk.is_lun and disk.path is None


def test_hotplug_real_document_with_placeholder_ids_refused() -> None:
    xml = read("vdsm-device_test-DISK_HOTPLUG.xml")
    with pytest.raises(errors.InvalidParameter, match=r"disk sda .*poolID: not a UUID"):
        domxml.parse_hotplug(xml, VM_ID)
    fixed = xml
    for tag, value in (("domainID", DOMAIN), ("imageID", IMAGE), ("poolID", POOL),
                       ("volumeID", VOLUME)):
        fixed = re.sub(f"<ovirt-vm:{tag}>[^<]*<", f"<ovirt-vm:{tag}>{value}<", fixed)
    disk = domxml.parse_hotplug(fixed, VM_ID)
    assert disk.source == VolumeSource(POOL, DOMAIN, IMAGE, VOLUME)
    assert (disk.serial, disk.boot_order) == ("1234", 1)


# -- both forms, one definition ---------------------------------------------------

DISK_BLOCK_LEGACY = {
    "vmId": "69b6b942-b5bf-4740-bb95-6752ffbd3bcf", "vmName": "a2", "memSize": "4096",
    "smp": "2", "maxVCpus": "16", "smpCoresPerSocket": "1", "smpThreadsPerCore": "1",
    "cpuType": "Haswell-noTSX,+vme,+f16c,+rdrand,+hypervisor,+arat,+xsaveopt,+abm",
    "emulatedMachine": "pc-i440fx-rhel7.3.0", "launchPaused": "false",
    "devices": [
        {"type": "disk", "device": "cdrom", "iface": "ide", "index": "2", "path": "",
         "readonly": "true", "propagateErrors": "report", "shared": "false"},
        {"type": "disk", "device": "disk", "iface": "scsi", "index": "0", "format": "cow",
         **PDIV, "serial": IMAGE, "bootOrder": "1", "propagateErrors": "off",
         "shared": "false", "readonly": "false",
         "address": {"type": "drive", "controller": "0", "bus": "0", "target": "0",
                     "unit": "0"}},
        {"type": "interface", "device": "bridge", "network": "ovirtmgmt", "nicModel": "pv",
         "macAddr": "00:1a:4a:16:01:00", "linkActive": "true"},
        {"type": "graphics", "device": "spice"},
        {"type": "video", "device": "qxl"},
        {"type": "controller", "device": "scsi", "model": "virtio-scsi"},
        {"type": "balloon", "device": "memballoon", "specParams": {"model": "none"}},
        {"type": "rng", "device": "virtio", "model": "virtio",
         "specParams": {"source": "urandom"}},
    ],
}


def test_both_forms_same_vm() -> None:
    xml = domxml.parse_domain(read("vdsm-domain_disk_block.xml"),
                              "69b6b942-b5bf-4740-bb95-6752ffbd3bcf")
    dicts = legacy.parse_vm_params(DISK_BLOCK_LEGACY)
    assert same_vm(dicts) == same_vm(xml)
    assert dicts.source_form == "dict" and dicts.source_xml is None
    for what in ("graphics spice (runs headless)", "cdrom hdc (empty)"):
        assert what in dicts.ignored and what in xml.ignored


def test_vdsm_conf_and_its_xml_same_vm() -> None:
    """VDSM's own pair: a legacy conf and the domain XML made of it."""
    conf = json.loads(read("vdsm-vmTestsData-CONF_TO_DOMXML_X86_64.json"))
    xml = read("vdsm-vmTestsData-CONF_TO_DOMXML_X86_64.xml")
    from_xml = same_vm(domxml.parse_domain(xml, conf["vmId"]))
    from_conf = same_vm(legacy.parse_vm_params(conf))
    # VDSM's conversion disabled svm on its own for the qemu64 model; the conf
    # never said so. Everything else is the conf's.
    assert from_xml.pop("cpu_flags") == ["-svm"]
    assert from_conf.pop("cpu_flags") == []
    assert from_conf == from_xml


def test_direct_lun_both_forms() -> None:
    lun_xml = f"""<disk type='block' device='lun' sgio='unfiltered'>
      <source dev='/dev/mapper/{GUID}'/>
      <target dev='sdb' bus='scsi'/>
      <shareable/>
      <driver name='qemu' type='raw' error_policy='enospace'/>
      <alias name='ua-{DEVICE}'/>
      <address type='drive' controller='0' bus='0' target='0' unit='1'/>
    </disk>"""
    meta = (f"<ovirt-vm:device devtype='disk' name='sda'>{PDIV_META}</ovirt-vm:device>"
            f"<ovirt-vm:device devtype='disk' name='sdb'><ovirt-vm:GUID>{GUID}"
            f"</ovirt-vm:GUID></ovirt-vm:device>")
    from_xml = domxml.parse_domain(domain(SDA + lun_xml, meta), VM_ID)
    lun_dict = {"type": "disk", "device": "lun", "GUID": GUID, "iface": "scsi", "index": 1,
                "sgio": "unfiltered", "format": "raw", "propagateErrors": "on",
                "shared": "shared", "readonly": False, "deviceId": DEVICE,
                "address": {"type": "drive", "controller": 0, "bus": 0, "target": 0,
                            "unit": 1}}
    from_dict = legacy.parse_vm_params(legacy_vm(SDA_DICT, lun_dict))
    assert same_vm(from_dict) == same_vm(from_xml)
    lun = from_xml.disks[1]
    assert lun.source == LunSource(GUID) and lun.device is DiskDevice.LUN
    assert (lun.shared, lun.sgio, lun.error_policy, lun.device_id) == (
        True, Sgio.UNFILTERED, ErrorPolicy.ENOSPACE, DEVICE)
    assert lun.propagate_errors and not from_xml.disks[0].propagate_errors
    # A hot-plugged LUN, both forms.
    plug = (f"<hotplug xmlns:ovirt-vm='http://ovirt.org/vm/1.0'><devices>{lun_xml}</devices>"
            f"<metadata><ovirt-vm:vm><ovirt-vm:device devtype='disk' name='sdb'>"
            f"<ovirt-vm:GUID>{GUID}</ovirt-vm:GUID></ovirt-vm:device></ovirt-vm:vm>"
            f"</metadata></hotplug>")
    assert domxml.parse_hotplug(plug, VM_ID) == legacy.parse_drive(lun_dict) == lun


def test_lun_guid_from_mapper_name_only_without_metadata() -> None:
    lun = f"""<disk type='block' device='lun'><source dev='/dev/mapper/{GUID}'/>
      <target dev='sdb' bus='scsi'/></disk>"""
    vm = domxml.parse_domain(domain(SDA + lun), VM_ID)
    assert vm.disks[1].source == LunSource(GUID)
    # With metadata, the metadata's GUID wins; the device path is not looked at.
    meta = (f"<ovirt-vm:device devtype='disk' name='sda'>{PDIV_META}</ovirt-vm:device>"
            f"<ovirt-vm:device devtype='disk' name='sdb'><ovirt-vm:GUID>other-lun"
            f"</ovirt-vm:GUID></ovirt-vm:device>")
    assert domxml.parse_domain(domain(SDA + lun, meta), VM_ID).disks[1].source == \
        LunSource("other-lun")
    bad = lun.replace(f"/dev/mapper/{GUID}", "/dev/mapper/x;rm -rf")
    with pytest.raises(errors.InvalidParameter, match="disk sdb <source dev>: not a LUN GUID"):
        domxml.parse_domain(domain(SDA + bad), VM_ID)
    elsewhere = lun.replace(f"/dev/mapper/{GUID}", f"/dev/disk/by-id/{GUID}")
    with pytest.raises(errors.InvalidParameter, match=r"disk sdb .*nor LUN"):
        domxml.parse_domain(domain(SDA + elsewhere), VM_ID)


def test_lun_with_image_id_metadata_is_a_lun() -> None:
    """VDSM writes imageID == GUID for LUNs (engine forward compatibility)."""
    meta = (f"<ovirt-vm:device devtype='disk' name='sda'><ovirt-vm:GUID>{GUID}</ovirt-vm:GUID>"
            f"<ovirt-vm:imageID>{GUID}</ovirt-vm:imageID></ovirt-vm:device>")
    vm = domxml.parse_domain(domain(SDA.replace("type='file'", "type='block'"), meta), VM_ID)
    assert vm.disks[0].source == LunSource(GUID)


# -- XML: what is read ---------------------------------------------------------------

@pytest.mark.parametrize(("memory", "mib"), [
    ("<memory>1048576</memory>", 1024),  # KiB when no unit
    ("<memory unit='KiB'>1048576</memory>", 1024),
    ("<memory unit='k'>1048576</memory>", 1024),
    ("<memory unit='b'>1073741824</memory>", 1024),
    ("<memory unit='bytes'>1073741824</memory>", 1024),
    ("<memory unit='M'>1024</memory>", 1024),
    ("<memory unit='GiB'>1</memory>", 1024),
    ("<memory unit='KB'>1048576</memory>", 1000),
    ("<memory unit='TiB'>4</memory>", 4 * 1024 * 1024),  # overcommit is not ours to judge
])
def test_memory_units(memory: str, mib: int) -> None:
    assert domxml.parse_domain(domain(memory=memory), VM_ID).memory_mib == mib


def test_current_memory_and_vcpus() -> None:
    vm = domxml.parse_domain(domain(
        memory="<memory unit='GiB'>4</memory><currentMemory unit='GiB'>2</currentMemory>",
        vcpu="<vcpu placement='static' current='3'>8</vcpu>"), VM_ID)
    assert (vm.memory_mib, vm.vcpus, vm.max_vcpus) == (4096, 3, 8)
    assert "currentMemory 2048 MiB (balloon target)" in vm.ignored
    vm = domxml.parse_domain(domain(vcpu=""), VM_ID)
    assert (vm.vcpus, vm.max_vcpus) == (1, None)  # libvirt's default


def test_cpu_modes_and_features() -> None:
    cpu = """<cpu mode='custom'><model fallback='forbid'>Skylake-Server</model>
      <feature policy='require' name='vmx'/><feature policy='disable' name='hle'/>
      <feature policy='forbid' name='rtm'/><feature policy='force' name='pcid'/>
      <feature policy='optional' name='pdpe1gb'/>
      <topology sockets='1' cores='2' threads='1'/></cpu>"""
    vm = domxml.parse_domain(domain(cpu=cpu), VM_ID)
    assert vm.cpu_model == "Skylake-Server"
    assert vm.cpu_flags == ["+vmx", "-hle", "-rtm", "+pcid"]
    assert (vm.cpu_sockets, vm.cpu_cores, vm.cpu_threads) == (1, 2, 1)
    assert "cpu feature pdpe1gb optional" in vm.ignored
    vm = domxml.parse_domain(domain(cpu="<cpu mode='host-passthrough'/>"), VM_ID)
    assert vm.cpu_model == "host"
    vm = domxml.parse_domain(domain(cpu="<cpu mode='host-model'/>"), VM_ID)
    assert vm.cpu_model == "host" and "cpu host-model (run as host-passthrough)" in vm.ignored
    assert legacy.parse_vm_params(legacy_vm(cpuType="hostPassthrough")).cpu_model == "host"


def test_os_boot_uefi_and_launch_paused() -> None:
    os = """<os><type arch='x86_64' machine='pc-q35-rhel8.6.0'>hvm</type>
      <loader readonly='yes' secure='no' type='pflash'>/usr/share/OVMF/OVMF_CODE.fd</loader>
      <nvram template='/usr/share/OVMF/OVMF_VARS.fd'/>
      <boot dev='cdrom'/><boot dev='hd'/><bootmenu enable='yes'/></os>"""
    meta = (f"<ovirt-vm:launchPaused>true</ovirt-vm:launchPaused>"
            f"<ovirt-vm:device devtype='disk' name='sda'>{PDIV_META}</ovirt-vm:device>")
    vm = domxml.parse_domain(domain(os=os, meta=meta), VM_ID)
    assert (vm.machine, vm.uefi, vm.boot_devices) == ("pc-q35-rhel8.6.0", True,
                                                      ["cdrom", "hd"])
    assert vm.launch_paused is True
    assert {"os loader path", "os nvram", "os bootmenu"} <= set(vm.ignored)
    vm = domxml.parse_domain(domain(os="<os firmware='efi'><type>hvm</type></os>"), VM_ID)
    assert vm.uefi and vm.machine is None


def test_disk_fields() -> None:
    disk = f"""<disk type='file' device='disk' snapshot='no'>
      <source file='/x'/><target dev='vdb' bus='virtio'/>
      <readonly/><shareable/><serial>{IMAGE}</serial><boot order='2'/>
      <driver name='qemu' type='qcow2' error_policy='report' cache='none' io='threads'/>
      <alias name='ua-{DEVICE.upper()}'/>
      <address type='pci' domain='0x0000' bus='0x00' slot='0x07' function='0x0'/>
    </disk>"""
    meta = f"<ovirt-vm:device devtype='disk' name='vdb'>{PDIV_META}</ovirt-vm:device>"
    [vdb] = domxml.parse_domain(domain(disk, meta), VM_ID).disks
    assert vdb == DiskSpec(
        name="vdb", bus=DiskBus.VIRTIO, index=1, source=VolumeSource(POOL, DOMAIN, IMAGE,
                                                                     VOLUME),
        format=DiskFormat.COW, readonly=True, shared=True, serial=IMAGE, boot_order=2,
        address={"type": "pci", "domain": "0x0000", "bus": "0x00", "slot": "0x07",
                 "function": "0x0"},
        error_policy=ErrorPolicy.REPORT, device_id=DEVICE)


def test_cdrom_from_a_domain_volume() -> None:
    cd = """<disk type='file' device='cdrom'><source file='/iso'/>
      <target dev='hdc' bus='ide'/><driver type='raw' error_policy='report'/></disk>"""
    meta = f"<ovirt-vm:device devtype='disk' name='hdc'>{PDIV_META}</ovirt-vm:device>"
    [hdc] = domxml.parse_domain(domain(cd, meta), VM_ID).disks
    assert (hdc.device, hdc.bus, hdc.index, hdc.readonly) == (DiskDevice.CDROM, DiskBus.SATA,
                                                              2, True)


# -- XML: what is refused ------------------------------------------------------------

def _disk(dev: str = "sdb", bus: str = "scsi", *, kind: str = "file", device: str = "disk",
          inner: str = "", attrs: str = "") -> str:
    return (f"<disk type='{kind}' device='{device}' {attrs}><source file='/x'/>"
            f"<target dev='{dev}' bus='{bus}'/>{inner}</disk>")


def _meta(name: str = "sdb", body: str = PDIV_META) -> str:
    return (f"<ovirt-vm:device devtype='disk' name='sda'>{PDIV_META}</ovirt-vm:device>"
            f"<ovirt-vm:device devtype='disk' name='{name}'>{body}</ovirt-vm:device>")


GUID_META = f"<ovirt-vm:GUID>{GUID}</ovirt-vm:GUID>"

XML_REFUSALS = [
    ("uuid mismatch", domain(uuid="11111111-2222-3333-4444-555555555555"),
     errors.InvalidParameter, "<uuid>: 11111111-2222-3333-4444-555555555555 is not the vmId"),
    ("no uuid", domain(uuid=""), errors.MissingParameter, "<uuid>"),
    ("no name", domain().replace("<name>vm1</name>", ""), errors.MissingParameter, "<name>"),
    ("bad name", domain().replace("<name>vm1</name>", "<name>vm\t1</name>"),
     errors.InvalidParameter, "not a VM name"),
    ("no memory", domain(memory=""), errors.MissingParameter, "<memory>"),
    ("zero memory", domain(memory="<memory>0</memory>"), errors.InvalidParameter,
     "<memory>: 0 out of range"),
    ("bad unit", domain(memory="<memory unit='furlong'>1</memory>"),
     errors.InvalidParameter, "unknown unit"),
    ("part MiB", domain(memory="<memory unit='KiB'>1000</memory>"), errors.InvalidParameter,
     "not a whole number of MiB"),
    ("vcpu current>max", domain(vcpu="<vcpu current='4'>2</vcpu>"), errors.InvalidParameter,
     "4 vCPUs is more than the maximum 2"),
    ("vcpu zero", domain(vcpu="<vcpu>0</vcpu>"), errors.InvalidParameter, "<vcpu>: 0 out"),
    ("topology", domain(cpu="<cpu><topology sockets='2' cores='2' threads='1'/></cpu>"),
     errors.InvalidParameter, "2 sockets \\* 2 cores \\* 1 threads is not the VM's 2 vCPUs"),
    ("cpu mode", domain(cpu="<cpu mode='maximum'/>"), errors.InvalidParameter, "cpu mode"),
    ("cpu model", domain(cpu="<cpu><model>a,b</model></cpu>"), errors.InvalidParameter,
     "<model>: not a valid name"),
    ("xen", domain(kind="xen"), errors.CannotCreateVM, "domain type 'xen'"),
    ("ppc64", domain(os="<os><type arch='ppc64'>hvm</type></os>"), errors.CannotCreateVM,
     "arch"),
    ("not hvm", domain(os="<os><type>exe</type></os>"), errors.CannotCreateVM, "hvm"),
    ("boot mix", domain(SDA.replace("</disk>", "<boot order='1'/></disk>"),
                        os="<os><type>hvm</type><boot dev='hd'/></os>"),
     errors.InvalidParameter, "both a whole-VM boot order"),
    ("boot dev", domain(os="<os><type>hvm</type><boot dev='usb'/></os>"),
     errors.InvalidParameter, "unknown boot device"),
    ("network disk", domain(SDA + "<disk type='network' device='disk'><source protocol='rbd' "
                            "name='p/v'/><target dev='sdb' bus='scsi'/></disk>", _meta()),
     errors.CannotCreateVM, "disk sdb: network disks \\(rbd\\)"),
    ("unknown bus", domain(SDA + _disk(bus="usb"), _meta()), errors.InvalidParameter,
     "disk sdb <target bus>: unknown bus 'usb'"),
    ("no bus", domain(SDA + _disk().replace(" bus='scsi'", ""), _meta()),
     errors.MissingParameter, "<target bus>"),
    ("bad dev", domain(SDA + _disk(dev="xda"), _meta("xda")), errors.InvalidParameter,
     "not a disk target name"),
    ("no metadata", domain(SDA + _disk(), ""), errors.InvalidParameter,
     "disk sda ovirt-vm:device: no domain volume"),
    ("half PDIV", domain(SDA + _disk(), _meta(body=f"<ovirt-vm:imageID>{IMAGE}"
                                              f"</ovirt-vm:imageID>")),
     errors.InvalidParameter, "poolID, domainID, volumeID missing"),
    ("PDIV and GUID", domain(SDA + _disk(), _meta(body=PDIV_META + GUID_META)),
     errors.InvalidParameter, "both a domain volume"),
    ("bad volume uuid", domain(SDA + _disk(), _meta(body=PDIV_META.replace(VOLUME, "v1"))),
     errors.InvalidParameter, "volumeID: not a UUID: 'v1'"),
    ("bad GUID", domain(SDA + _disk(kind="block", device="lun"),
                        _meta(body="<ovirt-vm:GUID>../../etc</ovirt-vm:GUID>")),
     errors.InvalidParameter, "GUID: not a LUN GUID"),
    ("duplicate dev", domain(SDA + _disk("sda"), _meta("sda")), errors.InvalidParameter,
     "two metadata entries for disk sda"),
    ("duplicate dev, one metadata", domain(SDA + SDA), errors.InvalidParameter,
     "two disks with target name sda"),
    ("duplicate index", domain(_disk("hda", "ide") + _disk("sda", "sata"),
                               "<ovirt-vm:device devtype='disk' name='hda'>"
                               f"{PDIV_META}</ovirt-vm:device>"
                               "<ovirt-vm:device devtype='disk' name='sda'>"
                               f"{PDIV_META}</ovirt-vm:device>"),
     errors.InvalidParameter, "two disks with index 0 on bus sata"),
    ("duplicate index by name", domain(SDA + _disk("vda", "scsi"), _meta("vda")),
     errors.InvalidParameter, "two disks with index 0 on bus scsi"),
    ("duplicate boot", domain(SDA.replace("</disk>", "<boot order='1'/></disk>")
                              + _disk(inner="<boot order='1'/>"), _meta()),
     errors.InvalidParameter, "two disks with boot order 1"),
    ("LUN cow", domain(SDA + _disk(kind="block", device="lun",
                                   inner="<driver type='qcow2'/>"), _meta(body=GUID_META)),
     errors.InvalidParameter, "a direct LUN is used raw"),
    ("LUN on virtio", domain(SDA + _disk("vda", "virtio", kind="block", device="lun"),
                             _meta("vda", GUID_META)),
     errors.CannotCreateVM, "device 'lun' \\(SCSI passthrough\\) needs bus scsi"),
    ("lun device with volume", domain(SDA + _disk(device="lun"), _meta()),
     errors.InvalidParameter, "give its GUID"),
    ("sgio on disk", domain(SDA + _disk(attrs="sgio='unfiltered'"), _meta()),
     errors.InvalidParameter, "sgio and SCSI reservations apply only"),
    ("cdrom LUN", domain(SDA + _disk("hdc", "ide", device="cdrom"), _meta("hdc", GUID_META)),
     errors.InvalidParameter, "CD-ROM's image must be a domain volume"),
    ("cdrom path only", domain(SDA + _disk("hdc", "ide", device="cdrom"), _meta("hdc", "")),
     errors.InvalidParameter, "a path alone is not used"),
    ("floppy", domain(SDA + _disk("fda", "fdc", device="floppy"), _meta("fda")),
     errors.CannotCreateVM, "floppy"),
    ("payload", domain(SDA + _disk("hdd", "ide", device="cdrom"),
                       _meta("hdd", "<ovirt-vm:payload><ovirt-vm:file path='a'>x"
                                    "</ovirt-vm:file></ovirt-vm:payload>")),
     errors.CannotCreateVM, "payload"),
    ("managed", domain(SDA + _disk(kind="block"), _meta(
        body=GUID_META + "<ovirt-vm:managed type='bool'>True</ovirt-vm:managed>")),
     errors.CannotCreateVM, "managed block storage"),
    ("rbd", domain(SDA + _disk(kind="block"), _meta(body="<ovirt-vm:RBD>/dev/rbd/p/v"
                                                         "</ovirt-vm:RBD>")),
     errors.CannotCreateVM, "Ceph RBD"),
    ("transient", domain(SDA + _disk(), _meta(body=PDIV_META + "<ovirt-vm:shared>transient"
                                                               "</ovirt-vm:shared>")),
     errors.CannotCreateVM, "transient"),
    ("driver type", domain(SDA + _disk(inner="<driver type='vmdk'/>"), _meta()),
     errors.InvalidParameter, "unknown format 'vmdk'"),
    ("error policy", domain(SDA + _disk(inner="<driver error_policy='panic'/>"), _meta()),
     errors.InvalidParameter, "unknown policy 'panic'"),
    ("serial", domain(SDA + _disk(inner="<serial>a,b=c</serial>"), _meta()),
     errors.InvalidParameter, "not a disk serial"),
    ("alias", domain(SDA + _disk(inner="<alias name='ua-nope'/>"), _meta()),
     errors.InvalidParameter, "<alias name>: not a UUID"),
    ("scsi hostdev", domain(extra="", disks=SDA + "<hostdev mode='subsystem' type='scsi'/>"),
     errors.CannotCreateVM, "<hostdev> devices"),
    ("not a domain", "<hotplug/>", errors.InvalidParameter, "not <domain>"),
    ("not XML", "<domain>", errors.InvalidParameter, "not well-formed"),
]


@pytest.mark.parametrize(("xml", "error", "match"), [r[1:] for r in XML_REFUSALS],
                         ids=[r[0] for r in XML_REFUSALS])
def test_xml_refusals(xml: str, error: type[errors.VdsmError], match: str) -> None:
    with pytest.raises(error, match=match) as e:
        domxml.parse_domain(xml, VM_ID)
    assert type(e.value) is error


def test_disk_refusal_codes_follow_the_verb() -> None:
    floppy = ("<hotplug><devices><disk device='floppy'><target dev='fda' bus='fdc'/></disk>"
              "</devices></hotplug>")
    with pytest.raises(errors.HotplugDiskFailed):
        domxml.parse_hotplug(floppy, VM_ID)
    with pytest.raises(errors.HotunplugDiskFailed):
        domxml.parse_hotplug(floppy, VM_ID, unplug=True)
    with pytest.raises(errors.HotplugDiskFailed, match="nothing to plug"):
        domxml.parse_hotplug("<hotplug><devices><disk device='cdrom'>"
                             "<target dev='hdc' bus='ide'/></disk></devices></hotplug>", VM_ID)
    with pytest.raises(errors.InvalidParameter, match="2 <devices><disk> elements"):
        domxml.parse_hotplug(f"<hotplug><devices>{SDA}{SDA}</devices></hotplug>", VM_ID)
    with pytest.raises(errors.InvalidParameter, match="vmId: not a UUID"):
        domxml.parse_hotplug(floppy, "vm1")
    with pytest.raises(errors.HotunplugDiskFailed):
        legacy.parse_drive({"type": "disk", "device": "floppy"}, unplug=True)
    assert (errors.CannotCreateVM.code, errors.HotplugDiskFailed.code,
            errors.HotunplugDiskFailed.code, errors.InvalidParameter.code,
            errors.MissingParameter.code) == (9, 45, 46, 91, 11)


# -- hostile XML ----------------------------------------------------------------------

BILLION_LAUGHS = """<?xml version="1.0"?>
<!DOCTYPE lolz [
 <!ENTITY lol "lol">
 <!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
 <!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">
 <!ENTITY lol4 "&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;">
 <!ENTITY lol5 "&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;">
 <!ENTITY lol6 "&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;">
 <!ENTITY lol7 "&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;">
 <!ENTITY lol8 "&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;">
 <!ENTITY lol9 "&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;">
]>
<domain type='kvm'><name>&lol9;</name></domain>"""


@pytest.mark.parametrize("xml", [
    BILLION_LAUGHS,
    '<!DOCTYPE d [<!ENTITY x SYSTEM "file:///etc/passwd">]><domain><name>&x;</name></domain>',
    '<!DOCTYPE d [<!ENTITY % p SYSTEM "http://127.0.0.1:9/x.dtd"> %p;]><domain/>',
    '<!DOCTYPE domain SYSTEM "http://127.0.0.1:9/domain.dtd"><domain/>',
    "<!DOCTYPE domain><domain/>",
], ids=["billion-laughs", "xxe-file", "xxe-parameter-entity", "external-dtd", "doctype"])
def test_doctype_refused(xml: str) -> None:
    with pytest.raises(errors.InvalidParameter, match="DOCTYPE"):
        domxml.parse_domain(xml, VM_ID)
    plug = xml.replace("<domain", "<hotplug").replace("</domain>", "</hotplug>")
    with pytest.raises(errors.InvalidParameter, match="DOCTYPE"):
        domxml.parse_hotplug(plug.replace("<hotplug/>", "<hotplug></hotplug>"), VM_ID)


def test_doctype_refused_in_any_encoding() -> None:
    """The byte scan misses UTF-16; the check after parsing does not."""
    xml = '<?xml version="1.0" encoding="UTF-16"?><!DOCTYPE domain><domain/>'.encode("utf-16")
    assert b"<!DOCTYPE" not in xml
    with pytest.raises(errors.InvalidParameter, match="DOCTYPE"):
        domxml.parse_domain(xml, VM_ID)


def test_oversized_document_refused() -> None:
    padding = "<!-- " + "x" * domxml.MAX_XML_BYTES + " -->"
    with pytest.raises(errors.InvalidParameter, match="bytes, more than"):
        domxml.parse_domain(domain().replace("<devices>", padding + "<devices>"), VM_ID)


def test_bytes_and_str_read_alike() -> None:
    xml = read("vdsm-domain_disk_block.xml")
    vm_id = uuid_of(xml)
    assert domxml.parse_domain(xml.encode(), vm_id) == domxml.parse_domain(xml, vm_id)


# -- legacy: what is read and refused ------------------------------------------------

def test_legacy_strings_and_native_types_alike() -> None:
    strings = legacy_vm({**SDA_DICT, "readonly": "True", "bootOrder": "1"},
                        smp="2", maxVCpus="4", launchPaused="true")
    natives = legacy_vm({**SDA_DICT, "index": 0, "readonly": True, "bootOrder": 1},
                        memSize=1024, smp=2, maxVCpus=4, launchPaused=True)
    assert legacy.parse_vm_params(strings) == legacy.parse_vm_params(natives)
    vm = legacy.parse_vm_params(natives)
    assert (vm.vcpus, vm.max_vcpus, vm.launch_paused, vm.disks[0].readonly) == (2, 4, True,
                                                                                True)


def test_legacy_names_follow_vdsm() -> None:
    disks = [{**SDA_DICT, "iface": iface, "index": index}
             for iface, index in (("virtio", 0), ("virtio", 27), ("scsi", 1), ("ide", 2),
                                  ("sata", 3))]
    vm = legacy.parse_vm_params(legacy_vm(*disks))
    assert [(d.name, d.bus, d.index) for d in vm.disks] == [
        ("vda", DiskBus.VIRTIO, 0), ("vdab", DiskBus.VIRTIO, 27), ("sdb", DiskBus.SCSI, 1),
        ("hdc", DiskBus.SATA, 2), ("sdd", DiskBus.SATA, 3)]
    assert "interface hostdev" in legacy.parse_vm_params(legacy_vm(
        SDA_DICT, {"type": "interface", "device": "hostdev"})).ignored


@pytest.mark.parametrize(("index", "name"), [(0, "a"), (25, "z"), (26, "aa"), (701, "zz"),
                                             (702, "aaa"), (18277, "zzz")])
def test_disk_names_base26(index: int, name: str) -> None:
    assert checks.disk_name("scsi", index) == "sd" + name
    assert checks.disk_index("sd" + name, "f") == index


@pytest.mark.parametrize(("word", "policy"), [("off", ErrorPolicy.STOP),
                                              ("false", ErrorPolicy.STOP),
                                              ("on", ErrorPolicy.ENOSPACE),
                                              ("True", ErrorPolicy.ENOSPACE),
                                              ("report", ErrorPolicy.REPORT)])
def test_legacy_propagate_errors(word: str, policy: ErrorPolicy) -> None:
    assert legacy.parse_drive({**SDA_DICT, "propagateErrors": word}).error_policy is policy


@pytest.mark.parametrize(("word", "shared"), [("false", False), ("none", False),
                                              ("exclusive", False), ("true", True),
                                              ("shared", True), (True, True)])
def test_legacy_shared(word: Any, shared: bool) -> None:
    assert legacy.parse_drive({**SDA_DICT, "shared": word}).shared is shared


def test_legacy_topology_and_overcommit() -> None:
    vm = legacy.parse_vm_params(legacy_vm(memSize=str(4 * 1024 * 1024), smp="4",
                                          maxVCpus="16", smpCoresPerSocket="2",
                                          smpThreadsPerCore="2"))
    assert (vm.memory_mib, vm.cpu_sockets, vm.cpu_cores, vm.cpu_threads) == (
        4 * 1024 * 1024, 4, 2, 2)


LEGACY_REFUSALS = [
    ("no vmId", {"vmId": None}, None, errors.MissingParameter, "vmParams.vmId"),
    ("vmId", {"vmId": "vm1"}, None, errors.InvalidParameter, "vmParams.vmId: not a UUID"),
    ("no name", {"vmName": ""}, None, errors.MissingParameter, "vmParams.vmName"),
    ("name", {"vmName": "a\nb"}, None, errors.InvalidParameter, "vmParams.vmName"),
    ("no memSize", {"memSize": None}, None, errors.MissingParameter, "vmParams.memSize"),
    ("memSize text", {"memSize": "lots"}, None, errors.InvalidParameter,
     "vmParams.memSize: not an integer"),
    ("memSize 0", {"memSize": 0}, None, errors.InvalidParameter, "memSize: 0 out of range"),
    ("memSize negative", {"memSize": "-1"}, None, errors.InvalidParameter, "memSize"),
    ("memSize bool", {"memSize": True}, None, errors.InvalidParameter, "not an integer"),
    ("smp>max", {"smp": "8", "maxVCpus": "4"}, None, errors.InvalidParameter,
     "8 vCPUs is more than the maximum 4"),
    ("smp 0", {"smp": "0"}, None, errors.InvalidParameter, "vmParams.smp: 0 out"),
    ("cores", {"smp": "3", "smpCoresPerSocket": "2"}, None, errors.InvalidParameter,
     "not whole sockets"),
    ("cpuType", {"cpuType": "Haswell,vmx"}, None, errors.InvalidParameter,
     "neither \\+name nor -name"),
    ("machine", {"emulatedMachine": "pc q35"}, None, errors.InvalidParameter,
     "emulatedMachine: not a valid name"),
    ("launchPaused", {"launchPaused": "maybe"}, None, errors.InvalidParameter,
     "launchPaused: not a boolean"),
    ("devices", {"devices": {}}, None, errors.InvalidParameter, "devices: not a list"),
    ("LUN cow", {}, {**dict.fromkeys(PDIV), "GUID": GUID, "device": "lun", "format": "cow"},
     errors.InvalidParameter, "devices\\[1\\]: a direct LUN is used raw"),
    ("format", {}, {"format": "vmdk"}, errors.InvalidParameter, "devices\\[1\\].format"),
    ("dup index", {}, {"index": "0"}, errors.InvalidParameter,
     "two disks with target name sda"),
    ("dup index ide/sata", {}, {"iface": "ide", "index": 0, "__also_sata": True},
     errors.InvalidParameter, "two disks with index 0 on bus sata"),
    ("no index", {}, {"index": None}, errors.MissingParameter, "devices\\[1\\].index"),
    ("index text", {}, {"index": "one"}, errors.InvalidParameter, "index: not an integer"),
    ("iface", {}, {"iface": "fdc"}, errors.InvalidParameter, "unknown bus 'fdc'"),
    ("no iface", {}, {"iface": None}, errors.MissingParameter, "devices\\[1\\].iface"),
    ("pool uuid", {}, {"poolID": "pool"}, errors.InvalidParameter,
     "devices\\[1\\].poolID: not a UUID"),
    ("half PDIV", {}, {"volumeID": None}, errors.InvalidParameter, "volumeID missing"),
    ("both", {}, {"GUID": GUID}, errors.InvalidParameter, "both a domain volume"),
    ("path only", {}, {**dict.fromkeys(PDIV), "path": "/some/where"},
     errors.InvalidParameter, "a path alone is not used"),
    ("GUID", {}, {**dict.fromkeys(PDIV), "GUID": "a b", "device": "lun"},
     errors.InvalidParameter, "GUID: not a LUN GUID"),
    ("transient", {}, {"shared": "transient"}, errors.CannotCreateVM, "transient"),
    ("shared", {}, {"shared": "sometimes"}, errors.InvalidParameter, "shared: unknown"),
    ("propagate", {}, {"propagateErrors": "loud"}, errors.InvalidParameter,
     "propagateErrors: unknown"),
    ("network", {}, {"diskType": "network", "protocol": "gluster"}, errors.CannotCreateVM,
     "network disks \\(gluster\\)"),
    ("payload", {}, {"device": "cdrom", "specParams": {"vmPayload": {"file": {"a": "b"}}}},
     errors.CannotCreateVM, "payload"),
    ("floppy", {}, {"device": "floppy"}, errors.CannotCreateVM, "floppy"),
    ("managed", {}, {"managed": "true"}, errors.CannotCreateVM, "managed block storage"),
    ("sgio on disk", {}, {"sgio": "unfiltered"}, errors.InvalidParameter,
     "sgio and SCSI reservations apply only"),
    ("sgio word", {}, {"sgio": "maybe"}, errors.InvalidParameter, "sgio: unknown"),
    ("deviceId", {}, {"deviceId": "disk-1"}, errors.InvalidParameter,
     "deviceId: not a UUID"),
    ("serial", {}, {"serial": "x" * 65}, errors.InvalidParameter, "not a disk serial"),
    ("address", {}, {"address": {"slot": "0x01,bus=0"}}, errors.InvalidParameter,
     "address: not an address entry"),
    ("bootOrder", {}, {"bootOrder": "0"}, errors.InvalidParameter, "bootOrder: 0 out"),
    ("device", {}, {"device": "tape"}, errors.InvalidParameter, "unknown device 'tape'"),
]


@pytest.mark.parametrize(("params", "disk", "error", "match"), [r[1:] for r in LEGACY_REFUSALS],
                         ids=[r[0] for r in LEGACY_REFUSALS])
def test_legacy_refusals(params: dict[str, Any], disk: dict[str, Any] | None,
                         error: type[errors.VdsmError], match: str) -> None:
    devices: list[dict[str, Any]] = [{"type": "disk", "device": "cdrom", "iface": "ide",
                                      "index": "2", "path": ""}, SDA_DICT]
    if disk is not None:
        also_sata = disk.pop("__also_sata", False)
        devices = [devices[0], {**SDA_DICT, "index": "1", **disk}]
        if also_sata:
            devices.append({**SDA_DICT, "iface": "sata", "index": 0})
        else:
            devices.append(SDA_DICT)
    vm_params = {**legacy_vm(*devices), **params}
    with pytest.raises(error, match=match) as e:
        legacy.parse_vm_params(vm_params)
    assert type(e.value) is error


# -- entry points and round trip -------------------------------------------------------

def test_parse_create_picks_the_form() -> None:
    xml = domain()
    assert requests.parse_create(VM_ID, {"vmId": VM_ID, "xml": xml}).source_form == "xml"
    assert requests.parse_create(VM_ID, legacy_vm(SDA_DICT)).source_form == "dict"
    other = "11111111-2222-3333-4444-555555555555"
    with pytest.raises(errors.InvalidParameter, match=r"vmParams\.vmId: .* is not the vmID"):
        requests.parse_create(other, {"vmId": VM_ID, "xml": xml})
    with pytest.raises(errors.InvalidParameter, match="is not the vmID"):
        requests.parse_create(other, legacy_vm(SDA_DICT))
    # The legacy form may leave vmId to the verb.
    assert requests.parse_create(VM_ID, {**legacy_vm(), "vmId": None}).vm_id == VM_ID


def test_parse_hotplug_picks_the_form() -> None:
    plug = read("vdsm-device_test-BLOCK_DISK_HOTPLUG.xml")
    from_xml = requests.parse_hotplug(VM_ID, {"vmId": VM_ID, "xml": plug})
    from_dict = requests.parse_hotplug(VM_ID, {"vmId": VM_ID, "drive": {
        "type": "disk", "device": "lun", "GUID": "lun1", "iface": "scsi", "index": "0",
        "sgio": "unfiltered", "managed_reservation": "true",
        "address": {"bus": "0", "controller": "0", "unit": "1", "type": "drive",
                    "target": "0"}}})
    assert from_xml == from_dict
    with pytest.raises(errors.HotunplugDiskFailed):
        requests.parse_hotplug(VM_ID, {"drive": {"device": "floppy"}}, unplug=True)
    with pytest.raises(errors.MissingParameter, match=r"params\.xml"):
        requests.parse_hotplug(VM_ID, {"vmId": VM_ID})
    with pytest.raises(errors.InvalidParameter, match=r"params\.vmId"):
        requests.parse_hotplug(VM_ID, {"vmId": "11111111-2222-3333-4444-555555555555",
                                       "xml": plug})


def _all_parsed() -> list[VmDefinition]:
    vms = [domxml.parse_domain(read(n), uuid_of(read(n))) for n in (
        "vdsm-domain_disk_block.xml", "vdsm-vm_compat41.xml", "vdsm-vm_hibernated.xml")]
    lun = {"type": "disk", "device": "lun", "GUID": GUID, "iface": "scsi", "index": 1,
           "sgio": "filtered", "managed_reservation": True, "propagateErrors": "report"}
    vms.append(legacy.parse_vm_params(legacy_vm(SDA_DICT, lun, cpuType="Haswell,+vmx",
                                                smpCoresPerSocket="2")))
    return vms


@pytest.mark.parametrize("vm", _all_parsed(), ids=lambda vm: vm.name)
def test_round_trip(vm: VmDefinition) -> None:
    vm.disks[0].path = "/run/vdsm/storage/x"  # as after preparing
    vm.disks[0].chain = ["base", "top"]
    again = VmDefinition.from_dict(json.loads(json.dumps(vm.to_dict())))
    assert again == vm
    assert [type(d.source) for d in again.disks] == [type(d.source) for d in vm.disks]
    assert copy.deepcopy(again).to_dict() == vm.to_dict()


# --- VM leases ------------------------------------------------------------------------

SD = "5b9a7c61-0d3e-4b7a-9f2c-6e8d1a4b3c2f"
LEASE_XML = ("<lease><key>{key}</key><lockspace>{sd}</lockspace>"
             "<target path='{path}' offset='{offset}'/></lease>")


def test_vm_lease_placeholders_are_resolved_later_in_both_forms() -> None:
    """The engine sends VDSM's placeholders; only the running host knows the path."""
    placeholder = LEASE_XML.format(key=VM_ID, sd=SD, path=f"LEASE-PATH:{VM_ID}:{SD}",
                                   offset=f"LEASE-OFFSET:{VM_ID}:{SD}")
    from_xml = domxml.parse_domain(domain().replace("</devices>", placeholder + "</devices>"),
                                   VM_ID)
    from_dict = legacy.parse_vm_params(legacy_vm(
        SDA_DICT, {"type": "lease", "device": "lease", "lease_id": VM_ID, "sd_id": SD,
                   "path": f"LEASE-PATH:{VM_ID}:{SD}", "offset": f"LEASE-OFFSET:{VM_ID}:{SD}"}))
    assert from_xml.lease == from_dict.lease == LeaseSpec(sd_id=SD, lease_id=VM_ID)
    # And it survives vm.json.
    assert VmDefinition.from_dict(from_xml.to_dict()).lease == from_xml.lease


def test_vm_lease_with_its_place() -> None:
    xml = LEASE_XML.format(key=VM_ID, sd=SD, path="/dev/x/xleases", offset=3 << 20)
    vm = domxml.parse_domain(domain().replace("</devices>", xml + "</devices>"), VM_ID)
    assert vm.lease == LeaseSpec(SD, VM_ID, "/dev/x/xleases", 3 << 20)


@pytest.mark.parametrize("lease, match", [
    ({"sd_id": "nope", "lease_id": VM_ID}, "sd_id"),
    ({"sd_id": SD, "lease_id": None}, "lease_id"),
    ({"sd_id": SD, "lease_id": VM_ID, "path": "relative/xleases", "offset": 0}, "path"),
    ({"sd_id": SD, "lease_id": VM_ID, "offset": 1048576}, "offset without its path"),
    ({"sd_id": SD, "lease_id": VM_ID, "path": "/x", "offset": -1}, "offset"),
])
def test_vm_lease_refusals_name_the_field(lease: dict[str, Any], match: str) -> None:
    with pytest.raises(errors.VdsmError, match=match):
        legacy.parse_vm_params(legacy_vm(SDA_DICT, {"type": "lease", **lease}))


def test_a_second_vm_lease_is_refused() -> None:
    dev = {"type": "lease", "sd_id": SD, "lease_id": VM_ID}
    with pytest.raises(errors.InvalidParameter, match="second VM lease"):
        legacy.parse_vm_params(legacy_vm(SDA_DICT, dev, dev))
