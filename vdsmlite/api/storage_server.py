"""Storage server connections: StoragePool.(dis)connectStorageServer, iSCSI discovery."""

from __future__ import annotations

from typing import Any

from vdsmlite import errors
from vdsmlite.api.base import verb
from vdsmlite.storage.connections import ConnectionManager
from vdsmlite.storage.iscsi import Chap, valid_host, valid_secret


class StorageServerApi:
    def __init__(self, connections: ConnectionManager) -> None:
        self._connections = connections

    @verb("StoragePool.connectStorageServer")
    async def connect(self, *, storagepoolID: str, domainType: int,
                      connectionParams: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return await self._connections.connect(domainType, connectionParams)

    @verb("StoragePool.disconnectStorageServer")
    async def disconnect(self, *, storagepoolID: str, domainType: int,
                         connectionParams: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return await self._connections.disconnect(domainType, connectionParams)

    @verb("ISCSIConnection.discoverSendTargets")
    async def discover_send_targets(self, *, host: str, port: int, user: str, password: str,
                                    ipv6_enabled: bool) -> list[str]:
        host = host.strip()
        if not valid_host(host.strip("[]")):
            raise errors.InvalidParameterException("host", host)
        if bool(user) != bool(password) or not (valid_secret(user) and valid_secret(password)):
            raise errors.InvalidParameterException("user/password", "CHAP needs both")
        chap = Chap(user, password) if user else None
        return await self._connections.iscsi.discover(
            host.strip("[]"), port, chap, ipv6_enabled=ipv6_enabled)
