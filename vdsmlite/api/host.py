"""Host.* verbs: identity, capabilities, statistics, jobs and the schema itself."""

from __future__ import annotations

import os
import threading
import time
from typing import Any

from vdsmlite import __version__, hostinfo
from vdsmlite.api.base import verb
from vdsmlite.blocking import RunBlocking
from vdsmlite.jobs import JobRegistry
from vdsmlite.locking.fencing import FenceService
from vdsmlite.locking.monitor import MonitorManager
from vdsmlite.locking.watchdog import WatchdogService
from vdsmlite.metrics import Metrics
from vdsmlite.rpc.schema import default_schema

# Storage domain versions this agent can create and serve.
DOMAIN_VERSIONS = [5]


class HostApi:
    def __init__(self, *, host_uuid: str, started: float, jobs: JobRegistry,
                 monitors: MonitorManager, watchdog: WatchdogService, fencing: FenceService,
                 metrics: Metrics, run_blocking: RunBlocking) -> None:
        self._host_uuid = host_uuid
        self._started = started
        self._jobs = jobs
        self._monitors = monitors
        self._watchdog = watchdog
        self._fencing = fencing
        self._metrics = metrics
        self._run_blocking = run_blocking

    @verb("Host.ping2")
    async def ping2(self) -> bool:
        return True

    @verb("Host.confirmConnectivity")
    async def confirm_connectivity(self) -> bool:
        return True

    @verb("Host.getCapabilities")
    async def get_capabilities(self) -> dict[str, Any]:
        return await self._run_blocking(self._capabilities)

    def _capabilities(self) -> dict[str, Any]:
        mem = hostinfo.meminfo()
        initiator = hostinfo.iscsi_initiator_name()
        return {
            "uuid": self._host_uuid,
            "version_name": "vdsmlite",
            "software_version": __version__,
            "domain_versions": DOMAIN_VERSIONS,
            # 0 = detect from the storage (file domains); block storage speaks 512 or 4K LUNs.
            "supported_block_size": {
                "FCP": [512, 4096],
                "ISCSI": [512, 4096],
                "NFS": [512],
                "LOCALFS": [0, 512, 4096],
                "POSIXFS": [0, 512, 4096],
                "GLUSTERFS": [0, 512, 4096],
            },
            # Live merge is not implemented yet; say so rather than let the engine try.
            "liveMerge": "false",
            "liveSnapshot": "false",
            "ISCSIInitiatorName": initiator,
            "HBAInventory": {
                "iSCSI": [{"InitiatorName": initiator}] if initiator else [],
                "FC": hostinfo.fc_hbas(),
            },
            "hostedEngineDeployed": False,
            "additionalFeatures": [],
            "kvmEnabled": str(hostinfo.kvm_enabled()).lower(),
            "cpuCores": str(os.cpu_count() or 1),
            "memSize": str(mem.get("MemTotal", 0) // 1024),
            "operatingSystem": hostinfo.os_release(),
            "kernelVersion": os.uname().release,
        }

    @verb("Host.getStats")
    async def get_stats(self) -> dict[str, Any]:
        mem = await self._run_blocking(hostinfo.meminfo)
        total = mem.get("MemTotal", 1)
        available = mem.get("MemAvailable", mem.get("MemFree", 0))
        return {
            "elapsedTime": f"{time.monotonic() - self._started:.0f}",
            "cpuLoad": f"{os.getloadavg()[0]:.2f}",
            "memAvailable": available // 1024,
            "memFree": mem.get("MemFree", 0) // 1024,
            "memUsed": f"{100 * (total - available) / total:.0f}",
            "threadCount": str(threading.active_count()),
            "rpcCallsInFlight": self._metrics.calls_in_flight(),
            "storageDomains": self._monitors.stats(),
            "watchdog": self._watchdog.status(),
            "fencing": self._fencing.status_json(),
        }

    @verb("Host.getVerbs")
    async def get_verbs(self) -> dict[str, Any]:
        return default_schema().describe()

    @verb("Host.getJobs")
    async def get_jobs(self, *, job_type: str | None, job_ids: list[str]) -> dict[str, Any]:
        return {j.id: j.info() for j in self._jobs.jobs(job_type, job_ids)}

    @verb("Host.getAllTasksStatuses")
    async def get_all_tasks_statuses(self) -> dict[str, Any]:
        return {j.id: j.task_status() for j in self._jobs.jobs()}

    @verb("Host.getAllTasksInfo")
    async def get_all_tasks_info(self) -> dict[str, Any]:
        return {j.id: j.task_info() for j in self._jobs.jobs()}
