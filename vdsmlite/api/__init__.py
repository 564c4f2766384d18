"""Verb handlers, one class per area (several VDSM namespaces may share one).

Handlers are thin: they take coerced params (named exactly as in the schema),
call one operation of the services below, and shape the result VDSM's way.
Each class gets the services it uses at construction; its methods carry
`@verb("Namespace.method")`, and `build_handlers` binds them.
"""

from __future__ import annotations

from vdsmlite.api.base import collect
from vdsmlite.api.devices import DevicesApi
from vdsmlite.api.domains import DomainsApi
from vdsmlite.api.host import HostApi
from vdsmlite.api.lease import LeaseApi
from vdsmlite.api.locking import LockingApi
from vdsmlite.api.ovf import OvfApi
from vdsmlite.api.sdm import SdmApi
from vdsmlite.api.storage_server import StorageServerApi
from vdsmlite.api.task import TaskApi
from vdsmlite.api.vm import VmApi
from vdsmlite.api.volumes import VolumesApi
from vdsmlite.rpc.dispatch import Handler
from vdsmlite.services import Services


def build_handlers(s: Services) -> dict[str, Handler]:
    namespaces = (
        HostApi(host_uuid=s.host_uuid, started=s.started, jobs=s.jobs, monitors=s.monitors,
                watchdog=s.watchdog, fencing=s.fencing, metrics=s.metrics,
                run_blocking=s.run_blocking),
        TaskApi(s.jobs),
        DevicesApi(s.connections, s.run_blocking),
        StorageServerApi(s.connections),
        DomainsApi(domains=s.domains, provisioner=s.provisioner, pools=s.pool_service,
                   spm=s.spm, volumes=s.volumes, run_blocking=s.run_blocking),
        VolumesApi(s.volumes),
        OvfApi(s.ovf),
        SdmApi(s.sdm_jobs, s.overview),
        VmApi(s.vms, s.vms_from_ovf),
        LeaseApi(s.external_leases),
        LockingApi(domains=s.domains, monitors=s.monitors, fencing=s.fencing,
                   agents=s.fence_agents, run_blocking=s.run_blocking),
    )
    handlers: dict[str, Handler] = {}
    for namespace in namespaces:
        for name, fn in collect(namespace).items():
            if name in handlers:
                raise RuntimeError(f"verb {name} bound twice")
            handlers[name] = fn
    return handlers
