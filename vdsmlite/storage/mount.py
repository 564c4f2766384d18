"""mount(8) and umount(8), with timeouts, from the event loop."""

from __future__ import annotations

import os
from pathlib import Path

from vdsmlite.storage import commands, mountinfo


def transform_path(remote: str) -> str:
    """VDSM's mount directory name for a remote path (``nfs1:/a_b`` -> ``nfs1:_a__b``)."""
    return remote.replace("_", "__").replace("/", "_")


def mounted_at(mountpoint: Path) -> mountinfo.Mount | None:
    return mountinfo.find(str(mountpoint))


def same_source(mount: mountinfo.Mount, remote: str) -> bool:
    """Whether what is mounted is `remote` (NFS export, device, or bind source)."""
    if mount.source.rstrip("/") == remote.rstrip("/"):
        return True
    if remote.startswith("/") and os.path.exists(remote):
        try:
            st = os.stat(remote)
        except OSError:
            return False
        if os.path.realpath(mount.source) == os.path.realpath(remote):
            return True
        # A bind mount shows the underlying filesystem's device and the bound directory.
        return os.major(st.st_dev) == mount.devnum[0] and os.minor(st.st_dev) == mount.devnum[1] \
            and mount.root == remote
    return False


async def mount(remote: str, mountpoint: Path, vfs_type: str, options: str,
                timeout: float) -> None:
    argv = ["mount"]
    if vfs_type:
        argv += ["-t", vfs_type]
    if options:
        argv += ["-o", options]
    # "--" : the spec and mount point are never taken for options.
    argv += ["--", remote, str(mountpoint)]
    await commands.run_async(argv, timeout=timeout)


async def umount(mountpoint: Path, *, force: bool, lazy: bool, timeout: float) -> None:
    argv = ["umount"]
    if force:
        argv.append("-f")
    if lazy:
        argv.append("-l")
    argv += ["--", str(mountpoint)]
    await commands.run_async(argv, timeout=timeout)
