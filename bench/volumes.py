"""Volume create+delete latency on a shared file and a block domain, next to the raw cost.

The file domain is posixfs over a bind mount of a local directory: a shared domain,
so every change takes the SDM lease through sanlock as on NFS (a localfs domain
takes none, and would flatter the figures).

100 volumes are created and then deleted on each domain type through the API
(Volume.create / Volume.delete, completion taken from the job's
``|jobs|status|<id>`` WebSocket event, so no polling delay is counted). In the
same run the raw cost of the same storage change is measured with nothing
else: ``lvcreate``/``lvremove`` of an LV of the same size in the same VG, and for
the file domain an exclusive create + ftruncate + fsync of a file in the same
directory (unlink + directory fsync for delete). Reported: median and p90 per
operation, and the ratio vdsmlite / raw (the price of metadata, tags, leases
and task bookkeeping).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fake_storage.agent import Agent
from fake_storage.cluster import SimHost
from fake_storage.lunfarm import LunFarm
from tests.storage_helpers import (
    BLANK,
    POSIXFS,
    PREALLOCATED,
    RAW,
    SPARSE,
    connect,
    join_lockspace,
    make_block_domain,
    new_id,
    unmount_under,
)

MiB = 1 << 20
SIZE = 128 * MiB


class Events:
    """One WebSocket: send calls, await replies and job completions."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.replies: dict[int, asyncio.Future[Any]] = {}
        self.done: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self.ids = iter(range(1, 10**9))
        self.reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for msg in self.ws:
            data = json.loads(msg.data)
            if "id" in data:
                self.replies.pop(data["id"]).set_result(data)
            elif data["method"].startswith("|jobs|status|"):
                params = data["params"]
                if params["status"] in ("done", "failed", "aborted"):
                    fut = self.done.setdefault(params["id"], asyncio.Future())
                    if not fut.done():
                        fut.set_result(params)

    async def call(self, method: str, params: dict[str, Any]) -> Any:
        msg_id = next(self.ids)
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.replies[msg_id] = fut
        await self.ws.send_str(json.dumps({"jsonrpc": "2.0", "id": msg_id, "method": method,
                                           "params": params}))
        reply = await fut
        if "error" in reply:
            raise RuntimeError(f"{method}: {reply['error']}")
        return reply["result"]

    async def task(self, method: str, params: dict[str, Any]) -> float:
        t0 = time.perf_counter()
        task_id = await self.call(method, params)
        result = await self.done.setdefault(task_id, asyncio.Future())
        elapsed = time.perf_counter() - t0
        if result["status"] != "done":
            raise RuntimeError(f"{method} failed: {result}")
        await self.call("Task.clear", {"taskID": task_id})
        return elapsed


async def api_round(url: str, sd: str, count: int, block: bool) -> tuple[list[float], list[float]]:
    creates, deletes = [], []
    async with aiohttp.ClientSession() as s, s.ws_connect(url + "/jsonrpc") as ws:
        ev = Events(ws)
        vols = []
        for _ in range(count):
            img, vol = str(uuid.uuid4()), str(uuid.uuid4())
            vols.append((img, vol))
            creates.append(await ev.task("Volume.create", {
                "volumeID": vol, "storagepoolID": BLANK, "storagedomainID": sd,
                "imageID": img, "size": str(SIZE), "volFormat": RAW,
                "preallocate": PREALLOCATED if block else SPARSE, "diskType": "DATA",
                "desc": "", "srcImgUUID": BLANK, "srcVolUUID": BLANK}))
        for img, vol in vols:
            deletes.append(await ev.task("Volume.delete", {
                "volumeID": vol, "storagepoolID": BLANK, "storagedomainID": sd,
                "imageID": img, "postZero": False, "force": False}))
        ev.reader.cancel()
    return creates, deletes


def make_bind_posixfs_domain(agent: Agent, directory: Path) -> str:
    """A posixfs domain on `directory` bind-mounted by connectStorageServer, joined."""
    directory.mkdir(parents=True)
    connect(agent, POSIXFS, {"id": new_id(), "connection": str(directory),
                             "vfs_type": "none", "mnt_options": "bind"})
    sd = new_id()
    with agent.client() as c:
        c.call("StorageDomain.create", {"storagedomainID": sd, "domainType": POSIXFS,
                                        "typeArgs": str(directory), "name": "bench-posix",
                                        "domainClass": 1, "version": "5", "blockSize": 512})
        info = c.call("StorageDomain.getInfo", {"storagedomainID": sd})
    assert info["type"] == "POSIXFS", info
    join_lockspace(agent, sd)
    return sd


def raw_lvm(vg: str, pv: str, count: int) -> tuple[list[float], list[float]]:
    from vdsmlite.storage import lvm  # noqa: PLC0415 - the very same command builder

    creates, deletes = [], []
    names = [f"bench-{i}" for i in range(count)]
    for name in names:
        t0 = time.perf_counter()
        lvm.lvcreate(vg, name, SIZE, [pv])
        creates.append(time.perf_counter() - t0)
    for name in names:
        t0 = time.perf_counter()
        lvm.lvremove(vg, [name], [pv])
        deletes.append(time.perf_counter() - t0)
    return creates, deletes


def raw_files(directory: Path, count: int) -> tuple[list[float], list[float]]:
    creates, deletes = [], []
    paths = [directory / f"bench-{i}" for i in range(count)]
    for p in paths:
        t0 = time.perf_counter()
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o660)
        os.ftruncate(fd, SIZE)
        os.fsync(fd)
        os.close(fd)
        creates.append(time.perf_counter() - t0)
    for p in paths:
        t0 = time.perf_counter()
        os.unlink(p)
        dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)  # a durable unlink
        os.fsync(dfd)
        os.close(dfd)
        deletes.append(time.perf_counter() - t0)
    return creates, deletes


def row(name: str, op: str, ours: list[float], raw: list[float]) -> str:
    med, p90 = statistics.median(ours), sorted(ours)[int(len(ours) * 0.9)]
    rmed = statistics.median(raw)
    return (f"{name:>8} {op:>7} {med * 1000:>9.1f} {p90 * 1000:>9.1f} {rmed * 1000:>9.1f} "
            f"{med / rmed:>7.1f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--count", type=int, default=100)
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-volumes-", dir="/var/tmp") as tmp:
        farm = LunFarm(Path(tmp) / "farm")
        # A simulated host: its own sanlock daemon (shared domains need the host id
        # and the SDM lease for every change) and the agent.
        host = SimHost(Path(tmp) / "host", "bench-volumes", config={
            "daemon": {"log_level": "INFO"}, "devel": {"validate_returns": False}}).start()
        agent = host.agent
        try:
            assert agent.url is not None
            shared = Path(tmp) / "shared"
            posix = make_bind_posixfs_domain(agent, shared)
            block = make_block_domain(agent, farm, size=f"{(args.count * SIZE >> 30) + 12}G")
            assert block.lun is not None
            c, d = asyncio.run(api_round(agent.url, posix, args.count, block=False))
            rc, rd = raw_files(shared, args.count)
            rows += [row("posixfs", "create", c, rc), row("posixfs", "delete", d, rd)]
            c, d = asyncio.run(api_round(agent.url, block.sd, args.count, block=True))
            rc, rd = raw_lvm(block.sd, block.lun.loop, args.count)
            rows += [row("block", "create", c, rc), row("block", "delete", d, rd)]
        finally:
            unmount_under(agent.state_dir)
            host.stop()
            problems = farm.destroy()
            if problems:
                print("cleanup problems:", problems, file=sys.stderr)
    print(f"volumes: {args.count} x {SIZE // MiB} MiB volumes, create then delete, "
          "per operation (ms)")
    print(f"{'domain':>8} {'op':>7} {'median':>9} {'p90':>9} {'raw med':>9} {'ratio':>7}")
    for r in rows:
        print(r)
    print("posixfs = a bind mount of a local directory, SDM lease taken per change; "
          "raw = lvcreate/lvremove of the same LV (block); create+ftruncate+fsync and "
          "unlink+dir fsync in the same directory (posixfs)")


if __name__ == "__main__":
    main()
