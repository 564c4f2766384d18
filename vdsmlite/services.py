"""The daemon's shared services, handed to every verb namespace.

One object instead of globals: tests can build several (one per simulated
host) and each handler says exactly what it depends on.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import logging
import os
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from vdsmlite.config import Config
from vdsmlite.events import EventBus
from vdsmlite.fsutil import write_file_durably
from vdsmlite.ids import parse_uuid
from vdsmlite.imagelocks import LockTable
from vdsmlite.jobs import JobRegistry
from vdsmlite.locking import watchdog
from vdsmlite.locking.fencing import FenceService
from vdsmlite.locking.leases import LeaseManager
from vdsmlite.locking.monitor import MonitorManager
from vdsmlite.locking.watchdog import WatchdogService
from vdsmlite.metrics import Metrics
from vdsmlite.ovf.workers import OvfWorkers
from vdsmlite.storage.activation import Activator
from vdsmlite.storage.connections import ConnectionManager
from vdsmlite.storage.domains import DomainStore
from vdsmlite.storage.pool import PoolManager

log = logging.getLogger("vdsmlite.services")

T = TypeVar("T")


class Services:
    def __init__(self, config: Config) -> None:
        self.config = config
        if config.sanlock.run_dir is not None:
            # libsanlock reads it once, at its first connection (one daemon per process).
            os.environ["SANLOCK_RUN_DIR"] = str(config.sanlock.run_dir)
        self.started = time.monotonic()
        self.metrics = Metrics()
        self.events = EventBus()
        self.jobs = JobRegistry(self.events)
        # Blocking work (LVM, fsync, O_DIRECT, sanlock) runs here, never on the loop.
        self.executor = ThreadPoolExecutor(
            max_workers=config.daemon.worker_threads, thread_name_prefix="vdsmlite-io")
        self.host_uuid = load_host_uuid(config)
        self.connections = ConnectionManager(
            config.repository, config.state_dir / "connections.json", self.run_blocking,
            mount_timeout=config.storage.mount_timeout,
            iscsi_timeout=config.storage.iscsi_timeout)
        self.activator = Activator(config.run_dir / "lv")
        self.domains = DomainStore(config.repository, self.activator,
                                   io_timeout=config.sanlock.io_timeout)
        self.pools = PoolManager(self.domains, config.repository)
        # Untrusted OVF documents are checked and summarized in these processes.
        self.ovf_workers = OvfWorkers(config.storage.ovf_parser_processes,
                                      config.storage.ovf_parser_memory_mib * 1024 * 1024)
        # Sanlock: leases held by helper processes, monitors holding host ids,
        # fencing through storage and the watchdog it stops petting.
        lease_env = ({"SANLOCK_RUN_DIR": str(config.sanlock.run_dir)}
                     if config.sanlock.run_dir is not None else {})
        self.leases = LeaseManager(lease_env, acquire_timeout=config.sanlock.lease_timeout)
        self.monitors = MonitorManager(self.domains, self.run_blocking,
                                       interval=config.sanlock.monitor_interval,
                                       io_timeout=config.sanlock.io_timeout)
        w = config.watchdog
        self.watchdog = WatchdogService(watchdog.from_config(
            w.backend, device=w.device, socket_path=w.socket, timeout=w.timeout))
        self.fencing = FenceService(self.monitors, self.watchdog, self.run_blocking,
                                    self.events.publish)
        self.monitors.listener = self.fencing
        # Serializes changes to one image (create/delete/extend of its volumes).
        self.image_locks = LockTable()
        # Set by the daemon once the dispatcher exists (Host.getStats reports it).
        self.calls_in_flight: Callable[[], int] = lambda: 0
        self.metrics.add_gauges("vdsmlite_jobs", "Jobs by state", "state",
                                self.jobs.count_by_status)
        self.metrics.add_gauge("vdsmlite_event_subscribers", "Connected event subscribers",
                               lambda: self.events.subscriber_count)
        self.metrics.add_gauge("vdsmlite_watchdog_petting",
                               "1 while this host pets its watchdog, 0 once fenced or unarmed",
                               lambda: float(self.watchdog.status()["petting"]))
        self.metrics.add_gauge("vdsmlite_watchdog_keepalives", "Watchdog keepalives sent",
                               lambda: float(self.watchdog.keepalives))
        self.metrics.add_gauges("vdsmlite_lockspace_acquired",
                                "1 where this host holds its id in the domain's lockspace",
                                "domain", lambda: {sd: float(st["acquired"]) for sd, st in
                                                   self.monitors.stats().items()})
        self.metrics.add_gauges("vdsmlite_domain_check_delay_seconds",
                                "Last direct-I/O metadata read time, by domain", "domain",
                                lambda: {sd: float(st["delay"]) for sd, st in
                                         self.monitors.stats().items()})
        self.metrics.add_gauge("vdsmlite_fence_requests_received",
                               "Reset requests for this host taken from storage",
                               lambda: float(len(self.fencing.received)))
        self.metrics.add_gauge("vdsmlite_fence_requests_sent",
                               "Reset requests this host sent through storage",
                               lambda: float(len(self.fencing.requests)))
        self.metrics.add_gauge("vdsmlite_events_dropped", "Events dropped for slow subscribers",
                               lambda: self.events.dropped_total)

    async def run_blocking(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run `fn` in the bounded executor, keeping the request id for its log lines."""
        loop = asyncio.get_running_loop()
        ctx = contextvars.copy_context()
        call = functools.partial(ctx.run, fn, *args, **kwargs)
        return await loop.run_in_executor(self.executor, call)

    async def close(self) -> None:
        await self.jobs.close(grace=self.config.daemon.shutdown_timeout)
        await self.leases.close()
        await self.fencing.close()
        await self.monitors.close(leave=self.watchdog.fenced is None)
        await self.watchdog.close()
        # Held activations (loop devices of special LVs) are released on a clean stop.
        await self.run_blocking(self.domains.close)
        await self.run_blocking(self.ovf_workers.close)
        self.executor.shutdown(wait=True, cancel_futures=True)


def load_host_uuid(config: Config) -> str:
    """The host's stable identity: configured, else generated once and kept."""
    if config.daemon.host_uuid:
        return config.daemon.host_uuid.lower()
    path = config.state_dir / "host_uuid"
    try:
        existing = parse_uuid(path.read_text().strip())
        if existing:
            return existing
        log.warning("%s does not hold a UUID; generating a new host identity", path)
    except FileNotFoundError:
        pass
    new = str(uuid.uuid4())
    write_file_durably(path, new + "\n")
    log.info("generated host uuid %s", new)
    return new
