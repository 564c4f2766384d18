"""Initialising sanlock areas on storage: domain lockspaces and resources (leases).

Creating a domain formats its ``ids`` lockspace and its ``SDM`` resource;
creating a volume formats the volume's lease. These are on-disk formats owned
by sanlock, so sanlock writes them: ``sanlock direct init`` uses libsanlock's
direct I/O and needs no running daemon, which lets a host create a domain
before it has joined any lockspace (and lets domains be created on machines
where only the sanlock tools are installed).
"""

from __future__ import annotations

from pathlib import Path

from vdsmlite import errors
from vdsmlite.storage import commands

SANLOCK = "sanlock"
NAME_MAX = 48
_ALIGN_ARG = {1 << 20: "1M", 2 << 20: "2M", 4 << 20: "4M", 8 << 20: "8M"}


def _export_path(path: str | Path) -> str:
    # sanlock's "name:path:offset" syntax: ':' and '\' inside a path are escaped.
    return str(path).replace("\\", "\\\\").replace(":", "\\:")


def _name(name: str) -> str:
    if not name or len(name.encode()) > NAME_MAX or ":" in name or "\0" in name:
        raise errors.ClusterLockInitError(f"invalid sanlock name {name!r}")
    return name


def _geometry(sector: int, align: int) -> list[str]:
    if sector not in (512, 4096) or align not in _ALIGN_ARG:
        raise errors.ClusterLockInitError(f"invalid sanlock geometry {sector}/{align}")
    return ["-Z", str(sector), "-A", _ALIGN_ARG[align]]


def init_lockspace(lockspace: str, path: str | Path, *, sector: int, align: int,
                   io_timeout: int, offset: int = 0) -> None:
    """Format a delta-lease area (host id 0 = the whole lockspace) at `offset`."""
    spec = f"{_name(lockspace)}:0:{_export_path(path)}:{offset}"
    try:
        commands.run([SANLOCK, "direct", "init", "-s", spec, *_geometry(sector, align),
                      "-o", str(io_timeout)], timeout=120)
    except commands.CommandError as e:
        raise errors.ClusterLockInitError(str(path), e.err.strip() or e.result.out.strip()) \
            from None


def init_resource(lockspace: str, resource: str, path: str | Path, offset: int, *,
                  sector: int, align: int) -> None:
    """Format one paxos lease (a resource) at `offset`."""
    spec = f"{_name(lockspace)}:{_name(resource)}:{_export_path(path)}:{offset}"
    try:
        commands.run([SANLOCK, "direct", "init", "-r", spec, *_geometry(sector, align)],
                     timeout=120)
    except commands.CommandError as e:
        raise errors.ClusterLockInitError(str(path), e.err.strip() or e.result.out.strip()) \
            from None
