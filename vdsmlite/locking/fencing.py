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
  nonce, and stops petting its watchdog, which resets it;
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
from vdsmlite.locking import sanlock
from vdsmlite.locking.monitor import MonitorManager
from vdsmlite.locking.watchdog import WatchdogService

log = logging.getLogger("vdsmlite.locking.fencing")

# sanlk-reset's event bits (reset/sanlk_reset.h)
EVENT_RESET = 1
EVENT_RESETTING = 2
EVENT_REBOOT = 4
EVENT_REBOOTING = 8

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

    def to_json(self) -> dict[str, Any]:
        return {"nonce": self.nonce, "target": self.target, "action": self.action,
                "generations": self.generations, "acknowledged": self.acked_at is not None,
                "age": round(time.monotonic() - self.started, 1)}


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
        self.requests: dict[int, FenceRequest] = {}
        self.received: list[dict[str, Any]] = []   # reset requests taken (newest last)
        self.ignored = 0
        monitors.subscribe(self)
        self._tasks: set[asyncio.Future[None]] = set()

    # --- listening (the target's side) --------------------------------------------------

    async def lockspace_joined(self, sd_uuid: str, host_id: int) -> None:
        """Called by the domain monitor once our host id is held."""
        await self.lockspace_left(sd_uuid)
        try:
            generation = await self._own_generation(sd_uuid, host_id)
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

    async def _own_generation(self, sd_uuid: str, host_id: int) -> int:
        # get_hosts answers EAGAIN for the first seconds after joining.
        for _ in range(60):
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
        if ev.event & (EVENT_RESETTING | EVENT_REBOOTING):
            self._on_ack(sd_uuid, ev)
        if not ev.event & (EVENT_RESET | EVENT_REBOOT):
            return
        where = (f"lockspace {sd_uuid}: reset request from host {ev.from_host_id} "
                 f"(generation {ev.from_generation}, nonce {ev.data:#x})")
        if ev.from_host_id == me.host_id or ev.host_id != me.host_id:
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
                  "fromGeneration": ev.from_generation, "nonce": ev.data,
                  "hostId": me.host_id, "generation": me.generation, "time": time.time()}
        self.received.append(record)
        self._publish("|fence|reset_requested", record)
        task = asyncio.ensure_future(self._comply(sd_uuid, ev))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _comply(self, sd_uuid: str, ev: sanlock.Event) -> None:
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

    def _on_ack(self, sd_uuid: str, ev: sanlock.Event) -> None:
        request = self.requests.get(ev.data)
        if request is None or sd_uuid not in request.target:
            return
        if request.target[sd_uuid] != ev.from_host_id:
            return
        if request.acked_at is None:
            request.acked_at = time.monotonic()
            log.warning("host %d acknowledged reset request %#x in lockspace %s",
                        ev.from_host_id, ev.data, sd_uuid)
            self._publish("|fence|acknowledged", {"sdUUID": sd_uuid, "nonce": ev.data,
                                                  "hostId": ev.from_host_id})

    # --- fencing (the fencer's side) ----------------------------------------------------

    def _check_map(self, host_map: dict[str, int]) -> None:
        if not host_map:
            raise errors.InvalidParameterException(
                "policy", "storageDomainHostIdMap must name at least one domain")
        for sd_uuid, host_id in host_map.items():
            own = self._monitors.host_id(sd_uuid)
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
        nonce = secrets.randbits(63) or 1
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
        for sd_uuid, host_id in host_map.items():
            await self._run(sanlock.set_event, sd_uuid, host_id, generations[sd_uuid], event,
                            data=nonce, flags=sanlock.SETEV_REPLACE_EVENT)
            log.warning("asked host %d (generation %d) of lockspace %s to reset (%s, nonce "
                        "%#x)", host_id, generations[sd_uuid], sd_uuid, action, nonce)
        self._publish("|fence|requested", request.to_json())
        return {"operationStatus": "initiated", "power": "unknown", "nonce": nonce}

    async def status(self, host_map: dict[str, int]) -> dict[str, Any]:
        states = await self.host_states(host_map)
        values = set(states.values())
        if values == {"dead"}:
            power = "off"
        elif "live" in values:
            power = "on"
        else:
            power = "unknown"
        acked = [r for r in self.requests.values() if r.acked_at is not None
                 and any(r.target.get(sd) == h for sd, h in host_map.items())]
        return {"operationStatus": "initiated", "power": power, "hosts": states,
                "acknowledged": bool(acked)}

    def status_json(self) -> dict[str, Any]:
        return {"listening": {sd: {"hostId": x.host_id, "generation": x.generation}
                              for sd, x in self._listening.items()},
                "requests": [r.to_json() for r in self.requests.values()],
                "received": self.received, "ignored": self.ignored}

    async def close(self) -> None:
        for sd_uuid in list(self._listening):
            await self.lockspace_left(sd_uuid)
