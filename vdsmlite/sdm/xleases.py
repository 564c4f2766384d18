"""External leases (VM and job leases): VDSM's Lease.* on a domain's xleases volume.

Changes (create, delete, rebuild) are tasks, as in VDSM: they run as jobs under
the domain's SDM lease (no other host changes the index meanwhile) and a
per-domain lock on this host (one index change at a time here). Reads (info,
status) take no lock: an index change is one direct-I/O block write, and a
reader sees the block before or after it.

VDSM's task rules are kept: creating a lease that exists, or deleting one that
does not, finishes the task successfully (the engine does not look at these
tasks' errors; VDSM logs and moves on). Lease.info of a missing lease is 936.

An xleases volume whose index was never formatted (a domain made before this
agent formatted it at creation) is formatted by the first change, under the
SDM lease, as VDSM's domain upgrade does; until then it holds no lease. A
corrupted index is refused (code 100, VDSM's text) until Lease.rebuild_leases.

Local domains have no sanlock lockspace, so no external leases: changes are
refused with 75.
"""

from __future__ import annotations

import errno
import logging
from typing import Any

from vdsmlite import errors
from vdsmlite.blocking import RunBlocking
from vdsmlite.imagelocks import LockTable
from vdsmlite.jobs import Job, JobRegistry
from vdsmlite.locking import sanlock
from vdsmlite.sdm.lease import SdmLease
from vdsmlite.storage import xleases
from vdsmlite.storage.domains import DomainStore
from vdsmlite.storage.sd import Domain
from vdsmlite.storage.xleases import LeaseInfo

log = logging.getLogger("vdsmlite.sdm.xleases")

__all__ = ["ExternalLeases", "LeaseInfo"]

# The key of a domain's xleases index in the lock table (images use (sd, img_uuid)).
_INDEX = "<xleases>"


class ExternalLeases:
    def __init__(self, *, domains: DomainStore, jobs: JobRegistry, locks: LockTable,
                 sdm: SdmLease, run_blocking: RunBlocking) -> None:
        self._domains = domains
        self._jobs = jobs
        self._locks = locks
        self._sdm = sdm
        self._run_blocking = run_blocking

    # --- reads: any host ------------------------------------------------------------------

    async def lease_info(self, sd_id: str, lease_id: str) -> LeaseInfo:
        """Where lease `lease_id` of domain `sd_id` lives: `path` is usable by sanlock
        (and libvirt's <lease>) on this host - the xleases file, or the block domain's
        xleases LV, activated and kept active while the domain is served.

        358 for an unknown domain, 936 for a lease the index does not name.
        """
        dom = await self._domain(sd_id)
        return await self._run_blocking(_lookup, dom, lease_id)

    async def status(self, sd_id: str, lease_id: str) -> dict[str, Any]:
        """Lease.status: {owners: [host id] or [], version} read from the lease on storage.

        As VDSM's inspect: a free lease has no version (None); an owner whose
        generation is no longer the host's current one does not hold it any more.
        Lease metadata (LVB) is not read: vdsmlite does not store any.
        """
        info = await self.lease_info(sd_id, lease_id)
        dom = await self._domain(sd_id)
        block_size, alignment = await self._run_blocking(dom.geometry)
        return await self._run_blocking(_inspect, info, alignment, block_size)

    async def dump(self, sd_id: str) -> dict[str, dict[str, Any]]:
        """Every lease of the index: {lease_id: {offset, updating}}."""
        dom = await self._domain(sd_id)

        def dump() -> dict[str, dict[str, Any]]:
            path, alignment, block_size = _where(dom)
            if xleases.is_unformatted(path, alignment=alignment, block_size=block_size):
                return {}
            return xleases.LeasesVolume(path, alignment=alignment,
                                        block_size=block_size).leases()

        return await self._run_blocking(dump)

    # --- changes: tasks under the SDM lease -------------------------------------------------

    async def create(self, sd_id: str, lease_id: str) -> str:
        dom = await self._shared_domain(sd_id)

        def work(job: Job) -> None:
            vol = _open_for_change(dom)
            try:
                vol.add(lease_id)
            except errors.LeaseExists:
                # VDSM: the task succeeds; the engine does not check these tasks' errors.
                log.info("reusing existing lease %s:%s", sd_id, lease_id)

        return await self._start("Lease.create", f"create lease {lease_id}", dom, work)

    async def delete(self, sd_id: str, lease_id: str) -> str:
        dom = await self._shared_domain(sd_id)

        def work(job: Job) -> None:
            vol = _open_for_change(dom)
            try:
                vol.remove(lease_id)
            except errors.NoSuchLease:
                log.info("lease already deleted %s:%s", sd_id, lease_id)

        return await self._start("Lease.delete", f"delete lease {lease_id}", dom, work)

    async def rebuild(self, sd_id: str) -> str:
        dom = await self._shared_domain(sd_id)

        def work(job: Job) -> None:
            path, alignment, block_size = _where(dom)
            if xleases.is_unformatted(path, alignment=alignment, block_size=block_size):
                _format_first_use(dom, path, alignment, block_size)
            xleases.rebuild_index(dom.uuid, path, alignment=alignment, block_size=block_size)

        return await self._start("Lease.rebuild_leases", "rebuild external leases index",
                                 dom, work)

    # --- helpers ------------------------------------------------------------------------------

    async def _domain(self, sd_id: str) -> Domain:
        dom: Domain = await self._run_blocking(self._domains.get, sd_id)
        return dom

    async def _shared_domain(self, sd_id: str) -> Domain:
        dom = await self._domain(sd_id)
        if await self._run_blocking(dom.lockspace) is None:
            raise errors.UnsupportedOperation(
                f"external leases need a shared domain; {sd_id} is local (no sanlock "
                "lockspace)")
        # A host that may not take the SDM lease is refused now (651), not in the task.
        await self._sdm.require_host_id(dom)
        return dom

    async def _start(self, verb: str, description: str, dom: Domain, work: Any) -> str:
        async def body(job: Job) -> None:
            async with self._locks.hold((dom.uuid, _INDEX)), self._sdm.hold(dom):
                await self._run_blocking(_sanlock_errors, work, job)

        return (await self._jobs.start(body, description=description, verb=verb)).id


def _where(dom: Domain) -> tuple[str, int, int]:
    """(xleases path, alignment, block size) of the domain."""
    block_size, alignment = dom.geometry()
    return dom.xleases_path(), alignment, block_size


def _lookup(dom: Domain, lease_id: str) -> LeaseInfo:
    path, alignment, block_size = _where(dom)
    if xleases.is_unformatted(path, alignment=alignment, block_size=block_size):
        raise errors.NoSuchLease(lease_id)  # never formatted: no lease was ever added
    vol = xleases.LeasesVolume(path, alignment=alignment, block_size=block_size)
    return vol.lookup(lease_id)


def _format_first_use(dom: Domain, path: str, alignment: int, block_size: int) -> None:
    log.warning("the xleases index of domain %s was never formatted; formatting it",
                dom.uuid)
    xleases.format_index(dom.uuid, path, alignment=alignment, block_size=block_size)


def _open_for_change(dom: Domain) -> xleases.LeasesVolume:
    path, alignment, block_size = _where(dom)
    if xleases.is_unformatted(path, alignment=alignment, block_size=block_size):
        _format_first_use(dom, path, alignment, block_size)
    return xleases.LeasesVolume(path, alignment=alignment, block_size=block_size)


def _sanlock_errors(work: Any, job: Job) -> None:
    """VDSM's tasks answer a failed sanlock call with 100 and its text; so do these."""
    try:
        work(job)
    except sanlock.SanlockError as e:
        raise errors.GeneralException(str(e)) from e


def _inspect(info: LeaseInfo, alignment: int, block_size: int) -> dict[str, Any]:
    disks = [(info.path, info.offset)]
    try:
        res = sanlock.read_resource(info.path, info.offset, align=alignment,
                                    sector=block_size)
        if res.name != info.resource:
            raise errors.GeneralException(
                f"lease at {info.path}:{info.offset} is {res.name!r}, not {info.resource!r}")
        owners = sanlock.read_resource_owners(info.lockspace, info.resource, disks,
                                              align=alignment, sector=block_size)
    except sanlock.SanlockError as e:
        raise errors.GeneralException(str(e)) from e
    if len(owners) > 1:
        raise errors.GeneralException(f"multiple owners for lease {info.resource}: {owners}")
    if not owners:
        return {"owners": [], "version": None}
    owner = owners[0]
    try:
        hosts = sanlock.get_hosts(info.lockspace, owner.host_id)
    except sanlock.SanlockError as e:
        if e.errno == errno.EAGAIN:
            # Host states are not known yet just after joining: VDSM assumes it holds.
            return {"owners": [owner.host_id], "version": res.version}
        raise errors.GeneralException(str(e)) from e
    if hosts and hosts[0].generation != owner.generation:
        # The owner rejoined since: its old generation's hold is gone.
        return {"owners": [], "version": res.version}
    return {"owners": [owner.host_id], "version": res.version}
