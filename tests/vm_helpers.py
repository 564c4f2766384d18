"""What tests of VMs share: waiting for a status, asking the VM's qemu directly."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from tests.helpers import run
from vdsmlite.client import Client
from vdsmlite.virt.qmp import QmpSession


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
