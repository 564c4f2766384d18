"""VM.* and the Host verbs that list VMs: parse the request form, call the VM manager."""

from __future__ import annotations

from typing import Any

from vdsmlite import errors
from vdsmlite.api.base import verb
from vdsmlite.virt import checks, fromovf, migration, migtransport, requests
from vdsmlite.virt.fromovf import OvfVmSource
from vdsmlite.virt.manager import VmManager


class VmApi:
    def __init__(self, vms: VmManager, from_ovf: OvfVmSource) -> None:
        self._vms = vms
        self._from_ovf = from_ovf

    @verb("VM.create")
    async def create(self, *, vmID: str, vmParams: dict[str, Any]) -> dict[str, Any]:
        self._vms.require_ready()  # 99 while recovering, before the request is even read
        if fromovf.is_by_uuid(vmParams):
            return await self._create_from_ovf(vmID, vmParams)
        return await self._vms.create(requests.parse_create(vmID, vmParams))

    async def _create_from_ovf(self, vm_id: str, vm_params: dict[str, Any]) -> dict[str, Any]:
        """Only the VM's id: its definition is its OVF in the newest OVF_STORE."""
        sd_id = vm_params.get("storageDomainID")
        found = await self._from_ovf.params(
            _same_vm(vm_id, vm_params),
            checks.uuid(sd_id, "vmParams.storageDomainID") if sd_id else None)
        params = dict(found.params)
        if "launchPaused" in vm_params:
            params["launchPaused"] = vm_params["launchPaused"]
        defn = requests.parse_create(vm_id, params)
        defn.ignored[:0] = [f"OVF: {w}" for w in found.warnings]
        return await self._vms.create(defn)

    @verb("Host.getVMParamsFromOVF")
    async def get_vm_params_from_ovf(self, *, vmID: str,
                                     storagedomainID: str | None) -> dict[str, Any]:
        found = await self._from_ovf.params(vmID, storagedomainID)
        return found.to_json()

    @verb("VM.destroy")
    async def destroy(self, *, vmID: str, gracefulAttempts: int) -> bool:
        await self._vms.destroy(vmID)
        return True

    @verb("VM.pause")
    async def pause(self, *, vmID: str) -> dict[str, Any]:
        await self._vms.get(vmID).pause()
        return {"vmList": {}}

    @verb("VM.cont")
    async def cont(self, *, vmID: str) -> dict[str, Any]:
        await self._vms.get(vmID).cont()
        return {"vmList": {}}

    @verb("VM.getStats")
    async def get_stats(self, *, vmID: str) -> list[dict[str, Any]]:
        return [await self._vms.get(vmID).stats()]

    @verb("VM.getInfo")
    async def get_info(self, *, vmID: str) -> dict[str, Any]:
        return self._vms.get(vmID).info()

    @verb("VM.hotplugDisk")
    async def hotplug_disk(self, *, vmID: str, params: dict[str, Any]) -> dict[str, Any]:
        self._vms.get(vmID)  # 1 for an unknown VM before its params are read
        return await self._vms.hotplug(vmID, requests.parse_hotplug(vmID, params))

    @verb("VM.hotunplugDisk")
    async def hotunplug_disk(self, *, vmID: str, params: dict[str, Any]) -> dict[str, Any]:
        self._vms.get(vmID)
        disk = requests.parse_hotplug(vmID, params, unplug=True)
        return await self._vms.hotunplug(vmID, disk)

    @verb("VM.snapshot")
    async def snapshot(self, *, vmID: str, snapDrives: list[dict[str, Any]],
                       snapMemory: str | None, frozen: bool, jobUUID: str | None,
                       timeout: int, freeze_timeout: int) -> dict[str, Any]:
        await self._vms.snapshot(vmID, snapDrives, snapMemory)
        return {"quiesce": False}

    @verb("VM.merge")
    async def merge(self, *, vmID: str, drive: dict[str, Any], baseVolUUID: str,
                    topVolUUID: str, bandwidth: int, jobUUID: str) -> bool:
        await self._vms.merge(vmID, drive, base=baseVolUUID, top=topVolUUID,
                             bandwidth=bandwidth, job_id=jobUUID)
        return True

    @verb("VM.mergeAbort")
    async def merge_abort(self, *, vmID: str, jobUUID: str) -> bool:
        await self._vms.merge_abort(vmID, jobUUID)
        return True

    @verb("Image.reconcileVolumeChain")
    async def reconcile_volume_chain(self, *, storagepoolID: str, storagedomainID: str,
                                     imageID: str, leafVolID: str) -> list[str]:
        return await self._vms.reconcile_chain(storagedomainID, imageID, leafVolID)

    @verb("VM.migrate")
    async def migrate(self, *, vmID: str, params: dict[str, Any]) -> bool:
        await self._vms.migrate(vmID, params)
        return True

    @verb("VM.migrateCancel")
    async def migrate_cancel(self, *, vmID: str) -> bool:
        await self._vms.migrate_cancel(vmID)
        return True

    @verb("VM.migrateChangeParams")
    async def migrate_change_params(self, *, vmID: str, params: dict[str, Any]) -> bool:
        await self._vms.migrate_change_params(vmID, params)
        return True

    @verb("VM.getMigrationStatus")
    async def get_migration_status(self, *, vmID: str) -> dict[str, Any]:
        return self._vms.migration_status(vmID)

    @verb("VM.migrationCreate")
    async def migration_create(self, *, vmID: str, params: dict[str, Any],
                               incomingLimit: int) -> dict[str, Any]:
        self._vms.require_ready()
        defn = migration.definition_from_peer(vmID, params) or \
            requests.parse_create(vmID, params)
        if isinstance(incomingLimit, bool) or incomingLimit < 0:
            raise errors.InvalidParameter(f"incomingLimit: must be >= 0, got {incomingLimit!r}")
        return await self._vms.migration_create(
            defn, migtransport.Incoming.from_params(params), incomingLimit)

    @verb("VM.migrationFinish")
    async def migration_finish(self, *, vmID: str, resume: bool) -> dict[str, Any]:
        return await self._vms.migration_finish(vmID, resume)

    @verb("Host.getVMList")
    async def get_vm_list(self, *, fullStatus: bool, vmList: list[str],
                          onlyUUID: bool) -> list[Any]:
        vms = self._vms.vms(vmList)
        if onlyUUID:
            return [vm.id for vm in vms]
        return [vm.info() if fullStatus else vm.short_status() for vm in vms]

    @verb("Host.getVMFullList")
    async def get_vm_full_list(self, *, vmList: list[str]) -> list[dict[str, Any]]:
        return [vm.info() for vm in self._vms.vms(vmList)]

    @verb("Host.getAllVmStats")
    async def get_all_vm_stats(self) -> list[dict[str, Any]]:
        return [await vm.stats() for vm in self._vms.vms()]


def _same_vm(vm_id: str, vm_params: dict[str, Any]) -> str:
    vm_id = checks.uuid(vm_id, "vmID")
    own = vm_params.get("vmId")
    if own not in (None, "") and checks.uuid(own, "vmParams.vmId") != vm_id:
        raise checks.invalid("vmParams.vmId", f"{own} is not the vmID {vm_id}")
    return vm_id
