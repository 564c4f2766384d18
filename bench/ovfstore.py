"""OVF_STORE upload throughput against dd and ovirt-imageio; RSS; listing 10,000 entities.

For a file domain and a block domain (loop LUN), in the same run:

* vdsmlite: a ~1 GiB tar of real-looking OVFs (the engine sample with fresh
  ids) PUT to ``/ovfstore/<sd>`` (chunked, by curl) into a 1 GiB+ OVF_STORE
  volume: validated and written with O_DIRECT, then committed;
* dd: the same bytes written to the same volume with ``dd bs=8M oflag=direct``
  (the physical limit for this target);
* ovirt-imageio 2.5.1 (the oVirt image daemon, no TLS): the same bytes PUT
  to a ticket whose target is a file on the same filesystem;
* the daemon's peak RSS growth during the upload (VmHWM after resetting it),
  and the peak RSS of its OVF parser processes;
* the time of StorageDomain.getOVFEntities over a 10,000-entity store, cold
  (a freshly started daemon: no cache, no parser process yet) and warm
  (cached), each including the client's JSON decoding.

Targets (issue 5): >= 0.8 of dd, ahead of ovirt-imageio, RSS growth < 64 MiB,
10,000 entities listed in < 2 s.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fake_storage.agent import Agent
from fake_storage.cluster import SimHost
from fake_storage.lunfarm import LunFarm
from tests.ovf_helpers import ENGINE_SAMPLE, sample_id
from tests.storage_helpers import (
    BLANK,
    DomainUnderTest,
    make_block_domain,
    make_localfs_domain,
    unmount_under,
    wait_task,
)

MiB = 1 << 20
GiB = 1 << 30


def write_store_file(path: Path, sd: str, target_bytes: int,
                     count: int | None = None) -> tuple[int, int]:
    """A tar of engine OVFs (`count` of them, or about `target_bytes` worth),
    streamed to `path`; returns (size, entities)."""
    from vdsmlite.ovf.tarstream import TarWriter  # noqa: PLC0415

    text = ENGINE_SAMPLE.read_text()
    old = sample_id(text)
    w = TarWriter(int(time.time()))
    written = 0
    with open(path, "wb") as f:
        info = json.dumps({"Last Updated": "Thu Feb 18 00:23:07 UTC 2016",
                           "Storage Domains": [{"uuid": sd}]}, indent=2).encode()
        for chunk in w.member("info.json", info):
            f.write(chunk)
        while (w.length < target_bytes) if count is None else (written < count):
            eid = str(uuid.uuid4())
            for chunk in w.member(f"{eid}.ovf", text.replace(old, eid).encode()):
                f.write(chunk)
            written += 1
        for chunk in w.member("metadata.json", b'{"VM Status": {}}'):
            f.write(chunk)
        for chunk in w.end():
            f.write(chunk)
    return w.length, written


def rpc(agent: Agent, method: str, params: dict[str, Any]) -> Any:
    with agent.client(timeout=3600) as c:
        return c.call(method, params)


def make_ovf_volumes(dom: DomainUnderTest, size: int) -> list[tuple[str, str]]:
    out = []
    with dom.client as c:
        for _ in range(2):
            img, vol = str(uuid.uuid4()), str(uuid.uuid4())
            wait_task(c, c.call("Volume.create", {
                "volumeID": vol, "storagepoolID": BLANK, "storagedomainID": dom.sd,
                "imageID": img, "size": str(size), "volFormat": 5,
                "preallocate": 1, "diskType": "OVFS",
                "desc": '{"DiskAlias":"OVF_STORE","DiskDescription":"OVF_STORE"}',
                "srcImgUUID": BLANK, "srcVolUUID": BLANK}), timeout=600)
            out.append((img, vol))
    return out


def rss_kib(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def children(pid: int) -> list[int]:
    """The daemon's helper processes (the OVF parser workers), from /proc."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(stat.parent.name))
        except (OSError, IndexError, ValueError):
            pass
    return found


def reset_peaks(pids: list[int]) -> None:
    for pid in pids:
        with contextlib.suppress(OSError):
            Path(f"/proc/{pid}/clear_refs").write_text("5")


def curl_put(url: str, path: Path, chunked: bool) -> tuple[float, bytes]:
    headers = ["-H", "Transfer-Encoding: chunked"] if chunked else []
    t0 = time.perf_counter()
    out = subprocess.run(["curl", "-sS", "--fail-with-body", "-T", str(path), *headers,
                          "-H", "Expect:", url], capture_output=True, check=True)
    return time.perf_counter() - t0, out.stdout


def dd(src: Path, dst: str) -> float:
    t0 = time.perf_counter()
    subprocess.run(["dd", f"if={src}", f"of={dst}", "bs=8M", "oflag=direct", "conv=notrunc",
                    "status=none"], check=True)
    return time.perf_counter() - t0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def imageio_upload(workdir: Path, src: Path, size: int) -> float:
    """Upload `src` through a real ovirt-imageio daemon into a file next to it."""
    exe = shutil.which("ovirt-imageio", path=str(Path(sys.executable).parent))
    if exe is None:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "ovirt-imageio==2.5.1"],
                       check=True)
        exe = shutil.which("ovirt-imageio", path=str(Path(sys.executable).parent))
    assert exe
    conf = workdir / "imageio"
    (conf / "conf.d").mkdir(parents=True, exist_ok=True)
    port, cport = free_port(), free_port()
    (conf / "conf.d" / "99-bench.conf").write_text(f"""
[daemon]
run_dir = {workdir}/imageio-run
drop_privileges = false
systemd_enable = false
[tls]
enable = false
[remote]
host = 127.0.0.1
port = {port}
[local]
enable = false
[control]
transport = tcp
port = {cport}
[handlers]
keys = stderr
[logger_root]
handlers = stderr
level = WARNING
""")
    target = workdir / "imageio-target"
    with open(target, "wb") as f:
        f.truncate(size)
    proc = subprocess.Popen([exe, "--conf-dir", str(conf)], stderr=subprocess.DEVNULL)
    try:
        ticket = str(uuid.uuid4())
        body = json.dumps({"uuid": ticket, "size": size, "url": f"file://{target}",
                           "ops": ["write"], "timeout": 3600}).encode()
        for _ in range(100):
            try:
                req = urllib.request.Request(f"http://127.0.0.1:{cport}/tickets/{ticket}",
                                             data=body, method="PUT")
                urllib.request.urlopen(req, timeout=10).read()
                break
            except OSError:
                time.sleep(0.1)
        elapsed, _ = curl_put(f"http://127.0.0.1:{port}/images/{ticket}", src, chunked=False)
        return elapsed
    finally:
        proc.terminate()
        proc.wait(30)


def run_domain(kind: str, agent: Agent, dom: DomainUnderTest, tar: Path, size: int, *,
               tmp: Path) -> dict[str, float]:
    assert agent.url is not None
    vols = make_ovf_volumes(dom, size + GiB // 8)
    # dd onto the first OVF volume (the physical limit on this target)
    path = dom.prepare(*vols[0])
    dd_s = min(dd(tar, path) for _ in range(2))
    dom.teardown(*vols[0])
    # vdsmlite: peak RSS reset (daemon and parser workers), then upload
    reset_peaks([agent.pid, *children(agent.pid)])
    base = rss_kib(agent.pid, "VmRSS")
    ours_s, reply = curl_put(f"{agent.url}/ovfstore/{dom.sd}", tar, chunked=True)
    result = json.loads(reply)
    assert result["size"] == size, result
    peak = rss_kib(agent.pid, "VmHWM")
    workers = sum(rss_kib(pid, "VmHWM") for pid in children(agent.pid))
    io_s = imageio_upload(tmp / f"imageio-{kind}", tar, size)
    return {"ours": size / ours_s, "dd": size / dd_s, "imageio": size / io_s,
            "rss_growth_mib": (peak - base) / 1024, "workers_mib": workers / 1024,
            "entities": result["entities"]}


def listing(agent: Agent, dom: DomainUnderTest, tmp: Path, count: int) -> tuple[float, float]:
    path = tmp / "listing.tar"
    size, n = write_store_file(path, dom.sd, 0, count)
    assert agent.url is not None
    curl_put(f"{agent.url}/ovfstore/{dom.sd}", path, chunked=False)
    # Cold means nothing cached: a fresh daemon (its parser processes start with it).
    agent.stop()
    agent.start()
    t0 = time.perf_counter()
    got = rpc(agent, "StorageDomain.getOVFEntities", {"storagedomainID": dom.sd})
    cold = time.perf_counter() - t0
    assert len(got["entities"]) == n, (len(got["entities"]), n)
    t0 = time.perf_counter()
    rpc(agent, "StorageDomain.getOVFEntities", {"storagedomainID": dom.sd})
    warm = time.perf_counter() - t0
    print(f"  listing store: {n} entities, {size / MiB:.0f} MiB tar")
    return cold, warm


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--size", type=int, default=1024, help="tar size in MiB")
    ap.add_argument("--entities", type=int, default=10000)
    args = ap.parse_args()
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench-ovf-", dir="/var/tmp") as tmpname:
        tmp = Path(tmpname)
        tar = tmp / "store.tar"
        farm = LunFarm(tmp / "farm")
        # A simulated host: its own sanlock daemon (the OVF_STORE commit holds the
        # domain's SDM lease) and the agent.
        host = SimHost(tmp / "host", "bench-ovfstore", config={
            "daemon": {"log_level": "INFO"}, "devel": {"validate_returns": False}}).start()
        agent = host.agent
        try:
            local = make_localfs_domain(agent, tmp / "local")
            block = make_block_domain(agent, farm, size=f"{2 * args.size // 1024 + 14}G")
            size, n = write_store_file(tar, local.sd, args.size * MiB)
            print(f"  upload store: {n} entities, {size / MiB:.0f} MiB tar")
            results["file"] = run_domain("file", agent, local, tar, size, tmp=tmp)
            size, n = write_store_file(tar, block.sd, args.size * MiB)
            results["block"] = run_domain("block", agent, block, tar, size, tmp=tmp)
            cold, warm = listing(agent, local, tmp, args.entities)
        finally:
            unmount_under(agent.state_dir)
            host.stop()
            problems = farm.destroy()
            if problems:
                print("cleanup problems:", problems, file=sys.stderr)
    print(f"ovfstore: PUT /ovfstore of a {args.size} MiB tar (curl, chunked)")
    print(f"{'domain':>7} {'vdsmlite':>10} {'dd':>10} {'imageio':>10} {'/dd':>6} "
          f"{'/imageio':>9} {'RSS+MiB':>8} {'workers':>8}")
    for kind, r in results.items():
        print(f"{kind:>7} {r['ours'] / MiB:>8.0f}/s {r['dd'] / MiB:>8.0f}/s "
              f"{r['imageio'] / MiB:>8.0f}/s {r['ours'] / r['dd']:>6.2f} "
              f"{r['ours'] / r['imageio']:>9.2f} {r['rss_growth_mib']:>8.1f} "
              f"{r['workers_mib']:>8.1f}")
    print("RSS+MiB: the daemon's peak RSS growth during the upload; workers: peak RSS "
          "of the OVF parser processes together (MiB)")
    print(f"getOVFEntities over {args.entities} entities: cold {cold:.2f} s, warm {warm:.3f} s")
    print("targets: >= 0.80 of dd, > 1.0 of imageio, RSS growth < 64 MiB, listing < 2 s")


if __name__ == "__main__":
    main()
