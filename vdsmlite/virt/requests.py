"""Which form a VM verb's parameters came in, and the parser for it.

The verbs call these two; `virt.domxml` and `virt.legacy` do the reading. A
``vmParams``/``params`` with an ``"xml"`` key is the modern form (what VDSM 4.x
requires), anything else the legacy dict form.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from vdsmlite.virt import checks, domxml, legacy
from vdsmlite.virt.checks import invalid, missing
from vdsmlite.virt.definition import DiskSpec, VmDefinition


def parse_create(vm_id: str, vm_params: Mapping[str, Any]) -> VmDefinition:
    """``VM.create(vmID, vmParams)``: the VM definition, from either form."""
    if not isinstance(vm_params, Mapping):
        raise invalid("vmParams", f"not a mapping: {type(vm_params).__name__}")
    if "xml" not in vm_params:
        return legacy.parse_vm_params(vm_params, vm_id)
    own = vm_params.get("vmId")
    if own not in (None, "") and checks.uuid(own, "vmParams.vmId") != checks.uuid(vm_id,
                                                                                   "vmId"):
        raise invalid("vmParams.vmId", f"{own} is not the vmID {vm_id}")
    return domxml.parse_domain(vm_params["xml"], vm_id)


def parse_hotplug(vm_id: str, params: Mapping[str, Any], *, unplug: bool = False) -> DiskSpec:
    """``VM.hotplugDisk/hotunplugDisk(vmID, params)``: the disk, from either form."""
    if not isinstance(params, Mapping):
        raise invalid("params", f"not a mapping: {type(params).__name__}")
    own = params.get("vmId")
    if own not in (None, "") and checks.uuid(own, "params.vmId") != checks.uuid(vm_id, "vmId"):
        raise invalid("params.vmId", f"{own} is not the vmID {vm_id}")
    if "xml" in params:
        return domxml.parse_hotplug(params["xml"], vm_id, unplug=unplug)
    if "drive" in params:
        checks.uuid(vm_id, "vmId")
        return legacy.parse_drive(params["drive"], unplug=unplug)
    raise missing("params.xml")
