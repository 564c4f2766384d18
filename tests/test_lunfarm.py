"""The loop-device LUN farm: identities where udev puts them, and strict cleanup."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import pyudev

from fake_storage.lunfarm import BY_ID, BY_PATH, FarmError, LunFarm, parse_size, reap_orphans
from tests.helpers import output_of_a_killed_runner

pytestmark = pytest.mark.root


def loops_attached(under: Path | None = None) -> set[str]:
    """Attached loop devices; with `under`, only those backed by a file below it or
    stacked on one of those: the suite's other worker attaches loops of its own."""
    out = subprocess.run(["losetup", "--list", "--noheadings", "--output", "NAME,BACK-FILE"],
                         capture_output=True, text=True, check=True).stdout
    backing = {}
    for line in out.splitlines():
        name, _, back = line.strip().partition(" ")
        backing[name] = back.strip()
    if under is None:
        return set(backing)
    ours = {n for n, b in backing.items() if b.startswith(f"{under}/")}
    while stacked := {n for n, b in backing.items() if b in ours} - ours:
        ours |= stacked
    return ours


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
    before = loops_attached(tmp_path)
    farm = LunFarm(tmp_path / "farm")
    luns = farm.create(3, "32M")
    assert {lun.loop for lun in luns} <= loops_attached(tmp_path)
    assert farm.destroy() == []
    assert loops_attached(tmp_path) == before
    for lun in luns:
        assert not Path(lun.udev_file).exists()
        assert not Path(lun.backing).exists()
        assert not any(os.path.lexists(link) for link in lun.links)
    assert not farm.manifest.exists()


def test_a_lun_without_host_cache_writes_its_file_with_direct_io(tmp_path: Path) -> None:
    farm = LunFarm(tmp_path / "farm", host_cache=False)
    try:
        cached, uncached = LunFarm(tmp_path / "cached").add("16M"), farm.add("16M")
        dio = {lun.loop: Path(f"/sys/block/{Path(lun.loop).name}/loop/dio").read_text().strip()
               for lun in (cached, uncached)}
        assert dio == {cached.loop: "0", uncached.loop: "1"}
        # written through the loop, read back from its file
        fd = os.open(uncached.loop, os.O_WRONLY)
        try:
            os.pwrite(fd, b"lun" * 4096, 4096)
            os.fsync(fd)
        finally:
            os.close(fd)
        with open(uncached.backing, "rb") as f:
            f.seek(4096)
            assert f.read(3 * 4096) == b"lun" * 4096
    finally:
        assert farm.destroy() == []
        assert LunFarm(tmp_path / "cached").destroy() == []


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


def _farm_in_a_killed_process(farm_dir: Path, *, persistent: bool = False) -> list[dict]:
    """Create a two-LUN farm (one LUN with a loop stacked on it, as a killed daemon's LV
    mapping would be) in a child process, then SIGKILL the child before any cleanup."""
    script = (
        "import json, subprocess\n"
        "from dataclasses import asdict\n"
        "from pathlib import Path\n"
        "from fake_storage.lunfarm import LunFarm\n"
        f"farm = LunFarm(Path({str(farm_dir)!r}), persistent={persistent})\n"
        "luns = farm.create(2, '16M')\n"
        "subprocess.run(['losetup', '-f', '--offset', '1048576', '--sizelimit', '1048576',"
        " luns[0].loop], check=True)\n"
        "print(json.dumps([asdict(x) for x in luns]), flush=True)\n")
    return json.loads(output_of_a_killed_runner(script))


def _gone(luns: list[dict]) -> bool:
    def attached_to(loop: str, backing: str) -> bool:
        f = Path(f"/sys/block/{Path(loop).name}/loop/backing_file")
        return f.exists() and f.read_text().strip() == backing
    return not any(attached_to(x["loop"], x["backing"]) or Path(x["udev_file"]).exists()
                   or any(os.path.lexists(link) and os.path.realpath(link) == x["loop"]
                          for link in x["links"])
                   for x in luns)


def test_farm_of_a_killed_run_is_reaped(tmp_path: Path) -> None:
    before = loops_attached(tmp_path)
    luns = _farm_in_a_killed_process(tmp_path / "farm")
    assert not _gone(luns)
    assert len(loops_attached(tmp_path) - before) == 3  # two LUNs and the stacked mapping
    report = reap_orphans()
    assert f"reaped orphaned farm {tmp_path / 'farm'}" in report
    assert _gone(luns)
    assert loops_attached(tmp_path) == before


def test_farm_of_a_killed_run_with_a_private_udev_database_is_reaped(tmp_path: Path) -> None:
    """A test worker's udev files die with its private udev database (see
    tests/conftest.py); its loop devices must not."""
    before = loops_attached(tmp_path)
    farm_dir = tmp_path / "farm"
    script = (
        "import json, os, signal\n"
        "from dataclasses import asdict\n"
        "from pathlib import Path\n"
        "from fake_storage.lunfarm import LunFarm\n"
        f"luns = LunFarm(Path({str(farm_dir)!r})).create(2, '16M')\n"
        "print(json.dumps([asdict(x) for x in luns]), flush=True)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n")
    out = subprocess.run(
        ["unshare", "-m", "--propagation", "private", "sh", "-c",
         'mount -t tmpfs tmpfs /run/udev && mkdir /run/udev/data && exec "$0" -c "$1"',
         sys.executable, script], capture_output=True, text=True)
    assert out.returncode == -9, out.stderr
    luns = json.loads(out.stdout)
    assert len(loops_attached(tmp_path) - before) == 2
    assert f"reaped orphaned farm {farm_dir}" in reap_orphans()
    assert _gone(luns)
    assert loops_attached(tmp_path) == before


def test_farm_whose_manifest_was_deleted_is_reaped_from_its_udev_files(tmp_path: Path) -> None:
    before = loops_attached(tmp_path)
    luns = _farm_in_a_killed_process(tmp_path / "farm")
    (tmp_path / "farm" / "lunfarm.json").unlink()
    reap_orphans()
    assert _gone(luns)
    assert loops_attached(tmp_path) == before


def test_live_and_persistent_farms_are_not_reaped(lun_farm: LunFarm, tmp_path: Path) -> None:
    live = lun_farm.add("16M")
    kept = _farm_in_a_killed_process(tmp_path / "kept", persistent=True)
    try:
        reap_orphans()
        assert not _gone(kept)
        assert Path(live.udev_file).exists() and live.loop in loops_attached()
    finally:
        assert LunFarm(tmp_path / "kept").destroy() == []
    assert _gone(kept)
