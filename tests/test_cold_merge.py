"""Cold merge (SDM.merge) and SDM.update_volume on file and block domains: the data
(read back with qemu-io, compared with qemu-img compare), the metadata after, the
refusals that change nothing, and a merge killed half-way then completed by a retry."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import code_of, eventually
from tests.storage_helpers import (
    BLANK,
    COW,
    DomainUnderTest,
    MiB,
    SharedDomains,
    join_lockspace,
    new_id,
    shared_domain_fixtures,
)
from vdsmlite.client import Client

pytestmark = pytest.mark.root

SIZE = 64 * MiB
PATTERNS = {0: 0x11, 1: 0x22, 2: 0x33}  # layer index -> byte, written at index MiB


domains, dom = shared_domain_fixtures("localfs", "block-512")


def qemu_io(path: str, command: str) -> None:
    out = subprocess.run(["qemu-io", "-f", "qcow2", "-c", command, path],
                         capture_output=True, text=True, cwd=str(Path(path).parent))
    assert out.returncode == 0, (path, command, out.stdout, out.stderr)


def write_layer(dom: DomainUnderTest, img: str, vol: str, index: int) -> None:
    path = dom.prepare(img, vol)
    try:
        qemu_io(path, f"write -P {PATTERNS[index]} {index * MiB} {MiB}")
    finally:
        dom.teardown(img, vol)


def reads(dom: DomainUnderTest, img: str, vol: str, expected: dict[int, int]) -> None:
    """Each MiB `index` of the chain under `vol` holds byte `expected[index]`."""
    path = dom.prepare(img, vol)
    try:
        for index, byte in expected.items():
            out = subprocess.run(["qemu-io", "-f", "qcow2", "-r", "-c",
                                  f"read -P {byte} {index * MiB} {MiB}", path],
                                 capture_output=True, text=True, cwd=str(Path(path).parent))
            assert out.returncode == 0 and "Pattern verification failed" not in out.stdout, \
                (vol, index, out.stdout, out.stderr)
    finally:
        dom.teardown(img, vol)


def snapshot_raw(dom: DomainUnderTest, img: str, vol: str, dest: Path) -> None:
    path = dom.prepare(img, vol)
    try:
        subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", path, str(dest)],
                       check=True, cwd=str(Path(path).parent))
    finally:
        dom.teardown(img, vol)


def same_as(dom: DomainUnderTest, img: str, vol: str, ref: Path) -> None:
    path = dom.prepare(img, vol)
    try:
        out = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "qcow2", str(ref),
                              path], capture_output=True, text=True,
                             cwd=str(Path(path).parent))
        assert out.returncode == 0, out.stdout + out.stderr
    finally:
        dom.teardown(img, vol)


def chain3(dom: DomainUnderTest) -> tuple[str, list[str]]:
    """base <- mid <- leaf, each with its own pattern."""
    img, base = dom.create_volume(size=SIZE, fmt=COW)
    write_layer(dom, img, base, 0)
    _, mid = dom.create_volume(img, size=SIZE, fmt=COW, parent=base)
    write_layer(dom, img, mid, 1)
    _, leaf = dom.create_volume(img, size=SIZE, fmt=COW, parent=mid)
    write_layer(dom, img, leaf, 2)
    return img, [base, mid, leaf]


def job(c: Client, job_id: str, timeout: float = 120) -> dict[str, Any]:
    def finished() -> dict[str, Any] | None:
        info = c.call("Host.getJobs", {"job_ids": [job_id]}).get(job_id)
        return info if info and info["status"] in ("done", "failed", "aborted") else None
    return eventually(finished, timeout, f"job {job_id}", interval=0.05)


def merge(dom: DomainUnderTest, img: str, top: str, base: str,
          generation: int | None = None) -> dict[str, Any]:
    job_id = new_id()
    sub: dict[str, Any] = {"sd_id": dom.sd, "img_id": img, "top_id": top, "base_id": base}
    if generation is not None:
        sub["base_generation"] = generation
    with dom.client as c:
        assert c.call("SDM.merge", {"job_id": job_id, "subchain_info": sub}) is True
        return job(c, job_id)


def test_merge_internal_then_leaf(dom: DomainUnderTest, tmp_path: Path) -> None:
    img, (base, mid, leaf) = chain3(dom)
    ref = tmp_path / "leaf.raw"
    snapshot_raw(dom, img, leaf, ref)

    # Internal: mid into base; the leaf now stands on base.
    done = merge(dom, img, mid, base, generation=0)
    assert done["status"] == "done", done
    assert done["description"].startswith("merge_subchain")
    b, m, lf = (dom.info(img, v) for v in (base, mid, leaf))
    assert lf["parent"] == base and lf["legality"] == "LEGAL"
    assert m["legality"] == "ILLEGAL" and m["children"] == []
    assert b["legality"] == "LEGAL" and b["generation"] == 1
    assert b["children"] == sorted([mid, leaf])  # mid still names base until deleted
    assert b["voltype"] == "INTERNAL"
    same_as(dom, img, leaf, ref)
    reads(dom, img, leaf, {0: 0x11, 1: 0x22, 2: 0x33})
    # qemu's chain agrees with the metadata
    path = dom.prepare(img, leaf)
    try:
        info = subprocess.run(["qemu-img", "info", "-U", "--output", "json", path],
                              capture_output=True, text=True, check=True).stdout
        assert f'"backing-filename": "{base}"' in info
    finally:
        dom.teardown(img, leaf)
    dom.delete_volume(img, mid)  # what the engine does next

    # Leaf: the leaf into base; base holds everything, the leaf is ILLEGAL.
    done = merge(dom, img, leaf, base, generation=1)
    assert done["status"] == "done", done
    b, lf = dom.info(img, base), dom.info(img, leaf)
    assert lf["legality"] == "ILLEGAL" and b["legality"] == "LEGAL" and b["generation"] == 2
    same_as(dom, img, base, ref)
    reads(dom, img, base, {0: 0x11, 1: 0x22, 2: 0x33})
    dom.delete_volume(img, leaf)
    b = dom.info(img, base)
    assert b["voltype"] == "LEAF" and b["children"] == []


def test_refusals_change_nothing(dom: DomainUnderTest) -> None:
    img, (base, mid, leaf) = chain3(dom)
    before = {v: dom.info(img, v) for v in (base, mid, leaf)}
    sub = {"sd_id": dom.sd, "img_id": img, "top_id": mid, "base_id": base}
    with dom.client as c:
        def call(**changes: Any) -> int:
            return code_of(lambda: c.call("SDM.merge", {
                "job_id": new_id(), "subchain_info": {**sub, **changes}}))
        assert call(base_generation=7) == 911
        assert call(top_id=base, base_id=mid) == 921  # base above top
        assert call(base_id=new_id()) == 920
        assert not [j for j in c.call("Host.getJobs", {}).values()
                    if img in j["description"]]
    assert {v: dom.info(img, v) for v in (base, mid, leaf)} == before


def test_update_volume(dom: DomainUnderTest) -> None:
    img, vol = dom.create_volume(size=SIZE, fmt=COW)
    with dom.client as c:
        def update(current: int, **attrs: Any) -> dict[str, Any]:
            job_id = new_id()
            c.call("SDM.update_volume", {
                "job_id": job_id,
                "vol_info": {"sd_id": dom.sd, "img_id": img, "vol_id": vol,
                             "generation": current},
                "vol_attr": attrs})
            return job(c, job_id)
        assert update(0, legality="ILLEGAL", description="x")["status"] == "done"
        info = dom.info(img, vol)
        assert (info["legality"], info["description"], info["generation"]) == \
            ("ILLEGAL", "x", 1)
        failed = update(0, legality="LEGAL")
        assert failed["status"] == "failed" and failed["error"]["code"] == 911
        failed = update(1, legality="ILLEGAL")
        assert failed["status"] == "failed" and failed["error"]["code"] == 235
        assert update(1, legality="LEGAL", generation=42)["status"] == "done"
        assert dom.info(img, vol)["generation"] == 42
        assert update(42, type="SHARED")["status"] == "done"
        assert dom.info(img, vol)["voltype"] == "SHARED"
        assert code_of(lambda: c.call("SDM.update_volume", {
            "job_id": new_id(),
            "vol_info": {"sd_id": dom.sd, "img_id": img, "vol_id": vol, "generation": 43},
            "vol_attr": {}})) == 1000


@pytest.mark.parametrize("step", ["merge.after_commit", "merge.after_rebase"])
def test_crash_mid_merge_then_retry(domains: SharedDomains, step: str,
                                    tmp_path: Path) -> None:
    with domains.lend("block-512") as dom:
        img, (base, mid, leaf) = chain3(dom)
        ref = tmp_path / "leaf.raw"
        snapshot_raw(dom, img, leaf, ref)
        agent = dom.agent
        agent.kill()  # as a crash would; test_ovfstore_crash restarts cleanly
        agent.extra_env["VDSMLITE_FAILPOINTS"] = step
        agent.start()
        join_lockspace(agent, dom.sd)
        try:
            sub = {"sd_id": dom.sd, "img_id": img, "top_id": mid, "base_id": base,
                   "base_generation": 0}
            with agent.client() as c:
                c.call("SDM.merge", {"job_id": new_id(), "subchain_info": sub})
            assert agent.wait(60) == -9
            assert f"failpoint {step}" in agent.log_text()
        finally:
            agent.extra_env.pop("VDSMLITE_FAILPOINTS", None)
        agent.start()
        join_lockspace(agent, dom.sd)
        # The interrupted merge: base ILLEGAL (the image cannot be started), the chain
        # still reads what it read before.
        assert dom.info(img, base)["legality"] == "ILLEGAL"
        assert dom.info(img, base)["generation"] == 0
        with dom.client as c:
            assert code_of(lambda: c.call("Image.prepare", {
                "storagepoolID": BLANK, "storagedomainID": dom.sd, "imageID": img,
                "volumeID": leaf})) == 227
        # The engine retries the same merge: it completes.
        done = merge(dom, img, mid, base, generation=0)
        assert done["status"] == "done", done
        b, m, lf = (dom.info(img, v) for v in (base, mid, leaf))
        assert lf["parent"] == base and m["legality"] == "ILLEGAL"
        assert b["legality"] == "LEGAL" and b["generation"] == 1
        same_as(dom, img, leaf, ref)
