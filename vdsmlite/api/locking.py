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

import asyncio
import logging
import re
from typing import Any

from vdsmlite import errors
from vdsmlite.api.base import verb
from vdsmlite.ids import parse_uuid
from vdsmlite.services import Services

log = logging.getLogger("vdsmlite.api.locking")

_AGENT_NAME = re.compile(r"[A-Za-z0-9_]{1,64}")


class LockingApi:
    def __init__(self, services: Services) -> None:
        self._s = services

    @verb("Host.startMonitoringDomain")
    async def start_monitoring(self, *, sdUUID: str, hostID: int) -> bool:
        await self._s.run_blocking(self._s.domains.get, sdUUID)  # 358 if unknown
        await self._s.monitors.start_monitoring(sdUUID, hostID)
        return True

    @verb("Host.stopMonitoringDomain")
    async def stop_monitoring(self, *, sdUUID: str) -> bool:
        await self._s.monitors.stop_monitoring(sdUUID)
        return True

    @verb("Host.getStorageRepoStats")
    async def repo_stats(self, *, domains: list[str]) -> dict[str, Any]:
        return self._s.monitors.stats(domains)

    @verb("Host.fenceNode")
    async def fence_node(self, *, addr: str, port: str, agent: str, username: str,
                         password: str, action: str, secure: bool, options: str,
                         policy: dict[str, Any] | None) -> dict[str, Any]:
        host_map = _host_id_map(policy)
        if agent == "sanlock":
            return await self._s.fencing.fence(action, host_map)
        if not _AGENT_NAME.fullmatch(agent):
            raise errors.UnsupportedFenceAgent(agent)
        if action != "status" and host_map:
            states = await self._s.fencing.host_states(host_map)
            if "live" in states.values():
                log.warning("not fencing %s with %s: its host id is live in %s", addr, agent,
                            sorted(sd for sd, st in states.items() if st == "live"))
                return {"operationStatus": "skipped", "power": "unknown"}
        return await self._run_agent(agent, action, addr=addr, port=port, username=username,
                                     password=password, secure=secure, options=options)

    async def _run_agent(self, agent: str, action: str, *, addr: str, port: str,
                         username: str, password: str, secure: bool,
                         options: str) -> dict[str, Any]:
        program = self._s.config.fencing.agents_dir / f"fence_{agent}"
        if not program.is_file():
            raise errors.UnsupportedFenceAgent(agent)
        lines = [f"agent=fence_{agent}", f"ipaddr={addr}", f"login={username}",
                 f"action={action}", f"passwd={password}"]
        if port:
            lines.append(f"port={port}")
        if secure:
            lines.append("secure=yes")
        # VDSM appends the engine's free-form options (one key=value per line) as given.
        lines += [line for line in options.strip().splitlines() if line.strip()]
        stdin = ("\n".join(lines) + "\n").encode()
        proc = await asyncio.create_subprocess_exec(
            str(program), stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE)
        try:
            out, err = await asyncio.wait_for(proc.communicate(stdin),
                                              self._s.config.fencing.agent_timeout)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise errors.GeneralException(f"fence_{agent} timed out") from None
        rc = proc.returncode
        # Never log the input: it carries the password.
        log.info("fence_%s %s for %s: rc=%s", agent, action, addr, rc)
        if action == "status":
            power = {0: "on", 2: "off"}.get(rc or 0, "unknown")
            return {"operationStatus": "initiated", "power": power}
        if rc not in (0, 1, 2):
            raise errors.GeneralException(
                f"fence_{agent} {action} failed with {rc}: "
                f"{(out + err).decode(errors='replace').strip()[-500:]}")
        return {"operationStatus": "initiated", "power": "unknown"}


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
        except (TypeError, ValueError):
            raise errors.InvalidParameterException("storageDomainHostIdMap",
                                                   f"{sd_uuid}: {host_id!r}") from None
        if not 1 <= value <= 2000:
            raise errors.InvalidParameterException("storageDomainHostIdMap",
                                                   f"{sd_uuid}: host id {value}")
        out[canonical] = value
    return out
