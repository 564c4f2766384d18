"""Shared fixtures: real daemons on free ports, raw HTTP helpers."""

from __future__ import annotations

import ctypes
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fake_storage import agent as agent_module
from fake_storage.agent import Agent
from fake_storage.lunfarm import LunFarm, reap_orphans
from tests.helpers import RawHttp, check_clean
from tests.storage_helpers import StorageEnv

# Every daemon of the suite starts its OVF parser processes on first use, not a few
# seconds after start-up: most test daemons never parse an OVF, and live long enough
# to pay two extra interpreters each on a 2-core machine.
agent_module.HARNESS_CONFIG["storage"] = {"ovf_parser_warmup_delay": -1.0}


def pytest_configure(config: pytest.Config) -> None:
    # `make test` runs the suite in parallel workers (pytest-xdist). What one
    # worker's LUNs are is the udev database (`fake_storage.lunfarm` writes it,
    # the daemon reads it through pyudev): each worker gets a private one, so
    # device listings, domain scans and the orphan reaper of one worker never see
    # another's LUNs. Mounts (posixfs domains) become private to it as well.
    if os.environ.get("PYTEST_XDIST_WORKER") and os.geteuid() == 0:
        _private_udev_database()


def _private_udev_database() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    clone_newns, ms_rec, ms_private = 0x00020000, 0x4000, 1 << 18

    def check(rc: int, what: str) -> None:
        if rc != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"{what}: {os.strerror(err)}")

    os.makedirs("/run/udev", exist_ok=True)  # a mount point, also where udev never ran
    # Tests (and the daemons, mounts and LUN farms they start) run on this thread.
    check(libc.unshare(clone_newns), "unshare(CLONE_NEWNS)")
    check(libc.mount(b"none", b"/", None, ms_rec | ms_private, None), "make / private")
    check(libc.mount(b"tmpfs", b"/run/udev", b"tmpfs", 0, b"mode=0755"),
          "tmpfs on /run/udev")
    os.makedirs("/run/udev/data")


def pytest_sessionstart(session: pytest.Session) -> None:
    # A run killed before its teardown (CI timeout, a closed terminal) leaves its
    # loop LUNs behind: kernel state outlives the process. Every device-listing
    # test would see them, so they go before anything runs. Only farms whose
    # creating process is dead are touched; a concurrent run keeps its own.
    if os.geteuid() == 0:
        for line in reap_orphans():
            print(f"lunfarm: {line}")


@pytest.hookimpl(trylast=True)  # after -m/-k deselection: `make test-unit` needs no root
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # The suite drives loop devices, mounts and sanlock: refuse loudly rather than
    # skip silently when it is not run as root.
    if os.geteuid() != 0 and any(item.get_closest_marker("root") for item in items):
        raise pytest.UsageError("this suite needs root (loop devices, LVM, mounts): "
                                "run it with `make test` as root")


@pytest.fixture
def agent_factory(tmp_path: Path) -> Iterator[Any]:
    """Start daemons on demand; all are stopped (by PID) and checked at teardown."""
    started: list[Agent] = []

    def start(name: str = "agent", **kw: Any) -> Agent:
        a = Agent(tmp_path / name, **kw)
        started.append(a)
        return a.start()

    yield start
    for a in started:
        a.stop()
    for a in started:
        check_clean(a)


@pytest.fixture
def agent(agent_factory: Any) -> Agent:
    return agent_factory()


@pytest.fixture(scope="module")
def shared_agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Agent]:
    """One daemon for a module of read-only tests."""
    a = Agent(tmp_path_factory.mktemp("shared") / "agent").start()
    yield a
    a.stop()
    check_clean(a)


@pytest.fixture
def raw(shared_agent: Agent) -> RawHttp:
    return RawHttp(shared_agent)


@pytest.fixture
def lun_farm(tmp_path: Path) -> Iterator[LunFarm]:
    """A LUN farm that is always destroyed, even when the test fails."""
    farm = LunFarm(tmp_path / "farm")
    yield farm
    problems = farm.destroy()
    assert not problems, problems


@pytest.fixture
def env(lun_farm: LunFarm, tmp_path: Path) -> Iterator[StorageEnv]:
    """Hosts and LUNs of one test (for tests that build, format, import or crash domains)."""
    e = StorageEnv(lun_farm, tmp_path)
    yield e
    e.close()


@pytest.fixture(scope="module")
def module_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StorageEnv]:
    """Hosts and LUNs shared by the tests of a module (see `SharedDomains`)."""
    tmp_path = tmp_path_factory.mktemp("module-env")
    farm = LunFarm(tmp_path / "farm")
    e = StorageEnv(farm, tmp_path)
    try:
        yield e
    finally:
        try:
            e.close()
        finally:
            problems = farm.destroy()
            assert not problems, problems
