"""What tests of VMs share: a host that runs VMs and what a test knows of it, waiting
for a status, asking the VM's qemu directly."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fake_storage.children import kill_vms_left_in
from fake_storage.cluster import SimHost
from fake_storage.lunfarm import FakeLun, LunFarm
from tests.helpers import run
from tests.storage_helpers import DomainUnderTest, unmount_under
from vdsmlite.client import Client
from vdsmlite.virt.qmp import QmpSession


@contextlib.contextmanager
def vm_host(base: Path, name: str, **virt: Any) -> Iterator[tuple[SimHost, LunFarm, Path]]:
    """A simulated host that runs VMs (debug monitor on, `virt` overriding the rest of
    ``[virt]``), a LUN farm, and the VMs' run dir; everything is gone afterwards: VMs,
    mounts, the host, its qemus and the LUNs."""
    farm = LunFarm(base / "farm")
    # Short, under /tmp: a QMP socket path must fit in 107 bytes.
    vm_run_dir = Path(tempfile.mkdtemp(prefix="vl-", dir="/tmp"))
    host = SimHost(base / "host", name, config={
        "virt": {"run_dir": str(vm_run_dir), "debug_monitor": True, **virt}})
    try:
        host.start()
        yield host, farm, vm_run_dir
    finally:
        destroy_all_vms(host)
        unmount_under(host.agent.state_dir)
        host.stop()
        kill_vms_left_in(vm_run_dir)
        shutil.rmtree(vm_run_dir, ignore_errors=True)
        problems = farm.destroy()
        assert not problems, problems


@dataclass
class VmEnv:
    """A host from `vm_host` and what a test module built on it: a block domain, one of
    its volumes, spare LUNs; and where the VMs' dirs (their monitors) are."""

    host: SimHost
    dom: DomainUnderTest
    img: str
    vol: str
    luns: list[FakeLun]  # spare LUNs for direct use, 256 MiB each
    vm_run_dir: Path

    @property
    def client(self) -> Client:
        return self.host.agent.client()

    def vm_dir(self, vm_id: str) -> Path:
        return self.vm_run_dir / vm_id


def destroy_all_vms(host: SimHost) -> None:
    if host.agent.proc is None or host.agent.proc.poll() is not None:
        return
    with host.agent.client() as c:
        for vm in c.call("Host.getVMList", {"onlyUUID": True}):
            c.call("VM.destroy", {"vmID": vm})


def wait_status(c: Client, vm_id: str, wanted: str, timeout: float = 60) -> dict[str, Any]:
    """VM.getStats until the VM is `wanted`; fails at once if it went Down instead."""
    deadline = time.monotonic() + timeout
    while True:
        stats: dict[str, Any] = c.call("VM.getStats", {"vmID": vm_id})[0]
        if stats["status"] == wanted:
            return stats
        if stats["status"] == "Down" and wanted != "Down":
            raise AssertionError(f"VM {vm_id} went Down: {stats.get('exitMessage')}")
        if time.monotonic() > deadline:
            raise AssertionError(f"VM {vm_id} is {stats['status']}, not {wanted}")
        time.sleep(0.05)


def debug_qmp(vm_dir: Path, command: str, args: dict[str, Any] | None = None) -> Any:
    """One command on the VM's debug monitor (``[virt] debug_monitor``): what qemu
    itself says, independent of the agent, which holds the main monitor."""

    async def call() -> Any:
        session = QmpSession(Path(vm_dir) / "qmp-debug.sock", name="test")
        await session.connect(10)
        try:
            return await session.execute(command, args)
        finally:
            await session.close()

    return run(call())


def qmp(env: VmEnv, vm_id: str, command: str, args: dict[str, Any] | None = None) -> Any:
    """One command on the VM's debug monitor (the agent holds the main one)."""
    return debug_qmp(env.vm_dir(vm_id), command, args)


def _tcp_sockets(pid: int) -> list[tuple[str, str, str]]:
    """Process `pid`'s IPv4 TCP sockets, from /proc: (state, local, remote), the
    kernel's hex forms (state 0A is LISTEN, 01 ESTABLISHED)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith("socket:["):
                inodes.add(target[len("socket:["):-1])
    sockets = []
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[9] in inodes:
            sockets.append((fields[3], fields[1], fields[2]))
    return sockets


def _address(hex_address: str) -> tuple[str, int]:
    """/proc/net/tcp's "0100007F:1F90" as ("127.0.0.1", 8080)."""
    ip, port = hex_address.split(":")
    return socket.inet_ntoa(bytes.fromhex(ip)[::-1]), int(port, 16)


def listening_ports(pid: int) -> set[int]:
    """The TCP ports process `pid` listens on (IPv4)."""
    return {_address(local)[1] for state, local, _ in _tcp_sockets(pid) if state == "0A"}


def connected_to(pid: int) -> set[tuple[str, int]]:
    """The (address, port) process `pid` has established TCP connections to (IPv4)."""
    return {_address(remote) for state, _, remote in _tcp_sockets(pid) if state == "01"}
