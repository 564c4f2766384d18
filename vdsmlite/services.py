"""The composition root: every long-lived object of the daemon, built once, in order.

Nothing below this module knows about it: each service receives exactly the
objects it uses, here, at construction, and nothing is attached afterwards.
Tests can build several (one per simulated host). The daemon adds the doors
on top (`api.build_handlers`, `http.add_routes`) and calls `close()` last.
"""

from __future__ import annotations

import logging
import os
import time
import uuid

from vdsmlite.blocking import BlockingExecutor
from vdsmlite.client import TlsFiles
from vdsmlite.config import Config
from vdsmlite.events import EventBus
from vdsmlite.fsutil import write_file_durably
from vdsmlite.ids import parse_uuid
from vdsmlite.imagelocks import LockTable
from vdsmlite.jobs import JobRegistry
from vdsmlite.locking import watchdog
from vdsmlite.locking.fenceagents import FenceAgents
from vdsmlite.locking.fencing import FenceService
from vdsmlite.locking.leases import LeaseManager
from vdsmlite.locking.monitor import MonitorManager
from vdsmlite.locking.watchdog import WatchdogService
from vdsmlite.metrics import Metrics
from vdsmlite.ovf.workers import OvfWorkers
from vdsmlite.sdm.lease import SdmLease
from vdsmlite.sdm.merge import SdmJobs
from vdsmlite.sdm.overview import SnapshotOverview
from vdsmlite.sdm.ovfindex import OvfIndex
from vdsmlite.sdm.ovfstore import OvfService
from vdsmlite.sdm.pools import PoolService
from vdsmlite.sdm.provision import DomainProvisioner
from vdsmlite.sdm.spm import SpmService
from vdsmlite.sdm.transfers import ImageTransfers
from vdsmlite.sdm.volumes import VolumeService
from vdsmlite.sdm.xleases import ExternalLeases
from vdsmlite.storage.activation import Activator
from vdsmlite.storage.connections import ConnectionManager
from vdsmlite.storage.domains import DomainStore
from vdsmlite.storage.pool import PoolManager
from vdsmlite.storage.users import StorageUsers
from vdsmlite.virt.disks import DiskPreparer
from vdsmlite.virt.fromovf import OvfVmSource
from vdsmlite.virt.leases import VmLeases
from vdsmlite.virt.manager import VmManager
from vdsmlite.virt.migtransport import IncomingListener

log = logging.getLogger("vdsmlite.services")

# Uploads read at the same time, at most (more wait for a thread: their clients
# are held by TCP's flow control). Threads are made only as uploads need them.
UPLOAD_RECEIVERS = 32


class Services:
    def __init__(self, config: Config) -> None:
        self.config = config
        if config.sanlock.run_dir is not None:
            # libsanlock reads it once, at its first connection (one daemon per process).
            os.environ["SANLOCK_RUN_DIR"] = str(config.sanlock.run_dir)
        self.started = time.monotonic()
        self.metrics = Metrics()
        self.events = EventBus()
        self.jobs = JobRegistry(self.events, state_dir=config.state_dir)
        # Blocking work (LVM, fsync, O_DIRECT, sanlock) runs here, never on the loop.
        self.executor = BlockingExecutor(config.daemon.worker_threads)
        run_blocking = self.run_blocking = self.executor.run
        # Upload bodies are read by threads of their own (http.putserver): a slow
        # client must not hold one of the threads LVM, fsync and sanlock calls need.
        self.receivers = BlockingExecutor(UPLOAD_RECEIVERS, name="vdsmlite-recv")
        self.host_uuid = load_host_uuid(config)

        # Storage: connections, domains and pools as found on storage.
        st = config.storage
        self.connections = ConnectionManager(
            config.repository, config.state_dir / "connections.json", run_blocking,
            mount_timeout=st.mount_timeout, iscsi_timeout=st.iscsi_timeout)
        self.activator = Activator(config.run_dir / "lv")
        self.domains = DomainStore(config.repository, self.activator,
                                   io_timeout=config.sanlock.io_timeout)
        self.pools = PoolManager(self.domains, config.repository)
        # Untrusted OVF documents are checked and summarized in these processes.
        self.ovf_workers = OvfWorkers(st.ovf_parser_processes,
                                      st.ovf_parser_memory_mib * 1024 * 1024)

        # Sanlock: leases held by helper processes, monitors holding host ids,
        # fencing through storage and the watchdog it stops petting.
        lease_env = ({"SANLOCK_RUN_DIR": str(config.sanlock.run_dir)}
                     if config.sanlock.run_dir is not None else {})
        self.leases = LeaseManager(lease_env, acquire_timeout=config.sanlock.lease_timeout)
        self.monitors = MonitorManager(self.domains, run_blocking,
                                       interval=config.sanlock.monitor_interval,
                                       io_timeout=config.sanlock.io_timeout)
        w = config.watchdog
        self.watchdog = WatchdogService(watchdog.from_config(
            w.backend, device=w.device, socket_path=w.socket, timeout=w.timeout))
        self.fencing = FenceService(self.monitors, self.watchdog, run_blocking,
                                    self.events.publish)
        self.fence_agents = FenceAgents(config.fencing.agents_dir, config.fencing.agent_timeout)

        # Coordination: what combines storage, locks, leases and jobs.
        # Serializes changes to one image (create/delete/extend of its volumes).
        self.image_locks = LockTable()
        # Storage held by running VMs: not torn down, deleted or wiped under them.
        self.storage_users = StorageUsers()
        self.sdm = SdmLease(leases=self.leases, monitors=self.monitors, watchdog=self.watchdog,
                            run_blocking=run_blocking,
                            host_id_timeout=config.sanlock.host_id_timeout)
        # The SPM role: the master domain's SDM lease kept from spmStart to spmStop.
        self.spm = SpmService(pools=self.pools, domains=self.domains, leases=self.leases,
                              sdm=self.sdm, jobs=self.jobs, run_blocking=run_blocking)
        self.volumes = VolumeService(domains=self.domains, pools=self.pools, jobs=self.jobs,
                                     image_locks=self.image_locks, sdm=self.sdm,
                                     users=self.storage_users, run_blocking=run_blocking)
        # VM and job leases in the domains' xleases volumes (Lease.*; VMs ask lease_info).
        self.external_leases = ExternalLeases(domains=self.domains, jobs=self.jobs,
                                              locks=self.image_locks, sdm=self.sdm,
                                              run_blocking=run_blocking)
        self.ovf_index = OvfIndex(workers=self.ovf_workers, jobs=self.jobs,
                                  run_blocking=run_blocking, state_dir=config.state_dir,
                                  publish=self.events.publish)
        self.provisioner = DomainProvisioner(
            domains=self.domains, pools=self.pools, monitors=self.monitors,
            connections=self.connections, activator=self.activator, users=self.storage_users,
            repository=config.repository, state_dir=config.state_dir,
            io_timeout=config.sanlock.io_timeout, run_blocking=run_blocking,
            formatted=self.ovf_index.forget_domain)
        self.pool_service = PoolService(pools=self.pools, monitors=self.monitors,
                                        run_blocking=run_blocking)
        self.ovf = OvfService(domains=self.domains, image_locks=self.image_locks, sdm=self.sdm,
                              workers=self.ovf_workers, index=self.ovf_index, jobs=self.jobs,
                              run_blocking=run_blocking)
        # SDM.* jobs on volumes (cold merge, update_volume) and the snapshot overview.
        self.sdm_jobs = SdmJobs(volumes=self.volumes, jobs=self.jobs,
                                image_locks=self.image_locks, sdm=self.sdm,
                                leases=self.leases, users=self.storage_users,
                                run_blocking=run_blocking)
        self.overview = SnapshotOverview(volumes=self.volumes, ovf=self.ovf,
                                         run_blocking=run_blocking)
        # VMs: qemu processes on prepared, held storage; found again after a restart.
        self.vm_leases = VmLeases(lookup=self.external_leases.lease_info,
                                  host_id_of=self.monitors.host_id,
                                  geometry_of=lambda sd: self.domains.get(sd).geometry(),
                                  run_blocking=run_blocking)
        host_tls = _host_tls(config)
        self.vms = VmManager(
            run_dir=config.virt_run_dir,
            disks=DiskPreparer(self.domains, self.storage_users), users=self.storage_users,
            leases=self.vm_leases, publish=self.events.publish, run_blocking=run_blocking,
            hotplug_slots=config.virt.hotplug_slots,
            unplug_timeout=config.virt.unplug_timeout, debug_monitor=config.virt.debug_monitor,
            destination_timeout=config.virt.migration_destination_timeout,
            monitor_interval=config.virt.migration_monitor_interval,
            max_outgoing=config.virt.max_outgoing_migrations,
            max_incoming=config.virt.max_incoming_migrations,
            retry_timeout=config.virt.migration_retry_timeout,
            nic_backend=config.virt.nic_backend, peer_tls=host_tls,
            listener=IncomingListener(
                listen=config.virt.migration_listen, default_address=config.rpc.listen,
                ports=range(config.virt.migration_port_min, config.virt.migration_port_max + 1),
                tls=host_tls, run_blocking=run_blocking))
        self.vms_from_ovf = OvfVmSource(ovf=self.ovf, domains=self.domains,
                                        run_blocking=run_blocking)
        self.transfers = ImageTransfers(domains=self.domains, image_locks=self.image_locks,
                                        sdm=self.sdm, ovf=self.ovf, run_blocking=run_blocking)
        self._add_gauges()

    def _add_gauges(self) -> None:
        m = self.metrics
        m.add_gauges("vdsmlite_jobs", "Jobs by state", "state", self.jobs.count_by_status)
        m.add_gauge("vdsmlite_event_subscribers", "Connected event subscribers",
                    lambda: self.events.subscriber_count)
        m.add_gauge("vdsmlite_watchdog_petting",
                    "1 while this host pets its watchdog, 0 once fenced or unarmed",
                    lambda: float(self.watchdog.status()["petting"]))
        m.add_gauge("vdsmlite_watchdog_keepalives", "Watchdog keepalives sent",
                    lambda: float(self.watchdog.keepalives))
        m.add_gauges("vdsmlite_lockspace_acquired",
                     "1 where this host holds its id in the domain's lockspace",
                     "domain", lambda: {sd: float(st["acquired"]) for sd, st in
                                        self.monitors.stats().items()})
        m.add_gauges("vdsmlite_domain_check_delay_seconds",
                     "Last direct-I/O metadata read time, by domain", "domain",
                     lambda: {sd: float(st["delay"]) for sd, st in
                              self.monitors.stats().items()})
        m.add_gauge("vdsmlite_fence_requests_received",
                    "Reset requests for this host taken from storage",
                    lambda: float(len(self.fencing.received)))
        m.add_gauge("vdsmlite_fence_requests_sent",
                    "Reset requests this host sent through storage",
                    lambda: float(len(self.fencing.requests)))
        m.add_gauge("vdsmlite_events_dropped", "Events dropped for slow subscribers",
                    lambda: self.events.dropped_total)

    async def close(self) -> None:
        await self.vms.close()  # VMs keep running; the next start finds them
        await self.jobs.close(grace=self.config.daemon.shutdown_timeout)
        await self.ovf_index.close()  # after the jobs: its builds are jobs
        await self.spm.close()
        await self.leases.close()
        await self.fencing.close()
        await self.monitors.close(leave=self.watchdog.fenced is None)
        await self.watchdog.close()
        # Held activations (loop devices of special LVs) are released on a clean stop.
        await self.run_blocking(self.domains.close)
        await self.run_blocking(self.ovf_workers.close)
        self.executor.shutdown()
        self.receivers.shutdown()


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


def _host_tls(config: Config) -> TlsFiles | None:
    """The host's PKI, beyond serving JSON-RPC: how this agent calls another one
    (VM.migrate), and how its qemu migrates encrypted."""
    r = config.rpc
    if r.tls_cert is None or r.tls_key is None or r.tls_ca is None:
        return None
    return TlsFiles(r.tls_cert, r.tls_key, r.tls_ca)
