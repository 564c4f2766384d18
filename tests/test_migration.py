"""Live migration between two agents (VM.migrate and friends) on real qemu.

Two simulated hosts, A and B (each its own sanlock daemon, agent and VM run dir),
see one block domain and spare loop LUNs, as two hosts share a SAN; built once
for the module. VMs run for real (not launched paused: SeaBIOS runs, no guest
OS). Both hosts have certificates from one CA (as the engine's hosts do), so
migrations may be encrypted; each listens for incoming ones on four ports of its
own. A migration that must stay in flight while a test acts is throttled: a VM
with 8 GiB of (untouched, so zero) RAM at maxBandwidth 1 MiB/s needs about 20 s,
and VM.migrateChangeParams lets it finish when the test says so. Guest writes go
through qemu-io on the VM's debug monitor; their bytes are then read straight
from the loop LUN with O_DIRECT.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import shutil
import signal
import socket
import ssl
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from fake_storage.children import kill_vms_left_in
from fake_storage.cluster import SimHost
from fake_storage.lunfarm import FakeLun, LunFarm
from tests.helpers import call, check_clean, eventually
from tests.locking_helpers import holder_pid
from tests.storage_helpers import (
    BLANK,
    DomainUnderTest,
    MiB,
    join_lockspace,
    make_block_domain,
    new_id,
    read_direct,
    run_task,
    unmount_under,
)
from tests.tls_helpers import make_ca, make_cert
from tests.vm_helpers import connected_to, debug_qmp, listening_ports
from tests.vm_requests import engine_migrate_params
from vdsmlite.client import Client, ServerError

pytestmark = pytest.mark.root

MONITOR_INTERVAL = 0.5
BUSY_LUN = 3  # boots a guest that keeps dirtying its memory
# A boot sector (16-bit code at 0x7c00): interrupts off, then forever increment the
# first word of each 4 KiB page from 0x10000 to 0x9efff (143 pages, 572 KiB; not the
# page it runs from, nor the BIOS's data below 0xa0000). Idle firmware hardly dirties
# a page; this guest dirties them all again whenever its vCPU runs at all, and a
# pass over them at 1 MiB/s takes about half a second: passes go on even on a
# loaded machine, where a vCPU may wait tens of milliseconds for a core.
BUSY_BOOT_SECTOR = (bytes.fromhex(
    "fa"          # cli
    "bb0010"      # mov bx, 0x1000      (segment of 0x10000)
    "8edb"        # loop: mov ds, bx
    "ff060000"    # inc word [0]
    "81c30001"    # add bx, 0x100       (the next 4 KiB)
    "81fb009f"    # cmp bx, 0x9f00
    "72f0"        # jb loop
    "bb0010"      # mov bx, 0x1000
    "ebeb"        # jmp loop
).ljust(510, b"\0") + b"\x55\xaa")
SLOW_MEMORY = "8192"  # MiB: a throttled migration that takes a while
BLOCK = 4096


@dataclass
class Side:
    host: SimHost
    run_dir: Path
    migration_ports: range  # where it listens for incoming migrations

    def client(self) -> Client:
        return self.host.agent.client()

    def call(self, method: str, **params: Any) -> Any:
        with self.client() as c:
            return c.call(method, params)

    @property
    def dst(self) -> str:
        addr = self.host.agent.tcp_address
        assert addr is not None
        return f"{addr[0]}:{addr[1]}"

    def listed(self) -> set[str]:
        return set(self.call("Host.getVMList", onlyUUID=True))

    def stats(self, vm_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self.call("VM.getStats", vmID=vm_id)[0]
        return result

    def status(self, vm_id: str) -> str | None:
        if vm_id not in self.listed():
            return None
        return str(self.stats(vm_id)["status"])

    def qmp(self, vm_id: str, command: str, args: dict[str, Any] | None = None) -> Any:
        return debug_qmp(self.run_dir / vm_id, command, args)


@dataclass
class Env:
    a: Side
    b: Side
    dom: DomainUnderTest
    img: str
    vol: str
    luns: list[FakeLun]
    farm: LunFarm
    pki: Path  # ca, host-a, host-b, and rogue-ca's stranger (<name>.pem, <name>.key)


def _free_ports(count: int) -> range:
    """`count` consecutive ports nobody listens on now, away from the default
    migration range other test modules' agents use at the same time."""
    rng = random.Random()
    for _ in range(100):
        start = rng.randrange(20000, 30000)
        try:
            with contextlib.ExitStack() as stack:
                for port in range(start, start + count):
                    s = stack.enter_context(socket.socket())
                    s.bind(("127.0.0.1", port))
            return range(start, start + count)
        except OSError:
            continue
    raise AssertionError("no free ports")


def _side(base: Path, name: str, pki: Path) -> Side:
    run_dir = Path(tempfile.mkdtemp(prefix=f"vm{name}-", dir="/tmp"))
    ports = _free_ports(4)
    host = SimHost(base / name, name, config={
        "rpc": {"tls_cert": str(pki / f"{name}.pem"), "tls_key": str(pki / f"{name}.key"),
                "tls_ca": str(pki / "ca.pem")},
        "virt": {"run_dir": str(run_dir), "unplug_timeout": 1.0, "debug_monitor": True,
                 "migration_port_min": ports.start, "migration_port_max": ports.stop - 1,
                 # Convergence schedules look twice a second (VDSM: every 10 s), so a
                 # schedule's steps come within a test's patience.
                 "migration_monitor_interval": MONITOR_INTERVAL,
                 # A full destination is asked again this soon (VDSM: 10 s).
                 "migration_retry_timeout": 0.5}})
    return Side(host, run_dir, ports)


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    base = tmp_path_factory.mktemp("mig")
    pki = base / "pki"
    pki.mkdir()
    make_ca(pki, "ca")
    for name in ("host-a", "host-b"):
        # 127.0.0.2: the host's address on its migration network (any 127/8 address
        # is this machine's; the agents talk on 127.0.0.1).
        make_cert(pki, "ca", name, "IP:127.0.0.1,IP:127.0.0.2")
    make_ca(pki, "rogue-ca")
    make_cert(pki, "rogue-ca", "stranger", "IP:127.0.0.1")
    farm = LunFarm(base / "farm")
    a, b = _side(base, "host-a", pki), _side(base, "host-b", pki)
    try:
        a.host.start()
        b.host.start()
        dom = make_block_domain(a.host.agent, farm)
        img, vol = dom.create_volume(size=256 * MiB)
        luns = farm.create(4, "256M")
        write_busy_boot_sector(luns[BUSY_LUN])
        yield Env(a, b, dom, img, vol, luns, farm, pki)
    finally:
        for side in (a, b):
            if side.host.agent.proc is not None and side.host.agent.proc.poll() is None:
                for vm_id in side.listed():
                    side.call("VM.destroy", vmID=vm_id)
        for side in (a, b):
            unmount_under(side.host.agent.state_dir)
            side.host.stop()
            kill_vms_left_in(side.run_dir)
            shutil.rmtree(side.run_dir, ignore_errors=True)
        problems = farm.destroy()
        assert not problems, problems
        for side in (a, b):
            check_clean(side.host.agent)


@pytest.fixture
def vms(env: Env) -> Iterator[list[str]]:
    """VM ids a test made: destroyed on both hosts after it, whatever happened."""
    made: list[str] = []
    yield made
    for side in (env.a, env.b):
        listed = side.listed()
        for vm_id in made:
            if vm_id in listed:
                try:
                    side.call("VM.destroy", vmID=vm_id)
                except ServerError as e:
                    if e.code != 1:
                        raise


def write_busy_boot_sector(lun: FakeLun) -> None:
    fd = os.open(lun.loop, os.O_WRONLY)
    try:
        os.pwrite(fd, BUSY_BOOT_SECTOR, 0)
        os.fsync(fd)
    finally:
        os.close(fd)


def vm_params(env: Env, vm_id: str, lun: FakeLun, *, memory: str = "128",
              volume: bool = True) -> dict[str, Any]:
    """The legacy dict form: a GUID disk (scsi) and the domain volume (virtio)."""
    devices = [{"type": "disk", "device": "lun", "iface": "scsi", "index": "0",
                "format": "raw", "readonly": "false", "shared": "false",
                "propagateErrors": "off", "GUID": lun.guid}]
    if volume:
        devices.append({"type": "disk", "device": "disk", "iface": "virtio", "index": "0",
                        "format": "raw", "readonly": "false", "shared": "false",
                        "propagateErrors": "off", "poolID": BLANK, "domainID": env.dom.sd,
                        "imageID": env.img, "volumeID": env.vol, "bootOrder": "1"})
    return {"vmId": vm_id, "vmName": f"mig-{vm_id[:8]}", "memSize": memory, "smp": "1",
            "maxVCpus": "1", "emulatedMachine": "q35", "launchPaused": "false",
            "devices": devices}


def create_running(env: Env, vms: list[str], lun: FakeLun, **kw: Any) -> str:
    vm_id = new_id()
    vms.append(vm_id)
    env.a.call("VM.create", vmID=vm_id, vmParams=vm_params(env, vm_id, lun, **kw))
    eventually(lambda: env.a.status(vm_id) == "Up", 60, "the VM Up on A")
    return vm_id


def migration(side: Side, vm_id: str) -> dict[str, Any]:
    result: dict[str, Any] = side.call("VM.getMigrationStatus", vmID=vm_id)
    return result


def state_is(side: Side, vm_id: str, *states: str) -> bool:
    return migration(side, vm_id).get("state") in states


def write(side: Side, vm_id: str, offset: int, pattern: int) -> None:
    """One guest write through the VM's SCSI LUN disk (qemu-io on its block device)."""
    out = side.qmp(vm_id, "human-monitor-command", {
        "command-line": f'qemu-io -d disk-sda "write -P {pattern} {offset} {BLOCK}"'})
    # qemu-io's report does not reach HMP's answer, its errors do.
    assert "fail" not in out and "error" not in out.lower(), out


def check_writes(lun: FakeLun, written: dict[int, int]) -> None:
    for offset, pattern in written.items():
        assert read_direct(lun.loop, offset, BLOCK) == bytes([pattern]) * BLOCK, offset


def assert_gone(side: Side, vm_id: str) -> None:
    """No VM listed, no VM dir (so no qemu) on that host."""
    assert vm_id not in side.listed()
    assert not (side.run_dir / vm_id).exists()


def wait_migrated(src: Side, dst: Side, vm_id: str, want: str) -> None:
    try:
        eventually(lambda: src.status(vm_id) == "Down", 120, "the source VM Down")
    except AssertionError as e:
        raise AssertionError(f"{e}; migration: {migration(src, vm_id)}; source "
                             f"{src.status(vm_id)}, destination {dst.status(vm_id)}") from e
    down = src.stats(vm_id)
    assert (down["exitCode"], down["exitReason"], down["exitMessage"]) == \
        (0, 4, "Migration succeeded")
    assert migration(src, vm_id)["status"] == {"code": 0, "message": "Migration done"}
    assert migration(src, vm_id)["progress"] == 100
    assert dst.status(vm_id) == want
    src.call("VM.destroy", vmID=vm_id)  # the engine's destroy after a migration
    assert_gone(src, vm_id)


def lv_link(side: Side, env: Env) -> Path:
    return side.host.agent.run_dir / "lv" / env.dom.sd / env.vol


# --- the full round trip ------------------------------------------------------------------


def test_migrate_a_running_vm_there_and_back_while_it_writes(env: Env, vms: list[str]) -> None:
    lun = env.luns[0]
    vm_id = create_running(env, vms, lun, memory=SLOW_MEMORY)
    pid_a = int(env.a.stats(vm_id)["pid"])
    written: dict[int, int] = {}
    n = 0

    def writes(side: Side, count: int) -> None:
        nonlocal n
        for _ in range(count):
            offset, pattern = n * BLOCK, n % 250 + 1
            write(side, vm_id, offset, pattern)
            written[offset] = pattern
            n += 1

    writes(env.a, 8)  # before
    env.a.call("VM.migrate", vmID=vm_id, params={"dst": env.b.dst, "maxBandwidth": 1,
                                                 "method": "online"})
    eventually(lambda: state_is(env.a, vm_id, "migrating"), 60, "migrating")
    assert env.a.status(vm_id) == "Migration Source"
    stats_b = env.b.stats(vm_id)
    assert stats_b["status"] == "Migration Destination"
    assert set(stats_b["disks"]) == {"sda", "vda"}
    writes(env.a, 16)  # during: the guest still runs on A
    eventually(lambda: "migrationProgress" in env.a.stats(vm_id), 30, "progress in stats")
    env.a.call("VM.migrateChangeParams", vmID=vm_id, params={"maxBandwidth": 10000})
    wait_migrated(env.a, env.b, vm_id, "Up")
    assert not Path(f"/proc/{pid_a}").exists()
    assert not lv_link(env.a, env).exists()  # A released its volume
    assert env.b.qmp(vm_id, "query-status")["running"]
    writes(env.b, 8)  # after, on B
    check_writes(lun, written)

    # Back to A, paused this time: it stays paused.
    env.b.call("VM.pause", vmID=vm_id)
    eventually(lambda: env.b.status(vm_id) == "Paused", 30, "Paused on B")
    env.b.call("VM.migrate", vmID=vm_id, params={"dst": env.a.dst})
    wait_migrated(env.b, env.a, vm_id, "Paused")
    assert not lv_link(env.b, env).exists()
    assert not env.a.qmp(vm_id, "query-status")["running"]
    writes(env.a, 8)  # the block layer works on the paused VM
    env.a.call("VM.cont", vmID=vm_id)
    eventually(lambda: env.a.status(vm_id) == "Up", 30, "Up on A again")
    check_writes(lun, written)
    env.a.call("VM.destroy", vmID=vm_id)
    assert_gone(env.a, vm_id)
    assert not lv_link(env.a, env).exists()


# --- the stream: TCP, TLS when encrypted ----------------------------------------------------


def test_an_encrypted_migration_runs_in_tls_from_the_hosts_certificates(
        env: Env, vms: list[str]) -> None:
    """Asked as the engine asks (every member it sends, its default policy's schedule),
    over B's own migration address (dstqemu), not the one its agent answers at."""
    vm_id = create_running(env, vms, env.luns[1], memory=SLOW_MEMORY)
    env.a.call("VM.migrate", vmID=vm_id, params=engine_migrate_params(
        vm_id, env.a.dst, env.b.dst, dstqemu="127.0.0.2", encrypted=True, max_bandwidth=1))
    eventually(lambda: state_is(env.a, vm_id, "migrating"), 60, "migrating")
    pid_a = int(env.a.stats(vm_id)["pid"])
    eventually(lambda: any(host == "127.0.0.2" and port in env.b.migration_ports
                           for host, port in connected_to(pid_a)), 30,
               "A's qemu connected to B's migration address")
    creds = "/objects/vdsmlite-migration-tls"
    # A's qemu sends in TLS, checking B's certificate against the address it sends to;
    # B's receives in TLS and checks A's.
    sent = env.a.qmp(vm_id, "query-migrate-parameters")
    assert (sent["tls-creds"], sent["tls-hostname"]) == ("vdsmlite-migration-tls", "127.0.0.2")
    assert env.a.qmp(vm_id, "qom-get", {"path": creds, "property": "endpoint"}) == "client"
    assert env.b.qmp(vm_id, "query-migrate-parameters")["tls-creds"] == "vdsmlite-migration-tls"
    assert env.b.qmp(vm_id, "qom-get", {"path": creds, "property": "endpoint"}) == "server"
    assert env.b.qmp(vm_id, "qom-get", {"path": creds, "property": "verify-peer"}) is True
    env.a.call("VM.migrateChangeParams", vmID=vm_id, params={"maxBandwidth": 10000})
    wait_migrated(env.a, env.b, vm_id, "Up")

    # Back, not encrypted: B's qemu received in TLS, and now sends in the clear.
    env.b.call("VM.migrate", vmID=vm_id, params={"dst": env.a.dst, "maxBandwidth": 1})
    eventually(lambda: state_is(env.b, vm_id, "migrating"), 60, "migrating back")
    assert env.b.qmp(vm_id, "query-migrate-parameters")["tls-creds"] == ""
    assert env.a.qmp(vm_id, "query-migrate-parameters")["tls-creds"] == ""
    env.b.call("VM.migrateChangeParams", vmID=vm_id, params={"maxBandwidth": 10000})
    wait_migrated(env.b, env.a, vm_id, "Up")


def test_an_encrypted_incoming_port_takes_only_a_peer_the_ca_signed(
        env: Env, vms: list[str]) -> None:
    """What listens for an encrypted migration speaks TLS with the host's certificate
    and lets in no peer without a certificate of the hosts' CA; refused ones leave it
    listening for the real source."""
    vm_id = new_id()
    vms.append(vm_id)
    params = {**vm_params(env, vm_id, env.luns[2], volume=False),
              "incoming": {"address": "127.0.0.1", "encrypted": True}}
    uri = env.b.call("VM.migrationCreate", vmID=vm_id, params=params)["migrationUri"]
    host, port = uri.removeprefix("tcp:").rsplit(":", 1)
    assert host == "127.0.0.1" and int(port) in env.b.migration_ports
    pid = int(env.b.stats(vm_id)["pid"])

    def connect(cert: str | None) -> ssl.SSLSocket:
        ctx = ssl.create_default_context(cafile=str(env.pki / "ca.pem"))
        if cert is not None:
            ctx.load_cert_chain(env.pki / f"{cert}.pem", env.pki / f"{cert}.key")
        raw = socket.create_connection((host, int(port)), timeout=30)
        return ctx.wrap_socket(raw, server_hostname=host)

    def incoming_status() -> str | None:
        status: str | None = env.b.qmp(vm_id, "query-migrate").get("status")
        return status

    for stranger in (None, "stranger"):  # no certificate; one another CA signed
        with connect(stranger) as tls:
            # TLS 1.3: qemu checks the peer's certificate after the handshake, and
            # hangs up on it.
            assert tls.recv(1) == b"", stranger
        assert incoming_status() is None, stranger  # no migration started
        assert env.b.status(vm_id) == "Migration Destination"
        assert int(port) in listening_ports(pid), stranger
    # A host's certificate is let in, and its stream taken as the migration; what
    # answers is host B, by its certificate.
    with connect("host-a") as tls:
        subject = dict(item[0] for item in tls.getpeercert()["subject"])
        assert subject["commonName"] == "host-b"
        eventually(lambda: incoming_status() == "active", 30, "the migration taken")
    env.b.call("VM.destroy", vmID=vm_id)
    assert_gone(env.b, vm_id)


def test_the_destination_listens_on_a_free_port_of_its_range(
        env: Env, vms: list[str]) -> None:
    ports = env.b.migration_ports
    with contextlib.ExitStack() as stack:
        def block(port: int) -> None:
            s = stack.enter_context(socket.socket())
            # As qemu's listener: an earlier test's connections to the port may linger
            # in TIME_WAIT, which only a listener without SO_REUSEADDR minds.
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("127.0.0.1", port))
            s.listen()

        for port in ports[:-1]:
            block(port)
        vm_id = new_id()
        vms.append(vm_id)
        # The engine's form: no address named, so where B's agent listens.
        reply = env.b.call("VM.migrationCreate", vmID=vm_id,
                           params=vm_params(env, vm_id, env.luns[2], volume=False))
        assert reply["migrationUri"] == f"tcp:127.0.0.1:{ports[-1]}"
        env.b.call("VM.destroy", vmID=vm_id)
        assert_gone(env.b, vm_id)
        # None free: refused, and nothing is left of the VM.
        block(ports[-1])
        vm_id = new_id()
        vms.append(vm_id)
        with pytest.raises(ServerError) as e:
            env.b.call("VM.migrationCreate", vmID=vm_id,
                       params=vm_params(env, vm_id, env.luns[2], volume=False))
        assert e.value.code == 12 and "no free migration port" in e.value.message
        assert_gone(env.b, vm_id)


# --- the convergence schedule ----------------------------------------------------------------


def set_downtime(ms: int) -> dict[str, Any]:
    return {"name": "setDowntime", "params": [str(ms)]}


def create_busy(env: Env, vms: list[str]) -> str:
    """A VM on A that boots BUSY_BOOT_SECTOR and runs it: its memory changes on every
    pass of a migration, about two passes a second at 1 MiB/s."""
    vm_id = new_id()
    vms.append(vm_id)
    params = vm_params(env, vm_id, env.luns[BUSY_LUN], volume=False)
    params["devices"][0]["bootOrder"] = "1"
    env.a.call("VM.create", vmID=vm_id, vmParams=params)
    eventually(lambda: env.a.status(vm_id) == "Up", 60, "the VM Up on A")

    def in_the_loop() -> bool:
        registers = env.a.qmp(vm_id, "human-monitor-command",
                              {"command-line": "info registers"})
        match = re.search(r"\bEIP=([0-9a-f]+)", registers)
        assert match is not None, registers
        return 0x7C00 <= int(match.group(1), 16) < 0x7C00 + 25  # the code's length

    eventually(in_the_loop, 60, "the guest in its loop")  # the firmware boots it in ~5 s
    return vm_id


def test_a_migration_that_cannot_converge_is_aborted_by_its_schedule(
        env: Env, vms: list[str]) -> None:
    """A 1 ms downtime at 1 MiB/s never converges while the guest dirties 572 KiB a
    pass. The schedule's steps run pass after pass (post-copy passed over), and its
    abort leaves the VM running here."""
    vm_id = create_busy(env, vms)
    env.a.call("VM.migrate", vmID=vm_id, params={
        "dst": env.b.dst, "maxBandwidth": 1, "convergenceSchedule": {
            "init": [set_downtime(1)],
            "stalling": [{"limit": 0, "action": set_downtime(2)},
                         {"limit": -1, "action": {"name": "postcopy", "params": []}},
                         {"limit": -1, "action": {"name": "abort", "params": []}}]}})
    eventually(lambda: state_is(env.a, vm_id, "cancelled"), 120, "aborted by the schedule")
    assert migration(env.a, vm_id)["status"] == {"code": 47, "message": "Migration canceled"}
    assert env.a.status(vm_id) == "Up" and env.a.qmp(vm_id, "query-status")["running"]
    # The stalling step ran before the abort: qemu keeps the last downtime set.
    assert env.a.qmp(vm_id, "query-migrate-parameters")["downtime-limit"] == 2
    eventually(lambda: vm_id not in env.b.listed(), 30, "B's copy gone")
    assert not lv_link(env.b, env).exists()


def test_a_schedule_step_lets_a_stalled_migration_finish(env: Env, vms: list[str]) -> None:
    """The same migration, whose schedule's first stalling step allows 10 s of downtime:
    it completes, after that step (the init's 1 ms held it until then)."""
    vm_id = create_busy(env, vms)
    env.a.call("VM.migrate", vmID=vm_id, params={
        "dst": env.b.dst, "maxBandwidth": 1, "convergenceSchedule": {
            "init": [set_downtime(1)],
            "stalling": [{"limit": 0, "action": set_downtime(10000)},
                         {"limit": -1, "action": {"name": "abort", "params": []}}]}})
    wait_migrated(env.a, env.b, vm_id, "Up")
    log = env.a.host.agent.log_path.read_text()
    assert f"VM {vm_id}: migration downtime set to 1 ms" in log
    assert f"VM {vm_id}: migration downtime set to 10000 ms" in log


# --- how many at once ------------------------------------------------------------------------


def test_a_host_sends_only_as_many_migrations_at_once_as_it_may(
        env: Env, vms: list[str]) -> None:
    """The engine's outgoingLimit bounds A's outgoing migrations, for later requests
    too: one more waits (and may be cancelled while it waits) until the bound rises."""
    first = create_running(env, vms, env.luns[0], memory=SLOW_MEMORY, volume=False)
    second = create_running(env, vms, env.luns[1], memory=SLOW_MEMORY, volume=False)
    try:
        env.a.call("VM.migrate", vmID=first, params={
            "dst": env.b.dst, "maxBandwidth": 1, "outgoingLimit": 1})
        eventually(lambda: state_is(env.a, first, "migrating"), 60, "the first migrating")
        env.a.call("VM.migrate", vmID=second, params={"dst": env.b.dst, "maxBandwidth": 1})
        eventually(lambda: state_is(env.a, second, "waiting"), 60, "the second waiting")
        assert migration(env.a, second)["status"]["message"] == "Migration in progress"
        assert second not in env.b.listed()  # nothing asked of B yet
        env.a.call("VM.migrateCancel", vmID=second)
        assert migration(env.a, second)["state"] == "cancelled"
        assert env.a.status(second) == "Up"
        # A request that raises the bound goes at once, beside the first.
        env.a.call("VM.migrate", vmID=second, params={
            "dst": env.b.dst, "maxBandwidth": 1, "outgoingLimit": 2})
        eventually(lambda: state_is(env.a, second, "migrating"), 60, "the second migrating")
        assert state_is(env.a, first, "migrating")
    finally:
        for vm_id in (first, second):
            with contextlib.suppress(ServerError):
                env.a.call("VM.migrateChangeParams", vmID=vm_id,
                           params={"maxBandwidth": 10000})
    wait_migrated(env.a, env.b, first, "Up")
    wait_migrated(env.a, env.b, second, "Up")


def test_a_full_destination_is_asked_again_until_it_has_room(
        env: Env, vms: list[str]) -> None:
    def incoming(lun: FakeLun, **kw: Any) -> str:
        """A copy waiting on B for a migration nobody sends (engine form)."""
        vm_id = new_id()
        vms.append(vm_id)
        params = vm_params(env, vm_id, lun, volume=False)
        params["devices"][0]["shared"] = "true"
        env.b.call("VM.migrationCreate", vmID=vm_id, params=params, **kw)
        return vm_id

    held = [incoming(env.luns[2]), incoming(env.luns[BUSY_LUN])]  # B takes 2 by default
    with pytest.raises(ServerError) as e:
        incoming(env.luns[2])
    assert (e.value.code, e.value.message.split(":")[0]) == \
        (82, "Incoming migration limit exceeded")
    # A request may raise the bound (VDSM's incomingLimit), for later ones too.
    third = incoming(env.luns[2], incomingLimit=3)
    with pytest.raises(ServerError) as e:
        incoming(env.luns[2], incomingLimit=2)
    assert e.value.code == 82
    env.b.call("VM.destroy", vmID=third)

    # A migration to the full B waits on A, asking again and again, until B has room.
    vm_id = create_running(env, vms, env.luns[0], volume=False)
    env.a.call("VM.migrate", vmID=vm_id, params={"dst": env.b.dst})
    eventually(lambda: state_is(env.a, vm_id, "waiting"), 60, "waiting for B")
    asked = f"VM {vm_id}: destination {env.b.dst} busy"
    eventually(lambda: env.a.host.agent.log_path.read_text().count(asked) >= 2, 60,
               "B asked again")
    assert env.a.status(vm_id) == "Migration Source"
    assert env.a.qmp(vm_id, "query-status")["running"]
    env.b.call("VM.destroy", vmID=held[0])
    wait_migrated(env.a, env.b, vm_id, "Up")


# --- cancel and failures ---------------------------------------------------------------------


def start_slow(env: Env, vm_id: str) -> int:
    """A throttled migration A -> B in flight; the pid of B's qemu."""
    env.a.call("VM.migrate", vmID=vm_id, params={"dst": env.b.dst, "maxBandwidth": 1})
    eventually(lambda: state_is(env.a, vm_id, "migrating"), 60, "migrating")
    return int(env.b.stats(vm_id)["pid"])


def test_cancel_halfway_keeps_the_vm_on_the_source(env: Env, vms: list[str]) -> None:
    vm_id = create_running(env, vms, env.luns[1], memory=SLOW_MEMORY)
    pid_a = int(env.a.stats(vm_id)["pid"])
    pid_b = start_slow(env, vm_id)
    env.a.call("VM.migrateCancel", vmID=vm_id)
    assert migration(env.a, vm_id)["state"] == "cancelled"
    assert migration(env.a, vm_id)["status"]["message"] == "Migration canceled"
    assert env.a.status(vm_id) == "Up" and int(env.a.stats(vm_id)["pid"]) == pid_a
    assert env.a.qmp(vm_id, "query-status")["running"]
    eventually(lambda: not Path(f"/proc/{pid_b}").exists(), 30, "B's qemu gone")
    assert_gone(env.b, vm_id)
    assert not lv_link(env.b, env).exists()
    # Nothing to cancel any more; and the VM migrates fine afterwards.
    with pytest.raises(ServerError) as e:
        env.a.call("VM.migrateCancel", vmID=vm_id)
    assert e.value.code == 47
    env.a.call("VM.migrate", vmID=vm_id, params={"dst": env.b.dst, "maxBandwidth": 10000})
    wait_migrated(env.a, env.b, vm_id, "Up")


def test_destination_qemu_killed_midway(env: Env, vms: list[str]) -> None:
    vm_id = create_running(env, vms, env.luns[1], memory=SLOW_MEMORY)
    pid_a = int(env.a.stats(vm_id)["pid"])
    pid_b = start_slow(env, vm_id)
    os.kill(pid_b, signal.SIGKILL)
    eventually(lambda: state_is(env.a, vm_id, "failed"), 60, "the migration failed")
    assert migration(env.a, vm_id)["status"]["code"] == 12
    assert env.a.status(vm_id) == "Up" and int(env.a.stats(vm_id)["pid"]) == pid_a
    assert env.a.qmp(vm_id, "query-status")["running"]
    eventually(lambda: vm_id not in env.b.listed(), 30, "B's copy destroyed")
    assert_gone(env.b, vm_id)
    assert not lv_link(env.b, env).exists()


def test_destination_that_cannot_see_a_lun_refuses(env: Env, vms: list[str]) -> None:
    lun = env.luns[2]
    vm_id = create_running(env, vms, lun)
    pid_a = int(env.a.stats(vm_id)["pid"])
    # B stops seeing the LUN (its udev entry gone); A's VM already runs on it.
    udev = Path(lun.udev_file)
    hidden = udev.with_name(udev.name + ".hidden")
    os.rename(udev, hidden)
    try:
        env.a.call("VM.migrate", vmID=vm_id, params={"dst": env.b.dst})
        eventually(lambda: state_is(env.a, vm_id, "failed"), 60, "the migration refused")
    finally:
        os.rename(hidden, udev)
    status = migration(env.a, vm_id)["status"]
    assert status["code"] == 12 and "37" in status["message"] and lun.guid in status["message"]
    assert env.a.status(vm_id) == "Up" and int(env.a.stats(vm_id)["pid"]) == pid_a
    assert_gone(env.b, vm_id)
    assert not lv_link(env.b, env).exists()  # the volume before the LUN was rolled back


def test_params_are_checked(env: Env, vms: list[str]) -> None:
    vm_id = create_running(env, vms, env.luns[2], volume=False)

    def code(params: dict[str, Any], target: str = vm_id) -> int:
        with pytest.raises(ServerError) as e:
            env.a.call("VM.migrate", vmID=target, params=params)
        return e.value.code

    assert code({}) == 11
    for bad in ("", "no:such:host", "host:0", "host:99999", "host:port", "a b:1", 7):
        assert code({"dst": bad}) == 91, bad
    assert code({"dst": env.b.dst, "maxBandwidth": "fast"}) == 91
    assert code({"dst": env.b.dst, "maxBandwidth": 0}) == 91
    assert code({"dst": env.b.dst, "method": "offline"}) == 91
    assert code({"dst": env.b.dst, "mode": "file"}) == 91
    for bad in ("a b", "host/1", "[::1", 7):
        assert code({"dst": env.b.dst, "dstqemu": bad}) == 91, bad
    assert code({"dst": env.b.dst, "encrypted": "maybe"}) == 91
    assert code({"dst": env.b.dst, "enableGuestEvents": "maybe"}) == 91
    assert code({"dst": env.b.dst, "convergenceSchedule": {"init": [{"name": "wait"}]}}) == 91
    assert code({"dst": env.b.dst}, target=new_id()) == 1
    with pytest.raises(ServerError) as e:
        env.a.call("VM.migrateCancel", vmID=vm_id)
    assert e.value.code == 47
    assert migration(env.a, vm_id)["status"]["message"] == "Migration not in progress"
    # A destination nobody listens on: refused in the background (10), VM untouched.
    env.a.call("VM.migrate", vmID=vm_id, params={"dst": "127.0.0.1:1"})
    eventually(lambda: state_is(env.a, vm_id, "failed"), 30, "the migration failed")
    assert migration(env.a, vm_id)["status"]["code"] == 10
    assert env.a.status(vm_id) == "Up"
    assert vm_id not in env.b.listed()


def test_a_failed_migration_is_reported_only_once_the_vm_is_settled(
        env: Env, vms: list[str]) -> None:
    """The outcome waits for the clean-up: while the source qemu cannot answer (stopped
    by the test), the migration is "aborting" and the VM Migration Source; "failed"
    comes with the VM Up again, never before."""
    vm_id = create_running(env, vms, env.luns[2], volume=False)
    pid_a = int(env.a.stats(vm_id)["pid"])
    # A destination that takes the connection and never answers: the migration stays
    # "preparing" until the test drops it.
    with socket.create_server(("127.0.0.1", 0)) as server:
        server.settimeout(60)
        env.a.call("VM.migrate", vmID=vm_id,
                   params={"dst": f"127.0.0.1:{server.getsockname()[1]}"})
        conn, _ = server.accept()
        eventually(lambda: state_is(env.a, vm_id, "preparing"), 30, "preparing")
        os.kill(pid_a, signal.SIGSTOP)
        try:
            conn.close()
            server.close()
            eventually(lambda: not state_is(env.a, vm_id, "preparing"), 30,
                       "the refusal seen")
            assert migration(env.a, vm_id)["state"] == "aborting"
            assert env.a.status(vm_id) == "Migration Source"
        finally:
            os.kill(pid_a, signal.SIGCONT)
    eventually(lambda: not state_is(env.a, vm_id, "aborting"), 60, "the migration ended")
    assert env.a.status(vm_id) == "Up"
    assert migration(env.a, vm_id)["state"] == "failed"
    assert migration(env.a, vm_id)["status"]["code"] == 10


# --- HA VMs: the lease moves with the VM ----------------------------------------------------


def test_a_leased_vm_takes_its_lease_along(env: Env, vms: list[str]) -> None:
    """The source qemu holds the VM lease until the migration completes; then the
    destination's qemu (registered with its sanlock from the start) takes it before
    its first instruction. As each host's sanlock daemon reports it."""
    if call(env.b.host.agent, "Host.getStorageRepoStats", domains=[env.dom.sd]).get(
            env.dom.sd, {}).get("acquired") is not True:
        join_lockspace(env.b.host.agent, env.dom.sd, host_id=2)
    vm_id = new_id()
    with env.a.client() as c:
        run_task(c, "Lease.create", {"lease": {"sd_id": env.dom.sd, "lease_id": vm_id}})
    params = vm_params(env, vm_id, env.luns[1], volume=False)
    params["devices"].append({"type": "lease", "device": "lease", "sd_id": env.dom.sd,
                              "lease_id": vm_id, "path": f"LEASE-PATH:{vm_id}:{env.dom.sd}",
                              "offset": f"LEASE-OFFSET:{vm_id}:{env.dom.sd}"})
    vms.append(vm_id)
    env.a.call("VM.create", vmID=vm_id, vmParams=params)
    eventually(lambda: env.a.status(vm_id) == "Up", 60, "the VM Up on A")
    assert holder_pid(env.a.host, env.dom.sd, vm_id) == int(env.a.stats(vm_id)["pid"])
    # While it runs on A, B cannot start it.
    with pytest.raises(ServerError) as e:
        env.b.call("VM.create", vmID=vm_id, vmParams=params)
    assert e.value.code == 651

    env.a.call("VM.migrate", vmID=vm_id, params={"dst": env.b.dst})
    wait_migrated(env.a, env.b, vm_id, "Up")
    assert holder_pid(env.b.host, env.dom.sd, vm_id) == int(env.b.stats(vm_id)["pid"])
    assert holder_pid(env.a.host, env.dom.sd, vm_id) is None

    env.b.call("VM.migrate", vmID=vm_id, params={"dst": env.a.dst})
    wait_migrated(env.b, env.a, vm_id, "Up")
    assert holder_pid(env.a.host, env.dom.sd, vm_id) == int(env.a.stats(vm_id)["pid"])
    assert holder_pid(env.b.host, env.dom.sd, vm_id) is None
    with env.a.client() as c:
        c.call("VM.destroy", {"vmID": vm_id})
        run_task(c, "Lease.delete", {"lease": {"sd_id": env.dom.sd, "lease_id": vm_id}})
