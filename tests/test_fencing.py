"""Several simulated hosts on one block domain: the SDM lease and fencing through storage.

Each host is its own sanlock daemon + vdsmlite agent (+ emulated watchdog), all on
the same loop LUN, with io_timeout 1. sanlock 3.8.5 declares a host dead only
8 x io_timeout + 60 s after its last renewal (the 60 s watchdog term is
hard-coded), so the full fencing test takes a good minute and a half.
"""

from __future__ import annotations

import contextlib
import os
import socket
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fake_storage.cluster import SimHost
from tests.helpers import call, check_clean, code_of, eventually
from tests.locking_helpers import StalledUpload, holds
from tests.storage_helpers import (
    BLANK,
    DomainUnderTest,
    StorageEnv,
    join_lockspace,
    join_together,
    make_block_domain,
    run_task,
)
from vdsmlite.client import ServerError

pytestmark = pytest.mark.root

MiB = 1 << 20


def same_domain(dom: DomainUnderTest, host: SimHost) -> DomainUnderTest:
    return DomainUnderTest(host.agent, dom.sd, "block", dom.block_size, lun=dom.lun)


def fence(host: SimHost, action: str, host_map: dict[str, int], **kw: Any) -> dict[str, Any]:
    return call(host.agent, "Host.fenceNode", addr="target", agent=kw.pop("agent", "sanlock"),
                action=action, policy={"storageDomainHostIdMap": host_map}, **kw)


# First, while no other simulated host of this module runs: the timings it checks are
# the watchdogs' and sanlock's, on 2 cores.
@pytest.mark.slow
def test_fencing_resets_the_target_and_frees_what_it_held(env: StorageEnv) -> None:
    a = env.host("host-a", watchdog_timeout=3, lease_timeout=30.0)
    # B's watchdog gives its sanlock a few renewals (<= 3 s apart at io_timeout 1) to
    # carry the acknowledgement before the reset silences it.
    b = env.host("host-b", watchdog_timeout=8,
                 config={"storage": {"upload_stall_timeout": 600.0}})
    c = env.host("host-c", watchdog_timeout=3)
    assert a.watchdog and b.watchdog and c.watchdog
    dom = make_block_domain(a.agent, env.farm, join=False)
    join_together(dom.sd, (a.agent, 1), (b.agent, 2), (c.agent, 3))
    eventually(lambda: dom.sd in call(b.agent, "Host.getStats")["fencing"]["listening"], 30,
             "B listening for fence requests")
    # A reports B once its sanlock has read B's lease in a renewal (B joined with it).
    eventually(lambda: fence(a, "status", {dom.sd: 2})["power"] == "on", 30, "A seeing B")
    assert fence(a, "status", {dom.sd: 2}) | {"hosts": None} == {
        "operationStatus": "initiated", "power": "on", "acknowledged": False, "hosts": None,
        "cannotReset": False}

    # B holds the domain's SDM lease (an OVF_STORE upload that never ends)...
    upload = socket.create_connection(b.agent.tcp_address or ("", 0), timeout=60)
    upload.sendall(f"PUT /ovfstore/{dom.sd} HTTP/1.1\r\nHost: x\r\n"
                   "Transfer-Encoding: chunked\r\n\r\n".encode())
    eventually(lambda: holds(b, "SDM"), 30, "B holding SDM")

    # ...and A fences it.
    reply = fence(a, "reboot", {dom.sd: 2})
    assert reply["operationStatus"] == "initiated"
    reset = b.watchdog.wait_reset(60)
    assert not b.sanlock.alive()  # the simulated reset took the whole host down
    log = b.agent.log_text()
    assert "this host is being fenced" in log and "stopped petting" in log
    eventually(lambda: fence(a, "status", {dom.sd: 2})["acknowledged"], 30, "B's ack")
    # B stopped petting right after it took the request: the watchdog fired one
    # timeout later, not at some unrelated moment.
    assert 8 <= reset.at - reset.last_keepalive < 11

    # Until sanlock declares B dead, A must not take what B held.
    with pytest.raises(ServerError) as e:
        same_domain(dom, a).create_volume(size=128 * MiB)
    assert e.value.code == 651
    # sanlock: dead 8 x io_timeout + 60 s after B's last renewal seen by A.
    eventually(lambda: fence(a, "status", {dom.sd: 2})["power"] == "off", 150, "B dead")
    img, vol = same_domain(dom, a).create_volume(size=128 * MiB)
    assert same_domain(dom, a).info(img, vol)["legality"] == "LEGAL"
    upload.close()

    # C was never addressed: it kept petting and heard nothing for itself.
    assert c.watchdog.resets == [] and c.agent.proc is not None
    assert c.agent.proc.poll() is None
    fencing = call(c.agent, "Host.getStats")["fencing"]
    assert fencing["received"] == []
    assert call(a.agent, "Host.getStats")["fencing"]["requests"][0]["acknowledged"]


class Pair:
    """Hosts A (id 1) and B (id 2) on one block domain, shared by the tests below that
    are not about sanlock declaring a host dead. Each test gets them running, both
    joined, and the domain with no image; what a test made is deleted after it."""

    def __init__(self, env: StorageEnv) -> None:
        self.agents_dir = env.tmp_path / "fence-agents"
        self.agents_dir.mkdir()
        self.a = env.host("host-a", config={"storage": {"upload_stall_timeout": 120.0},
                                            "fencing": {"agents_dir": str(self.agents_dir)}})
        self.b = env.host("host-b", watchdog_timeout=3, lease_timeout=3.0)
        self.dom = make_block_domain(self.a.agent, env.farm, join=False)
        join_together(self.dom.sd, (self.a.agent, 1), (self.b.agent, 2))

    @contextlib.contextmanager
    def lend(self) -> Iterator[Pair]:
        for host in (self.a, self.b):
            if host.agent.proc is None or host.agent.proc.poll() is not None:
                host.restart()
        join_together(self.dom.sd, (self.a.agent, 1), (self.b.agent, 2))
        assert call(self.a.agent, "StorageDomain.getImages", storagedomainID=self.dom.sd) == []
        marks = [h.agent.log_size() for h in (self.a, self.b)]
        yield self
        for img in call(self.a.agent, "StorageDomain.getImages", storagedomainID=self.dom.sd):
            with self.a.agent.client() as c:
                run_task(c, "Image.delete", {"imageID": img, "storagepoolID": BLANK,
                                             "storagedomainID": self.dom.sd,
                                             "postZero": False, "force": True})
        for host, mark in zip((self.a, self.b), marks, strict=True):
            check_clean(host.agent, since=mark)


@pytest.fixture(scope="module")
def shared_pair(module_env: StorageEnv) -> Pair:
    return Pair(module_env)


@pytest.fixture
def pair(shared_pair: Pair) -> Iterator[Pair]:
    with shared_pair.lend() as p:
        yield p


def test_only_one_host_at_a_time_changes_a_domain(pair: Pair) -> None:
    a, b, dom = pair.a, pair.b, pair.dom
    on_b = same_domain(dom, b)
    with StalledUpload(a.agent, dom.sd):
        eventually(lambda: holds(a, "SDM"), 30, "A holding SDM during its OVF_STORE upload")
        # Its two OVF_STORE volumes are created under the lease too.
        eventually(lambda: len(call(b.agent, "StorageDomain.getImages",
                                  storagedomainID=dom.sd)) == 2, 30, "OVF_STORE volumes")
        images = call(b.agent, "StorageDomain.getImages", storagedomainID=dom.sd)
        with pytest.raises(ServerError) as e:
            on_b.create_volume(size=128 * MiB)
        assert e.value.code == 651
        assert "held by another host" in e.value.message
        assert call(b.agent, "StorageDomain.getImages", storagedomainID=dom.sd) == images
    eventually(lambda: not holds(a, "SDM"), 30, "A releasing SDM")
    img, vol = on_b.create_volume(size=128 * MiB)  # now B may
    assert same_domain(dom, a).info(img, vol)["legality"] == "LEGAL"


def test_a_request_for_a_previous_incarnation_is_ignored(pair: Pair) -> None:
    a, b, dom = pair.a, pair.b, pair.dom
    assert b.watchdog is not None
    resets = len(b.watchdog.resets)
    old = listening_generation(b, dom.sd)
    b.restart()  # a new incarnation: sanlock gives it the next generation
    join_lockspace(b.agent, dom.sd, host_id=2)
    new = listening_generation(b, dom.sd)
    assert new > old
    keepalives = b.watchdog.keepalives
    # What a fencer that had not seen the restart would send (sanlock does not filter
    # by generation: the new incarnation receives it).
    subprocess.run(["sanlock", "client", "set_event", "-s", dom.sd, "-i", "2", "-g", str(old),
                    "-e", "1", "-d", "0x5eed"], env={**os.environ, **a.sanlock.env},
                   check=True, capture_output=True, timeout=30)
    eventually(lambda: "previous incarnation" in b.agent.log_text(), 60, "B ignoring it")
    ignored_at = time.monotonic()
    # Had B taken the request, it would stop petting and its watchdog would fire one
    # timeout (3 s) after the last pet. A pet later than that proves it kept petting.
    eventually(lambda: (b.watchdog.last_keepalive or 0) > ignored_at + 3, 30,  # type: ignore[union-attr]
               "B petting for longer than its watchdog timeout")
    assert len(b.watchdog.resets) == resets
    assert b.watchdog.keepalives > keepalives
    fencing = call(b.agent, "Host.getStats")["fencing"]
    assert fencing["received"] == [] and fencing["ignored"] >= 1


def listening_generation(host: SimHost, sd: str) -> int:
    def listening() -> Any:
        return call(host.agent, "Host.getStats")["fencing"]["listening"].get(sd)

    eventually(lambda: listening() is not None, 60, "listening for fence requests")
    return int(listening()["generation"])


def test_fence_requests_that_must_not_be_sent(pair: Pair, module_env: StorageEnv,
                                             tmp_path: Path) -> None:
    agents = pair.agents_dir
    script = agents / "fence_fake"
    script.write_text(f"#!/bin/sh\ncat > {tmp_path}/stdin\n"
                      'grep -q "^action=status" ' f"{tmp_path}/stdin && exit 2\nexit 0\n")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    a, dom = pair.a, pair.dom
    other = make_block_domain(a.agent, module_env.farm, join=False)

    def refused(action: str, host_map: dict[str, int]) -> str:
        with pytest.raises(ServerError) as e:
            fence(a, action, host_map)
        assert e.value.code == 1000
        return e.value.message

    assert "has not joined" in refused("reboot", {other.sd: 2})
    assert "never fences itself" in refused("reboot", {dom.sd: 1})
    assert "at least one" in refused("reboot", {})
    assert "no host id 5" in refused("off", {dom.sd: 5})
    assert "power it on" in refused("on", {dom.sd: 2})
    assert fence(a, "status", {dom.sd: 3})["power"] == "unknown"  # never seen (B is id 2)
    assert code_of(a.agent, "Host.fenceNode", addr="x", agent="sanlock", action="reboot",
                   policy={"storageDomainHostIdMap": {"not-a-uuid": 2}}) == 1000

    # Other agents run as VDSM runs them...
    assert fence(a, "status", {}, agent="fake", username="u", password="secret",
                 port="623", options="lanplus=1\n")["power"] == "off"
    assert (tmp_path / "stdin").read_text().splitlines() == [
        "agent=fence_fake", "ipaddr=target", "login=u", "action=status", "passwd=secret",
        "port=623", "lanplus=1"]
    assert "secret" not in a.agent.log_text()
    # ...but not while the target still renews its lease in a listed domain.
    assert fence(a, "reboot", {dom.sd: 1}, agent="fake")["operationStatus"] == "skipped"
    assert fence(a, "reboot", {}, agent="fake")["operationStatus"] == "initiated"
    assert code_of(a.agent, "Host.fenceNode", addr="x", agent="nope", action="status") == 43
    assert code_of(a.agent, "Host.fenceNode", addr="x", agent="../fake", action="status") == 43


def fencing_stats(host: SimHost) -> dict[str, Any]:
    return call(host.agent, "Host.getStats")["fencing"]  # type: ignore[no-any-return]


def test_a_restarted_agent_hears_fence_requests_and_says_it_cannot_reset(pair: Pair) -> None:
    a, b, dom = pair.a, pair.b, pair.dom
    # A's agent restarts; its sanlock keeps renewing A's lease, so B sees A live...
    a.agent.kill()
    a.agent.start()
    # ...and A listens there from its first answer on, though nobody asked it to
    # monitor the domain again.
    assert dom.sd in fencing_stats(a)["listening"]
    assert call(a.agent, "Host.getStorageRepoStats", domains=[dom.sd]) == {}
    assert "before this agent started" in a.agent.log_text()
    eventually(lambda: fence(b, "status", {dom.sd: 1})["power"] == "on", 30, "B seeing A")

    # A has no watchdog (backend "none"): it says it cannot reset, not "resetting".
    assert call(a.agent, "Host.getStats")["watchdog"]["backend"] == "none"
    reply = fence(b, "reboot", {dom.sd: 1})
    eventually(lambda: fence(b, "status", {dom.sd: 1})["cannotReset"], 60, "A's answer")
    status = fence(b, "status", {dom.sd: 1})
    assert status["acknowledged"] is False and status["power"] == "on"
    assert "use another fence agent" in status["message"]
    received = fencing_stats(a)["received"]
    assert [(r["nonce"], r["complied"]) for r in received] == [(reply["nonce"], False)]
    assert call(a.agent, "Host.getStats")["watchdog"]["fenced"] is None
    assert "cannot comply" in a.agent.log_text()


def test_two_targets_fenced_back_to_back_both_get_their_request(env: StorageEnv) -> None:
    # sanlock keeps one outgoing event per lockspace: the second request must not
    # replace the first before its target read it. B and C have no watchdog, so each
    # answers that it cannot reset - proof of which request reached whom, and fast.
    a, b, c = env.host("host-a"), env.host("host-b"), env.host("host-c")
    dom = make_block_domain(a.agent, env.farm, join=False)
    join_together(dom.sd, (a.agent, 1), (b.agent, 2), (c.agent, 3))
    for host in (b, c):
        eventually(lambda h=host: dom.sd in fencing_stats(h)["listening"], 30,  # type: ignore[misc]
                   "listening for fence requests")
    eventually(lambda: all(fence(a, "status", {dom.sd: i})["power"] == "on" for i in (2, 3)),
               30, "A seeing B and C")
    first = fence(a, "reboot", {dom.sd: 2})
    second = fence(a, "off", {dom.sd: 3})
    assert "queued" not in first and second["queued"] == [dom.sd]
    eventually(lambda: all(fence(a, "status", {dom.sd: i})["cannotReset"] for i in (2, 3)),
               60, "both answers")
    for host, reply in ((b, first), (c, second)):
        assert [r["nonce"] for r in fencing_stats(host)["received"]] == [reply["nonce"]]
    requests = {r["nonce"]: r for r in fencing_stats(a)["requests"]}
    assert requests[second["nonce"]]["queued"] == []
    assert fencing_stats(a)["unknownAcks"] == 0
