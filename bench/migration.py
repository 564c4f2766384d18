"""Live migration through two agents, next to the same migration done by hand over QMP.

Two simulated hosts (each its own agent) share one loop LUN; the VM has 1 GiB of
RAM, 1 vCPU and that LUN as a GUID disk on scsi; one case runs it paused, one
running (SeaBIOS, no guest OS). Both migrate at maxBandwidth 10000 MiB/s.

* *agent*: from sending ``VM.migrate`` to the source agent until the destination
  agent reports the VM Up (Paused for the paused case) and the source agent
  reports it Down (its qemu stopped, storage released): polled every 2 ms over
  the agents' unix sockets. It includes the destination preparing the storage
  and starting qemu (``VM.migrationCreate``), the QMP migration, and the finish.
* *bare*: the source VM's very argv (``/proc/<pid>/cmdline``, run dir swapped for a
  private one) started by hand as the source (not timed), then timed: start the
  same argv with ``-S -incoming defer`` as destination, connect QMP,
  ``migrate-incoming`` on a unix socket, set the same capabilities and bandwidth
  on the source, ``migrate``, poll ``query-migrate`` every 2 ms until completed,
  ``cont`` the destination (running case), ``quit`` the source and wait for it.

Agent and bare runs alternate on the same LUN (never two writers), one pair per
run; reported: medians, overhead = agent - bare and overhead / bare against the
target (under 20%). Everything made (LUNs, qemus, agents, dirs) is removed at the
end, on failure too; a global deadline bounds the run.

Run it as root, ideally in a private mount namespace (see bench/vm_create.py)::

    .venv/bin/python bench/migration.py [--runs 5]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from types import FrameType
from typing import Any

from qemu.qmp import ConnectError, QMPClient

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fake_storage.children import kill_vms_left_in
from fake_storage.cluster import SimHost
from fake_storage.lunfarm import FakeLun, LunFarm
from vdsmlite.client import Client

TARGET = 0.20
MEMORY_MIB = 1024
BANDWIDTH = 10000  # MiB/s, both sides
POLL = 0.002
TIMEOUT = 120.0


class Deadline(Exception):
    pass


def _alarm(signum: int, frame: FrameType | None) -> None:
    raise Deadline("benchmark deadline passed")


def vm_params(vm_id: str, lun: FakeLun, paused: bool) -> dict[str, Any]:
    return {"vmId": vm_id, "vmName": f"bench-{vm_id[:8]}", "memSize": str(MEMORY_MIB),
            "smp": "1", "maxVCpus": "1", "emulatedMachine": "q35",
            "launchPaused": str(paused).lower(),
            "devices": [{"type": "disk", "device": "lun", "iface": "scsi", "index": "0",
                         "format": "raw", "readonly": "false", "shared": "false",
                         "propagateErrors": "off", "GUID": lun.guid}]}


def status(c: Client, vm_id: str) -> str | None:
    if vm_id not in c.call("Host.getVMList", {"onlyUUID": True}):
        return None
    return str(c.call("VM.getStats", {"vmID": vm_id})[0]["status"])


def wait_for(what: str, pred: Any) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not pred():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(POLL)


def agent_run(a: SimHost, b: SimHost, lun: FakeLun, paused: bool) -> tuple[float, list[str]]:
    """One VM created on A, migrated to B (timed), destroyed; and its argv."""
    vm_id = str(uuid.uuid4())
    want = "Paused" if paused else "Up"
    addr = b.agent.tcp_address
    assert addr is not None
    with a.agent.client() as ca, b.agent.client() as cb:
        ca.call("VM.create", {"vmID": vm_id, "vmParams": vm_params(vm_id, lun, paused)})
        wait_for("VM started", lambda: status(ca, vm_id) == want)
        pid = int(ca.call("VM.getStats", {"vmID": vm_id})[0]["pid"])
        argv = [a.decode() for a in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
                if a]
        t0 = time.perf_counter()
        ca.call("VM.migrate", {"vmID": vm_id, "params": {"dst": f"{addr[0]}:{addr[1]}",
                                                         "maxBandwidth": BANDWIDTH}})
        wait_for("destination", lambda: status(cb, vm_id) == want)
        wait_for("source Down", lambda: status(ca, vm_id) == "Down")
        elapsed = time.perf_counter() - t0
        ms = ca.call("VM.getMigrationStatus", {"vmID": vm_id})
        if ms["status"]["code"] != 0:
            raise RuntimeError(f"migration failed: {ms}")
        ca.call("VM.destroy", {"vmID": vm_id})
        cb.call("VM.destroy", {"vmID": vm_id})
    return elapsed, argv


class Bare:
    def __init__(self, base: Path) -> None:
        self.base = base
        self.procs: list[subprocess.Popen[bytes]] = []

    def spawn(self, argv: list[str], run_dir: Path) -> subprocess.Popen[bytes]:
        with open(run_dir / "qemu.log", "wb") as err:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                    stderr=err, close_fds=True, start_new_session=True,
                                    cwd="/")
        self.procs.append(proc)
        return proc

    async def connect(self, proc: subprocess.Popen[bytes], sock: Path) -> QMPClient:
        client = QMPClient(f"bare-{proc.pid}")
        deadline = time.monotonic() + TIMEOUT
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"bare qemu exited: {proc.returncode}")
            if time.monotonic() > deadline:
                raise TimeoutError("bare qemu QMP")
            if sock.exists():  # noqa: ASYNC240 - a stat on tmpfs, timed like the agent
                with contextlib.suppress(ConnectError):
                    await client.connect(str(sock))
                    return client
            await asyncio.sleep(0.001)

    async def run(self, argv: list[str], paused: bool) -> float:
        agent_dir = str(Path(argv[argv.index("-pidfile") + 1]).parent)  # the VM's dir
        src_dir = Path(tempfile.mkdtemp(prefix="s-", dir=self.base))
        dst_dir = Path(tempfile.mkdtemp(prefix="d-", dir=self.base))
        src_argv = [x.replace(agent_dir, str(src_dir)) for x in argv]
        dst_argv = [x.replace(agent_dir, str(dst_dir)) for x in argv]
        dst_argv += [*(() if "-S" in dst_argv else ("-S",)), "-incoming", "defer"]
        src = self.spawn(src_argv, src_dir)
        sq = await self.connect(src, src_dir / "qmp.sock")
        dq: QMPClient | None = None
        try:
            if not paused and "-S" in src_argv:
                await sq.execute("cont")
            t0 = time.perf_counter()
            dst = self.spawn(dst_argv, dst_dir)
            dq = await self.connect(dst, dst_dir / "qmp.sock")
            uri = f"unix:{dst_dir / 'migrate.sock'}"
            await dq.execute("migrate-incoming", {"uri": uri})
            await sq.execute("migrate-set-capabilities", {"capabilities": [
                {"capability": "events", "state": True}]})
            await sq.execute("migrate-set-parameters", {"max-bandwidth": BANDWIDTH << 20})
            await sq.execute("migrate", {"uri": uri})
            while (info := await sq.execute("query-migrate"))["status"] != "completed":
                if info["status"] in ("failed", "cancelled"):
                    raise RuntimeError(f"bare migration {info}")
                await asyncio.sleep(POLL)
            if not paused:
                await dq.execute("cont")
            with contextlib.suppress(Exception):
                await sq.execute("quit")
            await asyncio.to_thread(src.wait, 30)
            elapsed = time.perf_counter() - t0
        finally:
            for client in (sq, dq):
                if client is not None:
                    with contextlib.suppress(Exception):
                        await client.disconnect()
            self.kill_all()
        return elapsed

    def kill_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(10)
        self.procs.clear()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5, help="migrations per case (median)")
    ap.add_argument("--quick", action="store_true", help="3 runs per case")
    ap.add_argument("--deadline", type=int, default=300, help="give up after (seconds)")
    args = ap.parse_args()
    if args.quick:
        args.runs = 3
    if os.geteuid() != 0:
        sys.exit("migration: needs root (loop LUNs, qemu on them)")
    signal.signal(signal.SIGALRM, _alarm)
    signal.signal(signal.SIGTERM, _alarm)
    signal.alarm(args.deadline)
    tmp = Path(tempfile.mkdtemp(prefix="bench-mig-", dir="/var/tmp"))
    dirs = {n: Path(tempfile.mkdtemp(prefix=f"v{n}-", dir="/tmp")) for n in "ab"}
    bare = Bare(Path(tempfile.mkdtemp(prefix="vb-", dir="/tmp")))
    farm = LunFarm(tmp / "farm")
    hosts = {n: SimHost(tmp / n, f"bench-mig-{n}", config={
        "daemon": {"log_level": "INFO"}, "devel": {"validate_returns": False},
        "virt": {"run_dir": str(dirs[n])}}) for n in "ab"}
    results: dict[str, tuple[list[float], list[float]]] = {}
    try:
        lun = farm.add("64M")
        for h in hosts.values():
            h.start()
        for case, paused in (("paused", True), ("running", False)):
            agent_t: list[float] = []
            bare_t: list[float] = []
            for i in range(args.runs + 1):  # the first pair warms caches, not counted
                t, argv = agent_run(hosts["a"], hosts["b"], lun, paused)
                b = asyncio.run(bare.run(argv, paused))
                if i:
                    agent_t.append(t)
                    bare_t.append(b)
            results[case] = (agent_t, bare_t)
    finally:
        signal.alarm(0)
        bare.kill_all()
        for h in hosts.values():
            if h.agent.proc is not None and h.agent.proc.poll() is None:
                with contextlib.suppress(Exception), h.agent.client(timeout=30) as c:
                    for vm in c.call("Host.getVMList", {"onlyUUID": True}):
                        c.call("VM.destroy", {"vmID": vm})
            h.stop()
        for d in dirs.values():
            kill_vms_left_in(d)
        problems = farm.destroy()
        for d in (*dirs.values(), bare.base, tmp):
            shutil.rmtree(d, ignore_errors=True)
        if problems:
            print("cleanup problems:", problems, file=sys.stderr)

    print(f"migration: VM.migrate until the destination runs it and the source is Down "
          f"(agent) vs the same argv migrated by hand over QMP (bare); {MEMORY_MIB} MiB, "
          f"1 vCPU, one GUID disk, maxBandwidth {BANDWIDTH} MiB/s, x{args.runs}")
    print(f"{'case (median ms)':<18} {'agent':>9} {'bare':>9} {'overhead':>9} "
          f"{'ovh/bare':>9} {'<' + str(int(TARGET * 100)) + '%':>7}")
    met = 0
    for case, (agent_t, bare_t) in results.items():
        ag, ba = statistics.median(agent_t), statistics.median(bare_t)
        ratio = (ag - ba) / ba
        met += ratio < TARGET
        print(f"{case:<18} {ag * 1000:>9.1f} {ba * 1000:>9.1f} {(ag - ba) * 1000:>9.1f} "
              f"{ratio * 100:>8.1f}% {'yes' if ratio < TARGET else 'no':>7}")
    print(f"target: agent overhead under {int(TARGET * 100)}% of the bare migration: "
          f"{met}/{len(results)} cases met")


if __name__ == "__main__":
    main()
