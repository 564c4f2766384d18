"""Pool membership and the domain monitors that follow it.

A host joins the lockspace of every domain of the pool it connects to, and
of a domain activated in it; it leaves when the domain is detached or
deactivated, or the pool disconnected. Pool metadata lives on the master
domain (`storage.pool`); this service keeps the monitors in step with it.
"""

from __future__ import annotations

from typing import Any

from vdsmlite.blocking import RunBlocking
from vdsmlite.locking.monitor import MonitorManager
from vdsmlite.storage.pool import PoolManager


class PoolService:
    def __init__(self, *, pools: PoolManager, monitors: MonitorManager,
                 run_blocking: RunBlocking) -> None:
        self._pools = pools
        self._monitors = monitors
        self._run_blocking = run_blocking

    async def create(self, sp_uuid: str, name: str, master_uuid: str, master_version: int,
                     domains: list[str]) -> None:
        await self._run_blocking(self._pools.create, sp_uuid, name, master_uuid,
                                 master_version, domains)

    async def connect(self, sp_uuid: str, host_id: int, master_uuid: str, master_version: int,
                      domains: dict[str, str] | None) -> None:
        pool = await self._run_blocking(self._pools.connect, sp_uuid, host_id, master_uuid,
                                        master_version, domains)
        # Each member domain gets a monitor that joins its lockspace as host_id
        # (asynchronously: Host.getStorageRepoStats tells when it is acquired).
        for sd_uuid in pool.domains:
            await self._monitors.start_monitoring(sd_uuid, host_id, pool_uuid=sp_uuid)

    async def disconnect(self, sp_uuid: str) -> None:
        # Leave the lockspaces first: refused (662) while a lease is held in one.
        await self._monitors.stop_pool(sp_uuid)
        await self._run_blocking(self._pools.disconnect, sp_uuid)

    async def info(self, sp_uuid: str) -> dict[str, Any]:
        info: dict[str, Any] = await self._run_blocking(self._pools.info, sp_uuid)
        return info

    async def attach(self, sd_uuid: str, sp_uuid: str) -> None:
        await self._run_blocking(self._pools.attach, sd_uuid, sp_uuid)

    async def detach(self, sd_uuid: str, sp_uuid: str, *, force: bool) -> None:
        await self._monitors.stop_monitoring(sd_uuid, pool_uuid=sp_uuid)
        await self._run_blocking(self._pools.detach, sd_uuid, sp_uuid, force)

    async def activate(self, sd_uuid: str, sp_uuid: str) -> None:
        await self._run_blocking(self._pools.activate, sd_uuid, sp_uuid)
        pool = self._pools.connected
        if pool is not None and pool.uuid == sp_uuid:
            await self._monitors.start_monitoring(sd_uuid, pool.host_id, pool_uuid=sp_uuid)

    async def deactivate(self, sd_uuid: str, sp_uuid: str) -> None:
        await self._monitors.stop_monitoring(sd_uuid, pool_uuid=sp_uuid)
        await self._run_blocking(self._pools.deactivate, sd_uuid, sp_uuid)
