"""Live merge (VM.merge): commit a contiguous part of a running disk's chain into its
base with a qemu block job, then make the metadata say what qemu runs.

Node naming. A disk's leaf is opened with named nodes (``vda-format`` /
``vda-storage`` at start, ``qemu.overlay_names`` for leaves added by live
snapshots); qemu opens the rest of the chain itself from the qcow2 headers, with
generated node names. We do not open the chain explicitly: instead each volume's
node is found when needed in ``query-named-block-nodes`` by its filename (qemu
resolves a relative backing file against the image directory, so a volume's node
always has the filename ``<image dir>/<volume UUID>``), and ``block-commit`` names
``top-node`` / ``base-node``. Restart-safe and independent of how the VM started.

The job (``merge-<jobUUID>`` in qemu, ``auto-dismiss`` off, so a job that ends while
the agent is away is still there to read) is followed with ``query-block-jobs``,
woken by its QMP events (``JOB_STATUS_CHANGE``, ``BLOCK_JOB_*``) and at least every
`POLL` seconds: its
progress is what ``vmJobs`` reports (`MergeJob.info`), so ``VM.getStats`` never waits
for it. An active commit (top = leaf) is completed (the pivot, ``job-complete``) once
qemu says it is ``ready``. On success, in this order:

1. metadata: the volume above the merged range gets ``parent = base`` (an active
   commit makes the base the leaf), every merged-away volume is marked ILLEGAL;
2. the definition (source volume, chain, path) and vm.json, without the job;
3. the job dismissed in qemu, the merged-away volumes' nodes removed and the volumes
   torn down (``Volume.delete`` can then remove them).

Each job is saved in vm.json while it runs; an agent restarted during a merge finds
it again (`MergeJob.from_dict`, then ``query-block-jobs``): still running, it is
followed as before; concluded, it is finished or reported failed; gone from qemu,
qemu's chain decides whether it completed. A failed or aborted merge leaves the chain
as it was (the data copied into the base is also in the layers above it).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vdsmlite import errors
from vdsmlite.storage import commands
from vdsmlite.storage import constants as sc
from vdsmlite.storage.image import Image
from vdsmlite.storage.sd import Domain
from vdsmlite.virt import qemu
from vdsmlite.virt.definition import DiskFormat, DiskSpec, VolumeSource
from vdsmlite.virt.qmp import QmpCommandError, QmpError, QmpEvent, QmpSession
from vdsmlite.virt.snapshot import root_nodes

log = logging.getLogger("vdsmlite.virt.livemerge")

POLL = 0.5  # seconds between two query-block-jobs of a running merge (events wake it)
MiB = 1024 * 1024


@dataclass
class MergeJob:
    id: str  # the engine's jobUUID
    drive: str  # the disk's target name
    sd_id: str
    img_id: str
    base: str
    top: str
    bandwidth: int  # MiB/s, 0 = unlimited
    active: bool  # top is the leaf: active commit + pivot
    cur: int = 0
    end: int = 0
    state: str = "running"  # running | ready | pivoting | done | failed | aborting
    error: str = ""
    pivot_ms: float | None = None  # job-complete sent .. job concluded (active commit)
    task: asyncio.Task[None] | None = field(default=None, repr=False, compare=False)
    wake: asyncio.Event = field(default_factory=asyncio.Event, repr=False, compare=False)

    @property
    def qemu_id(self) -> str:
        return f"merge-{self.id}"

    def info(self) -> dict[str, Any]:
        """The job as VDSM lists it in vmJobs."""
        return {"id": self.id, "jobType": "block", "blockJobType": "commit",
                "imgUUID": self.img_id, "bandwidth": self.bandwidth,
                "cur": str(self.cur), "end": str(self.end)}

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "drive": self.drive, "sd_id": self.sd_id,
                "img_id": self.img_id, "base": self.base, "top": self.top,
                "bandwidth": self.bandwidth, "active": self.active}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MergeJob:
        return cls(id=d["id"], drive=d["drive"], sd_id=d["sd_id"], img_id=d["img_id"],
                   base=d["base"], top=d["top"], bandwidth=int(d["bandwidth"]),
                   active=bool(d["active"]))


# --- qemu's view of a chain ---------------------------------------------------------


async def volume_nodes(session: QmpSession, disk: DiskSpec) -> dict[str, str]:
    """Volume UUID -> the node-name of its format node in qemu, for the disk's chain."""
    return {vol: node["node-name"] for vol, node in
            (await volume_node_info(session, disk)).items()}


async def volume_node_info(session: QmpSession, disk: DiskSpec) -> dict[str, dict[str, Any]]:
    """Volume UUID -> its format node as query-named-block-nodes lists it."""
    assert disk.path is not None
    image_dir = os.path.dirname(disk.path)
    wanted = {os.path.join(image_dir, v): v for v in disk.chain}
    out: dict[str, dict[str, Any]] = {}
    for node in await session.query_named_block_nodes():
        if node.get("drv") not in ("qcow2", "raw"):
            continue
        vol = wanted.get(_filename(node.get("file", "")))
        if vol is not None and vol not in out:
            out[vol] = node
    return out


def _filename(name: str) -> str:
    if name.startswith("json:"):
        with contextlib.suppress(ValueError, KeyError, TypeError):
            opts = json.loads(name[5:])
            while isinstance(opts.get("file"), dict):
                opts = opts["file"]
            return str(opts.get("filename", name))
    return name


async def qemu_chain(session: QmpSession, disk: DiskSpec) -> list[str]:
    """The disk's chain as qemu runs it, base first, from the backing filenames."""
    device = qemu.disk_names(disk.name).device
    for b in await session.query_block():
        qdev = b.get("qdev") or ""
        if qdev.endswith("/virtio-backend"):
            qdev = qdev.rsplit("/", 2)[-2]
        if qdev != device or not b.get("inserted"):
            continue
        chain = []
        image: dict[str, Any] | None = b["inserted"].get("image")
        while image is not None:
            chain.append(os.path.basename(_filename(image.get("filename", ""))))
            image = image.get("backing-image")
        return list(reversed(chain))
    raise errors.MergeFailed(f"disk {disk.name} is not attached in qemu")


# --- extending the base on block domains -----------------------------------------------


def _measure_layer(path: str) -> int:
    """Bytes one qcow2 layer needs when copied (its data alone, no backing)."""
    block = qemu.is_block_device(path)
    spec = {"driver": "qcow2", "backing": None,
            "file": {"driver": "host_device" if block else "file", "filename": path}}
    out = commands.run(["qemu-img", "measure", "--output", "json", "-O", "qcow2",
                        "--force-share", "json:" + json.dumps(spec)], timeout=120)
    return int(json.loads(out.out)["required"])


def extend_base_if_needed(dom: Domain, disk: DiskSpec, base: str, above: list[str]) -> None:
    """Blocking: on a block domain, grow a COW base's LV so the data of `above` fits
    (VDSM measures with qemu-img too); raw bases and file domains need nothing."""
    ensure = getattr(dom, "ensure_lv_size", None)
    if ensure is None:
        return
    state = dom.volume(disk.source.image_id, base)  # type: ignore[union-attr]
    if state.md is None or state.md.format != sc.VolumeFormat.COW:
        return
    assert disk.path is not None
    image_dir = os.path.dirname(disk.path)
    needed = state.apparent_size + sum(_measure_layer(os.path.join(image_dir, v))
                                       for v in above)
    limit = int(state.md.capacity * sc.COW_OVERHEAD) + MiB
    ensure(disk.source.image_id, base, min(needed, limit))  # type: ignore[union-attr]


# --- the job -----------------------------------------------------------------------------


Save = Callable[[], Awaitable[None]]
Blocking = Callable[..., Awaitable[Any]]


class Merger:
    """The merges of one VM (held by the VM as `Vm.jobs`)."""

    def __init__(self, *, vm_id: str, session: Callable[[], QmpSession | None],
                 disks: Callable[[], list[DiskSpec]], domain: Callable[[str], Domain],
                 jobs: dict[str, MergeJob], save: Save, run_blocking: Blocking,
                 publish: Callable[[], None]) -> None:
        self.vm_id = vm_id
        self._session = session
        self._disks = disks
        self._domain = domain
        self.jobs = jobs
        self._save = save
        self._run = run_blocking
        self._publish = publish
        self.finished: dict[str, MergeJob] = {}  # ended jobs, by id (last outcome)

    def _disk(self, job: MergeJob) -> DiskSpec:
        for d in self._disks():
            if d.name == job.drive:
                return d
        raise errors.MergeFailed(f"VM {self.vm_id} has no disk {job.drive}")

    def on_event(self, event: QmpEvent) -> None:
        """A VM event hook: a change of one of our jobs wakes its follower at once
        (polling alone would add up to `POLL` to the pivot and the end)."""
        if not (event.name.startswith("BLOCK_JOB_") or event.name == "JOB_STATUS_CHANGE"):
            return
        qemu_id = event.data.get("id") or event.data.get("device") or ""
        if qemu_id.startswith("merge-"):
            job = self.jobs.get(qemu_id[len("merge-"):])
            if job is not None:
                job.wake.set()

    def session(self) -> QmpSession:
        s = self._session()
        if s is None:
            raise errors.NoSuchVM(f"VM {self.vm_id} is not running")
        return s

    async def start(self, disk: DiskSpec, base: str, top: str, bandwidth: int,
                    job_id: str) -> MergeJob:
        src = disk.source
        assert isinstance(src, VolumeSource)
        if job_id in self.jobs:
            raise errors.JobExists(job_id)
        if any(j.drive == disk.name for j in self.jobs.values()):
            raise errors.MergeFailed(f"disk {disk.name} already has a block job")
        chain = list(disk.chain)
        if base not in chain or top not in chain or chain.index(base) >= chain.index(top):
            raise errors.MergeFailed(f"disk {disk.name}: {top} over {base} is not a part "
                                     f"of its chain {chain}")
        if bandwidth < 0:
            raise errors.InvalidParameter(f"bandwidth {bandwidth}")
        session = self.session()
        dom = self._domain(src.domain_id)
        info = await volume_node_info(session, disk)
        nodes = {vol: node["node-name"] for vol, node in info.items()}
        if base not in nodes or top not in nodes:
            raise errors.MergeFailed(f"disk {disk.name}: qemu does not run {base} and "
                                     f"{top} (nodes {nodes})")
        if info[base].get("drv") == "qcow2":  # a raw base has all its room already
            above = chain[chain.index(base) + 1:chain.index(top) + 1]
            try:
                await self._run(extend_base_if_needed, dom, disk, base, above)
            except (errors.VdsmError, commands.CommandError, ValueError, KeyError) as e:
                raise errors.MergeFailed(f"disk {disk.name}: cannot extend base {base}: "
                                         f"{e}") from e
        job = MergeJob(id=job_id, drive=disk.name, sd_id=src.domain_id,
                       img_id=src.image_id, base=base, top=top, bandwidth=bandwidth,
                       active=top == chain[-1])
        roots = await root_nodes(session)
        args: dict[str, Any] = {
            "job-id": job.qemu_id, "device": roots[qemu.disk_names(disk.name).device],
            "top-node": nodes[top], "base-node": nodes[base], "auto-dismiss": False}
        if not job.active:
            # Keep the header relative (VDSM's form): the bare base UUID.
            args["backing-file"] = base
        if bandwidth:
            args["speed"] = bandwidth * MiB
        self.jobs[job_id] = job  # saved with the VM before qemu starts it
        try:
            await self._save()
            await session.execute("block-commit", args)
        except BaseException as e:
            self.jobs.pop(job_id, None)
            with contextlib.suppress(Exception):
                await self._save()
            if isinstance(e, QmpError):
                raise errors.MergeFailed(f"disk {disk.name}: {e}") from e
            raise
        log.info("VM %s: merge %s of disk %s started (%s into %s%s)", self.vm_id, job_id,
                 disk.name, top, base, ", active" if job.active else "")
        self.follow(job)
        self._publish()
        return job

    def follow(self, job: MergeJob) -> None:
        job.task = asyncio.create_task(self._follow(job))

    async def _follow(self, job: MergeJob) -> None:
        try:
            await self._track(job)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            log.exception("VM %s: merge %s failed", self.vm_id, job.id)
            await self._end(job, failed=f"{e}")

    async def _track(self, job: MergeJob) -> None:
        completing = False
        pivot_start = 0.0
        while True:
            job.wake.clear()
            session = self.session()
            found = next((j for j in await session.execute("query-block-jobs")
                          if j.get("device") == job.qemu_id), None)
            if found is None:
                # Dismissed or never seen (the agent died around it): qemu's chain says.
                await self._decide_by_chain(job)
                return
            job.cur, job.end = int(found.get("offset", 0)), int(found.get("len", 0))
            status = found.get("status")
            if status == "concluded":
                if completing:
                    job.pivot_ms = (time.monotonic() - pivot_start) * 1000
                    log.info("VM %s: merge %s pivoted in %.1f ms", self.vm_id, job.id,
                             job.pivot_ms)
                # qemu's chain decides, not how the job ended: a cancel that came
                # too late, or an active commit cancelled once ready (no pivot),
                # must not be reported otherwise than the VM runs.
                chain = await qemu_chain(session, self._disk(job))
                if job.top not in chain and job.base in chain:
                    await self._finish(job)
                else:
                    await self._dismiss(session, job)
                    await self._end(job, failed=found.get("error") or "cancelled")
                return
            if status == "ready" and job.active and not completing \
                    and job.state != "aborting":
                job.state = "pivoting"
                completing = True
                pivot_start = time.monotonic()
                try:
                    await session.execute("job-complete", {"id": job.qemu_id})
                except QmpCommandError as e:
                    # Asked already (before an agent restart): it completes anyway.
                    log.info("VM %s: merge %s: job-complete: %s", self.vm_id, job.id, e)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(job.wake.wait(), POLL)

    async def _decide_by_chain(self, job: MergeJob) -> None:
        disk = self._disk(job)
        chain = await qemu_chain(self.session(), disk)
        if job.top not in chain and job.base in chain:
            await self._finish(job, dismiss=False)
        else:
            await self._end(job, failed="the block job is gone from qemu and the chain "
                                        "is unchanged")

    async def _dismiss(self, session: QmpSession, job: MergeJob) -> None:
        with contextlib.suppress(QmpCommandError):
            await session.execute("job-dismiss", {"id": job.qemu_id})

    async def _finish(self, job: MergeJob, *, dismiss: bool = True) -> None:
        disk = self._disk(job)
        session = self.session()
        chain = list(disk.chain)
        b, t = chain.index(job.base), chain.index(job.top)
        removed = chain[b + 1:t + 1]
        child = chain[t + 1] if t + 1 < len(chain) else None
        dom = self._domain(job.sd_id)
        # Node names of the merged-away volumes, while qemu still lists them.
        nodes = await volume_nodes(session, disk)

        # The volume above the range first (then the chain is already right), the
        # merged-away volumes ILLEGAL after; one read of the image for all of it.
        changes: dict[str, dict[str, object]] = {}
        if child is not None:
            changes[child] = {"parent": job.base}
        changes[job.base] = {} if child is not None else {"voltype": sc.LEAF}
        for vol in removed:
            changes[vol] = {"legality": sc.ILLEGAL}
        written = await self._run(dom.update_volumes, job.img_id, changes)
        base_format = written[job.base].format
        disk.chain = chain[:b + 1] + chain[t + 1:]
        src = disk.source
        assert isinstance(src, VolumeSource) and disk.path is not None
        if child is None:
            disk.source = dataclasses.replace(src, volume_id=job.base)
            disk.path = str(Path(disk.path).parent / job.base)
            disk.format = DiskFormat.COW if base_format == sc.VolumeFormat.COW \
                else DiskFormat.RAW
        job.state = "done"  # no longer saved; listed in vmJobs until cleaned up
        job.cur = job.end

        def teardown() -> None:
            for vol in reversed(removed):
                try:
                    dom.teardown_volume(job.img_id, vol)
                except errors.VdsmError as e:
                    log.warning("VM %s: cannot tear down merged volume %s: %s",
                                self.vm_id, vol, e)

        try:
            await self._save()
            with contextlib.suppress(QmpError):  # qemu gone meanwhile: nothing to clean
                if dismiss:
                    await self._dismiss(session, job)
                await self._drop_nodes(session, disk.name,
                                       [nodes[v] for v in removed if v in nodes])
        finally:
            # Not the VM's any more (it left the chain): released whatever happens.
            await self._run(teardown)
            self.jobs.pop(job.id, None)
            self.finished[job.id] = job
        log.info("VM %s: merge %s done: disk %s chain %s", self.vm_id, job.id, disk.name,
                 disk.chain)
        self._publish()

    async def _drop_nodes(self, session: QmpSession, drive: str, formats: list[str]) -> None:
        """Remove the nodes we added (named after the disk) that qemu keeps although
        nothing uses them now; qemu's own (generated) nodes went with the job."""
        names = []
        for fmt in formats:
            if fmt.startswith(f"{drive}-"):
                # each format node over its storage node (qemu.disk_names, overlay_names)
                names += [fmt, fmt[:-len("format")] + "storage" if fmt.endswith("-format")
                          else fmt[:-2] + "-s"]
        for problem in await session.remove_nodes(names):
            log.warning("VM %s: %s", self.vm_id, problem)

    async def _end(self, job: MergeJob, *, failed: str) -> None:
        job.state, job.error = "failed", failed
        self.jobs.pop(job.id, None)
        self.finished[job.id] = job
        log.warning("VM %s: merge %s ended without merging: %s", self.vm_id, job.id, failed)
        with contextlib.suppress(OSError, errors.VdsmError):
            await self._save()
        self._publish()

    async def abort(self, job_id: str) -> None:
        job = self.jobs.get(job_id)
        if job is None:
            raise errors.NoSuchJob(job_id)
        job.state = "aborting"
        with contextlib.suppress(QmpCommandError):  # already concluded: it ends anyway
            await self.session().execute("block-job-cancel",
                                         {"device": job.qemu_id, "force": True})
        if job.task is not None:
            await asyncio.shield(job.task)

    async def wait(self, job_id: str, timeout: float | None = None) -> MergeJob:
        job = self.jobs.get(job_id)
        if job is not None and job.task is not None:
            await asyncio.wait_for(asyncio.shield(job.task), timeout)
        return self.finished[job_id]

    async def close(self) -> None:
        for job in self.jobs.values():
            if job.task is not None:
                job.task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await job.task



# --- Image.reconcileVolumeChain ------------------------------------------------------------


def reconcile_metadata(dom: Domain, img_id: str, leaf: str, actual: list[str]) -> None:
    """Blocking: make the metadata chain under `leaf` say `actual` (base first):
    parents rewritten where qemu's chain differs, volumes left out marked ILLEGAL."""
    recorded = [s.uuid for s in Image(dom, img_id).chain(leaf)]
    for i, vol in enumerate(actual):
        parent = actual[i - 1] if i else sc.BLANK_UUID
        md = dom.volume(img_id, vol).md
        if md is not None and md.parent != parent:
            dom.update_volume(img_id, vol, parent=parent)
    for vol in recorded:
        if vol not in actual:
            dom.update_volume(img_id, vol, legality=sc.ILLEGAL)


def chain_from_headers(dom: Domain, img_id: str, leaf: str) -> list[str]:
    """Blocking: the chain under `leaf` as the qcow2 headers say (base first), the
    metadata reconciled to it; the volumes are prepared only for the reading."""
    states = Image(dom, img_id).prepare(leaf, allow_illegal=True)
    try:
        path = str(dom.images_dir() / img_id / leaf)
        out = commands.run(["qemu-img", "info", "--backing-chain", "--output", "json",
                            "-U", "--", path], timeout=60)
        chain = [os.path.basename(i["filename"]) for i in reversed(json.loads(out.out))]
    finally:
        for state in reversed(states):
            dom.teardown_volume(img_id, state.uuid)
    reconcile_metadata(dom, img_id, leaf, chain)
    return chain
