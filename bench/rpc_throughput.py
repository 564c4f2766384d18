"""JSON-RPC throughput and latency of Host.ping2, as a ratio against a bare aiohttp handler.

Both servers run as separate processes on this machine in the same run. The
load comes from `wrk` (C, one thread, keep-alive connections) so the load
generator is never the bottleneck: with 2 cores, wrk takes one and the server
under test the other. Targets alternate over several rounds and medians are
reported, so machine noise hits both alike.

Target (issue 2): vdsmlite / bare >= 0.7 in calls/s at 64 clients.

STOMP (issue 13): wrk speaks no STOMP, so a second, Python load generator
(`--load`, run as its own process, raw asyncio protocols, one call in flight
per connection like wrk) drives the same Host.ping2 over STOMP to vdsmlite and
over HTTP keep-alive to vdsmlite and to the bare server, in the same run. The
STOMP ratios compare like with like: STOMP / HTTP (target >= 1.0) and STOMP /
bare, all measured by that generator.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

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


# --- the Python load generator (HTTP keep-alive or STOMP), one call in flight per connection


_BODY = json.dumps(REQUEST, separators=(",", ":")).encode()
_HTTP_REQ = (b"POST /jsonrpc HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
             b"Content-Length: " + str(len(_BODY)).encode() + b"\r\n\r\n" + _BODY)
# Each connection its own reply-to queue: a reply goes to every subscriber of its queue.
_STOMP_REQ = (b"SEND\ndestination:jms.topic.vdsm_requests\nreply-to:r%d\n"
              b"content-type:application/json\ncontent-length:" + str(len(_BODY)).encode()
              + b"\n\n" + _BODY + b"\0")
_STOMP_HELLO = (b"CONNECT\naccept-version:1.2\nheart-beat:0,0\n\n\0"
                b"SUBSCRIBE\ndestination:r%d\nid:1\nack:auto\n\n\0")


class _LoadConn(asyncio.Protocol):
    def __init__(self, kind: str, stats: dict[str, Any], n: int) -> None:
        self.kind = kind
        self.stomp_req = _STOMP_REQ % n
        self.stomp_hello = _STOMP_HELLO % n
        self.stats = stats
        self.buf = b""
        self.sent = 0.0
        self.transport: Any = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        if self.kind == "stomp":
            transport.write(self.stomp_hello)
        self._send()

    def _send(self) -> None:
        if time.monotonic() >= self.stats["end"]:
            self.transport.close()
            return
        self.sent = time.monotonic()
        self.transport.write(self.stomp_req if self.kind == "stomp" else _HTTP_REQ)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while True:
            if self.kind == "stomp":
                end = self.buf.find(b"\0")
                if end < 0:
                    return
                frame, self.buf = self.buf[:end], self.buf[end + 1:].lstrip(b"\n")
                if not frame.startswith(b"MESSAGE"):
                    continue
            else:
                head_end = self.buf.find(b"\r\n\r\n")
                if head_end < 0:
                    return
                i = self.buf.find(b"Content-Length: ", 0, head_end)
                n = int(self.buf[i + 16:self.buf.find(b"\r\n", i)])
                if len(self.buf) < head_end + 4 + n:
                    return
                self.buf = self.buf[head_end + 4 + n:]
            now = time.monotonic()
            if now >= self.stats["start"]:
                self.stats["lat"].append(now - self.sent)
            self._send()


async def _load(kind: str, host: str, port: int, clients: int, seconds: float) -> dict[str, float]:
    loop = asyncio.get_running_loop()
    stats: dict[str, Any] = {"start": time.monotonic() + 0.5,
                             "end": time.monotonic() + 0.5 + seconds, "lat": []}
    conns = [await loop.create_connection(lambda n=n: _LoadConn(kind, stats, n), host, port)
             for n in range(clients)]
    await asyncio.sleep(stats["end"] - time.monotonic() + 0.2)
    for transport, _ in conns:
        transport.close()
    lat = sorted(stats["lat"])
    return {"rate": len(lat) / seconds, "p50": lat[len(lat) // 2] * 1000,
            "p99": lat[int(len(lat) * 0.99)] * 1000}


def pyload(kind: str, host: str, port: int, clients: int,
           seconds: float) -> tuple[float, float, float]:
    out = subprocess.run([sys.executable, __file__, "--load", kind, host, str(port), str(clients),
                          str(seconds)], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"load generator ({kind}, {clients} clients) failed:\n{out.stderr}")
    r = json.loads(out.stdout)
    return r["rate"], r["p50"], r["p99"]


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--load":
        kind, host, port, clients, seconds = sys.argv[2:7]
        print(json.dumps(asyncio.run(_load(kind, host, int(port), int(clients), float(seconds)))))
        return
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
            assert agent.tcp_address is not None
            bare_port = int(targets["bare-aiohttp"].rsplit(":", 1)[1].split("/")[0])
            py_targets = {"stomp": ("stomp", *agent.tcp_address),
                          "http": ("http", *agent.tcp_address),
                          "bare-http": ("http", "127.0.0.1", bare_port)}
            py: dict[tuple[str, int], list[tuple[float, float, float]]] = {}
            for clients in (1, 64):
                for url in targets.values():
                    wrk(url, clients, 1, script)  # warm-up
                for kind, host, port in py_targets.values():
                    pyload(kind, host, port, clients, 1)  # warm-up
                for _ in range(args.rounds):
                    for name, url in targets.items():
                        results.setdefault((name, clients), []).append(
                            wrk(url, clients, args.seconds, script))
                    for name, (kind, host, port) in py_targets.items():
                        py.setdefault((name, clients), []).append(
                            pyload(kind, host, port, clients, args.seconds))
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

    print(f"\nrpc_throughput: Host.ping2, STOMP vs HTTP, Python load generator, "
          f"medians of {args.rounds} x {args.seconds:.0f}s")
    print(f"{'clients':>7} {'door':>13} {'calls/s':>9} {'p50 ms':>7} {'p99 ms':>7}")
    for clients in (1, 64):
        rates = {}
        for name in py_targets:
            runs = py[(name, clients)]
            rates[name] = statistics.median(r[0] for r in runs)
            p50 = statistics.median(r[1] for r in runs)
            p99 = statistics.median(r[2] for r in runs)
            print(f"{clients:>7} {name:>13} {rates[name]:>9.0f} {p50:>7.2f} {p99:>7.2f}")
        print(f"{clients:>7} {'stomp/http':>13} {rates['stomp'] / rates['http']:>9.2f}"
              "  (target >= 1.00)")
        print(f"{clients:>7} {'stomp/bare':>13} {rates['stomp'] / rates['bare-http']:>9.2f}")


if __name__ == "__main__":
    main()
