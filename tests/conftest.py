"""Shared fixtures: real daemons on free ports, raw HTTP helpers."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fake_storage.agent import Agent
from fake_storage.cluster import SimHost
from fake_storage.lunfarm import LunFarm, reap_orphans
from tests.helpers import RawHttp
from tests.storage_helpers import unmount_under


def pytest_sessionstart(session: pytest.Session) -> None:
    # A run killed before its teardown (CI timeout, a closed terminal) leaves its
    # loop LUNs behind: kernel state outlives the process. Every device-listing
    # test would see them, so they go before anything runs. Only farms whose
    # creating process is dead are touched; a concurrent run keeps its own.
    if os.geteuid() == 0:
        for line in reap_orphans():
            print(f"lunfarm: {line}")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # The suite drives loop devices, mounts and sanlock: refuse loudly rather than
    # skip silently when it is not run as root.
    if os.geteuid() != 0 and any(item.get_closest_marker("root") for item in items):
        raise pytest.UsageError("this suite needs root (loop devices, LVM, mounts): "
                                "run it with `make test` as root")


def _check_clean(agent: Agent) -> None:
    crashes = agent.crashes()
    assert not crashes, "daemon logged unexpected exceptions:\n" + agent.log_text()[-6000:]


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
        _check_clean(a)


@pytest.fixture
def agent(agent_factory: Any) -> Agent:
    return agent_factory()


@pytest.fixture(scope="module")
def shared_agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Agent]:
    """One daemon for a module of read-only tests."""
    a = Agent(tmp_path_factory.mktemp("shared") / "agent").start()
    yield a
    a.stop()
    _check_clean(a)


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


@pytest.fixture
def env(lun_farm: LunFarm, tmp_path: Path) -> Iterator[StorageEnv]:
    e = StorageEnv(lun_farm, tmp_path)
    yield e
    for host in e.hosts:
        unmount_under(host.agent.state_dir)
    for host in e.hosts:
        host.stop()
    for host in e.hosts:
        _check_clean(host.agent)
