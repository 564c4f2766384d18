"""One running VM: its qemu process, its QMP session, its status as VDSM reports it.

Status follows VDSM's words: ``WaitForLaunch`` while qemu starts, ``Up`` or
``Paused`` while it runs (QMP ``STOP``/``RESUME`` events keep it current),
``Down`` once qemu is gone, with ``exitCode`` (0 when we stopped it, 1 when it
died by itself), ``exitMessage`` (for a death, qemu's own last words from its
log) and ``exitReason``. Every change is published as ``|virt|VM_status|<id>``.

A VM never blocks on its qemu for longer than a QMP timeout: stats are taken
with a short timeout and a qemu that does not answer is reported as it was
last seen. Hot plug and unplug are serialised per VM (two plugs must not pick
the same free PCIe port).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from vdsmlite import background, errors
from vdsmlite.blocking import RunBlocking
from vdsmlite.virt import leaseexec, qemu
from vdsmlite.virt.definition import DiskSpec, LunSource, NicSpec, VmDefinition, VolumeSource
from vdsmlite.virt.qmp import QmpError, QmpEvent, QmpSession, open_session

log = logging.getLogger("vdsmlite.virt.vm")

STATS_TIMEOUT = 5.0  # seconds a stats query may wait for qemu


class VmStatus(enum.StrEnum):
    WAIT_FOR_LAUNCH = "WaitForLaunch"
    UP = "Up"
    PAUSED = "Paused"
    DOWN = "Down"
    # Live migration (virt.migration): the VM runs here and is being sent away, or
    # is being received here (qemu -incoming, not running until the source says so).
    MIGRATION_SOURCE = "Migration Source"
    MIGRATION_DESTINATION = "Migration Destination"


class ExitReason(enum.IntEnum):
    """VDSM's ``exitReason`` codes (vdsm.common.define.vmExitReason), the ones we use."""

    SUCCESS = 0
    GENERIC_ERROR = 1
    LOST_QEMU_CONNECTION = 2
    MIGRATION_SUCCEEDED = 4
    ADMIN_SHUTDOWN = 6
    USER_SHUTDOWN = 7
    MIGRATION_FAILED = 8


Publish = Callable[[str, dict[str, Any]], None]
OnDown = Callable[["Vm"], Awaitable[None]]


class Vm:
    def __init__(self, defn: VmDefinition, run_dir: Path, *, publish: Publish,
                 on_down: OnDown, run_blocking: RunBlocking) -> None:
        self.defn = defn
        self.id = defn.vm_id
        self.run_dir = run_dir
        self._publish = publish
        self._on_down = on_down
        self._run_blocking = run_blocking
        self.status = VmStatus.WAIT_FOR_LAUNCH
        self.status_time = time.monotonic()
        self.exit_code: int | None = None
        self.exit_message = ""
        self.exit_reason: ExitReason | None = None
        self.process: qemu.QemuProcess | None = None
        self.session: QmpSession | None = None
        self._watch: asyncio.Task[None] | None = None
        self._destroying = False
        self._devices_lock = asyncio.Lock()
        self._last_block_stats: dict[str, dict[str, Any]] = {}
        # Live migration (virt.migration): the outgoing migration (its status and
        # progress), callbacks that see every QMP event, and how the VM goes Down
        # when its qemu is stopped after a migration.
        self.migration: Any = None
        self.event_hooks: list[Callable[[QmpEvent], None]] = []
        self.exit_as: tuple[int, str, ExitReason] | None = None
        # Live merges (virt.livemerge): the block jobs running, by the engine's jobUUID;
        # set up by the manager (`Merger`), reported as vmJobs.
        self.jobs: dict[str, Any] = {}
        self.merger: Any = None
        # Serialises live snapshots and the start of merges (one chain change at a time).
        self.chain_lock = asyncio.Lock()

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    # --- lifecycle -----------------------------------------------------------------------

    async def launch(self, hotplug_slots: int, *, debug_monitor: bool = False,
                     nic_backend: str = "") -> None:
        """Start qemu for the (prepared) definition and connect to it; `Up`, or `Paused`
        when the request said launchPaused. Raises CannotCreateVM; qemu is then gone."""
        argv = await self._run_blocking(
            lambda: qemu.command_line(self.defn, run_dir=self.run_dir,
                                      hotplug_slots=hotplug_slots,
                                      debug_monitor=debug_monitor,
                                      nic_backend=nic_backend))
        lease = self.defn.lease
        if lease is not None:
            assert lease.path is not None and lease.offset is not None  # resolved at create
            # qemu itself owns the lease, from before its first instruction.
            argv = leaseexec.lease_argv(lease.sd_id, lease.lease_id, lease.path,
                                        lease.offset, argv)
        self.process = await qemu.QemuProcess.start(argv, vm_id=self.id, run_dir=self.run_dir,
                                                    run_blocking=self._run_blocking)
        try:
            self.session = await open_session(self.process, on_event=self._on_event,
                                              run_blocking=self._run_blocking)
            await self._set_links(self.session)
            if not self.defn.launch_paused:
                await self.session.cont()
        except BaseException:
            await self.process.kill(grace=1.0)
            if self.session is not None:
                await self.session.close()
            raise
        self._watch = background.spawn(self._watch_exit(self.process))
        self._set_status(VmStatus.PAUSED if self.defn.launch_paused else VmStatus.UP)

    async def _set_links(self, session: QmpSession) -> None:
        # qemu has no device property for the link state: a NIC the engine wants
        # unplugged from its wire (linkActive false) is set down before the guest runs.
        for nic in self.defn.nics:
            if not nic.link_up:
                await session.execute("set_link", {"name": qemu.nic_id(nic), "up": False})

    async def adopt(self, process: qemu.QemuProcess) -> None:
        """Drive a qemu found running after an agent restart."""
        self.process = process
        self._watch = background.spawn(self._watch_exit(process))
        try:
            self.session = await open_session(process, on_event=self._on_event,
                                              run_blocking=self._run_blocking)
            state = await self.session.query_status()
        except (errors.VdsmError, QmpError) as e:
            log.warning("VM %s: recovered qemu %d does not answer QMP: %s", self.id,
                        process.pid, e)
            return  # its status stays WaitForLaunch until it answers or dies
        self._set_status(VmStatus.UP if state.get("running") else VmStatus.PAUSED)

    async def _watch_exit(self, process: qemu.QemuProcess) -> None:
        ended = await process.wait()
        if self.session is not None:
            await self.session.close()
        if self.exit_as is not None:
            self._down(*self.exit_as)
        elif self.status is VmStatus.MIGRATION_DESTINATION:
            self._down(1, "incoming migration ended: " + ended.describe(),
                       ExitReason.MIGRATION_FAILED)
        elif self._destroying:
            self._down(0, "VM destroyed", ExitReason.ADMIN_SHUTDOWN)
        elif ended.returncode == 0:
            self._down(0, "User shut down from within the guest", ExitReason.USER_SHUTDOWN)
        else:
            self._down(1, ended.describe(), ExitReason.GENERIC_ERROR)
        await self._on_down(self)

    def mark_dead(self, message: str,
                  reason: ExitReason = ExitReason.LOST_QEMU_CONNECTION) -> None:
        """A VM whose qemu was gone when the agent came back (nothing to watch)."""
        self._down(1, message, reason)

    def _down(self, code: int, message: str, reason: ExitReason) -> None:
        self.exit_code, self.exit_message, self.exit_reason = code, message, reason
        self._set_status(VmStatus.DOWN)

    async def destroy(self, grace: float = 10.0) -> None:
        """Stop qemu (QMP quit, then SIGTERM/SIGKILL) and wait until it is gone."""
        self._destroying = True
        if self.process is None:
            return
        if self.process.exited:
            # It exited by itself (an incoming migration that failed): its watcher may
            # still be recording that; let it finish before the VM is forgotten.
            if self._watch is not None:
                await self._watch
            return
        if self.session is not None:
            with contextlib.suppress(QmpError, errors.VdsmError):
                await asyncio.wait_for(self.session.quit(), 2.0)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.process.wait(), 2.0)
        await self.process.kill(grace=grace)
        if self._watch is not None:
            await self._watch

    async def detach(self) -> None:
        """Agent shutdown: stop watching, leave qemu running (found again at start)."""
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
        if self.session is not None:
            await self.session.close()
        if self.process is not None:
            self.process.close()

    async def launch_incoming(self, hotplug_slots: int,
                              listen: Callable[[QmpSession], Awaitable[str]], *,
                              debug_monitor: bool = False, nic_backend: str = "") -> str:
        """Start qemu for the (prepared) definition waiting for an incoming migration
        (``-incoming defer``, then `listen` makes it listen and says at which URI), its
        vCPUs stopped until the migration is finished (`virt.migration`); the URI.
        Raises; qemu is then gone."""
        argv = await self._run_blocking(
            lambda: qemu.command_line(self.defn, run_dir=self.run_dir,
                                      hotplug_slots=hotplug_slots,
                                      debug_monitor=debug_monitor,
                                      nic_backend=nic_backend))
        argv += [*(() if "-S" in argv else ("-S",)), "-incoming", "defer"]
        lease = self.defn.lease
        if lease is not None:
            assert lease.path is not None and lease.offset is not None
            # Registered with sanlock but not holding: the source's qemu holds the lease
            # until the hand-over gives it to this pid (`migration.finish_incoming`).
            argv = leaseexec.lease_argv(lease.sd_id, lease.lease_id, lease.path,
                                        lease.offset, argv, register_only=True)
        self.process = await qemu.QemuProcess.start(argv, vm_id=self.id, run_dir=self.run_dir,
                                                    run_blocking=self._run_blocking)
        try:
            self.session = await open_session(self.process, on_event=self._on_event,
                                              run_blocking=self._run_blocking)
            await self.session.execute("migrate-set-capabilities", {"capabilities": [
                {"capability": "events", "state": True}]})
            uri = await listen(self.session)
        except BaseException:
            await self.process.kill(grace=1.0)
            if self.session is not None:
                await self.session.close()
            raise
        self._watch = background.spawn(self._watch_exit(self.process))
        return uri

    # --- state changes -------------------------------------------------------------------

    def _require_running(self) -> QmpSession:
        if self.status in (VmStatus.MIGRATION_SOURCE, VmStatus.MIGRATION_DESTINATION):
            raise errors.MigrationInProgress(f"VM {self.id} is {self.status}")
        if self.status not in (VmStatus.UP, VmStatus.PAUSED) or self.session is None:
            raise errors.NoSuchVM(f"VM {self.id} is {self.status}")
        return self.session

    async def pause(self) -> None:
        await self._qmp(self._require_running().stop)
        self._set_status(VmStatus.PAUSED)

    async def cont(self) -> None:
        await self._qmp(self._require_running().cont)
        self._set_status(VmStatus.UP)

    async def _qmp(self, call: Callable[[], Awaitable[Any]]) -> Any:
        try:
            return await call()
        except QmpError as e:
            raise errors.UnexpectedError(f"VM {self.id}: {e}") from e

    def _on_event(self, event: QmpEvent) -> None:
        for hook in self.event_hooks:
            hook(event)
        if event.name == "STOP" and self.status is VmStatus.UP:
            self._set_status(VmStatus.PAUSED)
        elif event.name == "RESUME" and self.status is VmStatus.PAUSED:
            self._set_status(VmStatus.UP)

    def announce(self) -> None:
        """Publish the status as it is (a new VM's WaitForLaunch)."""
        self._publish(f"|virt|VM_status|{self.id}", {self.id: self.short_status()})

    def set_status(self, status: VmStatus) -> None:
        """Change the status (migration states); published as every change is."""
        self._set_status(status)

    def _set_status(self, status: VmStatus) -> None:
        if status is self.status:
            return
        self.status = status
        self.status_time = time.monotonic()
        log.info("VM %s is %s%s", self.id, status,
                 f" ({self.exit_message})" if status is VmStatus.DOWN else "")
        self.announce()

    # --- disks ---------------------------------------------------------------------------

    async def hotplug(self, disk: DiskSpec) -> None:
        async with self._devices_lock:
            session = self._require_running()
            if any(d.name == disk.name for d in self.defn.disks):
                raise errors.HotplugDiskFailed(f"VM {self.id} already has a disk {disk.name}")
            await session.plug_disk(disk)
            self.defn.disks.append(disk)

    async def hotunplug(self, name: str, timeout: float) -> DiskSpec:
        async with self._devices_lock:
            session = self._require_running()
            disk = next((d for d in self.defn.disks if d.name == name), None)
            if disk is None:
                raise errors.HotunplugDiskFailed(f"VM {self.id} has no disk {name}")
            await session.unplug_disk(disk, timeout=timeout)
            self.defn.disks.remove(disk)
            return disk

    # --- reports -------------------------------------------------------------------------

    def short_status(self) -> dict[str, Any]:
        out: dict[str, Any] = {"vmId": self.id, "status": str(self.status),
                               "statusTime": str(int(self.status_time * 1000))}
        if self.status is VmStatus.DOWN:
            out.update(exitCode=self.exit_code, exitMessage=self.exit_message,
                       exitReason=int(self.exit_reason or 0))
        return out

    def info(self) -> dict[str, Any]:
        """VM.create's / Host.getVMFullList's view: the definition as it runs."""
        d = self.defn
        return {
            **self.short_status(),
            "vmName": d.name,
            "memSize": d.memory_mib,
            "smp": str(d.vcpus),
            "maxVCpus": str(d.max_vcpus or d.vcpus),
            "cpuType": d.cpu_model or "",
            "emulatedMachine": d.machine or "q35",
            "launchPaused": str(d.launch_paused).lower(),
            "pid": str(self.pid or 0),
            "devices": ([_disk_info(disk) for disk in d.disks] +
                        [_nic_info(nic) for nic in d.nics] + _other_devices_info(d) +
                        _lease_info(d)),
            "ignoredDevices": list(d.ignored),
        }

    async def stats(self) -> dict[str, Any]:
        """VM.getStats: status, pid and per-disk figures from ``query-blockstats``."""
        out = {**self.short_status(), "vmName": self.defn.name, "pid": str(self.pid or 0),
               "elapsedTime": str(int(time.monotonic() - self.status_time))}
        if self.status in (VmStatus.UP, VmStatus.PAUSED) and self.session is not None:
            try:
                raw = await asyncio.wait_for(self.session.query_blockstats(), STATS_TIMEOUT)
                self._last_block_stats = _block_stats(raw)
            except (QmpError, TimeoutError) as e:
                log.debug("VM %s: no fresh block stats: %s", self.id, e)
        if self.migration is not None and self.migration.active:
            out["migrationProgress"] = self.migration.progress
        # Block jobs as VDSM reports them; their progress is kept by their own task.
        out["vmJobs"] = {job_id: job.info() for job_id, job in self.jobs.items()}
        out["disks"] = {disk.name: {**_disk_info(disk),
                                    **self._last_block_stats.get(disk.name, {})}
                        for disk in self.defn.disks}
        # VDSM's per-NIC entry, by NIC name; no traffic counters (no host-side tap
        # is ours to read).
        out["network"] = {qemu.nic_id(nic): {
            "name": qemu.nic_id(nic), "macAddr": nic.mac, "network": nic.network,
            "nicModel": str(nic.model), "state": "up" if nic.link_up else "down"}
            for nic in self.defn.nics}
        return out


def _lease_info(defn: VmDefinition) -> list[dict[str, Any]]:
    """The VM lease as VDSM lists it among the devices."""
    lease = defn.lease
    if lease is None:
        return []
    return [{"type": "lease", "device": "lease", "sd_id": lease.sd_id,
             "lease_id": lease.lease_id, "path": lease.path, "offset": lease.offset}]


def _disk_info(disk: DiskSpec) -> dict[str, Any]:
    src = disk.source
    out: dict[str, Any] = {"type": "disk", "device": str(disk.device), "name": disk.name,
                           "iface": str(disk.bus), "index": disk.index,
                           "format": str(disk.format), "path": disk.path or "",
                           "readonly": str(disk.readonly).lower(),
                           "shared": str(disk.shared).lower()}
    if isinstance(src, LunSource):
        out["GUID"] = src.guid
    elif isinstance(src, VolumeSource):
        out.update(poolID=src.pool_id, domainID=src.domain_id, imageID=src.image_id,
                   volumeID=src.volume_id, volumeChain=list(disk.chain))
    if disk.serial is not None:
        out["serial"] = disk.serial
    if disk.boot_order is not None:
        out["bootOrder"] = str(disk.boot_order)
    if disk.device_id is not None:
        out["deviceId"] = disk.device_id
    return out


def _nic_info(nic: NicSpec) -> dict[str, Any]:
    """A NIC in VDSM's words (its interface device keys)."""
    out: dict[str, Any] = {"type": "interface", "device": "bridge", "name": qemu.nic_id(nic),
                           "alias": qemu.nic_id(nic), "macAddr": nic.mac,
                           "nicModel": str(nic.model), "network": nic.network,
                           "linkActive": str(nic.link_up).lower()}
    if nic.boot_order is not None:
        out["bootOrder"] = str(nic.boot_order)
    if nic.device_id is not None:
        out["deviceId"] = nic.device_id
    return out


def _other_devices_info(d: VmDefinition) -> list[dict[str, Any]]:
    """RNG, balloon, watchdog and console as VDSM lists them."""
    out: list[dict[str, Any]] = []
    if d.rng is not None:
        out.append({"type": "rng", "device": "virtio", "model": "virtio", "alias": "rng0",
                    "specParams": {"source": str(d.rng.source)}})
    if d.balloon is not None:
        out.append({"type": "balloon", "device": "memballoon", "alias": "balloon0",
                    "specParams": {"model": "virtio"}})
    if d.watchdog is not None:
        out.append({"type": "watchdog", "device": "watchdog", "alias": "watchdog0",
                    "specParams": {"model": d.watchdog.model,
                                   "action": str(d.watchdog.action)}})
    if d.console is not None:
        out.append({"type": "console", "device": "console", "alias": "console0",
                    "specParams": {"consoleType": str(d.console.target)}})
    return out


def _block_stats(raw: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """query-blockstats by disk name: qemu names the device ``disk-<name>``."""
    out: dict[str, dict[str, Any]] = {}
    for entry in raw:
        qdev = entry.get("qdev") or entry.get("device") or ""
        name = qdev.rsplit("/", 2)[-2] if qdev.endswith("/virtio-backend") else qdev
        if not name.startswith("disk-"):
            continue
        st = entry.get("stats", {})
        out[name[len("disk-"):]] = {
            "readBytes": str(st.get("rd_bytes", 0)),
            "writtenBytes": str(st.get("wr_bytes", 0)),
            "readOps": str(st.get("rd_operations", 0)),
            "writeOps": str(st.get("wr_operations", 0)),
            "flushOps": str(st.get("flush_operations", 0)),
            "readLatency": str(st.get("rd_total_time_ns", 0)),
            "writeLatency": str(st.get("wr_total_time_ns", 0)),
        }
    return out
