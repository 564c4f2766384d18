"""Fencing through storage: how long each step takes, next to sanlock's own bounds.

Two simulated hosts (own sanlock daemon, agent, emulated watchdog with a real
watchdog's 60 s timeout) join one block domain on a loop LUN. A asks for B's
reset with Host.fenceNode(reboot, agent sanlock) and the benchmark times, from
the request:

* taken: B took the request - it acknowledged and stopped petting its
  watchdog in the same step (B's own record of it);
* ack seen: A's Host.fenceNode(status) reports the acknowledgement (the
  answer travels back through the same renewals);
* reset: B's watchdog fired (one watchdog timeout after it stopped petting);
* dead: A's Host.fenceNode(status) says power "off";
* sanlock dead: A's sanlock daemon itself reports B DEAD (polled directly
  through the binding, every 0.1 s).

Bounds (sanlock's renewal and host-dead timing, both derived from io_timeout): a
request reaches the target within about two renewal intervals plus the 1 s
check, R = 2 x io_timeout + 1 s
(target: taken <= 2R + 1); sanlock declares a host dead 8 x io_timeout + 60 s
after its last renewal (at the latest the reset), as seen by the observer up to
one renewal interval late (target: our "off" within 5 s of sanlock's DEAD).

At io_timeout 1 and 10 (VDSM's default); about 8 minutes in all, most of it the
60 s watchdog and sanlock's 8 x io_timeout + 60 s.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fake_storage.cluster import SimHost
from fake_storage.lunfarm import LunFarm
from tests.storage_helpers import join_lockspace, make_block_domain, unmount_under

# A real watchdog's timeout (wdmd and sanlock assume 60 s): long enough for the
# target's sanlock to carry the acknowledgement before the reset silences it.
WATCHDOG_TIMEOUT = 60


def call(host: SimHost, method: str, params: dict[str, Any]) -> Any:
    with host.agent.client(timeout=120) as c:
        return c.call(method, params)


def fence(host: SimHost, action: str, sd: str, host_id: int) -> dict[str, Any]:
    return call(host, "Host.fenceNode", {
        "addr": "host-b", "agent": "sanlock", "action": action,
        "policy": {"storageDomainHostIdMap": {sd: host_id}}})


# Polls A's own sanlock (libsanlock talks to one daemon per process, so in a process
# of its own) and prints the CLOCK_MONOTONIC time at which it says B is DEAD.
WATCH = """
import sys, time
from vdsmlite.locking import sanlock
sd, host_id = sys.argv[1], int(sys.argv[2])
while True:
    try:
        hosts = sanlock.get_hosts(sd, host_id)
    except sanlock.SanlockError:
        hosts = []
    if hosts and hosts[0].state == "dead":
        print(time.monotonic(), flush=True)
        break
    time.sleep(0.1)
"""


def run(io_timeout: int, workdir: Path) -> dict[str, float]:
    farm = LunFarm(workdir / "farm")
    hosts = [SimHost(workdir / name, f"{name}-{io_timeout}", io_timeout=io_timeout,
                     watchdog_timeout=WATCHDOG_TIMEOUT,
                     config={"daemon": {"log_level": "INFO"}})
             for name in ("host-a", "host-b")]
    a, b = hosts
    try:
        for h in hosts:
            h.start()
        dom = make_block_domain(a.agent, farm, join=False)
        with a.agent.client() as c:
            c.call("Host.startMonitoringDomain", {"sdUUID": dom.sd, "hostID": 1})
        join_lockspace(b.agent, dom.sd, host_id=2, timeout=600)
        join_lockspace(a.agent, dom.sd, host_id=1, timeout=600)
        deadline = time.monotonic() + 120
        while dom.sd not in call(b, "Host.getStats", {})["fencing"]["listening"]:
            assert time.monotonic() < deadline, "B never listened for requests"
            time.sleep(0.2)
        assert b.watchdog is not None
        watch = subprocess.Popen(
            [sys.executable, "-c", WATCH, dom.sd, "2"], stdout=subprocess.PIPE, text=True,
            env={**os.environ, **a.sanlock.env,
                 "PYTHONPATH": str(Path(__file__).resolve().parent.parent)})
        t0, wall0 = time.monotonic(), time.time()
        fence(a, "reboot", dom.sd, 2)
        taken = ack = dead = None
        while dead is None:
            now = time.monotonic()
            if taken is None and b.agent.proc is not None and b.agent.proc.poll() is None:
                with contextlib.suppress(Exception):  # B is gone after its reset
                    received = call(b, "Host.getStats", {})["fencing"]["received"]
                    if received:
                        taken = received[0]["time"] - wall0
            status = fence(a, "status", dom.sd, 2)
            now = time.monotonic()
            if ack is None and status["acknowledged"]:
                ack = now - t0
            if status["power"] == "off":
                dead = now - t0
            assert now - t0 < 900, "B never reported dead"
            time.sleep(0.1)
        reset = b.watchdog.resets[0]
        try:
            out, _ = watch.communicate(timeout=60)
            sanlock_dead = float(out.split()[0]) - t0
        except (subprocess.TimeoutExpired, IndexError, ValueError):
            watch.kill()
            watch.wait()
            sanlock_dead = float("nan")
        nan = float("nan")
        return {"taken": nan if taken is None else taken, "ack": nan if ack is None else ack,
                "reset": reset.at - t0, "dead": dead, "sanlock_dead": sanlock_dead}
    finally:
        unmount_under(a.agent.state_dir)
        for h in hosts:
            h.stop()
        problems = farm.destroy()
        if problems:
            print("cleanup problems:", problems, file=sys.stderr)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--io-timeouts", default="1,10")
    args = ap.parse_args()
    rows = []
    for io in (int(x) for x in args.io_timeouts.split(",")):
        with tempfile.TemporaryDirectory(prefix="bench-fencing-", dir="/var/tmp") as tmp:
            rows.append((io, run(io, Path(tmp))))
    print(f"fencing: Host.fenceNode(reboot) of B by A, seconds from the request "
          f"(watchdog timeout {WATCHDOG_TIMEOUT}s)")
    print(f"{'io':>3} {'taken':>6} {'2R+1':>5} {'/bound':>6} {'ack':>6} {'reset':>6} "
          f"{'dead':>6} {'8io+60':>7} {'sanlock':>8} {'dead-sanlock':>12}")
    for io, r in rows:
        renewal = 2 * io + 1
        since_reset = r["dead"] - r["reset"]
        print(f"{io:>3} {r['taken']:>6.1f} {2 * renewal + 1:>5} "
              f"{r['taken'] / (2 * renewal + 1):>6.2f} {r['ack']:>6.1f} {r['reset']:>6.1f} "
              f"{r['dead']:>6.1f} {since_reset:>7.1f} {r['sanlock_dead']:>8.1f} "
              f"{r['dead'] - r['sanlock_dead']:>+12.1f}")
    print("taken/bound <= 1: B took the request within sanlock's delivery bound; "
          "8io+60: dead minus reset (sanlock: 8 x io_timeout + 60 after the last renewal, "
          "+ up to one renewal interval of observer lag); dead-sanlock: how long after "
          "sanlock itself said DEAD our status said off (target <= 5 s)")


if __name__ == "__main__":
    main()
