"""The qemu command line, process and QMP session, against a real qemu.

Every VM here starts paused (``-S``): no guest runs, nothing burns CPU. Disks are
plain files, a qcow2 made by qemu-img, and a loop device of the LUN farm. Every
qemu is killed by its pid at teardown (only if its cmdline still names this
test's directory), every loop device goes with the farm.
"""

from __future__ import annotations

import asyncio
import json
import mmap
import os
import signal
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fake_storage.lunfarm import LunFarm
from tests.helpers import run
from vdsmlite import errors
from vdsmlite.virt import leaseexec, qemu
from vdsmlite.virt.definition import (
    DiskBus,
    DiskFormat,
    DiskSpec,
    LunSource,
    VmDefinition,
    VolumeSource,
)
from vdsmlite.virt.qemu import QemuProcess, command_line, disk_names
from vdsmlite.virt.qmp import QmpConnectError, QmpEvent, QmpSession, SessionState, open_session

ROOT = Path(__file__).resolve().parent.parent
MiB = 1024 * 1024

pytestmark = pytest.mark.root


class Qemus:
    """Every qemu a test started: killed by pid at teardown if still ours."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.pids: list[int] = []

    def add(self, pid: int) -> None:
        self.pids.append(pid)

    def cleanup(self) -> None:
        for pid in self.pids:
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if bytes(self.tmp_path) in cmdline:  # not a reused pid
                os.kill(pid, signal.SIGKILL)
            try:
                os.waitpid(pid, 0)  # our child: no zombie left behind
            except ChildProcessError:
                pass


@pytest.fixture
def qemus(tmp_path: Path) -> Iterator[Qemus]:
    q = Qemus(tmp_path)
    yield q
    q.cleanup()


def volume_disk(name: str, bus: DiskBus, index: int, path: Path, **kw: Any) -> DiskSpec:
    src = VolumeSource(pool_id="p", domain_id="d", image_id=f"img-{name}", volume_id="v")
    return DiskSpec(name=name, bus=bus, index=index, source=src, path=str(path), **kw)


def raw_file(path: Path, size: int = 64 * MiB) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def qcow2_file(path: Path, size: int = 64 * MiB) -> Path:
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), str(size)],
                   check=True)
    return path


def vm(disks: list[DiskSpec], **kw: Any) -> VmDefinition:
    return VmDefinition(vm_id=str(uuid.uuid4()), name="test,vm", memory_mib=128, vcpus=1,
                        max_vcpus=2, launch_paused=True, disks=disks, **kw)


async def boot(defn: VmDefinition, run_dir: Path, qemus: Qemus, events: list[QmpEvent],
               **kw: Any) -> tuple[QemuProcess, QmpSession]:
    argv = await asyncio.to_thread(command_line, defn, run_dir=run_dir, **kw)
    proc = await QemuProcess.start(argv, vm_id=defn.vm_id, run_dir=run_dir)
    qemus.add(proc.pid)
    session = await open_session(proc, on_event=events.append)
    return proc, session


async def qemu_io(session: QmpSession, disk: str, command: str) -> str:
    """qemu-io through the device's own BlockBackend (the node is the device's)."""
    node = disk_names(disk).format
    [qdev] = [b["qdev"] for b in await session.query_block()
              if b.get("inserted", {}).get("node-name") == node]
    out = await session.human_monitor_command(f'qemu-io -d {qdev} "{command}"')
    assert "error" not in out.lower() and "failed" not in out.lower(), out
    return out


def read_direct(path: str, offset: int, size: int = 4096) -> bytes:
    """Read with O_DIRECT: the bytes on the file or device, not a cached copy."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        buf = mmap.mmap(-1, size)  # page aligned, as O_DIRECT wants
        os.preadv(fd, [buf], offset)
        return bytes(buf)
    finally:
        os.close(fd)


def nodes_by_name(nodes: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {n["node-name"]: n for n in nodes}


# --- the command line ----------------------------------------------------------------


def test_command_line_of_a_sample_definition(tmp_path: Path) -> None:
    img = raw_file(tmp_path / "a.img", MiB)
    defn = VmDefinition(
        vm_id="6B4C7D2E-3A4F-4E6A-9A2B-1C2D3E4F5A6B", name="web,01", memory_mib=1024,
        vcpus=2, max_vcpus=4, launch_paused=True, disks=[
            volume_disk("vda", DiskBus.VIRTIO, 0, img, serial="abc,def", boot_order=1),
            DiskSpec(name="sda", bus=DiskBus.SCSI, index=2, source=LunSource("36001405ab"),
                     path="/dev/loop7", shared=True)])
    argv = command_line(defn, run_dir=Path("/run/vdsmlite/vm/x"), hotplug_slots=1)
    blockdevs = [json.loads(argv[i + 1]) for i, a in enumerate(argv) if a == "-blockdev"]
    devices = [json.loads(argv[i + 1]) for i, a in enumerate(argv) if a == "-device"]
    head = argv[:argv.index("-device")]
    assert head == [
        "qemu-system-x86_64", "-machine", "q35", "-accel", "kvm", "-accel", "tcg",
        "-nodefaults", "-no-user-config", "-display", "none", "-vga", "none",
        "-m", "1024M", "-smp", "2,maxcpus=4", "-name", "guest=web,,01,debug-threads=on",
        "-uuid", "6b4c7d2e-3a4f-4e6a-9a2b-1c2d3e4f5a6b",
        "-chardev", "socket,id=qmp,path=/run/vdsmlite/vm/x/qmp.sock,server=on,wait=off",
        "-mon", "chardev=qmp,mode=control", "-pidfile", "/run/vdsmlite/vm/x/qemu.pid",
        "-msg", "timestamp=on", "-S"]
    cache = {"direct": True, "no-flush": False}
    loop7_is_block = os.path.exists("/dev/loop7")
    assert blockdevs == [
        {"driver": "file", "node-name": "vda-storage", "filename": str(img), "aio": "native",
         "cache": cache, "read-only": False},
        {"driver": "raw", "node-name": "vda-format", "file": "vda-storage", "cache": cache,
         "read-only": False},
        {"driver": "host_device" if loop7_is_block else "file", "node-name": "sda-storage",
         "filename": "/dev/loop7", "aio": "native", "cache": cache, "read-only": False},
        {"driver": "raw", "node-name": "sda-format", "file": "sda-storage", "cache": cache,
         "read-only": False}]
    assert devices == [
        {"driver": "virtio-scsi-pci", "id": "scsi0", "bus": "pcie.0"},
        {"driver": "pcie-root-port", "id": "rp1", "bus": "pcie.0", "chassis": 1},
        {"driver": "pcie-root-port", "id": "rp2", "bus": "pcie.0", "chassis": 2},
        {"driver": "virtio-blk-pci", "id": "disk-vda", "bus": "rp1", "addr": "0x0",
         "drive": "vda-format", "serial": "abc,def", "bootindex": 1,
         "werror": "stop", "rerror": "stop"},
        {"driver": "scsi-hd", "id": "disk-sda", "bus": "scsi0.0", "channel": 0,
         "scsi-id": 0, "lun": 2, "drive": "sda-format", "share-rw": True,
         "werror": "stop", "rerror": "stop"}]


@pytest.mark.parametrize("change, why", [
    ({"disk": {"name": "vd,a"}}, "disk name"),
    ({"disk": {"path": "relative/a.img"}}, "bad path"),
    ({"disk": {"path": None}}, "not prepared"),
    ({"disk": {"serial": "a\nb"}}, "serial"),
    ({"disk": {"shared": True, "format": DiskFormat.COW}}, "shared disk must be raw"),
    ({"disk": {"bus": DiskBus.SATA, "readonly": True}}, "read-only"),
    ({"disk": {"bus": DiskBus.SATA, "index": 6}}, "sata index"),
    ({"vm": {"vm_id": "not-a-uuid"}}, "not a UUID"),
    ({"vm": {"name": "a\x00b"}}, "control character"),
    ({"vm": {"cpu_model": "max -S"}}, "cpu model"),
    ({"vm": {"machine": "pc,accel=xen"}}, "only q35"),
    ({"twice": True}, "given twice"),
])
def test_command_line_refuses_what_qemu_must_not_see(tmp_path: Path, change: dict[str, Any],
                                                     why: str) -> None:
    disk = volume_disk("sda", DiskBus.SCSI, 0, raw_file(tmp_path / "a.img", MiB))
    for k, v in change.get("disk", {}).items():
        setattr(disk, k, v)
    defn = vm([disk, disk] if change.get("twice") else [disk])
    for k, v in change.get("vm", {}).items():
        setattr(defn, k, v)
    with pytest.raises(errors.CannotCreateVM, match=why) as e:
        command_line(defn, run_dir=tmp_path)
    assert e.value.code == 9


# --- a running qemu ------------------------------------------------------------------


def test_disks_are_what_was_asked(tmp_path: Path, qemus: Qemus, lun_farm: LunFarm) -> None:
    lun = lun_farm.add(64 * MiB)
    disks = [
        volume_disk("vda", DiskBus.VIRTIO, 0, raw_file(tmp_path / "vda.img"),
                    serial="raw,disk 1", boot_order=1),
        volume_disk("vdb", DiskBus.VIRTIO, 1, raw_file(tmp_path / "vdb.img"), readonly=True),
        volume_disk("sda", DiskBus.SCSI, 0, qcow2_file(tmp_path / "sda.qcow2"),
                    format=DiskFormat.COW, serial="QCOW-1", boot_order=2),
        DiskSpec(name="sdb", bus=DiskBus.SCSI, index=1, source=LunSource(lun.guid),
                 path=lun.loop, shared=True),
        volume_disk("sdc", DiskBus.SATA, 0, raw_file(tmp_path / "sdc.img")),
    ]
    defn = vm(disks)
    events: list[QmpEvent] = []

    async def main() -> None:
        proc, session = await boot(defn, tmp_path / "run", qemus, events, hotplug_slots=2)
        assert proc.is_child
        assert (await session.query_status())["status"] == "prelaunch"  # -S

        nodes = nodes_by_name(await session.query_named_block_nodes())
        for disk in disks:
            names = disk_names(disk.name)
            storage, fmt = nodes[names.storage], nodes[names.format]
            assert storage["drv"] == ("host_device" if disk.is_lun else "file")
            assert fmt["drv"] == ("qcow2" if disk.format is DiskFormat.COW else "raw")
            assert storage["file"] == disk.path
            assert storage["ro"] is fmt["ro"] is disk.readonly
            assert fmt["cache"]["direct"] is storage["cache"]["direct"] is True

        attached = {b["inserted"]["node-name"]: b["qdev"] for b in await session.query_block()}
        assert attached == {
            "vda-format": "/machine/peripheral/disk-vda/virtio-backend",
            "vdb-format": "/machine/peripheral/disk-vdb/virtio-backend",
            "sda-format": "disk-sda", "sdb-format": "disk-sdb", "sdc-format": "disk-sdc"}

        async def prop(dev: str, name: str) -> Any:
            return await session.qom_get(f"/machine/peripheral/{dev}", name)

        assert await prop("disk-vda", "serial") == "raw,disk 1"
        assert await prop("disk-vda", "bootindex") == 1
        assert await prop("disk-sda", "serial") == "QCOW-1"
        assert await prop("disk-sda", "bootindex") == 2
        assert await prop("disk-vdb", "bootindex") == -1  # none asked
        assert [await prop("disk-sdb", p) for p in ("channel", "scsi-id", "lun")] == [0, 0, 1]
        assert await prop("disk-sdb", "share-rw") is True
        assert await prop("disk-sda", "share-rw") is False
        assert (await prop("disk-sda", "parent_bus")).endswith("/scsi0.0")
        assert (await prop("disk-sdc", "parent_bus")).endswith("/ide.0")

        # PCI: the SCSI controller and the root ports on the root bus, each virtio disk
        # behind its own port, the spare ports empty. (query-pci shows what is behind a
        # bridge only once firmware numbered the buses: never, with -S. QOM knows.)
        [root] = await session.query_pci()
        assert {"scsi0", "rp1", "rp2", "rp3", "rp4"} <= {d.get("qdev_id")
                                                        for d in root["devices"]}
        assert (await prop("scsi0", "parent_bus")).endswith("/pcie.0")
        assert await prop("disk-vda", "parent_bus") == "/machine/peripheral/rp1/rp1"
        assert await prop("disk-vdb", "parent_bus") == "/machine/peripheral/rp2/rp2"
        assert await session.free_root_ports() == ["rp3", "rp4"]

        # Written through qemu, read from the storage itself.
        await qemu_io(session, "vda", "write -P 0xab 0 4k")
        assert read_direct(disks[0].path or "", 0) == b"\xab" * 4096
        await qemu_io(session, "sdb", "write -P 0xef 1M 4k")
        assert read_direct(lun.loop, MiB) == b"\xef" * 4096
        await qemu_io(session, "sda", "write -P 0xcd 64k 4k")
        await qemu_io(session, "sda", "flush")  # qcow2 metadata lives in qemu until then
        check = await asyncio.to_thread(subprocess.run, [
            "qemu-io", "-U", "-r", "-f", "qcow2", "-c", "read -P 0xcd 64k 4k",
            disks[2].path or ""], capture_output=True, text=True)
        assert check.returncode == 0 and "Pattern verification failed" not in check.stdout, \
            check.stdout + check.stderr
        out = await session.human_monitor_command(
            'qemu-io -d /machine/peripheral/disk-vdb/virtio-backend "write 0 4k"')
        assert "read-only" in out.lower() or "permission denied" in out.lower(), out
        # Stats per device (qemu-io bypasses the devices' accounting: zeros, but there).
        stats = {s["qdev"]: s["stats"] for s in await session.query_blockstats()}
        assert set(stats) == set(attached.values())
        assert all("wr_bytes" in s and "rd_operations" in s for s in stats.values())

        # Our own child killed behind our back: its status is known.
        os.kill(proc.pid, signal.SIGKILL)
        ended = await asyncio.wait_for(proc.wait(), 10)
        assert ended.returncode == -signal.SIGKILL
        assert "killed by signal 9" in ended.describe()
        await asyncio.wait_for(session.wait_disconnected(), 10)
        assert session.state is SessionState.DISCONNECTED
        await session.close()

    run(main())


def test_hot_plug_and_unplug(tmp_path: Path, qemus: Qemus) -> None:
    events: list[QmpEvent] = []
    scsi = volume_disk("sdd", DiskBus.SCSI, 3, raw_file(tmp_path / "sdd.img"), serial="HP1")
    virtio = volume_disk("vdc", DiskBus.VIRTIO, 0, raw_file(tmp_path / "vdc.img"))

    async def main() -> None:
        proc, session = await boot(vm([]), tmp_path / "run", qemus, events, hotplug_slots=1)

        async def node_names() -> set[str]:
            return {n["node-name"] for n in await session.query_named_block_nodes()}

        async def devices() -> set[str]:
            return {b["qdev"] for b in await session.query_block()}

        assert await node_names() == set()

        # SCSI: plugged, then unplugged at once (DEVICE_DELETED), nodes gone too.
        await session.plug_disk(scsi)
        assert await devices() == {"disk-sdd"}
        assert await session.qom_get("/machine/peripheral/disk-sdd", "serial") == "HP1"
        await session.unplug_disk(scsi, timeout=5)
        assert await devices() == set() and await node_names() == set()
        assert any(e.name == "DEVICE_DELETED" and e.data.get("device") == "disk-sdd"
                   for e in events)

        # virtio: plugged into the free root port; a paused guest with no OS never
        # releases it, so the unplug times out and the disk stays.
        await session.plug_disk(virtio)
        assert await session.free_root_ports() == []
        with pytest.raises(errors.HotunplugDiskFailed, match="still attached") as e:
            await session.unplug_disk(virtio, timeout=1)
        assert e.value.code == 46
        assert await devices() == {"/machine/peripheral/disk-vdc/virtio-backend"}
        assert await node_names() == {"vdc-storage", "vdc-format"}
        # Asking again waits again (qemu refuses a second device_del while one pends).
        with pytest.raises(errors.HotunplugDiskFailed, match="still attached"):
            await session.unplug_disk(virtio, timeout=0.5)
        assert await node_names() == {"vdc-storage", "vdc-format"}
        with pytest.raises(errors.HotunplugDiskFailed, match="not attached"):
            await session.unplug_disk(scsi, timeout=1)

        # Failed plugs leave nothing behind, at whichever step they fail.
        before = await node_names()
        missing = volume_disk("sde", DiskBus.SCSI, 4, tmp_path / "no-such.img")
        not_qcow2 = volume_disk("sdf", DiskBus.SCSI, 5, raw_file(tmp_path / "sdf.img"),
                                format=DiskFormat.COW)  # the format node fails
        no_port = volume_disk("vdd", DiskBus.VIRTIO, 1, raw_file(tmp_path / "vdd.img"))
        for disk, why in ((missing, "No such file"), (not_qcow2, "qcow2"),
                          (no_port, "no free PCIe root port")):
            with pytest.raises(errors.HotplugDiskFailed, match=why) as e:
                await session.plug_disk(disk)
            assert e.value.code == 45
            assert await node_names() == before
        # device_add fails (LUN 6 taken) after both nodes were added: both removed.
        await session.plug_disk(volume_disk("sdg", DiskBus.SCSI, 6,
                                            raw_file(tmp_path / "sdg.img")))
        before = await node_names()
        clash = volume_disk("sdh", DiskBus.SCSI, 6, raw_file(tmp_path / "sdh.img"))
        with pytest.raises(errors.HotplugDiskFailed, match="device_add"):
            await session.plug_disk(clash)
        assert await node_names() == before

        await session.quit()
        await asyncio.wait_for(session.wait_disconnected(), 10)
        ended = await asyncio.wait_for(proc.wait(), 10)
        assert ended.returncode == 0
        assert any(e.name == "SHUTDOWN" for e in events)
        await session.close()

    run(main())


STARTER = textwrap.dedent("""
    import asyncio, json, sys
    from pathlib import Path
    from vdsmlite.virt.definition import VmDefinition
    from vdsmlite.virt.qemu import QemuProcess, command_line

    async def main():
        defn = VmDefinition.from_dict(json.loads(sys.argv[1]))
        run_dir = Path(sys.argv[2])
        argv = command_line(defn, run_dir=run_dir, hotplug_slots=0)
        proc = await QemuProcess.start(argv, vm_id=defn.vm_id, run_dir=run_dir)
        print(proc.pid)
        proc.close()

    asyncio.run(main())
""")


def test_found_again_after_an_agent_restart(tmp_path: Path, qemus: Qemus) -> None:
    """An "agent" process starts qemu and exits; a fresh object finds it, drives it,
    and sees it die although it is not its child."""
    defn = vm([])
    run_dir = tmp_path / "run"
    starter = subprocess.run([sys.executable, "-c", STARTER, json.dumps(defn.to_dict()),
                              str(run_dir)], cwd=ROOT, capture_output=True, text=True,
                             timeout=60)
    assert starter.returncode == 0, starter.stderr
    pid = int(starter.stdout)
    qemus.add(pid)
    # The agent is gone, qemu is not (its own session).
    assert Path(f"/proc/{pid}").exists()
    assert os.getsid(pid) == pid
    other = tmp_path / "other"
    other.mkdir()
    (other / "qemu.pid").write_text(f"{pid}\n")  # the right pid, in the wrong run dir
    events: list[QmpEvent] = []

    async def main() -> None:
        assert await QemuProcess.find(str(uuid.uuid4()), run_dir) is None  # not this VM
        assert await QemuProcess.find(defn.vm_id, other) is None

        proc = await QemuProcess.find(defn.vm_id, run_dir)
        assert proc is not None and proc.pid == pid and not proc.is_child
        session = await open_session(proc, on_event=events.append)
        assert (await session.query_status())["status"] == "prelaunch"
        await session.cont()
        await session.stop()
        assert (await session.query_status())["status"] == "paused"

        os.kill(pid, signal.SIGTERM)  # behind the object's back
        ended = await asyncio.wait_for(proc.wait(), 10)
        assert ended.returncode is None  # not our child: only that it died
        assert "terminating on signal 15" in ended.log_tail
        await asyncio.wait_for(session.wait_disconnected(), 10)
        assert [e.name for e in events] == ["RESUME", "STOP", "SHUTDOWN"]
        assert events[-1].data["reason"] == "host-signal"
        await session.close()
        assert await QemuProcess.find(defn.vm_id, run_dir) is None

    run(main())


def test_a_qemu_that_cannot_start_says_why(tmp_path: Path, qemus: Qemus) -> None:
    gone = tmp_path / "gone.img"
    defn = vm([volume_disk("vda", DiskBus.VIRTIO, 0, gone)])

    async def main() -> None:
        with pytest.raises(errors.CannotCreateVM, match="Could not open") as e:
            await boot(defn, tmp_path / "run", qemus, [])
        assert "exited with status 1" in str(e.value)

    run(main())


def test_qemu_gets_a_systemd_scope_only_where_systemd_runs_faked_systemd_dir(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No systemd on these machines: its marker directory is faked (so named)."""
    argv = ["qemu-system-x86_64", "-S"]
    vm = "6b4c7d2e-3a4f-4e6a-9a2b-1c2d3e4f5a6b"
    monkeypatch.setattr(qemu, "SYSTEMD_RUNNING", tmp_path / "absent")
    assert qemu.in_own_scope(argv, vm) == argv
    monkeypatch.setattr(qemu, "SYSTEMD_RUNNING", tmp_path)
    scoped = qemu.in_own_scope(argv, vm)
    assert scoped[:2] == ["systemd-run", "--scope"] and scoped[-3:] == ["--", *argv]
    assert f"--unit=vdsmlite-vm-{vm}" in scoped and "--slice=machine.slice" in scoped


@pytest.mark.parametrize("requested, runs, noted", [
    (None, None, False),
    ("host", "host", False),
    ("Broadwell", "Broadwell", False),  # this qemu has it: as asked
    ("Broadwell-noTSX-IBRS", "Broadwell-noTSX-IBRS", False),
    # RHEL's and newer engines' names this qemu may lack: the nearest relative.
    ("Broadwell-noTSX-IBRS-SSBD-future", "Broadwell-noTSX-IBRS", True),
    ("NoSuchVendorCpu", None, True),
])
def test_cpu_models_this_qemu_lacks_run_as_the_nearest(requested: str | None,
                                                       runs: str | None,
                                                       noted: bool) -> None:
    """Against the local qemu's own `-cpu help` list."""
    model, note = qemu.resolve_cpu_model(requested)
    assert model == runs
    assert (note is not None) == noted
    if note is not None:
        assert requested is not None and requested in note


def test_lease_wrapper_command_line_round_trips() -> None:
    """What `lease_argv` writes is what `leaseexec` reads, flags included, and the
    program's own arguments (even ones that look like ours) pass untouched."""
    program = ["qemu", "--register-only", "--", "-S"]
    for register_only in (False, True):
        argv = leaseexec.lease_argv("sd", "lease", "/dev/x", 3 << 20, program,
                                    register_only=register_only)
        assert argv[:3] == [sys.executable, "-m", "vdsmlite.virt.leaseexec"]
        assert leaseexec.parse(argv[3:]) == leaseexec.Invocation(
            "sd", "lease", "/dev/x", 3 << 20, register_only, program)
    for bad in (["sd", "lease", "/x", "0"], ["sd", "lease", "/x", "0", "--"],
                ["sd", "/x", "0", "--", "qemu"], ["sd", "lease", "/x", "zero", "--", "q"]):
        with pytest.raises(ValueError):
            leaseexec.parse(bad)
        assert leaseexec.main(bad) == leaseexec.EXIT_USAGE


def test_a_negotiation_an_event_overtook_is_tried_again_fake_qemu_monitor(
        tmp_path: Path) -> None:
    """qemu may send an event ahead of its answer to qmp_capabilities (emitted by
    another thread as the monitor leaves negotiation: a migration's events did, in
    CI). Real qemu hits this window rarely, so a fake monitor (a unix socket server
    speaking QMP) sends the event first on purpose: the session connects again."""
    greeting = {"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7},
                                    "package": ""}, "capabilities": []}}
    event = {"event": "MIGRATION_PASS", "data": {"pass": 2},
             "timestamp": {"seconds": 1, "microseconds": 0}}

    async def main(overtaken: int) -> tuple[int, Any]:
        connections = 0

        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            nonlocal connections
            connections += 1
            late = connections <= overtaken
            writer.write(json.dumps(greeting).encode() + b"\n")
            pending = ""
            while chunk := await reader.read(4096):
                # Commands come as a JSON stream, not necessarily one per line.
                pending += chunk.decode()
                while pending.strip():
                    request, end = json.JSONDecoder().raw_decode(pending.lstrip())
                    pending = pending.lstrip()[end:]
                    if request["execute"] == "qmp_capabilities" and late:
                        writer.write(json.dumps(event).encode() + b"\n")
                    answer = {"running": True, "status": "running"} \
                        if request["execute"] == "query-status" else {}
                    reply = {"return": answer, **({"id": request["id"]} if "id" in request
                                                  else {})}
                    writer.write(json.dumps(reply).encode() + b"\n")
                await writer.drain()
            writer.close()

        path = tmp_path / f"qmp-{overtaken}.sock"
        server = await asyncio.start_unix_server(serve, str(path))
        session = QmpSession(path, name="fake")
        try:
            await session.connect(10)
            status = await session.execute("query-status")
            await session.close()
            return connections, status
        except Exception as e:
            return connections, e
        finally:
            server.close()

    connections, status = run(main(overtaken=2))
    assert (connections, status["running"]) == (3, True)
    # Not for ever: a monitor that never answers first is given up on.
    connections, error = run(main(overtaken=10))
    assert connections == 3 and isinstance(error, QmpConnectError), error
