"""The OVF parser processes: results, errors, a dying worker, a hostile OVF, orphans;
and the batcher that feeds them."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import eventually
from tests.ovf_helpers import build_tar, entity_ovf
from vdsmlite.ovf.batches import NamedDoc, OvfBatcher
from vdsmlite.ovf.model import OvfError
from vdsmlite.ovf.tarstream import TarError, TarValidator
from vdsmlite.ovf.workers import NICENESS, OvfWorkers

pytestmark = pytest.mark.unit

ENVELOPE = b'<ovf:Envelope xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/1/">'
UNBOUND_PREFIX = ENVELOPE + b"<Content><x:Name/></Content></ovf:Envelope>"
NOT_AN_OVF = b"<html/>"
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def workers() -> Iterator[OvfWorkers]:
    w = OvfWorkers(processes=2, memory_limit=512 * 1024 * 1024)
    try:
        yield w
    finally:
        w.close()


def test_summaries_and_reasons_come_back_in_order(workers: OvfWorkers) -> None:
    (id0, doc0), (id1, doc1) = entity_ovf("vm-0"), entity_ovf("vm-1")
    got = workers.summarize([doc0, UNBOUND_PREFIX, doc1, NOT_AN_OVF]).result(timeout=60)
    assert isinstance(got[0], dict) and got[0]["id"] == id0 and got[0]["name"] == "vm-0"
    assert isinstance(got[1], str) and "prefix" in got[1]
    assert isinstance(got[2], dict) and got[2]["id"] == id1
    assert isinstance(got[3], str) and "not an OVF Envelope" in got[3]


def test_workers_run_at_a_lower_cpu_priority_than_their_daemon(workers: OvfWorkers) -> None:
    workers.start()
    ours = os.getpriority(os.PRIO_PROCESS, 0)
    assert len(workers.pids()) == 2

    def lowered() -> bool:  # a worker spawned but given no task yet may still start
        return all(os.getpriority(os.PRIO_PROCESS, pid) == min(19, ours + NICENESS)
                   for pid in workers.pids())

    eventually(lowered, 30, "every worker at the lower priority")


def test_check_names_the_first_bad_member(workers: OvfWorkers) -> None:
    good = entity_ovf("vm")[1]
    workers.check([("a.ovf", good), ("b.ovf", good)]).result(timeout=60)
    with pytest.raises(OvfError, match=r"^b\.ovf: .*not an OVF Envelope"):
        workers.check([("a.ovf", good), ("b.ovf", NOT_AN_OVF),
                       ("c.ovf", b"<broken")]).result(timeout=60)


def test_a_killed_worker_costs_one_batch_at_most(workers: OvfWorkers) -> None:
    doc = entity_ovf("vm")[1]
    workers.summarize([doc]).result(timeout=60)
    victims = workers.pids()
    assert victims
    for pid in victims:
        os.kill(pid, signal.SIGKILL)
    failures = 0
    for _ in range(3):
        try:
            assert workers.summarize([doc]).result(timeout=60)[0]["name"] == "vm"
            break
        except OvfError as e:
            assert "died" in str(e)
            failures += 1
    assert failures <= 1
    assert not set(workers.pids()) & set(victims)


def test_a_hostile_ovf_hits_the_memory_limit_not_the_daemon() -> None:
    # 7 M empty elements: ~28 MB of XML (under the 32 MB OVF limit) whose tree
    # needs about a gigabyte - far over this pool's 256 MiB.
    hostile = ENVELOPE + b"<a/>" * 7_000_000 + b"</ovf:Envelope>"
    workers = OvfWorkers(processes=1, memory_limit=256 * 1024 * 1024)
    try:
        try:
            result = workers.summarize([hostile]).result(timeout=300)[0]
            # Refused for want of memory: with room to parse it, the complaint would be
            # that it holds no virtual system.
            assert isinstance(result, str), result
            assert "virtual system" not in result
        except OvfError as e:
            assert "died" in str(e)  # or the worker did not survive its malloc failure
        assert workers.summarize([entity_ovf("vm")[1]]).result(timeout=60)[0]["name"] == "vm"
    finally:
        workers.close()


def test_worker_checks_refuse_a_bad_member_of_an_archive(workers: OvfWorkers) -> None:
    (id0, doc0), (id1, _) = entity_ovf("vm-0"), entity_ovf("vm-1")
    good = build_tar([(f"{id0}.ovf", doc0)])
    validator = TarValidator(1 << 30, check_xml=workers.check, check_ahead=0)
    validator.feed(good)
    assert validator.finish().entity_ids == [id0]
    bad = build_tar([(f"{id0}.ovf", doc0), (f"{id1}.ovf", NOT_AN_OVF)])
    validator = TarValidator(1 << 30, check_xml=workers.check)
    validator.feed(bad)
    with pytest.raises(TarError, match=rf"^{id1}\.ovf: .*not an OVF Envelope"):
        validator.finish()


class _LazyFuture(Future[Any]):
    """Done only when asked for its result, which the test records as a wait."""

    def __init__(self, value: Any, waits: list[Any]) -> None:
        super().__init__()
        self._value = value
        self._waits = waits

    def result(self, timeout: float | None = None) -> Any:
        if not self.done():
            self._waits.append(self._value)
            if isinstance(self._value, BaseException):
                self.set_exception(self._value)
            else:
                self.set_result(self._value)
        return super().result(timeout)


def test_batcher_sends_batches_by_bytes_and_hands_results_on_in_order() -> None:
    sent: list[list[NamedDoc]] = []
    filed: list[tuple[list[str], int]] = []

    def submit(docs: list[NamedDoc]) -> Future[int]:
        sent.append(docs)
        future: Future[int] = Future()
        future.set_result(len(sent))
        return future

    batcher = OvfBatcher(submit, lambda names, n: filed.append((names, n)),
                         batch_bytes=10, ahead_bytes=100)
    for name in "abcde":
        batcher.add(name, b"1234")
    batcher.finish()
    assert [[name for name, _ in docs] for docs in sent] == [["a", "b", "c"], ["d", "e"]]
    assert filed == [(["a", "b", "c"], 1), (["d", "e"], 2)]


def test_batcher_waits_only_when_too_much_is_out() -> None:
    waits: list[Any] = []
    batcher = OvfBatcher(lambda docs: _LazyFuture(docs[0][0], waits),
                         batch_bytes=4, ahead_bytes=8)
    batcher.add("a", b"1234")
    batcher.add("b", b"1234")
    assert waits == []  # 8 bytes out: not more than allowed
    batcher.add("c", b"1234")
    assert waits == ["a"]  # the oldest batch, and no more
    batcher.finish()
    assert waits == ["a", "b", "c"]


def test_a_failed_batch_cancels_the_rest_and_is_raised() -> None:
    waits: list[Any] = []
    futures: list[Future[Any]] = []

    def submit(docs: list[NamedDoc]) -> Future[Any]:
        value = OvfError(f"{docs[0][0]}: bad") if docs[0][0] == "a" else None
        futures.append(_LazyFuture(value, waits))
        return futures[-1]

    batcher = OvfBatcher(submit, batch_bytes=1, ahead_bytes=1 << 20)
    for name in "abc":
        batcher.add(name, b"x")
    with pytest.raises(OvfError, match=r"^a: bad$"):
        batcher.finish()
    assert [f.cancelled() for f in futures] == [False, True, True]
    batcher.finish()  # nothing left to wait for


ORPHAN_SCRIPT = """
import os, signal, sys
sys.path.insert(0, sys.argv[1])
from tests.ovf_helpers import entity_ovf
from vdsmlite.ovf.workers import NICENESS, OvfWorkers
w = OvfWorkers(processes=2, memory_limit=512 * 1024 * 1024)
w.summarize([entity_ovf("vm")[1]]).result(timeout=60)
print(" ".join(map(str, w.pids())), flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_workers_leave_when_their_daemon_is_killed() -> None:
    out = subprocess.run([sys.executable, "-c", ORPHAN_SCRIPT, str(REPO)],
                         capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == -signal.SIGKILL, out.stderr
    pids = [int(p) for p in out.stdout.split()]
    assert pids
    deadline = time.monotonic() + 30
    while any(Path(f"/proc/{pid}").exists() for pid in pids):
        assert time.monotonic() < deadline, f"orphaned workers {pids}"
        time.sleep(0.2)
