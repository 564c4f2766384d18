"""Storage domains and pools: StorageDomain.*, StoragePool.{create,connect,...},
Host.getStorageDomains and LVMVolumeGroup.create."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from vdsmlite import errors
from vdsmlite.api.base import verb
from vdsmlite.services import Services
from vdsmlite.storage import blocksd, connections, filesd, lvm, mountinfo
from vdsmlite.storage import constants as sc
from vdsmlite.storage import devices as devmod
from vdsmlite.storage.sd import K_CLASS, K_REMOTE_PATH, K_TYPE, Domain, parse_pools


def _device_block_size(node: str) -> int:
    name = os.path.basename(os.path.realpath(node))
    return int(Path(f"/sys/class/block/{name}/queue/logical_block_size").read_text())


class DomainsApi:
    def __init__(self, services: Services) -> None:
        self._s = services

    async def _domain(self, sd_uuid: str) -> Domain:
        return await self._s.run_blocking(self._s.domains.get, sd_uuid)

    # --- LVMVolumeGroup -----------------------------------------------------------------

    @verb("LVMVolumeGroup.create")
    async def create_vg(self, *, name: str, devlist: list[str], force: bool) -> str:
        return await self._s.run_blocking(self._create_vg, name, devlist, force)

    def _create_vg(self, name: str, devlist: list[str], force: bool) -> str:
        if not devlist:
            raise errors.InvalidParameterException("devlist", "empty")
        store = self._s.domains
        nodes = {guid: node for node, guid in store.lun_nodes().items()}
        missing = [g for g in devlist if g not in nodes]
        if missing:
            raise errors.InaccessiblePhysDev(missing)
        devices = [nodes[g] for g in devlist]
        if len(set(devices)) != len(devices):
            raise errors.InvalidParameterException("devlist", "duplicate devices")
        if lvm.vgs(devices, [name]):
            raise errors.VolumeGroupAlreadyExistsError(name)
        sizes = {_device_block_size(d) for d in devices}
        if len(sizes) != 1:
            raise errors.VolumeGroupBlockSizeError(name, sorted(sizes))
        luns = [lun for lun in devmod.discover() if lun.guid in set(devlist)]
        total = sum(lun.capacity for lun in luns)
        if total < sc.MIN_VG_SIZE:
            raise errors.VolumeGroupSizeError(name, f"{total} < {sc.MIN_VG_SIZE} bytes")
        if not force:
            statuses = devmod.statuses(luns, check=True)
            used = [g for g, st in statuses.items() if st.state != "free"]
            if used:
                raise errors.VolumeGroupCreateError(name, ",".join(used),
                                                    "LUNs are in use (force=true to wipe)")
        return blocksd.create_vg(name, devices, force=force)

    # --- StorageDomain ---------------------------------------------------------------

    @verb("StorageDomain.create")
    async def create(self, *, storagedomainID: str, domainType: int, typeArgs: str, name: str,
                     domainClass: int, version: int | None, blockSize: int,
                     maxHosts: int) -> bool:
        st = sc.StorageType(domainType)
        if version is not None and version not in sc.SUPPORTED_VERSIONS:
            raise errors.UnsupportedDomainVersion(version)
        if len(name) > sc.MAX_DOMAIN_DESCRIPTION_SIZE:
            raise errors.StorageDomainDescriptionTooLongError(name)
        if "\n" in name:
            raise errors.InvalidParameterException("name", name)
        if blockSize not in (0, 512, 4096):
            raise errors.InvalidParameterException("blockSize", blockSize)
        dom = await self._s.run_blocking(
            self._create, storagedomainID, st, typeArgs, name=name,
            domain_class=sc.DomainClass(domainClass), block_size=blockSize, max_hosts=maxHosts)
        self._s.domains.add(dom)
        return True

    def _create(self, sd_uuid: str, st: sc.StorageType, type_args: str, *, name: str,
                domain_class: sc.DomainClass, block_size: int, max_hosts: int) -> Domain:
        store = self._s.domains
        if sd_uuid in store.scan():
            raise errors.StorageDomainAlreadyExists(sd_uuid)
        io_timeout = self._s.config.sanlock.io_timeout
        if st.is_file:
            root = connections.mount_root(int(st), type_args, self._s.config.repository)
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
            sizes = {_device_block_size(d) for d in devices}
            if len(sizes) != 1:
                raise errors.VolumeGroupBlockSizeError(sd_uuid, sorted(sizes))
            device_size = sizes.pop()
            if block_size not in (0, device_size):
                raise errors.StorageDomainBlockSizeMismatch(block_size, device_size)
            return blocksd.create_block_domain(
                vg_name=sd_uuid, devices=devices, storage_type=st, name=name,
                domain_class=domain_class, block_size=device_size,
                alignment=sc.alignment_for(device_size, max_hosts), io_timeout=io_timeout,
                activator=self._s.activator, repository=self._s.config.repository,
                guid_of=store.guid_of)
        raise errors.StorageDomainTypeError(int(st))

    @verb("StorageDomain.getInfo")
    async def get_info(self, *, storagedomainID: str) -> dict[str, Any]:
        dom = await self._domain(storagedomainID)
        return await self._s.run_blocking(dom.info)

    @verb("StorageDomain.getStats")
    async def get_stats(self, *, storagedomainID: str) -> dict[str, Any]:
        dom = await self._domain(storagedomainID)
        return await self._s.run_blocking(dom.stats)

    @verb("StorageDomain.getImages")
    async def get_images(self, *, storagedomainID: str) -> list[str]:
        dom = await self._domain(storagedomainID)
        return await self._s.run_blocking(dom.image_ids)

    @verb("StorageDomain.getVolumes")
    async def get_volumes(self, *, storagedomainID: str, storagepoolID: str,
                          imageID: str) -> list[str]:
        dom = await self._domain(storagedomainID)
        return await self._s.run_blocking(dom.volume_ids, imageID)

    @verb("StorageDomain.dump")
    async def dump(self, *, sd_id: str, full: bool) -> dict[str, Any]:
        if full:
            raise errors.UnsupportedOperation("full dump (sanlock leases) is not supported")
        dom = await self._domain(sd_id)
        return await self._s.run_blocking(self._dump, dom)

    @staticmethod
    def _dump(dom: Domain) -> dict[str, Any]:
        volumes: dict[str, Any] = {}
        for img in dom.image_ids():
            for vol_uuid, state in dom.volumes(img).items():
                entry: dict[str, Any] = {"image": img, "status": state.status,
                                         "legality": state.legality,
                                         "apparentsize": state.apparent_size,
                                         "truesize": state.true_size}
                if state.md is not None:
                    md = state.md
                    entry.update(capacity=md.capacity, ctime=md.ctime,
                                 description=md.description, disktype=md.disktype,
                                 format=md.format, generation=md.generation,
                                 sequence=md.sequence, parent=md.parent, type=md.type,
                                 voltype=md.voltype)
                if state.slot is not None:
                    entry["mdslot"] = state.slot
                volumes[vol_uuid] = entry
        return {"metadata": dom.info(), "volumes": volumes}

    @verb("StorageDomain.attach")
    async def attach(self, *, storagedomainID: str, storagepoolID: str) -> bool:
        await self._s.run_blocking(self._s.pools.attach, storagedomainID, storagepoolID)
        return True

    @verb("StorageDomain.detach")
    async def detach(self, *, storagedomainID: str, storagepoolID: str, masterSdUUID: str | None,
                     masterVersion: int, force: bool) -> bool:
        await self._s.run_blocking(self._s.pools.detach, storagedomainID, storagepoolID, force)
        return True

    @verb("StorageDomain.activate")
    async def activate(self, *, storagedomainID: str, storagepoolID: str) -> bool:
        await self._s.run_blocking(self._s.pools.activate, storagedomainID, storagepoolID)
        return True

    @verb("StorageDomain.deactivate")
    async def deactivate(self, *, storagedomainID: str, storagepoolID: str,
                         masterSdUUID: str | None, masterVersion: int) -> bool:
        await self._s.run_blocking(self._s.pools.deactivate, storagedomainID, storagepoolID)
        return True

    @verb("StorageDomain.format")
    async def format(self, *, storagedomainID: str, autoDetach: bool) -> bool:
        await self._s.run_blocking(self._format, storagedomainID, autoDetach)
        return True

    def _format(self, sd_uuid: str, auto_detach: bool) -> None:
        dom = self._s.domains.get(sd_uuid)
        pools = dom.pools()
        if pools and not auto_detach:
            raise errors.CannotFormatAttachedStorageDomain(sd_uuid, ",".join(pools))
        for sp in pools:
            self._s.pools.detach(sd_uuid, sp, force=True)
        dom.format()
        self._s.domains.forget(sd_uuid)

    @verb("Host.getStorageDomains")
    async def get_storage_domains(self, *, storagepoolID: str | None, domainClass: int | None,
                                  storageType: int | None, remotePath: str | None) -> list[str]:
        return await self._s.run_blocking(self._list, storagepoolID, domainClass, storageType,
                                          remotePath)

    def _list(self, sp_uuid: str | None, domain_class: int | None, storage_type: int | None,
              remote_path: str | None) -> list[str]:
        out = []
        for sd_uuid, dom in sorted(self._s.domains.scan().items()):
            try:
                md = dom.read_metadata()
            except errors.VdsmError:
                continue
            if sp_uuid and sp_uuid != sc.BLANK_UUID and \
                    sp_uuid not in parse_pools(md.get("POOL_UUID", "")):
                continue
            if domain_class is not None and md.get(K_CLASS) != sc.DomainClass(domain_class).name:
                continue
            if storage_type not in (None, 0) and \
                    md.get(K_TYPE) != sc.StorageType(storage_type).name:
                continue
            if remote_path is not None and md.get(K_REMOTE_PATH) != remote_path:
                continue
            out.append(sd_uuid)
        return out

    # --- StoragePool -----------------------------------------------------------------

    @verb("StoragePool.create")
    async def create_pool(self, *, storagepoolID: str, name: str, masterSdUUID: str,
                          masterVersion: int, domainList: list[str],
                          lockRenewalIntervalSec: int | None, leaseTimeSec: int | None,
                          ioOpTimeoutSec: int | None, leaseRetries: int | None) -> bool:
        await self._s.run_blocking(self._s.pools.create, storagepoolID, name, masterSdUUID,
                                   masterVersion, domainList)
        return True

    @verb("StoragePool.connect")
    async def connect_pool(self, *, storagepoolID: str, hostID: int, scsiKey: str,
                           masterSdUUID: str, masterVersion: int,
                           domainDict: dict[str, str] | None) -> bool:
        await self._s.run_blocking(self._s.pools.connect, storagepoolID, hostID, masterSdUUID,
                                   masterVersion, domainDict)
        return True

    @verb("StoragePool.disconnect")
    async def disconnect_pool(self, *, storagepoolID: str, hostID: int, scsiKey: str,
                              remove: bool) -> bool:
        await self._s.run_blocking(self._s.pools.disconnect, storagepoolID)
        return True

    @verb("StoragePool.getInfo")
    async def pool_info(self, *, storagepoolID: str) -> dict[str, Any]:
        return await self._s.run_blocking(self._s.pools.info, storagepoolID)
