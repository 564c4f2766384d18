"""Domain monitors: each watches one storage domain and holds this host's id in it.

VDSM runs a monitor per domain of the connected pool (or per domain given to
Host.startMonitoringDomain, as the hosted-engine agent does). Every cycle it:

* reads the domain metadata with direct I/O and times the read (``delay``); a
  failure makes the domain invalid and reports the error's code;
* keeps the host in the domain's sanlock lockspace with the host id it was
  given: it asks sanlock to join asynchronously and asks again until sanlock
  says the host id is held (``acquired``). Joining takes about 2 x io_timeout
  when the id is free, longer after an unclean stop; a lockspace sanlock drops
  (storage lost for 8 x io_timeout) is joined again by the next cycles.

What `Host.getStorageRepoStats` reports comes from here. Listeners (fencing)
hear when a lockspace is joined or left, to watch its events.

Stopping a monitor leaves the lockspace (``rem_lockspace`` with UNUSED: sanlock
refuses while a lease of this host is held there, instead of killing the
holder). Unlike VDSM, a clean agent stop leaves too: no VM holds leases in
them here, and peers then see this host FREE at once rather than DEAD minutes
later.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import time
from dataclasses import dataclass
from typing import Any, Protocol

from vdsmlite import background, errors
from vdsmlite.blocking import RunBlocking
from vdsmlite.locking import sanlock

log = logging.getLogger("vdsmlite.locking.monitor")



class LockspaceListener(Protocol):
    async def lockspace_joined(self, sd_uuid: str, host_id: int) -> None: ...

    async def lockspace_left(self, sd_uuid: str) -> None: ...


class DomainSource(Protocol):
    def get(self, sd_uuid: str) -> Any: ...


@dataclass
class MonitorStatus:
    valid: bool = False
    code: int = 0
    delay: float = 0.0
    last_check: float | None = None  # monotonic
    acquired: bool = False
    version: int = -1
    problem: str | None = None

    def to_json(self) -> dict[str, Any]:
        age = None if self.last_check is None else time.monotonic() - self.last_check
        return {
            "code": self.code,
            "lastCheck": f"{age or 0.0:.1f}",
            "delay": f"{self.delay:.6f}",
            "valid": self.valid,
            "version": self.version,
            "acquired": self.acquired,
            "actual": self.last_check is not None,
        }


class DomainMonitor:
    def __init__(self, sd_uuid: str, host_id: int | None, *, pool_uuid: str | None,
                 domains: DomainSource, run_blocking: RunBlocking, interval: float,
                 io_timeout: int, listener: LockspaceListener | None) -> None:
        self.sd_uuid = sd_uuid
        self.host_id = host_id
        self.pool_uuid = pool_uuid
        self.status = MonitorStatus()
        self._domains = domains
        self._run = run_blocking
        self._interval = interval
        self._io_timeout = io_timeout
        self._listener = listener
        self._lockspace: tuple[str, str, int] | None = None
        self._joining = False
        # The last sanlock error keeping the host id; a DaemonUnreachable one means
        # waiting for the join is pointless.
        self.join_error: sanlock.SanlockError | None = None
        self._announced = False
        self._task: asyncio.Task[None] | None = None
        self._wakeup = asyncio.Event()

    def start(self) -> None:
        self._task = background.spawn(self._loop(), name=f"monitor-{self.sd_uuid}")

    def poke(self) -> None:
        """Run the next cycle now."""
        self._wakeup.set()

    def reannounce(self) -> None:
        """Tell the listener about the lockspace again at the next cycle (its event
        connection broke and must be registered anew)."""
        self._announced = False
        self.poke()

    async def _loop(self) -> None:
        while True:
            try:
                await self._cycle()
            except Exception:
                log.exception("monitor of %s: cycle failed", self.sd_uuid)
            self._wakeup.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), self._interval)

    async def _cycle(self) -> None:
        status = self.status
        try:
            dom = await self._run(self._domains.get, self.sd_uuid)
            status.delay = await self._run(dom.check_health)
            status.version = await self._run(dom.read_version)
            status.valid, status.code, status.problem = True, 0, None
        except errors.VdsmError as e:
            status.valid, status.code, status.problem = False, e.code, e.message
            log.warning("monitor of %s: domain check failed: %s", self.sd_uuid, e)
            dom = None
        status.last_check = time.monotonic()
        if self.host_id is not None and dom is not None:
            await self._keep_host_id(dom)

    async def _keep_host_id(self, dom: Any) -> None:
        assert self.host_id is not None
        status = self.status
        if self._lockspace is None:
            self._lockspace = await self._run(dom.lockspace)
        if self._lockspace is None:
            # A local domain: one host, no sanlock - the id is ours by definition.
            status.acquired = True
            return
        name, path, offset = self._lockspace
        try:
            held = await self._run(sanlock.inq_lockspace, name, self.host_id, path, offset)
            if held is False:
                await self._join(name, path, offset)
            self.join_error = None
        except sanlock.SanlockError as e:
            self.join_error = e
            held = False
            status.code = errors.AcquireHostIdFailure.code
            status.problem = str(e)
            log.warning("monitor of %s: host id %d: %s", self.sd_uuid, self.host_id, e)
        was = status.acquired
        status.acquired = held is True
        if status.acquired and not was:
            log.info("host id %d acquired in lockspace %s", self.host_id, name)
        elif was and not status.acquired:
            log.error("host id %d lost in lockspace %s; joining again", self.host_id, name)
        if status.acquired and not self._announced and self._listener is not None:
            self._announced = True
            await self._listener.lockspace_joined(self.sd_uuid, self.host_id)
        elif not status.acquired and self._announced and self._listener is not None:
            self._announced = False
            await self._listener.lockspace_left(self.sd_uuid)

    async def _join(self, name: str, path: str, offset: int) -> None:
        assert self.host_id is not None
        try:
            await self._run(sanlock.add_lockspace, name, self.host_id, path, offset,
                            io_timeout=self._io_timeout, wait=False)
            log.info("joining lockspace %s as host id %d", name, self.host_id)
        except sanlock.SanlockError as e:
            if e.errno == errno.EINPROGRESS:
                return
            if e.errno == errno.EEXIST:
                # Joined, but not with this id: another user of this daemon has it.
                raise sanlock.SanlockError(
                    "add_lockspace", e.errno,
                    f"lockspace already joined with another host id (not {self.host_id})"
                ) from e
            raise

    async def stop(self, *, wait: bool = True) -> None:
        """Stop checking and leave the lockspace (refused while a lease is held).
        wait=False: ask sanlock to leave and return (shutdown must not hang on storage)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._announced and self._listener is not None:
            self._announced = False
            await self._listener.lockspace_left(self.sd_uuid)
        if self.host_id is None or self._lockspace is None:
            return
        name, path, offset = self._lockspace
        try:
            await self._run(sanlock.rem_lockspace, name, self.host_id, path, offset,
                            wait=wait, unused=True)
            log.info("left lockspace %s (host id %d)", name, self.host_id)
        except sanlock.DaemonUnreachable as e:
            # No daemon: none holds this host's id for it (a daemon that dies takes
            # its lockspaces with it).
            log.warning("leaving lockspace %s: %s", name, e)
        except sanlock.SanlockError as e:
            if e.errno == errno.ENOENT:
                return
            if e.errno == errno.EBUSY:
                raise errors.ReleaseHostIdFailure(
                    self.sd_uuid, "a lease is still held in this lockspace") from e
            raise errors.ReleaseHostIdFailure(self.sd_uuid, str(e)) from e
        finally:
            self.status.acquired = False


class MonitorManager:
    def __init__(self, domains: DomainSource, run_blocking: RunBlocking, *, interval: float,
                 io_timeout: int) -> None:
        self._domains = domains
        self._run = run_blocking
        self.interval = interval
        self.io_timeout = io_timeout
        self._listener: LockspaceListener | None = None
        self.monitors: dict[str, DomainMonitor] = {}
        self._lock = asyncio.Lock()

    def subscribe(self, listener: LockspaceListener) -> None:
        """Tell `listener` when this host joins or leaves a lockspace (one listener:
        the fence service, which subscribes itself when it is built)."""
        if self._listener is not None:
            raise RuntimeError("lockspace listener already subscribed")
        self._listener = listener

    async def start_monitoring(self, sd_uuid: str, host_id: int | None, *,
                               pool_uuid: str | None = None) -> None:
        async with self._lock:
            current = self.monitors.get(sd_uuid)
            if current is not None:
                if host_id is not None and current.host_id not in (None, host_id):
                    raise errors.HostIdMismatch(sd_uuid, current.host_id, host_id)
                if current.host_id is not None or host_id is None:
                    if pool_uuid is not None:
                        current.pool_uuid = pool_uuid
                    return
                # Watching without an id so far: restart it holding one.
                await current.stop()
            monitor = DomainMonitor(sd_uuid, host_id, pool_uuid=pool_uuid,
                                    domains=self._domains, run_blocking=self._run,
                                    interval=self.interval, io_timeout=self.io_timeout,
                                    listener=self._listener)
            self.monitors[sd_uuid] = monitor
            monitor.start()
            log.info("monitoring domain %s%s", sd_uuid,
                     f" as host id {host_id}" if host_id is not None else "")

    async def stop_monitoring(self, sd_uuid: str, *, pool_uuid: str | None = None,
                              force: bool = False) -> None:
        """Stop a monitor: the pool's (pool_uuid), a startMonitoringDomain one (None,
        900 if the pool owns it), or whoever's (force: the domain is going away)."""
        async with self._lock:
            monitor = self.monitors.get(sd_uuid)
            if monitor is None:
                return
            if not force and pool_uuid is not None and monitor.pool_uuid != pool_uuid:
                return  # watched for someone else (Host.startMonitoringDomain)
            if not force and pool_uuid is None and monitor.pool_uuid is not None:
                raise errors.StorageDomainIsMemberOfPool(sd_uuid)
            await monitor.stop()
            del self.monitors[sd_uuid]
            log.info("stopped monitoring domain %s", sd_uuid)

    async def stop_pool(self, pool_uuid: str) -> None:
        for sd_uuid, monitor in list(self.monitors.items()):
            if monitor.pool_uuid == pool_uuid:
                await self.stop_monitoring(sd_uuid, pool_uuid=pool_uuid)

    def host_id(self, sd_uuid: str) -> int | None:
        """This host's id in the domain's lockspace, once acquired."""
        monitor = self.monitors.get(sd_uuid)
        if monitor is None or not monitor.status.acquired:
            return None
        return monitor.host_id

    async def wait_host_id(self, sd_uuid: str, timeout: float) -> int | None:
        """This host's id in the domain's lockspace, waiting up to `timeout` seconds
        while a join is in progress (a monitor holding an id, not acquired yet: VDSM's
        spmStart waits the same way). None at once when no join was asked for, or when
        no sanlock daemon answers; None after `timeout` otherwise."""
        deadline = time.monotonic() + timeout
        while True:
            monitor = self.monitors.get(sd_uuid)
            if monitor is None or monitor.host_id is None:
                return None
            if monitor.status.acquired:
                return monitor.host_id
            if isinstance(monitor.join_error, sanlock.DaemonUnreachable):
                return None
            if time.monotonic() >= deadline:
                return None
            monitor.poke()  # ask sanlock now rather than at the next cycle
            await asyncio.sleep(min(0.5, max(0.0, deadline - time.monotonic())))

    def join_problem(self, sd_uuid: str) -> str | None:
        """Why the host id of a domain is not held, as the monitor last saw it."""
        monitor = self.monitors.get(sd_uuid)
        if monitor is None:
            return None
        if monitor.join_error is not None:
            return str(monitor.join_error)
        return monitor.status.problem

    def forget_announcement(self, sd_uuid: str) -> None:
        monitor = self.monitors.get(sd_uuid)
        if monitor is not None:
            monitor.reannounce()

    def stats(self, domains: list[str] | None = None) -> dict[str, dict[str, Any]]:
        wanted = set(domains) if domains else None
        return {sd: m.status.to_json() for sd, m in self.monitors.items()
                if wanted is None or sd in wanted}

    async def close(self, *, leave: bool = True) -> None:
        """Stop every monitor; leave the lockspaces unless `leave` is False (a fenced
        host: its lockspaces are marked used and sanlock would block the removal)."""
        for sd_uuid, monitor in list(self.monitors.items()):
            if not leave:
                monitor.host_id = None  # stop checking only
            try:
                await monitor.stop(wait=False)
            except errors.VdsmError as e:
                log.warning("leaving lockspace of %s at shutdown: %s", sd_uuid, e)
        self.monitors.clear()
