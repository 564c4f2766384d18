"""Live migration of a VM between two vdsmlite agents (shared storage, memory only).

Verbs (VDSM's names; `vdsmlite.api.vm`):

* ``VM.migrate(vmID, params)`` on the source: checks the params (``dst`` is the
  destination agent, ``host[:port]``, port 54321 by default; ``dstqemu`` the
  destination's address for qemu's stream, ``dst``'s host by default; ``encrypted``
  for TLS) and answers at once (``true``: VDSM's Bridge drops the ``{"status",
  "progress"}`` body); the migration then runs in the background
  (`SourceMigration`).
* ``VM.migrationCreate(vmID, params)`` on the destination, called by the source
  agent: prepares the storage exactly as VM.create does (a definition it cannot
  prepare, e.g. a GUID it does not see, is refused before anything moves), starts
  qemu stopped with ``-incoming defer``, makes it listen on a TCP port (TLS if
  encrypted: `virt.migtransport`), and answers ``{"migrationPort": 0, "params":
  <the VM>, "migrationUri": "tcp:<address>:<port>"}``. Status ``Migration
  Destination``.
* ``VM.migrationFinish(vmID, resume)`` on the destination (vdsmlite's own verb,
  VDSM lets libvirt do this): after the incoming migration completed, run the VM
  (``cont``) if it ran on the source, else keep it paused. Up / Paused.
* ``VM.migrateCancel(vmID)`` and ``VM.getMigrationStatus(vmID)`` on the source;
  ``migrationProgress`` in VM.getStats while it migrates.

Source state machine (`SourceMigration.state`)::

    starting [-> waiting (this host sends as many migrations as it may, or the
                          destination takes no more: `virt.migslots`)]
             -> preparing (VM.migrationCreate on the destination)
             -> migrating (QMP migrate, followed by MIGRATION events and query-migrate;
                           the convergence schedule, `virt.convergence`, acts on
                           qemu's passes: downtime steps, abort)
             -> completing (source qemu paused by qemu at completion;
                            [lease hand-over point]; VM.migrationFinish)
             -> done (source qemu stopped, storage released, VM Down, exitReason 4)
    any step -> aborting: QMP migrate_cancel if needed, the VM resumed on the
                source if the migration paused it, status back to Up/Paused, and the
                destination's VM destroyed (VM.destroy: qemu killed, storage released,
                VM forgotten)
             -> failed | cancelled, only once all that is done: a client that reads
                the outcome reads the VM's own status as it stays.

The VM's status is ``Migration Source`` from start to end; every change is a
``|virt|VM_status|`` event, progress a ``|virt|VM_migration_status|`` event.

Never two running copies: the destination qemu runs only once the source agent
says so (`finish`), after the source qemu was paused by qemu at completion. If
the source cannot tell whether the destination ran it (the destination agent
unreachable at that point), the source keeps its qemu paused (status Paused) and
says so in the migration status: the engine decides. Agent restarts: see
`recover_source` and `recover_destination`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from dataclasses import dataclass
from typing import Any

from vdsmlite import errors
from vdsmlite.blocking import RunBlocking
from vdsmlite.client import Client, ClientError, ServerError, TlsFiles
from vdsmlite.virt import convergence, migtransport
from vdsmlite.virt.definition import VmDefinition
from vdsmlite.virt.leases import VmLeases
from vdsmlite.virt.migslots import Slots
from vdsmlite.virt.qmp import QmpError, QmpEvent
from vdsmlite.virt.vm import ExitReason, Vm, VmStatus

log = logging.getLogger("vdsmlite.virt.migration")

DEFAULT_PORT = 54321  # VDSM's management port: a dst without a port
DEFAULT_MAX_BANDWIDTH = 52  # MiB/s, VDSM's migration_max_bandwidth
PEER_TIMEOUT = 60.0  # one call to the destination agent
FINISH_RETRY = 30.0  # seconds the source keeps asking an unreachable destination to finish
POLL = 0.05  # query-migrate at least this often (MIGRATION events wake it earlier)
MiB = 1 << 20


# --- params -----------------------------------------------------------------------------


@dataclass(frozen=True)
class MigrateParams:
    host: str
    port: int
    max_bandwidth: int  # MiB/s
    schedule: convergence.Schedule
    auto_converge: bool
    compressed: bool
    encrypted: bool = False  # qemu's stream in TLS (the hosts' PKI)
    dstqemu: str | None = None  # where qemu sends the stream; None: `host`
    outgoing_limit: int | None = None  # new bound on this host's outgoing migrations
    incoming_limit: int | None = None  # ... and on the destination's incoming ones

    @property
    def dst(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def incoming(self) -> migtransport.Incoming:
        """What the destination is asked to listen for."""
        return migtransport.Incoming(self.dstqemu or self.host, self.encrypted)


def _bool(params: dict[str, Any], name: str) -> bool:
    value = params.get(name, False)
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise errors.InvalidParameter(f"{name}: expected a boolean, got {value!r}")


def _int(params: dict[str, Any], name: str, minimum: int) -> int | None:
    value = params.get(name)
    if value is None or value == "":
        return None
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise errors.InvalidParameter(f"{name}: expected an integer, got {value!r}") from None
    if number < minimum or isinstance(value, bool):
        raise errors.InvalidParameter(f"{name}: must be >= {minimum}, got {value!r}")
    return number


def parse_dst(dst: Any) -> tuple[str, int]:
    """``host``, ``host:port``, ``[v6]`` or ``[v6]:port`` (VDSM's dst)."""
    if not isinstance(dst, str) or not dst.strip() or any(c.isspace() for c in dst):
        raise errors.InvalidParameter(f"dst: expected host[:port], got {dst!r}")
    host, port = dst, str(DEFAULT_PORT)
    if dst.startswith("["):
        end = dst.find("]")
        rest = dst[end + 1:] if end >= 0 else ""
        if end < 0 or (rest and not rest.startswith(":")):
            raise errors.InvalidParameter(f"dst: expected host[:port], got {dst!r}")
        host = dst[1:end]
        if rest:
            port = rest[1:]
    elif dst.count(":") == 1:
        host, port = dst.split(":")
    elif ":" in dst:
        raise errors.InvalidParameter(f"dst: an IPv6 address goes in brackets: {dst!r}")
    if not host or "/" in host or not port.isdigit() or not 0 < int(port) < 65536:
        raise errors.InvalidParameter(f"dst: expected host[:port], got {dst!r}")
    return host, int(port)


def parse_params(params: dict[str, Any]) -> MigrateParams:
    """VM.migrate's params (VDSM's MigrateParams). Refused: another mode than remote,
    another method than online. Accepted and not used: tunneled, abortOnError,
    consoleAddress, enableGuestEvents (no guest agent to tell), parallel, zerocopy,
    cpusets, numaNodesets."""
    if "dst" not in params:
        raise errors.MissingParameter("dst")
    host, port = parse_dst(params["dst"])
    if params.get("mode", "remote") != "remote":
        raise errors.InvalidParameter(f"mode {params['mode']!r}: only remote migration")
    if params.get("method", "online") != "online":
        raise errors.InvalidParameter(f"method {params['method']!r}: only online migration")
    for name in ("tunneled", "abortOnError", "enableGuestEvents"):
        _bool(params, name)
    if "convergenceSchedule" in params:
        schedule = convergence.parse(params["convergenceSchedule"])
    else:
        downtime = _int(params, "migrationDowntime", 0)
        if downtime is None:
            downtime = _int(params, "downtime", 0)
        schedule = convergence.legacy(downtime)
    dstqemu = params.get("dstqemu") or None  # VDSM sends "" for "none"
    return MigrateParams(
        host=host, port=port,
        max_bandwidth=_int(params, "maxBandwidth", 1) or DEFAULT_MAX_BANDWIDTH,
        schedule=schedule, auto_converge=_bool(params, "autoConverge"),
        compressed=_bool(params, "compressed"), encrypted=_bool(params, "encrypted"),
        dstqemu=None if dstqemu is None else migtransport.check_host(dstqemu, "dstqemu"),
        outgoing_limit=_int(params, "outgoingLimit", 1),
        incoming_limit=_int(params, "incomingLimit", 1))


def parse_bandwidth(params: dict[str, Any]) -> int:
    """VM.migrateChangeParams' params: {"maxBandwidth": MiB/s}."""
    value = _int(params, "maxBandwidth", 1)
    if value is None:
        raise errors.MissingParameter("maxBandwidth")
    return value


def definition_for_peer(defn: VmDefinition) -> dict[str, Any]:
    """The definition the destination prepares for itself: no local paths (the
    lease's place too is found again there: a block domain's xleases LV is mapped
    at a path of each host's own)."""
    data = defn.to_dict()
    for disk in data["disks"]:
        disk["path"] = None
        disk["chain"] = []
    if data.get("lease"):
        data["lease"].update(path=None, offset=None)
    return data


def definition_from_peer(vm_id: str, params: dict[str, Any]) -> VmDefinition | None:
    """The definition a vdsmlite source sent (None: the engine's VM.create form)."""
    data = params.get("definition")
    if data is None:
        return None
    try:
        defn = VmDefinition.from_dict(data)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise errors.InvalidParameter(f"definition: {e!r}") from e
    if defn.vm_id != vm_id:
        raise errors.InvalidParameter(f"definition of VM {defn.vm_id}, not {vm_id}")
    for disk in defn.disks:
        disk.path, disk.chain = None, []
    return defn


# --- the destination agent, as the source sees it --------------------------------------


class Peer:
    """JSON-RPC calls to the destination agent (blocking; run them off the loop)."""

    def __init__(self, host: str, port: int, tls: TlsFiles | None) -> None:
        self.host, self.port, self.tls = host, port, tls

    def call(self, method: str, params: dict[str, Any]) -> Any:
        with Client.tcp(self.host, self.port, tls=self.tls, timeout=PEER_TIMEOUT) as c:
            return c.call(method, params)


class _Cancelled(Exception):
    pass


class _DestinationBusy(Exception):
    """The destination receives as many migrations as it may (82): try again later."""


class _Unknown(Exception):
    """The destination may or may not run the VM: the source must not resume it."""


# --- the source ---------------------------------------------------------------------------


class SourceMigration:
    """One outgoing migration of a running VM (see the module docstring)."""

    def __init__(self, vm: Vm, params: MigrateParams, peer: Peer, *,
                 run_blocking: RunBlocking, publish: Any, save: Any, on_done: Any,
                 leases: VmLeases, monitor_interval: float, slots: Slots,
                 retry_timeout: float) -> None:
        self.vm = vm
        # This host's outgoing migrations at once (`virt.migslots`), and how long to
        # wait before asking a busy destination again.
        self._slots = slots
        self._holds_slot = False
        self._retry_timeout = retry_timeout
        # How often the convergence schedule looks at the migration; 0: no schedule.
        self._monitor_interval = monitor_interval
        self._leases = leases
        self._lease_released = False  # this VM's lease given up by our qemu
        self.params = params
        self.peer = peer
        self._run = run_blocking
        self._publish = publish
        self._save = save  # async (vm) -> None: vm.json with the current status
        self._on_done = on_done  # async (vm) -> None: qemu stopped after success
        self.state = "starting"
        self.progress = 0
        self.downtime: int | None = None
        self.error: errors.VdsmError | None = None
        self.started = time.monotonic()
        self._cancel = asyncio.Event()
        self._wake = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    @property
    def active(self) -> bool:
        return self.state in ("starting", "waiting", "preparing", "migrating",
                              "completing", "aborting")

    def status(self) -> dict[str, Any]:
        """VM.getMigrationStatus: VDSM's migrationStats."""
        if self.error is not None:
            status = {"code": self.error.code, "message": self.error.message}
        elif self.state == "done":
            status = {"code": 0, "message": "Migration done"}
        elif self.state == "cancelled":
            # VDSM's migCancelErr, for a migrateCancel and for a schedule's abort alike.
            status = {"code": errors.MigrationCancelationFailed.code,
                      "message": "Migration canceled"}
        else:
            status = {"code": 0, "message": "Migration in progress"}
        out: dict[str, Any] = {"status": status, "progress": self.progress,
                               "state": self.state, "dst": self.params.dst}
        if self.downtime is not None:
            out["downtime"] = self.downtime
        return out

    def start(self) -> None:
        self.task = asyncio.create_task(self._run_migration())

    async def cancel(self) -> None:
        """VM.migrateCancel: the migration stops, the VM keeps running here."""
        if self.state == "aborting":
            return  # already stopping (it failed): the caller waits for the end
        if not self.active or self.state == "completing":
            # At completing the VM already ran its last instruction here: too late.
            raise errors.MigrationCancelationFailed(f"VM {self.vm.id}: migration is "
                                                    f"{self.state}")
        self._cancel.set()
        self._wake.set()
        if self.state == "migrating" and self.vm.session is not None:
            with contextlib.suppress(QmpError):
                await self.vm.session.execute("migrate_cancel")

    async def change_bandwidth(self, mib_per_s: int) -> None:
        """VM.migrateChangeParams: a new max-bandwidth for the running migration."""
        if not self.active or self.state == "aborting" or self.vm.session is None:
            raise errors.MigrationNotInProgress(f"VM {self.vm.id}: migration is {self.state}")
        self.params = dataclasses.replace(self.params, max_bandwidth=mib_per_s)
        try:
            await self.vm.session.execute("migrate-set-parameters",
                                          {"max-bandwidth": mib_per_s * MiB})
        except QmpError as e:
            raise errors.MigrationError(f"VM {self.vm.id}: {e}") from e

    async def wait(self) -> None:
        if self.task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.shield(self.task)

    # --- the flow ---

    async def _run_migration(self) -> None:
        vm = self.vm
        session = vm.session
        assert session is not None
        vm.set_status(VmStatus.MIGRATION_SOURCE)
        running = True
        created = False
        vm.event_hooks.append(self._on_event)
        try:
            await self._save(vm)
            running = bool((await session.query_status()).get("running"))
            reply = await self._create_when_room()
            created = True
            uri = reply.get("migrationUri") if isinstance(reply, dict) else None
            if not isinstance(uri, str) or not uri.startswith("tcp:"):
                raise errors.MigrationError(f"destination gave no migration URI: {reply!r}")
            self._check_cancel()
            await self._setup(session)
            self._check_cancel()  # by the convergence schedule's init: abort
            self.state = "migrating"
            log.info("VM %s: migrating to %s over %s", vm.id, self.params.dst, uri)
            await session.execute("migrate", {"uri": uri})
            await self._follow(session)
            # qemu stopped the vCPUs at completion: the VM ran its last instruction here.
            self.state = "completing"
            # Lease hand-over (HA VMs): our qemu is paused for good and the destination
            # has not run the VM. Ours lets go now; the destination's qemu acquires it
            # in `finish_incoming` before its first instruction. If that fails, the
            # except branches below take the lease back before resuming here.
            await self._release_lease()
            await self._finish(running)
        except _Unknown as e:
            # Never resume here: the destination may run it. Paused, for the engine.
            if vm.status is VmStatus.MIGRATION_SOURCE:
                vm.set_status(VmStatus.PAUSED)
            self._end(errors.MigrationError(str(e)))
        except (_Cancelled, errors.VdsmError, QmpError, asyncio.CancelledError) as e:
            outcome: errors.VdsmError | None  # None: cancelled
            if isinstance(e, _Cancelled):
                outcome = None
            elif isinstance(e, asyncio.CancelledError):
                outcome = errors.MigrationError("agent stopping")
            else:
                outcome = e if isinstance(e, errors.VdsmError) \
                    else errors.MigrationError(str(e))
            # The outcome is published only after the VM is settled here (see the
            # module docstring): "failed" next to a VM still in Migration Source
            # would send the engine after a VM that is about to be Up again.
            self.state = "aborting"
            try:
                await self._stay_here(session, running)
                if created:
                    await self._destroy_remote()
            finally:
                self._end(outcome)
            if isinstance(e, asyncio.CancelledError):
                raise
        finally:
            self._release_slot()
            vm.event_hooks.remove(self._on_event)
            if vm.status is not VmStatus.DOWN:
                with contextlib.suppress(OSError):
                    await self._save(vm)

    def _end(self, err: errors.VdsmError | None) -> None:
        """The migration's outcome: failed with `err`, or cancelled if None."""
        if err is None:
            self.state = "cancelled"
            log.info("VM %s: migration cancelled", self.vm.id)
            return
        self.state = "failed"
        self.error = err
        log.error("VM %s: migration to %s failed: %s", self.vm.id, self.params.dst, err)

    def _check_cancel(self) -> None:
        if self._cancel.is_set():
            raise _Cancelled()

    async def _create_when_room(self) -> Any:
        """VM.migrationCreate, once this host may send one more migration and the
        destination has room (asked again every retry timeout while it has none);
        from then on this migration holds one of the host's outgoing slots."""
        if self.params.outgoing_limit is not None:
            self._slots.set_bound(self.params.outgoing_limit)
        while True:
            if self._slots.busy >= self._slots.bound:
                self.state = "waiting"  # for this host's other migrations to end
            self._holds_slot = await self._slots.acquire(self._cancel)
            self._check_cancel()
            self.state = "preparing"
            try:
                return await self._create_remote()
            except _DestinationBusy as e:
                self._release_slot()
                self.state = "waiting"  # for the destination to have room
                log.info("VM %s: %s; asking again in %.0f s", self.vm.id, e,
                         self._retry_timeout)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._cancel.wait(), self._retry_timeout)
                self._check_cancel()

    def _release_slot(self) -> None:
        if self._holds_slot:
            self._holds_slot = False
            self._slots.release()

    async def _create_remote(self) -> Any:
        """VM.migrationCreate on the destination; _DestinationBusy on its 82."""
        args: dict[str, Any] = {
            "vmID": self.vm.id, "params": {"vmId": self.vm.id,
                                           "definition": definition_for_peer(self.vm.defn),
                                           "incoming": self.params.incoming.to_params()}}
        if self.params.incoming_limit is not None:
            args["incomingLimit"] = self.params.incoming_limit
        try:
            return await self._run(self.peer.call, "VM.migrationCreate", args)
        except ClientError as e:
            raise errors.NoConnectionToPeer(f"{self.params.dst}: {e}") from e
        except ServerError as e:
            if e.code == errors.MigrationLimitExceeded.code:
                raise _DestinationBusy(f"destination {self.params.dst} busy: {e.message}"
                                       ) from e
            raise errors.MigrationError(f"destination {self.params.dst} refused "
                                        f"VM.migrationCreate: {e.code}: {e.message}") from e

    async def _setup(self, session: Any) -> None:
        caps = [{"capability": "events", "state": True},
                {"capability": "auto-converge", "state": self.params.auto_converge},
                {"capability": "xbzrle", "state": self.params.compressed}]
        await session.execute("migrate-set-capabilities", {"capabilities": caps})
        await session.execute("migrate-set-parameters",
                              {"max-bandwidth": self.params.max_bandwidth * MiB})
        if self._monitor_interval > 0:
            log.info("VM %s: convergence schedule: init %s, stalling %s", self.vm.id,
                     [a.describe() for a in self.params.schedule.init],
                     [(step.limit, step.action.describe())
                      for step in self.params.schedule.stalling])
            for action in self.params.schedule.init:
                await self._act(session, action)

    async def _act(self, session: Any, action: convergence.Action) -> None:
        """One action of the convergence schedule."""
        if action.name == convergence.SET_DOWNTIME:
            log.info("VM %s: migration downtime set to %d ms", self.vm.id, action.downtime)
            await session.execute("migrate-set-parameters",
                                  {"downtime-limit": action.downtime})
        elif action.name == convergence.ABORT:
            log.warning("VM %s: the migration does not converge; aborting it, as its "
                        "convergence schedule says", self.vm.id)
            self._cancel.set()
            self._wake.set()
            with contextlib.suppress(QmpError):
                await session.execute("migrate_cancel")
        else:
            log.warning("VM %s: the convergence schedule asks for post-copy, which "
                        "vdsmlite does not do; its next action comes in turn", self.vm.id)
        # The destination checks our certificate, we check its one against the
        # address we send to (what it listens at: `Incoming.address`).
        incoming = self.params.incoming
        await migtransport.use_tls(session, self.peer.tls if incoming.encrypted else None,
                                   self.vm.run_dir, endpoint="client",
                                   hostname=incoming.address or "", run_blocking=self._run)

    def _on_event(self, event: QmpEvent) -> None:
        if event.name in ("MIGRATION", "MIGRATION_PASS", "STOP"):
            self._wake.set()

    async def _follow(self, session: Any) -> None:
        last_progress = -1
        monitor = convergence.Monitor(self.params.schedule) \
            if self._monitor_interval > 0 else None
        next_look = time.monotonic() + self._monitor_interval
        while True:
            self._wake.clear()
            info = await session.execute("query-migrate")
            status = info.get("status")
            ram = info.get("ram") or {}
            total, remaining = ram.get("total") or 0, ram.get("remaining") or 0
            if total and status == "active":
                self.progress = max(self.progress, min(99, 100 - 100 * remaining // total))
            if self.progress != last_progress:
                last_progress = self.progress
                self._publish(f"|virt|VM_migration_status|{self.vm.id}",
                              {self.vm.id: {"progress": self.progress}})
            if status == "completed":
                self.downtime = info.get("downtime")
                self.progress = 100
                return
            if status == "cancelled" or (self._cancel.is_set() and status == "failed"):
                raise _Cancelled()
            if status == "failed":
                raise errors.MigrationError(f"qemu: {info.get('error-desc', 'failed')}")
            if self.vm.process is None or self.vm.process.exited:
                raise errors.MigrationError("source qemu exited")
            if monitor is not None and status == "active" and time.monotonic() >= next_look:
                next_look = time.monotonic() + self._monitor_interval
                action = monitor.look(int(ram.get("dirty-sync-count") or 0))
                if action is not None:
                    await self._act(session, action)
                    continue  # an abort shows in the next query-migrate
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), POLL)

    async def _finish(self, running: bool) -> None:
        deadline = time.monotonic() + FINISH_RETRY
        while True:
            try:
                await self._run(self.peer.call, "VM.migrationFinish",
                                {"vmID": self.vm.id, "resume": running})
                break
            except ServerError as e:
                # The destination answered: it does not run the VM. Ours is the copy.
                raise errors.MigrationError(f"destination {self.params.dst} could not "
                                            f"finish: {e.code}: {e.message}") from e
            except ClientError as e:
                if time.monotonic() > deadline:
                    raise _Unknown(f"destination {self.params.dst} unreachable after the "
                                   f"migration completed ({e}); the VM stays paused here "
                                   "and may run there") from e
                await asyncio.sleep(1.0)
        self.state = "done"
        log.info("VM %s: migrated to %s (downtime %s ms)", self.vm.id, self.params.dst,
                 self.downtime)
        self.vm.exit_as = (0, "Migration succeeded", ExitReason.MIGRATION_SUCCEEDED)
        await self._on_done(self.vm)

    async def _release_lease(self) -> None:
        lease, pid = self.vm.defn.lease, self.vm.pid
        if lease is None or pid is None:
            return
        await self._run(self._leases.release_for, pid, lease)
        self._lease_released = True

    async def _stay_here(self, session: Any, running: bool) -> None:
        """After a failure: the VM goes on here as it was (resumed if it ran)."""
        vm = self.vm
        if vm.process is None or vm.process.exited or vm.status is VmStatus.DOWN:
            return  # the source qemu died: Down already (or about to be)
        lease = vm.defn.lease
        if lease is not None and self._lease_released and vm.pid is not None:
            try:
                await self._run(self._leases.acquire_for, vm.pid, lease)
                self._lease_released = False
            except errors.VdsmError as e:
                # Somebody else holds it now (the destination may run the VM): never
                # resume without it.
                log.error("VM %s: cannot take the VM lease back after the failed "
                          "migration (%s); it stays paused", vm.id, e)
                running = False
        try:
            info = await session.execute("query-migrate")
            if info.get("status") in ("active", "setup", "pre-switchover", "device"):
                await session.execute("migrate_cancel")
                for _ in range(100):
                    info = await session.execute("query-migrate")
                    if info.get("status") not in ("active", "setup", "cancelling",
                                                  "pre-switchover", "device"):
                        break
                    await asyncio.sleep(0.05)
            state = await session.query_status()
            if running and not state.get("running"):
                await session.cont()
                state = await session.query_status()
            vm.set_status(VmStatus.UP if state.get("running") else VmStatus.PAUSED)
        except (QmpError, errors.VdsmError) as e:
            log.error("VM %s: cannot resume after the failed migration: %s", vm.id, e)
            vm.set_status(VmStatus.UP if running else VmStatus.PAUSED)

    async def _destroy_remote(self) -> None:
        try:
            await self._run(self.peer.call, "VM.destroy", {"vmID": self.vm.id})
        except ServerError as e:
            if e.code != errors.NoSuchVM.code:
                log.warning("VM %s: destination %s did not destroy its copy: %s",
                            self.vm.id, self.params.dst, e)
        except ClientError as e:
            # Its qemu exits by itself when the migration stream breaks.
            log.warning("VM %s: cannot reach destination %s to clean up: %s", self.vm.id,
                        self.params.dst, e)


# --- the destination ------------------------------------------------------------------------


async def finish_incoming(vm: Vm, resume: bool, leases: VmLeases, run_blocking: RunBlocking,
                          timeout: float = 30.0) -> None:
    """VM.migrationFinish: the incoming migration completed; run the VM if it ran."""
    if vm.status is not VmStatus.MIGRATION_DESTINATION or vm.session is None:
        raise errors.MigrationError(f"VM {vm.id} is {vm.status}, not receiving")
    session = vm.session
    deadline = time.monotonic() + timeout
    try:
        while True:
            info = await session.execute("query-migrate")
            status = info.get("status")
            if status == "completed":
                break
            if status == "failed" or time.monotonic() > deadline:
                raise errors.MigrationError(f"VM {vm.id}: incoming migration {status}")
            await asyncio.sleep(0.01)
        # Lease hand-over, destination side: our qemu (registered at start) takes the
        # VM lease before its first instruction here (see SourceMigration).
        if vm.defn.lease is not None and vm.pid is not None:
            await run_blocking(leases.acquire_for, vm.pid, vm.defn.lease)
        if resume:
            await session.cont()
    except QmpError as e:
        raise errors.MigrationError(f"VM {vm.id}: {e}") from e
    vm.set_status(VmStatus.UP if resume else VmStatus.PAUSED)


async def recover_source(vm: Vm) -> None:
    """The agent restarted while this VM was being sent away: nobody follows that
    migration any more, so it is cancelled (the destination's qemu then exits by
    itself). A qemu that completed meanwhile (``postmigrate``) may run on the
    destination already: it stays paused here."""
    session = vm.session
    if session is None:
        return
    try:
        info = await session.execute("query-migrate")
        if info.get("status") in ("active", "setup", "pre-switchover", "device"):
            log.warning("VM %s: cancelling the migration the previous agent started", vm.id)
            await session.execute("migrate_cancel")
        state = await session.query_status()
    except (QmpError, errors.VdsmError) as e:
        log.error("VM %s: cannot inspect its migration after restart: %s", vm.id, e)
        return
    if state.get("status") == "postmigrate":
        log.error("VM %s: its migration completed while the agent was away; it may run "
                  "on the destination: left paused here", vm.id)
    vm.set_status(VmStatus.UP if state.get("running") else VmStatus.PAUSED)


async def recover_destination(vm: Vm) -> None:
    """The agent restarted while this VM was being received. A qemu that runs was
    finished (only the saved status is stale): it is Up. Otherwise the source's agent
    can no longer finish through us with certainty: the copy here is destroyed (the
    source then keeps or resumes the VM), never started."""
    session = vm.session
    running = False
    if session is not None:
        with contextlib.suppress(QmpError, errors.VdsmError):
            running = bool((await session.query_status()).get("running"))
    if running:
        vm.set_status(VmStatus.UP)
        return
    log.warning("VM %s: incoming migration interrupted by an agent restart: destroying "
                "the copy here", vm.id)
    vm.exit_as = (1, "incoming migration interrupted by an agent restart",
                  ExitReason.MIGRATION_FAILED)
    await vm.destroy(grace=2.0)
