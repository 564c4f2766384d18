"""Building domains and volumes through the real API, for storage tests; the simulated
hosts they run on (`StorageEnv`), and domains shared by the tests of a module
(`SharedDomains`)."""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from fake_storage.agent import Agent
from fake_storage.cluster import SimHost
from fake_storage.lunfarm import FakeLun, LunFarm
from tests.helpers import check_clean, eventually
from vdsmlite.client import Client, ServerError
from vdsmlite.storage import mountinfo

log = logging.getLogger("tests.storage")

BLANK = "00000000-0000-0000-0000-000000000000"
GiB = 1 << 30
MiB = 1 << 20

LOCALFS, POSIXFS, ISCSI = 4, 6, 3
RAW, COW = 5, 4
PREALLOCATED, SPARSE = 1, 2


def new_id() -> str:
    return str(uuid.uuid4())


def wait_task(c: Client, task: str, timeout: float = 120) -> dict[str, Any]:
    """Wait until a task finished, clear it and return its last status."""
    def finished() -> dict[str, Any] | None:
        st = c.call("Task.getStatus", {"taskID": task})
        return st if st["taskState"] == "finished" else None

    st = eventually(finished, timeout, f"task {task} to finish", interval=0.02)
    c.call("Task.clear", {"taskID": task})
    return st


def run_task(c: Client, method: str, params: dict[str, Any]) -> None:
    """Call a task verb and wait; raise ServerError with the task's code if it failed."""
    st = wait_task(c, c.call(method, params))
    if st["taskResult"] != "success":
        raise ServerError(st["code"], st["message"])


@dataclass
class DomainUnderTest:
    agent: Agent
    sd: str
    kind: str  # "localfs" | "posixfs" | "block"
    block_size: int
    data_dir: Path | None = None  # file domains: the directory behind the mount/link
    lun: FakeLun | None = None  # block domains: the LUN holding the VG

    @property
    def client(self) -> Client:
        return self.agent.client()

    @property
    def is_block(self) -> bool:
        return self.kind == "block"

    def create_volume(self, img: str | None = None, vol: str | None = None, *,
                      size: int = GiB, fmt: int = RAW, prealloc: int | None = None,
                      parent: str = BLANK, desc: str = "", disk_type: str = "DATA",
                      pool: str = BLANK, **extra: Any) -> tuple[str, str]:
        img = img or new_id()
        vol = vol or new_id()
        if prealloc is None:
            prealloc = PREALLOCATED if (self.is_block and fmt == RAW) else SPARSE
        params = {"volumeID": vol, "storagepoolID": pool, "storagedomainID": self.sd,
                  "imageID": img, "size": str(size), "volFormat": fmt, "preallocate": prealloc,
                  "diskType": disk_type, "desc": desc,
                  "srcImgUUID": img if parent != BLANK else BLANK, "srcVolUUID": parent,
                  **extra}
        with self.client as c:
            run_task(c, "Volume.create", params)
        return img, vol

    def vol_params(self, img: str, vol: str, pool: str = BLANK) -> dict[str, Any]:
        return {"volumeID": vol, "storagepoolID": pool, "storagedomainID": self.sd,
                "imageID": img}

    def info(self, img: str, vol: str) -> dict[str, Any]:
        with self.client as c:
            return c.call("Volume.getInfo", self.vol_params(img, vol))

    def delete_volume(self, img: str, vol: str, post_zero: bool = False,
                      force: bool = False) -> None:
        with self.client as c:
            run_task(c, "Volume.delete", {**self.vol_params(img, vol), "postZero": post_zero,
                                          "force": force})

    def prepare(self, img: str, vol: str) -> str:
        with self.client as c:
            return c.call("Image.prepare", {"storagepoolID": BLANK, "storagedomainID": self.sd,
                                            "imageID": img, "volumeID": vol})["path"]

    def teardown(self, img: str, vol: str) -> None:
        with self.client as c:
            c.call("Image.teardown", {"storagepoolID": BLANK, "storagedomainID": self.sd,
                                      "imageID": img, "volumeID": vol})


def connect(agent: Agent, domain_type: int, conn: dict[str, Any]) -> None:
    with agent.client() as c:
        result = c.call("StoragePool.connectStorageServer", {
            "storagepoolID": BLANK, "domainType": domain_type, "connectionParams": [conn]})
    assert result[0]["status"] == 0, result


def make_localfs_domain(agent: Agent, data_dir: Path, *, block_size: int = 512,
                        sd: str | None = None) -> DomainUnderTest:
    data_dir.mkdir(parents=True, exist_ok=True)
    connect(agent, LOCALFS, {"id": new_id(), "connection": str(data_dir)})
    sd = sd or new_id()
    with agent.client() as c:
        c.call("StorageDomain.create", {"storagedomainID": sd, "domainType": LOCALFS,
                                        "typeArgs": str(data_dir), "name": "local-data",
                                        "domainClass": 1, "version": "5",
                                        "blockSize": block_size})
    return DomainUnderTest(agent, sd, "localfs", block_size, data_dir=data_dir)


def make_posixfs_domain(agent: Agent, farm: LunFarm, *, join: bool = True) -> DomainUnderTest:
    """ext4 on a loop LUN, mounted by connectStorageServer (posixfs): sanlock leases too."""
    lun = farm.add("4G")
    subprocess.run(["mkfs.ext4", "-q", lun.loop], check=True)
    connect(agent, POSIXFS, {"id": new_id(), "connection": lun.loop, "vfs_type": "ext4"})
    sd = new_id()
    with agent.client() as c:
        c.call("StorageDomain.create", {"storagedomainID": sd, "domainType": POSIXFS,
                                        "typeArgs": lun.loop, "name": "posix-data",
                                        "domainClass": 1, "version": "5", "blockSize": 512})
    mountpoint = agent.state_dir / "data-center" / "mnt" / lun.loop.replace("/", "_")
    if join:
        join_lockspace(agent, sd)
    return DomainUnderTest(agent, sd, "posixfs", 512, data_dir=mountpoint, lun=lun)


def join_lockspace(agent: Agent, sd: str, host_id: int = 1, timeout: float = 90) -> None:
    """Host.startMonitoringDomain, then wait until the host id is acquired (about
    2 x io_timeout; shared domains refuse metadata changes before that)."""
    with agent.client() as c:
        c.call("Host.startMonitoringDomain", {"sdUUID": sd, "hostID": host_id})
        wait_acquired(c, sd, timeout)


def join_together(sd: str, *members: tuple[Agent, int], timeout: float = 90) -> None:
    """Several hosts join a lockspace at once, as a cluster's hosts do: each asks
    (Host.startMonitoringDomain with its id), then all wait; one acquisition time in
    all instead of one per host."""
    for agent, host_id in members:
        with agent.client() as c:
            c.call("Host.startMonitoringDomain", {"sdUUID": sd, "hostID": host_id})
    for agent, _ in members:
        with agent.client() as c:
            wait_acquired(c, sd, timeout)


def wait_acquired(c: Client, sd: str, timeout: float = 90) -> dict[str, Any]:
    def acquired() -> dict[str, Any] | None:
        stats = c.call("Host.getStorageRepoStats", {"domains": [sd]}).get(sd)
        return stats if stats and stats["acquired"] else None

    return eventually(acquired, timeout, f"the host id in {sd}", interval=0.1)


def make_block_domain(agent: Agent, farm: LunFarm, *, sector_size: int = 512,
                      size: str = "20G", name: str = "block-data",
                      join: bool = True) -> DomainUnderTest:
    lun = farm.add(size, sector_size=sector_size)
    sd = new_id()
    with agent.client() as c:
        vg_uuid = c.call("LVMVolumeGroup.create", {"name": sd, "devlist": [lun.guid]})
        c.call("StorageDomain.create", {"storagedomainID": sd, "domainType": ISCSI,
                                        "typeArgs": vg_uuid, "name": name, "domainClass": 1,
                                        "version": "5", "blockSize": sector_size})
    if join:
        join_lockspace(agent, sd)
    return DomainUnderTest(agent, sd, "block", sector_size, lun=lun)


def unmount_under(path: Path) -> None:
    for m in reversed(mountinfo.read()):
        if m.mountpoint.startswith(str(path)):
            subprocess.run(["umount", "-l", m.mountpoint], check=False)


def lvm_cmd(*argv: str, devices: list[str]) -> str:
    filt = ",".join(f'"a|^{d}$|"' for d in devices) + ',"r|.*|"'
    return subprocess.run(
        [argv[0], "--config", f"devices {{ filter=[{filt}] use_devicesfile=0 }}",
         "--driverloaded", "n", *argv[1:]],
        check=True, capture_output=True, text=True,
        env={**os.environ, "LVM_SUPPRESS_FD_WARNINGS": "1"}).stdout


def lv_offset(lun: FakeLun, vg: str, lv: str) -> tuple[int, int]:
    """(byte offset on the PV, size) of a single-segment LV, computed from LVM alone."""
    out = lvm_cmd("lvs", "--noheadings", "--units", "b", "--nosuffix", "-o",
                  "lv_size,seg_pe_ranges", f"{vg}/{lv}", devices=[lun.loop]).split()
    size, ranges = int(out[0]), out[1]
    first_pe = int(ranges.rsplit(":", 1)[1].split("-")[0])
    pe = lvm_cmd("pvs", "--noheadings", "--units", "b", "--nosuffix", "-o",
                 "pe_start,vg_extent_size", lun.loop, devices=[lun.loop]).split()
    return int(pe[0]) + first_pe * int(pe[1]), size


def write_durably(path: str, offset: int, data: bytes) -> None:
    """Write `data` at `offset` and fsync, as a guest's flush would."""
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, data, offset)
        os.fsync(fd)
    finally:
        os.close(fd)


def read_direct(path: str, offset: int, size: int) -> bytes:
    """Read with O_DIRECT (aligned offset and size), so the bytes come from storage,
    not from a page cache that another host's writes never reach."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        buf = mmap.mmap(-1, size)  # page-aligned, as O_DIRECT needs
        with memoryview(buf) as view:
            os.preadv(fd, [view], offset)
            return bytes(view)
    finally:
        os.close(fd)


# --- simulated hosts ------------------------------------------------------------------


class StorageEnv:
    """Simulated hosts (each: its own sanlock daemon and agent) plus a LUN farm, torn
    down in the only safe order: unmount, stop the hosts (the agents release LV
    mappings, sanlock lets go of the lockspaces), then destroy the LUNs."""

    def __init__(self, farm: LunFarm, tmp_path: Path) -> None:
        self.farm = farm
        self.tmp_path = tmp_path
        self.hosts: list[SimHost] = []

    @property
    def agents(self) -> list[Agent]:
        return [h.agent for h in self.hosts]

    def host(self, name: str = "agent", **kw: Any) -> SimHost:
        host = SimHost(self.tmp_path / name, name, **kw)
        self.hosts.append(host)
        return host.start()

    def agent(self, name: str = "agent", *, config: dict[str, dict[str, Any]] | None = None,
              env: dict[str, str] | None = None) -> Agent:
        host = SimHost(self.tmp_path / name, name, config=config)
        if env:
            host.agent.extra_env.update(env)
        self.hosts.append(host)
        return host.start().agent

    def close(self) -> None:
        """Unmount and stop the hosts (the farm's owner destroys the LUNs after this)."""
        for host in self.hosts:
            unmount_under(host.agent.state_dir)
        for host in self.hosts:
            host.stop()
        for host in self.hosts:
            check_clean(host.agent)


# --- domains shared by the tests of a module ---------------------------------------------

KINDS = ("localfs", "posixfs", "block-512", "block-4k")


class SharedDomains:
    """One domain per kind, built on first use on one simulated host and lent to many
    tests; for tests that are not about creating, formatting, importing or crashing a
    domain.

    A loan (`lend`) starts from the state of a fresh domain: the agent runs (restarted
    if a test killed it), the host id is held (joined again after a restart; or, for
    tests about joining, the domain is not monitored at all) and the domain has no
    image. After the test every image is torn down and deleted, so the
    next test again sees an empty domain, and the agent's log must show no crash from
    that test. A domain that cannot be emptied is dropped (a later loan builds a new
    one), so one broken test does not break the tests after it.
    """

    def __init__(self, env: StorageEnv, *, name: str = "shared", **host_kw: Any) -> None:
        self.env = env
        self.name = name
        self.host_kw = host_kw
        self._host: SimHost | None = None
        self._domains: dict[str, DomainUnderTest] = {}
        self._count = 0

    @property
    def host(self) -> SimHost:
        if self._host is None:
            self._host = self.env.host(self.name, **self.host_kw)
        return self._host

    @property
    def agent(self) -> Agent:
        return self.host.agent

    def build(self, *kinds: str) -> SharedDomains:
        """Build these kinds now, and join their lockspaces together (one sanlock
        acquisition time instead of one per domain)."""
        new = [k for k in kinds if k not in self._domains]
        for kind in new:
            self.domain(kind)
        shared = [self._domains[k].sd for k in new if k != "localfs"]
        with self.agent.client() as c:
            for sd in shared:
                c.call("Host.startMonitoringDomain", {"sdUUID": sd, "hostID": 1})
            for sd in shared:
                wait_acquired(c, sd)
        return self

    def domain(self, kind: str) -> DomainUnderTest:
        self._ensure_running()
        if kind not in self._domains:
            self._domains[kind] = self._build(kind)
        return self._domains[kind]

    def _build(self, kind: str) -> DomainUnderTest:
        assert kind in KINDS, kind
        self._count += 1
        if kind == "localfs":
            return make_localfs_domain(self.agent,
                                       self.env.tmp_path / f"{self.name}-data-{self._count}")
        # Joined (or not) by `lend`, as the test needs it.
        if kind == "posixfs":
            return make_posixfs_domain(self.agent, self.env.farm, join=False)
        return make_block_domain(self.agent, self.env.farm, join=False,
                                 sector_size=4096 if kind == "block-4k" else 512)

    def _ensure_running(self) -> None:
        """A test that killed or stopped the agent leaves a host that boots again, as
        the engine would bring it back (its domains are joined again when lent)."""
        agent = self.agent
        if agent.proc is None or agent.proc.poll() is not None:
            agent.kill()
            agent.start()

    def _acquired(self, dom: DomainUnderTest) -> bool | None:
        """True: the host id is held; False: monitored, not (yet) held; None: not
        monitored at all."""
        with self.agent.client() as c:
            stats = c.call("Host.getStorageRepoStats", {"domains": [dom.sd]}).get(dom.sd)
        return None if stats is None else bool(stats["acquired"])

    def _join(self, dom: DomainUnderTest) -> None:
        if dom.kind != "localfs" and not self._acquired(dom):
            join_lockspace(self.agent, dom.sd)

    def _leave(self, dom: DomainUnderTest) -> None:
        if self._acquired(dom) is not None:
            with self.agent.client() as c:
                c.call("Host.stopMonitoringDomain", {"sdUUID": dom.sd})

    @contextlib.contextmanager
    def lend(self, kind: str, *, joined: bool = True) -> Iterator[DomainUnderTest]:
        """The domain of this kind, with no image, the host id held (`joined`) or the
        domain not monitored at all (not `joined`: for tests about joining)."""
        dom = self.domain(kind)
        agent = self.agent
        if joined:
            self._join(dom)
        else:
            self._leave(dom)
        with agent.client() as c:
            images = c.call("StorageDomain.getImages", {"storagedomainID": dom.sd})
        assert images == [], f"shared {kind} domain {dom.sd} is not empty: {images}"
        mark = agent.log_size()
        try:
            yield dom
        finally:
            try:
                self._empty(dom)
            except Exception:
                log.exception("dropping shared %s domain %s: cannot empty it", kind, dom.sd)
                del self._domains[kind]
        check_clean(agent, since=mark)

    def _empty(self, dom: DomainUnderTest) -> None:
        self._ensure_running()
        with self.agent.client() as c:
            if c.call("StorageDomain.getImages", {"storagedomainID": dom.sd}):
                self._join(dom)  # deleting changes the domain: the host id is needed
            images = c.call("StorageDomain.getImages", {"storagedomainID": dom.sd})
            for img in images:
                with contextlib.suppress(ServerError):
                    c.call("Image.teardown", {"storagepoolID": BLANK, "storagedomainID": dom.sd,
                                              "imageID": img})
                run_task(c, "Image.delete", {"imageID": img, "storagepoolID": BLANK,
                                             "storagedomainID": dom.sd, "postZero": False,
                                             "force": True})
            left = c.call("StorageDomain.getImages", {"storagedomainID": dom.sd})
        assert left == [], left


def shared_domain_fixtures(*kinds: str) -> tuple[Any, Any]:
    """A module's `domains` fixture (one host's `SharedDomains` of `kinds`, built once)
    and `dom` (each test borrows a domain of each kind in turn, test ids the kinds):
    ``domains, dom = shared_domain_fixtures("localfs", "block-512")``."""

    @pytest.fixture(scope="module")
    def domains(module_env: StorageEnv) -> SharedDomains:
        return SharedDomains(module_env).build(*kinds)

    @pytest.fixture(params=list(kinds))
    def dom(request: pytest.FixtureRequest,
            domains: SharedDomains) -> Iterator[DomainUnderTest]:
        with domains.lend(request.param) as d:
            yield d

    return domains, dom
