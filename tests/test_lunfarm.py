"""The loop-device LUN farm: identities where udev puts them, and strict cleanup."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import pyudev

from fake_storage.lunfarm import BY_ID, BY_PATH, FarmError, LunFarm, parse_size

pytestmark = pytest.mark.root


def loops_attached() -> set[str]:
    out = subprocess.run(["losetup", "--list", "--noheadings", "--output", "NAME"],
                         capture_output=True, text=True, check=True).stdout
    return set(out.split())


def test_luns_carry_scsi_identities_readable_through_pyudev(lun_farm: LunFarm) -> None:
    iscsi = lun_farm.add("64M")
    fc = lun_farm.add("128M", sector_size=4096, transport="fc")
    assert iscsi.guid.startswith("36001405") and len(iscsi.guid) == 33
    ctx = pyudev.Context()
    dev = pyudev.Devices.from_device_file(ctx, iscsi.loop)
    props = dict(dev.properties)
    assert props["ID_SERIAL"] == iscsi.guid
    assert props["ID_WWN_WITH_EXTENSION"] == "0x" + iscsi.guid[1:]
    assert props["ID_BUS"] == "scsi"
    assert props["ID_VENDOR"] == "LIO-ORG"
    assert props["ID_PATH"] == \
        f"ip-10.35.0.10:3260-iscsi-iqn.2003-01.org.linux-iscsi.storage:target1-lun-{iscsi.lun}"
    assert dev.attributes.get("queue/logical_block_size") == b"512"
    assert f"/dev/disk/by-id/scsi-{iscsi.guid}" in set(dev.device_links)
    assert os.path.realpath(BY_ID / f"scsi-{iscsi.guid}") == iscsi.loop
    assert os.path.realpath(BY_ID / f"wwn-0x{iscsi.guid[1:]}") == iscsi.loop
    assert os.path.realpath(BY_PATH / iscsi.id_path) == iscsi.loop
    fcdev = pyudev.Devices.from_device_file(ctx, fc.loop)
    assert fcdev.attributes.get("queue/logical_block_size") == b"4096"
    assert "-fc-0x5006016" in fcdev.properties["ID_PATH"]
    assert os.path.getsize(fc.backing) == 128 * 1024 * 1024
    assert os.stat(fc.backing).st_blocks == 0  # sparse


def test_destroy_removes_everything(tmp_path: Path) -> None:
    before = loops_attached()
    farm = LunFarm(tmp_path / "farm")
    luns = farm.create(3, "32M")
    assert {lun.loop for lun in luns} <= loops_attached()
    assert farm.destroy() == []
    assert loops_attached() == before
    for lun in luns:
        assert not Path(lun.udev_file).exists()
        assert not Path(lun.backing).exists()
        assert not any(os.path.lexists(link) for link in lun.links)
    assert not farm.manifest.exists()


def test_refuses_to_detach_a_loop_it_did_not_create(lun_farm: LunFarm, tmp_path: Path) -> None:
    lun = lun_farm.add("32M")
    # Someone else's loop device, recorded in the manifest as if it were ours.
    foreign_file = tmp_path / "foreign.img"
    foreign_file.write_bytes(b"\0" * 1024 * 1024)
    foreign = subprocess.run(["losetup", "-f", "--show", str(foreign_file)],
                             capture_output=True, text=True, check=True).stdout.strip()
    try:
        forged = LunFarm(lun_farm.dir)
        forged.luns[0].loop = foreign
        with pytest.raises(FarmError, match="not by this farm"):
            forged.remove(forged.luns[0])
        assert foreign in loops_attached()
    finally:
        subprocess.run(["losetup", "-d", foreign], check=True)
    assert lun.loop in loops_attached()  # the farm's own LUN is untouched too


def test_refuses_to_overwrite_a_udev_file_it_did_not_write(lun_farm: LunFarm) -> None:
    lun = lun_farm.add("32M")
    udev_file = Path(lun.udev_file)
    original = udev_file.read_text()
    udev_file.write_text("E:ID_SERIAL=someone-elses\n")
    try:
        lun_farm._unpublish(lun)
        assert udev_file.read_text() == "E:ID_SERIAL=someone-elses\n"
    finally:
        udev_file.write_text(original)


def test_command_line(tmp_path: Path) -> None:
    d = tmp_path / "cli-farm"
    py = [sys.executable, "-m", "fake_storage", "lunfarm"]
    out = subprocess.run([*py, "create", "--count", "2", "--size", "16M", "--dir", str(d),
                          "--sector-size", "4096", "--transport", "fc"],
                         capture_output=True, text=True, check=True).stdout.split("\n")
    guids = [line.split()[0] for line in out if line]
    assert len(guids) == 2
    listed = json.loads(subprocess.run([*py, "list", "--dir", str(d)], capture_output=True,
                                       text=True, check=True).stdout)
    assert [x["guid"] for x in listed] == guids
    assert {x["sector_size"] for x in listed} == {4096}
    subprocess.run([*py, "destroy", "--dir", str(d)], check=True)
    assert not (d / "lunfarm.json").exists()
    assert not any(Path(x["loop"]).exists() and x["loop"] in loops_attached() and
                   Path(f"/sys/block/{Path(x['loop']).name}/loop/backing_file").exists()
                   and x["backing"] in Path(f"/sys/block/{Path(x['loop']).name}/loop/"
                                            "backing_file").read_text() for x in listed)


def test_parse_size() -> None:
    assert parse_size("1G") == 1 << 30
    assert parse_size("512M") == 512 << 20
    assert parse_size("1GiB") == 1 << 30
    assert parse_size("4096") == 4096
