"""Storage domains on real storage: layout on disk, LVM metadata, pools, import, format."""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import call, code_of
from tests.storage_helpers import (
    BLANK,
    ISCSI,
    LOCALFS,
    MiB,
    StorageEnv,
    connect,
    lv_offset,
    lvm_cmd,
    make_block_domain,
    make_localfs_domain,
    make_posixfs_domain,
    new_id,
    read_direct,
    write_durably,
)
from vdsmlite.client import ServerError
from vdsmlite.storage import persistent

pytestmark = pytest.mark.root


def sanlock_leader(spec: str) -> dict[str, str]:
    """sanlock's own reading of a lease: "-s LS:HOSTID:PATH:OFF" or "-r LS:RES:PATH:OFF"."""
    flag, _, spec = spec.partition(" ")
    res = subprocess.run(["sanlock", "direct", "read_leader", flag, spec], capture_output=True,
                         text=True)
    assert res.returncode == 0, (spec, res.stdout, res.stderr)
    out = res.stdout
    return dict(line.split(" ", 1) for line in out.splitlines() if " " in line)


# --- file domains -------------------------------------------------------------------


def test_localfs_domain_layout(env: StorageEnv, tmp_path: Path) -> None:
    a = env.agent()
    d = make_localfs_domain(a, tmp_path / "data")
    dom_dir = tmp_path / "data" / d.sd
    # As VDSM's fileSD._prepareMetadata: every special volume of a V4+ domain
    # (sd.SPECIAL_VOLUMES_V4), mailboxes included, on localfs too.
    assert sorted(os.listdir(dom_dir / "dom_md")) == [
        "ids", "inbox", "leases", "metadata", "outbox", "xleases"]
    for mailbox in ("inbox", "outbox"):
        assert (dom_dir / "dom_md" / mailbox).stat().st_size == 16 * MiB
    assert (dom_dir / "images").is_dir()
    assert not [p for p in (tmp_path / "data").iterdir() if p.name.startswith(".")]
    lines = (dom_dir / "dom_md" / "metadata").read_text().splitlines()
    assert lines[:-1] == sorted(lines[:-1])
    key, value = lines[-1].split("=", 1)
    assert key == "_SHA_CKSUM"
    assert value == hashlib.sha1("".join(lines[:-1]).encode()).hexdigest()
    md = dict(line.split("=", 1) for line in lines[:-1])
    assert md == {
        "ALIGNMENT": "1048576", "BLOCK_SIZE": "512", "CLASS": "Data",
        "DESCRIPTION": "local-data", "IOOPTIMEOUTSEC": "10", "LEASERETRIES": "3",
        "LEASETIMESEC": "60", "LOCKPOLICY": "", "LOCKRENEWALINTERVALSEC": "5", "POOL_UUID": "",
        "REMOTE_PATH": str(tmp_path / "data"), "ROLE": "Regular", "SDUUID": d.sd,
        "TYPE": "LOCALFS", "VERSION": "5"}
    info = call(a, "StorageDomain.getInfo", storagedomainID=d.sd)
    assert info == {"uuid": d.sd, "type": "LOCALFS", "class": "Data", "name": "local-data",
                    "role": "Regular", "pool": [], "version": "5", "block_size": 512,
                    "alignment": 1048576, "remotePath": str(tmp_path / "data")}
    stats = call(a, "StorageDomain.getStats", storagedomainID=d.sd)
    assert int(stats["disktotal"]) >= int(stats["diskfree"]) > 0


def test_posixfs_domain_has_sanlock_lockspace_and_sdm_lease(env: StorageEnv) -> None:
    a = env.agent()
    d = make_posixfs_domain(a, env.farm)
    assert d.data_dir is not None
    md_dir = d.data_dir / d.sd / "dom_md"
    ids = sanlock_leader(f"-s {d.sd}:1:{md_dir / 'ids'}:0")
    assert ids["magic"] == "0x12212010"  # delta lease (lockspace)
    assert ids["space_name"] == d.sd
    assert ids["io_timeout"] == "1"  # the agent's [sanlock] io_timeout (tests use 1)
    sdm = sanlock_leader(f"-r {d.sd}:SDM:{md_dir / 'leases'}:{MiB}")
    assert sdm["magic"] == "0x6152010"  # paxos lease
    assert sdm["resource_name"] == "SDM"
    assert (md_dir / "inbox").stat().st_size == 16 * MiB
    assert call(a, "StorageDomain.getInfo", storagedomainID=d.sd)["type"] == "POSIXFS"


def test_broken_file_metadata_seal_is_refused(env: StorageEnv, tmp_path: Path) -> None:
    a = env.agent()
    d = make_localfs_domain(a, tmp_path / "data")
    path = tmp_path / "data" / d.sd / "dom_md" / "metadata"
    path.write_text(path.read_text().replace("DESCRIPTION=local-data", "DESCRIPTION=tampered"))
    assert code_of(a, "StorageDomain.getInfo", storagedomainID=d.sd) == 752


# --- block domains --------------------------------------------------------------------


@pytest.mark.parametrize("sector", [512, 4096])
def test_block_domain_layout(env: StorageEnv, sector: int) -> None:
    a = env.agent()
    # Not joined: the layout is what creating the domain wrote (the ids area included).
    d = make_block_domain(a, env.farm, sector_size=sector, join=False)
    assert d.lun is not None
    pv = d.lun.loop
    tags = lvm_cmd("vgs", "--noheadings", "-o", "vg_tags", "--separator", "|", d.sd,
                   devices=[pv]).strip().split(",")
    assert "RHAT_storage_domain" in tags
    assert "RHAT_storage_domain_UNREADY" not in tags
    decoded = {t[4:].split("=", 1)[0]: persistent.tag_decode(t[4:].split("=", 1)[1])
               for t in tags if t.startswith("MDT_")}
    cksum = decoded.pop("_SHA_CKSUM")
    assert cksum == hashlib.sha1("".join(f"{k}={v}" for k, v in sorted(decoded.items()))
                                 .encode()).hexdigest()
    pv_uuid, vg_uuid, pe_count = lvm_cmd("pvs", "--noheadings", "-o",
                                         "pv_uuid,vg_uuid,pv_pe_count", pv,
                                         devices=[pv]).split()
    assert decoded["PV0"] == f"pv:{d.lun.guid},uuid:{pv_uuid},pestart:0,pecount:{pe_count}," \
                             "mapoffset:0"
    assert decoded["VGUUID"] == vg_uuid
    assert decoded["BLOCK_SIZE"] == str(sector)
    assert decoded["TYPE"] == "ISCSI"
    assert decoded["ROLE"] == "Regular"
    sizes = dict(line.split() for line in lvm_cmd(
        "lvs", "--noheadings", "--units", "m", "--nosuffix", "-o", "lv_name,lv_size", d.sd,
        devices=[pv]).strip().splitlines())
    assert {k: float(v) for k, v in sizes.items()} == {
        "metadata": 128, "ids": 128, "inbox": 128, "outbox": 128, "leases": 2048,
        "xleases": 1024, "master": 1024}
    # sanlock areas, read straight from the PV at the LVs' offsets
    ids_off, _ = lv_offset(d.lun, d.sd, "ids")
    leases_off, _ = lv_offset(d.lun, d.sd, "leases")
    ids = sanlock_leader(f"-s {d.sd}:1:{pv}:{ids_off}")
    assert (ids["magic"], ids["space_name"], ids["sector_size"]) == \
        ("0x12212010", d.sd, str(sector))
    sdm = sanlock_leader(f"-r {d.sd}:SDM:{pv}:{leases_off + MiB}")
    assert (sdm["magic"], sdm["resource_name"]) == ("0x6152010", "SDM")
    master_off, _ = lv_offset(d.lun, d.sd, "master")
    fs = subprocess.run(["blkid", "-p", "-O", str(master_off), "-o", "value", "-s", "TYPE", pv],
                        capture_output=True, text=True).stdout.strip()
    assert fs == "ext3"
    info = call(a, "StorageDomain.getInfo", storagedomainID=d.sd)
    assert info["vguuid"] == vg_uuid
    assert info["block_size"] == sector
    assert info["metadataDevice"] == d.lun.guid
    stats = call(a, "StorageDomain.getStats", storagedomainID=d.sd)
    assert int(stats["disktotal"]) > int(stats["diskfree"]) > 0
    assert stats["mdavalid"] is True


def test_broken_block_metadata_seal_is_refused(env: StorageEnv) -> None:
    a = env.agent()
    d = make_block_domain(a, env.farm, join=False)  # reading needs no host id
    assert d.lun is not None
    lvm_cmd("vgchange", "--deltag", "MDT_DESCRIPTION=block-data",
            "--addtag", "MDT_DESCRIPTION=tampered", d.sd, devices=[d.lun.loop])
    assert code_of(a, "StorageDomain.getInfo", storagedomainID=d.sd) == 752


def test_domain_create_refusals(env: StorageEnv, tmp_path: Path) -> None:
    a = env.agent()
    d = make_localfs_domain(a, tmp_path / "data")

    def create(**over: Any) -> int:
        params = {"storagedomainID": new_id(), "domainType": LOCALFS,
                  "typeArgs": str(tmp_path / "data"), "name": "x", "domainClass": 1,
                  "version": "5", "blockSize": 512, **over}
        return code_of(a, "StorageDomain.create", **params)

    assert create(storagedomainID=d.sd) == 365
    assert create(typeArgs=str(tmp_path / "not-connected")) == 360
    assert create(name="n" * 51) == 387
    assert create(version="4") == 394
    assert create(typeArgs="/tmp/../etc") == 390
    assert create(domainType=5) == 372
    lun = env.farm.add("12G")
    small = env.farm.add("1G")
    with a.client() as c:
        assert code_of(a, "LVMVolumeGroup.create", name=new_id(),
                          devlist=["36001405ffffffffffffffffffffffff0"]) == 606
        assert code_of(a, "LVMVolumeGroup.create", name=new_id(), devlist=[small.guid]) \
            == 504
        subprocess.run(["mkfs.ext4", "-q", lun.loop], check=True)
        sd = new_id()
        assert code_of(a, "LVMVolumeGroup.create", name=sd, devlist=[lun.guid]) == 502
        vg_uuid = c.call("LVMVolumeGroup.create", {"name": sd, "devlist": [lun.guid],
                                                   "force": True})
        assert code_of(a, "LVMVolumeGroup.create", name=sd, devlist=[lun.guid],
                          force=True) == 505
    block = {"storagedomainID": sd, "domainType": ISCSI, "typeArgs": vg_uuid, "name": "b",
             "domainClass": 1, "version": "5"}
    assert code_of(a, "StorageDomain.create", **{**block, "typeArgs": "nosuch"}) == 506
    assert code_of(a, "StorageDomain.create", **{**block, "storagedomainID": new_id()}) \
        == 351
    assert code_of(a, "StorageDomain.create", **{**block, "blockSize": 4096}) == 348
    call(a, "StorageDomain.create", **block)  # the refusals above changed nothing
    assert call(a, "StorageDomain.getInfo", storagedomainID=sd)["name"] == "b"


def test_get_storage_domains_filters(env: StorageEnv, tmp_path: Path) -> None:
    a = env.agent()
    f = make_localfs_domain(a, tmp_path / "data")
    b = make_block_domain(a, env.farm, join=False)  # listing needs no host id
    assert sorted(call(a, "Host.getStorageDomains")) == sorted([f.sd, b.sd])
    assert call(a, "Host.getStorageDomains", storageType=LOCALFS) == [f.sd]
    assert call(a, "Host.getStorageDomains", storageType="ISCSI") == [b.sd]
    assert sorted(call(a, "Host.getStorageDomains", domainClass=1)) == sorted([f.sd, b.sd])
    assert call(a, "Host.getStorageDomains", domainClass=2) == []
    assert call(a, "Host.getStorageDomains", remotePath=str(tmp_path / "data")) == [f.sd]


# --- pools, detach and re-attach, import -------------------------------------------------


@pytest.mark.parametrize("kind", ["block", "posixfs"])
def test_pool_detach_and_reattach_keeps_images(env: StorageEnv, tmp_path: Path,
                                               kind: str) -> None:
    a = env.agent()
    m1 = make_localfs_domain(a, tmp_path / "master1")
    m2 = make_localfs_domain(a, tmp_path / "master2")
    data = (make_block_domain(a, env.farm) if kind == "block"
            else make_posixfs_domain(a, env.farm))
    sp1, sp2 = new_id(), new_id()
    call(a, "StoragePool.create", storagepoolID=sp1, name="dc1", masterSdUUID=m1.sd,
         masterVersion=1, domainList=[m1.sd, data.sd])
    call(a, "StoragePool.connect", storagepoolID=sp1, hostID=1, scsiKey=sp1,
         masterSdUUID=m1.sd, masterVersion=1)
    info = call(a, "StoragePool.getInfo", storagepoolID=sp1)
    assert info["info"]["master_uuid"] == m1.sd
    assert info["info"]["domains"] == ",".join(sorted([f"{m1.sd}:Active", f"{data.sd}:Active"]))
    assert info["info"]["pool_status"] == "connected"
    assert int(info["dominfo"][data.sd]["disktotal"]) > 0
    assert call(a, "StorageDomain.getInfo", storagedomainID=m1.sd)["role"] == "Master"
    assert call(a, "StorageDomain.getInfo", storagedomainID=data.sd)["pool"] == [sp1]
    repo = a.state_dir / "data-center"
    assert os.readlink(repo / sp1 / data.sd).endswith(data.sd)

    img, vol = data.create_volume(size=256 * MiB, pool=sp1)
    with a.client() as c:
        path = c.call("Image.prepare", {"storagepoolID": sp1, "storagedomainID": data.sd,
                                        "imageID": img, "volumeID": vol})["path"]
    assert path.startswith(str(repo / sp1 / data.sd))
    pattern = os.urandom(MiB)
    write_durably(path, 3 * MiB, pattern)
    data.teardown(img, vol)

    assert code_of(a, "StorageDomain.detach", storagedomainID=m1.sd, storagepoolID=sp1) \
        == 383
    call(a, "StorageDomain.deactivate", storagedomainID=data.sd, storagepoolID=sp1)
    call(a, "StorageDomain.detach", storagedomainID=data.sd, storagepoolID=sp1)
    assert call(a, "StorageDomain.getInfo", storagedomainID=data.sd)["pool"] == []
    assert data.sd not in call(a, "StoragePool.getInfo", storagepoolID=sp1)["info"]["domains"]

    call(a, "StoragePool.create", storagepoolID=sp2, name="dc2", masterSdUUID=m2.sd,
         masterVersion=1, domainList=[m2.sd])
    assert code_of(a, "StoragePool.connect", storagepoolID=sp2, hostID=1, scsiKey=sp2,
                      masterSdUUID=m2.sd, masterVersion=1) == 323
    call(a, "StoragePool.disconnect", storagepoolID=sp1, hostID=1, scsiKey=sp1)
    call(a, "StorageDomain.attach", storagedomainID=data.sd, storagepoolID=sp2)
    call(a, "StorageDomain.activate", storagedomainID=data.sd, storagepoolID=sp2)
    call(a, "StoragePool.connect", storagepoolID=sp2, hostID=1, scsiKey=sp2,
         masterSdUUID=m2.sd, masterVersion=1)
    assert call(a, "StorageDomain.getImages", storagedomainID=data.sd) == [img]
    assert call(a, "StorageDomain.getInfo", storagedomainID=data.sd)["pool"] == [sp2]
    # Operations naming the old pool are refused; the new pool works.
    with pytest.raises(ServerError) as e:
        data.create_volume(pool=sp1)
    assert e.value.code == 353
    with a.client() as c:
        path = c.call("Image.prepare", {"storagepoolID": sp2, "storagedomainID": data.sd,
                                        "imageID": img, "volumeID": vol})["path"]
    assert read_direct(path, 3 * MiB, MiB) == pattern
    data.teardown(img, vol)
    assert code_of(a, "StorageDomain.attach", storagedomainID=data.sd,
                      storagepoolID=sp1) == 380


def test_domain_written_by_one_host_is_imported_by_another(env: StorageEnv,
                                                           tmp_path: Path) -> None:
    host_a = env.agent("host-a")
    block = make_block_domain(host_a, env.farm)
    local = make_localfs_domain(host_a, tmp_path / "shared-dir")
    img, vol = block.create_volume(size=128 * MiB)
    path = block.prepare(img, vol)
    pattern = os.urandom(64 * 1024)
    write_durably(path, 0, pattern)
    block.teardown(img, vol)
    local_img, local_vol = local.create_volume(size=MiB)

    host_b = env.agent("host-b")  # never saw these domains
    connect(host_b, LOCALFS, {"id": new_id(), "connection": str(tmp_path / "shared-dir")})
    assert sorted(call(host_b, "Host.getStorageDomains")) == sorted([block.sd, local.sd])
    assert call(host_b, "StorageDomain.getInfo", storagedomainID=block.sd)["name"] == \
        "block-data"
    assert call(host_b, "StorageDomain.getVolumes", storagedomainID=block.sd,
                storagepoolID=BLANK, imageID=img) == [vol]
    with host_b.client() as c:
        path_b = c.call("Image.prepare", {"storagepoolID": BLANK, "storagedomainID": block.sd,
                                          "imageID": img, "volumeID": vol})["path"]
        assert read_direct(path_b, 0, len(pattern)) == pattern
        c.call("Image.teardown", {"storagepoolID": BLANK, "storagedomainID": block.sd,
                                  "imageID": img, "volumeID": vol})
        info = c.call("Volume.getInfo", {"volumeID": local_vol, "storagepoolID": BLANK,
                                         "storagedomainID": local.sd, "imageID": local_img})
    assert info["legality"] == "LEGAL"


def test_format(env: StorageEnv, tmp_path: Path) -> None:
    a = env.agent()
    f = make_localfs_domain(a, tmp_path / "data")
    b = make_block_domain(a, env.farm)
    b.create_volume(size=128 * MiB)
    sp = new_id()
    call(a, "StoragePool.create", storagepoolID=sp, name="dc", masterSdUUID=f.sd,
         masterVersion=1, domainList=[f.sd, b.sd])
    assert code_of(a, "StorageDomain.format", storagedomainID=b.sd) == 391
    call(a, "StorageDomain.format", storagedomainID=b.sd, autoDetach=True)
    assert b.sd not in call(a, "Host.getStorageDomains")
    assert b.lun is not None
    with a.client() as c:
        listed = {d["GUID"]: d for d in c.call("Host.getDeviceList", {"checkStatus": True})}
    assert listed[b.lun.guid]["status"] == "free"  # VG and PV are gone
    call(a, "StorageDomain.format", storagedomainID=f.sd, autoDetach=True)
    assert not (tmp_path / "data" / f.sd).exists()
    assert code_of(a, "StorageDomain.getInfo", storagedomainID=f.sd) == 358
