"""Creating, finding and formatting storage domains, and the VGs block domains live on.

StorageDomain.create, LVMVolumeGroup.create, StorageDomain.format,
Host.getStorageDomains and the embedded default's local domain. The checks
that depend on storage (already exists, not mounted, wrong VG, block size,
LUNs in use) run here, in the executor; plain param checks are the API's job.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

from vdsmlite import errors
from vdsmlite.blocking import RunBlocking
from vdsmlite.fsutil import write_file_durably
from vdsmlite.locking.monitor import MonitorManager
from vdsmlite.storage import blocksd, filesd, lvm, mountinfo
from vdsmlite.storage import connections as connmod
from vdsmlite.storage import constants as sc
from vdsmlite.storage.activation import Activator
from vdsmlite.storage.connections import ConnectionManager
from vdsmlite.storage.domains import DomainStore
from vdsmlite.storage.pool import PoolManager
from vdsmlite.storage.sd import K_CLASS, K_REMOTE_PATH, K_TYPE, Domain, parse_pools
from vdsmlite.storage.users import LunKey, StorageUsers

log = logging.getLogger("vdsmlite.sdm.provision")

# Fixed id of the local domain's connection, so restarts find it in the registry.
LOCAL_CONNECTION_NS = uuid.UUID("4f1f6a52-5b0e-4c2b-9a51-6c6f63616c64")


class DomainProvisioner:
    def __init__(self, *, domains: DomainStore, pools: PoolManager, monitors: MonitorManager,
                 connections: ConnectionManager, activator: Activator, users: StorageUsers,
                 repository: Path, state_dir: Path, io_timeout: int,
                 run_blocking: RunBlocking,
                 formatted: Callable[[str], Awaitable[None]] | None = None) -> None:
        self._domains = domains
        # Told of each domain formatted here: what others keep of it goes too (the
        # OVF_STORE index).
        self._formatted = formatted
        self._users = users
        self._pools = pools
        self._monitors = monitors
        self._connections = connections
        self._activator = activator
        self._repository = repository
        self._state_dir = state_dir
        self._io_timeout = io_timeout
        self._run_blocking = run_blocking

    # --- VGs -----------------------------------------------------------------------------

    async def create_vg(self, name: str, guids: list[str], *, force: bool) -> str:
        """LVMVolumeGroup.create on the LUNs `guids`; returns the VG UUID."""
        for guid in guids:
            # Even with force: wiping a LUN under a running VM destroys its disk.
            self._users.require_unused(LunKey(guid), "make it a PV")

        def create() -> str:
            nodes = {guid: node for node, guid in self._domains.lun_nodes().items()}
            devices = blocksd.check_new_vg(name, guids, nodes, force=force)
            return blocksd.create_vg(name, devices, force=force)

        return await self._run_blocking(create)

    # --- domains -----------------------------------------------------------------------

    async def create_domain(self, sd_uuid: str, st: sc.StorageType, type_args: str, *,
                            name: str, domain_class: sc.DomainClass, block_size: int,
                            max_hosts: int) -> Domain:
        """StorageDomain.create after param checks; the domain joins the store."""

        def create() -> Domain:
            dom = self._create(sd_uuid, st, type_args, name=name, domain_class=domain_class,
                               block_size=block_size, max_hosts=max_hosts)
            self._domains.add(dom)
            return dom

        return await self._run_blocking(create)

    def _create(self, sd_uuid: str, st: sc.StorageType, type_args: str, *, name: str,
                domain_class: sc.DomainClass, block_size: int, max_hosts: int) -> Domain:
        store = self._domains
        if sd_uuid in store.scan():
            raise errors.StorageDomainAlreadyExists(sd_uuid)
        if st.is_file:
            root = connmod.mount_root(int(st), type_args, self._repository)
            if st == sc.StorageType.LOCALFS:
                ready = root.is_symlink() and root.is_dir()
            else:
                ready = mountinfo.find(str(root)) is not None
            if not ready:
                raise errors.StorageDomainFSNotMounted(type_args)
            if st == sc.StorageType.NFS:
                if block_size not in (0, 512):
                    raise errors.StorageDomainBlockSizeMismatch(block_size, 512)
                block_size = 512
            elif block_size == 0:
                block_size = filesd.detect_block_size(root)
            alignment = sc.alignment_for(block_size, max_hosts)
            remote = (connmod.normalize_abs(type_args) if st == sc.StorageType.LOCALFS
                      else connmod.normalize_remote(type_args)) or type_args
            return filesd.create_file_domain(
                root, sd_uuid=sd_uuid, storage_type=st, name=name, domain_class=domain_class,
                block_size=block_size, alignment=alignment, remote_path=remote,
                io_timeout=self._io_timeout)
        if st.is_block:
            nodes = list(store.lun_nodes())
            vgs = lvm.vgs(nodes) if nodes else {}
            vg = next((v for v in vgs.values() if v.uuid == type_args), None)
            if vg is None:
                raise errors.VolumeGroupDoesNotExist(type_args)
            if vg.name != sd_uuid:
                raise errors.StorageDomainCreationError(
                    sd_uuid, f"VG {type_args} was created for domain {vg.name}")
            devices = list(vg.pv_names)
            sizes = {blocksd.device_block_size(d) for d in devices}
            if len(sizes) != 1:
                raise errors.VolumeGroupBlockSizeError(sd_uuid, sorted(sizes))
            device_size = sizes.pop()
            if block_size not in (0, device_size):
                raise errors.StorageDomainBlockSizeMismatch(block_size, device_size)
            return blocksd.create_block_domain(
                vg_name=sd_uuid, devices=devices, storage_type=st, name=name,
                domain_class=domain_class, block_size=device_size,
                alignment=sc.alignment_for(device_size, max_hosts), io_timeout=self._io_timeout,
                activator=self._activator, repository=self._repository,
                guid_of=store.guid_of)
        raise errors.StorageDomainTypeError(int(st))

    async def format_domain(self, sd_uuid: str, *, auto_detach: bool) -> None:
        """StorageDomain.format: leave its lockspace, detach it if asked, destroy it."""
        dom = await self._run_blocking(self._domains.get, sd_uuid)
        pools = await self._run_blocking(dom.pools)
        if pools and not auto_detach:
            raise errors.CannotFormatAttachedStorageDomain(sd_uuid, ",".join(pools))
        # Leave the lockspace first: sanlock must let go of the ids volume.
        await self._monitors.stop_monitoring(sd_uuid, force=True)

        def format_() -> None:
            dom = self._domains.get(sd_uuid)
            pools = dom.pools()  # again: another host may have attached it meanwhile
            if pools and not auto_detach:
                raise errors.CannotFormatAttachedStorageDomain(sd_uuid, ",".join(pools))
            for sp in pools:
                self._pools.detach(sd_uuid, sp, force=True)
            dom.format()
            self._domains.forget(sd_uuid)

        await self._run_blocking(format_)
        if self._formatted is not None:
            await self._formatted(sd_uuid)

    async def find_domains(self, sp_uuid: str | None, domain_class: int | None,
                           storage_type: int | None, remote_path: str | None) -> list[str]:
        """Host.getStorageDomains: every domain visible here that matches the filters."""

        def find() -> list[str]:
            out = []
            for sd_uuid, dom in sorted(self._domains.scan().items()):
                try:
                    md = dom.read_metadata()
                except errors.VdsmError:
                    continue
                if sp_uuid and sp_uuid != sc.BLANK_UUID and \
                        sp_uuid not in parse_pools(md.get("POOL_UUID", "")):
                    continue
                if domain_class is not None and \
                        md.get(K_CLASS) != sc.DomainClass(domain_class).name:
                    continue
                if storage_type not in (None, 0) and \
                        md.get(K_TYPE) != sc.StorageType(storage_type).name:
                    continue
                if remote_path is not None and md.get(K_REMOTE_PATH) != remote_path:
                    continue
                out.append(sd_uuid)
            return out

        return await self._run_blocking(find)

    # --- the embedded default ------------------------------------------------------------

    async def ensure_local_domain(self, path: Path) -> str:
        """The embedded default's local file domain at `path`: connected and created once.

        Its UUID is kept in the state dir; later starts only reconnect it. Returns it.
        """
        id_file = self._state_dir / "local_domain_uuid"
        await self._run_blocking(lambda: path.mkdir(parents=True, exist_ok=True))
        conn_id = str(uuid.uuid5(LOCAL_CONNECTION_NS, str(path)))
        status = await self._connections.connect(
            int(sc.StorageType.LOCALFS), [{"id": conn_id, "connection": str(path)}])
        if status[0]["status"] != 0:
            raise errors.StorageServerConnectionError(str(path), status[0]["status"])

        def create_once() -> str:
            try:
                sd_uuid = id_file.read_text().strip()
            except FileNotFoundError:
                sd_uuid = str(uuid.uuid4())
            if (path / sd_uuid / sc.DOMAIN_META_DATA / sc.METADATA).exists():
                return sd_uuid
            dom = self._create(sd_uuid, sc.StorageType.LOCALFS, str(path), name="local",
                               domain_class=sc.DomainClass.Data, block_size=0, max_hosts=250)
            self._domains.add(dom)
            write_file_durably(id_file, sd_uuid + "\n")
            log.info("created local storage domain %s at %s", sd_uuid, path)
            return sd_uuid

        return await self._run_blocking(create_once)
