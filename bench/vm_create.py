"""VM start latency through the agent, next to the same qemu started by hand.

What it measures, against what, and why:

1. One VM at a time, with 1 and with 16 direct-LUN (GUID) disks on the SCSI bus,
   128 MiB, 1 vCPU, not launched paused. *agent*: from sending ``VM.create``
   (WebSocket) until the ``|virt|VM_status|<vmId>`` event says ``Up`` (no polling
   delay counted). *bare*: the very argv the agent gave that qemu (read from
   ``/proc/<pid>/cmdline``, its run dir swapped for a private short one) started
   by hand, until its QMP monitor answers ``query-status`` (qemu.qmp QMPClient;
   the socket is watched every millisecond). The VM is destroyed before its bare
   twin starts, so both open the same LUNs on an otherwise idle host; the two
   alternate, one pair per run. Reported: medians, overhead = agent - bare, and
   overhead / bare against the target (under 20%): what the agent adds around
   qemu (request parsing, LUN lookup, holds, vm.json, spawn, QMP, cont) must stay
   small next to what qemu itself needs to start.
2. 32 VMs created at once, one GUID disk each (32 LUNs): from the first create
   until all 32 are ``Up``, and the agent's RSS (VmRSS: before, peak sampled
   every 5 ms, after), next to their 32 argvs started by hand at once (until every
   QMP answers). The concurrent case shows serialisation in the agent (executor
   threads, event loop) that one VM at a time cannot.

The "agent phases" lines split the agent's time from its INFO log: the create
reply (storage prepared and held, vm.json written), ``started qemu`` (spawned),
``Up``. Everything the bench makes (loop LUNs, qemus, the agent, dirs) is
removed at the end, on failure too; a global deadline bounds the run.

Run it as root in a private mount namespace so its LUNs stay out of other
runs' udev database (and theirs out of this one)::

    unshare -m --propagation private bash -c 'mount -t tmpfs tmpfs /run/udev &&
        mkdir -p /run/udev/data && .venv/bin/python bench/vm_create.py'
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from types import FrameType
from typing import Any

import aiohttp
from qemu.qmp import ConnectError, QMPClient

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fake_storage.children import kill_vms_left_in
from fake_storage.cluster import SimHost
from fake_storage.lunfarm import FakeLun, LunFarm

CALL_TIMEOUT = 60.0  # any single API call or start
TARGET = 0.20  # agent overhead / bare qemu start
LUN_SIZE = "64M"
CONCURRENT = 32


# --- the agent side -------------------------------------------------------------------


def vm_params(vm_id: str, luns: list[FakeLun]) -> dict[str, Any]:
    """The legacy device-dict form an engine sends: GUID disks sda.. on scsi."""
    drives = [{"type": "disk", "device": "lun", "iface": "scsi", "index": str(i),
               "format": "raw", "readonly": "false", "shared": "false",
               "propagateErrors": "off", "GUID": lun.guid}
              for i, lun in enumerate(luns)]
    return {"vmId": vm_id, "vmName": f"bench-{vm_id[:8]}", "memSize": "128", "smp": "1",
            "maxVCpus": "1", "emulatedMachine": "pc-q35-rhel8.6.0", "launchPaused": "false",
            "devices": drives}


@dataclass
class Start:
    """One VM.create as the client saw it (time.time() stamps, to match the log)."""

    vm_id: str
    sent: float = 0.0
    replied: float = 0.0
    up: float = 0.0
    pid: int = 0
    argv: list[str] = field(default_factory=list)

    @property
    def elapsed(self) -> float:
        return self.up - self.sent


class Agent:
    """One WebSocket to the agent: calls, and the VM_status events of our VMs."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.replies: dict[int, asyncio.Future[Any]] = {}
        self.up: dict[str, asyncio.Future[float]] = {}
        self.ids = iter(range(1, 10**9))
        self.reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for msg in self.ws:
            now = time.time()
            data = json.loads(msg.data)
            if "id" in data:
                fut = self.replies.pop(data["id"], None)
                if fut is not None and not fut.done():
                    fut.set_result(data)
            elif data.get("method", "").startswith("|virt|VM_status|"):
                for vm_id, st in data["params"].items():
                    waiter = self.up.get(vm_id)
                    if not isinstance(st, dict) or waiter is None or waiter.done():
                        continue
                    if st["status"] == "Up":
                        waiter.set_result(now)
                    elif st["status"] == "Down":
                        waiter.set_exception(RuntimeError(
                            f"VM {vm_id} went Down: {st.get('exitMessage')}"))
        for fut in [*self.replies.values(), *self.up.values()]:
            if not fut.done():
                fut.set_exception(ConnectionError("agent WebSocket closed"))

    async def call(self, method: str, params: dict[str, Any]) -> Any:
        msg_id = next(self.ids)
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.replies[msg_id] = fut
        await self.ws.send_str(json.dumps({"jsonrpc": "2.0", "id": msg_id, "method": method,
                                           "params": params}))
        reply = await asyncio.wait_for(fut, CALL_TIMEOUT)
        if "error" in reply:
            raise RuntimeError(f"{method}: {reply['error']}")
        return reply["result"]

    async def create(self, luns: list[FakeLun]) -> Start:
        """VM.create until Up; then its qemu pid and argv."""
        start = Start(str(uuid.uuid4()))
        up = self.up[start.vm_id] = asyncio.get_running_loop().create_future()
        start.sent = time.time()
        await self.call("VM.create", {"vmID": start.vm_id,
                                      "vmParams": vm_params(start.vm_id, luns)})
        start.replied = time.time()
        start.up = await asyncio.wait_for(up, CALL_TIMEOUT)
        info = await self.call("VM.getInfo", {"vmID": start.vm_id})
        start.pid = int(info["pid"])
        raw = await asyncio.to_thread(Path(f"/proc/{start.pid}/cmdline").read_bytes)
        start.argv = [a.decode() for a in raw.split(b"\0")[:-1]]
        return start

    async def destroy(self, vm_id: str) -> None:
        self.up.pop(vm_id, None)
        await self.call("VM.destroy", {"vmID": vm_id})

    async def destroy_all(self) -> None:
        vms = await self.call("Host.getVMList", {"onlyUUID": True})
        await asyncio.gather(*(self.destroy(vm) for vm in vms))


# --- the bare side --------------------------------------------------------------------


class Bare:
    """qemus started by hand from an agent's argv, each in its own short run dir."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.procs: list[subprocess.Popen[bytes]] = []
        self.n = 0

    def argv_for(self, start: Start, vm_dir: Path) -> tuple[list[str], Path]:
        self.n += 1
        mine = self.base / f"b{self.n}"
        mine.mkdir()
        old = str(vm_dir / start.vm_id)
        return [a.replace(old, str(mine)) for a in start.argv], mine

    async def start(self, argv: list[str], run_dir: Path) -> float:
        """Seconds from spawning qemu until QMP answers query-status; then quit."""
        sock = run_dir / "qmp.sock"
        t0 = time.perf_counter()
        proc = self._spawn(argv, run_dir)
        deadline = t0 + CALL_TIMEOUT
        client = QMPClient(f"bare-{proc.pid}")
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"bare qemu exited {proc.returncode}: "
                                   f"{(run_dir / 'qemu.log').read_text()[-2000:]}")
            if time.perf_counter() > deadline:
                raise TimeoutError(f"bare qemu {proc.pid}: no QMP in {CALL_TIMEOUT}s")
            if sock.exists():
                try:
                    await asyncio.wait_for(client.connect(str(sock)), CALL_TIMEOUT)
                    break
                except ConnectError:  # bound, not listening yet
                    pass
            await asyncio.sleep(0.001)
        try:
            await asyncio.wait_for(client.execute("query-status"), CALL_TIMEOUT)
            elapsed = time.perf_counter() - t0
            with contextlib.suppress(Exception):
                await asyncio.wait_for(client.execute("quit"), 5)
        finally:
            with contextlib.suppress(Exception):
                await client.disconnect()
        await asyncio.to_thread(proc.wait, 30)
        self.procs.remove(proc)
        return elapsed

    def _spawn(self, argv: list[str], run_dir: Path) -> subprocess.Popen[bytes]:
        # On the loop, not in a thread: the spawn is part of what is timed, and a
        # thread hop would only add to the bare figure. As the agent does: own session,
        # stderr to qemu.log.
        with open(run_dir / "qemu.log", "wb") as err:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                    stderr=err, close_fds=True, start_new_session=True,
                                    cwd="/")
        self.procs.append(proc)
        return proc

    def kill_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(10)
        self.procs.clear()


# --- agent log: where the time goes ------------------------------------------------------

_LOG_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) .*?(started qemu for VM "
                       r"(?P<started>[0-9a-f-]{36})|VM (?P<up>[0-9a-f-]{36}) is Up)")


def log_stamps(log_path: Path) -> dict[str, float]:
    """time.time() of each VM's ``started qemu`` line (the spawn returned)."""
    out: dict[str, float] = {}
    try:
        text = log_path.read_text(errors="replace")
    except OSError:
        return out
    for line in text.splitlines():
        m = _LOG_LINE.match(line)
        if m and m.group("started"):
            ts = datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
            out[m.group("started")] = ts
    return out


# --- RSS ----------------------------------------------------------------------------------


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


@contextlib.contextmanager
def rss_peak(pid: int, interval: float = 0.005) -> Iterator[list[int]]:
    """Sample VmRSS in a thread; the yielded list holds the peak (KiB) afterwards."""
    peak = [rss_kib(pid)]
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(interval):
            with contextlib.suppress(OSError):
                peak[0] = max(peak[0], rss_kib(pid))

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    try:
        yield peak
    finally:
        stop.set()
        t.join()


# --- the rounds -----------------------------------------------------------------------------


@dataclass
class Sequential:
    agent: list[float] = field(default_factory=list)
    bare: list[float] = field(default_factory=list)
    replied: list[float] = field(default_factory=list)  # sent -> create answered
    spawned: list[float] = field(default_factory=list)  # sent -> "started qemu" logged
    starts: list[Start] = field(default_factory=list)


async def sequential(agent: Agent, bare: Bare, vm_dir: Path, luns: list[FakeLun],
                     runs: int) -> Sequential:
    out = Sequential()
    for i in range(runs + 1):  # the first pair warms caches and is not counted
        start = await agent.create(luns)
        await agent.destroy(start.vm_id)
        argv, run_dir = bare.argv_for(start, vm_dir)
        elapsed = await bare.start(argv, run_dir)
        if i:
            out.agent.append(start.elapsed)
            out.bare.append(elapsed)
            out.replied.append(start.replied - start.sent)
            out.starts.append(start)
    return out


@dataclass
class Concurrent:
    agent: list[float] = field(default_factory=list)
    bare: list[float] = field(default_factory=list)
    first_reply: list[float] = field(default_factory=list)  # from the first create sent
    last_reply: list[float] = field(default_factory=list)
    starts: list[tuple[float, list[Start]]] = field(default_factory=list)
    first_up: list[float] = field(default_factory=list)
    rss_before: list[int] = field(default_factory=list)
    rss_peak: list[int] = field(default_factory=list)
    rss_up: list[int] = field(default_factory=list)
    rss_after: list[int] = field(default_factory=list)


async def concurrent(agent: Agent, bare: Bare, *, agent_pid: int, vm_dir: Path,
                     luns: list[FakeLun], rounds: int) -> Concurrent:
    out = Concurrent()
    for _ in range(rounds):
        out.rss_before.append(rss_kib(agent_pid))
        with rss_peak(agent_pid) as peak:
            t0 = time.time()
            starts = await asyncio.gather(*(agent.create([lun]) for lun in luns))
            out.agent.append(max(s.up for s in starts) - t0)
            out.first_reply.append(min(s.replied for s in starts) - t0)
            out.last_reply.append(max(s.replied for s in starts) - t0)
            out.starts.append((t0, starts))
            out.first_up.append(min(s.up for s in starts) - t0)
            out.rss_up.append(rss_kib(agent_pid))
        out.rss_peak.append(peak[0])
        await asyncio.gather(*(agent.destroy(s.vm_id) for s in starts))
        out.rss_after.append(rss_kib(agent_pid))
        twins = [bare.argv_for(s, vm_dir) for s in starts]
        t0 = time.perf_counter()
        await asyncio.gather(*(bare.start(argv, run_dir) for argv, run_dir in twins))
        out.bare.append(time.perf_counter() - t0)
    return out


# --- reporting ------------------------------------------------------------------------------


def ms(seconds: float) -> str:
    return f"{seconds * 1000:>9.1f}"


def row(name: str, agent: list[float], bare: list[float]) -> tuple[str, bool]:
    a, b = statistics.median(agent), statistics.median(bare)
    ratio = (a - b) / b
    ok = ratio < TARGET
    return (f"{name:<22} {ms(a)} {ms(b)} {ms(a - b)} {ratio * 100:>8.0f}% "
            f"{'ok' if ok else 'MISSED':>7}", ok)


def phases(name: str, seq: Sequential, stamps: dict[str, float]) -> str:
    spawned = [stamps[s.vm_id] - s.sent for s in seq.starts if s.vm_id in stamps]
    up = statistics.median(seq.agent)
    rep = statistics.median(seq.replied)
    text = f"{name:<22} create answered {ms(rep)}"
    if spawned:
        sp = statistics.median(spawned)
        text += f" | qemu spawned {ms(sp)} | Up {ms(up)} (spawned -> Up {ms(up - sp).strip()})"
    else:
        text += f" | Up {ms(up)}"
    return text


def mib(kib: float) -> str:
    return f"{kib / 1024:.1f}"


# --- main -----------------------------------------------------------------------------------


class Deadline(Exception):
    pass


def _alarm(signum: int, frame: FrameType | None) -> None:
    raise Deadline("benchmark deadline passed")


def explain_failure(host: SimHost, farm: LunFarm) -> None:
    """What a failed run leaves to read: the agent's last words, the LUNs' state."""
    with contextlib.suppress(OSError):
        tail = host.agent.log_path.read_text(errors="replace").splitlines()[-30:]
        print("--- agent log tail ---", *tail, sep="\n", file=sys.stderr)
    for lun in farm.luns:
        name = Path(lun.loop).name
        try:
            backing = Path(f"/sys/block/{name}/loop/backing_file").read_text().strip()
        except OSError:
            backing = "(detached)"
        ok = backing == lun.backing and Path(lun.udev_file).exists()
        if not ok:
            print(f"LUN {lun.guid} on {lun.loop}: backing {backing}, udev file "
                  f"{lun.udev_file} {'present' if Path(lun.udev_file).exists() else 'gone'}",
                  file=sys.stderr)


async def run_all(url: str, bare: Bare, *, agent_pid: int, vm_dir: Path,
                  luns: list[FakeLun],
                  args: argparse.Namespace) -> tuple[dict[int, Sequential], Concurrent]:
    async with aiohttp.ClientSession() as s, s.ws_connect(url + "/jsonrpc") as ws:
        agent = Agent(ws)
        try:
            seq = {n: await sequential(agent, bare, vm_dir, luns[:n], args.runs)
                   for n in args.disks}
            conc = await concurrent(agent, bare, agent_pid=agent_pid, vm_dir=vm_dir,
                                    luns=luns[:args.vms], rounds=args.rounds)
            return seq, conc
        finally:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(agent.destroy_all(), 120)
            agent.reader.cancel()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=7, help="VM starts per disk count (median)")
    ap.add_argument("--rounds", type=int, default=3,
                    help="rounds of the concurrent start (median)")
    ap.add_argument("--vms", type=int, default=CONCURRENT, help="VMs started at once")
    ap.add_argument("--quick", action="store_true",
                    help="3 runs, 1 concurrent round of 8 VMs")
    ap.add_argument("--log-level", default="INFO", help="the agent's log level")
    ap.add_argument("--keep-log", type=Path, help="copy the agent's log here")
    ap.add_argument("--deadline", type=int, default=300, help="give up after (seconds)")
    args = ap.parse_args()
    if args.quick:
        args.runs, args.rounds, args.vms = 3, 1, 8
    args.disks = [1, 16]
    if os.geteuid() != 0:
        sys.exit("vm_create: needs root (loop LUNs, qemu on them)")

    signal.signal(signal.SIGALRM, _alarm)
    signal.signal(signal.SIGTERM, _alarm)
    signal.alarm(args.deadline)
    tmp = Path(tempfile.mkdtemp(prefix="bench-vm-", dir="/var/tmp"))
    # Short: a QMP socket path must fit in 107 bytes.
    vm_dir = Path(tempfile.mkdtemp(prefix="vl-", dir="/tmp"))
    bare = Bare(Path(tempfile.mkdtemp(prefix="vb-", dir="/tmp")))
    farm = LunFarm(tmp / "farm")
    host = SimHost(tmp / "host", "bench-vm", config={
        "daemon": {"log_level": args.log_level}, "devel": {"validate_returns": False},
        "virt": {"run_dir": str(vm_dir)}})
    failed = False
    try:
        luns = farm.create(max(*args.disks, args.vms), LUN_SIZE)
        host.start()
        assert host.agent.url is not None
        seq, conc = asyncio.run(run_all(host.agent.url, bare, agent_pid=host.agent.pid,
                                        vm_dir=vm_dir, luns=luns, args=args))
        stamps = log_stamps(host.agent.log_path)
    except BaseException:
        failed = True
        explain_failure(host, farm)
        raise
    finally:
        signal.alarm(0)
        bare.kill_all()
        if failed and host.agent.proc is not None and host.agent.proc.poll() is None:
            with contextlib.suppress(Exception), host.agent.client(timeout=30) as c:
                for vm in c.call("Host.getVMList", {"onlyUUID": True}):
                    c.call("VM.destroy", {"vmID": vm})
        if args.keep_log is not None:
            with contextlib.suppress(OSError):
                shutil.copy(host.agent.log_path, args.keep_log)
        host.stop()
        kill_vms_left_in(vm_dir)
        problems = farm.destroy()
        for d in (vm_dir, bare.base, tmp):
            shutil.rmtree(d, ignore_errors=True)
        if problems:
            print("cleanup problems:", problems, file=sys.stderr)

    print(f"vm_create: VM.create -> Up through the agent vs the same qemu argv started by "
          f"hand -> QMP answers (bare); {LUN_SIZE} GUID disks on scsi, 128 MiB, 1 vCPU, "
          "running (not paused)")
    print(f"{'case (median ms)':<22} {'agent':>9} {'bare':>9} {'overhead':>9} "
          f"{'ovh/bare':>9} {'<' + str(int(TARGET * 100)) + '%':>7}")
    results = []
    for n, s in seq.items():
        line, ok = row(f"1 VM, {n} disk{'s' if n > 1 else ''} (x{args.runs})", s.agent, s.bare)
        results.append(ok)
        print(line)
    line, ok = row(f"{args.vms} VMs at once (x{args.rounds})", conc.agent, conc.bare)
    results.append(ok)
    print(line)
    print("agent phases (median ms from VM.create sent):")
    for n, s in seq.items():
        print("  " + phases(f"{n} disk{'s' if n > 1 else ''}", s, stamps))
    med = statistics.median
    spawns = [min(stamps.get(s.vm_id, s.up) for s in starts) - t0 for t0, starts in conc.starts]
    print(f"  {args.vms} VMs at once: create answered first {ms(med(conc.first_reply)).strip()}"
          f", last {ms(med(conc.last_reply)).strip()} | first qemu spawned "
          f"{ms(med(spawns)).strip()} | Up first {ms(med(conc.first_up)).strip()}, all "
          f"{ms(med(conc.agent)).strip()}")
    print(f"agent RSS during {args.vms} concurrent creates (MiB, median of rounds): "
          f"before {mib(med(conc.rss_before))}, peak {mib(med(conc.rss_peak))} "
          f"(+{mib(med(p - b for p, b in zip(conc.rss_peak, conc.rss_before, strict=True)))}), "
          f"all Up {mib(med(conc.rss_up))}, after destroy {mib(med(conc.rss_after))}")
    print(f"target: agent overhead under {int(TARGET * 100)}% of the bare qemu start: "
          f"{sum(results)}/{len(results)} cases met")


if __name__ == "__main__":
    main()
