"""Simulated hosts on one machine: sanlock daemon + emulated watchdog + vdsmlite agent.

Every simulated host has its own sanlock daemon (own run dir and stable host
name), its own vdsmlite daemon (own port, state and run dirs, configured to
talk to that sanlock) and, if asked, its own emulated watchdog. They share the
machine's loop LUNs, so they see the same storage as real hosts share a SAN.

When a host's watchdog fires, the emulator "resets" it: the agent, the
sanlock daemon and the host's qemus are SIGKILLed by PID - nothing of that
host renews a lease or writes a disk any more, exactly what its peers would
see of a host that rebooted. `restart`
brings it back as a new incarnation (sanlock gives it a new generation).
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from fake_storage.agent import Agent
from fake_storage.children import kill_vms_left_in
from fake_storage.sanlockd import SanlockDaemon
from fake_storage.watchdog import WatchdogEmulator


class SimHost:
    def __init__(self, workdir: Path, name: str, *, io_timeout: int = 1,
                 watchdog_timeout: int | None = None, monitor_interval: float = 1.0,
                 lease_timeout: float = 10.0,
                 config: dict[str, dict[str, Any]] | None = None) -> None:
        self.name = name
        self.workdir = Path(workdir)
        self.sanlock = SanlockDaemon(self.workdir / "sanlock", host_name=name)
        sections: dict[str, dict[str, Any]] = {
            "sanlock": {"run_dir": str(self.sanlock.run_dir), "io_timeout": io_timeout,
                        "monitor_interval": monitor_interval, "lease_timeout": lease_timeout},
        }
        self.watchdog: WatchdogEmulator | None = None
        if watchdog_timeout is not None:
            sock = self.workdir / "watchdog.sock"
            self.watchdog = WatchdogEmulator(sock, self._reset, name=name)
            sections["watchdog"] = {"backend": "emulated", "socket": str(sock),
                                    "timeout": watchdog_timeout}
        for section, values in (config or {}).items():
            sections.setdefault(section, {}).update(values)
        self.agent = Agent(self.workdir / "agent", config=sections)
        run_dir = sections.get("virt", {}).get("run_dir")
        self.vm_run_dir = Path(run_dir) if run_dir else None
        self._reset_lock = threading.Lock()
        self.resets = 0

    def start(self) -> SimHost:
        self.sanlock.start()
        if self.watchdog is not None and self.watchdog._thread is None:
            self.watchdog.start()
        self.agent.start()
        return self

    def _reset(self) -> None:
        # Called from the watchdog's thread. A hardware reset ends everything at once:
        # sanlock goes first, so nothing it held is released cleanly on the way down
        # (killing the agent first would let sanlock see its lease holder exit and
        # release the leases - a clean stop, not a reset).
        with self._reset_lock:
            self.resets += 1
            self.sanlock.kill()
            self.agent.kill()
            if self.vm_run_dir is not None:
                # Its VMs die with the host (they outlive only their agent).
                kill_vms_left_in(self.vm_run_dir)

    def restart(self) -> SimHost:
        """Boot again after a reset (or a crash): same host name, new generation."""
        with self._reset_lock:
            self.sanlock.kill()
            self.agent.kill()
        self.sanlock.start()
        self.agent.start()
        return self

    def stop(self) -> None:
        """The agent stops cleanly (and is checked for it by the callers); the host's
        lock manager is then killed: the host is going away for good, and a clean
        sanlock shutdown costs a second of its main loop, or is refused outright while
        a lockspace is joined (2 s more, then a kill anyway)."""
        self.agent.stop()
        self.sanlock.kill()
        if self.watchdog is not None:
            self.watchdog.stop()
