"""Live merge of a 1 GiB layer through the agent, next to ``qemu-img commit`` offline.

One simulated host and a block domain. Per run, two identical chains are made: a
raw 1 GiB base and a qcow2 top holding 1 GiB of random data (the same bytes in
both, written with ``qemu-img convert -n``). Then, in the same run:

* *offline*: ``qemu-img commit -d -t none`` of the second chain's top into its base
  (O_DIRECT like the VM; ``-d``: the top is not emptied, as a live commit does not);
* *live*: a VM (paused, no guest OS) runs on the first chain's top; ``VM.merge`` of
  top into base (an active commit, then the pivot), timed from the call until
  ``VM.getStats`` shows no job any more and the VM runs on the base (polled every
  5 ms).

Reported: medians, ratio = offline / live (target >= 0.8) and the pivot's stall:
the agent's own measure from sending ``job-complete`` until it sees the job
concluded (the guest's I/O is drained somewhere inside that; an upper bound),
read from the agent's log (target < 100 ms).

Run it as root, ideally in a private mount namespace (see bench/vm_create.py)::

    .venv/bin/python bench/merge.py [--runs 3]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fake_storage.children import kill_vms_left_in
from fake_storage.cluster import SimHost
from fake_storage.lunfarm import LunFarm
from tests.storage_helpers import (
    BLANK,
    DomainUnderTest,
    make_block_domain,
    run_task,
    unmount_under,
)
from vdsmlite.client import Client

GiB = 1 << 30
SIZE = GiB
COW, RAW = 4, 5
RATIO_TARGET = 0.8
STALL_TARGET_MS = 100.0
TIMEOUT = 300.0


def make_chain(dom: DomainUnderTest, data: Path) -> tuple[str, str, str]:
    """(image, base, top): raw base, qcow2 top filled with `data`."""
    img, base = dom.create_volume(size=SIZE)
    _, top = dom.create_volume(img, size=SIZE, fmt=COW, parent=base, initialSize=str(SIZE))
    path = dom.prepare(img, top)
    try:
        subprocess.run(["qemu-img", "convert", "-n", "-f", "raw", "-O", "qcow2", "-t", "none",
                        str(data), path], check=True)
    finally:
        dom.teardown(img, top)
    return img, base, top


def offline(dom: DomainUnderTest, img: str, top: str) -> float:
    path = dom.prepare(img, top)
    try:
        t0 = time.perf_counter()
        subprocess.run(["qemu-img", "commit", "-q", "-d", "-t", "none", "-f", "qcow2", path],
                       check=True)
        return time.perf_counter() - t0
    finally:
        dom.teardown(img, top)


def wait_for(what: str, pred: object) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not pred():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.005)


def live(c: Client, dom: DomainUnderTest, img: str, base: str, top: str) -> float:
    vm_id = str(uuid.uuid4())
    c.call("VM.create", {"vmID": vm_id, "vmParams": {
        "vmId": vm_id, "vmName": f"bench-{vm_id[:8]}", "memSize": "128", "smp": "1",
        "emulatedMachine": "q35", "launchPaused": "true",
        "devices": [{"type": "disk", "device": "disk", "iface": "virtio", "index": "0",
                     "format": "cow", "readonly": "false", "shared": "false",
                     "propagateErrors": "off", "poolID": BLANK, "domainID": dom.sd,
                     "imageID": img, "volumeID": top}]}})
    try:
        wait_for("VM started",
                 lambda: c.call("VM.getStats", {"vmID": vm_id})[0]["status"] == "Paused")
        job = str(uuid.uuid4())
        t0 = time.perf_counter()
        c.call("VM.merge", {"vmID": vm_id, "drive": {"poolID": BLANK, "domainID": dom.sd,
                                                     "imageID": img, "volumeID": top},
                            "baseVolUUID": base, "topVolUUID": top, "bandwidth": 0,
                            "jobUUID": job})
        wait_for("merge", lambda: not c.call("VM.getStats", {"vmID": vm_id})[0]["vmJobs"])
        elapsed = time.perf_counter() - t0
        disk = next(d for d in c.call("VM.getInfo", {"vmID": vm_id})["devices"]
                    if d.get("name") == "vda")
        if disk["volumeChain"] != [base]:
            raise RuntimeError(f"merge did not complete: chain {disk['volumeChain']}")
        return elapsed
    finally:
        c.call("VM.destroy", {"vmID": vm_id})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="1 run")
    args = ap.parse_args()
    if args.quick:
        args.runs = 1
    if os.geteuid() != 0:
        sys.exit("merge: needs root (loop LUNs, LVM, qemu on them)")
    tmp = Path(tempfile.mkdtemp(prefix="bench-merge-", dir="/var/tmp"))
    vm_dir = Path(tempfile.mkdtemp(prefix="vm-", dir="/tmp"))
    farm = LunFarm(tmp / "farm")
    host = SimHost(tmp / "host", "bench-merge", config={
        "daemon": {"log_level": "INFO"}, "devel": {"validate_returns": False},
        "virt": {"run_dir": str(vm_dir)}})
    live_t: list[float] = []
    off_t: list[float] = []
    stalls: list[float] = []
    try:
        data = tmp / "random"
        with open(data, "wb") as f:
            for _ in range(SIZE // (64 << 20)):
                f.write(os.urandom(64 << 20))
        host.start()
        dom = make_block_domain(host.agent, farm, size="12G")
        for _ in range(args.runs):
            a_img, a_base, a_top = make_chain(dom, data)
            b_img, _b_base, b_top = make_chain(dom, data)
            off_t.append(offline(dom, b_img, b_top))
            with host.agent.client(timeout=TIMEOUT) as c:
                live_t.append(live(c, dom, a_img, a_base, a_top))
            with host.agent.client() as c:
                for img in (a_img, b_img):
                    run_task(c, "Image.delete", {"imageID": img, "storagepoolID": BLANK,
                                                 "storagedomainID": dom.sd,
                                                 "postZero": False, "force": True})
        stalls = [float(m) for m in re.findall(r"pivoted in ([0-9.]+) ms",
                                               host.agent.log_text())]
    finally:
        with contextlib.suppress(Exception), host.agent.client() as c:
            for vm in c.call("Host.getVMList", {"onlyUUID": True}):
                c.call("VM.destroy", {"vmID": vm})
        unmount_under(host.agent.state_dir)
        host.stop()
        kill_vms_left_in(vm_dir)
        problems = farm.destroy()
        shutil.rmtree(vm_dir, ignore_errors=True)
        shutil.rmtree(tmp, ignore_errors=True)
        if problems:
            print("cleanup problems:", problems, file=sys.stderr)
    lv, of = statistics.median(live_t), statistics.median(off_t)
    ratio = of / lv
    stall = max(stalls) if stalls else float("nan")
    print(f"merge: 1 GiB of random data, qcow2 top into a raw base on a block domain, "
          f"x{args.runs}")
    print(f"{'median s':<10} {'live':>8} {'offline':>8} {'off/live':>9} {'>=0.8':>6}")
    print(f"{'':<10} {lv:>8.2f} {of:>8.2f} {ratio:>9.2f} "
          f"{'yes' if ratio >= RATIO_TARGET else 'no':>6}")
    print(f"pivot stall (job-complete .. concluded, max of {len(stalls)}): {stall:.1f} ms "
          f"(< {STALL_TARGET_MS:.0f} ms: {'yes' if stall < STALL_TARGET_MS else 'no'})")
    print("live: VM.merge until VM.getStats shows no job; offline: qemu-img commit -d -t none")


if __name__ == "__main__":
    main()
