"""Storage server connections: what `StoragePool.connectStorageServer` connects.

Each connection dict the engine sends (VDSM's keys, all values as strings)
is parsed and validated into a `Connection` of one kind:

* ``nfs`` (1), ``posixfs`` (6), ``glusterfs`` (7): a mount at
  ``<repository>/mnt/<transformPath(remote)>`` (gluster under ``mnt/glusterSD``),
  NFS with VDSM's options ``soft,nosharecache,timeo=..,retrans=..``;
* ``localfs`` (4): a symlink ``<repository>/mnt/<transformPath(path)>`` -> path;
* ``iscsi`` (3): an open-iscsi node record and session (with CHAP);
* ``fcp`` (2): nothing to connect; the SCSI hosts are rescanned.

The manager keeps a registry of what *this host* connected, persisted in the
state dir, so that after a restart it still knows which mounts and sessions
are its own: disconnect only ever undoes what connect did. Connecting is
idempotent (same id, same params: 0); an id reused with other params is
refused (478). Two ids naming the same mount share it, and it is unmounted
only when the last of them is disconnected. Connect and disconnect of the
same resource are serialized; different resources proceed in parallel.

Per-connection failures never fail the whole call: like VDSM, each connection
gets a status (0 or a VDSM error code).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from vdsmlite import errors
from vdsmlite.blocking import RunBlocking
from vdsmlite.fsutil import write_file_durably
from vdsmlite.storage import commands, mount
from vdsmlite.storage.constants import StorageType
from vdsmlite.storage.iscsi import (
    Chap,
    Iscsiadm,
    Target,
    valid_host,
    valid_iface,
    valid_iqn,
    valid_secret,
)

log = logging.getLogger("vdsmlite.storage.connections")

# What each storage type connects, keyed by the int the engine sends (CIFS, VDSM's 5,
# is not supported).
_KINDS: dict[int, str] = {
    StorageType.NFS: "nfs", StorageType.FCP: "fcp", StorageType.ISCSI: "iscsi",
    StorageType.LOCALFS: "localfs", StorageType.POSIXFS: "posixfs",
    StorageType.GLUSTERFS: "glusterfs",
}

_VFS_RE = re.compile(r"^[a-z0-9_.]{1,32}$")
_OPTIONS_RE = re.compile(r"^[A-Za-z0-9_.=,:/@+-]{0,1024}$")
_NFS_VERSIONS = {"3": "nfsvers=3", "4": "nfsvers=4", "4.0": "nfsvers=4,minorversion=0",
                 "4.1": "nfsvers=4,minorversion=1", "4.2": "nfsvers=4,minorversion=2",
                 "auto": "", "": ""}



# --- parsed connections ----------------------------------------------------------


@dataclass(frozen=True)
class Connection:
    id: str
    kind: str
    # mounts and localfs
    remote: str = ""
    vfs_type: str = ""
    options: str = ""
    path: str = ""  # mount point or symlink
    # iscsi
    address: str = ""
    port: int = 0
    iqn: str = ""
    tpgt: int = 1
    iface: str = "default"
    user: str = ""
    password: str = ""

    @property
    def resource(self) -> str:
        """What is physically connected; ids naming the same resource share it."""
        if self.kind == "iscsi":
            return f"iscsi:{self.target.portal}:{self.iqn}:{self.iface}"
        if self.kind == "fcp":
            return "fcp"
        return self.path

    @property
    def target(self) -> Target:
        return Target(self.address, self.port, self.iqn, self.tpgt, self.iface)

    @property
    def chap(self) -> Chap | None:
        return Chap(self.user, self.password) if self.user else None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        if self.kind == "iscsi":
            return f"iscsi {self.iqn} @ {self.target.portal}"
        if self.kind == "fcp":
            return "fcp"
        return f"{self.kind} {self.remote} -> {self.path}"


def normalize_abs(path: str) -> str | None:
    """An absolute path without '.', '..' or empty components, or None if it has them."""
    if not path.startswith("/") or "\0" in path or "\n" in path:
        return None
    parts = [p for p in path.split("/") if p]
    if any(p in (".", "..") for p in parts):
        return None
    return "/" + "/".join(parts)


def normalize_remote(remote: str) -> str | None:
    """Normalize ``host:/path``, ``[v6]:/path``, ``//host/share`` or ``/abs/path``."""
    if not remote or any(c in remote for c in "\0\n\r\t ") or len(remote) > 1024:
        return None
    if remote.startswith("//"):  # CIFS
        rest = normalize_abs(remote[1:])
        return "/" + rest if rest and rest.count("/") >= 2 else None
    if remote.startswith("/"):
        return normalize_abs(remote)
    m = re.match(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9][A-Za-z0-9.-]*):(/.*)$", remote)
    if not m:
        return None
    host = m.group(1)
    if not host.startswith("[") and not valid_host(host):
        return None
    path = normalize_abs(m.group(2))
    return f"{host}:{path}" if path else None


def mount_root(domain_type: int, remote: str, repository: Path) -> Path:
    """Where connectStorageServer put `remote` (the parent of a file domain's directory)."""
    kind = _KINDS.get(domain_type)
    if kind == "localfs":
        path = normalize_abs(remote)
        if path is None or path == "/":
            raise errors.StorageDomainIllegalRemotePath(remote)
        return Path(_mount_dir(repository, mount.transform_path(path)))
    if kind in ("nfs", "posixfs", "glusterfs"):
        norm = normalize_remote(remote)
        if norm is None:
            raise errors.StorageDomainIllegalRemotePath(remote)
        return Path(_mount_dir(repository, mount.transform_path(norm), gluster=kind == "glusterfs"))
    raise errors.StorageDomainTypeError(domain_type)


def _mount_dir(repository: Path, name: str, gluster: bool = False) -> str:
    if name in (".", "..") or len(name.encode()) > 255:
        raise errors.StorageDomainIllegalRemotePath(name)
    base = repository / "mnt"
    if gluster:
        base = base / "glusterSD"
    return str(base / name)


def _get(params: dict[str, Any], key: str, default: str = "") -> str:
    value = params.get(key)
    return default if value is None else str(value)


def parse(domain_type: int, params: dict[str, Any], repository: Path) -> Connection:
    """Validate one engine connection dict; raises a VdsmError naming what is wrong."""
    kind = _KINDS.get(domain_type)
    if kind is None:
        raise errors.StorageDomainTypeError(domain_type)
    cid = params["id"]

    if kind == "fcp":
        return Connection(cid, kind)

    if kind == "iscsi":
        address = _get(params, "connection").strip()
        iqn = _get(params, "iqn").strip()
        iface = _get(params, "ifaceName").strip() or "default"
        user, password = _get(params, "user"), _get(params, "password")
        if not valid_host(address.strip("[]")):
            raise errors.InvalidParameterException("connection", address)
        if not valid_iqn(iqn):
            raise errors.InvalidParameterException("iqn", iqn)
        if not valid_iface(iface):
            raise errors.InvalidParameterException("ifaceName", iface)
        try:
            port = int(_get(params, "port", "3260") or 3260)
            tpgt = int(_get(params, "tpgt", "1") or 1)
        except ValueError as e:
            raise errors.InvalidParameterException("port/tpgt", params.get("port")) from e
        if not 0 < port < 65536:
            raise errors.InvalidParameterException("port", port)
        if bool(user) != bool(password) or not (valid_secret(user) and valid_secret(password)):
            raise errors.InvalidParameterException("user/password", "CHAP needs both, one line")
        return Connection(cid, kind, address=address.strip("[]"), port=port, iqn=iqn, tpgt=tpgt,
                          iface=iface, user=user, password=password)

    if kind == "localfs":
        raw = _get(params, "connection")
        path = normalize_abs(raw)
        if path is None or path == "/":
            # VDSM's only refusal of a local path is LocalDirectoryConnection.checkTarget's
            # InvalidParameterException (1000); it would link "/" or "/a/../b", we do not.
            raise errors.InvalidParameterException("path", f"{raw} (not a directory)")
        return Connection(cid, kind, remote=path,
                          path=_mount_dir(repository, mount.transform_path(path)))

    # mounts: nfs, posixfs, glusterfs
    raw = _get(params, "connection")
    remote = normalize_remote(raw)
    if remote is None:
        raise errors.StorageDomainIllegalRemotePath(raw)
    user_options = _get(params, "mnt_options")
    if not _OPTIONS_RE.match(user_options):
        raise errors.InvalidParameterException("mnt_options", user_options)
    if kind == "nfs":
        if remote.startswith("/"):
            raise errors.StorageDomainIllegalRemotePath(raw)
        # storageServer._connectionDict2ConnectionInfo: no protocol_version is "3";
        # "auto" (or "") lets the kernel negotiate.
        version = str(params.get("protocol_version", "3")).strip()
        if version not in _NFS_VERSIONS:
            raise errors.InvalidParameterException("protocol_version", version)
        try:
            retrans = int(_get(params, "retrans", "3") or 3)
            timeo = int(_get(params, "timeout", "100") or 100)
        except ValueError as e:
            raise errors.InvalidParameterException("retrans/timeout", params.get("retrans")) \
                from e
        # NFSConnection.__init__: defaults, nfsvers[,minorversion], the engine's options,
        # then "nolock" for a v3 or negotiated ("auto") mount unless they say lock/nolock.
        opts = ["soft", "nosharecache", f"timeo={timeo}", f"retrans={retrans}"]
        if _NFS_VERSIONS[version]:
            opts.append(_NFS_VERSIONS[version])
        extra = [o for o in user_options.split(",") if o]
        opts += extra
        if version in ("3", "auto") and "lock" not in extra and "nolock" not in extra:
            opts.append("nolock")
        return Connection(cid, kind, remote=remote, vfs_type="nfs", options=",".join(opts),
                          path=_mount_dir(repository, mount.transform_path(remote)))
    vfs_type = _get(params, "vfs_type").strip()
    if kind == "glusterfs":
        vfs_type = vfs_type or "glusterfs"
    if not _VFS_RE.match(vfs_type):
        raise errors.InvalidParameterException("vfs_type", vfs_type)
    return Connection(cid, kind, remote=remote, vfs_type=vfs_type, options=user_options,
                      path=_mount_dir(repository, mount.transform_path(remote),
                                      gluster=kind == "glusterfs"))


# --- the manager ---------------------------------------------------------------------


class ConnectionManager:
    def __init__(self, repository: Path, state_file: Path, run_blocking: RunBlocking, *,
                 mount_timeout: float = 90.0, iscsi_timeout: float = 60.0) -> None:
        self.repository = repository
        self._state_file = state_file
        self._run_blocking = run_blocking
        self.mount_timeout = mount_timeout
        self.iscsi = Iscsiadm(iscsi_timeout)
        self._locks: dict[str, asyncio.Lock] = {}
        self._connections: dict[str, Connection] = self._load()

    def _load(self) -> dict[str, Connection]:
        try:
            data = json.loads(self._state_file.read_text())
        except FileNotFoundError:
            return {}
        except ValueError as e:
            # Never guess: an unreadable registry means "this host connected nothing we
            # can prove", which is the safe reading for later disconnects.
            log.error("ignoring unreadable connection registry %s: %s", self._state_file, e)
            return {}
        return {cid: Connection(**c) for cid, c in data.items()}

    async def _save(self) -> None:
        text = json.dumps({cid: c.to_json() for cid, c in self._connections.items()}, indent=1)
        await self._run_blocking(write_file_durably, self._state_file, text)

    def connections(self) -> list[Connection]:
        return list(self._connections.values())

    def _lock(self, resource: str) -> asyncio.Lock:
        return self._locks.setdefault(resource, asyncio.Lock())

    # --- entry points ------------------------------------------------------------

    async def connect(self, domain_type: int, params_list: list[dict[str, Any]]
                      ) -> list[dict[str, Any]]:
        return list(await asyncio.gather(
            *(self._one(domain_type, p, self._connect) for p in params_list)))

    async def disconnect(self, domain_type: int, params_list: list[dict[str, Any]]
                         ) -> list[dict[str, Any]]:
        return list(await asyncio.gather(
            *(self._one(domain_type, p, self._disconnect) for p in params_list)))

    async def _one(self, domain_type: int, params: dict[str, Any],
                   action: Callable[[Connection], Awaitable[None]]) -> dict[str, Any]:
        cid = params["id"]
        try:
            conn = parse(domain_type, params, self.repository)
            async with self._lock(conn.resource):
                await action(conn)
            status = 0
        except errors.VdsmError as e:
            log.warning("connection %s: %s", cid, e)
            status = e.code
        except Exception:
            log.exception("connection %s crashed", cid)
            status = errors.GeneralException.code
        return {"id": cid, "status": status}

    # --- connect -------------------------------------------------------------------

    async def _connect(self, conn: Connection) -> None:
        known = self._connections.get(conn.id)
        if known is not None and known != conn:
            raise errors.StorageServerConnectionRefIdAlreadyInUse(conn.id)
        if conn.kind in ("nfs", "posixfs", "glusterfs"):
            await self._mount(conn)
        elif conn.kind == "localfs":
            await self._run_blocking(_link_local, conn)
        elif conn.kind == "iscsi":
            await self._login(conn)
        else:
            await self._run_blocking(rescan_scsi_hosts)
        if known is None:
            self._connections[conn.id] = conn
            await self._save()
            log.info("connected %s (%s)", conn.id, conn.describe())

    async def _mount(self, conn: Connection) -> None:
        mountpoint = Path(conn.path)
        current = mount.mounted_at(mountpoint)
        if current is not None:
            if mount.same_source(current, conn.remote):
                return  # already mounted (by us before a restart, or another id)
            raise errors.MountError(conn.remote, f"{mountpoint} is busy with {current.source}")
        created = await self._run_blocking(_make_dir, mountpoint)
        try:
            await mount.mount(conn.remote, mountpoint, conn.vfs_type, conn.options,
                              self.mount_timeout)
        except commands.CommandError as e:
            if created:
                await self._run_blocking(_remove_dir, mountpoint)
            detail = "timed out" if e.timed_out else e.err.strip()[-300:]
            raise errors.MountError(conn.remote, detail) from e

    async def _login(self, conn: Connection) -> None:
        target = conn.target
        existed = await self.iscsi.node_exists(target)
        await self.iscsi.add_node(target, conn.chap)
        try:
            await self.iscsi.login(target)
        except errors.VdsmError:
            if not existed:
                await self.iscsi.delete_node(target)
            raise

    # --- disconnect ----------------------------------------------------------------

    async def _disconnect(self, conn: Connection) -> None:
        known = self._connections.get(conn.id)
        if known is None:
            log.info("connection %s was not connected by this host; nothing to undo", conn.id)
            return
        shared = [c for c in self._connections.values()
                  if c.resource == known.resource and c.id != known.id]
        if not shared:
            try:
                if known.kind in ("nfs", "posixfs", "glusterfs"):
                    await self._umount(known)
                elif known.kind == "localfs":
                    await self._run_blocking(_unlink_local, known)
                elif known.kind == "iscsi":
                    await self.iscsi.logout(known.target)
                    await self.iscsi.delete_node(known.target)
            except commands.CommandError as e:
                raise errors.StorageServerDisconnectionError(known.describe(),
                                                             e.err.strip()[-300:]) from e
        del self._connections[conn.id]
        await self._save()
        log.info("disconnected %s (%s)", conn.id, known.describe())

    async def _umount(self, conn: Connection) -> None:
        mountpoint = Path(conn.path)
        if mount.mounted_at(mountpoint) is not None:
            # VDSM forces and detaches NFS: a dead server must not wedge the host.
            nfs = conn.kind == "nfs"
            await mount.umount(mountpoint, force=nfs, lazy=nfs, timeout=self.mount_timeout)
        await self._run_blocking(_remove_dir, mountpoint)


# --- blocking helpers (run in the executor) --------------------------------------------


def _make_dir(path: Path) -> bool:
    """mkdir -p; True if the final directory was created now."""
    if path.is_dir():
        return False
    path.mkdir(parents=True, mode=0o755)
    return True


def _remove_dir(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError, OSError):
        path.rmdir()  # only ever an empty mount point, never a tree


def _link_local(conn: Connection) -> None:
    target = Path(conn.remote)
    if not target.is_dir():
        # storageServer.LocalDirectoryConnection.checkTarget: missing or not a directory
        # is InvalidParameterException('path', path, "not a directory"), status 1000.
        raise errors.InvalidParameterException("path", f"{conn.remote} (not a directory)")
    if not os.access(target, os.R_OK | os.W_OK | os.X_OK):
        raise errors.StorageServerAccessPermissionError(conn.remote)
    link = Path(conn.path)
    if link.is_symlink():
        if os.readlink(link) == conn.remote:
            return
        raise errors.StorageServerConnectionError(conn.remote, f"{link} points elsewhere")
    if link.exists():
        raise errors.StorageServerConnectionError(conn.remote, f"{link} exists")
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(conn.remote)


def _unlink_local(conn: Connection) -> None:
    link = Path(conn.path)
    if link.is_symlink() and os.readlink(link) == conn.remote:
        link.unlink()


def iscsi_sessions_exist() -> bool:
    return any(Path("/sys/class/iscsi_session").glob("session*"))


def rescan_scsi_hosts() -> None:
    """Ask every SCSI host to rescan (FC LUN changes); quiet where there are none."""
    hosts = Path("/sys/class/scsi_host")
    if not hosts.is_dir():
        return
    for host in hosts.iterdir():
        try:
            (host / "scan").write_text("- - -")
        except OSError as e:
            log.warning("cannot rescan %s: %s", host.name, e)
