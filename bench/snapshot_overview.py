"""StorageDomain.getSnapshotOverview on a block domain with 5,000 volumes.

The domain is filled directly (Volume.create of 5,000 volumes would take far longer
than the thing measured): the VG's LVM metadata is written once with
``vgcfgbackup``/``vgcfgrestore`` - one LV per volume with its IU_/PU_/MD_ tags, as
Volume.create leaves them - and every volume's metadata slot in one write of the
metadata LV. 1,000 images of 5 volumes (base + 4 snapshots).

Measured through the API: the overview cold (agent just restarted, page cache dropped
where the kernel allows it) and warm (median of 5). Targets: < 3 s cold, < 1 s warm.
In the same run: one ``lvs`` of the VG with tags (the LVM report the overview itself
needs), and the ratio overview / lvs.
"""

from __future__ import annotations

import argparse
import contextlib
import random
import re
import statistics
import string
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fake_storage.cluster import SimHost
from fake_storage.lunfarm import LunFarm
from tests.storage_helpers import (
    lv_offset,
    make_block_domain,
    unmount_under,
    write_durably,
)
from vdsmlite.storage import constants as sc
from vdsmlite.storage import lvm
from vdsmlite.storage.volmeta import VolumeMetadata

MiB = 1 << 20
CHAIN = 5


def lvm_id() -> str:
    chars = string.ascii_letters + string.digits
    parts = [6, 4, 4, 4, 4, 4, 6]
    return "-".join("".join(random.choice(chars) for _ in range(n)) for n in parts)


def lv_block(name: str, tags: list[str], pv: str, extent: int) -> str:
    tag_text = ", ".join(f'"{t}"' for t in tags)
    return f"""
		{name} {{
			id = "{lvm_id()}"
			status = ["READ", "WRITE", "VISIBLE"]
			flags = []
			tags = [{tag_text}]
			creation_time = {int(time.time())}
			creation_host = "bench"
			segment_count = 1

			segment1 {{
				start_extent = 0
				extent_count = 1

				type = "striped"
				stripe_count = 1

				stripes = [
					"{pv}", {extent}
				]
			}}
		}}
"""


def fill(sd: str, loop: str, count: int) -> int:
    """`count` volumes (chains of CHAIN) straight into the VG and the metadata LV."""
    with tempfile.NamedTemporaryFile("r", suffix=".vg") as f:
        lvm.run("vgcfgbackup", [loop], "-f", f.name, sd)
        text = Path(f.name).read_text()
    used = 0
    for m in re.finditer(r'extent_count = (\d+).*?stripes = \[\s*"(pv\d+)", (\d+)', text,
                         re.S):
        used = max(used, int(m.group(3)) + int(m.group(1)))
    blocks = []
    slots = bytearray()
    now = int(time.time())
    for i in range(count // CHAIN):
        img = str(uuid.uuid4())
        parent = sc.BLANK_UUID
        for j in range(CHAIN):
            vol = str(uuid.uuid4())
            slot = i * CHAIN + j + 1
            blocks.append(lv_block(vol, [sc.TAG_IMAGE + img, sc.TAG_SLOT + str(slot),
                                         sc.TAG_PARENT + parent], "pv0", used))
            used += 1
            md = VolumeMetadata(
                domain=sd, image=img, parent=parent, capacity=10 << 30, format="COW",
                type="SPARSE", voltype="LEAF" if j == CHAIN - 1 else "INTERNAL",
                disktype="DATA", description=f"bench volume {slot}", legality="LEGAL",
                ctime=now)
            data = md.to_bytes().ljust(sc.METADATA_SLOT_SIZE_V5, b"\0")
            offset = (slot - 1) * sc.METADATA_SLOT_SIZE_V5
            if len(slots) < offset:
                slots.extend(b"\0" * (offset - len(slots)))
            slots[offset:offset + len(data)] = data
            parent = vol
    text = re.sub(r"(\n\tlogical_volumes \{\n)", lambda m: m.group(1) + "".join(blocks),
                  text, count=1)
    with tempfile.NamedTemporaryFile("w", suffix=".vg") as f:
        f.write(text)
        f.flush()
        lvm.run("vgcfgrestore", [loop], "-f", f.name, sd, timeout=600)
    md_offset, _ = lv_offset_of(loop, sd)
    write_durably(loop, md_offset + sc.METADATA_BASE_V5 + sc.METADATA_SLOT_SIZE_V5,
                  bytes(slots))
    return count // CHAIN * CHAIN


def lv_offset_of(loop: str, sd: str) -> tuple[int, int]:
    class _Lun:  # lv_offset wants a FakeLun; only .loop is used
        def __init__(self, loop: str) -> None:
            self.loop = loop
    return lv_offset(_Lun(loop), sd, sc.METADATA)  # type: ignore[arg-type]


def drop_caches() -> None:
    with contextlib.suppress(OSError):
        Path("/proc/sys/vm/drop_caches").write_text("3\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--count", type=int, default=5000)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-overview-", dir="/var/tmp") as tmp:
        farm = LunFarm(Path(tmp) / "farm")
        host = SimHost(Path(tmp) / "host", "bench-overview", config={
            "daemon": {"log_level": "INFO"}, "devel": {"validate_returns": False}}).start()
        agent = host.agent
        try:
            size_g = (args.count * sc.VG_EXTENT_SIZE >> 30) + 64
            dom = make_block_domain(agent, farm, size=f"{size_g}G")
            assert dom.lun is not None
            loop = dom.lun.loop
            t0 = time.perf_counter()
            made = fill(dom.sd, loop, args.count)
            fill_s = time.perf_counter() - t0

            agent.stop()
            drop_caches()
            agent.start()
            with agent.client(timeout=600) as c:
                t0 = time.perf_counter()
                out = c.call("StorageDomain.getSnapshotOverview", {"storagedomainID": dom.sd})
                cold = time.perf_counter() - t0
                assert out["volumes"] >= made, (out["volumes"], made)
                warm_runs = []
                for _ in range(5):
                    t0 = time.perf_counter()
                    c.call("StorageDomain.getSnapshotOverview", {"storagedomainID": dom.sd})
                    warm_runs.append(time.perf_counter() - t0)
            lvs_runs = []
            for _ in range(5):
                t0 = time.perf_counter()
                lvm.lvs(dom.sd, [loop])
                lvs_runs.append(time.perf_counter() - t0)
        finally:
            unmount_under(agent.state_dir)
            host.stop()
            problems = farm.destroy()
            if problems:
                print("cleanup problems:", problems, file=sys.stderr)
    warm = statistics.median(warm_runs)
    lvs_s = statistics.median(lvs_runs)
    print(f"snapshot_overview: block domain, {made} volumes in {made // CHAIN} images "
          f"(filled in {fill_s:.1f} s)")
    print(f"  cold  {cold:7.3f} s   target < 3 s   {'OK' if cold < 3 else 'MISSED'}"
          f"   ratio to one lvs {cold / lvs_s:5.2f}")
    print(f"  warm  {warm:7.3f} s   target < 1 s   {'OK' if warm < 1 else 'MISSED'}"
          f"   ratio to one lvs {warm / lvs_s:5.2f}")
    print(f"  one lvs of the VG (with tags): {lvs_s:7.3f} s (median of 5)")


if __name__ == "__main__":
    main()
