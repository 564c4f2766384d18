"""Tasks that stop safely (issue 15): a stop reaches the work, rolls back what the task
made, and only then releases the locks and reports aborted (411); task states
survive an agent restart.

On a block domain, on real loop devices, LVM and sanlock:

* a zeroing delete (postZero) of a volume big enough to take seconds is stopped
  while it writes: once the task says it ended, no zeroing chunk reaches the LUN
  (its write counter in /sys/block/loopN/stat stays put, and a marker at the end
  of the volume is still there), the SDM lease is free at that moment, and the
  delete run again succeeds;
* the agent is SIGKILLed after that task ended and started again: Task.getStatus
  answers the stopped task's final state;
* a preallocated create stopped in the middle (a step made long by a ``:pause``
  failpoint) leaves no LV, no metadata slot and no image behind.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytest

from fake_storage.cluster import SimHost
from tests.helpers import eventually
from tests.locking_helpers import holds
from tests.storage_helpers import (
    BLANK,
    PREALLOCATED,
    RAW,
    DomainUnderTest,
    GiB,
    MiB,
    StorageEnv,
    join_lockspace,
    lv_offset,
    lvm_cmd,
    make_block_domain,
    new_id,
    read_direct,
    wait_task,
    write_durably,
)
from vdsmlite.client import Client, ServerError

pytestmark = [pytest.mark.root, pytest.mark.slow]

MARKER = b"still here".ljust(MiB, b"\xa5")
# Writes the agent may make while nothing runs (sanlock renewing its delta lease,
# one sector at a time): far less than one 8 MiB zeroing chunk.
QUIET = 1 * MiB


def start_host(env: StorageEnv, name: str, extra_env: dict[str, str] | None = None) -> SimHost:
    host = SimHost(env.tmp_path / name, name)
    if extra_env:
        host.agent.extra_env.update(extra_env)
    env.hosts.append(host)
    return host.start()


def written_bytes(loop: str) -> int:
    """Bytes written to the loop device so far (the kernel's count)."""
    fields = Path(f"/sys/block/{os.path.basename(loop)}/stat").read_text().split()
    return int(fields[6]) * 512


def task_status(c: Client, task: str) -> dict[str, Any]:
    return c.call("Task.getStatus", {"taskID": task})


def wait_finished(c: Client, task: str, timeout: float = 120) -> dict[str, Any]:
    """The task's final status (not cleared: the test asks again later)."""
    def finished() -> dict[str, Any] | None:
        st = task_status(c, task)
        return st if st["taskState"] == "finished" else None
    return eventually(finished, timeout, f"task {task} to finish", interval=0.01)


def job_info(c: Client, task: str) -> dict[str, Any]:
    info: dict[str, Any] = c.call("Host.getJobs", {"job_ids": [task]})[task]
    return info


def lv_names(dom: DomainUnderTest) -> str:
    assert dom.lun is not None
    return lvm_cmd("lvs", "--noheadings", "-o", "lv_name,lv_tags", dom.sd,
                   devices=[dom.lun.loop])


def test_stopped_postzero_delete_writes_nothing_after_and_survives_restart(
        env: StorageEnv) -> None:
    host = start_host(env, "agent")
    a = host.agent
    dom = make_block_domain(a, env.farm, size="12G")
    assert dom.lun is not None
    loop = dom.lun.loop
    size = 6 * GiB
    img, vol = dom.create_volume(size=size, fmt=RAW, prealloc=PREALLOCATED)
    # A marker at the end of the volume: the zeroing reaches it last.
    start, lv_size = lv_offset(dom.lun, dom.sd, vol)
    write_durably(loop, start + lv_size - MiB, MARKER)

    with a.client() as c:
        task = c.call("Volume.delete", {**dom.vol_params(img, vol), "postZero": True,
                                        "force": False})
        # Progress is reported as it goes, while the zeroing runs.
        eventually(lambda: job_info(c, task).get("bytes_done", 0) >= 64 * MiB, 60,
                   "the zeroing to be under way", interval=0.01)
        assert task_status(c, task)["taskState"] == "running"
        assert c.call("Task.stop", {"taskID": task}) is True
        st = wait_finished(c, task)
        # The task says it ended: from now on nothing of it may reach the LUN.
        at_end = written_bytes(loop)
        assert (st["taskResult"], st["code"]) == ("cleanSuccess", 411), st
        assert not holds(host, "SDM"), "SDM still held after the task ended"
        done = job_info(c, task)["bytes_done"]
        assert 0 < done < lv_size

        # Settle: a thread still zeroing would write a chunk (8 MiB) in far less than
        # this wait; the counter must not move by more than sanlock's renewals.
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            assert written_bytes(loop) - at_end < QUIET, "written after the task ended"
            time.sleep(0.05)
        assert read_direct(loop, start + lv_size - MiB, MiB) == MARKER

        # The volume is ILLEGAL and whole: the delete run again removes it.
        info = c.call("Volume.getInfo", dom.vol_params(img, vol))
        assert info["legality"] == "ILLEGAL"
        st2 = wait_task(c, c.call("Volume.delete", {**dom.vol_params(img, vol),
                                                    "postZero": False, "force": False}))
        assert st2["taskResult"] == "success", st2
        assert c.call("StorageDomain.getImages", {"storagedomainID": dom.sd}) == []
    assert vol not in lv_names(dom)

    # The agent dies after the task ended; its restart still answers for the task.
    a.kill()
    a.start()
    with a.client() as c:
        st3 = task_status(c, task)
        assert (st3["taskState"], st3["taskResult"], st3["code"]) == \
            ("finished", "cleanSuccess", 411), st3
        assert c.call("Task.getInfo", {"taskID": task})["verb"] == "Volume.delete"
        c.call("Task.clear", {"taskID": task})
    a.kill()
    a.start()
    with a.client() as c, pytest.raises(ServerError) as e:
        task_status(c, task)
    assert e.value.code == 401


def test_stopped_create_leaves_nothing_and_frees_the_lease(env: StorageEnv) -> None:
    step = "volume.create.after_metadata"
    host = start_host(env, "agent", {"VDSMLITE_FAILPOINTS": f"{step}:pause"})
    a = host.agent
    dom = make_block_domain(a, env.farm, size="12G")
    assert dom.lun is not None
    img, vol = new_id(), new_id()
    with a.client() as c:
        task = c.call("Volume.create", {
            "volumeID": vol, "storagepoolID": BLANK, "storagedomainID": dom.sd,
            "imageID": img, "size": str(4 * GiB), "volFormat": RAW,
            "preallocate": PREALLOCATED, "diskType": "DATA", "desc": "stopped",
            "srcImgUUID": BLANK, "srcVolUUID": BLANK})
        eventually(lambda: f"failpoint {step}: pausing" in a.log_text(), 60,
                   "the create to reach its long step")
        assert vol in lv_names(dom)  # half made: LV and ILLEGAL metadata
        assert holds(host, "SDM")
        c.call("Task.stop", {"taskID": task})
        st = wait_finished(c, task)
        assert (st["taskResult"], st["code"]) == ("cleanSuccess", 411), st
        # Rolled back before the task ended, and the lease is free at once.
        assert not holds(host, "SDM")
        lvs = lv_names(dom)
        assert vol not in lvs and img not in lvs and "OVIRT_VOL_INITIALIZING" not in lvs
        assert c.call("StorageDomain.getImages", {"storagedomainID": dom.sd}) == []
        # The metadata slot the create wrote is cleared (slot 1: the first volume).
        md_offset, _ = lv_offset(dom.lun, dom.sd, "metadata")
        assert read_direct(dom.lun.loop, md_offset + MiB + 8192, 512) == b"\0" * 512
        c.call("Task.clear", {"taskID": task})
    # Retried (on an agent restarted without the pause), the same create succeeds.
    a.kill()
    a.extra_env = {}
    a.start()
    join_lockspace(a, dom.sd)
    img2, vol2 = dom.create_volume(img, vol, size=4 * GiB, fmt=RAW, prealloc=PREALLOCATED)
    assert dom.info(img2, vol2)["legality"] == "LEGAL"
