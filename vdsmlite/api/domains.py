"""Storage domains and pools: StorageDomain.*, StoragePool.{create,connect,...},
Host.getStorageDomains and LVMVolumeGroup.create."""

from __future__ import annotations

from typing import Any

from vdsmlite import errors
from vdsmlite.api.base import verb
from vdsmlite.services import Services
from vdsmlite.storage import blocksd, lvm, provision
from vdsmlite.storage import constants as sc
from vdsmlite.storage import devices as devmod
from vdsmlite.storage.provision import device_block_size
from vdsmlite.storage.sd import K_CLASS, K_REMOTE_PATH, K_TYPE, Domain, parse_pools


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
        sizes = {device_block_size(d) for d in devices}
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
        await self._s.run_blocking(
            provision.create_domain, self._s, storagedomainID, st, typeArgs, name=name,
            domain_class=sc.DomainClass(domainClass), block_size=blockSize, max_hosts=maxHosts)
        return True

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
        await self._s.monitors.stop_monitoring(storagedomainID, pool_uuid=storagepoolID)
        await self._s.run_blocking(self._s.pools.detach, storagedomainID, storagepoolID, force)
        return True

    @verb("StorageDomain.activate")
    async def activate(self, *, storagedomainID: str, storagepoolID: str) -> bool:
        await self._s.run_blocking(self._s.pools.activate, storagedomainID, storagepoolID)
        pool = self._s.pools.connected
        if pool is not None and pool.uuid == storagepoolID:
            await self._s.monitors.start_monitoring(storagedomainID, pool.host_id,
                                                    pool_uuid=storagepoolID)
        return True

    @verb("StorageDomain.deactivate")
    async def deactivate(self, *, storagedomainID: str, storagepoolID: str,
                         masterSdUUID: str | None, masterVersion: int) -> bool:
        await self._s.monitors.stop_monitoring(storagedomainID, pool_uuid=storagepoolID)
        await self._s.run_blocking(self._s.pools.deactivate, storagedomainID, storagepoolID)
        return True

    @verb("StorageDomain.format")
    async def format(self, *, storagedomainID: str, autoDetach: bool) -> bool:
        dom = await self._s.run_blocking(self._s.domains.get, storagedomainID)
        pools = await self._s.run_blocking(dom.pools)
        if pools and not autoDetach:
            raise errors.CannotFormatAttachedStorageDomain(storagedomainID, ",".join(pools))
        # Leave the lockspace first: sanlock must let go of the ids volume.
        await self._s.monitors.stop_monitoring(storagedomainID, force=True)
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
        pool = await self._s.run_blocking(self._s.pools.connect, storagepoolID, hostID,
                                          masterSdUUID, masterVersion, domainDict)
        # Each member domain gets a monitor that joins its lockspace as hostID
        # (asynchronously: Host.getStorageRepoStats tells when it is acquired).
        for sd_uuid in pool.domains:
            await self._s.monitors.start_monitoring(sd_uuid, hostID, pool_uuid=storagepoolID)
        return True

    @verb("StoragePool.disconnect")
    async def disconnect_pool(self, *, storagepoolID: str, hostID: int, scsiKey: str,
                              remove: bool) -> bool:
        # Leave the lockspaces first: refused (662) while a lease is held in one.
        await self._s.monitors.stop_pool(storagepoolID)
        await self._s.run_blocking(self._s.pools.disconnect, storagepoolID)
        return True

    @verb("StoragePool.getInfo")
    async def pool_info(self, *, storagepoolID: str) -> dict[str, Any]:
        return await self._s.run_blocking(self._s.pools.info, storagepoolID)
