"""VM leases on this host: where a lease lives, whether another host holds it, and
handing it between processes.

The lease itself is held by the VM's qemu (`virt.leaseexec`). This room does
what must happen around that, in the agent:

* `resolve`: the engine sends VDSM's placeholders (``LEASE-PATH:...``) or a
  path valid on some other host; the lease's real place on this host comes
  from the domain's lease index (``xleases``), through the `LeaseLookup` the
  composition root gives (the xleases service);
* `check_startable`: before anything is prepared, refuse a VM whose lease a
  live host holds (another host runs it), and one whose domain lockspace this
  host has not joined (sanlock could not grant the lease anyway). The real
  guarantee is sanlock's acquire in the qemu process; this check makes the
  common refusal an immediate, clear error instead of a VM that goes Down;
* `acquire_for`/`release_for`: move the lease between two registered
  processes (a migration's source and destination qemu).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Protocol

from vdsmlite import errors
from vdsmlite.blocking import RunBlocking
from vdsmlite.locking import sanlock
from vdsmlite.virt.definition import LeaseSpec

log = logging.getLogger("vdsmlite.virt.leases")

class LeasePlace(Protocol):
    @property
    def path(self) -> str: ...  # on this host

    @property
    def offset(self) -> int: ...


# (sd_id, lease_id) -> where the lease is: the domain's lease index (sdm.xleases).
LeaseLookup = Callable[[str, str], Awaitable[LeasePlace]]
# sd_id -> this host's id in that domain's lockspace, None when not joined.
HostIdOf = Callable[[str], int | None]
# sd_id -> (sector size, alignment) of the domain's sanlock areas.
GeometryOf = Callable[[str], tuple[int, int]]

# Owner states that mean "it may still be writing": only a host sanlock has declared
# dead (or that is free) has certainly stopped.
_MAYBE_ALIVE = {"live", "fail", "unknown"}


class VmLeases:
    def __init__(self, *, lookup: LeaseLookup | None, host_id_of: HostIdOf,
                 geometry_of: GeometryOf, run_blocking: RunBlocking) -> None:
        self._lookup = lookup
        self._host_id_of = host_id_of
        self._geometry_of = geometry_of
        self._run_blocking = run_blocking

    async def resolve(self, lease: LeaseSpec) -> LeaseSpec:
        """The lease with its path and offset on this host."""
        if lease.path is not None and await self._run_blocking(os.path.exists, lease.path):
            return lease
        if self._lookup is None:
            raise errors.CannotCreateVM(
                f"VM lease {lease.lease_id} on domain {lease.sd_id}: no lease index to find "
                "it in, and no path valid on this host")
        place = await self._lookup(lease.sd_id, lease.lease_id)
        return replace(lease, path=place.path, offset=place.offset)

    def check_startable(self, lease: LeaseSpec) -> None:
        """Blocking: 651 if a host that may be alive holds the lease (see module doc)."""
        assert lease.path is not None and lease.offset is not None
        host_id = self._host_id_of(lease.sd_id)
        if host_id is None:
            raise errors.CannotCreateVM(
                f"VM lease {lease.lease_id}: this host has not joined the lockspace of "
                f"domain {lease.sd_id} (connect the pool or start monitoring the domain)")
        sector, align = self._geometry_of(lease.sd_id)
        try:
            owners = sanlock.read_resource_owners(lease.sd_id, lease.lease_id,
                                                  [(lease.path, lease.offset)],
                                                  align=align, sector=sector)
        except sanlock.SanlockError as e:
            raise errors.CannotCreateVM(
                f"VM lease {lease.lease_id} on domain {lease.sd_id} cannot be read at "
                f"{lease.path}:{lease.offset}: {e}") from e
        for owner in owners:
            state = self._state(lease.sd_id, owner.host_id)
            if owner.host_id == host_id or state in _MAYBE_ALIVE:
                who = "this host" if owner.host_id == host_id else f"host {owner.host_id}"
                raise errors.AcquireLockFailure(
                    lease.lease_id, sanlock.SANLK_ACQUIRE_IDLIVE, "",
                    f"VM lease {lease.lease_id} on domain {lease.sd_id} is held by {who} "
                    f"({state}, generation "
                    f"{owner.generation}): the VM runs there")

    @staticmethod
    def _state(sd_id: str, host_id: int) -> str:
        try:
            hosts = sanlock.get_hosts(sd_id, host_id)
        except sanlock.SanlockError:
            return "unknown"
        return hosts[0].state if hosts else "unknown"

    # --- hand-over (migration) ---------------------------------------------------------

    def acquire_for(self, pid: int, lease: LeaseSpec) -> None:
        """Blocking: give the lease to the registered process `pid`."""
        assert lease.path is not None and lease.offset is not None
        try:
            sanlock.acquire(-1, lease.sd_id, lease.lease_id, [(lease.path, lease.offset)],
                            pid=pid)
        except sanlock.SanlockError as e:
            raise errors.AcquireLockFailure(lease.lease_id, e.errno, "",
                                            f"VM lease for pid {pid}: {e}") from e

    def release_for(self, pid: int, lease: LeaseSpec) -> None:
        """Blocking: take the lease from the process `pid`; a lease it no longer holds
        (it exited: sanlock freed it) is not an error."""
        assert lease.path is not None and lease.offset is not None
        try:
            sanlock.release(-1, lease.sd_id, lease.lease_id, [(lease.path, lease.offset)],
                            pid=pid)
        except sanlock.SanlockError as e:
            log.warning("VM lease %s: release for pid %d: %s", lease.lease_id, pid, e)
