"""The SDM lease: one host at a time changes a shared domain's metadata.

VDSM's SPM-less storage operations take the domain's ``SDM`` sanlock resource
(slot 1 of the ``leases`` volume) around every metadata change, so two hosts
can never create, delete or rewrite volumes of one domain at once. vdsmlite
does the same for every change it makes to a shared domain: volume create,
delete, extend, metadata updates, and OVF_STORE commits.

While this host is the pool's SPM (`vdsmlite.sdm.spm`) it keeps the SDM lease of
the master domain from StoragePool.spmStart to spmStop; its changes to that
domain run under the lease it holds (`keep`), with no acquire of their own,
and every other host's attempt to take it fails with 651 as usual.

Holding it needs this host's id in the domain's lockspace (StoragePool.connect
or Host.startMonitoringDomain). While that join is in progress a change waits
for it, up to ``[sanlock] host_id_timeout``; with no join asked for (or no
sanlock daemon to join through) it is refused at once with 651. Local domains
have no lockspace and no lease.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from vdsmlite import errors
from vdsmlite.blocking import RunBlocking
from vdsmlite.locking import sanlock
from vdsmlite.locking.leases import Lease, LeaseManager
from vdsmlite.locking.monitor import MonitorManager
from vdsmlite.locking.watchdog import WatchdogService
from vdsmlite.storage.sd import Domain


class SdmLease:
    """The SDM lease of any domain this host changes."""

    def __init__(self, *, leases: LeaseManager, monitors: MonitorManager,
                 watchdog: WatchdogService, run_blocking: RunBlocking,
                 host_id_timeout: float) -> None:
        self._leases = leases
        self._monitors = monitors
        self._watchdog = watchdog
        self._run_blocking = run_blocking
        self.host_id_timeout = host_id_timeout
        # SDM leases kept beyond single operations (the SPM's), by domain.
        self._kept: dict[str, Lease] = {}

    def keep(self, sd_uuid: str, lease: Lease) -> None:
        """Run every change to `sd_uuid` under `lease` (held by the caller) from now on."""
        self._kept[sd_uuid] = lease

    def drop(self, sd_uuid: str) -> None:
        self._kept.pop(sd_uuid, None)

    def kept(self, sd_uuid: str) -> Lease | None:
        return self._kept.get(sd_uuid)

    def _refuse_if_fenced(self) -> None:
        if self._watchdog.fenced is not None:
            raise errors.AcquireLockFailure(
                "SDM", 0, "", f"this host is being fenced: {self._watchdog.fenced}")

    def _no_host_id(self, dom: Domain, waited: float | None) -> errors.AcquireLockFailure:
        problem = self._monitors.join_problem(dom.uuid)
        monitor = self._monitors.monitors.get(dom.uuid)
        if monitor is None or monitor.host_id is None:
            why = (f"this host holds no id in the lockspace of domain {dom.uuid} "
                   "(StoragePool.connect or Host.startMonitoringDomain first)")
        elif waited is None:
            why = f"this host cannot join the lockspace of domain {dom.uuid}"
        else:
            why = (f"this host's join of the lockspace of domain {dom.uuid} (host id "
                   f"{monitor.host_id}) did not complete in {waited:.0f}s")
        if problem:
            why += f": {problem}"
        return errors.AcquireLockFailure("SDM", 2, "", why)

    async def require_host_id(self, dom: Domain) -> None:
        """Refuse (651) a change to a shared domain whose lockspace this host has not
        joined and is not joining, or any change once this host is being fenced (it
        must not write any more). A join in progress passes: `hold` waits for it."""
        self._refuse_if_fenced()
        if await self._run_blocking(dom.lockspace) is None:
            return
        if self._monitors.host_id(dom.uuid) is not None:
            return
        monitor = self._monitors.monitors.get(dom.uuid)
        if monitor is None or monitor.host_id is None:
            raise self._no_host_id(dom, None)
        # Joining: fails at once only if no sanlock daemon answers.
        if await self._monitors.wait_host_id(dom.uuid, 0) is None and \
                self._daemon_unreachable(dom):
            raise self._no_host_id(dom, None)

    def _daemon_unreachable(self, dom: Domain) -> bool:
        monitor = self._monitors.monitors.get(dom.uuid)
        return monitor is not None and isinstance(monitor.join_error,
                                                  sanlock.DaemonUnreachable)

    async def wait_host_id(self, dom: Domain) -> int:
        """This host's id in the domain's lockspace, waiting for a join in progress up
        to `host_id_timeout`; 651 when there is none."""
        self._refuse_if_fenced()
        host_id = await self._monitors.wait_host_id(dom.uuid, self.host_id_timeout)
        if host_id is None:
            raise self._no_host_id(
                dom, None if self._daemon_unreachable(dom) else self.host_id_timeout)
        return host_id

    @contextlib.asynccontextmanager
    async def hold(self, dom: Domain) -> AsyncIterator[Lease | None]:
        """The domain's SDM lease for the duration of the block; None for a local domain.

        Long work under it calls `lease.check()` between steps: a lost lease (the
        lockspace failed) stops it with 651.
        """
        if await self._run_blocking(dom.lockspace) is None:
            yield None
            return
        kept = self._kept.get(dom.uuid)
        if kept is not None:
            self._refuse_if_fenced()
            async with self._leases.share(kept) as lease:
                yield lease
            return
        await self.wait_host_id(dom)
        lockspace, resource, disks = await self._run_blocking(dom.sdm_lease)
        async with self._leases.hold(lockspace, resource, disks) as lease:
            yield lease
