"""The SPM as an engine elects it: StoragePool.spmStart / getSpmStatus / spmStop.

Two simulated hosts (own sanlock daemon + agent each) serve one pool whose master is
a block domain on a shared loop LUN, built once for the module: A as host id 1, B as
host id 2. A third host, C, has its sanlock daemon killed to show what an agent says
when no daemon answers.
"""

from __future__ import annotations

import time
from typing import Any

import pytest

from fake_storage.cluster import SimHost
from tests.helpers import call, code_of, eventually
from tests.locking_helpers import holds
from tests.storage_helpers import (
    BLANK,
    DomainUnderTest,
    StorageEnv,
    make_block_domain,
    new_id,
    run_task,
    wait_acquired,
)
from vdsmlite.client import ServerError

pytestmark = pytest.mark.root

MiB = 1 << 20


class Pool:
    def __init__(self, env: StorageEnv) -> None:
        self.env = env
        self.a = env.host("host-a", lease_timeout=3.0)
        self.b = env.host("host-b", lease_timeout=3.0)
        self.dom = make_block_domain(self.a.agent, env.farm, join=False)
        self.sp = new_id()
        call(self.a.agent, "StoragePool.create", storagepoolID=self.sp, name="dc",
             masterSdUUID=self.dom.sd, masterVersion=1, domainList=[self.dom.sd])
        for host, host_id in ((self.a, 1), (self.b, 2)):
            call(host.agent, "StoragePool.connect", storagepoolID=self.sp, hostID=host_id,
                 scsiKey=self.sp, masterSdUUID=self.dom.sd, masterVersion=1)
        for host in (self.a, self.b):
            with host.agent.client() as c:
                wait_acquired(c, self.dom.sd)

    def on(self, host: SimHost, dom: DomainUnderTest | None = None) -> DomainUnderTest:
        d = dom or self.dom
        return DomainUnderTest(host.agent, d.sd, "block", d.block_size, lun=d.lun)

    def status(self, host: SimHost) -> dict[str, Any]:
        result: dict[str, Any] = call(host.agent, "StoragePool.getSpmStatus",
                                      storagepoolID=self.sp)
        return result

    def spm_start(self, host: SimHost) -> None:
        with host.agent.client() as c:
            run_task(c, "StoragePool.spmStart", {
                "storagepoolID": self.sp, "prevID": -1, "prevLver": "-1",
                "enableScsiFencing": "false"})


@pytest.fixture(scope="module")
def pool(module_env: StorageEnv) -> Pool:
    return Pool(module_env)


def sdm_line(host: SimHost, sd: str) -> str | None:
    """The ``r <sd>:SDM:<path>:<offset>:<lver> p <pid>`` line of the host's sanlock."""
    for line in host.sanlock.status().splitlines():
        words = line.split()
        if len(words) >= 4 and words[0] == "r" and words[1].startswith(f"{sd}:SDM:"):
            return " ".join(words[:4])
    return None


def test_spm_holds_the_master_lease_from_start_to_stop(pool: Pool) -> None:
    a, b, sp = pool.a, pool.b, pool.sp
    assert pool.status(b) == {"spmId": -1, "spmStatus": "Free", "spmLver": -1}

    pool.spm_start(a)
    on_a = pool.status(a)
    assert on_a["spmId"] == 1 and on_a["spmStatus"] == "SPM" and on_a["spmLver"] >= 1
    assert pool.status(b) == {**on_a, "spmStatus": "Free"}
    info = call(b.agent, "StoragePool.getInfo", storagepoolID=sp)["info"]
    assert (info["spm_id"], info["lver"]) == (1, on_a["spmLver"])
    held = sdm_line(a, pool.dom.sd)
    assert held is not None and held.split()[1].endswith(f":{on_a['spmLver']}")
    # A second start on the SPM, or leaving the pool while SPM, is a client error.
    assert code_of(a.agent, "StoragePool.spmStart", storagepoolID=sp, prevID=-1,
                   prevLver=-1, enableScsiFencing=False) == 656
    assert code_of(a.agent, "StoragePool.disconnect", storagepoolID=sp, hostID=1,
                   scsiKey=sp) == 656

    # A's changes run under the lease it holds: same holder, same lease version (an
    # acquire would bump it), and no acquire in A's log.
    mark = a.agent.log_size()
    img, vol = pool.on(a).create_volume(size=128 * MiB, pool=sp)
    call(a.agent, "Volume.setDescription", **pool.on(a).vol_params(img, vol, sp),
         description="under the SPM lease")
    assert sdm_line(a, pool.dom.sd) == held
    assert "acquired lease" not in a.agent.log_text()[mark:]
    assert pool.status(a) == on_a

    # B may not change the master domain while A is SPM.
    with pytest.raises(ServerError) as e:
        pool.on(b).create_volume(size=128 * MiB, pool=sp)
    assert e.value.code == 651 and "held by another host" in e.value.message
    assert code_of(b.agent, "Volume.setDescription", **pool.on(b).vol_params(img, vol, sp),
                   description="from B") == 651
    assert sdm_line(a, pool.dom.sd) == held

    call(a.agent, "StoragePool.spmStop", storagepoolID=sp)
    assert not holds(a, "SDM")
    assert pool.status(a) == {"spmId": -1, "spmStatus": "Free", "spmLver": -1}
    call(a.agent, "StoragePool.spmStop", storagepoolID=sp)  # not SPM: nothing to do

    # Now B can become SPM, with the next lease version; A is the one refused.
    pool.spm_start(b)
    on_b = pool.status(b)
    assert on_b["spmId"] == 2 and on_b["spmStatus"] == "SPM"
    assert on_b["spmLver"] > on_a["spmLver"]
    assert pool.status(a) == {**on_b, "spmStatus": "Free"}
    assert code_of(a.agent, "Volume.setDescription", **pool.on(a).vol_params(img, vol, sp),
                   description="from A") == 651
    pool.on(b).delete_volume(img, vol)
    call(b.agent, "StoragePool.spmStop", storagepoolID=sp)
    assert not holds(b, "SDM")
    # Not SPM: per-operation leases again, on either host.
    img, vol = pool.on(a).create_volume(size=128 * MiB, pool=sp)
    pool.on(b).delete_volume(img, vol)


def test_a_change_asked_for_while_joining_waits_for_the_join(pool: Pool) -> None:
    a, b = pool.a, pool.b
    other = make_block_domain(a.agent, pool.env.farm, join=False, name="joining")
    with b.agent.client() as c:
        c.call("Host.startMonitoringDomain", {"sdUUID": other.sd, "hostID": 2})
        asked = time.monotonic()
        task = c.call("Volume.create", {
            "volumeID": new_id(), "storagepoolID": BLANK, "storagedomainID": other.sd,
            "imageID": new_id(), "size": str(128 * MiB), "volFormat": 5, "preallocate": 1,
            "diskType": "DATA", "desc": "", "srcImgUUID": BLANK, "srcVolUUID": BLANK})
        stats = c.call("Host.getStorageRepoStats", {"domains": [other.sd]})[other.sd]
        assert not stats["acquired"], "the join was over before the change was asked for"

        def finished() -> dict[str, Any] | None:
            st: dict[str, Any] = c.call("Task.getStatus", {"taskID": task})
            return st if st["taskState"] == "finished" else None

        st = eventually(finished, 120, "the create")
        assert st["taskResult"] == "success", st
        assert time.monotonic() - asked > 1  # it did wait for sanlock
        c.call("Task.clear", {"taskID": task})
        img = call(b.agent, "StorageDomain.getImages", storagedomainID=other.sd)
        assert len(img) == 1
        c.call("Host.stopMonitoringDomain", {"sdUUID": other.sd})
    # Without a join asked for, a change is still refused at once.
    started = time.monotonic()
    with pytest.raises(ServerError) as e:
        pool.on(b, other).create_volume(size=128 * MiB)
    assert e.value.code == 651 and "Host.startMonitoringDomain first" in e.value.message
    assert time.monotonic() - started < 10


def test_no_sanlock_daemon_is_said_plainly(pool: Pool) -> None:
    c = pool.env.host("host-c")
    socket = c.sanlock.socket
    c.sanlock.kill()
    try:
        with pytest.raises(ServerError) as e:
            make_block_domain(c.agent, pool.env.farm, join=False, name="no-sanlock")
        assert f"no sanlock daemon is reachable at {socket}" in e.value.message
        assert "sanlock daemon" in e.value.message and "run_dir" in e.value.message
        assert "No such file or directory (2)" not in e.value.message

        # Joining the pool's domain cannot start: a change fails at once, saying why.
        call(c.agent, "Host.startMonitoringDomain", sdUUID=pool.dom.sd, hostID=3)
        eventually(lambda: "no sanlock daemon" in c.agent.log_text(), 30,
                   "the monitor trying to join")
        started = time.monotonic()
        with pytest.raises(ServerError) as e:
            pool.on(c).create_volume(size=128 * MiB)
        assert e.value.code == 651
        assert f"no sanlock daemon is reachable at {socket}" in e.value.message
        assert time.monotonic() - started < 10
        call(c.agent, "Host.stopMonitoringDomain", sdUUID=pool.dom.sd)
    finally:
        c.sanlock.start()
