"""Holding sanlock leases (paxos resources) from the agent, through holder processes.

    async with services.leases.hold(sd, "SDM", [(leases_path, offset)]) as lease:
        ...             # metadata changes; long ones call lease.check() as they go

Leases are held by `vdsmlite.locking.holder` processes, one per lockspace,
started on demand and stopped when idle: sanlock kills the process holding
leases in a lockspace that is lost, and that must cost only that lockspace's
leases, never the agent. When a holder dies, every `Lease` it held is marked
lost, so the work under it stops at its next `check()` with 651 "Lease lost",
and the hold's exit raises it too.

One lease is held once per host: operations of this host that need the same
lease at the same time share it (local concurrency is the image locks'
business; the lease keeps *other hosts* out) and it is released when the last
one is done. Acquiring waits, up to `acquire_timeout`, while another host
holds it - sanlock answers at once (OWNER_NOWAIT), so we retry.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import sys
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from vdsmlite import background, errors
from vdsmlite.locking import sanlock

log = logging.getLogger("vdsmlite.locking.leases")

# Answers that mean "another host has it (or had it, and is not known dead yet)".
_BUSY = {sanlock.SANLK_ACQUIRE_IDLIVE, sanlock.SANLK_ACQUIRE_OWNED_RETRY,
         sanlock.SANLK_ACQUIRE_OTHER, sanlock.SANLK_ACQUIRE_OWNED}
# Answers that mean "storage did not answer in time" (an I/O stall of more than
# io_timeout on a busy host or SAN): worth another ballot until the same deadline.
_AIO_TIMEOUT, _DBLOCK_READ, _DBLOCK_WRITE = 202, 210, 211  # sanlock_rv.h, negated
_TRANSIENT = {_AIO_TIMEOUT, _DBLOCK_READ, _DBLOCK_WRITE}
_RETRY_INTERVAL = 0.5
_START_TIMEOUT = 60.0
_REQUEST_TIMEOUT = 120.0

Disks = tuple[tuple[str, int], ...]


@dataclass
class Lease:
    """A lease held for one or more operations of this host."""

    lockspace: str
    resource: str
    disks: Disks
    lost: str | None = None  # why, once it is gone
    users: int = 0

    def check(self) -> None:
        """Raise 651 if the lease is gone: what depends on it must stop."""
        if self.lost is not None:
            raise errors.LeaseLost(f"{self.lockspace}:{self.resource}", self.lost)


class _HolderGone(Exception):
    pass


@dataclass
class _Holder:
    lockspace: str
    proc: asyncio.subprocess.Process
    leases: dict[str, Lease] = field(default_factory=dict)
    io_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    idle_since: float | None = None
    watcher: asyncio.Task[None] | None = None

    async def request(self, message: dict[str, Any]) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        async with self.io_lock:
            try:
                self.proc.stdin.write((json.dumps(message) + "\n").encode())
                await self.proc.stdin.drain()
                line = await asyncio.wait_for(self.proc.stdout.readline(), _REQUEST_TIMEOUT)
            except (ConnectionError, TimeoutError) as e:
                raise _HolderGone(f"lease holder not answering: {e!r}") from e
            if not line:
                raise _HolderGone("lease holder exited")
            reply: dict[str, Any] = json.loads(line)
            return reply


class LeaseManager:
    def __init__(self, env: dict[str, str], *, acquire_timeout: float,
                 idle_timeout: float = 30.0) -> None:
        self._env = env
        self.acquire_timeout = acquire_timeout
        self.idle_timeout = idle_timeout
        self._holders: dict[str, _Holder] = {}
        self._starting: dict[str, asyncio.Lock] = {}
        self._key_locks: dict[tuple[str, str], asyncio.Lock] = {}
        self._reaper: asyncio.Task[None] | None = None
        self._closed = False

    # --- holding ------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def hold(self, lockspace: str, resource: str, disks: Sequence[tuple[str, int]],
                   *, timeout: float | None = None) -> AsyncIterator[Lease]:
        lease = await self._acquire(lockspace, resource, tuple(disks),
                                    self.acquire_timeout if timeout is None else timeout)
        try:
            yield lease
            lease.check()
        finally:
            await self._release(lease)

    @contextlib.asynccontextmanager
    async def share(self, lease: Lease) -> AsyncIterator[Lease]:
        """Use a lease this host already holds, with no call to sanlock (the SPM's
        lease, for each operation it runs): 651 if it is gone."""
        lease.check()
        async with self._key_locks.setdefault((lease.lockspace, lease.resource),
                                              asyncio.Lock()):
            lease.check()
            lease.users += 1
        try:
            yield lease
            lease.check()
        finally:
            await self._release(lease)

    def held(self) -> list[dict[str, Any]]:
        return [{"lockspace": h.lockspace, "resource": r, "users": lease.users}
                for h in self._holders.values() for r, lease in h.leases.items()]

    async def _acquire(self, lockspace: str, resource: str, disks: Disks,
                       timeout: float) -> Lease:
        if self._closed:
            raise errors.ShuttingDownError()
        key = (lockspace, resource)
        async with self._key_locks.setdefault(key, asyncio.Lock()):
            holder = await self._holder(lockspace)
            lease = holder.leases.get(resource)
            if lease is not None:
                lease.users += 1
                return lease
            started = time.monotonic()
            deadline = started + timeout
            while True:
                reply = await self._ask(holder, {"op": "acquire", "resource": resource,
                                                 "disks": [list(d) for d in disks],
                                                 "owner_nowait": True})
                if reply.get("ok"):
                    break
                rc, message = reply.get("errno", 0), reply.get("message", "")
                if rc not in _BUSY and rc not in _TRANSIENT:
                    raise errors.AcquireLockFailure(resource, rc, message,
                                                    _hint(rc, lockspace))
                if rc in _TRANSIENT:
                    log.warning("lease %s:%s: %s (rc %d); trying again", lockspace, resource,
                                message, rc)
                    if time.monotonic() >= deadline:
                        raise errors.AcquireLockFailure(resource, rc, message,
                                                        _hint(rc, lockspace))
                elif time.monotonic() >= deadline:
                    raise errors.AcquireLockFailure(
                        resource, rc, message,
                        f"held by another host of lockspace {lockspace} for {timeout:.0f}s")
                await asyncio.sleep(_RETRY_INTERVAL)
            lease = Lease(lockspace, resource, disks, users=1)
            holder.leases[resource] = lease
            holder.idle_since = None
            log.info("acquired lease %s:%s in %.3fs", lockspace, resource,
                     time.monotonic() - started)
            return lease

    async def _release(self, lease: Lease) -> None:
        key = (lease.lockspace, lease.resource)
        async with self._key_locks.setdefault(key, asyncio.Lock()):
            lease.users -= 1
            if lease.users > 0 or lease.lost is not None:
                return
            holder = self._holders.get(lease.lockspace)
            if holder is None or holder.leases.get(lease.resource) is not lease:
                return
            del holder.leases[lease.resource]
            if not holder.leases:
                holder.idle_since = time.monotonic()
            try:
                reply = await holder.request({"op": "release", "resource": lease.resource,
                                              "disks": [list(d) for d in lease.disks]})
            except _HolderGone as e:
                log.warning("releasing %s:%s: %s", lease.lockspace, lease.resource, e)
                return
            if not reply.get("ok"):
                # sanlock keeps it until the holder exits; make it exit now.
                log.error("cannot release lease %s:%s: %s; stopping its holder",
                          lease.lockspace, lease.resource, reply.get("message"))
                await self._stop_holder(holder)
            else:
                log.info("released lease %s:%s", lease.lockspace, lease.resource)

    async def _ask(self, holder: _Holder, message: dict[str, Any]) -> dict[str, Any]:
        try:
            return await holder.request(message)
        except _HolderGone as e:
            raise errors.AcquireLockFailure(message.get("resource"), -1, "", str(e)) from e

    # --- holder processes ---------------------------------------------------------------

    async def _holder(self, lockspace: str) -> _Holder:
        holder = self._holders.get(lockspace)
        if holder is not None and holder.proc.returncode is None:
            return holder
        async with self._starting.setdefault(lockspace, asyncio.Lock()):
            holder = self._holders.get(lockspace)
            if holder is not None and holder.proc.returncode is None:
                return holder
            holder = await self._start_holder(lockspace)
            self._holders[lockspace] = holder
            if self._reaper is None:
                self._reaper = background.spawn(self._reap_idle(), name="lease-reaper")
            return holder

    async def _start_holder(self, lockspace: str) -> _Holder:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "vdsmlite.locking.holder", lockspace,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            env={**os.environ, **self._env})
        assert proc.stdout is not None
        greeting: dict[str, Any]
        try:
            line = await asyncio.wait_for(proc.stdout.readline(), _START_TIMEOUT)
            greeting = json.loads(line) if line else {"ready": False, "message": "exited"}
        except (TimeoutError, ValueError) as e:
            greeting = {"ready": False, "message": repr(e)}
        if not greeting.get("ready"):
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
            raise errors.AcquireLockFailure(
                lockspace, greeting.get("errno", -1), greeting.get("message", ""),
                "cannot start the lease holder (is the sanlock daemon running?)")
        holder = _Holder(lockspace, proc)
        holder.watcher = background.spawn(self._watch(holder),
                                          name=f"lease-holder-{lockspace}")
        log.info("lease holder for lockspace %s started (pid %d)", lockspace, proc.pid)
        return holder

    async def _watch(self, holder: _Holder) -> None:
        rc = await holder.proc.wait()
        if self._holders.get(holder.lockspace) is holder:
            del self._holders[holder.lockspace]
        if holder.leases:
            reason = (f"the lease holder (pid {holder.proc.pid}) exited with {rc}: sanlock "
                      f"revoked the leases of lockspace {holder.lockspace}")
            log.error("%s; lost %s", reason, ", ".join(holder.leases))
            for lease in holder.leases.values():
                lease.lost = reason
            holder.leases.clear()

    async def _stop_holder(self, holder: _Holder) -> None:
        if holder.proc.stdin is not None and not holder.proc.stdin.is_closing():
            holder.proc.stdin.close()
        try:
            await asyncio.wait_for(holder.proc.wait(), 10)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                holder.proc.kill()
            await holder.proc.wait()
        if holder.watcher is not None:
            await holder.watcher

    async def _reap_idle(self) -> None:
        while not self._closed:
            await asyncio.sleep(min(self.idle_timeout, 5.0))
            now = time.monotonic()
            for holder in list(self._holders.values()):
                if not holder.leases and holder.idle_since is not None and \
                        now - holder.idle_since >= self.idle_timeout:
                    async with self._starting.setdefault(holder.lockspace, asyncio.Lock()):
                        if not holder.leases:
                            await self._stop_holder(holder)

    async def close(self) -> None:
        """Stop every holder; sanlock releases what they held."""
        self._closed = True
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper
        for holder in list(self._holders.values()):
            await self._stop_holder(holder)


def _hint(rc: int, lockspace: str) -> str:
    if rc in (2, 28):  # ENOENT, or ENOSPC as sanlock says "no such lockspace" on acquire
        return (f"this host has not joined lockspace {lockspace} "
                "(StoragePool.connect or Host.startMonitoringDomain first)")
    return ""
