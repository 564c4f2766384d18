"""Verb handlers, grouped by VDSM namespace.

Handlers are thin: they take coerced params (named exactly as in the schema),
call domain code, and shape the result VDSM's way. Each namespace is a class
whose methods carry `@verb("Namespace.method")`; `build_handlers` binds them.
"""

from __future__ import annotations

from vdsmlite.api.base import collect
from vdsmlite.api.devices import DevicesApi
from vdsmlite.api.domains import DomainsApi
from vdsmlite.api.host import HostApi
from vdsmlite.api.locking import LockingApi
from vdsmlite.api.ovf import OvfApi
from vdsmlite.api.storage_server import StorageServerApi
from vdsmlite.api.task import TaskApi
from vdsmlite.api.volumes import VolumesApi
from vdsmlite.ovfservice import OvfService
from vdsmlite.rpc.dispatch import Handler
from vdsmlite.services import Services


def build_handlers(services: Services, ovf: OvfService) -> dict[str, Handler]:
    handlers: dict[str, Handler] = {}
    namespaces = (HostApi(services), TaskApi(services), DevicesApi(services),
                  StorageServerApi(services), DomainsApi(services), VolumesApi(services),
                  OvfApi(services, ovf), LockingApi(services))
    for namespace in namespaces:
        for name, fn in collect(namespace).items():
            if name in handlers:
                raise RuntimeError(f"verb {name} bound twice")
            handlers[name] = fn
    return handlers
