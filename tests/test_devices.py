"""Host.getDeviceList / getDevicesVisibility on real loop LUNs with real signatures."""

from __future__ import annotations

import contextlib
import os
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fake_storage.agent import Agent
from fake_storage.lunfarm import MARKER, UDEV_DATA, FakeLun, LunFarm
from vdsmlite.client import ServerError
from vdsmlite.storage import devices

pytestmark = pytest.mark.root


def device_list(agent: Agent, **params: Any) -> dict[str, dict[str, Any]]:
    with agent.client() as c:
        return {d["GUID"]: d for d in c.call("Host.getDeviceList", params)}


def lvm(*argv: str, devices_: list[str]) -> None:
    filt = ",".join(f'"a|^{d}$|"' for d in devices_) + ',"r|.*|"'
    subprocess.run([argv[0], "--config", f"devices {{ filter=[{filt}] use_devicesfile=0 }}",
                    *argv[1:]], check=True, capture_output=True,
                   env={**os.environ, "LVM_SUPPRESS_FD_WARNINGS": "1"})


def write_mbr(path: str) -> None:
    mbr = bytearray(512)
    mbr[446:462] = bytes([0, 0, 2, 0, 0x83, 0, 0, 0]) + struct.pack("<II", 2048, 4096)
    mbr[510:512] = b"\x55\xaa"
    with open(path, "r+b") as f:
        f.write(mbr)


def test_lists_farm_luns_with_vdsm_fields(agent: Agent, lun_farm: LunFarm) -> None:
    iscsi = lun_farm.add("256M")
    fc = lun_farm.add("512M", sector_size=4096, transport="fc")
    listed = device_list(agent, checkStatus=True)
    assert set(listed) == {iscsi.guid, fc.guid}
    d = listed[iscsi.guid]
    assert d == {
        "GUID": iscsi.guid,
        "capacity": str(256 * 1024 * 1024),
        "devtype": "iSCSI",
        "vendorID": "LIO-ORG",
        "productID": iscsi.model,
        "serial": iscsi.serial,
        "fwrev": "4.0",
        "logicalblocksize": "512",
        "physicalblocksize": "512",
        "discard_max_bytes": d["discard_max_bytes"],
        "discard_zeroes_data": 0,
        "pathlist": [{"connection": "10.35.0.10", "port": "3260",
                      "iqn": "iqn.2003-01.org.linux-iscsi.storage:target1", "portal": "1",
                      "initiatorname": "default"}],
        "pathstatus": [{"type": "iSCSI", "physdev": iscsi.name, "state": "active",
                        "capacity": str(256 * 1024 * 1024), "lun": str(iscsi.lun)}],
        "pvUUID": "", "pvsize": "", "vgUUID": "",
        "status": "free",
    }
    f = listed[fc.guid]
    assert f["devtype"] == "FCP"
    assert f["pathlist"] == []
    assert f["pathstatus"][0]["type"] == "FCP"
    assert (f["logicalblocksize"], f["physicalblocksize"]) == ("4096", "4096")


def test_status_reflects_what_is_on_the_lun(agent: Agent, lun_farm: LunFarm) -> None:
    free, pv, vg, fs, parted = lun_farm.create(5, "64M")
    lvm("pvcreate", "-q", pv.loop, devices_=[pv.loop])
    lvm("vgcreate", "-q", "vdsmlite-test-vg", vg.loop, devices_=[vg.loop])
    subprocess.run(["mkfs.ext4", "-q", fs.loop], check=True)
    write_mbr(parted.loop)
    try:
        listed = device_list(agent, checkStatus=True)
        assert listed[free.guid]["status"] == "free"
        for lun in (pv, vg, fs, parted):
            assert listed[lun.guid]["status"] == "used", lun
        assert listed[pv.guid]["pvUUID"] and listed[pv.guid]["vgUUID"] == ""
        assert int(listed[pv.guid]["pvsize"]) > 0
        assert listed[vg.guid]["pvUUID"] and listed[vg.guid]["vgUUID"]
        assert listed[fs.guid]["pvUUID"] == ""
        # Without checking, status is unknown but PV identity is still reported.
        quick = device_list(agent, checkStatus=False)
        assert {d["status"] for d in quick.values()} == {"unknown"}
        assert quick[vg.guid]["vgUUID"] == listed[vg.guid]["vgUUID"]
    finally:
        lvm("vgremove", "-q", "-f", "vdsmlite-test-vg", devices_=[vg.loop])
        lvm("pvremove", "-q", "-f", pv.loop, vg.loop, devices_=[pv.loop, vg.loop])


def test_filters(agent: Agent, lun_farm: LunFarm) -> None:
    a, b = lun_farm.create(2, "32M")
    c = lun_farm.add("32M", transport="fc")
    assert set(device_list(agent, guids=[a.guid, "36001405ffffffffffffffffffffffff0"])) == {a.guid}
    assert set(device_list(agent, storageType=3)) == {a.guid, b.guid}
    assert set(device_list(agent, storageType="ISCSI")) == {a.guid, b.guid}
    assert set(device_list(agent, storageType=2)) == {c.guid}
    assert device_list(agent, storageType=1) == {}  # NFS has no LUNs
    assert set(device_list(agent, storageType=0)) == {a.guid, b.guid, c.guid}


@pytest.mark.parametrize("bad", ["../../etc/passwd", "", "a b", "x" * 200, "guid;rm"])
def test_malformed_guids_are_refused(shared_agent: Agent, bad: str) -> None:
    with shared_agent.client() as c, pytest.raises(ServerError) as e:
        c.call("Host.getDeviceList", {"guids": [bad]})
    assert e.value.code == -32602
    assert e.value.data["param"] == "guids[0]"


def test_visibility(agent: Agent, lun_farm: LunFarm) -> None:
    a, b = lun_farm.create(2, "32M")
    unknown = "36001405ffffffffffffffffffffffff0"
    with agent.client() as c:
        assert c.call("Host.getDevicesVisibility", {"guidList": [a.guid, b.guid, unknown]}) == \
            {a.guid: True, b.guid: True, unknown: False}
        lun_farm.remove(b)
        assert c.call("Host.getDevicesVisibility", {"guidList": [a.guid, b.guid]}) == \
            {a.guid: True, b.guid: False}


def test_loops_without_identity_and_partitions_are_not_luns(
        agent: Agent, lun_farm: LunFarm, tmp_path: Path) -> None:
    lun = lun_farm.add("64M")
    plain_file = tmp_path / "plain.img"
    plain_file.write_bytes(b"")
    os.truncate(plain_file, 64 << 20)
    write_mbr(str(plain_file))
    # A loop with no identity, with its partition table read: loopNp1 appears.
    plain = subprocess.run(["losetup", "-f", "--show", str(plain_file)],
                           capture_output=True, text=True, check=True).stdout.strip()
    part_udev: Path | None = None
    try:
        subprocess.run(["partx", "-a", plain], check=True, capture_output=True)
        part = Path(f"/sys/class/block/{os.path.basename(plain)}p1")
        assert part.exists(), "kernel did not create the partition device"
        # Give the partition a SCSI-looking identity: still not a LUN.
        major, minor = part.joinpath("dev").read_text().strip().split(":")
        part_udev = UDEV_DATA / f"b{major}:{minor}"
        part_udev.write_text(f"E:ID_SERIAL=36001405partition000000000000000\nE:ID_BUS=scsi\n"
                             f"E:{MARKER}=test\n")
        listed = device_list(agent)
        assert set(listed) == {lun.guid}
    finally:
        if part_udev is not None:
            part_udev.unlink(missing_ok=True)
        subprocess.run(["partx", "-d", plain], capture_output=True)
        subprocess.run(["losetup", "-d", plain], check=True)


@contextlib.contextmanager
def fake_identity_on_root_disk() -> Iterator[str]:
    """Pretend the disk the host boots from is a SCSI LUN (udev file), then undo it."""
    root_dev = subprocess.run(["findmnt", "-no", "MAJ:MIN", "/"], capture_output=True,
                              text=True, check=True).stdout.strip()
    disk = next(iter(devices._disk_names_under(tuple(map(int, root_dev.split(":"))))))
    devnum = Path(f"/sys/class/block/{disk}/dev").read_text().strip()
    udev_file = UDEV_DATA / f"b{devnum}"
    assert not udev_file.exists(), "refusing to overwrite the host's own udev data"
    udev_file.write_text("E:ID_SERIAL=36001405bootdisk0000000000000000\nE:ID_BUS=scsi\n"
                         f"E:{MARKER}=test\n")
    try:
        yield disk
    finally:
        udev_file.unlink()


def test_boot_disk_is_never_a_lun(agent: Agent, lun_farm: LunFarm) -> None:
    lun = lun_farm.add("32M")
    with fake_identity_on_root_disk() as disk:
        assert disk in devices.system_disks()
        assert set(device_list(agent)) == {lun.guid}


def test_lun_vanishing_between_listing_and_probing(lun_farm: LunFarm) -> None:
    a, b = lun_farm.create(2, "32M")
    luns = [x for x in devices.discover() if x.guid in (a.guid, b.guid)]
    assert len(luns) == 2
    lun_farm.remove(b)  # gone after discovery, before the probe
    st = devices.statuses(luns, check=True)
    assert set(st) == {a.guid}
    assert st[a.guid].state == "free"


def test_discovery_parses_udev_paths() -> None:
    assert devices.parse_id_path(
        "ip-10.35.0.10:3260-iscsi-iqn.2003-01.org.linux-iscsi.t1:target-1-lun-7") == (
        "iSCSI", 7,
        devices.IscsiTarget("10.35.0.10", 3260, "iqn.2003-01.org.linux-iscsi.t1:target-1"), None)
    transport, lun, target, _ = devices.parse_id_path(
        "ip-[fe80::1]:3260-iscsi-iqn.2003-01.x:y-lun-0")
    assert (transport, lun, target.address) == ("iSCSI", 0, "fe80::1")  # type: ignore[union-attr]
    assert devices.parse_id_path("pci-0000:41:00.0-fc-0x500601684460219D-lun-3") == (
        "FCP", 3, None, "0x500601684460219d")
    assert devices.parse_id_path("pci-0000:00:1f.2-ata-1")[0] == "FCP"


def removed_lun_is_absent(agent: Agent, lun_farm: LunFarm, lun: FakeLun) -> bool:
    lun_farm.remove(lun)
    return lun.guid not in device_list(agent)


def test_removed_lun_disappears_from_the_list(agent: Agent, lun_farm: LunFarm) -> None:
    a, b = lun_farm.create(2, "32M")
    assert set(device_list(agent)) == {a.guid, b.guid}
    assert removed_lun_is_absent(agent, lun_farm, b)
