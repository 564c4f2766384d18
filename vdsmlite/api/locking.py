"""Host ids, domain monitoring and fencing: the verbs around sanlock.

VDSM has no verbs to join a lockspace: a host joins the lockspaces of its
pool's domains on StoragePool.connect, or of one domain on
Host.startMonitoringDomain (hosted engine), and Host.getStorageRepoStats says
whether it holds its id there (``acquired``). Host.fenceNode with agent
"sanlock" fences through storage (vdsmlite.locking.fencing); other agents run
``fence_<agent>`` as VDSM does, skipped while the target still renews its
lease in a listed domain.
"""

from __future__ import annotations

import logging
from typing import Any

from vdsmlite import errors
from vdsmlite.api.base import verb
from vdsmlite.blocking import RunBlocking
from vdsmlite.ids import parse_uuid
from vdsmlite.locking.fenceagents import AGENT_NAME, FenceAgents
from vdsmlite.locking.fencing import FenceService
from vdsmlite.locking.monitor import MonitorManager
from vdsmlite.storage.domains import DomainStore

log = logging.getLogger("vdsmlite.api.locking")


class LockingApi:
    def __init__(self, *, domains: DomainStore, monitors: MonitorManager,
                 fencing: FenceService, agents: FenceAgents,
                 run_blocking: RunBlocking) -> None:
        self._domains = domains
        self._monitors = monitors
        self._fencing = fencing
        self._agents = agents
        self._run_blocking = run_blocking

    @verb("Host.startMonitoringDomain")
    async def start_monitoring(self, *, sdUUID: str, hostID: int) -> bool:
        await self._run_blocking(self._domains.get, sdUUID)  # 358 if unknown
        await self._monitors.start_monitoring(sdUUID, hostID)
        return True

    @verb("Host.stopMonitoringDomain")
    async def stop_monitoring(self, *, sdUUID: str) -> bool:
        await self._monitors.stop_monitoring(sdUUID)
        return True

    @verb("Host.getStorageRepoStats")
    async def repo_stats(self, *, domains: list[str]) -> dict[str, Any]:
        return self._monitors.stats(domains)

    @verb("Host.fenceNode")
    async def fence_node(self, *, addr: str, port: str, agent: str, username: str,
                         password: str, action: str, secure: bool, options: str,
                         policy: dict[str, Any] | None) -> dict[str, Any]:
        host_map = _host_id_map(policy)
        if agent == "sanlock":
            return await self._fencing.fence(action, host_map)
        if not AGENT_NAME.fullmatch(agent):
            raise errors.UnsupportedFenceAgent(agent)
        if action != "status" and host_map:
            states = await self._fencing.host_states(host_map)
            if "live" in states.values():
                log.warning("not fencing %s with %s: its host id is live in %s", addr, agent,
                            sorted(sd for sd, st in states.items() if st == "live"))
                return {"operationStatus": "skipped", "power": "unknown"}
        return await self._agents.run(agent, action, addr=addr, port=port, username=username,
                                      password=password, secure=secure, options=options)


def _host_id_map(policy: dict[str, Any] | None) -> dict[str, int]:
    if not policy:
        return {}
    raw = policy.get("storageDomainHostIdMap") or {}
    if not isinstance(raw, dict):
        raise errors.InvalidParameterException("storageDomainHostIdMap", "must be a map")
    out = {}
    for sd_uuid, host_id in raw.items():
        canonical = parse_uuid(sd_uuid)
        if canonical is None:
            raise errors.InvalidParameterException("storageDomainHostIdMap", sd_uuid)
        try:
            value = int(host_id)
        except (TypeError, ValueError) as e:
            raise errors.InvalidParameterException("storageDomainHostIdMap",
                                                   f"{sd_uuid}: {host_id!r}") from e
        if not 1 <= value <= 2000:
            raise errors.InvalidParameterException("storageDomainHostIdMap",
                                                   f"{sd_uuid}: host id {value}")
        out[canonical] = value
    return out
