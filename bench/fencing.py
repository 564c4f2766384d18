"""Fencing through storage: how long each step takes, next to sanlock's own bounds.

Two simulated hosts (own sanlock daemon, agent, emulated watchdog) join one
block domain on a loop LUN. A asks for B's reset with Host.fenceNode(reboot,
agent sanlock) and the benchmark times, from the request:

* ack: A sees B's acknowledgement (B received the request and answered);
* stop: B's last watchdog keepalive (B stopped petting when it took the
  request; its watchdog then fires one timeout later and the host is reset);
* dead: Host.fenceNode(status) on A says power "off" (sanlock: B DEAD).

Bounds printed beside them (../shared/reference/sanlock.md §2, §5):

* event delivery: about two renewal intervals, R = 2 x io_timeout + 1 s, so the
  ack (a request one way, the answer the other) is judged against 2R; target:
  ack within 2 renewal intervals of the request;
* DEAD: sanlock 3.8.5 declares a host dead 8 x io_timeout + 60 s after its last
  renewal (here: the reset), seen up to one renewal interval late by the
  observer; target: dead reported within 5 s of that bound.

At io_timeout 1 and 10 (10 is VDSM's default); about 7 minutes in all, most of
it the 60 s watchdog and sanlock's 8 x io_timeout + 60 s.
"""

from __future__ import annotations

import argparse
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

        t0 = time.monotonic()
        fence(a, "reboot", dom.sd, 2)
        ack = dead = None
        while dead is None:
            status = fence(a, "status", dom.sd, 2)
            now = time.monotonic()
            if ack is None and status["acknowledged"]:
                ack = now - t0
            if status["power"] == "off":
                dead = now - t0
            assert now - t0 < 600, "B never reported dead"
            time.sleep(0.25)
        reset = b.watchdog.resets[0]
        return {"ack": ack if ack is not None else float("nan"),
                "stop": reset.last_keepalive - t0, "reset": reset.at - t0, "dead": dead}
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
    print(f"{'io':>3} {'ack':>7} {'2R':>6} {'ack/2R':>7} {'stop':>7} {'reset':>7} "
          f"{'dead':>7} {'bound':>7} {'dead-bound':>11}")
    for io, r in rows:
        renewal = 2 * io + 1
        bound = r["reset"] + 8 * io + 60  # B's last renewal is at the latest its reset
        print(f"{io:>3} {r['ack']:>7.1f} {2 * renewal:>6} {r['ack'] / (2 * renewal):>7.2f} "
              f"{r['stop']:>7.1f} {r['reset']:>7.1f} {r['dead']:>7.1f} {bound:>7.1f} "
              f"{r['dead'] - bound:>+11.1f}")
    print("targets: ack/2R <= 1.0; dead - bound <= +5 s (+ up to one renewal interval of "
          "observer lag is sanlock's, not ours)")


if __name__ == "__main__":
    main()
