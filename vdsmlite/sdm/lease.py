"""The SDM lease: one host at a time changes a shared domain's metadata.

VDSM's SPM-less storage operations take the domain's ``SDM`` sanlock resource
(slot 1 of the ``leases`` volume) around every metadata change, so two hosts
can never create, delete or rewrite volumes of one domain at once. vdsmlite
does the same for every change it makes to a shared domain: volume create,
delete, extend, metadata updates, and OVF_STORE commits.

Holding it needs this host's id in the domain's lockspace (StoragePool.connect
or Host.startMonitoringDomain); without one the operation is refused at once
with 651, before any job starts. Local domains have no lockspace and no lease.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from vdsmlite import errors
from vdsmlite.blocking import RunBlocking
from vdsmlite.locking.leases import Lease, LeaseManager
from vdsmlite.locking.monitor import MonitorManager
from vdsmlite.locking.watchdog import WatchdogService
from vdsmlite.storage.sd import Domain


class SdmLease:
    """The SDM lease of any domain this host changes."""

    def __init__(self, *, leases: LeaseManager, monitors: MonitorManager,
                 watchdog: WatchdogService, run_blocking: RunBlocking) -> None:
        self._leases = leases
        self._monitors = monitors
        self._watchdog = watchdog
        self._run_blocking = run_blocking

    async def require_host_id(self, dom: Domain) -> None:
        """Refuse (651) a change to a shared domain whose lockspace this host has not
        joined, or any change once this host is being fenced (it must not write any more)."""
        if self._watchdog.fenced is not None:
            raise errors.AcquireLockFailure(
                "SDM", 0, "", f"this host is being fenced: {self._watchdog.fenced}")
        if await self._run_blocking(dom.lockspace) is None:
            return
        if self._monitors.host_id(dom.uuid) is None:
            raise errors.AcquireLockFailure(
                "SDM", 2, "",
                f"this host holds no id in the lockspace of domain {dom.uuid} "
                "(StoragePool.connect or Host.startMonitoringDomain first)")

    @contextlib.asynccontextmanager
    async def hold(self, dom: Domain) -> AsyncIterator[Lease | None]:
        """The domain's SDM lease for the duration of the block; None for a local domain.

        Long work under it calls `lease.check()` between steps: a lost lease (the
        lockspace failed) stops it with 651.
        """
        if await self._run_blocking(dom.lockspace) is None:
            yield None
            return
        await self.require_host_id(dom)
        lockspace, resource, disks = await self._run_blocking(dom.sdm_lease)
        async with self._leases.hold(lockspace, resource, disks) as lease:
            yield lease
