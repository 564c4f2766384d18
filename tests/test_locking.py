"""One host and its sanlock daemon: domain monitors, host ids, the SDM lease, the watchdog.

Multi-host behaviour (exclusive SDM across hosts, fencing) is in test_fencing.py.
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import call, code_of, eventually
from tests.locking_helpers import StalledUpload, holds, sanlock_lockspaces
from tests.ovf_helpers import get_store, make_store, put_store, start_put, stores
from tests.storage_helpers import (
    DomainUnderTest,
    SharedDomains,
    StorageEnv,
    join_lockspace,
    make_block_domain,
    make_localfs_domain,
    new_id,
    wait_acquired,
)
from vdsmlite.client import ServerError

pytestmark = pytest.mark.root

MiB = 1 << 20


# One host and one block domain for the tests that join, leave and lose its lockspace
# (building them is not what they are about). Each test gets the domain with no image
# and either not monitored at all (`unjoined`) or with the host id held (`joined`).


@pytest.fixture(scope="module")
def domains(module_env: StorageEnv) -> SharedDomains:
    return SharedDomains(module_env, name="agent",
                         config={"storage": {"upload_stall_timeout": 60.0}})


@pytest.fixture
def unjoined(domains: SharedDomains) -> Iterator[DomainUnderTest]:
    with domains.lend("block-512", joined=False) as d:
        yield d


@pytest.fixture
def joined(domains: SharedDomains) -> Iterator[DomainUnderTest]:
    with domains.lend("block-512") as d:
        yield d


def test_monitoring_joins_and_leaves_the_lockspace(domains: SharedDomains,
                                                   unjoined: DomainUnderTest) -> None:
    host = domains.host
    a = host.agent
    dom = unjoined
    assert call(a, "Host.getStorageRepoStats") == {}
    with a.client() as c:
        c.call("Host.startMonitoringDomain", {"sdUUID": dom.sd, "hostID": 7},
               headers={"X-Request-Id": "watch-7"})
        stats = wait_acquired(c, dom.sd)
    assert stats["valid"] and stats["code"] == 0 and stats["actual"]
    assert stats["version"] == 5
    assert 0 < float(stats["delay"]) < 10
    assert float(stats["lastCheck"]) < 10
    assert f"s {dom.sd}:7:" in sanlock_lockspaces(host)  # sanlock holds id 7 for us
    # Asking again with the same id is fine; with another one it is not.
    call(a, "Host.startMonitoringDomain", sdUUID=dom.sd, hostID=7)
    assert code_of(a, "Host.startMonitoringDomain", sdUUID=dom.sd, hostID=8) == 700
    metrics = _metrics(a)
    assert f'vdsmlite_lockspace_acquired{{domain="{dom.sd}"}} 1.0' in metrics
    # The monitor outlives the call that started it: its lines are its own, not the
    # call's (before, every line it logged for as long as it ran said [req=watch-7]).
    log = a.log_text().splitlines()
    assert any(f"host id 7 acquired in lockspace {dom.sd}" in line for line in log)
    assert [line for line in log if "[req=watch-7]" in line and "lockspace" in line] == []
    assert any("[req=watch-7]" in line and "Host.startMonitoringDomain" in line
               for line in log)

    call(a, "Host.stopMonitoringDomain", sdUUID=dom.sd)
    assert call(a, "Host.getStorageRepoStats") == {}
    assert dom.sd not in sanlock_lockspaces(host)
    assert code_of(a, "Host.startMonitoringDomain", sdUUID=new_id(), hostID=1) == 358


def _metrics(agent: Any) -> str:
    import urllib.request  # noqa: PLC0415

    assert agent.url is not None
    with urllib.request.urlopen(f"{agent.url}/metrics", timeout=30) as r:
        return r.read().decode()


def test_monitor_reports_a_broken_domain(env: StorageEnv, tmp_path: Path) -> None:
    a = env.agent()
    dom = make_localfs_domain(a, tmp_path / "data")
    call(a, "Host.startMonitoringDomain", sdUUID=dom.sd, hostID=1)
    with a.client() as c:
        stats = wait_acquired(c, dom.sd)  # a local domain: the id is ours, no sanlock
    assert stats["valid"]
    (tmp_path / "data" / dom.sd / "dom_md" / "metadata").unlink()

    def invalid() -> dict[str, Any] | None:
        stats = call(a, "Host.getStorageRepoStats", domains=[dom.sd])[dom.sd]
        return None if stats["valid"] else stats

    stats = eventually(invalid, 30, "the monitor to report the broken domain")
    assert stats["code"] == 379  # StorageDomainAccessError: the metadata cannot be read
    call(a, "Host.stopMonitoringDomain", sdUUID=dom.sd)


def test_pool_connect_monitors_its_domains(env: StorageEnv, tmp_path: Path) -> None:
    a = env.agent()
    master = make_localfs_domain(a, tmp_path / "data")
    block = make_block_domain(a, env.farm, join=False)
    sp = new_id()
    call(a, "StoragePool.create", storagepoolID=sp, name="dc", masterSdUUID=master.sd,
         masterVersion=1, domainList=[master.sd, block.sd])
    call(a, "StoragePool.connect", storagepoolID=sp, hostID=3, scsiKey=sp,
         masterSdUUID=master.sd, masterVersion=1)
    with a.client() as c:
        wait_acquired(c, block.sd)
        wait_acquired(c, master.sd)
    # The pool owns these monitors: stopping one alone is VDSM's 900.
    assert code_of(a, "Host.stopMonitoringDomain", sdUUID=block.sd) == 900
    call(a, "StoragePool.disconnect", storagepoolID=sp, hostID=3, scsiKey=sp)
    assert call(a, "Host.getStorageRepoStats") == {}


def test_changes_to_a_shared_domain_need_the_host_id(unjoined: DomainUnderTest) -> None:
    dom = unjoined
    a = dom.agent
    # Refused at once, before any task starts, and nothing was created.
    with pytest.raises(ServerError) as e:
        dom.create_volume(size=128 * MiB)
    assert e.value.code == 651
    assert "startMonitoringDomain" in e.value.message
    assert call(a, "StorageDomain.getImages", storagedomainID=dom.sd) == []
    join_lockspace(a, dom.sd)
    img, vol = dom.create_volume(size=128 * MiB)
    assert dom.info(img, vol)["legality"] == "LEGAL"


def test_leaving_is_refused_while_a_lease_is_held(domains: SharedDomains,
                                                  joined: DomainUnderTest) -> None:
    host = domains.host
    dom = joined
    a = dom.agent
    with StalledUpload(a, dom.sd):
        eventually(lambda: "SDM" in host.sanlock.status(), 30, "SDM held by the upload")
        assert code_of(a, "Host.stopMonitoringDomain", sdUUID=dom.sd) == 662
    eventually(lambda: "SDM" not in host.sanlock.status(), 30, "SDM released")
    call(a, "Host.stopMonitoringDomain", sdUUID=dom.sd)


# --- the watchdog --------------------------------------------------------------------


def test_watchdog_is_petted_disarmed_on_stop_and_fires_for_a_hung_agent(
        env: StorageEnv) -> None:
    host = env.host(watchdog_timeout=3)
    assert host.watchdog is not None
    eventually(lambda: host.watchdog.keepalives >= 3, 30, "keepalives")  # type: ignore[union-attr]
    stats = call(host.agent, "Host.getStats")["watchdog"]
    assert stats["backend"] == "emulated" and stats["armed"] and stats["petting"]
    assert stats["timeout"] == 3 and stats["fenced"] is None
    assert "vdsmlite_watchdog_petting 1.0" in _metrics(host.agent)

    # A clean stop disarms it (the magic close): no reset follows. The emulator, like
    # a device, fires only while armed, so once disarmed there is nothing to wait for.
    host.agent.stop()
    eventually(lambda: not host.watchdog.armed, 5, "the watchdog disarmed")  # type: ignore[union-attr]
    assert host.watchdog.resets == []

    # A hung agent (stopped, not dead) pets no more: the host is reset.
    host.agent.start()
    eventually(lambda: host.watchdog.armed, 30, "re-armed")  # type: ignore[union-attr]
    host.agent.signal(signal.SIGSTOP)
    reset = host.watchdog.wait_reset(30)
    assert 3 <= reset.at - reset.last_keepalive < 5
    assert not host.sanlock.alive()  # the whole simulated host went down


def test_device_backend_protocol_with_mocked_ioctl_no_watchdog_device_here(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # These machines have no /dev/watchdog: the ioctls are recorded instead of sent,
    # against a plain file standing in for the device node.
    from vdsmlite.locking import watchdog  # noqa: PLC0415

    calls: list[tuple[int, bytes]] = []

    def fake_ioctl(fd: int, request: int, arg: bytes) -> bytes:
        calls.append((request, arg))
        return arg

    monkeypatch.setattr(watchdog.fcntl, "ioctl", fake_ioctl)
    device = tmp_path / "watchdog"
    device.write_bytes(b"")
    wd = watchdog.DeviceWatchdog(device, 17)
    wd.arm()
    wd.keepalive()
    wd.abandon()
    wd.keepalive()
    wd.disarm()
    assert [c[0] for c in calls] == [watchdog.WDIOC_SETTIMEOUT, watchdog.WDIOC_KEEPALIVE,
                                     watchdog.WDIOC_KEEPALIVE]
    assert calls[0][1] == (17).to_bytes(4, "little")
    assert device.read_bytes() == b"V"  # the magic close
    with pytest.raises(watchdog.WatchdogError, match="cannot open"):
        watchdog.DeviceWatchdog(tmp_path / "missing", 10).arm()


def real_watchdog() -> tuple[Path | None, str]:
    """A watchdog device a test may arm and disarm, or why there is none. Arming one
    risks a reset if the test dies in between: a device is used only when named in
    VDSMLITE_TEST_WATCHDOG, or when it is a softdog that will not reboot
    (soft_noboot) and can be stopped again (nowayout 0)."""
    named = os.environ.get("VDSMLITE_TEST_WATCHDOG")
    if named:
        return Path(named), ""
    classes = Path("/sys/class/watchdog")
    found = sorted(classes.glob("watchdog*")) if classes.is_dir() else []
    noboot = Path("/sys/module/softdog/parameters/soft_noboot")

    def attr(sysfs: Path, name: str, default: str) -> str:
        f = sysfs / name
        return f.read_text().strip() if f.exists() else default

    for sysfs in found:
        identity, nowayout = attr(sysfs, "identity", ""), attr(sysfs, "nowayout", "1")
        if ("Software Watchdog" in identity and nowayout == "0" and noboot.exists()
                and noboot.read_text().strip() in ("1", "Y")):
            return Path("/dev") / sysfs.name, ""
    config = Path("/proc/config.gz")
    softdog = "softdog module not loaded"
    if config.exists():
        import gzip  # noqa: PLC0415
        text = gzip.decompress(config.read_bytes()).decode(errors="replace")
        if "# CONFIG_SOFT_WATCHDOG is not set" in text:
            softdog = "this kernel has no softdog (CONFIG_SOFT_WATCHDOG is not set)"
        if "# CONFIG_CUSE is not set" in text:
            softdog += " and no CUSE to emulate a device in user space"
    devices = [d.name for d in found] or "none"
    return None, (f"no watchdog device this test may arm: watchdog devices: {devices}; "
                  f"{softdog}; set VDSMLITE_TEST_WATCHDOG=/dev/watchdogN to use one (the "
                  "mocked-ioctl test covers the protocol meanwhile)")


def test_device_backend_on_a_real_watchdog_device() -> None:
    from vdsmlite.locking import watchdog  # noqa: PLC0415

    device, why = real_watchdog()
    if device is None:
        pytest.skip(why)
    sysfs = Path("/sys/class/watchdog") / device.name

    def state() -> str | None:
        return (sysfs / "state").read_text().strip() if (sysfs / "state").exists() else None

    wd = watchdog.DeviceWatchdog(device, 30)
    wd.arm()
    try:
        assert state() in (None, "active")
        if (sysfs / "timeout").exists():
            # What the driver accepted is what the backend reports.
            assert int((sysfs / "timeout").read_text()) == wd.timeout
        wd.keepalive()
        if (sysfs / "timeleft").exists():
            assert int((sysfs / "timeleft").read_text()) >= wd.timeout - 5
    finally:
        wd.disarm()  # the magic close: the driver stops the countdown
    assert state() in (None, "inactive")


def test_unusable_watchdog_device_stops_start_up(tmp_path: Path) -> None:
    from fake_storage.agent import Agent  # noqa: PLC0415

    a = Agent(tmp_path / "a", config={"watchdog": {"backend": "device",
                                                   "device": str(tmp_path / "nope")}})
    with pytest.raises(RuntimeError, match="cannot open watchdog"):
        a.start()
    a.stop()



def test_losing_the_lockspace_aborts_what_depended_on_it(domains: SharedDomains,
                                                         joined: DomainUnderTest) -> None:
    host = domains.host
    dom = joined
    a = dom.agent
    good, _ = make_store(dom.sd, 2, "good")
    assert put_store(a, dom.sd, good)[0] == 200
    new, _ = make_store(dom.sd, 3, "new")
    with start_put(a, dom.sd, new, len(new) // 2) as s:
        eventually(lambda: holds(host, "SDM"), 30, "SDM held by the upload")
        # The lockspace goes away under the agent (as when storage is lost): sanlock
        # kills the process holding leases there - the agent's lease holder.
        spec = next(line.split()[1] for line in sanlock_lockspaces(host).splitlines()
                    if line.startswith(f"s {dom.sd}:"))
        subprocess.run(["sanlock", "client", "rem_lockspace", "-s", spec],
                       env={**os.environ, **host.sanlock.env}, check=True,
                       capture_output=True, timeout=60)
        s.sendall(new[len(new) // 2:])
        reply = s.recv(65536)
    status_line, _, rest = reply.partition(b"\r\n")
    assert b" 409 " in status_line, reply[:300]
    assert b'"code": 651' in rest and b"Lease lost" in rest, rest[-300:]
    # Nothing was committed: the previous store is still the one served.
    assert get_store(a, dom.sd)[2] == good
    assert sorted(d["Updated"] for d in stores(dom).values()) == [False, True]
    # The monitor joins again, and the domain can be changed again.
    with a.client() as c:
        wait_acquired(c, dom.sd)
    assert put_store(a, dom.sd, new)[0] == 200

