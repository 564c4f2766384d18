"""FenceService's handling of host events, without sanlock: the edge cases a live
cluster produces only by chance (duplicate delivery, generation 0, an event from this
host's own id, an answer naming no request of ours) and the one-event-slot queue.

sanlock's calls are replaced by recorders; events are handed to the service as its
event connection would. The same paths with real sanlock daemons are in
test_fencing.py.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Coroutine
from typing import Any

import pytest

from vdsmlite.locking import fencing, sanlock
from vdsmlite.locking.fencing import (
    EVENT_CANNOT_RESET,
    EVENT_REBOOT,
    EVENT_RESET,
    EVENT_RESETTING,
    FenceService,
    _Listening,
)
from vdsmlite.locking.watchdog import NoWatchdog, Watchdog, WatchdogService


def aio(fn: Callable[..., Coroutine[Any, Any, None]]) -> Callable[..., None]:
    """Run an async test in its own event loop (no pytest-asyncio here)."""
    @functools.wraps(fn)
    def run(*args: Any, **kw: Any) -> None:
        asyncio.run(fn(*args, **kw))
    return run


SD = "11111111-2222-3333-4444-555555555555"
ME, MY_GEN = 2, 7
FENCER, FENCER_GEN = 1, 3


class FakeMonitors:
    io_timeout = 1

    def subscribe(self, listener: Any) -> None:
        pass

    def host_id(self, sd_uuid: str) -> int | None:
        return ME if sd_uuid == SD else None

    def forget_announcement(self, sd_uuid: str) -> None:
        pass


class RecordingWatchdog(Watchdog):
    name = "recording"

    def __init__(self) -> None:
        super().__init__(10)
        self.abandoned = 0

    def arm(self) -> None:
        pass

    def keepalive(self) -> None:
        pass

    def disarm(self) -> None:
        pass

    def abandon(self) -> None:
        self.abandoned += 1


class Harness:
    def __init__(self, monkeypatch: pytest.MonkeyPatch, watchdog: Watchdog) -> None:
        self.set_events: list[tuple[str, int, int, int, int]] = []
        self.used: list[str] = []
        self.published: list[tuple[str, dict[str, Any]]] = []
        self.watchdog = WatchdogService(watchdog)
        self.generations = {3: 5, 4: 9}  # host id -> generation, as get_hosts reports

        def set_event(sd: str, host_id: int, gen: int, event: int, *, data: int = 0,
                      flags: int = 0) -> None:
            self.set_events.append((sd, host_id, gen, event, data))

        def set_config(sd: str, cmd: int) -> None:
            self.used.append(sd)

        def get_hosts(sd: str, host_id: int = 0) -> list[sanlock.Host]:
            return [sanlock.Host(host_id, self.generations[host_id], 1, 1, "live")]

        monkeypatch.setattr(sanlock, "set_event", set_event)
        monkeypatch.setattr(sanlock, "set_config", set_config)
        monkeypatch.setattr(sanlock, "get_hosts", get_hosts)

        async def run(fn: Any, *args: Any, **kw: Any) -> Any:
            return fn(*args, **kw)

        self.service = FenceService(FakeMonitors(), self.watchdog,  # type: ignore[arg-type]
                                    run, lambda name, body: self.published.append((name, body)))
        self.me = _Listening(ME, MY_GEN, -1)

    def deliver(self, *, event: int = EVENT_RESET, to: int = ME, gen: int = MY_GEN,
                frm: int = FENCER, frm_gen: int = FENCER_GEN, data: int = 0xABC) -> None:
        self.service._on_event(SD, self.me, sanlock.Event(to, gen, event, data, frm, frm_gen))

    async def settle(self) -> None:
        for _ in range(5):
            await asyncio.sleep(0)
        tasks = list(self.service._tasks)
        if tasks:
            await asyncio.gather(*tasks)


@pytest.fixture
def harness(monkeypatch: pytest.MonkeyPatch) -> Harness:
    return Harness(monkeypatch, RecordingWatchdog())


@aio
async def test_duplicate_delivery_is_taken_once_faked_sanlock(harness: Harness) -> None:
    # sanlock delivers an event at each of 2-3 renewals: one request, one reset.
    for _ in range(3):
        harness.deliver()
    await harness.settle()
    assert len(harness.service.received) == 1
    assert harness.set_events == [(SD, FENCER, FENCER_GEN, EVENT_RESETTING, 0xABC)]
    assert harness.used == [SD]
    assert harness.watchdog.fenced is not None
    # Another nonce from the same sender is another request (answered again); the
    # watchdog is abandoned once.
    harness.deliver(data=0xDEF)
    await harness.settle()
    assert len(harness.service.received) == 2
    assert harness.set_events[-1] == (SD, FENCER, FENCER_GEN, EVENT_RESETTING, 0xDEF)
    assert harness.watchdog.watchdog.abandoned == 1  # type: ignore[attr-defined]


@aio
async def test_generation_0_means_whatever_generation_faked_sanlock(harness: Harness) -> None:
    harness.deliver(gen=0, event=EVENT_RESET | EVENT_REBOOT)
    await harness.settle()
    assert harness.service.received[0]["generation"] == MY_GEN
    assert harness.set_events == [(SD, FENCER, FENCER_GEN, EVENT_RESETTING | 8, 0xABC)]
    assert harness.watchdog.fenced is not None


@aio
async def test_a_previous_generation_is_ignored_faked_sanlock(harness: Harness) -> None:
    harness.deliver(gen=MY_GEN - 1)
    await harness.settle()
    assert harness.service.received == [] and harness.service.ignored == 1
    assert harness.set_events == [] and harness.watchdog.fenced is None


@aio
async def test_an_event_from_this_hosts_own_id_is_ignored_faked_sanlock(harness: Harness) -> None:
    harness.deliver(frm=ME, frm_gen=MY_GEN)
    await harness.settle()
    assert harness.service.received == [] and harness.service.ignored == 1
    assert harness.set_events == [] and harness.used == []
    assert harness.watchdog.fenced is None
    # Nor is a request naming another host id taken (sanlock should not deliver it).
    harness.deliver(to=ME + 1)
    await harness.settle()
    assert harness.service.ignored == 2 and harness.watchdog.fenced is None


@aio
async def test_a_request_whose_data_names_another_host_is_ignored_faked_sanlock(
        harness: Harness) -> None:
    # sanlock notifies every host whose bit is set with the sender's latest event:
    # another target's request must not reset this host, whatever its generation.
    harness.deliver(data=(ME + 1) << fencing.TARGET_SHIFT | 0xABC)
    await harness.settle()
    assert harness.service.received == [] and harness.service.ignored == 1
    assert harness.watchdog.fenced is None
    harness.deliver(data=ME << fencing.TARGET_SHIFT | 0xABC)
    await harness.settle()
    assert [r["nonce"] for r in harness.service.received] == [0xABC]
    assert harness.set_events == [(SD, FENCER, FENCER_GEN, EVENT_RESETTING,
                                   ME << fencing.TARGET_SHIFT | 0xABC)]


@aio
async def test_an_answer_with_an_unknown_nonce_is_ignored_faked_sanlock(harness: Harness) -> None:
    reply = await harness.service.fence("reboot", {SD: 3})
    nonce = reply["nonce"]
    for event, data, frm in ((EVENT_RESETTING, nonce ^ 1, 3),         # unknown nonce
                             (EVENT_CANNOT_RESET, nonce + 1, 3),      # unknown nonce
                             (EVENT_RESETTING, nonce, 4),             # not the target
                             (EVENT_RESETTING, 4 << fencing.TARGET_SHIFT | nonce, 3)):
        harness.deliver(event=event, data=data, frm=frm, to=ME)
    await harness.settle()
    assert harness.service.unknown_acks == 4
    status = await harness.service.status({SD: 3})
    assert status["acknowledged"] is False and status["cannotReset"] is False
    # Answers are not requests: nothing was taken, nothing reset.
    assert harness.service.received == [] and harness.watchdog.fenced is None
    harness.deliver(event=EVENT_RESETTING, data=3 << fencing.TARGET_SHIFT | nonce, frm=3)
    assert (await harness.service.status({SD: 3}))["acknowledged"] is True


@aio
async def test_no_watchdog_answers_cannot_reset_faked_sanlock(
        monkeypatch: pytest.MonkeyPatch) -> None:
    h = Harness(monkeypatch, NoWatchdog(10))
    h.deliver()
    await h.settle()
    # Answered with what is true, not "resetting"; not marked used (it keeps running
    # and may still leave cleanly); nothing "fenced".
    assert h.set_events == [(SD, FENCER, FENCER_GEN, EVENT_CANNOT_RESET, 0xABC)]
    assert h.used == [] and h.watchdog.fenced is None
    assert h.service.received[0]["complied"] is False

    # The fencer's side of it.
    reply = await h.service.fence("off", {SD: 3})
    h.deliver(event=EVENT_CANNOT_RESET, data=reply["nonce"], frm=3)
    status = await h.service.status({SD: 3})
    assert status["acknowledged"] is False and status["cannotReset"] is True
    assert "use another fence agent" in status["message"]
    assert h.published[-1][0] == "|fence|cannot_reset"


@aio
async def test_second_request_in_a_lockspace_waits_for_the_first_faked_sanlock(
        harness: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fencing, "SLOT_IO_TIMEOUTS", 30)  # only an answer frees the slot
    first = await harness.service.fence("reboot", {SD: 3})
    second = await harness.service.fence("reboot", {SD: 4})
    third = await harness.service.fence("off", {SD: 3})
    assert "queued" not in first and second["queued"] == [SD] and third["queued"] == [SD]
    await harness.settle()
    assert [e[1] for e in harness.set_events] == [3]   # the slot still carries host 3's
    assert harness.service.requests[second["nonce"]].to_json()["queued"] == [SD]

    def data(host_id: int, reply: dict[str, Any]) -> int:
        return int(host_id << fencing.TARGET_SHIFT | reply["nonce"])

    # Host 3 answers: its bit is cleared (event 0: SETEV_CLEAR_HOSTID), then the
    # request for host 4 is set.
    harness.deliver(event=EVENT_RESETTING, data=data(3, first), frm=3)
    for _ in range(20):
        await asyncio.sleep(0)
    assert [(e[1], e[2], e[3] != 0, e[4]) for e in harness.set_events] == [
        (3, 5, True, data(3, first)), (3, 5, False, 0), (4, 9, True, data(4, second))]
    harness.deliver(event=EVENT_CANNOT_RESET, data=data(4, second), frm=4)
    for _ in range(20):
        await asyncio.sleep(0)
    assert [e[4] for e in harness.set_events if e[3]] == [
        data(3, first), data(4, second), data(3, third)]
    await harness.service.close()


@aio
async def test_an_unanswered_slot_frees_after_sanlocks_window_faked_sanlock(
        harness: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fencing, "SLOT_IO_TIMEOUTS", 0.3)
    await harness.service.fence("reboot", {SD: 3})
    second = await harness.service.fence("reboot", {SD: 4})
    assert second["queued"] == [SD]
    await asyncio.sleep(0.6)
    assert [e[1] for e in harness.set_events] == [3, 4]
    assert harness.service.requests[second["nonce"]].to_json()["queued"] == []


@aio
async def test_an_answer_waits_for_this_hosts_own_request_faked_sanlock(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # A host without a watchdog keeps running: its "cannot reset" answer and its own
    # requests share the lockspace's one event slot, and neither replaces the other.
    monkeypatch.setattr(fencing, "SLOT_IO_TIMEOUTS", 30)
    h = Harness(monkeypatch, NoWatchdog(10))
    mine = await h.service.fence("reboot", {SD: 3})
    h.deliver(data=0xABC)     # a request for this host, from host 1
    for _ in range(20):
        await asyncio.sleep(0)
    assert [e[3] for e in h.set_events] == [EVENT_RESET | EVENT_REBOOT]
    h.deliver(event=EVENT_RESETTING, data=3 << fencing.TARGET_SHIFT | mine["nonce"], frm=3)
    for _ in range(20):
        await asyncio.sleep(0)
    # Host 3 answered: its bit is cleared, then the answer to host 1 is set...
    assert [(e[1], e[3]) for e in h.set_events] == [
        (3, EVENT_RESET | EVENT_REBOOT), (3, 0), (FENCER, EVENT_CANNOT_RESET)]
    # ...and holds the slot for sanlock's window: the next request waits behind it.
    later = await h.service.fence("off", {SD: 4})
    assert later["queued"] == [SD]
    await h.service.close()


@aio
async def test_a_lockspace_joined_before_start_can_carry_requests_faked_sanlock(
        harness: Harness) -> None:
    # No monitor holds it yet (the engine has not asked again since the restart), but
    # sanlock does, and this host listens there: it may fence through it too.
    other = "66666666-2222-3333-4444-555555555555"
    with pytest.raises(Exception, match="has not joined"):
        await harness.service.fence("reboot", {other: 3})
    harness.service._listening[other] = _Listening(ME, MY_GEN, -1)
    reply = await harness.service.fence("reboot", {other: 3})
    assert harness.set_events == [(other, 3, 5, EVENT_RESET | EVENT_REBOOT,
                                   3 << fencing.TARGET_SHIFT | reply["nonce"])]
    with pytest.raises(Exception, match="never fences itself"):
        await harness.service.fence("reboot", {other: ME})
    harness.service._listening.clear()
