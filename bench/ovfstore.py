"""OVF_STORE uploads against dd and ovirt-imageio; agent CPU and RSS; the entity index.

What issue 14 asks, for a file domain (localfs) and a block domain (loop LUN),
in one run:

* throughput of a ~1 GiB tar of real OVFs (the oVirt samples in
  ``tests/data/ovf-samples`` in turn, fresh ids: 5-18 KiB each) written into a
  bench-made 1 GiB+ OVF_STORE volume three ways - the same bytes, the same
  volume:

  - vdsmlite: ``PUT /ovfstore/<sd>`` by ``curl -T`` (chunked); framing checked
    in the stream, O_DIRECT writes, commit (the reply's ``volumeID`` must be
    one of the bench's volumes); the targets are judged on this one. Then the
    same with a ``Content-Length`` (untargeted): the framing imageio gets
    here and the engine sends when it knows the size;
  - dd: ``dd bs=8M oflag=direct conv=fsync`` (the physical limit for this
    target, durable as the agent's commit is; dd without fsync is shown too);
  - ovirt-imageio 2.5.1 (the oVirt image daemon, no TLS): ``PUT`` of the same
    bytes to a ticket whose target is that volume;
  - on the file domain, an aiohttp server that only reads the body and drops
    it (no disk, no checks): the floor of any door built on aiohttp's request
    body - the agent's door was one until it got its own server
    (``http.putserver``), kept as the reference that change is measured by;

  each the median of ``--runs``; ratios vdsmlite/dd and vdsmlite/imageio;
* CPU seconds per GiB of each, measured around the upload only: the agent's
  daemon and every process under it (parser workers, lease holder; from
  ``/proc/<pid>/stat``: utime+stime, plus cutime+cstime so that a child that
  ends meanwhile counts too), dd's from ``getrusage(RUSAGE_CHILDREN)``,
  imageio's daemon's from its ``/proc/<pid>/stat``; never curl's (the same
  client for all three);
* the daemon's peak RSS growth during the upload (VmHWM after resetting it
  through ``clear_refs``), and the peak RSS of the OVF parser processes; also,
  untargeted, the daemon's peak until the store's index was ready and what it
  still holds then (the index it keeps in memory);
* the same upload with ``?check=xml`` (every ``.ovf`` parsed before the
  commit) on the file domain: its throughput and CPU next to the default's;
* how long after the commit the index of a 10,000-entity store is ready
  (``?wait=index``: the reply's ``index.seconds``), on both domains;
* ``StorageDomain.getOVFEntities`` over those 10,000 entities, each call
  including the client's JSON decoding as ``vdsmlite.client`` does it (shown
  apart too), median of ``--runs``: warm in the daemon that took all the
  uploads (every index it built still in memory), cold after an agent restart
  (the index kept on disk; the bench says whether it was loaded or rebuilt)
  and warm again (the second call after that restart);
* untargeted, the file domain's upload over TLS (``--no-tls`` skips it), as an
  engine's reaches a host: an agent of its own with a server certificate and
  a client one required, against ovirt-imageio over TLS writing the same bytes
  into the same volume: throughput and CPU per GiB of each.

Targets (issue 14): >= 0.80 of dd and ahead of ovirt-imageio on both domain
kinds; agent CPU <= 1.5x imageio's; RSS growth during the upload < 64 MiB;
listing 10,000 entities warm < 0.2 s, cold < 1.5 s. A figure off target is
printed as FAIL; the exit status is non-zero only when a step fails (or the
agent logs an unexpected exception), never for a figure.

The block domain's LUN keeps nothing in this host's memory, as a SAN LUN does
not: its loop device writes the sparse file under it with direct I/O
(``LunFarm(host_cache=False)``). With ``--lun-cache`` it goes through the
page cache as the tests' LUNs do; the kernel's copying into that cache and its
flushing then take CPU beside every writer (dd runs alone; the agent receives,
checks and writes at once). The agent runs with its production domain monitor
interval (10 s): the tests' 1 s adds an LVM scan every second.

Both store volumes are written once with dd before any measurement: the first
write into a fresh volume allocates the blocks under it (the loop LUN's sparse
file, a file volume's unwritten extents) and was 2-5x slower for any writer,
so whichever went first lost. Between measurements the bench waits for the
agent's index build of the store just written (a background job, seconds of
both cores for a 1 GiB store, until its index is kept on disk), so no
measurement runs next to it. Every step is checked (Volume.create's task, the
volumes made, each reply, each index job): a step that fails stops the run.

Run it as root (loop devices, LVM, a sanlock daemon)::

    .venv/bin/python bench/ovfstore.py [--size 1024] [--entities 10000] [--runs 3]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fake_storage.agent import Agent
from fake_storage.cluster import SimHost
from fake_storage.lunfarm import LunFarm
from tests.ovf_helpers import SAMPLES, sample_id
from tests.storage_helpers import (
    PREALLOCATED,
    RAW,
    DomainUnderTest,
    make_block_domain,
    make_localfs_domain,
    unmount_under,
)
from tests.tls_helpers import make_ca, make_cert
from vdsmlite.client import decode_reply

MiB = 1 << 20
GiB = 1 << 30
TICK = os.sysconf("SC_CLK_TCK")
# What the agent would make itself if the domain had fewer than two stores.
AGENT_STORE_SIZE = 128 * MiB
# A block domain's own LVs (metadata, leases, xleases, ids, inbox, outbox, master)
# take about 4.6 GiB of its VG; the agent refuses a VG under 10 GiB.
BLOCK_OVERHEAD = 6 * GiB
MIN_VG = 16 * GiB
TIMEOUT = 1800.0

# The agent's default (`config.SanlockSection.monitor_interval`), not the tests' 1 s.
MONITOR_INTERVAL = 10.0

RATIO_DD = 0.80
RATIO_IMAGEIO = 1.0
CPU_RATIO = 1.5
RSS_MIB = 64.0
WARM_S = 0.2
COLD_S = 1.5


class BenchError(Exception):
    """A step did not do what it must: the run is void."""


def check(condition: object, what: str) -> None:
    if not condition:
        raise BenchError(what)


# --- the archives -------------------------------------------------------------------


def sample_templates() -> list[list[bytes]]:
    """Every sample OVF, split around its entity id (joined again with a fresh one)."""
    out = []
    for path in sorted(SAMPLES.glob("*.ovf")):
        text = path.read_text()
        out.append(text.encode().split(sample_id(text).encode()))
    check(out, f"no OVF samples in {SAMPLES}")
    return out


def write_store_file(path: Path, sd: str, target_bytes: int,
                     count: int | None = None) -> tuple[int, int]:
    """A tar of real OVFs (the samples in turn, fresh ids) as the engine writes it:
    `count` of them, or about `target_bytes` worth; returns (size, entities)."""
    from vdsmlite.ovf.tarstream import TarWriter  # noqa: PLC0415

    templates = sample_templates()
    w = TarWriter(int(time.time()))
    written = 0
    with open(path, "wb") as f:
        info = json.dumps({"Last Updated": "Thu Feb 18 00:23:07 UTC 2016",
                           "Storage Domains": [{"uuid": sd}]}, indent=2).encode()
        for chunk in w.member("info.json", info):
            f.write(chunk)
        while (w.length < target_bytes) if count is None else (written < count):
            eid = str(uuid.uuid4())
            data = eid.encode().join(templates[written % len(templates)])
            for chunk in w.member(f"{eid}.ovf", data):
                f.write(chunk)
            written += 1
        for chunk in w.member("metadata.json", b'{"VM Status": {}}'):
            f.write(chunk)
        for chunk in w.end():
            f.write(chunk)
    check(path.stat().st_size == w.length, f"{path}: {path.stat().st_size} bytes written, "
          f"{w.length} expected")
    return w.length, written


# --- processes: CPU and memory ---------------------------------------------------------


def stat_fields(pid: int) -> list[str] | None:
    """/proc/<pid>/stat from field 3 (state) on; None if the process is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text.rsplit(")", 1)[1].split()


def field_of(fields: list[str], number: int) -> int:
    """Field `number` of proc(5)'s numbering (1: pid, 14: utime...)."""
    return int(fields[number - 3])


def descendants(root: int) -> list[int]:
    """Every live process under `root` (children, their children...)."""
    kids: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        fields = stat_fields(int(entry.name))
        if fields is not None:
            kids.setdefault(field_of(fields, 4), []).append(int(entry.name))
    found, todo = [], [root]
    while todo:
        for kid in kids.get(todo.pop(), []):
            found.append(kid)
            todo.append(kid)
    return found


# (pid, start time): a pid reused meanwhile is another process.
ProcKey = tuple[int, int]


def cpu_snapshot(root: int) -> dict[ProcKey, int]:
    """Clock ticks of `root` and every process under it: utime+stime (fields 14, 15)
    plus cutime+cstime (16, 17: what its children that ended and were reaped used)."""
    snap = {}
    for pid in [root, *descendants(root)]:
        fields = stat_fields(pid)
        if fields is not None:
            snap[(pid, field_of(fields, 22))] = sum(field_of(fields, n) for n in (14, 15, 16, 17))
    check(any(pid == root for pid, _ in snap), f"process {root} is gone")
    return snap


def cpu_between(before: dict[ProcKey, int], after: dict[ProcKey, int]) -> float:
    """CPU seconds the tree used between two snapshots: a process born meanwhile
    counts from 0; one that ended meanwhile is in its parent's cutime/cstime with all
    it ever used, so what it had used before is taken off."""
    ticks = sum(t - before.get(key, 0) for key, t in after.items())
    ticks -= sum(t for key, t in before.items() if key not in after)
    return ticks / TICK


def own_cpu(pid: int) -> float:
    fields = stat_fields(pid)
    check(fields is not None, f"process {pid} is gone")
    assert fields is not None
    return (field_of(fields, 14) + field_of(fields, 15)) / TICK


def children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def status_kib(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise BenchError(f"no {key} in /proc/{pid}/status")


def parser_workers(root: int) -> list[int]:
    """The daemon's OVF parser processes (multiprocessing spawn children)."""
    found = []
    for pid in descendants(root):
        with contextlib.suppress(OSError):
            if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes():
                found.append(pid)
    return found


def reset_peaks(pids: list[int]) -> None:
    """VmHWM := VmRSS (clear_refs 5)."""
    for pid in pids:
        with contextlib.suppress(OSError):
            Path(f"/proc/{pid}/clear_refs").write_text("5")


# --- the three writers ---------------------------------------------------------------


def curl_put(url: str, path: Path, *, chunked: bool,
             tls: Pki | None = None) -> tuple[float, bytes]:
    """PUT the file (over TLS, with `tls`'s client certificate, for an https `url`);
    (seconds, body). A refused upload or a transport error raises."""
    headers = ["-H", "Transfer-Encoding: chunked"] if chunked else []
    certs = tls.curl_args() if tls is not None else []
    t0 = time.perf_counter()
    out = subprocess.run(["curl", "-sS", "--fail-with-body", *certs, "-T", str(path),
                          *headers, "-H", "Expect:", url], capture_output=True)
    elapsed = time.perf_counter() - t0
    if out.returncode != 0:
        raise BenchError(f"curl -T {path} {url}: exit {out.returncode}: "
                         f"{out.stderr.decode(errors='replace').strip()} "
                         f"{out.stdout.decode(errors='replace')[:2000]}")
    return elapsed, out.stdout


@dataclass
class Measure:
    seconds: float
    cpu: float  # CPU seconds of the writer
    # vdsmlite only:
    daemon_cpu: float = 0.0  # of `cpu`, the daemon's own
    base_kib: int = 0  # the daemon's VmRSS before the upload
    rss_growth_kib: int = 0  # its peak growth during the upload
    workers_kib: int = 0  # peak RSS of the parser processes together
    index_peak_kib: int = 0  # the daemon's peak growth until its index was ready
    kept_kib: int = 0  # what the daemon still held more once the index was ready
    reply: dict[str, Any] = field(default_factory=dict)


def sink_serve(port: int) -> None:
    """`--sink PORT`: an aiohttp server that reads PUT bodies and throws them away -
    what receiving alone costs through aiohttp's request body (the agent's former
    door)."""
    from aiohttp import web  # noqa: PLC0415 (only the sink process needs it)

    async def put(request: web.Request) -> web.Response:
        n = 0
        async for chunk in request.content.iter_any():
            n += len(chunk)
        return web.Response(text=str(n))

    app = web.Application(client_max_size=0)
    app.router.add_put("/sink", put)
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None)


class Sink:
    """The aiohttp sink in its own process, its CPU measured like imageio's."""

    def __init__(self) -> None:
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Sink:
        self.proc = subprocess.Popen([sys.executable, __file__, "--sink", str(self.port)])
        for _ in range(200):
            with contextlib.suppress(OSError), socket.create_connection(
                    ("127.0.0.1", self.port), timeout=1):
                return self
            check(self.proc.poll() is None, "the aiohttp sink exited")
            time.sleep(0.05)
        raise BenchError("the aiohttp sink did not listen")

    def upload(self, src: Path) -> Measure:
        assert self.proc is not None
        before = own_cpu(self.proc.pid)
        seconds, _ = curl_put(f"http://127.0.0.1:{self.port}/sink", src, chunked=True)
        return Measure(seconds, own_cpu(self.proc.pid) - before)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(30)


def dd_write(src: Path, dst: str, *, fsync: bool = True) -> Measure:
    """dd bs=8M oflag=direct; with fsync, durable as the agent's commit (fdatasync) and
    imageio's flush are (with --lun-cache, the block domain's LUN caches in the page
    cache; a file domain's file system may hold what it has not flushed)."""
    conv = "notrunc,fsync" if fsync else "notrunc"
    cpu0 = children_cpu()
    t0 = time.perf_counter()
    out = subprocess.run(["dd", f"if={src}", f"of={dst}", "bs=8M", "oflag=direct",
                          f"conv={conv}", "status=none"], capture_output=True)
    elapsed = time.perf_counter() - t0
    cpu = children_cpu() - cpu0
    check(out.returncode == 0, f"dd of={dst}: exit {out.returncode}: "
          f"{out.stderr.decode(errors='replace').strip()}")
    return Measure(elapsed, cpu)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Pki:
    """A CA, a certificate for 127.0.0.1 (the daemons') and one for the engine (the
    client's), made with openssl: TLS as a host runs it (the agent requires it on
    any address but loopback, and a client certificate)."""

    def __init__(self, workdir: Path) -> None:
        self.dir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        make_ca(workdir, "ca")
        make_cert(workdir, "ca", "server", "IP:127.0.0.1")
        make_cert(workdir, "ca", "engine", "DNS:engine")

    def path(self, name: str) -> str:
        return str(self.dir / name)

    def curl_args(self) -> list[str]:
        return ["--cert", self.path("engine.pem"), "--key", self.path("engine.key"),
                "--cacert", self.path("ca.pem")]

    def agent_config(self) -> dict[str, str]:
        return {"tls_cert": self.path("server.pem"), "tls_key": self.path("server.key"),
                "tls_ca": self.path("ca.pem")}


class Imageio:
    """A real ovirt-imageio daemon, writing tickets' bytes to local paths; over TLS
    with `tls` (its server certificate), else plain HTTP."""

    def __init__(self, workdir: Path, tls: Pki | None = None) -> None:
        self.tls = tls
        self.workdir = workdir
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = self.cport = 0
        self.log = workdir / "imageio.log"

    def start(self) -> Imageio:
        exe = shutil.which("ovirt-imageio", path=str(Path(sys.executable).parent))
        if exe is None:
            subprocess.run([sys.executable, "-m", "pip", "install", "-q",
                            "ovirt-imageio==2.5.1"], check=True)
            exe = shutil.which("ovirt-imageio", path=str(Path(sys.executable).parent))
        check(exe, "no ovirt-imageio executable next to this python")
        assert exe is not None
        conf = self.workdir / "conf"
        (conf / "conf.d").mkdir(parents=True, exist_ok=True)
        self.port, self.cport = free_port(), free_port()
        tls = "enable = false" if self.tls is None else (
            f"enable = true\nkey_file = {self.tls.path('server.key')}\n"
            f"cert_file = {self.tls.path('server.pem')}\nca_file = {self.tls.path('ca.pem')}")
        (conf / "conf.d" / "99-bench.conf").write_text(f"""
[daemon]
run_dir = {self.workdir}/run
drop_privileges = false
systemd_enable = false
[tls]
{tls}
[remote]
host = 127.0.0.1
port = {self.port}
[local]
enable = false
[control]
transport = tcp
port = {self.cport}
[handlers]
keys = stderr
[logger_root]
handlers = stderr
level = WARNING
""")
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([exe, "--conf-dir", str(conf)], stdout=log,
                                         stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.cport}/tickets/none",
                                       timeout=5).read()
            except urllib.error.HTTPError:
                break  # it answers (404: no such ticket)
            except OSError:
                pass
            else:
                break
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise BenchError(f"ovirt-imageio did not start: {self.log_tail()}")
            time.sleep(0.1)
        return self

    def log_tail(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-2000:]
        except OSError:
            return ""

    def _control(self, method: str, ticket: str, body: dict[str, Any] | None = None) -> None:
        req = urllib.request.Request(
            f"http://127.0.0.1:{self.cport}/tickets/{ticket}", method=method,
            data=json.dumps(body).encode() if body is not None else None)
        try:
            urllib.request.urlopen(req, timeout=30).read()
        except OSError as e:
            raise BenchError(f"ovirt-imageio {method} ticket: {e}; {self.log_tail()}") from e

    def upload(self, src: Path, size: int, target: str) -> Measure:
        """PUT `src` (its `size` bytes) through the daemon into `target`."""
        assert self.proc is not None
        check(self.proc.poll() is None, f"ovirt-imageio exited: {self.log_tail()}")
        ticket = str(uuid.uuid4())
        self._control("PUT", ticket, {"uuid": ticket, "size": size, "url": f"file://{target}",
                                      "ops": ["write"], "timeout": 3600})
        try:
            cpu0 = own_cpu(self.proc.pid)
            scheme = "http" if self.tls is None else "https"
            elapsed, _ = curl_put(f"{scheme}://127.0.0.1:{self.port}/images/{ticket}", src,
                                  chunked=False, tls=self.tls)
            cpu = own_cpu(self.proc.pid) - cpu0
        finally:
            self._control("DELETE", ticket)
        return Measure(elapsed, cpu)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)


# --- the agent -----------------------------------------------------------------------


def rpc(agent: Agent, method: str, params: dict[str, Any] | None = None) -> Any:
    with agent.client(timeout=TIMEOUT) as c:
        return c.call(method, params or {})


def job_ids(agent: Agent) -> set[str]:
    return set(rpc(agent, "Host.getJobs"))


def wait_index_job(agent: Agent, sd: str, vol: str, known: set[str]) -> float:
    """Wait for the index build the agent started for `vol` after an upload (a job
    that is not in `known`); it must end done. Returns the seconds waited."""
    description = f"index OVF_STORE {vol} of {sd}"
    t0 = time.perf_counter()
    deadline = t0 + TIMEOUT
    while True:
        jobs = [j for jid, j in rpc(agent, "Host.getJobs").items()
                if jid not in known and j.get("description") == description]
        check(jobs, f"no index job for {vol} of {sd} after its upload")
        if all(j["status"] in ("done", "failed", "aborted") for j in jobs):
            bad = [j for j in jobs if j["status"] != "done"]
            check(not bad, f"index of {vol} of {sd} did not build: {bad}")
            return time.perf_counter() - t0
        check(time.perf_counter() < deadline, f"index of {vol} of {sd}: still {jobs}")
        time.sleep(0.05)


def agent_upload(agent: Agent, sd: str, tar: Path, *, size: int, entities: int,
                 volumes: set[str], query: str = "", chunked: bool = True,
                 tls: Pki | None = None) -> Measure:
    """PUT /ovfstore/<sd> (chunked, or with a Content-Length), with CPU, RSS and the
    reply checked."""
    assert agent.url is not None
    reset_peaks([agent.pid, *descendants(agent.pid)])
    base = status_kib(agent.pid, "VmRSS")
    before = cpu_snapshot(agent.pid)
    elapsed, body = curl_put(f"{agent.url}/ovfstore/{sd}{query}", tar, chunked=chunked,
                             tls=tls)
    after = cpu_snapshot(agent.pid)
    peak = status_kib(agent.pid, "VmHWM")
    workers = sum(status_kib(pid, "VmHWM") for pid in parser_workers(agent.pid))
    try:
        reply = json.loads(body)
    except ValueError as e:
        raise BenchError(f"upload reply is not JSON: {body[:2000]!r}") from e
    check(reply.get("size") == size, f"stored {reply.get('size')} bytes of {size}: {reply}")
    check(reply.get("entities") == entities,
          f"{reply.get('entities')} entities stored of {entities}: {reply}")
    check(reply.get("volumeID") in volumes,
          f"upload landed in {reply.get('volumeID')}, not in the bench's OVF_STORE "
          f"volumes {sorted(volumes)}: {reply}")
    own = [key for key in after if key[0] == agent.pid]
    daemon = sum(after[key] - before.get(key, 0) for key in own) / TICK
    return Measure(elapsed, cpu_between(before, after), daemon, base, peak - base, workers,
                   reply=reply)


def after_index(agent: Agent, m: Measure) -> None:
    """The daemon's memory once the store's index is ready (VmHWM was reset before the
    upload, so its peak covers the upload and the index build)."""
    m.index_peak_kib = status_kib(agent.pid, "VmHWM") - m.base_kib
    m.kept_kib = status_kib(agent.pid, "VmRSS") - m.base_kib


def make_ovf_volumes(dom: DomainUnderTest, size: int) -> dict[str, str]:
    """Two preallocated OVF_STORE volumes as the engine makes them: {volume: image}.
    Volume.create's task must succeed, and the volumes must be what was asked."""
    if dom.is_block:
        with dom.client as c:
            free = int(c.call("StorageDomain.getStats", {"storagedomainID": dom.sd})["diskfree"])
        check(free >= 2 * size + 2 * AGENT_STORE_SIZE,
              f"block domain {dom.sd}: {free} bytes free, two {size} byte stores need more")
    out = {}
    for _ in range(2):
        # run_task raises ServerError if the task failed (e.g. 397: no space left)
        img, vol = dom.create_volume(size=size, fmt=RAW, prealloc=PREALLOCATED,
                                     disk_type="OVFS",
                                     desc='{"DiskAlias":"OVF_STORE","DiskDescription":"OVF_STORE"}')
        info = dom.info(img, vol)
        check(int(info["capacity"]) >= size and info.get("disktype") == "OVFS",
              f"OVF_STORE volume {vol}: {info}")
        out[vol] = img
    with dom.client as c:
        images = c.call("StorageDomain.getImages", {"storagedomainID": dom.sd})
    check(sorted(images) == sorted(out.values()), f"domain {dom.sd} holds {images}")
    return out


@contextlib.contextmanager
def prepared(dom: DomainUnderTest, img: str, vol: str) -> Iterator[str]:
    path = dom.prepare(img, vol)
    check(path and Path(path).exists(), f"Image.prepare of {vol}: {path!r}")
    try:
        yield path
    finally:
        dom.teardown(img, vol)


# --- the measurements ------------------------------------------------------------------


@dataclass
class Runs:
    measures: list[Measure] = field(default_factory=list)

    def median(self, fn: Callable[[Measure], float]) -> float:
        return statistics.median(fn(m) for m in self.measures)

    def worst(self, fn: Callable[[Measure], float]) -> float:
        return max(fn(m) for m in self.measures)


def per_gib(m: Measure, size: int) -> float:
    return m.cpu * GiB / size


def upload_domain(kind: str, agent: Agent, dom: DomainUnderTest, *, imageio: Imageio,
                  tmp: Path, args: argparse.Namespace,
                  receiver: Sink | None = None) -> dict[str, Any]:
    tar = tmp / "store.tar"
    size, n = write_store_file(tar, dom.sd, args.size * MiB)
    print(f"{kind}: {n} entities, {size / MiB:.0f} MiB tar; OVF_STORE volumes of "
          f"{(size + AGENT_STORE_SIZE) / MiB:.0f} MiB", flush=True)
    vols = make_ovf_volumes(dom, size + AGENT_STORE_SIZE)
    # The first write into a fresh volume is slower for anyone (the LUN's sparse file,
    # the file domain's unwritten extents: measured 260-650 MiB/s for dd): written
    # once before anything is measured, as a real LUN's blocks always exist.
    for vol, img in vols.items():
        with prepared(dom, img, vol) as path:
            dd_write(tar, path)
    ours, dd, dd_nosync, io, strict, sink = Runs(), Runs(), Runs(), Runs(), Runs(), Runs()
    sized = Runs()
    indexed = []
    for run in range(args.runs):
        known = job_ids(agent)
        m = agent_upload(agent, dom.sd, tar, size=size, entities=n, volumes=set(vols))
        vol = m.reply["volumeID"]
        indexed.append(wait_index_job(agent, dom.sd, vol, known))
        after_index(agent, m)
        ours.measures.append(m)
        # dd and imageio: the same bytes into the volume the agent just wrote
        with prepared(dom, vols[vol], vol) as path:
            dd.measures.append(dd_write(tar, path))
            dd_nosync.measures.append(dd_write(tar, path, fsync=False))
            io.measures.append(imageio.upload(tar, size, path))
        if receiver is not None:
            sink.measures.append(receiver.upload(tar))
        # The same bytes with a Content-Length: the framing imageio gets here, and the
        # engine's (UploadStreamVDSCommand sends one when it knows the size).
        known = job_ids(agent)
        m_sized = agent_upload(agent, dom.sd, tar, size=size, entities=n,
                               volumes=set(vols), chunked=False)
        wait_index_job(agent, dom.sd, m_sized.reply["volumeID"], known)
        sized.measures.append(m_sized)
        print(f"  run {run + 1}: vdsmlite {size / MiB / m.seconds:.0f} MiB/s "
              f"(CPU {m.cpu:.2f} s, {m.daemon_cpu:.2f} of it the daemon's; RSS "
              f"+{m.rss_growth_kib / 1024:.1f} MiB; index ready {indexed[-1]:.1f} s after the "
              f"reply, RSS +{m.index_peak_kib / 1024:.0f} MiB at most until then, "
              f"+{m.kept_kib / 1024:.0f} MiB kept), "
              f"dd {size / MiB / dd.measures[-1].seconds:.0f} MiB/s "
              f"(CPU {dd.measures[-1].cpu:.2f} s), "
              f"imageio {size / MiB / io.measures[-1].seconds:.0f} MiB/s "
              f"(CPU {io.measures[-1].cpu:.2f} s), vdsmlite with a Content-Length "
              f"{size / MiB / m_sized.seconds:.0f} MiB/s (CPU {m_sized.cpu:.2f} s); daemon RSS "
              f"{status_kib(agent.pid, 'VmRSS') / 1024:.0f} MiB", flush=True)
    if args.check_xml and kind == "file":
        for run in range(args.runs):
            known = job_ids(agent)
            m = agent_upload(agent, dom.sd, tar, size=size, entities=n, volumes=set(vols),
                             query="?check=xml")
            wait_index_job(agent, dom.sd, m.reply["volumeID"], known)
            after_index(agent, m)
            strict.measures.append(m)
            print(f"  run {run + 1}: vdsmlite ?check=xml {size / MiB / m.seconds:.0f} MiB/s "
                  f"(CPU {m.cpu:.2f} s, {m.daemon_cpu:.2f} of it the daemon's; RSS "
                  f"+{m.rss_growth_kib / 1024:.1f} MiB); daemon RSS "
                  f"{status_kib(agent.pid, 'VmRSS') / 1024:.0f} MiB", flush=True)
    tar.unlink()
    return {"size": size, "entities": n, "volumes": vols, "ours": ours, "dd": dd,
            "dd_nosync": dd_nosync, "imageio": io, "strict": strict, "sink": sink,
            "sized": sized,
            "indexed": statistics.median(indexed)}


def tls_uploads(tmp: Path, args: argparse.Namespace) -> dict[str, Any]:
    """The file domain's upload over TLS, as an engine's reaches a host: an agent of its
    own with a server certificate (the client's required), against ovirt-imageio over
    TLS writing the same bytes into the same volume."""
    pki = Pki(tmp / "pki")
    host = SimHost(tmp / "tls-host", "bench-ovfstore-tls", monitor_interval=MONITOR_INTERVAL,
                   config={"daemon": {"log_level": "INFO"}, "rpc": pki.agent_config(),
                           "devel": {"validate_returns": False}})
    agent = host.agent
    imageio = Imageio(tmp / "imageio-tls", tls=pki)
    try:
        host.start()
        check(agent.url is not None and agent.url.startswith("https://"),
              f"the agent does not serve TLS: {agent.url}")
        imageio.start()
        dom = make_localfs_domain(agent, tmp / "tls-local")
        tar = tmp / "tls-store.tar"
        size, n = write_store_file(tar, dom.sd, args.size * MiB)
        vols = make_ovf_volumes(dom, size + AGENT_STORE_SIZE)
        for vol, img in vols.items():  # see upload_domain
            with prepared(dom, img, vol) as path:
                dd_write(tar, path)
        ours, io = Runs(), Runs()
        for run in range(args.runs):
            known = job_ids(agent)
            m = agent_upload(agent, dom.sd, tar, size=size, entities=n, volumes=set(vols),
                             tls=pki)
            vol = m.reply["volumeID"]
            wait_index_job(agent, dom.sd, vol, known)
            ours.measures.append(m)
            with prepared(dom, vols[vol], vol) as path:
                io.measures.append(imageio.upload(tar, size, path))
            print(f"  run {run + 1}: over TLS: vdsmlite {size / MiB / m.seconds:.0f} MiB/s "
                  f"(CPU {m.cpu:.2f} s, {m.daemon_cpu:.2f} of it the daemon's), imageio "
                  f"{size / MiB / io.measures[-1].seconds:.0f} MiB/s "
                  f"(CPU {io.measures[-1].cpu:.2f} s)", flush=True)
        tar.unlink()
        check(not agent.crashes(), f"the TLS agent logged unexpected exceptions: "
              f"{agent.crashes()[:5]}")
        return {"size": size, "ours": ours, "imageio": io}
    except BaseException:
        print(f"--- the TLS agent's log (last lines, no DEBUG) ---\n{log_excerpt(agent)}",
              file=sys.stderr)
        raise
    finally:
        imageio.stop()
        unmount_under(agent.state_dir)
        host.stop()


def index_store(kind: str, agent: Agent, dom: DomainUnderTest, *, vols: dict[str, str],
                tmp: Path, args: argparse.Namespace) -> tuple[str, float]:
    """Upload a store of `args.entities` with ?wait=index; (its volume, median
    index.seconds)."""
    tar = tmp / "index.tar"
    size, n = write_store_file(tar, dom.sd, 0, args.entities)
    seconds = []
    vol = ""
    for _ in range(args.runs):
        m = agent_upload(agent, dom.sd, tar, size=size, entities=n, volumes=set(vols),
                         query="?wait=index")
        index = m.reply.get("index") or {}
        check(index.get("state") == "ready" and index.get("entities") == n
              and index.get("failedCount") == 0,
              f"index of the {n}-entity store on {kind}: {index}")
        seconds.append(float(index["seconds"]))
        vol = m.reply["volumeID"]
    print(f"{kind}: index of {n} entities ({size / MiB:.0f} MiB tar) ready "
          f"{', '.join(f'{s:.2f}' for s in seconds)} s after the commit", flush=True)
    tar.unlink()
    return vol, statistics.median(seconds)


@dataclass
class Call:
    seconds: float  # the whole call, the client's JSON decoding included
    decode: float  # of it, the client's decoding (`vdsmlite.client.decode_reply`)
    size: int  # bytes of the reply


def list_entities(agent: Agent, sd: str, count: int) -> Call:
    """StorageDomain.getOVFEntities as `Client.call` makes it, timed in two parts."""
    msg = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "StorageDomain.getOVFEntities",
                      "params": {"storagedomainID": sd}}).encode()
    with agent.client(timeout=TIMEOUT) as c:
        t0 = time.perf_counter()
        status, body = c.post(msg)
        t1 = time.perf_counter()
        reply = decode_reply(body)
        t2 = time.perf_counter()
    check(status == 200 and isinstance(reply, dict) and "result" in reply,
          f"getOVFEntities: HTTP {status}: {body[:2000]!r}")
    got = reply["result"]
    check(len(got["entities"]) == count and not got["invalidEntities"],
          f"getOVFEntities: {len(got['entities'])} entities, "
          f"{len(got['invalidEntities'])} invalid, {count} expected")
    return Call(t2 - t0, t2 - t1, len(body))


@dataclass
class Listing:
    warm_loaded: float  # second call on, the daemon as the uploads left it
    loaded_rss_mib: float  # the daemon's VmRSS then
    cold: float  # first call after an agent restart
    warm: float  # the call after that
    how: list[str]  # how each cold call found the index
    # the same three without the client's JSON decoding: the agent's own part
    agent_part: tuple[float, float, float] = (0.0, 0.0, 0.0)


def listing(agent: Agent, dom: DomainUnderTest, vol: str, count: int, runs: int) -> Listing:
    """getOVFEntities medians: warm in the daemon that took the uploads (every store's
    index it built still in memory), then `runs` times: restart, cold, warm."""
    kept = agent.state_dir / "ovf-index" / f"{dom.sd}.{vol}.json"
    check(kept.exists(), f"the index is not kept on disk: no {kept}")
    list_entities(agent, dom.sd, count)
    loaded = [list_entities(agent, dom.sd, count) for _ in range(runs)]
    rss = status_kib(agent.pid, "VmRSS") / 1024
    cold: list[Call] = []
    warm: list[Call] = []
    how = []
    for _ in range(runs):
        check(agent.stop() == 0, f"the agent did not stop cleanly: {agent.log_text()[-3000:]}")
        agent.start()
        mark = agent.log_size()
        cold.append(list_entities(agent, dom.sd, count))
        warm.append(list_entities(agent, dom.sd, count))
        with open(agent.log_path, "rb") as f:
            f.seek(mark)
            text = f.read().decode(errors="replace")
        how.append("rebuilt" if re.search(rf"{vol} of {dom.sd} indexed", text)
                   else "loaded from disk")

    def seconds(calls: list[Call]) -> str:
        return ", ".join(f"{c.seconds:.3f} (decoding {c.decode:.3f})" for c in calls)

    print(f"file: getOVFEntities of {count} ({loaded[0].size / MiB:.1f} MiB of JSON), "
          f"seconds: warm in the daemon that took the uploads ({rss:.0f} MiB RSS) "
          f"{seconds(loaded)}; after a restart each: cold {seconds(cold)}, then warm "
          f"{seconds(warm)}", flush=True)
    def agent_part(calls: list[Call]) -> float:
        return statistics.median(c.seconds - c.decode for c in calls)

    return Listing(statistics.median(c.seconds for c in loaded), rss,
                   statistics.median(c.seconds for c in cold),
                   statistics.median(c.seconds for c in warm), how,
                   (agent_part(loaded), agent_part(cold), agent_part(warm)))


# --- the report ------------------------------------------------------------------------


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def cpu_per_gib(ms: Runs, size: int) -> float:
    return ms.median(lambda m: per_gib(m, size))


def speed(ms: Runs, size: int) -> float:
    """Bytes per second of the median run."""
    return size / ms.median(lambda m: m.seconds)


def row(kind: str, what: str, value: float, *, target: str = "", ok: bool | None = None,
        fmt: str = ".2f") -> None:
    mark = "" if ok is None else verdict(ok)
    print(f"{kind:<7}{what:<44}{value:>9{fmt}}  {target:<10}{mark}")


def report_tls(tls: dict[str, Any]) -> None:
    size = tls["size"]
    ours, io = tls["ours"], tls["imageio"]
    print()
    print("over TLS (file domain; untargeted: the targets above are for plain HTTP, where "
          "dd is the limit; TLS costs both daemons a decryption per byte)")
    for name, ms in (("vdsmlite", ours), ("ovirt-imageio 2.5.1", io)):
        speeds = [size / MiB / m.seconds for m in ms.measures]
        print(f"{'tls':<7}{name:<22}{statistics.median(speeds):>7.0f}"
              f"{f'{min(speeds):.0f}-{max(speeds):.0f}':>12}{cpu_per_gib(ms, size):>11.2f}")
    row("tls", "throughput vdsmlite / imageio", speed(ours, size) / speed(io, size))
    row("tls", "CPU/GiB vdsmlite / imageio", cpu_per_gib(ours, size) / cpu_per_gib(io, size))


def report(args: argparse.Namespace, results: dict[str, dict[str, Any]], *,
           index: dict[str, float], lists: Listing) -> None:
    runs = args.runs
    sizes = {kind: r["size"] for kind, r in results.items()}
    ents = {kind: r["entities"] for kind, r in results.items()}
    print()
    counts = ", ".join(f"{k}: {v}" for k, v in ents.items())
    volume = (args.size * MiB + AGENT_STORE_SIZE) / MiB
    print(f"ovfstore: a {args.size} MiB tar of real OVFs ({counts} entities) into a "
          f"{volume:.0f} MiB OVF_STORE volume; median of {runs} runs")
    print(f"{'domain':<7}{'writer':<22}{'MiB/s':>7}{'min-max':>12}{'CPU s/GiB':>11}"
          f"{'RSS+MiB':>9}{'workers':>9}")
    rows = [("ours", "vdsmlite"), ("sized", "  Content-Length"),
            ("strict", "vdsmlite ?check=xml"),
            ("dd", "dd oflag=direct,fsync"), ("dd_nosync", "  dd without fsync"),
            ("imageio", "ovirt-imageio 2.5.1"), ("sink", "aiohttp, no disk")]
    for kind, r in results.items():
        size = sizes[kind]
        for key, name in rows:
            ms: Runs = r[key]
            if not ms.measures:
                continue
            speeds = [size / MiB / m.seconds for m in ms.measures]
            line = (f"{kind:<7}{name:<22}{statistics.median(speeds):>7.0f}"
                    f"{f'{min(speeds):.0f}-{max(speeds):.0f}':>12}"
                    f"{cpu_per_gib(ms, size):>11.2f}")
            if key in ("ours", "sized", "strict"):
                line += (f"{ms.worst(lambda m: m.rss_growth_kib) / 1024:>9.1f}"
                         f"{ms.worst(lambda m: m.workers_kib) / 1024:>9.1f}")
            print(line)
    print("CPU: the agent's daemon and every process under it, dd's, imageio's daemon's "
          "(never curl's); RSS+MiB: the daemon's peak RSS growth during the upload; "
          "workers: peak RSS of the OVF parser processes together (MiB); both the worst run")
    print()
    print(f"{'':<7}{'figure':<44}{'value':>9}  {'target':<10}")
    for kind, r in results.items():
        size = sizes[kind]
        ours, dd, io = (speed(r[k], size) for k in ("ours", "dd", "imageio"))
        cpu, dd_cpu, io_cpu = (cpu_per_gib(r[k], size) for k in ("ours", "dd", "imageio"))
        rss = r["ours"].worst(lambda m: m.rss_growth_kib) / 1024
        row(kind, "throughput vdsmlite / dd", ours / dd, target=f">= {RATIO_DD:.2f}",
            ok=ours / dd >= RATIO_DD)
        row(kind, "throughput vdsmlite / imageio", ours / io, target=f"> {RATIO_IMAGEIO:.2f}",
            ok=ours / io > RATIO_IMAGEIO)
        row(kind, "CPU/GiB vdsmlite / imageio", cpu / io_cpu, target=f"<= {CPU_RATIO:.2f}",
            ok=cpu / io_cpu <= CPU_RATIO)
        row(kind, "CPU/GiB vdsmlite / dd", cpu / dd_cpu)
        if r["sized"].measures:
            # imageio's framing: what the chunked figures above pay for the framing
            row(kind, "with a Content-Length: throughput / dd", speed(r["sized"], size) / dd)
            row(kind, "with a Content-Length: throughput / imageio",
                speed(r["sized"], size) / io)
            row(kind, "with a Content-Length: CPU/GiB / imageio",
                cpu_per_gib(r["sized"], size) / io_cpu)
        if r["sink"].measures:
            # The floor of a door on aiohttp (the agent's, before http.putserver).
            row(kind, "CPU/GiB aiohttp receiving alone / imageio",
                cpu_per_gib(r["sink"], size) / io_cpu)
            row(kind, "throughput aiohttp receiving alone / dd", speed(r["sink"], size) / dd)
        row(kind, "RSS growth MiB (worst run)", rss, target=f"< {RSS_MIB:.0f}",
            ok=rss < RSS_MIB, fmt=".1f")
        row(kind, "RSS growth MiB until the index was ready", r["ours"].median(
            lambda m: m.index_peak_kib) / 1024, fmt=".0f")
        row(kind, "RSS MiB still held after the index", r["ours"].median(
            lambda m: m.kept_kib) / 1024, fmt=".0f")
        if r["strict"].measures:
            strict = speed(r["strict"], size)
            strict_cpu = cpu_per_gib(r["strict"], size)
            row(kind, "?check=xml throughput / default", strict / ours)
            row(kind, "?check=xml throughput / dd", strict / dd)
            row(kind, "?check=xml throughput / imageio", strict / io)
            row(kind, "?check=xml CPU s/GiB more than default", strict_cpu - cpu)
            row(kind, "?check=xml CPU/GiB / imageio", strict_cpu / io_cpu)
        row(kind, f"index of {r['entities']}: ready after reply s", r["indexed"])
    for kind, seconds in index.items():
        row(kind, f"index of {args.entities}: ready after commit s", seconds)
    n = args.entities
    row("file", f"list {n}, warm (daemon as uploads left it)", lists.warm_loaded,
        target=f"< {WARM_S}", ok=lists.warm_loaded < WARM_S, fmt=".3f")
    row("file", f"list {n}, cold (after a restart)", lists.cold, target=f"< {COLD_S}",
        ok=lists.cold < COLD_S, fmt=".3f")
    row("file", f"list {n}, warm (2nd call after a restart)", lists.warm,
        target=f"< {WARM_S}", ok=lists.warm < WARM_S, fmt=".3f")
    for what, seconds in zip(("warm", "cold", "warm after restart"), lists.agent_part,
                             strict=True):
        # untargeted: the figures above without the client's decoding
        row("file", f"list {n}, {what}, no decoding", seconds, fmt=".3f")
    print(f"listings include the client's JSON decoding; the daemon held "
          f"{lists.loaded_rss_mib:.0f} MiB RSS for the first warm figure; cold listings "
          f"(an agent restart each) found the index: {', '.join(lists.how)}")
    print(f"targets: >= {RATIO_DD:.2f} of dd and > {RATIO_IMAGEIO:.1f} of imageio (both domain "
          f"kinds); agent CPU <= {CPU_RATIO}x imageio's; RSS growth during the upload < "
          f"{RSS_MIB:.0f} MiB; "
          f"{args.entities} entities listed warm < {WARM_S} s, cold < {COLD_S} s")


def log_excerpt(agent: Agent, lines: int = 60) -> str:
    kept = [line for line in agent.log_text().splitlines() if " DEBUG " not in line]
    return "\n".join(kept[-lines:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=1024, help="tar size in MiB (default 1024)")
    ap.add_argument("--entities", type=int, default=10000,
                    help="entities of the store indexed and listed (default 10000)")
    ap.add_argument("--runs", type=int, default=3, help="runs of each writer (median)")
    ap.add_argument("--no-check-xml", dest="check_xml", action="store_false",
                    help="skip the ?check=xml uploads")
    ap.add_argument("--no-tls", dest="tls", action="store_false",
                    help="skip the uploads over TLS")
    ap.add_argument("--keep-log", type=Path, help="copy the agent's log here at the end")
    ap.add_argument("--lun-cache", action="store_true",
                    help="the block domain's LUN through this host's page cache")
    ap.add_argument("--sink", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.sink:
        sink_serve(args.sink)
        return
    check(args.runs >= 1 and args.size >= 1 and args.entities >= 1, "sizes must be positive")
    # Others' work on the same cores skews every figure: say how busy the machine was.
    print(f"load average at the start: {os.getloadavg()[0]:.2f} ({os.cpu_count()} CPUs); "
          f"block LUN {'through' if args.lun_cache else 'without'} the host's page cache",
          flush=True)
    results: dict[str, dict[str, Any]] = {}
    index: dict[str, float] = {}
    crashes: list[str] = []
    with tempfile.TemporaryDirectory(prefix="bench-ovf-", dir="/var/tmp") as tmpname:
        tmp = Path(tmpname)
        farm = LunFarm(tmp / "farm", host_cache=args.lun_cache)
        # A simulated host: its own sanlock daemon (the OVF_STORE commit holds the
        # domain's SDM lease) and the agent.
        host = SimHost(tmp / "host", "bench-ovfstore", monitor_interval=MONITOR_INTERVAL,
                       config={"daemon": {"log_level": "INFO"},
                               "devel": {"validate_returns": False}})
        agent = host.agent
        imageio = Imageio(tmp / "imageio")
        receiver = Sink()
        try:
            host.start()
            imageio.start()
            receiver.start()
            local = make_localfs_domain(agent, tmp / "local")
            store = args.size * MiB + AGENT_STORE_SIZE + MiB
            lun = max(MIN_VG, BLOCK_OVERHEAD + 2 * store + 2 * AGENT_STORE_SIZE)
            block = make_block_domain(agent, farm, size=f"{-(-lun // GiB)}G")
            results["file"] = upload_domain("file", agent, local, imageio=imageio, tmp=tmp,
                                            args=args, receiver=receiver)
            results["block"] = upload_domain("block", agent, block, imageio=imageio, tmp=tmp,
                                             args=args)
            _, index["block"] = index_store("block", agent, block,
                                            vols=results["block"]["volumes"], tmp=tmp, args=args)
            vol, index["file"] = index_store("file", agent, local,
                                             vols=results["file"]["volumes"], tmp=tmp, args=args)
            lists = listing(agent, local, vol, args.entities, args.runs)
            crashes = agent.crashes()
        except BaseException:
            print(f"--- the agent's log (last lines, no DEBUG) ---\n{log_excerpt(agent)}",
                  file=sys.stderr)
            raise
        finally:
            receiver.stop()
            imageio.stop()
            unmount_under(agent.state_dir)
            host.stop()
            if args.keep_log:
                shutil.copy(agent.log_path, args.keep_log)
            problems = farm.destroy()
            if problems:
                print("cleanup problems:", problems, file=sys.stderr)
        tls = tls_uploads(tmp, args) if args.tls else None
    report(args, results, index=index, lists=lists)
    if tls is not None:
        report_tls(tls)
    print(f"load average at the end: {os.getloadavg()[0]:.2f}")
    if crashes:
        sys.exit("the agent logged unexpected exceptions:\n" + "\n".join(crashes[:20]))


if __name__ == "__main__":
    main()
