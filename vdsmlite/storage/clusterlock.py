"""Initialising sanlock areas on storage: domain lockspaces and resources (leases).

Creating a domain formats its ``ids`` lockspace and its ``SDM`` resource;
creating a volume formats the volume's lease. These are on-disk formats owned
by sanlock, so sanlock writes them: through the client library, which asks
this host's sanlock daemon to do the I/O (as VDSM does, so a host without a
running sanlock cannot create shared domains - it could not use them either).
"""

from __future__ import annotations

from pathlib import Path

from vdsmlite import errors
from vdsmlite.locking import sanlock


def init_lockspace(lockspace: str, path: str | Path, *, sector: int, align: int,
                   io_timeout: int, offset: int = 0) -> None:
    """Format a delta-lease area at `offset`, with the io_timeout hosts will join with
    (sanlock's first join waits for the one on disk)."""
    try:
        sanlock.write_lockspace(lockspace, str(path), offset, io_timeout=io_timeout,
                                align=align, sector=sector)
    except (sanlock.SanlockError, ValueError) as e:
        raise errors.ClusterLockInitError(str(path), str(e)) from e


def init_resource(lockspace: str, resource: str, path: str | Path, offset: int, *,
                  sector: int, align: int) -> None:
    """Format one paxos lease (a resource) at `offset`."""
    try:
        sanlock.write_resource(lockspace, resource, [(str(path), offset)], align=align,
                               sector=sector)
    except (sanlock.SanlockError, ValueError) as e:
        raise errors.ClusterLockInitError(str(path), str(e)) from e
