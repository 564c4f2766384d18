"""A VM's definition taken from the OVF_STOREs: how the hosted engine starts.

``VM.create(vmID, {"vmId": vmID})`` names only the VM. Its OVF is looked up
in the OVF_STORE of the named domain, or of every domain this host sees; the
store whose ``Last Updated`` is newest wins (a store that does not validate is
skipped with a warning by the OVF service, which then serves the domain's
other store). The hosted-engine agent takes whichever store it found last
(ovf.md §3.2); taking the newest is the engine's own rule, and what makes an
``updateOVFEntity`` the definition the next start uses.

The OVF becomes VDSM's legacy ``vmParams`` (`vdsmlite.ovf.vmparams`), the
form a VDSM tool expects from ``Host.getVMParamsFromOVF`` and the one
``VM.create`` reads; what the conversion dropped or guessed is listed in the
VM's info with the rest of what it does not run.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from vdsmlite import errors
from vdsmlite.blocking import RunBlocking
from vdsmlite.ovf import vmparams
from vdsmlite.sdm.ovfstore import OvfService
from vdsmlite.storage.domains import DomainStore

log = logging.getLogger("vdsmlite.virt.fromovf")

# What a start-by-UUID request may carry besides the id.
BY_UUID_KEYS = frozenset({"vmId", "storageDomainID", "launchPaused"})


def is_by_uuid(vm_params: Any) -> bool:
    """True for ``{"vmId": ...}`` (with optional storageDomainID/launchPaused): nothing
    that describes a VM, only which one."""
    return (isinstance(vm_params, dict) and "xml" not in vm_params
            and set(vm_params) <= BY_UUID_KEYS)


@dataclass
class OvfVmParams:
    """A VM's parameters converted from an OVF, and where that OVF was found."""

    params: dict[str, Any]
    sd_id: str
    store: dict[str, Any]  # imageID, volumeID, size, lastUpdated of the store
    warnings: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"vmParams": self.params, "warnings": self.warnings,
                "source": {"storagedomainID": self.sd_id, **self.store}}


class OvfVmSource:
    def __init__(self, *, ovf: OvfService, domains: DomainStore,
                 run_blocking: RunBlocking) -> None:
        self._ovf = ovf
        self._domains = domains
        self._run_blocking = run_blocking

    async def params(self, vm_id: str, sd_id: str | None = None) -> OvfVmParams:
        """The newest OVF of `vm_id`, converted; 320 when no store holds it."""
        found_in = await self._newest_store_with(vm_id, sd_id)
        entity = await self._ovf.entity(found_in, vm_id)
        if str(entity["entity"].get("type", "")).upper() == "TEMPLATE":
            raise errors.MissingOvfFileFromVM(vm_id, f"is a Template in the OVF_STORE of "
                                                     f"domain {found_in}, not a VM")
        # Disks whose OVF names no domain (virt-v2v's) are on the store's domain.
        conversion = await self._run_blocking(
            lambda: vmparams.convert(entity["ovf"].encode(), domain_id=found_in))
        log.info("VM %s: OVF from the OVF_STORE %s/%s of domain %s (Last Updated %s)",
                 vm_id, entity["store"]["imageID"], entity["store"]["volumeID"], found_in,
                 entity["store"]["lastUpdated"])
        return OvfVmParams(params=conversion.params, sd_id=found_in, store=entity["store"],
                           warnings=list(conversion.warnings))

    async def _newest_store_with(self, vm_id: str, sd_id: str | None) -> str:
        if sd_id is not None:
            candidates = [sd_id]
        else:
            candidates = sorted(await self._run_blocking(self._domains.scan))
        best: tuple[Any, str] | None = None
        for sd in candidates:
            try:
                contents = await self._ovf.contents(sd)
            except errors.VdsmError as e:
                if sd_id is not None:
                    raise
                log.warning("VM %s: domain %s skipped, its OVF_STORE cannot be read: %s",
                            vm_id, sd, e)
                continue
            if contents is None or vm_id not in contents.entities:
                continue
            key = contents.store.sort_key()
            if best is None or key > best[0]:
                best = (key, sd)
        if best is None:
            where = f"domain {sd_id}" if sd_id else f"any of the {len(candidates)} domains " \
                                                    "this host sees"
            raise errors.MissingOvfFileFromVM(vm_id, f"not in the OVF_STORE of {where}")
        return best[1]
