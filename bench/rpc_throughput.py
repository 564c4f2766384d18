"""JSON-RPC throughput and latency of Host.ping2, as a ratio against a bare aiohttp handler.

Both servers run as separate processes on this machine in the same run. The
load comes from `wrk` (C, one thread, keep-alive connections) so the load
generator is never the bottleneck: with 2 cores, wrk takes one and the server
under test the other. Targets alternate over several rounds and medians are
reported, so machine noise hits both alike.

Target (issue 2): vdsmlite / bare >= 0.7 in calls/s at 64 clients.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fake_storage.agent import Agent

REQUEST = {"jsonrpc": "2.0", "id": 1, "method": "Host.ping2"}
LUA = f"""
wrk.method = "POST"
wrk.body = '{json.dumps(REQUEST, separators=(",", ":"))}'
wrk.headers["Content-Type"] = "application/json"
"""

_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0}


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s)", text)
    if not m:
        raise ValueError(f"cannot parse wrk latency {text!r}")
    return float(m.group(1)) * _UNITS[m.group(2)]


def check(url: str) -> None:
    req = urllib.request.Request(url, data=json.dumps(REQUEST).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        reply = json.loads(r.read())
    if reply != {"jsonrpc": "2.0", "id": 1, "result": True}:
        raise RuntimeError(f"{url} answered {reply}")


def wrk(url: str, clients: int, seconds: float, script: Path) -> tuple[float, float, float]:
    out = subprocess.run(
        ["wrk", "-t1", f"-c{clients}", f"-d{seconds:.0f}s", "--latency", "-s", str(script), url],
        capture_output=True, text=True, check=True).stdout
    if "Non-2xx" in out or "Socket errors" in out:
        raise RuntimeError(f"errors during load on {url}:\n{out}")
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    p50 = _ms(re.search(r"^\s+50%\s+(\S+)", out, re.M).group(1))  # type: ignore[union-attr]
    p99 = _ms(re.search(r"^\s+99%\s+(\S+)", out, re.M).group(1))  # type: ignore[union-attr]
    return rate, p50, p99


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seconds", type=float, default=5.0, help="per measurement")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("bench/rpc_throughput.py needs wrk (apt-get install wrk; `make bench` does)")

    with tempfile.TemporaryDirectory(prefix="bench-rpc-") as tmp:
        script = Path(tmp) / "post.lua"
        script.write_text(LUA)
        agent = Agent(Path(tmp) / "agent", config={
            "daemon": {"log_level": "INFO"}, "devel": {"validate_returns": False}}).start()
        bare = subprocess.Popen([sys.executable, str(Path(__file__).parent / "bare_server.py")],
                                stdout=subprocess.PIPE, text=True)
        try:
            assert bare.stdout is not None
            targets = {"vdsmlite": f"{agent.url}/jsonrpc",
                       "bare-aiohttp": f"http://127.0.0.1:{int(bare.stdout.readline())}/jsonrpc"}
            for url in targets.values():
                check(url)
            results: dict[tuple[str, int], list[tuple[float, float, float]]] = {}
            for clients in (1, 64):
                for url in targets.values():
                    wrk(url, clients, 1, script)  # warm-up
                for _ in range(args.rounds):
                    for name, url in targets.items():
                        results.setdefault((name, clients), []).append(
                            wrk(url, clients, args.seconds, script))
        finally:
            bare.terminate()
            bare.wait(10)
            agent.stop()

    print(f"rpc_throughput: Host.ping2 over HTTP POST /jsonrpc, wrk keep-alive, "
          f"medians of {args.rounds} x {args.seconds:.0f}s")
    print(f"{'clients':>7} {'server':>13} {'calls/s':>9} {'p50 ms':>7} {'p99 ms':>7}")
    for clients in (1, 64):
        rates = {}
        for name in targets:
            runs = results[(name, clients)]
            rates[name] = statistics.median(r[0] for r in runs)
            p50 = statistics.median(r[1] for r in runs)
            p99 = statistics.median(r[2] for r in runs)
            print(f"{clients:>7} {name:>13} {rates[name]:>9.0f} {p50:>7.2f} {p99:>7.2f}")
        ratio = rates["vdsmlite"] / rates["bare-aiohttp"]
        target = "  (target >= 0.70)" if clients == 64 else ""
        print(f"{clients:>7} {'ratio':>13} {ratio:>9.2f}{target}")


if __name__ == "__main__":
    main()
