"""The cffi binding to libsanlock_client, in this process, against a real sanlock daemon.

libsanlock reads SANLOCK_RUN_DIR once per process, so this module's daemon is
the only one the test process ever talks to in-process; multi-host behaviour
(events, leases held by another host) is tested through agents, one process
per simulated host (test_fencing.py).
"""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fake_storage.sanlockd import SanlockDaemon
from vdsmlite.locking import sanlock

pytestmark = pytest.mark.root

MiB = 1 << 20


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SanlockDaemon]:
    work = tmp_path_factory.mktemp("sanlock")
    d = SanlockDaemon(work / "run", host_name="binding-test").start()
    os.environ["SANLOCK_RUN_DIR"] = str(d.run_dir)
    try:
        yield d
    finally:
        d.kill()


@pytest.fixture
def areas(tmp_path: Path) -> tuple[str, str]:
    ids, leases = tmp_path / "ids", tmp_path / "leases"
    with open(ids, "wb") as f:
        f.truncate(MiB)
    with open(leases, "wb") as f:
        f.truncate(4 * MiB)
    return str(ids), str(leases)


def test_struct_layouts_match_sanlock_3_8_5() -> None:
    ffi = sanlock._get().ffi
    assert {name: ffi.sizeof(name) for name in sanlock.STRUCT_SIZES} == sanlock.STRUCT_SIZES
    # The flexible array starts right after the fixed part, as in C.
    assert ffi.offsetof("struct sanlk_resource", "disks") == 128
    assert ffi.offsetof("struct sanlk_lockspace", "host_id_disk") == 64


def test_version(daemon: SanlockDaemon) -> None:
    version, proto = sanlock.version()
    assert version >> 24 == 3  # sanlock 3.x
    assert proto >= 1


def test_lockspace_and_lease_lifecycle(daemon: SanlockDaemon, areas: tuple[str, str],
                                       tmp_path: Path) -> None:
    ids, leases = areas
    name = f"ls-{tmp_path.name}"[:48]
    sanlock.write_lockspace(name, ids, io_timeout=1, align=MiB, sector=512)
    assert sanlock.read_lockspace(ids) == (name, 1)
    sanlock.write_resource(name, "SDM", [(leases, MiB)], align=MiB, sector=512)

    assert sanlock.inq_lockspace(name, 1, ids) is False
    with pytest.raises(sanlock.SanlockError) as e:
        sanlock.reg_event(name)
    assert e.value.errno == errno.ENOENT  # events need a joined lockspace

    sanlock.add_lockspace(name, 1, ids, io_timeout=1, wait=False)
    deadline = time.monotonic() + 30
    while (state := sanlock.inq_lockspace(name, 1, ids)) is not True:
        assert state is None, "an asynchronous join is 'in progress' until done"
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert sanlock.Lockspace(name, 1, ids, 0) in sanlock.get_lockspaces()
    with pytest.raises(sanlock.SanlockError) as e:
        sanlock.add_lockspace(name, 1, ids, io_timeout=1)
    assert e.value.errno == errno.EEXIST

    hosts = _hosts_when_ready(name)
    assert [(h.host_id, h.state, h.io_timeout) for h in hosts] == [(1, "live", 1)]
    assert hosts[0].generation >= 1

    fd = sanlock.register()
    try:
        sanlock.acquire(fd, name, "SDM", [(leases, MiB)], owner_nowait=True)
        assert sanlock.inquire(fd) == [(name, "SDM")]
        owners = sanlock.read_resource_owners(name, "SDM", [(leases, MiB)], align=MiB,
                                              sector=512)
        assert [(o.host_id, o.generation) for o in owners] == [(1, hosts[0].generation)]
        with pytest.raises(sanlock.SanlockError) as e:
            sanlock.acquire(fd, name, "SDM", [(leases, MiB)])
        assert e.value.errno == errno.EEXIST
        with pytest.raises(sanlock.SanlockError) as e:
            sanlock.rem_lockspace(name, 1, ids, unused=True)
        assert e.value.errno == errno.EBUSY  # a lease is held there
        sanlock.release(fd, name, "SDM", [(leases, MiB)])
        assert sanlock.inquire(fd) == []
        assert sanlock.read_resource_owners(name, "SDM", [(leases, MiB)]) == []
    finally:
        os.close(fd)

    event_fd = sanlock.reg_event(name)
    assert sanlock.get_events(event_fd) == []  # nothing pending: EAGAIN, not an error
    sanlock.set_event(name, 2, 0, 1, data=0x77, flags=sanlock.SETEV_REPLACE_EVENT)
    with pytest.raises(sanlock.SanlockError) as e:
        sanlock.set_event(name, 0, 0, 1)
    assert e.value.errno == errno.EINVAL  # host id 0 is no host
    sanlock.end_event(event_fd, name)

    sanlock.rem_lockspace(name, 1, ids, unused=True)
    assert sanlock.inq_lockspace(name, 1, ids) is False
    with pytest.raises(sanlock.SanlockError) as e:
        sanlock.get_hosts(name)
    assert e.value.errno == errno.ENOENT


def _hosts_when_ready(name: str) -> list[sanlock.Host]:
    # get_hosts answers EAGAIN for the first seconds after joining.
    deadline = time.monotonic() + 30
    while True:
        try:
            return sanlock.get_hosts(name)
        except sanlock.SanlockError as e:
            assert e.errno == errno.EAGAIN, e
            assert time.monotonic() < deadline
            time.sleep(0.2)


def test_sanlock_errors_carry_its_own_messages(daemon: SanlockDaemon,
                                               areas: tuple[str, str]) -> None:
    _, leases = areas
    fd = sanlock.register()
    try:
        with pytest.raises(sanlock.SanlockError) as e:
            sanlock.acquire(fd, "no-such-lockspace", "SDM", [(leases, MiB)])
    finally:
        os.close(fd)
    # sanlock 3.8.5 answers ENOSPC ("no lockspace found") for a lockspace it has not joined.
    assert e.value.errno == errno.ENOSPC
    assert "No space left on device" in str(e.value)
    with pytest.raises(sanlock.SanlockError) as e:
        sanlock.read_lockspace(leases, 0)  # zeros: no lockspace there
    assert e.value.errno >= 200  # a SANLK_* code, with sanlock's own wording
    assert "Unknown error" not in e.value.message


@pytest.mark.parametrize(("call", "message"), [
    (lambda: sanlock.write_lockspace("x" * 49, "/tmp/x"), "1..48 bytes"),
    (lambda: sanlock.write_lockspace("", "/tmp/x"), "1..48 bytes"),
    (lambda: sanlock.write_lockspace("a\0b", "/tmp/x"), "without NUL"),
    (lambda: sanlock.write_lockspace("ls", "/" + "p" * 1100), "path"),
    (lambda: sanlock.write_lockspace("ls", "/tmp/x", align=3 * MiB, sector=512), "geometry"),
    (lambda: sanlock.write_resource("ls", "r", []), "1..4 disks"),
    (lambda: sanlock.write_resource("ls", "r", [("/tmp/x", 0)] * 5), "1..4 disks"),
])
def test_bad_arguments_never_reach_the_daemon(call: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call()  # type: ignore[operator]
