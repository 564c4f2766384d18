"""Volumes on file and block domains (512 and 4K LUNs): lifecycle, data, bad input."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest

from tests.helpers import code_of
from tests.storage_helpers import (
    BLANK,
    COW,
    PREALLOCATED,
    RAW,
    SPARSE,
    DomainUnderTest,
    GiB,
    MiB,
    SharedDomains,
    StorageEnv,
    lv_offset,
    lvm_cmd,
    new_id,
    read_direct,
    wait_task,
    write_durably,
)
from vdsmlite.client import Client, ServerError

pytestmark = pytest.mark.root


@pytest.fixture(scope="module")
def domains(module_env: StorageEnv) -> SharedDomains:
    return SharedDomains(module_env).build("localfs", "block-512", "block-4k")


@pytest.fixture(params=["localfs", "block-512", "block-4k"])
def dom(request: pytest.FixtureRequest, domains: SharedDomains) -> Iterator[DomainUnderTest]:
    """A domain of the module's host, empty at the start of each test (fresh image ids;
    everything the test made is deleted after it)."""
    with domains.lend(request.param) as d:
        yield d


@pytest.fixture
def block_dom(domains: SharedDomains) -> Iterator[DomainUnderTest]:
    with domains.lend("block-512") as d:
        yield d


def independent_path(dom: DomainUnderTest, img: str, vol: str) -> tuple[str, int]:
    """Where the volume's bytes are, found without the daemon: the file on the local
    directory, or the LUN at the LV's extent offset."""
    if dom.is_block:
        assert dom.lun is not None
        offset, _ = lv_offset(dom.lun, dom.sd, vol)
        return dom.lun.loop, offset
    assert dom.data_dir is not None
    return str(dom.data_dir / dom.sd / "images" / img / vol), 0


def test_volume_info(dom: DomainUnderTest) -> None:
    img, raw = dom.create_volume(size=GiB, desc="a raw disk")
    info = dom.info(img, raw)
    assert {k: info[k] for k in ("uuid", "domain", "image", "format", "disktype", "voltype",
                                 "legality", "status", "parent", "description", "children",
                                 "generation", "sequence")} == {
        "uuid": raw, "domain": dom.sd, "image": img, "format": "RAW", "disktype": "DATA",
        "voltype": "LEAF", "legality": "LEGAL", "status": "OK", "parent": BLANK,
        "description": "a raw disk", "children": [], "generation": 0, "sequence": 0}
    assert info["capacity"] == str(GiB)
    if dom.is_block:
        assert info["type"] == "PREALLOCATED"
        assert info["apparentsize"] == info["truesize"] == str(GiB)
        assert info["lease"]["offset"] > 100 * MiB
    else:
        assert info["type"] == "SPARSE"
        assert info["apparentsize"] == str(GiB) and int(info["truesize"]) < MiB
        assert "lease" not in info  # local domains lock with flock, no sanlock leases
    with dom.client as c:
        size = c.call("Volume.getSize", dom.vol_params(img, raw))
    assert size == {"apparentsize": info["apparentsize"], "truesize": info["truesize"]}
    _, cow = dom.create_volume(size=2 * GiB, fmt=COW, prealloc=SPARSE, disk_type="OVFS")
    cow_img = next(i for i in dom.client.call("StorageDomain.getImages",
                                              {"storagedomainID": dom.sd}) if i != img)
    info = dom.info(cow_img, cow)
    assert (info["format"], info["type"], info["disktype"], info["capacity"]) == \
        ("COW", "SPARSE", "OVFS", str(2 * GiB))


def test_data_written_through_prepare_is_on_storage(dom: DomainUnderTest) -> None:
    img, vol = dom.create_volume(size=512 * MiB)
    path = dom.prepare(img, vol)
    pattern = os.urandom(4 * MiB)
    write_durably(path, 16 * MiB, pattern)
    dom.teardown(img, vol)
    where, base = independent_path(dom, img, vol)
    assert read_direct(where, base + 16 * MiB, 4 * MiB) == pattern


def test_another_hosts_write_is_seen_through_a_prepared_volume(
        block_dom: DomainUnderTest) -> None:
    # Another host writes the LUN through its own path (here: the LUN's backing
    # file). This host must read the new bytes, not a copy cached on its side of
    # the volume's mapping (dm-linear caches nothing; its loop stand-in must not).
    dom = block_dom
    assert dom.lun is not None
    img, vol = dom.create_volume(size=256 * MiB)
    path = dom.prepare(img, vol)
    offset, _ = lv_offset(dom.lun, dom.sd, vol)
    assert read_direct(path, 0, MiB) == bytes(MiB)  # this host has looked at it once
    pattern = os.urandom(MiB)
    fd = os.open(dom.lun.backing, os.O_WRONLY | os.O_DIRECT)
    try:
        import mmap  # noqa: PLC0415

        buf = mmap.mmap(-1, MiB)
        buf[:] = pattern
        os.pwritev(fd, [buf], offset)
    finally:
        os.close(fd)
    assert read_direct(path, 0, MiB) == pattern
    dom.teardown(img, vol)


def test_snapshot_chain(dom: DomainUnderTest) -> None:
    img, base = dom.create_volume(size=GiB)
    _, top = dom.create_volume(img, size=GiB, fmt=COW, prealloc=SPARSE, parent=base)
    assert dom.info(img, base)["voltype"] == "INTERNAL"
    assert dom.info(img, base)["children"] == [top]
    top_info = dom.info(img, top)
    assert (top_info["parent"], top_info["voltype"], top_info["format"]) == (base, "LEAF", "COW")
    with dom.client as c:
        prepared = c.call("Image.prepare", {"storagepoolID": BLANK, "storagedomainID": dom.sd,
                                            "imageID": img, "volumeID": top})
        assert [v["volumeID"] for v in prepared["imgVolumesInfo"]] == [base, top]
        qinfo = json.loads(subprocess.run(
            ["qemu-img", "info", "--output", "json", "-U", "--backing-chain",
             prepared["path"]], capture_output=True, text=True, check=True).stdout)
        assert qinfo[0]["backing-filename"] == base
        assert qinfo[1]["format"] == "raw"
        c.call("Image.teardown", {"storagepoolID": BLANK, "storagedomainID": dom.sd,
                                  "imageID": img, "volumeID": top})
    assert code_of(dom.delete_volume, img, base) == 204
    dom.delete_volume(img, top)
    assert dom.info(img, base)["voltype"] == "LEAF"
    with dom.client as c:
        assert c.call("StorageDomain.getVolumes", {"storagedomainID": dom.sd,
                                                   "storagepoolID": BLANK,
                                                   "imageID": img}) == [base]


def test_description_legality_and_illegal_prepare(dom: DomainUnderTest) -> None:
    img, vol = dom.create_volume(size=128 * MiB)
    with dom.client as c:
        # VDSM's rule: 210 characters are kept; metadata that then overflows its
        # 512-byte block is refused (756) and the old description stays.
        c.call("Volume.setDescription", {**dom.vol_params(img, vol),
                                         "description": "x" * 300})
        assert dom.info(img, vol)["description"] == "x" * 210
        c.call("Volume.setDescription", {**dom.vol_params(img, vol),
                                         "description": "\u00e9" * 100})
        assert dom.info(img, vol)["description"] == "\u00e9" * 100
        with pytest.raises(ServerError) as e:
            c.call("Volume.setDescription", {**dom.vol_params(img, vol),
                                             "description": "\u00e9" * 150})
        assert e.value.code == 756
        assert dom.info(img, vol)["description"] == "\u00e9" * 100
        c.call("Volume.setLegality", {**dom.vol_params(img, vol), "legality": "ILLEGAL"})
        assert dom.info(img, vol)["status"] == "ILLEGAL"
        with pytest.raises(ServerError) as e:
            c.call("Image.prepare", {"storagepoolID": BLANK, "storagedomainID": dom.sd,
                                     "imageID": img, "volumeID": vol})
        assert e.value.code == 227
        c.call("Image.prepare", {"storagepoolID": BLANK, "storagedomainID": dom.sd,
                                 "imageID": img, "volumeID": vol, "allowIllegal": True})
        c.call("Image.teardown", {"storagepoolID": BLANK, "storagedomainID": dom.sd,
                                  "imageID": img, "volumeID": vol})
        c.call("Volume.setLegality", {**dom.vol_params(img, vol), "legality": "LEGAL"})
    assert dom.info(img, vol)["status"] == "OK"


def test_extend(dom: DomainUnderTest) -> None:
    img, raw = dom.create_volume(size=256 * MiB)
    path = dom.prepare(img, raw)
    pattern = os.urandom(MiB)
    write_durably(path, 0, pattern)
    with dom.client as c:
        st = wait_task(c, c.call("Volume.extendSize", {**dom.vol_params(img, raw),
                                                       "newSize": str(512 * MiB)}))
        assert st["taskResult"] == "success", st
        assert dom.info(img, raw)["capacity"] == str(512 * MiB)
        # the prepared device grew in place: the new end is writable, old data intact
        write_durably(path, 511 * MiB, pattern)
        assert read_direct(path, 0, MiB) == pattern
        dom.teardown(img, raw)
        with pytest.raises(ServerError) as e:
            c.call("Volume.extendSize", {**dom.vol_params(img, raw), "newSize": str(MiB)})
        assert e.value.code == 232
    cimg, cow = dom.create_volume(size=GiB, fmt=COW, prealloc=SPARSE)
    with dom.client as c:
        st = wait_task(c, c.call("Volume.extendSize", {**dom.vol_params(cimg, cow),
                                                       "newSize": str(3 * GiB)}))
        assert st["taskResult"] == "success", st
    assert dom.info(cimg, cow)["capacity"] == str(3 * GiB)


def test_bad_input_changes_nothing(dom: DomainUnderTest) -> None:
    img, vol = dom.create_volume(size=GiB)
    before = dom.client.call("StorageDomain.dump", {"sd_id": dom.sd})
    assert code_of(dom.create_volume, img, vol) == 212  # exists
    assert code_of(dom.create_volume, img, fmt=COW, parent=new_id()) == 201  # no parent
    assert code_of(dom.create_volume, img, size=GiB // 2, fmt=COW, parent=vol) == 1000
    assert code_of(dom.create_volume, img, fmt=RAW, prealloc=PREALLOCATED, parent=vol) == 202
    assert code_of(dom.create_volume, size=0) == 229
    assert code_of(dom.create_volume, pool=new_id()) == 353  # unattached domain
    # 210 characters are kept (VDSM's rule), but 210 x "é" cannot fit the 512-byte
    # metadata block: refused before anything is made, as VDSM refuses it.
    assert code_of(dom.create_volume, desc="\u00e9" * 300) == 756
    if dom.is_block:
        assert code_of(dom.create_volume, fmt=RAW, prealloc=SPARSE) == 202
    with dom.client as c:
        for params, code in (
                ({"storagedomainID": new_id()}, 358),
                ({"diskType": "NOPE"}, -32602),
                ({"size": "ten"}, -32602),
                ({"volumeID": "../../etc"}, -32602),
                ({"volFormat": 9}, -32602),
                ({"addBitmaps": True}, 75)):
            with pytest.raises(ServerError) as e:
                c.call("Volume.create", {"volumeID": new_id(), "storagepoolID": BLANK,
                                         "storagedomainID": dom.sd, "imageID": new_id(),
                                         "size": str(GiB), "volFormat": COW, "preallocate": 2,
                                         "diskType": "DATA", "desc": "", "srcImgUUID": BLANK,
                                         "srcVolUUID": BLANK, **params})
            assert e.value.code == code, params
        assert c.call("StorageDomain.dump", {"sd_id": dom.sd}) == before
        with pytest.raises(ServerError) as e:
            c.call("Volume.getInfo", dom.vol_params(img, new_id()))
        assert e.value.code == 201


def test_no_space_left(dom: DomainUnderTest) -> None:
    with dom.client as c:
        free = int(c.call("StorageDomain.getStats", {"storagedomainID": dom.sd})["diskfree"])
    assert code_of(dom.create_volume, size=free * 4, fmt=RAW, prealloc=PREALLOCATED) == 397
    with dom.client as c:
        assert c.call("StorageDomain.getImages", {"storagedomainID": dom.sd}) == []


def test_concurrent_changes_to_one_image(dom: DomainUnderTest) -> None:
    """Same volume id created twice at once: one wins, one gets 212. A delete racing
    a create in the same image runs before or after it, never interleaved."""
    img = new_id()
    vol = new_id()

    def params(v: str) -> dict[str, Any]:
        return {"volumeID": v, "storagepoolID": BLANK, "storagedomainID": dom.sd,
                "imageID": img, "size": str(256 * MiB), "volFormat": COW, "preallocate": 2,
                "diskType": "DATA", "desc": "", "srcImgUUID": BLANK, "srcVolUUID": BLANK}

    async def race(calls: list[tuple[str, dict[str, Any]]]) -> list[dict[str, Any]]:
        loop = asyncio.get_running_loop()

        def one(method: str, p: dict[str, Any]) -> dict[str, Any]:
            with Client.unix(dom.agent.unix_socket) as c:
                try:
                    return wait_task(c, c.call(method, p))
                except ServerError as e:
                    return {"taskResult": "refused", "code": e.code}

        return await asyncio.gather(*(loop.run_in_executor(None, one, m, p) for m, p in calls))

    results = asyncio.run(race([("Volume.create", params(vol)), ("Volume.create", params(vol))]))
    assert sorted(r["code"] for r in results) == [0, 212]
    assert dom.info(img, vol)["status"] == "OK"

    second = new_id()
    results = asyncio.run(race([
        ("Image.delete", {"imageID": img, "storagepoolID": BLANK, "storagedomainID": dom.sd,
                          "postZero": False, "force": False}),
        ("Volume.create", params(second)),
    ]))
    # Whatever the order, every volume left is complete and nothing is orphaned.
    with dom.client as c:
        left = c.call("StorageDomain.getVolumes", {"storagedomainID": dom.sd,
                                                   "storagepoolID": BLANK, "imageID": img})
    assert set(left) <= {second}
    for v in left:
        assert dom.info(img, v)["status"] == "OK"
    if dom.is_block:
        assert dom.lun is not None
        lvs = lvm_cmd("lvs", "--noheadings", "-o", "lv_name,lv_tags", dom.sd,
                      devices=[dom.lun.loop])
        assert vol not in lvs
        assert "OVIRT_VOL_INITIALIZING" not in lvs
    assert [r["taskResult"] for r in results].count("success") >= 1


def test_block_post_zero(block_dom: DomainUnderTest) -> None:
    dom = block_dom
    img, vol = dom.create_volume(size=128 * MiB)
    path = dom.prepare(img, vol)
    write_durably(path, 0, b"\xab" * MiB)
    dom.teardown(img, vol)
    where, offset = independent_path(dom, img, vol)
    dom.delete_volume(img, vol, post_zero=True)
    assert read_direct(where, offset, MiB) == b"\0" * MiB


def test_block_multi_segment_lv_is_a_clear_error_without_device_mapper(
        block_dom: DomainUnderTest) -> None:
    dom = block_dom
    img, vol = dom.create_volume(size=128 * MiB)
    dom.create_volume(size=128 * MiB)  # takes the extent right after `vol`
    with dom.client as c:
        st = wait_task(c, c.call("Volume.extendSize", {**dom.vol_params(img, vol),
                                                       "newSize": str(256 * MiB)}))
        assert st["taskResult"] == "success"
        with pytest.raises(ServerError) as e:
            c.call("Image.prepare", {"storagepoolID": BLANK, "storagedomainID": dom.sd,
                                     "imageID": img, "volumeID": vol})
    assert e.value.code == 558
    assert "2 segments" in e.value.message
