"""Host.getDeviceList over 64 and 256 fake LUNs, against `lsblk -J` on the same devices.

For each farm size: the wall time of Host.getDeviceList (over the unix socket)
cold - the first call after the LUNs appeared, with refresh=true (the rescan an
engine asks for when it looks for new LUNs) and checkStatus=true - then the
median of refresh=true, and after that warm-up the medians of refresh=false with
checkStatus=false and true; the cost per device, and the ratio to one `lsblk -J`
listing the same loop devices in the same run (lsblk reads sysfs and the udev
database too, but does not probe signatures or ask LVM, so it is the floor for
"list what is there").

Only the farm's own LUNs are counted (by GUID): the host may have other LUNs, and
the answer lists them too.

Target (issue 3): 256 LUNs with checkStatus=true in under 1 s.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fake_storage.agent import Agent
from fake_storage.lunfarm import LunFarm


def timed(fn, rounds: int) -> float:  # type: ignore[no-untyped-def]
    samples = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--sizes", default="64,256")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]

    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-devlist-") as tmp:
        farm = LunFarm(Path(tmp) / "farm")
        agent = Agent(Path(tmp) / "agent", config={
            "daemon": {"log_level": "INFO"}, "devel": {"validate_returns": False}}).start()
        try:
            client = agent.client(timeout=300)
            for count in sizes:
                farm.create(count - len(farm.luns), "16M")
                loops = [lun.loop for lun in farm.luns]

                ours = {lun.guid for lun in farm.luns}

                def listing(check: bool, refresh: bool = False, count: int = count,
                            ours: set[str] = ours) -> None:
                    got = client.call("Host.getDeviceList",
                                      {"checkStatus": check, "refresh": refresh})
                    mine = [d for d in got if d.get("GUID") in ours]
                    assert len(mine) == count, (len(mine), count, len(got))

                def lsblk(loops: list[str] = loops) -> None:
                    subprocess.run(["lsblk", "-J", "-b", "-o",
                                    "NAME,SIZE,TYPE,VENDOR,MODEL,SERIAL,WWN,LOG-SEC,PHY-SEC",
                                    *loops], check=True, capture_output=True)

                cold = timed(lambda: listing(True, refresh=True), 1)
                rescan = timed(lambda: listing(True, refresh=True), args.rounds)
                quick = timed(lambda: listing(False), args.rounds)
                full = timed(lambda: listing(True), args.rounds)
                floor = timed(lsblk, args.rounds)
                rows.append((count, cold, rescan, quick, full, floor))
            client.close()
        finally:
            agent.stop()
            problems = farm.destroy()
            if problems:
                print("cleanup problems:", problems, file=sys.stderr)

    print(f"devicelist: Host.getDeviceList vs lsblk -J; cold = one call, others medians "
          f"of {args.rounds}")
    print(f"{'LUNs':>5} {'call':>28} {'total ms':>9} {'per LUN ms':>10} "
          f"{'lsblk ms':>9} {'ratio':>6}")
    for count, cold, rescan, quick, full, floor in rows:
        for label, t in (("cold refresh=true check=true", cold),
                         ("refresh=true check=true", rescan),
                         ("refresh=false check=false", quick),
                         ("refresh=false check=true", full)):
            print(f"{count:>5} {label:>28} {t * 1000:>9.1f} {t * 1000 / count:>10.3f} "
                  f"{floor * 1000:>9.1f} {t / floor:>6.2f}")
    for count, _, _, _, full, _ in rows:
        if count == 256:
            verdict = "met" if full < 1.0 else "MISSED"
            print(f"target: 256 LUNs with checkStatus=true under 1 s: {full:.3f} s ({verdict})")


if __name__ == "__main__":
    main()
