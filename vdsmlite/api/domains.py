"""Storage domains and pools: StorageDomain.*, StoragePool.{create,connect,...},
Host.getStorageDomains and LVMVolumeGroup.create."""

from __future__ import annotations

from typing import Any

from vdsmlite import errors
from vdsmlite.api.base import verb
from vdsmlite.blocking import RunBlocking
from vdsmlite.sdm.pools import PoolService
from vdsmlite.sdm.provision import DomainProvisioner
from vdsmlite.sdm.spm import SpmService
from vdsmlite.sdm.volumes import VolumeService
from vdsmlite.storage import constants as sc
from vdsmlite.storage.domains import DomainStore
from vdsmlite.storage.sd import Domain


class DomainsApi:
    def __init__(self, *, domains: DomainStore, provisioner: DomainProvisioner,
                 pools: PoolService, spm: SpmService, volumes: VolumeService,
                 run_blocking: RunBlocking) -> None:
        self._domains = domains
        self._spm = spm
        self._provisioner = provisioner
        self._pools = pools
        self._volumes = volumes
        self._run_blocking = run_blocking

    async def _domain(self, sd_uuid: str) -> Domain:
        dom: Domain = await self._run_blocking(self._domains.get, sd_uuid)
        return dom

    # --- LVMVolumeGroup -----------------------------------------------------------------

    @verb("LVMVolumeGroup.create")
    async def create_vg(self, *, name: str, devlist: list[str], force: bool) -> str:
        return await self._provisioner.create_vg(name, devlist, force=force)

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
        await self._provisioner.create_domain(
            storagedomainID, st, typeArgs, name=name, domain_class=sc.DomainClass(domainClass),
            block_size=blockSize, max_hosts=maxHosts)
        return True

    @verb("StorageDomain.getInfo")
    async def get_info(self, *, storagedomainID: str) -> dict[str, Any]:
        dom = await self._domain(storagedomainID)
        return await self._run_blocking(dom.info)

    @verb("StorageDomain.getStats")
    async def get_stats(self, *, storagedomainID: str) -> dict[str, Any]:
        dom = await self._domain(storagedomainID)
        return await self._run_blocking(dom.stats)

    @verb("StorageDomain.getImages")
    async def get_images(self, *, storagedomainID: str) -> list[str]:
        dom = await self._domain(storagedomainID)
        return await self._run_blocking(dom.image_ids)

    @verb("StorageDomain.getVolumes")
    async def get_volumes(self, *, storagedomainID: str, storagepoolID: str,
                          imageID: str) -> list[str]:
        dom = await self._domain(storagedomainID)
        return await self._run_blocking(dom.volume_ids, imageID)

    @verb("StorageDomain.dump")
    async def dump(self, *, sd_id: str, full: bool) -> dict[str, Any]:
        if full:
            raise errors.UnsupportedOperation("full dump (sanlock leases) is not supported")
        return await self._volumes.dump(sd_id)

    @verb("StorageDomain.attach")
    async def attach(self, *, storagedomainID: str, storagepoolID: str) -> bool:
        await self._pools.attach(storagedomainID, storagepoolID)
        return True

    @verb("StorageDomain.detach")
    async def detach(self, *, storagedomainID: str, storagepoolID: str, masterSdUUID: str | None,
                     masterVersion: int, force: bool) -> bool:
        await self._pools.detach(storagedomainID, storagepoolID, force=force)
        return True

    @verb("StorageDomain.activate")
    async def activate(self, *, storagedomainID: str, storagepoolID: str) -> bool:
        await self._pools.activate(storagedomainID, storagepoolID)
        return True

    @verb("StorageDomain.deactivate")
    async def deactivate(self, *, storagedomainID: str, storagepoolID: str,
                         masterSdUUID: str | None, masterVersion: int) -> bool:
        await self._pools.deactivate(storagedomainID, storagepoolID)
        return True

    @verb("StorageDomain.format")
    async def format(self, *, storagedomainID: str, autoDetach: bool) -> bool:
        await self._provisioner.format_domain(storagedomainID, auto_detach=autoDetach)
        return True

    @verb("Host.getStorageDomains")
    async def get_storage_domains(self, *, storagepoolID: str | None, domainClass: int | None,
                                  storageType: int | None, remotePath: str | None) -> list[str]:
        return await self._provisioner.find_domains(storagepoolID, domainClass, storageType,
                                                    remotePath)

    # --- StoragePool -----------------------------------------------------------------

    @verb("StoragePool.create")
    async def create_pool(self, *, storagepoolID: str, name: str, masterSdUUID: str,
                          masterVersion: int, domainList: list[str],
                          lockRenewalIntervalSec: int | None, leaseTimeSec: int | None,
                          ioOpTimeoutSec: int | None, leaseRetries: int | None) -> bool:
        await self._pools.create(storagepoolID, name, masterSdUUID, masterVersion, domainList)
        return True

    @verb("StoragePool.connect")
    async def connect_pool(self, *, storagepoolID: str, hostID: int, scsiKey: str,
                           masterSdUUID: str, masterVersion: int,
                           domainDict: dict[str, str] | None) -> bool:
        await self._pools.connect(storagepoolID, hostID, masterSdUUID, masterVersion,
                                  domainDict)
        return True

    @verb("StoragePool.disconnect")
    async def disconnect_pool(self, *, storagepoolID: str, hostID: int, scsiKey: str,
                              remove: bool) -> bool:
        self._spm.require_not_spm(storagepoolID)
        await self._pools.disconnect(storagepoolID)
        return True

    @verb("StoragePool.spmStart")
    async def spm_start(self, *, storagepoolID: str, prevID: int, prevLver: int,
                        enableScsiFencing: bool, maxHostID: int | None,
                        domVersion: int | None) -> str:
        return await self._spm.start(storagepoolID, prevID, prevLver,
                                     sc.MAX_HOST_ID if maxHostID is None else maxHostID,
                                     domVersion)

    @verb("StoragePool.spmStop")
    async def spm_stop(self, *, storagepoolID: str) -> bool:
        await self._spm.stop(storagepoolID)
        return True

    @verb("StoragePool.getSpmStatus")
    async def spm_status(self, *, storagepoolID: str) -> dict[str, Any]:
        return await self._spm.status(storagepoolID)

    @verb("StoragePool.getInfo")
    async def pool_info(self, *, storagepoolID: str) -> dict[str, Any]:
        info = await self._pools.info(storagepoolID)
        if info["info"].get("pool_status") == "connected":
            # As VDSM's memory backend: the SPM's id and lver from the lease on storage.
            try:
                spm = await self._spm.status(storagepoolID)
            except errors.VdsmError:
                pass
            else:
                info["info"].update(spm_id=spm["spmId"], lver=spm["spmLver"])
        return info
