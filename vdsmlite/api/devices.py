"""Host.getDeviceList and Host.getDevicesVisibility: the host's SAN as the engine sees it."""

from __future__ import annotations

import os
from typing import Any

from vdsmlite.api.base import verb
from vdsmlite.blocking import RunBlocking
from vdsmlite.storage import connections, devices
from vdsmlite.storage.connections import ConnectionManager
from vdsmlite.storage.constants import StorageType

# Host.getDeviceList(storageType=...): which LUN transports (`devices.DevType`) it wants.
_WANTED_DEVTYPES: dict[int, set[devices.DevType]] = {
    StorageType.ISCSI: {devices.DevType.ISCSI, devices.DevType.MIXED},
    StorageType.FCP: {devices.DevType.FCP, devices.DevType.MIXED},
}


def _pathlist(lun: devices.Lun) -> list[dict[str, str]]:
    seen = []
    for p in lun.paths:
        if p.iscsi is None:
            continue
        entry = {"connection": p.iscsi.address, "port": str(p.iscsi.port), "iqn": p.iscsi.iqn,
                 "portal": str(p.iscsi.tpgt), "initiatorname": p.iscsi.iface}
        if entry not in seen:
            seen.append(entry)
    return seen


def device_info(lun: devices.Lun, status: devices.Status) -> dict[str, Any]:
    pv = status.pv
    return {
        "GUID": lun.guid,
        "capacity": str(lun.capacity),
        "devtype": lun.devtype,
        "vendorID": lun.vendor,
        "productID": lun.product,
        "serial": lun.serial,
        "fwrev": lun.fwrev,
        "logicalblocksize": str(lun.logical_block_size),
        "physicalblocksize": str(lun.physical_block_size),
        "discard_max_bytes": lun.discard_max_bytes,
        "discard_zeroes_data": lun.discard_zeroes_data,
        "pathlist": _pathlist(lun),
        "pathstatus": [{"type": p.transport, "physdev": p.name, "state": p.state,
                        "capacity": str(lun.capacity), "lun": str(p.lun)} for p in lun.paths],
        "pvUUID": pv.uuid if pv else "",
        "pvsize": str(pv.size) if pv else "",
        "vgUUID": pv.vg_uuid if pv else "",
        "status": status.state,
    }


class DevicesApi:
    def __init__(self, connections: ConnectionManager, run_blocking: RunBlocking) -> None:
        self._connections = connections
        self._run_blocking = run_blocking

    async def _refresh(self) -> None:
        # Only rescan what exists: no subprocess at all on a host without sessions.
        if await self._run_blocking(connections.iscsi_sessions_exist):
            await self._connections.iscsi.rescan_sessions()
        await self._run_blocking(connections.rescan_scsi_hosts)

    async def _discover(self) -> list[devices.Lun]:
        return await self._run_blocking(devices.discover)

    @verb("Host.getDeviceList")
    async def get_device_list(self, *, storageType: int | None, guids: list[str],
                              checkStatus: bool, refresh: bool) -> list[dict[str, Any]]:
        if refresh:
            await self._refresh()
        luns = await self._discover()
        if storageType not in (None, 0):
            wanted = _WANTED_DEVTYPES.get(storageType, set())
            luns = [lun for lun in luns if lun.devtype in wanted]
        if guids:
            wanted_guids = set(guids)
            luns = [lun for lun in luns if lun.guid in wanted_guids]
        statuses = await self._run_blocking(devices.statuses, luns, check=checkStatus)
        # A LUN that vanished between listing and probing is simply not there any more.
        return [device_info(lun, statuses[lun.guid]) for lun in luns if lun.guid in statuses]

    @verb("Host.getDevicesVisibility")
    async def get_devices_visibility(self, *, guidList: list[str]) -> dict[str, bool]:
        luns = {lun.guid: lun for lun in await self._discover()}

        def visible(guid: str) -> bool:
            lun = luns.get(guid)
            return lun is not None and lun.capacity > 0 and os.access(lun.node, os.R_OK)

        return {guid: visible(guid) for guid in guidList}

