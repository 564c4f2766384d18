"""The Storage Pool Manager role, as an engine written for VDSM elects it.

StoragePool.spmStart (a task) makes this host the pool's SPM: it waits for its
id in the master domain's lockspace (a join in progress, up to ``[sanlock]
host_id_timeout``, VDSM's 180 s), acquires the master domain's ``SDM`` lease and
keeps it until StoragePool.spmStop. Meanwhile every change this host makes to
the master domain runs under that lease (`SdmLease.keep`: no acquire per
operation), and every other host's attempt to take it fails with 651. A host
that is not SPM keeps taking the lease per operation, as before.

StoragePool.getSpmStatus answers as VDSM's memory backend (the one an engine
that passes ``domainDict`` uses) does: ``spmId`` and ``spmLver`` from the SDM
lease on storage (its owner and version, -1 when free), ``spmStatus`` this
host's role: SPM, Contend (spmStart running) or Free.

If sanlock revokes the lease (the lockspace was lost), the role ends: the next
status or change sees it and reports Free / 651. VDSM panics the whole daemon
instead; here only the lease holder process dies (`vdsmlite.locking.leases`).
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from typing import Any

from vdsmlite import errors
from vdsmlite.blocking import RunBlocking
from vdsmlite.jobs import Job, JobRegistry
from vdsmlite.locking import sanlock
from vdsmlite.locking.leases import Lease, LeaseManager
from vdsmlite.sdm.lease import SdmLease
from vdsmlite.storage import constants as sc
from vdsmlite.storage.domains import DomainStore
from vdsmlite.storage.pool import PoolManager
from vdsmlite.storage.sd import Domain

log = logging.getLogger("vdsmlite.sdm.spm")

SPM_ACQUIRED, SPM_CONTEND, SPM_FREE = "SPM", "Contend", "Free"
SPM_ID_FREE = LVER_INVALID = -1


@dataclass
class _Role:
    pool: str
    master: str
    status: str = SPM_CONTEND
    job: Job | None = None
    lease: Lease | None = None
    stack: contextlib.AsyncExitStack = field(default_factory=contextlib.AsyncExitStack)


class SpmService:
    def __init__(self, *, pools: PoolManager, domains: DomainStore, leases: LeaseManager,
                 sdm: SdmLease, jobs: JobRegistry, run_blocking: RunBlocking) -> None:
        self._pools = pools
        self._domains = domains
        self._leases = leases
        self._sdm = sdm
        self._jobs = jobs
        self._run_blocking = run_blocking
        self._roles: dict[str, _Role] = {}

    def _connected(self, sp_uuid: str) -> str:
        """The master domain of `sp_uuid`, which this host must serve (309 if not)."""
        pool = self._pools.connected
        if pool is None or pool.uuid != sp_uuid:
            raise errors.StoragePoolUnknown(sp_uuid)
        return pool.master_uuid

    def role(self, sp_uuid: str) -> str:
        role = self._roles.get(sp_uuid)
        if role is None:
            return SPM_FREE
        if role.status == SPM_ACQUIRED and role.lease is not None and \
                role.lease.lost is not None:
            log.error("pool %s: SPM lease lost (%s); this host is no longer SPM", sp_uuid,
                      role.lease.lost)
            self._sdm.drop(role.master)
            del self._roles[sp_uuid]
            return SPM_FREE
        return role.status

    # --- verbs -------------------------------------------------------------------------

    async def start(self, sp_uuid: str, prev_id: int, prev_lver: int, max_host_id: int,
                    dom_version: int | None) -> str:
        master_uuid = self._connected(sp_uuid)
        if self.role(sp_uuid) != SPM_FREE:
            raise errors.IsSpm(sp_uuid)
        if dom_version is not None and dom_version not in sc.SUPPORTED_VERSIONS:
            raise errors.UnsupportedDomainVersion(dom_version)
        master: Domain = await self._run_blocking(self._domains.get, master_uuid)
        role = self._roles[sp_uuid] = _Role(sp_uuid, master_uuid)

        async def body(job: Job) -> None:
            try:
                await self._acquire(role, master, prev_id, prev_lver, dom_version)
            except BaseException as e:
                await role.stack.aclose()
                if self._roles.get(sp_uuid) is role:
                    del self._roles[sp_uuid]
                if isinstance(e, Exception) and not isinstance(e, errors.VdsmError):
                    # VDSM's default exception of the spmStart task.
                    raise errors.SpmStartError(
                        f"spUUID={sp_uuid}, prevID={prev_id}, prevLVER={prev_lver}, "
                        f"maxHostID={max_host_id}, domVersion={dom_version}: {e}") from e
                raise

        # Launched, then waited for: spmStop may come while its record is written.
        role.job = self._jobs.launch(body, description=f"spmStart of pool {sp_uuid}",
                                     verb="StoragePool.spmStart")
        await role.job.recorded()
        return role.job.id

    async def _acquire(self, role: _Role, master: Domain, prev_id: int, prev_lver: int,
                       dom_version: int | None) -> None:
        version = await self._run_blocking(master.read_version)
        if dom_version is not None and version > dom_version:
            raise errors.CurrentVersionTooAdvancedError(master.uuid, version, dom_version)
        lver, spm_id = await self._inspect(master)
        if (lver, spm_id) != (prev_lver, prev_id):
            # VDSM only logs it (the params are deprecated).
            log.info("pool %s: expected previous SPM %s lver %s, found %s lver %s",
                     role.pool, prev_id, prev_lver, spm_id, lver)
        host_id = await self._sdm.wait_host_id(master)
        if await self._run_blocking(master.lockspace) is None:
            # A local master: one host, no sanlock, nothing to hold.
            role.status = SPM_ACQUIRED
            log.info("pool %s: this host (id %d) is SPM", role.pool, host_id)
            return
        lockspace, resource, disks = await self._run_blocking(master.sdm_lease)
        role.lease = await role.stack.enter_async_context(
            self._leases.hold(lockspace, resource, disks))
        self._sdm.keep(master.uuid, role.lease)
        role.stack.callback(self._sdm.drop, master.uuid)
        role.status = SPM_ACQUIRED
        lver, _ = await self._inspect(master)
        log.info("pool %s: this host (id %d) is SPM, lver %d", role.pool, host_id, lver)

    async def stop(self, sp_uuid: str) -> None:
        self._connected(sp_uuid)
        role = self._roles.get(sp_uuid)
        if role is None or self.role(sp_uuid) == SPM_FREE:
            return
        if role.status == SPM_CONTEND:
            # spmStart still running: stop it (it releases what it took).
            assert role.job is not None
            role.job.abort()
            await role.job.wait()
            return
        if role.lease is not None and role.lease.users > 1:
            raise errors.SpmStopError(sp_uuid)
        role.status = SPM_FREE
        del self._roles[sp_uuid]
        await role.stack.aclose()
        log.info("pool %s: SPM stopped; lease released", sp_uuid)

    async def status(self, sp_uuid: str) -> dict[str, Any]:
        master_uuid = self._connected(sp_uuid)
        status = self.role(sp_uuid)
        master: Domain = await self._run_blocking(self._domains.get, master_uuid)
        lver, spm_id = await self._inspect(master)
        pool = self._pools.connected
        if status == SPM_ACQUIRED and spm_id == SPM_ID_FREE and pool is not None:
            spm_id, lver = pool.host_id, 0  # a local master: no lease to read
        return {"spmId": spm_id, "spmStatus": status, "spmLver": lver}

    async def _inspect(self, master: Domain) -> tuple[int, int]:
        """(lver, spm id) of the master domain's SDM lease on storage, as VDSM's
        clusterlock.inspect reads it; (-1, -1) when no host holds it."""
        def inspect() -> tuple[int, int]:
            if master.lockspace() is None:
                return LVER_INVALID, SPM_ID_FREE
            lockspace, resource, disks = master.sdm_lease()
            sector, align = master.geometry()
            path, offset = disks[0]
            try:
                res = sanlock.read_resource(path, offset, align=align, sector=sector)
                owners = sanlock.read_resource_owners(lockspace, resource, disks,
                                                      align=align, sector=sector)
            except sanlock.SanlockError as e:
                raise errors.StorageDomainMasterError(f"reading the SDM lease: {e}") from e
            if not owners:
                return LVER_INVALID, SPM_ID_FREE
            return res.version, owners[0].host_id

        return await self._run_blocking(inspect)

    def require_not_spm(self, sp_uuid: str) -> None:
        """656 while this host is (or is becoming) the pool's SPM: StoragePool.disconnect
        must come after spmStop, as in VDSM."""
        if self.role(sp_uuid) != SPM_FREE:
            raise errors.IsSpm(sp_uuid)

    async def close(self) -> None:
        """Release the role at shutdown (the holders' exit would release it anyway)."""
        for role in list(self._roles.values()):
            await role.stack.aclose()
        self._roles.clear()
