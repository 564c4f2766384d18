"""Creating storage domains (StorageDomain.create and the embedded local domain).

Blocking: runs in the executor. Checks that depend on storage happen here
(already exists, not mounted, wrong VG, block size); plain param checks are the
API's job.
"""

from __future__ import annotations

import logging
import os
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

from vdsmlite import errors
from vdsmlite.fsutil import write_file_durably
from vdsmlite.storage import blocksd, connections, filesd, lvm, mountinfo
from vdsmlite.storage import constants as sc
from vdsmlite.storage.sd import Domain

if TYPE_CHECKING:
    from vdsmlite.services import Services

log = logging.getLogger("vdsmlite.storage.provision")


def device_block_size(node: str) -> int:
    name = os.path.basename(os.path.realpath(node))
    return int(Path(f"/sys/class/block/{name}/queue/logical_block_size").read_text())


def create_domain(services: Services, sd_uuid: str, st: sc.StorageType, type_args: str, *,
                  name: str, domain_class: sc.DomainClass, block_size: int,
                  max_hosts: int) -> Domain:
    """StorageDomain.create after param checks (blocking); the domain joins the store."""
    dom = _create(services, sd_uuid, st, type_args, name=name, domain_class=domain_class,
                  block_size=block_size, max_hosts=max_hosts)
    services.domains.add(dom)
    return dom


def _create(services: Services, sd_uuid: str, st: sc.StorageType, type_args: str, *,
            name: str, domain_class: sc.DomainClass, block_size: int,
            max_hosts: int) -> Domain:
    store = services.domains
    if sd_uuid in store.scan():
        raise errors.StorageDomainAlreadyExists(sd_uuid)
    io_timeout = services.config.sanlock.io_timeout
    if st.is_file:
        root = connections.mount_root(int(st), type_args, services.config.repository)
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
        remote = (connections.normalize_abs(type_args) if st == sc.StorageType.LOCALFS
                  else connections.normalize_remote(type_args)) or type_args
        return filesd.create_file_domain(
            root, sd_uuid=sd_uuid, storage_type=st, name=name, domain_class=domain_class,
            block_size=block_size, alignment=alignment, remote_path=remote,
            io_timeout=io_timeout)
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
        sizes = {device_block_size(d) for d in devices}
        if len(sizes) != 1:
            raise errors.VolumeGroupBlockSizeError(sd_uuid, sorted(sizes))
        device_size = sizes.pop()
        if block_size not in (0, device_size):
            raise errors.StorageDomainBlockSizeMismatch(block_size, device_size)
        return blocksd.create_block_domain(
            vg_name=sd_uuid, devices=devices, storage_type=st, name=name,
            domain_class=domain_class, block_size=device_size,
            alignment=sc.alignment_for(device_size, max_hosts), io_timeout=io_timeout,
            activator=services.activator, repository=services.config.repository,
            guid_of=store.guid_of)
    raise errors.StorageDomainTypeError(int(st))



# Fixed id of the local domain's connection, so restarts find it in the registry.
LOCAL_CONNECTION_NS = uuid.UUID("4f1f6a52-5b0e-4c2b-9a51-6c6f63616c64")


async def ensure_local_domain(services: Services, path: Path) -> str:
    """The embedded default's local file domain at `path`: connected and created once.

    Its UUID is kept in the state dir; later starts only reconnect it. Returns it.
    """
    id_file = services.config.state_dir / "local_domain_uuid"
    await services.run_blocking(lambda: path.mkdir(parents=True, exist_ok=True))
    conn_id = str(uuid.uuid5(LOCAL_CONNECTION_NS, str(path)))
    status = await services.connections.connect(
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
        create_domain(services, sd_uuid, sc.StorageType.LOCALFS, str(path), name="local",
                      domain_class=sc.DomainClass.Data, block_size=0, max_hosts=250)
        write_file_durably(id_file, sd_uuid + "\n")
        log.info("created local storage domain %s at %s", sd_uuid, path)
        return sd_uuid

    return await services.run_blocking(create_once)
