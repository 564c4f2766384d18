"""SIGKILL in the middle of Volume.create: the next start reports and cleans up.

The daemon is started with a failpoint that makes it SIGKILL itself at a
chosen step of the create (after the data, after the ILLEGAL metadata, after
the lease). It is then restarted on the same state and storage: the volume
must be listed, reported ILLEGAL, and removable by Volume.delete, leaving no
LV, file or metadata slot behind.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.storage_helpers import (
    BLANK,
    COW,
    SPARSE,
    DomainUnderTest,
    StorageEnv,
    join_lockspace,
    lv_offset,
    lvm_cmd,
    make_block_domain,
    make_posixfs_domain,
    new_id,
    wait_task,
)

pytestmark = [pytest.mark.root, pytest.mark.slow]

STEPS = ["volume.create.after_data", "volume.create.after_metadata",
         "volume.create.after_lease"]


@pytest.mark.parametrize("kind", ["posixfs", "block"])
@pytest.mark.parametrize("step", STEPS)
def test_sigkill_mid_create_is_recovered(env: StorageEnv, kind: str, step: str) -> None:
    a = env.agent(env={"VDSMLITE_FAILPOINTS": step})
    dom: DomainUnderTest = (make_block_domain(a, env.farm) if kind == "block"
                            else make_posixfs_domain(a, env.farm))
    img, vol = new_id(), new_id()
    with a.client() as c:
        c.call("Volume.create", {
            "volumeID": vol, "storagepoolID": BLANK, "storagedomainID": dom.sd,
            "imageID": img, "size": str(1 << 30), "volFormat": COW, "preallocate": SPARSE,
            "diskType": "DATA", "desc": "interrupted", "srcImgUUID": BLANK,
            "srcVolUUID": BLANK})
    assert a.wait(60) == -9  # SIGKILLed by the failpoint, mid-create
    assert f"failpoint {step}" in a.log_text()

    a.extra_env = {}
    a.start()
    # As after any restart, the engine connects the host to its domains again.
    join_lockspace(a, dom.sd)
    with a.client() as c:
        assert c.call("StorageDomain.getVolumes", {"storagedomainID": dom.sd,
                                                   "storagepoolID": BLANK,
                                                   "imageID": img}) == [vol]
        info = c.call("Volume.getInfo", dom.vol_params(img, vol))
        assert info["legality"] == "ILLEGAL"
        assert info["status"] == "ILLEGAL"
        st = wait_task(c, c.call("Volume.delete", {**dom.vol_params(img, vol),
                                                   "postZero": False, "force": False}))
        assert st["taskResult"] == "success", st
        assert c.call("StorageDomain.getImages", {"storagedomainID": dom.sd}) == []

    if kind == "block":
        assert dom.lun is not None
        lvs = lvm_cmd("lvs", "--noheadings", "-o", "lv_name,lv_tags", dom.sd,
                      devices=[dom.lun.loop])
        assert vol not in lvs and "OVIRT_VOL_INITIALIZING" not in lvs and "IU_" not in lvs
        md_offset, _ = lv_offset(dom.lun, dom.sd, "metadata")
        fd = os.open(dom.lun.loop, os.O_RDONLY)
        try:
            slot1 = os.pread(fd, 512, md_offset + (1 << 20) + 8192)
        finally:
            os.close(fd)
        assert slot1 == b"\0" * 512  # the metadata slot was cleared
    else:
        assert dom.data_dir is not None
        images = Path(dom.data_dir) / dom.sd / "images"
        assert list(images.iterdir()) == []
