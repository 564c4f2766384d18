"""One typed configuration for the daemon and the CLI.

Sources, lowest precedence first:

1. embedded defaults: state under ``./var`` (or ``$VDSMLITE_STATE_DIR``), JSON-RPC on
   ``127.0.0.1:54321`` and on a unix socket in the run dir;
2. a TOML file: ``--config FILE``, else ``/etc/vdsmlite/vdsmlite.conf`` when it exists;
3. command line flags (``--state-dir``, ``--listen``, ``--port``).

Unknown sections or keys and values of the wrong type are errors: a typo in a
config file must stop the daemon at start, not be silently ignored.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vdsmlite.errors import InvalidConfiguration
from vdsmlite.ids import parse_uuid
from vdsmlite.units import MiB

SYSTEM_CONFIG = Path("/etc/vdsmlite/vdsmlite.conf")


def _default_state_dir() -> Path:
    return Path(os.environ.get("VDSMLITE_STATE_DIR", "./var"))


@dataclass(frozen=True)
class DaemonSection:
    # Persistent state (host uuid, domain links, local file domains).
    state_dir: Path = field(default_factory=_default_state_dir)
    # Sockets and runtime links; defaults to <state_dir>/run.
    run_dir: Path | None = None
    # Stable identity of this host; generated once and kept in the state dir if unset.
    host_uuid: str | None = None
    log_level: str = "INFO"
    # "text" (key=value, for humans and journald) or "json" (one object per line).
    log_format: str = "text"
    # Seconds in-flight calls get to finish on SIGTERM before they are cancelled.
    shutdown_timeout: float = 10.0
    # Threads for blocking work (LVM commands, fsync, O_DIRECT I/O, sanlock calls).
    worker_threads: int = 8


@dataclass(frozen=True)
class RpcSection:
    listen: str = "127.0.0.1"
    port: int = 54321
    # Also serve on <run_dir>/vdsmlite.sock (the CLI's default door).
    unix_socket: bool = True
    # Largest accepted JSON-RPC request body / WebSocket message; larger -> HTTP 413.
    max_request_size: int = 16 * MiB
    # Calls executing at once; more wait for a slot (protects the host from floods).
    max_concurrent_calls: int = 256
    # Seconds a new connection may take to send its first bytes (protocol detection),
    # and a STOMP frame may stay incomplete, before the connection is dropped.
    stall_timeout: float = 30.0
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_ca: Path | None = None
    # Allow plain TCP on a non-loopback address. Never the default.
    insecure: bool = False


@dataclass(frozen=True)
class StorageSection:
    # Root of mounts and domain links (VDSM: /rhev/data-center); defaults to
    # <state_dir>/data-center so the embedded default never touches the host.
    repository: Path | None = None
    # Seconds a mount/umount may take (a dead NFS server must not hang a call).
    mount_timeout: float = 90.0
    # Seconds an iscsiadm command may take (discovery, login).
    iscsi_timeout: float = 60.0
    # Seconds an upload may go without receiving a byte before it is abandoned.
    upload_stall_timeout: float = 60.0
    # Processes that check and summarize OVF documents (vdsmlite.ovf.workers), and
    # the address space each may use: a hostile OVF costs at most that.
    ovf_parser_processes: int = 2
    ovf_parser_memory_mib: int = 1024
    # Seconds after start-up before the parser processes are spawned (a daemon started
    # for one call never spawns them); negative: only on first use.
    ovf_parser_warmup_delay: float = 5.0
    # A local file domain served from this directory, created on first start.
    # The embedded default (no config file) puts one under the state dir.
    local_domain: Path | None = None


@dataclass(frozen=True)
class SanlockSection:
    # sanlock io_timeout written into lockspaces this host creates and used to join
    # them; every other sanlock timeout derives from it (renewal 2x, failure 8x,
    # another host declared dead 8x + 60 s). VDSM uses 10.
    io_timeout: int = 10
    # The sanlock daemon's run dir (its socket); unset: sanlock's default, /run/sanlock.
    run_dir: Path | None = None
    # Seconds a metadata change waits for the domain's SDM lease while another
    # host holds it, before failing with 651.
    lease_timeout: float = 30.0
    # Seconds a metadata change (or StoragePool.spmStart) waits for this host's join of
    # the domain's lockspace when one is in progress (VDSM: 180, ACQUIRE_HOST_ID_TIMEOUT).
    host_id_timeout: float = 180.0
    # Seconds between domain monitor cycles (VDSM: [irs] sd_health_check_delay).
    monitor_interval: float = 10.0


@dataclass(frozen=True)
class WatchdogSection:
    # "device": a Linux watchdog device (keepalive ioctl, magic close on clean stop);
    # "emulated": fake_storage's emulated watchdog (tests); "none": nothing resets
    # this host when fenced through storage (it answers "cannot reset"). Where wdmd owns
    # /dev/watchdog, point `device` at a second watchdog (e.g. a softdog instance).
    backend: str = "none"
    device: Path = Path("/dev/watchdog")
    # The emulated watchdog's socket (backend = "emulated").
    socket: Path | None = None
    # Seconds without a keepalive before the watchdog resets the host.
    timeout: int = 60


@dataclass(frozen=True)
class FencingSection:
    # Where Host.fenceNode finds fence_<agent> programs (agents other than "sanlock").
    agents_dir: Path = Path("/usr/sbin")
    # Seconds a fence agent may run.
    agent_timeout: float = 60.0


@dataclass(frozen=True)
class VirtSection:
    # Per-VM directories (QMP socket, pidfile, qemu log, vm.json); default
    # <run_dir>/vm. Keep it short: a QMP socket path must fit in 107 bytes.
    run_dir: Path | None = None
    # Empty PCIe root ports made at VM start for virtio disks plugged later.
    hotplug_slots: int = 8
    # Seconds a guest gets to release a hot-unplugged disk (then 46, disk kept).
    unplug_timeout: float = 10.0
    # Seconds an incoming migration may take from VM.migrationCreate to
    # VM.migrationFinish; then the copy here is destroyed (Down, exitReason 8) and
    # its storage released. VDSM's [vars] migration_destination_timeout.
    migration_destination_timeout: float = 21600.0
    # Seconds between two looks of an outgoing migration's convergence schedule at its
    # progress (vdsmlite.virt.convergence); 0 turns schedules off. VDSM's [vars]
    # migration_monitor_interval.
    migration_monitor_interval: float = 10.0
    # Migrations this host sends / takes at once (vdsmlite.virt.migslots), and seconds
    # before asking a destination that had no room again. VDSM's [vars]
    # max_outgoing_migrations, max_incoming_migrations, migration_retry_timeout.
    max_outgoing_migrations: int = 2
    max_incoming_migrations: int = 2
    migration_retry_timeout: float = 10.0
    # Where a destination's qemu listens for an incoming migration (vdsmlite.virt.
    # migtransport): "" for the address the source connects to (VM.migrate's dstqemu,
    # else the host it called this agent at); an address to listen on one network.
    migration_listen: str = ""
    # The ports it may listen on, one per incoming migration (libvirt's range).
    migration_port_min: int = 49152
    migration_port_max: int = 49215
    # A second QMP monitor per VM (<vm dir>/qmp-debug.sock) for inspection.
    debug_monitor: bool = False
    # What VM NICs attach to: "" (nothing: the guest has the NIC, its frames go
    # nowhere), "user" (qemu's slirp), "bridge" (the Linux bridge named as the
    # NIC's network) or "bridge:<name>" (one bridge for all); bridges are joined
    # through qemu-bridge-helper.
    nic_backend: str = ""


@dataclass(frozen=True)
class DevelSection:
    # Check every verb's return value against the schema (tests turn this on).
    validate_returns: bool = False


@dataclass(frozen=True)
class Config:
    daemon: DaemonSection = field(default_factory=DaemonSection)
    rpc: RpcSection = field(default_factory=RpcSection)
    storage: StorageSection = field(default_factory=StorageSection)
    sanlock: SanlockSection = field(default_factory=SanlockSection)
    watchdog: WatchdogSection = field(default_factory=WatchdogSection)
    fencing: FencingSection = field(default_factory=FencingSection)
    virt: VirtSection = field(default_factory=VirtSection)
    devel: DevelSection = field(default_factory=DevelSection)
    # Where the values came from, for logs and --show-config.
    source: str = "embedded defaults"

    @property
    def state_dir(self) -> Path:
        return self.daemon.state_dir

    @property
    def run_dir(self) -> Path:
        return self.daemon.run_dir or self.daemon.state_dir / "run"

    @property
    def virt_run_dir(self) -> Path:
        return self.virt.run_dir or self.run_dir / "vm"

    @property
    def repository(self) -> Path:
        return self.storage.repository or self.daemon.state_dir / "data-center"

    @property
    def unix_socket_path(self) -> Path | None:
        return self.run_dir / "vdsmlite.sock" if self.rpc.unix_socket else None

    @property
    def tls_enabled(self) -> bool:
        return self.rpc.tls_cert is not None

    def as_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["daemon"]["run_dir"] = self.run_dir
        out["virt"]["run_dir"] = self.virt_run_dir
        out["storage"]["repository"] = self.repository
        out["storage"]["local_domain"] = self.storage.local_domain
        return _stringify(out)


def _stringify(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _stringify(v) for k, v in value.items()}
    if isinstance(value, Path):
        return str(value)
    return value


_SECTIONS: dict[str, type] = {
    "daemon": DaemonSection,
    "rpc": RpcSection,
    "storage": StorageSection,
    "sanlock": SanlockSection,
    "watchdog": WatchdogSection,
    "fencing": FencingSection,
    "virt": VirtSection,
    "devel": DevelSection,
}


def _coerce(section: str, key: str, raw: Any, hint: Any) -> Any:
    where = f"[{section}] {key}"
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if raw is None:
            return None
        return _coerce(section, key, raw, args[0])
    if hint is bool:
        if not isinstance(raw, bool):
            raise InvalidConfiguration(f"{where}: expected true or false, got {raw!r}")
        return raw
    if hint is int:
        if isinstance(raw, bool) or not isinstance(raw, int):
            raise InvalidConfiguration(f"{where}: expected an integer, got {raw!r}")
        return raw
    if hint is float:
        if isinstance(raw, bool) or not isinstance(raw, int | float):
            raise InvalidConfiguration(f"{where}: expected a number, got {raw!r}")
        return float(raw)
    if hint is str:
        if not isinstance(raw, str):
            raise InvalidConfiguration(f"{where}: expected a string, got {raw!r}")
        return raw
    if hint is Path:
        if not isinstance(raw, str | Path) or not str(raw):
            raise InvalidConfiguration(f"{where}: expected a path, got {raw!r}")
        return Path(raw)
    raise InvalidConfiguration(f"{where}: unsupported setting type {hint!r}")


def _build_section(name: str, cls: type, values: dict[str, Any]) -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise InvalidConfiguration(f"[{name}]: unknown setting(s) {', '.join(unknown)}")
    kwargs = {k: _coerce(name, k, v, hints[k]) for k, v in values.items()}
    return cls(**kwargs)


def _validate(cfg: Config) -> None:
    d, r = cfg.daemon, cfg.rpc
    if d.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        raise InvalidConfiguration(f"[daemon] log_level: unknown level {d.log_level!r}")
    if d.log_format not in ("text", "json"):
        raise InvalidConfiguration(
            f"[daemon] log_format: expected text or json, got {d.log_format!r}")
    if d.shutdown_timeout < 0:
        raise InvalidConfiguration("[daemon] shutdown_timeout: must not be negative")
    if not 1 <= d.worker_threads <= 256:
        raise InvalidConfiguration("[daemon] worker_threads: must be within 1..256")
    if not 0 <= r.port <= 65535:
        raise InvalidConfiguration(f"[rpc] port: {r.port} is not a TCP port")
    if r.max_request_size < 1024:
        raise InvalidConfiguration("[rpc] max_request_size: must be at least 1024 bytes")
    st = cfg.storage
    if st.mount_timeout <= 0 or st.iscsi_timeout <= 0 or st.upload_stall_timeout <= 0:
        raise InvalidConfiguration("[storage] timeouts must be positive")
    if not 1 <= st.ovf_parser_processes <= 64:
        raise InvalidConfiguration("[storage] ovf_parser_processes: must be within 1..64")
    if st.ovf_parser_memory_mib < 256:
        raise InvalidConfiguration("[storage] ovf_parser_memory_mib: must be at least 256")
    if not 1 <= cfg.sanlock.io_timeout <= 300:
        raise InvalidConfiguration("[sanlock] io_timeout: must be within 1..300 seconds")
    if cfg.sanlock.lease_timeout < 0 or cfg.sanlock.monitor_interval <= 0 or \
            cfg.sanlock.host_id_timeout < 0:
        raise InvalidConfiguration("[sanlock] lease_timeout, host_id_timeout and "
                                   "monitor_interval: "
                                   "must be positive")
    w = cfg.watchdog
    if w.backend not in ("device", "emulated", "none"):
        raise InvalidConfiguration(
            f"[watchdog] backend: expected device, emulated or none, got {w.backend!r}")
    if w.backend == "emulated" and w.socket is None:
        raise InvalidConfiguration("[watchdog] backend = emulated needs socket")
    if not 2 <= w.timeout <= 3600:
        raise InvalidConfiguration("[watchdog] timeout: must be within 2..3600 seconds")
    if r.max_concurrent_calls < 1:
        raise InvalidConfiguration("[rpc] max_concurrent_calls: must be at least 1")
    if r.stall_timeout <= 0:
        raise InvalidConfiguration("[rpc] stall_timeout: must be positive")
    tls = (r.tls_cert, r.tls_key, r.tls_ca)
    if any(tls) and not all(tls):
        raise InvalidConfiguration("[rpc] tls_cert, tls_key and tls_ca must be set together")
    if not cfg.tls_enabled and not r.insecure and not is_loopback(r.listen):
        raise InvalidConfiguration(
            f"[rpc] listen: refusing plain TCP on non-loopback address {r.listen!r}; "
            "configure tls_cert/tls_key/tls_ca or set insecure = true"
        )
    if not 0 <= cfg.virt.hotplug_slots <= 24:
        raise InvalidConfiguration("[virt] hotplug_slots: must be within 0..24")
    if cfg.virt.unplug_timeout <= 0:
        raise InvalidConfiguration("[virt] unplug_timeout: must be positive")
    if cfg.virt.migration_destination_timeout <= 0:
        raise InvalidConfiguration("[virt] migration_destination_timeout: must be positive")
    if cfg.virt.max_outgoing_migrations < 1 or cfg.virt.max_incoming_migrations < 1:
        raise InvalidConfiguration("[virt] max_outgoing_migrations, max_incoming_migrations: "
                                   "must be at least 1")
    if cfg.virt.migration_retry_timeout <= 0:
        raise InvalidConfiguration("[virt] migration_retry_timeout: must be positive")
    if cfg.virt.migration_monitor_interval < 0:
        raise InvalidConfiguration("[virt] migration_monitor_interval: must be >= 0")
    if not 1 <= cfg.virt.migration_port_min <= cfg.virt.migration_port_max <= 65535:
        raise InvalidConfiguration("[virt] migration_port_min..migration_port_max: expected "
                                   "1 <= min <= max <= 65535")
    if cfg.virt.migration_listen:
        try:
            ipaddress.ip_address(cfg.virt.migration_listen)
        except ValueError:
            raise InvalidConfiguration(f"[virt] migration_listen: expected an IP address, "
                                       f"got {cfg.virt.migration_listen!r}") from None
    if not re.fullmatch(r"|user|bridge(:[A-Za-z0-9_.-]{1,15})?", cfg.virt.nic_backend):
        # The same syntax vdsmlite.virt.qemu.NIC_BACKEND accepts.
        raise InvalidConfiguration(f"[virt] nic_backend: expected \"\", user, bridge or "
                                   f"bridge:<interface name>, got {cfg.virt.nic_backend!r}")
    if d.host_uuid is not None and parse_uuid(d.host_uuid) is None:
        raise InvalidConfiguration(f"[daemon] host_uuid: {d.host_uuid!r} is not a UUID")


def is_loopback(address: str) -> bool:
    if address == "localhost":
        return True
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def load(
    path: Path | None = None,
    *,
    overrides: dict[str, dict[str, Any]] | None = None,
) -> Config:
    """Build the effective config. `path` None means the system file if present."""
    data: dict[str, Any] = {}
    source = "embedded defaults"
    if path is None and SYSTEM_CONFIG.exists():
        path = SYSTEM_CONFIG
    if path is not None:
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except FileNotFoundError as e:
            raise InvalidConfiguration(f"config file {str(path)!r} does not exist") from e
        except tomllib.TOMLDecodeError as e:
            raise InvalidConfiguration(f"config file {str(path)!r}: {e}") from e
        source = str(path)
    for section, values in (overrides or {}).items():
        data.setdefault(section, {}).update({k: v for k, v in values.items() if v is not None})

    unknown = sorted(set(data) - set(_SECTIONS))
    if unknown:
        raise InvalidConfiguration(f"unknown config section(s): {', '.join(unknown)}")
    sections = {}
    for name, cls in _SECTIONS.items():
        values = data.get(name, {})
        if not isinstance(values, dict):
            raise InvalidConfiguration(f"[{name}] must be a table")
        sections[name] = _build_section(name, cls, values)

    daemon: DaemonSection = sections["daemon"]
    # Relative paths are relative to where the daemon was started, made absolute
    # once so later chdir()s or log lines never disagree about them.
    daemon = dataclasses.replace(
        daemon,
        state_dir=daemon.state_dir.absolute(),
        run_dir=daemon.run_dir.absolute() if daemon.run_dir else None,
    )
    storage: StorageSection = sections["storage"]
    if storage.repository is not None:
        storage = dataclasses.replace(storage, repository=storage.repository.absolute())
    if storage.local_domain is not None:
        storage = dataclasses.replace(storage, local_domain=storage.local_domain.absolute())
    elif source == "embedded defaults":
        storage = dataclasses.replace(storage, local_domain=daemon.state_dir / "local-domain")
    virt: VirtSection = sections["virt"]
    if virt.run_dir is not None:
        virt = dataclasses.replace(virt, run_dir=virt.run_dir.absolute())
    cfg = Config(daemon=daemon, rpc=sections["rpc"], storage=storage,
                 sanlock=sections["sanlock"], watchdog=sections["watchdog"],
                 fencing=sections["fencing"], virt=virt, devel=sections["devel"],
                 source=source)
    _validate(cfg)
    return cfg
