"""Fencing through storage: reset requests carried by sanlock host events.

A host that must be fenced may have lost its management network but still
write to storage: every host renews its delta lease in each lockspace it has
joined, and sanlock can carry a small event from one host to another in those
renewals (sanlock's "host events", sanlock_set_event / sanlock_get_event, the
mechanism its sanlk-reset tool uses). With sanlk-reset's vocabulary:

* the fencer (`FenceService.fence`, for Host.fenceNode with agent "sanlock")
  sets a RESET event for the target's host id and current generation in every
  lockspace the engine names, with a random nonce as the event data;
* the target (`FenceService` listening on every lockspace it joined) takes a
  RESET for its own id and generation (or generation 0) once per sender and
  nonce - sanlock delivers each event 2-3 times and does not filter by
  generation, so a restarted host can receive a request meant for its previous
  incarnation, which it ignores - then marks the lockspace used (so it cannot
  leave cleanly and look FREE), answers RESETTING to the sender with the same
  nonce, and stops petting its watchdog, which resets it. A host whose watchdog
  backend is "none" cannot be reset that way: it answers CANNOT_RESET (a
  vdsmlite bit, outside sanlk-reset's) instead, keeps running, and the fencer's
  status says so - another fence agent is needed;
* sanlock keeps one outgoing event per lockspace: set_event replaces its
  generation/event/data and adds the target to a bitmap of hosts notified, a bit
  that stays set for set_bitmap_seconds (6 x io_timeout). A second request set
  meanwhile is what every notified host reads - the first target would take the
  second target's request if their generations happen to match. So a request
  to another target in the same lockspace waits until the first target's bit
  is gone: cleared by us (SETEV_CLEAR_HOSTID) once it answered, or by sanlock
  after `SLOT_IO_TIMEOUTS` x io_timeout. A "cannot reset" answer takes its turn
  in the slot the same way (RESETTING does not: that host is going down). And
  the event data names the target (`TARGET_SHIFT`), so a host never takes a
  request that reached it in another target's place;
* after an agent restart sanlock still holds the lockspaces it had joined (the
  host stays live there): `listen_to_joined` registers for their events at
  start, before the agent reports ready, so requests are not missed meanwhile
  (and this host may fence through them before a monitor takes them over);
* the fencer reports the target ``off`` once sanlock says it is DEAD in the
  listed lockspaces (8 x io_timeout + 60 s after its last renewal), and whether
  it acknowledged.

A host never fences itself: requests naming our own id are refused here, and
events from our own id are ignored there.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from vdsmlite import errors
from vdsmlite.blocking import RunBlocking
from vdsmlite.ids import parse_uuid
from vdsmlite.locking import sanlock
from vdsmlite.locking.monitor import MonitorManager
from vdsmlite.locking.watchdog import WatchdogService

log = logging.getLogger("vdsmlite.locking.fencing")

# sanlk-reset's event bits (reset/sanlk_reset.h)
EVENT_RESET = 1
EVENT_RESETTING = 2
EVENT_REBOOT = 4
EVENT_REBOOTING = 8
# vdsmlite's answer when no watchdog can reset this host (a bit sanlk-reset never uses)
EVENT_CANNOT_RESET = 0x10000

# Event data: the target's host id above TARGET_SHIFT, a random nonce below (host
# ids are at most 2000). Data naming host 0 (sanlk-reset sends 0) is for anyone.
TARGET_SHIFT = 48
NONCE_MASK = (1 << TARGET_SHIFT) - 1

# sanlock notifies a target for set_bitmap_seconds (6 x io_timeout) after set_event;
# the renewal that drops its bit comes up to 2 x io_timeout later; one more of slack.
SLOT_IO_TIMEOUTS = 9

MAX_REQUESTS_KEPT = 100  # the newest requests sent, for status and acknowledgements

Publish = Callable[[str, dict[str, Any]], None]


@dataclass
class FenceRequest:
    """A reset this host asked for."""

    nonce: int
    target: dict[str, int]                # sdUUID -> host id
    generations: dict[str, int]           # sdUUID -> the target's generation we named
    action: str
    started: float = field(default_factory=time.monotonic)
    acked_at: float | None = None         # monotonic, first RESETTING seen
    cannot_reset: dict[str, float] = field(default_factory=dict)  # sdUUID -> answer time
    sent: dict[str, float] = field(default_factory=dict)    # sdUUID -> monotonic, event set
    failed: dict[str, str] = field(default_factory=dict)    # sdUUID -> why it was not sent

    def data(self, sd_uuid: str) -> int:
        return self.target[sd_uuid] << TARGET_SHIFT | self.nonce

    def to_json(self) -> dict[str, Any]:
        return {"nonce": self.nonce, "target": self.target, "action": self.action,
                "generations": self.generations, "acknowledged": self.acked_at is not None,
                "cannotReset": sorted(self.cannot_reset),
                "queued": sorted(set(self.target) - set(self.sent) - set(self.failed)),
                "failed": self.failed,
                "age": round(time.monotonic() - self.started, 1)}


@dataclass
class _Slot:
    """This host's one outgoing event in a lockspace."""

    request: FenceRequest | None = None   # the last request set there (None: an answer)
    busy_until: float = 0.0               # monotonic: sanlock may still carry it
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    cleared: bool = False                 # its target's bit cleared after its answer
    freed: asyncio.Event = field(default_factory=asyncio.Event)

    def free(self) -> bool:
        return self.cleared or time.monotonic() >= self.busy_until

    async def wait_free(self) -> None:
        while not self.free():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.freed.wait(),
                                       max(0.0, self.busy_until - time.monotonic()))


@dataclass
class _Listening:
    host_id: int
    generation: int
    fd: int


class FenceService:
    def __init__(self, monitors: MonitorManager, watchdog: WatchdogService,
                 run_blocking: RunBlocking, publish: Publish) -> None:
        self._monitors = monitors
        self._watchdog = watchdog
        self._run = run_blocking
        self._publish = publish
        self._listening: dict[str, _Listening] = {}
        self._seen: set[tuple[str, int, int, int]] = set()
        self._slots: dict[str, _Slot] = {}
        self.requests: dict[int, FenceRequest] = {}
        self.received: list[dict[str, Any]] = []   # reset requests taken (newest last)
        self.ignored = 0
        self.unknown_acks = 0   # answers naming no request of ours
        monitors.subscribe(self)
        self._tasks: set[asyncio.Future[None]] = set()
        self._sending: set[asyncio.Future[None]] = set()   # queued requests

    # --- listening (the target's side) --------------------------------------------------

    async def lockspace_joined(self, sd_uuid: str, host_id: int, *,
                               attempts: int = 60) -> None:
        """Called by the domain monitor once our host id is held."""
        await self.lockspace_left(sd_uuid)
        try:
            generation = await self._own_generation(sd_uuid, host_id, attempts)
            fd = await self._run(sanlock.reg_event, sd_uuid)
        except sanlock.SanlockError as e:
            log.error("cannot watch lockspace %s for fence requests: %s", sd_uuid, e)
            return
        self._listening[sd_uuid] = _Listening(host_id, generation, fd)
        asyncio.get_running_loop().add_reader(fd, self._readable, sd_uuid)
        log.info("watching lockspace %s for fence requests (host id %d, generation %d)",
                 sd_uuid, host_id, generation)

    async def lockspace_left(self, sd_uuid: str) -> None:
        listening = self._listening.pop(sd_uuid, None)
        if listening is None:
            return
        asyncio.get_running_loop().remove_reader(listening.fd)
        try:
            await self._run(sanlock.end_event, listening.fd, sd_uuid)
        except sanlock.SanlockError:
            with contextlib.suppress(OSError):
                os.close(listening.fd)

    async def listen_to_joined(self) -> list[str]:
        """Listen on every lockspace this host's sanlock holds (called at start: after
        an agent restart sanlock still renews them and peers see this host live, but
        no monitor announces them until the engine asks again). Lockspaces not named
        by a domain UUID belong to other users of the daemon and are left alone."""
        try:
            lockspaces = await self._run(sanlock.get_lockspaces)
        except sanlock.SanlockError as e:
            log.warning("cannot list the lockspaces this host joined (%s): fence requests "
                        "are heard once domain monitors join them", e)
            return []
        for ls in lockspaces:
            if parse_uuid(ls.name) != ls.name or ls.name in self._listening:
                continue
            # A lockspace still being joined answers EAGAIN: its monitor announces it.
            await self.lockspace_joined(ls.name, ls.host_id, attempts=4)
            if ls.name in self._listening:
                log.info("lockspace %s was joined before this agent started (host id %d)",
                         ls.name, ls.host_id)
        return sorted(self._listening)

    async def _own_generation(self, sd_uuid: str, host_id: int, attempts: int) -> int:
        # get_hosts answers EAGAIN for the first seconds after joining.
        for _ in range(attempts):
            try:
                hosts = await self._run(sanlock.get_hosts, sd_uuid, host_id)
            except sanlock.SanlockError as e:
                if e.errno != 11:
                    raise
                await asyncio.sleep(0.5)
                continue
            if hosts:
                return hosts[0].generation
            await asyncio.sleep(0.5)
        raise sanlock.SanlockError("get_hosts", 11, "own host not reported")

    def _readable(self, sd_uuid: str) -> None:
        listening = self._listening.get(sd_uuid)
        if listening is None:
            return
        # Even this non-blocking recv goes through the executor, like every sanlock
        # call; the fd is not watched meanwhile (it stays readable until drained).
        asyncio.get_running_loop().remove_reader(listening.fd)
        task = asyncio.ensure_future(self._drain(sd_uuid, listening))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _drain(self, sd_uuid: str, listening: _Listening) -> None:
        try:
            events = await self._run(sanlock.get_events, listening.fd)
        except sanlock.SanlockError as e:
            log.warning("event connection of lockspace %s closed (%s); will re-register",
                        sd_uuid, e)
            if self._listening.get(sd_uuid) is listening:
                del self._listening[sd_uuid]
                with contextlib.suppress(OSError):
                    os.close(listening.fd)
                # The monitor announces the lockspace again once it is joined again.
                self._monitors.forget_announcement(sd_uuid)
            return
        if self._listening.get(sd_uuid) is listening:
            asyncio.get_running_loop().add_reader(listening.fd, self._readable, sd_uuid)
        for event in events:
            self._on_event(sd_uuid, listening, event)

    def _on_event(self, sd_uuid: str, me: _Listening, ev: sanlock.Event) -> None:
        if ev.event & (EVENT_RESETTING | EVENT_REBOOTING | EVENT_CANNOT_RESET):
            self._on_ack(sd_uuid, ev)
        if not ev.event & (EVENT_RESET | EVENT_REBOOT):
            return
        where = (f"lockspace {sd_uuid}: reset request from host {ev.from_host_id} "
                 f"(generation {ev.from_generation}, nonce {ev.data:#x})")
        addressed = ev.data >> TARGET_SHIFT
        if (ev.from_host_id == me.host_id or ev.host_id != me.host_id
                or addressed not in (0, me.host_id)):
            self.ignored += 1
            log.warning("%s: not for this host (id %d); ignored", where, me.host_id)
            return
        if ev.generation not in (0, me.generation):
            self.ignored += 1
            log.warning("%s: for generation %d, this host is generation %d (a previous "
                        "incarnation); ignored", where, ev.generation, me.generation)
            return
        key = (sd_uuid, ev.from_host_id, ev.from_generation, ev.data)
        if key in self._seen:
            return  # sanlock delivers each request 2-3 times
        self._seen.add(key)
        log.critical("%s: this host is being fenced", where)
        record = {"sdUUID": sd_uuid, "fromHostId": ev.from_host_id,
                  "fromGeneration": ev.from_generation, "nonce": ev.data & NONCE_MASK,
                  "hostId": me.host_id, "generation": me.generation, "time": time.time()}
        record["complied"] = self._watchdog.can_reset
        self.received.append(record)
        self._publish("|fence|reset_requested", record)
        task = asyncio.ensure_future(self._comply(sd_uuid, ev))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _comply(self, sd_uuid: str, ev: sanlock.Event) -> None:
        if not self._watchdog.can_reset:
            await self._refuse(sd_uuid, ev)
            return
        # Used: the lockspace may not exit cleanly from now on, so peers can only see
        # this host DEAD (after the watchdog fired), never FREE while it still runs.
        try:
            await self._run(sanlock.set_config, sd_uuid, sanlock.CONFIG_USED)
        except sanlock.SanlockError as e:
            log.error("lockspace %s: cannot mark it used: %s", sd_uuid, e)
        reply = EVENT_RESETTING | (EVENT_REBOOTING if ev.event & EVENT_REBOOT else 0)
        try:
            await self._run(sanlock.set_event, sd_uuid, ev.from_host_id, ev.from_generation,
                            reply, data=ev.data, flags=sanlock.SETEV_REPLACE_EVENT)
        except sanlock.SanlockError as e:
            log.error("lockspace %s: cannot acknowledge the reset request: %s", sd_uuid, e)
        self._watchdog.stop_petting(
            f"fenced through storage domain {sd_uuid} by host {ev.from_host_id}")

    async def _refuse(self, sd_uuid: str, ev: sanlock.Event) -> None:
        # Nothing would reset this host: saying "resetting" would have the fencer wait
        # for a death that never comes. The lockspace is not marked used either - this
        # host keeps running and may still leave it cleanly.
        log.critical("lockspace %s: cannot comply with the reset request of host %d: the "
                     "watchdog backend is %r, nothing can reset this host; answering that "
                     "another fence agent is needed", sd_uuid, ev.from_host_id,
                     self._watchdog.watchdog.name)
        # This host keeps running, and so may have a request of its own in the
        # lockspace's one event slot: the answer waits its turn rather than replace it.
        slot = self._slots.setdefault(sd_uuid, _Slot())
        async with slot.lock:
            await slot.wait_free()
            try:
                await self._run(sanlock.set_event, sd_uuid, ev.from_host_id,
                                ev.from_generation, EVENT_CANNOT_RESET, data=ev.data,
                                flags=sanlock.SETEV_REPLACE_EVENT)
            except sanlock.SanlockError as e:
                log.error("lockspace %s: cannot answer the reset request: %s", sd_uuid, e)
                return
            slot.request, slot.cleared = None, False
            slot.busy_until = time.monotonic() + SLOT_IO_TIMEOUTS * self._monitors.io_timeout
            slot.freed.clear()

    def _on_ack(self, sd_uuid: str, ev: sanlock.Event) -> None:
        request = self.requests.get(ev.data & NONCE_MASK)
        if (request is None or sd_uuid not in request.target
                or request.target[sd_uuid] != ev.from_host_id
                or ev.data >> TARGET_SHIFT not in (0, ev.from_host_id)):
            self.unknown_acks += 1
            log.warning("lockspace %s: answer %#x from host %d to no request of this host "
                        "(nonce %#x); ignored", sd_uuid, ev.event, ev.from_host_id, ev.data)
            return
        slot = self._slots.get(sd_uuid)
        if ev.event & EVENT_CANNOT_RESET:
            if sd_uuid not in request.cannot_reset:
                request.cannot_reset[sd_uuid] = time.monotonic()
                log.error("host %d cannot reset itself (no watchdog): reset request %#x in "
                          "lockspace %s will not fence it; use another fence agent",
                          ev.from_host_id, ev.data, sd_uuid)
                self._publish("|fence|cannot_reset", {"sdUUID": sd_uuid, "nonce": request.nonce,
                                                      "hostId": ev.from_host_id})
        elif request.acked_at is None:
            request.acked_at = time.monotonic()
            log.warning("host %d acknowledged reset request %#x in lockspace %s",
                        ev.from_host_id, ev.data, sd_uuid)
            self._publish("|fence|acknowledged", {"sdUUID": sd_uuid, "nonce": request.nonce,
                                                  "hostId": ev.from_host_id})
        if slot is not None and slot.request is request and not slot.cleared:
            task = asyncio.ensure_future(self._clear_target(sd_uuid, slot, request))
            self._sending.add(task)
            task.add_done_callback(self._sending.discard)

    async def _clear_target(self, sd_uuid: str, slot: _Slot, request: FenceRequest) -> None:
        """The target read its request: stop notifying it, so that the next request set
        in this lockspace reaches only its own target."""
        try:
            await self._run(sanlock.set_event, sd_uuid, request.target[sd_uuid],
                            request.generations[sd_uuid], 0,
                            flags=sanlock.SETEV_CLEAR_HOSTID)
        except sanlock.SanlockError as e:
            log.warning("lockspace %s: cannot stop notifying host %d (%s); the next request "
                        "there waits for sanlock to", sd_uuid, request.target[sd_uuid], e)
            return
        if slot.request is request:
            slot.cleared = True
            slot.freed.set()

    # --- fencing (the fencer's side) ----------------------------------------------------

    def _check_map(self, host_map: dict[str, int]) -> None:
        if not host_map:
            raise errors.InvalidParameterException(
                "policy", "storageDomainHostIdMap must name at least one domain")
        for sd_uuid, host_id in host_map.items():
            own = self._monitors.host_id(sd_uuid)
            if own is None and sd_uuid in self._listening:
                # Joined before this agent started (listen_to_joined): sanlock holds it.
                own = self._listening[sd_uuid].host_id
            if own is None:
                raise errors.InvalidParameterException(
                    "storageDomainHostIdMap",
                    f"this host has not joined the lockspace of domain {sd_uuid}")
            if own == host_id:
                raise errors.InvalidParameterException(
                    "storageDomainHostIdMap",
                    f"host id {host_id} in {sd_uuid} is this host: a host never fences "
                    "itself")

    async def host_states(self, host_map: dict[str, int]) -> dict[str, str]:
        """sdUUID -> the host's state as this host's sanlock sees it there."""
        out = {}
        for sd_uuid, host_id in host_map.items():
            try:
                hosts = await self._run(sanlock.get_hosts, sd_uuid, host_id)
                out[sd_uuid] = hosts[0].state if hosts else "unknown"
            except sanlock.SanlockError:
                out[sd_uuid] = "unavailable"
        return out

    async def fence(self, action: str, host_map: dict[str, int]) -> dict[str, Any]:
        self._check_map(host_map)
        if action == "status":
            return await self.status(host_map)
        if action not in ("reboot", "off"):
            raise errors.InvalidParameterException(
                "action", f"{action!r}: the sanlock agent can reset a host (reboot, off) or "
                "report it (status), not power it on")
        nonce = secrets.randbits(TARGET_SHIFT) or 1
        generations = {}
        for sd_uuid, host_id in host_map.items():
            try:
                hosts = await self._run(sanlock.get_hosts, sd_uuid, host_id)
            except sanlock.SanlockError as e:
                # EAGAIN: this host joined the lockspace moments ago and its sanlock has
                # not read the target's lease yet; nothing can be addressed to it.
                raise errors.InvalidParameterException(
                    "storageDomainHostIdMap",
                    f"host id {host_id} in domain {sd_uuid} is not known to this host's "
                    f"lock manager yet ({e}); ask again once it is") from e
            if not hosts or hosts[0].generation == 0 or hosts[0].state == "free":
                # Not in the lockspace (never joined, or left cleanly): a request there
                # would never be read, and "initiated" would be a lie.
                raise errors.InvalidParameterException(
                    "storageDomainHostIdMap",
                    f"no host id {host_id} in domain {sd_uuid} to reset (state "
                    f"{hosts[0].state if hosts else 'unknown'})")
            generations[sd_uuid] = hosts[0].generation
        event = EVENT_RESET | (EVENT_REBOOT if action == "reboot" else 0)
        request = FenceRequest(nonce, dict(host_map), generations, action)
        self.requests[nonce] = request
        while len(self.requests) > MAX_REQUESTS_KEPT:
            del self.requests[next(iter(self.requests))]
        queued = []
        for sd_uuid, host_id in host_map.items():
            slot = self._slots.setdefault(sd_uuid, _Slot())
            if not slot.lock.locked() and slot.free():
                await self._send(sd_uuid, slot, request, event)
                continue
            # The lockspace's one event slot still carries a request the target may not
            # have read: replacing it would lose that request. Sent once it is free.
            queued.append(sd_uuid)
            log.warning("reset request %#x for host %d in lockspace %s queued behind "
                        "request %#x", nonce, host_id, sd_uuid,
                        slot.request.nonce if slot.request else 0)
            task = asyncio.ensure_future(self._send_queued(sd_uuid, slot, request, event))
            self._sending.add(task)
            task.add_done_callback(self._sending.discard)
        self._publish("|fence|requested", request.to_json())
        reply: dict[str, Any] = {"operationStatus": "initiated", "power": "unknown",
                                 "nonce": nonce}
        if queued:
            reply["queued"] = queued
        return reply

    async def _send(self, sd_uuid: str, slot: _Slot, request: FenceRequest,
                    event: int) -> None:
        host_id, generation = request.target[sd_uuid], request.generations[sd_uuid]
        await self._run(sanlock.set_event, sd_uuid, host_id, generation, event,
                        data=request.data(sd_uuid), flags=sanlock.SETEV_REPLACE_EVENT)
        request.sent[sd_uuid] = time.monotonic()
        slot.request = request
        slot.cleared = False
        slot.busy_until = time.monotonic() + SLOT_IO_TIMEOUTS * self._monitors.io_timeout
        slot.freed.clear()
        log.warning("asked host %d (generation %d) of lockspace %s to reset (%s, nonce "
                    "%#x)", host_id, generation, sd_uuid, request.action, request.nonce)

    async def _send_queued(self, sd_uuid: str, slot: _Slot, request: FenceRequest,
                           event: int) -> None:
        async with slot.lock:
            await slot.wait_free()
            try:
                await self._send(sd_uuid, slot, request, event)
            except sanlock.SanlockError as e:
                request.failed[sd_uuid] = str(e)
                log.error("queued reset request %#x for lockspace %s not sent: %s",
                          request.nonce, sd_uuid, e)

    async def status(self, host_map: dict[str, int]) -> dict[str, Any]:
        states = await self.host_states(host_map)
        values = set(states.values())
        if values == {"dead"}:
            power = "off"
        elif "live" in values:
            power = "on"
        else:
            power = "unknown"
        mine = [r for r in self.requests.values()
                if any(r.target.get(sd) == h for sd, h in host_map.items())]
        acked = [r for r in mine if r.acked_at is not None]
        cannot = sorted({sd for r in mine for sd in r.cannot_reset if sd in host_map})
        out = {"operationStatus": "initiated", "power": power, "hosts": states,
               "acknowledged": bool(acked), "cannotReset": bool(cannot)}
        if cannot and not acked:
            out["message"] = (f"the target answered in {', '.join(cannot)} that it cannot "
                              "reset itself (it has no watchdog): it will not be fenced "
                              "through storage, use another fence agent")
        return out

    def status_json(self) -> dict[str, Any]:
        return {"listening": {sd: {"hostId": x.host_id, "generation": x.generation}
                              for sd, x in self._listening.items()},
                "requests": [r.to_json() for r in self.requests.values()],
                "received": self.received, "ignored": self.ignored,
                "unknownAcks": self.unknown_acks}

    async def close(self) -> None:
        for task in list(self._sending):
            task.cancel()
        for sd_uuid in list(self._listening):
            await self.lockspace_left(sd_uuid)
