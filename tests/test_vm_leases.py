"""HA VMs: a VM with a lease runs only where qemu holds that lease.

Two simulated hosts (own sanlock daemons, emulated watchdog on A) on one block
domain whose ``xleases`` index holds the VM's lease (``Lease.create``). qemu
owns the lease itself (`vdsmlite.virt.leaseexec`): checked with sanlock's own
view of who holds it. The second host is refused while the first runs it; once
the first is fenced through storage (the existing fencing: its watchdog resets
it, its qemus die with it), sanlock declares it dead and the second host starts
the VM. sanlock 3.8.5 declares a host dead 8 x io_timeout + 60 s after its last
renewal, so that part takes a good minute.
"""

from __future__ import annotations

import shutil
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from fake_storage.children import kill_vms_left_in
from fake_storage.cluster import SimHost
from fake_storage.lunfarm import FakeLun
from tests.helpers import call, eventually
from tests.locking_helpers import holder_pid
from tests.storage_helpers import (
    DomainUnderTest,
    StorageEnv,
    join_together,
    make_block_domain,
    new_id,
    run_task,
)
from tests.vm_helpers import wait_status
from vdsmlite.client import Client, ServerError

pytestmark = pytest.mark.root


@dataclass
class LeaseEnv:
    a: SimHost
    b: SimHost
    dom: DomainUnderTest
    lun: FakeLun
    run_dirs: list[Path]


@pytest.fixture
def lease_env(env: StorageEnv) -> Iterator[LeaseEnv]:
    run_dirs = [Path(tempfile.mkdtemp(prefix="vl-", dir="/tmp")) for _ in range(2)]
    try:
        a = env.host("lease-a", watchdog_timeout=3,
                     config={"virt": {"run_dir": str(run_dirs[0])}})
        b = env.host("lease-b", config={"virt": {"run_dir": str(run_dirs[1])}})
        dom = make_block_domain(a.agent, env.farm, join=False)
        join_together(dom.sd, (a.agent, 1), (b.agent, 2))
        [lun] = env.farm.create(1, "64M")
        yield LeaseEnv(a, b, dom, lun, run_dirs)
        for host in (a, b):
            if host.agent.proc is not None and host.agent.proc.poll() is None:
                for vm in call(host.agent, "Host.getVMList", onlyUUID=True):
                    call(host.agent, "VM.destroy", vmID=vm)
    finally:
        for run_dir in run_dirs:
            kill_vms_left_in(run_dir)
            shutil.rmtree(run_dir, ignore_errors=True)


def leased_vm(vm_id: str, sd: str, lun: FakeLun) -> dict[str, Any]:
    """A VM with a direct LUN and its lease, as the engine sends it (placeholders)."""
    return {"vmId": vm_id, "vmName": "ha-vm", "memSize": 64, "smp": 1, "launchPaused": True,
            "devices": [
                {"type": "disk", "device": "lun", "GUID": lun.guid, "iface": "scsi",
                 "index": 0, "format": "raw", "propagateErrors": "off"},
                {"type": "lease", "device": "lease", "lease_id": vm_id, "sd_id": sd,
                 "path": f"LEASE-PATH:{vm_id}:{sd}", "offset": f"LEASE-OFFSET:{vm_id}:{sd}"},
            ]}


def create_lease(c: Client, sd: str, lease_id: str) -> dict[str, Any]:
    run_task(c, "Lease.create", {"lease": {"sd_id": sd, "lease_id": lease_id}})
    info: dict[str, Any] = c.call("Lease.info", {"lease": {"sd_id": sd, "lease_id": lease_id}})
    return info



def start(host: SimHost, vm_id: str, params: dict[str, Any]) -> int:
    """VM.create and wait until it runs; the error code if refused (0 when it runs)."""
    try:
        with host.agent.client() as c:
            c.call("VM.create", {"vmID": vm_id, "vmParams": params})
            wait_status(c, vm_id, "Paused")
        return 0
    except ServerError as e:
        return e.code
    except AssertionError:
        return -1  # went Down (sanlock refused the lease in qemu)


def fence(host: SimHost, action: str, host_map: dict[str, int]) -> dict[str, Any]:
    reply: dict[str, Any] = call(host.agent, "Host.fenceNode", addr="target", agent="sanlock",
                                 action=action, policy={"storageDomainHostIdMap": host_map})
    return reply


@pytest.mark.slow
def test_a_leased_vm_runs_on_one_host_and_moves_after_fencing(lease_env: LeaseEnv) -> None:
    env = lease_env
    vm_id = new_id()
    with env.a.agent.client() as c:
        info = create_lease(c, env.dom.sd, vm_id)
    params = leased_vm(vm_id, env.dom.sd, env.lun)

    # Two hosts race to start it: exactly one runs it.
    results: dict[str, int] = {}
    racers = [threading.Thread(target=lambda h=h: results.__setitem__(h.name,
                                                                      start(h, vm_id, params)))
              for h in (env.a, env.b)]
    for t in racers:
        t.start()
    for t in racers:
        t.join(120)
    assert sorted(results.values()).count(0) == 1, results
    winner, loser = (env.a, env.b) if results[env.a.name] == 0 else (env.b, env.a)
    # The loser was refused with 651 before anything started, or its qemu was refused
    # the lease by sanlock and the VM is Down with that reason.
    if results[loser.name] == -1:
        with loser.agent.client() as c:
            stats = c.call("VM.getStats", {"vmID": vm_id})[0]
            assert "VM lease refused" in stats["exitMessage"]
            c.call("VM.destroy", {"vmID": vm_id})
    else:
        assert results[loser.name] == 651
    # The winner's qemu itself owns the lease, as the winner's sanlock says.
    with winner.agent.client() as c:
        pid = int(c.call("VM.getStats", {"vmID": vm_id})[0]["pid"])
    assert holder_pid(winner, env.dom.sd, vm_id) == pid
    assert holder_pid(loser, env.dom.sd, vm_id) is None

    # Now the loser is refused with a clear error, and starts nothing.
    with loser.agent.client() as c:
        with pytest.raises(ServerError) as e:
            c.call("VM.create", {"vmID": vm_id, "vmParams": params})
        assert e.value.code == 651 and "held by host" in str(e.value)
        assert vm_id not in c.call("Host.getVMList", {"onlyUUID": True})

    if winner is not env.a:
        # Only A has a watchdog to fence: move the VM there the plain way first.
        call(env.b.agent, "VM.destroy", vmID=vm_id)
        assert holder_pid(env.b, env.dom.sd, vm_id) is None  # it died with qemu
        assert start(env.a, vm_id, params) == 0
        winner, loser = env.a, env.b

    # Fence A through storage (once B's sanlock has read A's lease): its watchdog
    # resets it, its qemu dies with it...
    eventually(lambda: fence(env.b, "status", {env.dom.sd: 1})["power"] == "on", 30,
               "B seeing A")
    assert fence(env.b, "reboot", {env.dom.sd: 1})["operationStatus"] == "initiated"
    assert env.a.watchdog is not None
    env.a.watchdog.wait_reset(60)
    # ...and until sanlock declares A dead, B is still refused.
    with env.b.agent.client() as c:
        with pytest.raises(ServerError) as e:
            c.call("VM.create", {"vmID": vm_id, "vmParams": params})
        assert e.value.code == 651
    eventually(lambda: fence(env.b, "status", {env.dom.sd: 1})["power"] == "off", 150,
               "A declared dead")
    assert start(env.b, vm_id, params) == 0
    with env.b.agent.client() as c:
        pid = int(c.call("VM.getStats", {"vmID": vm_id})[0]["pid"])
        here = c.call("Lease.info", {"lease": {"sd_id": env.dom.sd, "lease_id": vm_id}})
        assert here["offset"] == info["offset"]  # the path is where B maps the volume
        assert c.call("VM.getInfo", {"vmID": vm_id})["devices"][-1] == {
            "type": "lease", "device": "lease", "sd_id": env.dom.sd, "lease_id": vm_id,
            "path": here["path"], "offset": here["offset"]}
    assert holder_pid(env.b, env.dom.sd, vm_id) == pid
