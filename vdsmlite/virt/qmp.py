"""The QMP session with one qemu, and the block operations VMs need over it.

`QmpSession` wraps `qemu.qmp.QMPClient` the way that library is built: an explicit
state (`SessionState`) and guards that refuse a command in the wrong state, rather
than letting it fail somewhere inside the protocol. It adds what the agent needs
around it:

* commands with a timeout, QMP failures raised as `QmpCommandError` (QMP's error
  class and description), a lost connection as `QmpDisconnected`;
* every event delivered to one callback (`on_event`), so the VM layer sees
  ``SHUTDOWN``, ``STOP``, ``RESUME``, ``DEVICE_DELETED``, ``BLOCK_JOB_*`` as they come;
  a server hang up (qemu died or quit) moves the session to DISCONNECTED by itself;
* the operations VM create, hot plug/unplug and stats use, and the disk hot plug
  helpers `plug_disk` / `unplug_disk` that keep qemu consistent when a step fails.

Node and device names come from `vdsmlite.virt.qemu` (`disk_names`), so a disk plugged
at start and one hot plugged are handled the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

from qemu.qmp import ConnectError, EventListener, ExecuteError, QMPClient, QMPError, Runstate
from qemu.qmp.qmp_client import NegotiationError

from vdsmlite import background, errors
from vdsmlite.blocking import RunBlocking
from vdsmlite.virt import qemu
from vdsmlite.virt.definition import DiskBus, DiskSpec

log = logging.getLogger("vdsmlite.virt.qmp")

NEGOTIATION_ATTEMPTS = 3  # connections tried when qemu's answer to qmp_capabilities is lost

P = ParamSpec("P")
T = TypeVar("T")


class SessionState(enum.StrEnum):
    DISCONNECTED = "disconnected"  # never connected, or the connection was lost: connect()
    CONNECTING = "connecting"
    CONNECTED = "connected"
    CLOSED = "closed"  # close() was called: final


class QmpError(errors.VdsmLiteError):
    """Base of the QMP session's errors; VM verbs translate them to their VDSM codes."""


class QmpStateError(QmpError):
    """A call the session's state does not allow (not connected, closed)."""


class QmpConnectError(QmpError):
    pass


class QmpDisconnected(QmpError):
    """The connection was lost (qemu died or quit) before the command answered."""


class QmpTimeout(QmpError, TimeoutError):
    pass


class QmpCommandError(QmpError):
    """qemu answered a command with an error: QMP's error class and description."""

    def __init__(self, command: str, error_class: str, desc: str) -> None:
        super().__init__(command, error_class, desc)
        self.command = command
        self.error_class = error_class
        self.desc = desc

    def __str__(self) -> str:
        return f"{self.command}: {self.error_class}: {self.desc}"


@dataclass(frozen=True)
class QmpEvent:
    name: str
    data: dict[str, Any]
    timestamp: float  # qemu's clock, seconds since the epoch


EventCallback = Callable[[QmpEvent], None]


def _require(*states: SessionState) -> Callable[[Callable[P, Awaitable[T]]],
                                                 Callable[P, Awaitable[T]]]:
    """Refuse a call unless the session is in one of `states` (qemu.qmp's own
    `require` guard, for our states)."""
    def decorate(fn: Callable[P, Awaitable[T]]) -> Callable[P, Awaitable[T]]:
        @functools.wraps(fn)
        async def guarded(*args: P.args, **kwargs: P.kwargs) -> T:
            session = args[0]
            assert isinstance(session, QmpSession)
            if session.state not in states:
                raise QmpStateError(f"{fn.__name__}: QMP session of {session.name} is "
                                    f"{session.state}, needs {'/'.join(states)}")
            return await fn(*args, **kwargs)
        return guarded
    return decorate


class QmpSession:
    """One QMP connection to one qemu (its ``qmp.sock``)."""

    def __init__(self, socket_path: Path, *, name: str = "qemu",
                 on_event: EventCallback | None = None,
                 run_blocking: RunBlocking | None = None) -> None:
        self.socket_path = Path(socket_path)
        self.name = name
        self.on_event = on_event
        self._run = run_blocking
        self._state = SessionState.DISCONNECTED
        self._client: QMPClient | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._lost = asyncio.Event()

    @property
    def state(self) -> SessionState:
        return self._state

    # --- connection ---

    @_require(SessionState.DISCONNECTED)
    async def connect(self, timeout: float = 10.0) -> None:
        """Connect and negotiate; on failure the session is DISCONNECTED again.

        A failed negotiation is tried again on a new connection, a few times: qemu can
        send an event ahead of its answer to ``qmp_capabilities`` (one another thread
        emits right as the monitor leaves negotiation, as a migration's do), and
        qemu.qmp takes that for a refusal.
        """
        self._state = SessionState.CONNECTING
        deadline = asyncio.get_running_loop().time() + timeout
        for attempt in range(1, NEGOTIATION_ATTEMPTS + 1):
            client = QMPClient(self.name)
            left = max(0.0, deadline - asyncio.get_running_loop().time())
            try:
                await asyncio.wait_for(client.connect(str(self.socket_path)), left)
                break
            except (ConnectError, OSError, TimeoutError) as e:
                with contextlib.suppress(Exception):
                    await client.disconnect()
                if isinstance(e, ConnectError) and isinstance(e.exc, NegotiationError) \
                        and attempt < NEGOTIATION_ATTEMPTS:
                    log.info("QMP of %s: negotiation failed (%s); connecting again",
                             self.name, e.exc)
                    continue
                self._state = SessionState.DISCONNECTED
                raise QmpConnectError(f"QMP of {self.name} at {self.socket_path}: {e}") from e
            except BaseException:
                with contextlib.suppress(Exception):
                    await client.disconnect()
                self._state = SessionState.DISCONNECTED
                raise
        self._client = client
        self._lost.clear()
        self._state = SessionState.CONNECTED
        self._tasks = [background.spawn(self._pump_events(client)),
                       background.spawn(self._watch(client))]

    async def _pump_events(self, client: QMPClient) -> None:
        # Draining client.events (the listener every QMPClient has) also keeps it from
        # growing for the life of the VM.
        async for msg in client.events:
            raw: dict[str, Any] = dict(msg)
            ts = raw.get("timestamp") or {}
            event = QmpEvent(name=str(raw["event"]), data=dict(raw.get("data") or {}),
                             timestamp=ts.get("seconds", 0) + ts.get("microseconds", 0) / 1e6)
            log.debug("%s: event %s %s", self.name, event.name, event.data)
            if self.on_event is not None:
                try:
                    self.on_event(event)
                except Exception:
                    log.exception("%s: event callback failed on %s", self.name, event.name)

    async def _watch(self, client: QMPClient) -> None:
        # qemu hanging up (it quit or died) moves the client to DISCONNECTING; finishing
        # the disconnect here makes the session DISCONNECTED without anyone calling in.
        while client.runstate == Runstate.RUNNING:
            await client.runstate_changed()
        await self._drop(client)

    async def _drop(self, client: QMPClient) -> None:
        for task in self._tasks:
            if task is not asyncio.current_task():
                task.cancel()
        try:
            await client.disconnect()
        except EOFError:
            pass  # the server hung up: expected after quit or when qemu died
        except (QMPError, OSError) as e:
            log.info("%s: QMP connection ended: %s", self.name, e)
        if self._client is client:
            self._client = None
            if self._state is not SessionState.CLOSED:
                self._state = SessionState.DISCONNECTED
        self._lost.set()

    async def wait_disconnected(self) -> None:
        """Until the connection is lost or closed."""
        if self._state in (SessionState.CONNECTED, SessionState.CONNECTING):
            await self._lost.wait()

    async def close(self) -> None:
        """Disconnect for good (idempotent); qemu keeps running."""
        client, self._client = self._client, None
        self._state = SessionState.CLOSED
        if client is not None:
            await self._drop(client)

    # --- commands ---

    @_require(SessionState.CONNECTED)
    async def execute(self, command: str, arguments: dict[str, Any] | None = None, *,
                      timeout: float = 30.0) -> Any:
        client = self._client
        assert client is not None
        try:
            return await asyncio.wait_for(client.execute(command, arguments), timeout)
        except ExecuteError as e:
            raise QmpCommandError(command, e.error_class, str(e)) from e
        except TimeoutError as e:
            raise QmpTimeout(f"{self.name}: {command} unanswered after {timeout}s") from e
        except (QMPError, OSError, EOFError) as e:
            raise QmpDisconnected(f"{self.name}: {command}: connection lost: {e}") from e

    async def cont(self) -> None:
        await self.execute("cont")

    async def stop(self) -> None:
        await self.execute("stop")

    async def query_status(self) -> dict[str, Any]:
        """``{"status": "running"|"paused"|..., "running": bool, ...}``"""
        result: dict[str, Any] = await self.execute("query-status")
        return result

    async def query_block(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = await self.execute("query-block")
        return result

    async def query_named_block_nodes(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = await self.execute("query-named-block-nodes",
                                                          {"flat": True})
        return result

    async def query_blockstats(self, *, query_nodes: bool = False) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = await self.execute("query-blockstats",
                                                          {"query-nodes": query_nodes})
        return result

    async def query_pci(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = await self.execute("query-pci")
        return result

    async def qom_list(self, path: str) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = await self.execute("qom-list", {"path": path})
        return result

    async def qom_get(self, path: str, prop: str) -> Any:
        return await self.execute("qom-get", {"path": path, "property": prop})

    async def blockdev_add(self, node: dict[str, Any]) -> None:
        await self.execute("blockdev-add", node)

    async def blockdev_del(self, node_name: str) -> None:
        await self.execute("blockdev-del", {"node-name": node_name})

    async def device_add(self, device: dict[str, Any]) -> None:
        await self.execute("device_add", device)

    async def device_del(self, device_id: str, *, timeout: float = 10.0) -> None:
        """Ask the guest to release a device and wait for ``DEVICE_DELETED``.

        Raises `QmpTimeout` when the guest does not acknowledge in `timeout`: the
        device is then still there (a virtio device of a guest with no OS never goes).
        Asking again while the guest has not answered waits again (qemu refuses a
        second request but still sends the event when the guest releases it)."""
        client = self._client
        if client is None or self._state is not SessionState.CONNECTED:
            raise QmpStateError(f"device_del: QMP session of {self.name} is {self._state}")
        # Listen before asking: scsi-hd is deleted before device_del even answers.
        def ours(event: Any) -> bool:
            # virtio devices also report their backend child, with no "device" id.
            data: dict[str, Any] = event.get("data") or {}
            return data.get("device") == device_id

        deleted = EventListener("DEVICE_DELETED", ours)
        with client.listen(deleted):
            try:
                await self.execute("device_del", {"id": device_id})
            except QmpCommandError as e:
                # Asked before and the guest has not answered yet: wait again.
                if "already in the process of unplug" not in e.desc:
                    raise
            try:
                await asyncio.wait_for(deleted.get(), timeout)
            except TimeoutError as e:
                raise QmpTimeout(f"{self.name}: device {device_id} not released by the "
                                 f"guest after {timeout}s") from e

    async def human_monitor_command(self, command_line: str) -> str:
        result: str = await self.execute("human-monitor-command",
                                         {"command-line": command_line})
        return result

    async def quit(self) -> None:
        """Ask qemu to exit; the session then becomes DISCONNECTED by itself."""
        with contextlib.suppress(QmpDisconnected):
            await self.execute("quit")

    # --- disks ---

    async def free_root_ports(self) -> list[str]:
        """Our ``pcie-root-port``s (see `qemu.command_line`) with nothing plugged.

        Read from QOM, not ``query-pci``: query-pci finds the devices behind a bridge
        by the bus numbers the guest firmware programs, so before the guest ever ran
        (``-S``) every port looks empty. A device being unplugged still counts."""
        free = []
        for child in await self.qom_list("/machine/peripheral"):
            port = child["name"]
            if child["type"] != "child<pcie-root-port>" or not qemu.is_root_port_id(port):
                continue
            bus = await self.qom_list(f"/machine/peripheral/{port}/{port}")
            if not any(p["name"].startswith("child[") for p in bus):
                free.append(port)
        return sorted(free, key=lambda p: int(p[len(qemu.ROOT_PORT_PREFIX):]))

    async def plug_disk(self, disk: DiskSpec, *, port: str | None = None) -> None:
        """Hot plug a prepared disk: its block nodes, then its device.

        A virtio disk goes on `port` or the first free root port. If a step fails,
        what was added is removed again, so no half-added node stays behind; the
        failure is `errors.HotplugDiskFailed` with qemu's reason."""
        try:
            block = await self._blocking(qemu.is_block_device, disk.path or "")
            nodes = qemu.disk_blockdevs(disk, block=block)
            if disk.bus is DiskBus.VIRTIO and port is None:
                ports = await self.free_root_ports()
                if not ports:
                    raise qemu.InvalidVmConfig("no free PCIe root port for a virtio disk")
                port = ports[0]
            device = qemu.disk_device(disk, port=port)
        except (qemu.InvalidVmConfig, QmpError) as e:
            raise errors.HotplugDiskFailed(f"disk {disk.name}: {e}") from e
        added: list[str] = []
        try:
            for node in nodes:
                await self.blockdev_add(node)
                added.append(node["node-name"])
            await self.device_add(device)
        except QmpError as e:
            problems = await self.remove_nodes(reversed(added))
            detail = f"; rollback: {'; '.join(problems)}" if problems else ""
            raise errors.HotplugDiskFailed(f"disk {disk.name}: {e}{detail}") from e
        log.info("%s: plugged disk %s (%s)", self.name, disk.name, device["driver"])

    async def unplug_disk(self, disk: DiskSpec, *, timeout: float = 10.0) -> None:
        """Hot unplug a disk: its device (waiting for the guest), then its nodes.

        If the guest does not release the device in `timeout`, raises
        `errors.HotunplugDiskFailed` and the disk stays attached (nodes included).
        A device already gone (a late release of an earlier attempt) is fine: its
        nodes are removed."""
        try:
            names = qemu.disk_names(disk.name)
        except qemu.InvalidVmConfig as e:
            raise errors.HotunplugDiskFailed(str(e)) from e
        try:
            await self.device_del(names.device, timeout=timeout)
        except QmpCommandError as e:
            if e.error_class != "DeviceNotFound":
                raise errors.HotunplugDiskFailed(f"disk {disk.name}: {e}") from e
            existing = {n.get("node-name") for n in await self.query_named_block_nodes()}
            if not {names.format, names.storage} & existing:
                raise errors.HotunplugDiskFailed(f"disk {disk.name} is not attached") from e
        except QmpTimeout as e:
            raise errors.HotunplugDiskFailed(f"disk {disk.name}: {e}; the disk is still "
                                             "attached") from e
        except QmpError as e:
            raise errors.HotunplugDiskFailed(f"disk {disk.name}: {e}") from e
        problems = await self._remove_disk_nodes(disk.name)
        if problems:
            raise errors.HotunplugDiskFailed(f"disk {disk.name}: device removed, but "
                                             f"{'; '.join(problems)}")
        log.info("%s: unplugged disk %s", self.name, disk.name)

    async def _remove_disk_nodes(self, name: str) -> list[str]:
        """Every node we added for disk `name` (``<name>-...``: its first leaf and the
        overlays of live snapshots, which keep their backing nodes in use), the ones
        nothing uses first, until none is left or none can go."""
        prefix = f"{name}-"
        problems: list[str] = []
        while True:
            try:
                left = [n["node-name"] for n in await self.query_named_block_nodes()
                        if str(n.get("node-name", "")).startswith(prefix)]
            except QmpError as e:
                return [f"cannot list block nodes: {e}"]
            if not left:
                return []
            removed = False
            problems = []
            for node in left:
                try:
                    await self.blockdev_del(node)
                    removed = True
                except QmpError as e:
                    problems.append(f"node {node} left: {e}")
            if not removed:
                for p in problems:
                    log.error("%s: %s", self.name, p)
                return problems

    async def remove_nodes(self, node_names: Any) -> list[str]:
        """blockdev-del each existing node, top first; what could not be removed."""
        try:
            existing = {n.get("node-name") for n in await self.query_named_block_nodes()}
        except QmpError as e:
            return [f"cannot list block nodes: {e}"]
        problems = []
        for name in node_names:
            if name not in existing:
                continue
            try:
                await self.blockdev_del(name)
            except QmpError as e:
                log.error("%s: cannot remove block node %s: %s", self.name, name, e)
                problems.append(f"node {name} left: {e}")
        return problems

    async def _blocking(self, fn: Callable[..., T], *args: Any) -> T:
        if self._run is not None:
            result: T = await self._run(fn, *args)
            return result
        return await asyncio.to_thread(fn, *args)


async def open_session(process: qemu.QemuProcess, *, timeout: float = 30.0,
                       on_event: EventCallback | None = None,
                       run_blocking: RunBlocking | None = None) -> QmpSession:
    """Connect to the QMP of a qemu just started or found again.

    qemu creates its socket before it has finished starting and may still exit
    (a disk it cannot open, a bad option): then this raises `errors.CannotCreateVM`
    with qemu's own words (its log tail) rather than a bare connection error."""
    session = QmpSession(process.qmp_socket, name=f"VM {process.vm_id}", on_event=on_event,
                         run_blocking=run_blocking)
    deadline = time.monotonic() + timeout
    while True:
        # No race against the process: a dead qemu refuses or hangs up at once, so the
        # connect fails promptly by itself; cancelling it midway would interrupt
        # qemu.qmp's own cleanup.
        try:
            await session.connect(max(0.1, deadline - time.monotonic()))
            return session
        except QmpConnectError as e:
            # qemu binds its socket a moment before it listens: refused in between.
            refused = isinstance(e.__cause__, ConnectionRefusedError) or \
                isinstance(getattr(e.__cause__, "exc", None), ConnectionRefusedError)
            if refused and not process.exited and time.monotonic() < deadline:
                await asyncio.sleep(0.005)
                continue
            # Its pidfd says a moment later whether qemu exited, and then its log says why.
            with contextlib.suppress(TimeoutError):
                ended = await asyncio.wait_for(process.wait(), 2.0)
                raise errors.CannotCreateVM(ended.describe()) from e
            raise errors.CannotCreateVM(str(e)) from e
