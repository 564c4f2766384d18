"""All VMs of this host: create, destroy, hot plug, and finding them again after a restart.

Each VM has a directory ``<virt run dir>/<vmId>/``: qemu's QMP socket,
pidfile and log, and ``vm.json``, the definition as it runs (disks with the
paths and chains they were prepared with), written durably before qemu
starts and after every hot plug. qemu runs in its own session, so it keeps
running when the agent stops or dies; at start `recover` reads every
``vm.json``, finds the qemu (`QemuProcess.find`), reconnects QMP and takes
the VM's storage again (refcounts and holds), so the VM is reported as
before. A VM whose qemu is gone is reported Down with what is known, and its
storage released. Until recovery is done, VM verbs answer 99.

``VM.create`` prepares and holds the storage before it answers: a refusal
(unknown GUID, a LUN that is a PV, storage another VM writes, ...) leaves
nothing prepared and starts nothing. qemu then starts in the background
(``WaitForLaunch`` -> ``Up``/``Paused``, or ``Down`` with qemu's own words).
A VM stays listed after it went Down until ``VM.destroy``, as with VDSM.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import functools
import json
import logging
import shutil
from pathlib import Path
from typing import Any

from vdsmlite import errors
from vdsmlite.blocking import RunBlocking
from vdsmlite.client import TlsFiles
from vdsmlite.fsutil import write_file_durably
from vdsmlite.ids import parse_uuid
from vdsmlite.storage.users import StorageUsers
from vdsmlite.virt import livemerge, migration, migtransport, qemu, snapshot
from vdsmlite.virt.definition import DiskSpec, VmDefinition, VolumeSource
from vdsmlite.virt.disks import DiskPreparer, key_of
from vdsmlite.virt.leases import VmLeases
from vdsmlite.virt.migslots import Slots
from vdsmlite.virt.vm import ExitReason, Publish, Vm, VmStatus

log = logging.getLogger("vdsmlite.virt.manager")

DEFINITION = "vm.json"


class ManagerState(enum.StrEnum):
    RECOVERING = "recovering"
    READY = "ready"
    CLOSED = "closed"


class VmManager:
    def __init__(self, *, run_dir: Path, disks: DiskPreparer, users: StorageUsers,
                 leases: VmLeases, publish: Publish, run_blocking: RunBlocking,
                 hotplug_slots: int, unplug_timeout: float, debug_monitor: bool = False,
                 nic_backend: str = "", peer_tls: TlsFiles | None = None,
                 destination_timeout: float = 21600.0, monitor_interval: float = 10.0,
                 max_outgoing: int = 2, max_incoming: int = 2, retry_timeout: float = 10.0,
                 listener: migtransport.IncomingListener) -> None:
        self.run_dir = run_dir
        self._disks = disks
        self._leases = leases
        self._users = users
        self._publish = publish
        self._run_blocking = run_blocking
        self._hotplug_slots = hotplug_slots
        self._unplug_timeout = unplug_timeout
        self._debug_monitor = debug_monitor
        self._nic_backend = nic_backend
        # How VM.migrate talks to the destination agent, and its qemu to the
        # destination's in an encrypted migration: the host's PKI.
        self._peer_tls = peer_tls
        self._listener = listener  # where an incoming migration's qemu listens
        self._destination_timeout = destination_timeout
        self._monitor_interval = monitor_interval  # of outgoing migrations' schedules
        # How many migrations at once (`virt.migslots`).
        self._outgoing_slots = Slots(max_outgoing)
        self._max_incoming = max_incoming
        self._retry_timeout = retry_timeout
        self._vms: dict[str, Vm] = {}
        self._launches: dict[str, asyncio.Task[None]] = {}
        # Incoming migrations: the task that gives up on each (see `_expire_incoming`).
        self._incoming: dict[str, asyncio.Task[None]] = {}
        self.state = ManagerState.RECOVERING

    def require_ready(self) -> None:
        """99 while VMs are being recovered, 443 once shutting down."""
        if self.state is ManagerState.RECOVERING:
            raise errors.RecoveryInProgress()
        if self.state is ManagerState.CLOSED:
            raise errors.ActionStopped()

    def get(self, vm_id: str) -> Vm:
        self.require_ready()
        vm = self._vms.get(vm_id)
        if vm is None:
            raise errors.NoSuchVM(vm_id)
        return vm

    def vms(self, vm_ids: list[str] | None = None) -> list[Vm]:
        self.require_ready()
        wanted = set(vm_ids or ())
        return [vm for vid, vm in sorted(self._vms.items()) if not wanted or vid in wanted]

    # --- create / destroy ------------------------------------------------------------

    async def create(self, defn: VmDefinition) -> dict[str, Any]:
        self.require_ready()
        if defn.vm_id in self._vms:
            raise errors.VMExists(defn.vm_id)
        vm_dir = self._vm_dir(defn.vm_id)
        vm = Vm(defn, vm_dir, publish=self._publish, on_down=self._vm_down,
                run_blocking=self._run_blocking)
        # Claimed before the first await: a second create of this id is refused (4).
        self._vms[defn.vm_id] = vm
        try:
            if defn.lease is not None:
                defn.lease = await self._leases.resolve(defn.lease)
            # One trip to the executor: under a burst of creates, every hop would queue
            # behind the other VMs' work.
            await self._run_blocking(self._prepare, vm)
        except BaseException:
            del self._vms[defn.vm_id]
            raise
        vm.announce()
        task = asyncio.create_task(self._launch(vm))
        self._launches[vm.id] = task
        task.add_done_callback(lambda _: self._launches.pop(vm.id, None))
        return vm.info()

    def _prepare(self, vm: Vm, *, incoming: bool = False) -> None:
        """Blocking: the VM's dir, its storage prepared and held, vm.json; or nothing."""
        defn = vm.defn
        if defn.lease is not None and not incoming:
            # First: a VM another host runs is refused before anything is touched.
            self._leases.check_startable(defn.lease)
        machine, note = qemu.resolve_machine(defn.machine)
        if note is not None:
            defn.machine = machine
            defn.ignored.append(note)
        cpu_model, note = qemu.resolve_cpu_model(defn.cpu_model)
        if note is not None:
            defn.cpu_model = cpu_model
            if cpu_model is None:
                defn.cpu_flags = []  # flags of a model that does not run here
            defn.ignored.append(note)
        self._make_dir(vm.run_dir)
        try:
            self._disks.prepare(defn.vm_id, defn.disks)
            try:
                self._save(vm)
            except BaseException:
                self._disks.release(defn.vm_id, defn.disks)
                raise
        except BaseException:
            shutil.rmtree(vm.run_dir, ignore_errors=True)
            raise

    async def _launch(self, vm: Vm) -> None:
        try:
            await vm.launch(self._hotplug_slots, debug_monitor=self._debug_monitor,
                            nic_backend=self._nic_backend)
        except Exception as e:
            message = e.message if isinstance(e, errors.VdsmError) else f"{e!r}"
            log.error("VM %s did not start: %s", vm.id, message)
            vm.mark_dead(message)
            await self._vm_down(vm)

    async def _vm_down(self, vm: Vm) -> None:
        """qemu is gone: release the VM's storage, remember why it went Down."""
        self._stop_expiry(vm.id)
        await self._run_blocking(self._disks.release, vm.id, vm.defn.disks)
        with contextlib.suppress(OSError):
            await self._run_blocking(self._save, vm)

    async def destroy(self, vm_id: str) -> None:
        """Stop the VM (if it runs), release its storage, forget it."""
        vm = self.get(vm_id)
        if vm.migration is not None and vm.migration.active:
            # An outgoing migration stops first (the VM stays here and is destroyed).
            with contextlib.suppress(errors.VdsmError):
                await vm.migration.cancel()
            await vm.migration.wait()
        launching = self._launches.get(vm_id)
        if launching is not None:
            # A qemu being started is killed by the cancelled start itself.
            launching.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await launching
        if vm.merger is not None:
            await vm.merger.close()  # a merge ends with its qemu; nothing to follow
        await vm.destroy()
        if vm.status is not VmStatus.DOWN:
            # It never started (destroyed while launching): nothing watched its exit.
            vm.mark_dead("VM destroyed")
            await self._vm_down(vm)
        self._vms.pop(vm_id, None)
        await self._run_blocking(shutil.rmtree, vm.run_dir, True)

    # --- hot plug --------------------------------------------------------------------

    async def hotplug(self, vm_id: str, disk: DiskSpec) -> dict[str, Any]:
        vm = self.get(vm_id)
        await self._run_blocking(self._disks.prepare, vm_id, [disk])
        try:
            await vm.hotplug(disk)
        except BaseException:
            await self._run_blocking(self._disks.release, vm_id, [disk])
            raise
        await self._run_blocking(self._save, vm)
        return vm.info()

    async def hotunplug(self, vm_id: str, disk: DiskSpec) -> dict[str, Any]:
        vm = self.get(vm_id)
        removed = await vm.hotunplug(disk.name, self._unplug_timeout)
        await self._run_blocking(self._save, vm)
        await self._run_blocking(self._disks.release, vm_id, [removed])
        return vm.info()

    # --- live snapshot and merge (virt.snapshot, virt.livemerge) ---------------------

    async def snapshot(self, vm_id: str, snap_drives: list[dict[str, Any]],
                       snap_memory: str | None) -> None:
        """VM.snapshot: every listed volume drive moves to its new leaf, or none does."""
        vm = self.get(vm_id)
        if snap_memory:
            raise errors.SnapshotFailed("memory snapshots are not supported")
        requested = snapshot.parse_drives(snap_drives)
        async with vm.chain_lock:
            session = vm._require_running()
            if vm.jobs:
                raise errors.SnapshotFailed(f"VM {vm_id} has a block job running")
            drives = []
            for disk, new_vol in snapshot.match_drives(vm.defn.disks, requested):
                assert isinstance(disk.source, VolumeSource)
                dom = await self._run_blocking(self._disks.domain, disk.source.domain_id)
                drives.append(snapshot.SnapDrive(disk, dom, new_vol))
            if not drives:
                return
            await self._run_blocking(snapshot.prepare, drives)
            try:
                await snapshot.switch(session, drives)
            except BaseException:
                await self._run_blocking(snapshot.teardown, drives)
                raise
            snapshot.commit_definition(drives)
            await self._run_blocking(self._save, vm)
        log.info("VM %s: live snapshot of %s", vm_id,
                 ", ".join(f"{d.disk.name} -> {d.new_vol}" for d in drives))
        vm.announce()

    def _merger(self, vm: Vm) -> livemerge.Merger:
        if vm.merger is None:
            vm.merger = livemerge.Merger(
                vm_id=vm.id, session=lambda: vm.session, disks=lambda: vm.defn.disks,
                domain=self._disks.domain, jobs=vm.jobs,
                save=lambda: self._save_async(vm), run_blocking=self._run_blocking,
                publish=vm.announce)
            vm.event_hooks.append(vm.merger.on_event)
        merger: livemerge.Merger = vm.merger
        return merger

    async def merge(self, vm_id: str, drive: dict[str, Any], *, base: str, top: str,
                    bandwidth: int, job_id: str) -> None:
        vm = self.get(vm_id)
        disk = next((d for d in vm.defn.disks if isinstance(d.source, VolumeSource)
                     and d.source.image_id == drive.get("imageID")
                     and d.source.domain_id == drive.get("domainID")), None)
        if disk is None:
            raise errors.MergeFailed(f"VM {vm_id} has no disk of image "
                                     f"{drive.get('imageID')}")
        async with vm.chain_lock:
            vm._require_running()
            await self._merger(vm).start(disk, base, top, bandwidth, job_id)

    async def merge_abort(self, vm_id: str, job_id: str) -> None:
        vm = self.get(vm_id)
        await self._merger(vm).abort(job_id)

    async def reconcile_chain(self, sd_id: str, img_id: str, leaf: str) -> list[str]:
        """Image.reconcileVolumeChain: the chain as qemu runs it when a VM here runs
        the image (metadata of volumes left out of it marked ILLEGAL), else the chain
        as the volumes' qcow2 headers say it."""
        for vm in self._vms.values():
            for disk in vm.defn.disks:
                src = disk.source
                if isinstance(src, VolumeSource) and src.image_id == img_id and \
                        src.domain_id == sd_id and vm.session is not None and \
                        vm.status in (VmStatus.UP, VmStatus.PAUSED):
                    chain = await livemerge.qemu_chain(vm.session, disk)
                    if any(j.img_id == img_id for j in vm.jobs.values()):
                        return chain  # a merge finishing: it fixes the metadata itself
                    dom = await self._run_blocking(self._disks.domain, sd_id)
                    await self._run_blocking(livemerge.reconcile_metadata, dom, img_id,
                                             leaf, chain)
                    return chain
        dom = await self._run_blocking(self._disks.domain, sd_id)
        return list(await self._run_blocking(livemerge.chain_from_headers, dom, img_id, leaf))

    # --- live migration (virt.migration) -------------------------------------------------

    async def migrate(self, vm_id: str, params: dict[str, Any]) -> None:
        """VM.migrate: check, then migrate in the background."""
        vm = self.get(vm_id)
        parsed = migration.parse_params(params)
        if (vm.migration is not None and vm.migration.active) or \
                vm.status in (VmStatus.MIGRATION_SOURCE, VmStatus.MIGRATION_DESTINATION):
            raise errors.MigrationInProgress(f"VM {vm_id} is {vm.status}")
        if vm.status not in (VmStatus.UP, VmStatus.PAUSED) or vm.session is None:
            raise errors.NoSuchVM(f"VM {vm_id} is {vm.status}")
        if parsed.encrypted and self._peer_tls is None:
            raise errors.InvalidParameter("encrypted: this host has no TLS ([rpc] tls_cert, "
                                          "tls_key, tls_ca) to migrate with")
        peer = migration.Peer(parsed.host, parsed.port, self._peer_tls)
        vm.migration = migration.SourceMigration(
            vm, parsed, peer, run_blocking=self._run_blocking, publish=self._publish,
            save=self._save_async, on_done=self._migrated, leases=self._leases,
            monitor_interval=self._monitor_interval, slots=self._outgoing_slots,
            retry_timeout=self._retry_timeout)
        vm.migration.start()

    async def _save_async(self, vm: Vm) -> None:
        await self._run_blocking(self._save, vm)

    async def _migrated(self, vm: Vm) -> None:
        """The VM runs on the destination: stop qemu here (Down, exitReason 4, storage
        released by `_vm_down`); listed until VM.destroy, as with VDSM."""
        await vm.destroy()

    async def migrate_cancel(self, vm_id: str, timeout: float = 60.0) -> None:
        vm = self.get(vm_id)
        if vm.migration is None or not vm.migration.active:
            raise errors.MigrationCancelationFailed(f"VM {vm_id}")
        await vm.migration.cancel()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(vm.migration.wait(), timeout)

    async def migrate_change_params(self, vm_id: str, params: dict[str, Any]) -> None:
        vm = self.get(vm_id)
        bandwidth = migration.parse_bandwidth(params)
        if vm.migration is None or not vm.migration.active:
            raise errors.MigrationNotInProgress(f"VM {vm_id}")
        await vm.migration.change_bandwidth(bandwidth)

    def migration_status(self, vm_id: str) -> dict[str, Any]:
        vm = self.get(vm_id)
        if vm.migration is None:
            return {"status": {"code": 0, "message": "Migration not in progress"},
                    "progress": 0}
        status: dict[str, Any] = vm.migration.status()
        return status

    async def migration_create(self, defn: VmDefinition, incoming: migtransport.Incoming,
                               incoming_limit: int = 0) -> dict[str, Any]:
        """VM.migrationCreate: storage prepared and held as for VM.create (a refusal
        leaves nothing), then qemu listening for the migration as `incoming` asks; or
        nothing at all. `incoming_limit` > 0: the new bound on incoming migrations
        here, this one included (82 beyond it)."""
        self.require_ready()
        if incoming_limit > 0:
            self._max_incoming = incoming_limit
        if defn.vm_id in self._vms:
            raise errors.VMExists(defn.vm_id)
        receiving = sum(vm.status is VmStatus.MIGRATION_DESTINATION
                        for vm in self._vms.values())
        if receiving >= self._max_incoming:
            raise errors.MigrationLimitExceeded(
                f"receiving {receiving} of at most {self._max_incoming}")
        self._listener.check(incoming)
        vm = Vm(defn, self._vm_dir(defn.vm_id), publish=self._publish, on_down=self._vm_down,
                run_blocking=self._run_blocking)
        vm.status = VmStatus.MIGRATION_DESTINATION  # saved so in vm.json
        self._vms[defn.vm_id] = vm
        try:
            if defn.lease is not None:
                # Where the lease is on this host; the source's qemu holds it until the
                # hand-over (`migration.finish_incoming`), so it is not checked free.
                defn.lease = await self._leases.resolve(defn.lease)
            await self._run_blocking(lambda: self._prepare(vm, incoming=True))
        except BaseException:
            del self._vms[defn.vm_id]
            raise
        vm.announce()
        try:
            uri = await vm.launch_incoming(
                self._hotplug_slots,
                functools.partial(self._listener.listen, incoming=incoming, run_dir=vm.run_dir),
                debug_monitor=self._debug_monitor, nic_backend=self._nic_backend)
        except BaseException as e:
            message = e.message if isinstance(e, errors.VdsmError) else f"{e!r}"
            log.error("VM %s: cannot receive the migration: %s", vm.id, message)
            vm.mark_dead(message, ExitReason.MIGRATION_FAILED)
            await self._vm_down(vm)
            self._vms.pop(vm.id, None)
            await self._run_blocking(shutil.rmtree, vm.run_dir, True)
            if isinstance(e, errors.VdsmError | asyncio.CancelledError):
                raise
            raise errors.MigrationError(message) from e
        self._incoming[vm.id] = asyncio.create_task(self._expire_incoming(vm))
        return {"migrationPort": 0, "params": vm.info(), "migrationUri": uri}

    async def _expire_incoming(self, vm: Vm) -> None:
        """An incoming migration the source never finishes (its agent or host gone,
        or no migration ever sent) would hold a paused qemu and the VM's storage here
        for good. After `destination_timeout` the copy is destroyed, as VDSM does
        after its migration_destination_timeout: never run, it is not the VM; the
        source's copy is (a late VM.migrationFinish gets 12, or 1 once the engine
        destroyed the Down VM, and the source keeps or resumes its own)."""
        await asyncio.sleep(self._destination_timeout)
        self._incoming.pop(vm.id, None)
        if self._vms.get(vm.id) is not vm or vm.status is not VmStatus.MIGRATION_DESTINATION:
            return
        log.error("VM %s: the incoming migration did not finish within %.0f s: destroying "
                  "the copy here", vm.id, self._destination_timeout)
        vm.exit_as = (1, "Migration Error - Timed out (the source did not finish the "
                      "migration)", ExitReason.MIGRATION_FAILED)
        await vm.destroy(grace=2.0)

    def _stop_expiry(self, vm_id: str) -> None:
        task = self._incoming.pop(vm_id, None)
        if task is not None and task is not asyncio.current_task():
            task.cancel()

    async def migration_finish(self, vm_id: str, resume: bool) -> dict[str, Any]:
        vm = self.get(vm_id)
        # Never destroyed while it is being finished (it may run already); a finish
        # that fails leaves it to the source's VM.destroy, or to a new expiry.
        self._stop_expiry(vm_id)
        try:
            await migration.finish_incoming(vm, resume, self._leases, self._run_blocking)
        except BaseException:
            if self._vms.get(vm_id) is vm and vm.status is VmStatus.MIGRATION_DESTINATION:
                self._incoming[vm_id] = asyncio.create_task(self._expire_incoming(vm))
            raise
        await self._run_blocking(self._save, vm)
        return vm.info()

    # --- recovery ----------------------------------------------------------------------

    async def recover(self) -> None:
        """Find the VMs the previous agent ran (see the module docstring); then serve."""
        found = await self._run_blocking(self._read_saved)
        dead: list[Vm] = []
        for defn, saved in found:
            vm = Vm(defn, self._vm_dir(defn.vm_id), publish=self._publish,
                    on_down=self._vm_down, run_blocking=self._run_blocking)
            self._vms[defn.vm_id] = vm
            process = None
            if saved.get("status") != VmStatus.DOWN:
                process = await qemu.QemuProcess.find(defn.vm_id, vm.run_dir,
                                                      run_blocking=self._run_blocking)
            if process is None:
                tail = await self._run_blocking(qemu.read_log_tail, vm.run_dir)
                vm.mark_dead(saved.get("exitMessage") or
                             "qemu exited while the agent was away" +
                             (f": {tail.strip()}" if tail.strip() else ""))
                dead.append(vm)
                continue
            # The storage first: refcounts and holds exactly as before the restart.
            await self._run_blocking(self._adopt_storage, vm)
            await vm.adopt(process)
            if saved.get("status") == VmStatus.MIGRATION_SOURCE:
                await migration.recover_source(vm)
            elif saved.get("status") == VmStatus.MIGRATION_DESTINATION:
                await migration.recover_destination(vm)
            self._recover_jobs(vm, saved.get("jobs") or [])
            log.info("recovered VM %s (qemu %d): %s", vm.id, process.pid, vm.status)
        for vm in dead:
            # Only what no recovered VM holds: a shared disk stays with the living.
            await self._run_blocking(self._release_unheld, vm)
            with contextlib.suppress(OSError):
                await self._run_blocking(self._save, vm)
        self.state = ManagerState.READY
        log.info("VM recovery done: %d VMs, %d down", len(self._vms), len(dead))

    def _recover_jobs(self, vm: Vm, saved: list[dict[str, Any]]) -> None:
        """Merges that ran when the agent stopped: followed again from qemu."""
        merger = self._merger(vm)
        for raw in saved:
            try:
                job = livemerge.MergeJob.from_dict(raw)
            except (KeyError, TypeError, ValueError) as e:
                log.error("VM %s: unreadable saved job %r: %s", vm.id, raw, e)
                continue
            vm.jobs[job.id] = job
            merger.follow(job)
            log.info("VM %s: following merge %s again", vm.id, job.id)

    def _adopt_storage(self, vm: Vm) -> None:
        for disk in vm.defn.disks:
            try:
                self._disks.prepare(vm.id, [disk])
            except errors.VdsmError as e:
                # The VM runs on it anyway: hold it so nobody tears it down under qemu.
                log.error("VM %s: cannot re-prepare disk %s after restart: %s", vm.id,
                          disk.name, e)
                self._disks.adopt(vm.id, [disk])

    def _release_unheld(self, vm: Vm) -> None:
        """Tear down what the previous agent prepared for a VM that died meanwhile.

        This agent never prepared it, so first prepare it again (the activation
        layer then knows exactly which device maps each LV), then release it: only
        those devices are removed, never one a stale link happens to name."""
        for disk in vm.defn.disks:
            if self._users.owners(key_of(disk)):
                continue  # a recovered VM still runs on it
            try:
                self._disks.prepare(vm.id, [disk])
            except errors.VdsmError as e:
                log.warning("VM %s: disk %s not released (%s)", vm.id, disk.name, e)
                continue
            self._disks.release(vm.id, [disk])

    def _read_saved(self) -> list[tuple[VmDefinition, dict[str, Any]]]:
        out = []
        try:
            entries = sorted(self.run_dir.iterdir())
        except FileNotFoundError:
            return []
        for entry in entries:
            if parse_uuid(entry.name) is None or not entry.is_dir():
                continue
            try:
                saved = json.loads((entry / DEFINITION).read_text())
                defn = VmDefinition.from_dict(saved["definition"])
            except (OSError, ValueError, KeyError, TypeError) as e:
                # Nothing to drive it with; its qemu (if any) is left alone.
                log.error("cannot recover VM from %s: %s", entry, e)
                continue
            out.append((defn, saved))
        return out

    # --- files -------------------------------------------------------------------------

    def _vm_dir(self, vm_id: str) -> Path:
        return self.run_dir / vm_id

    @staticmethod
    def _make_dir(vm_dir: Path) -> None:
        vm_dir.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        vm_dir.mkdir(mode=0o700)

    @staticmethod
    def _save(vm: Vm) -> None:
        state: dict[str, Any] = {"definition": vm.defn.to_dict(), "status": str(vm.status)}
        running = [job.to_dict() for job in list(vm.jobs.values())
                   if job.state not in ("done", "failed")]
        if running:
            state["jobs"] = running
        if vm.status is VmStatus.DOWN:
            state.update(exitCode=vm.exit_code, exitMessage=vm.exit_message)
        write_file_durably(vm.run_dir / DEFINITION, json.dumps(state, indent=1) + "\n")

    async def close(self) -> None:
        """Agent shutdown: VMs keep running; starts in flight are abandoned (their
        qemu is killed by `QemuProcess.start` when cancelled)."""
        self.state = ManagerState.CLOSED
        for task in list(self._launches.values()):
            task.cancel()
        for vm_id in list(self._incoming):
            # The restarted agent decides about incoming VMs (recover_destination).
            self._stop_expiry(vm_id)
        for vm in self._vms.values():
            # Outgoing migrations are abandoned: the VM keeps running here.
            if vm.migration is not None and vm.migration.task is not None:
                vm.migration.task.cancel()
                await vm.migration.wait()
        for vm in self._vms.values():
            if vm.merger is not None:
                await vm.merger.close()  # qemu's jobs go on; found again at start
            await vm.detach()
