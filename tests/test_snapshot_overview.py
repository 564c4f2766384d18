"""StorageDomain.getSnapshotOverview on file and block domains: chains with sizes and
dates, joined with an OVF_STORE built from a real engine OVF whose ids were rewritten
to the volumes made here."""

from __future__ import annotations

import re

import pytest

from tests.ovf_helpers import ENGINE_SAMPLE, entity_ovf, put_store, store_tar
from tests.storage_helpers import (
    BLANK,
    COW,
    DomainUnderTest,
    MiB,
    shared_domain_fixtures,
)

pytestmark = pytest.mark.root

SAMPLE_IMAGE = "8c634412-1e8b-4ef3-bc40-b67a456e9d2f"
SAMPLE_VOLUME = "f934b12c-1e22-4ad8-bbce-ec0b2a5defa4"
ACTIVE_SNAPSHOT = "b60fcbad-d65a-4248-ae32-7f9411276df0"
REGULAR_SNAPSHOT = "22eab740-c6ec-4edb-b417-c4ad9efe628a"


domains, dom = shared_domain_fixtures("localfs", "block-512")


def vm_ovf(name: str, img: str, base: str, leaf: str) -> tuple[str, bytes]:
    """The engine sample, its one image disk made the chain base <- leaf: the leaf in the
    ACTIVE snapshot, the base in the REGULAR one ("snap")."""
    eid, data = entity_ovf(name, sample=ENGINE_SAMPLE)
    text = data.decode().replace(SAMPLE_IMAGE, img).replace(SAMPLE_VOLUME, leaf)
    m = re.search(r'<Disk ovf:diskId="' + leaf + r'"[^>]*/>', text)
    assert m
    leaf_disk = m.group(0)
    base_disk = (leaf_disk.replace(leaf, base)
                 .replace(ACTIVE_SNAPSHOT, REGULAR_SNAPSHOT))
    leaf_disk = leaf_disk.replace('ovf:parentRef=""', f'ovf:parentRef="{img}/{base}"')
    text = text.replace(m.group(0), base_disk + leaf_disk)
    return eid, text.encode()


def test_overview_joins_chains_with_the_ovf_store(dom: DomainUnderTest) -> None:
    img, base = dom.create_volume(size=64 * MiB, fmt=COW, desc="base volume")
    _, leaf = dom.create_volume(img, size=64 * MiB, fmt=COW, parent=base, desc="leaf")
    floating, alone = dom.create_volume(size=16 * MiB, fmt=COW, desc="floating")
    eid, ovf = vm_ovf("overview-vm", img, base, leaf)
    status, body = put_store(dom.agent, dom.sd, store_tar(dom.sd, [(eid, ovf)]))
    assert status == 200, body

    with dom.client as c:
        out = c.call("StorageDomain.getSnapshotOverview", {"storagedomainID": dom.sd})
    images = {i["imageID"]: i for i in out["images"]}
    assert out["store"] is not None
    # the stores themselves are listed and marked
    stores = [i for i in images.values() if i["ovfStore"]]
    assert stores and all(not i["attached"] for i in stores)

    vm = images[img]
    assert vm["attached"] is True
    assert vm["entity"] == {"id": eid, "name": "overview-vm", "type": "VM"}
    assert vm["disk"]["alias"] == "exporttedVM_Disk1"
    assert [v["volumeID"] for v in vm["volumes"]] == [base, leaf]
    b, lf = vm["volumes"]
    assert b["parent"] == BLANK and lf["parent"] == base
    assert b["description"] == "base volume" and lf["description"] == "leaf"
    assert b["capacity"] == lf["capacity"] == 64 * MiB
    assert b["legality"] == lf["legality"] == "LEGAL"
    assert b["ctime"] > 0 and b["truesize"] > 0
    assert b["snapshot"] == {"id": REGULAR_SNAPSHOT, "type": "REGULAR", "description": "snap",
                             "creationDate": "2017/09/10 13:22:45"}
    assert lf["snapshot"]["description"] == "Active VM"
    assert lf["snapshot"]["type"] == "ACTIVE"
    assert vm["truesize"] == b["truesize"] + lf["truesize"]

    lone = images[floating]
    assert lone["attached"] is False and lone["entity"] is None and not lone["ovfStore"]
    assert [v["volumeID"] for v in lone["volumes"]] == [alone]
    assert lone["volumes"][0]["snapshot"] is None
    assert out["volumes"] == sum(len(i["volumes"]) for i in out["images"])

    # Matches what Volume.getInfo says, volume by volume.
    for vol in (base, leaf):
        info = dom.info(img, vol)
        got = next(v for v in vm["volumes"] if v["volumeID"] == vol)
        assert str(got["truesize"]) == info["truesize"]
        assert str(got["ctime"]) == info["ctime"]
        assert got["generation"] == info["generation"]
