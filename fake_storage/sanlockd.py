"""A real sanlock daemon for one simulated host.

Each simulated host runs its own ``sanlock daemon`` with its own run dir (its
socket and pid lock file; clients find it through ``SANLOCK_RUN_DIR``) and a
stable host name (``-e``), so that a restart after a crash re-joins at once
("fast reacquire") instead of waiting for the old incarnation to be declared
dead. ``SANLOCK_PRIVILEGED=0`` is what lets it start without CAP_SYS_RESOURCE
(sandboxes and containers withhold that capability); ``-w 0`` because these machines have no
watchdog device (the simulated host's watchdog is `fake_storage.watchdog`).

Stopping is by PID: SIGTERM (which sanlock honours only with no lockspace
joined), then SIGKILL.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path

from fake_storage.children import tied_to_this_process

SANLOCK = "/usr/sbin/sanlock"


class SanlockDaemon:
    def __init__(self, run_dir: Path, host_name: str) -> None:
        self.run_dir = Path(run_dir)
        self.host_name = host_name
        self.log_path = self.run_dir / "sanlock.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def socket(self) -> Path:
        return self.run_dir / "sanlock.sock"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def env(self) -> dict[str, str]:
        """What a client process needs to talk to this daemon."""
        return {"SANLOCK_RUN_DIR": str(self.run_dir)}

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float = 30.0) -> SanlockDaemon:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "SANLOCK_RUN_DIR": str(self.run_dir), "SANLOCK_PRIVILEGED": "0"}
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                # Killed, not stopped, with a dead runner: it is a test host's lock
                # manager, and a clean shutdown would wait on lockspaces.
                tied_to_this_process(
                    [SANLOCK, "daemon", "-D", "-w", "0", "-l", "0", "-h", "0", "-U", "root",
                     "-G", "root", "-L", "-1", "-S", "-1", "-e", self.host_name], "KILL"),
                env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while not self._answers():
            if self.proc.poll() is not None:
                raise RuntimeError(f"sanlock daemon exited with {self.proc.returncode}:\n"
                                   f"{self.log_text()[-3000:]}")
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"sanlock daemon not answering in {timeout}s:\n"
                                   f"{self.log_text()[-3000:]}")
            time.sleep(0.05)
        return self

    def _answers(self) -> bool:
        if not self.socket.exists():
            return False
        out = subprocess.run([SANLOCK, "client", "status"], env={**os.environ, **self.env},
                             capture_output=True, timeout=30, check=False)
        return out.returncode == 0

    def status(self) -> str:
        """`sanlock client status -D`: lockspaces, resources and hosts, for debugging."""
        out = subprocess.run([SANLOCK, "client", "status", "-D"],
                             env={**os.environ, **self.env}, capture_output=True, text=True,
                             timeout=30, check=False)
        return out.stdout + out.stderr

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def kill(self) -> None:
        """SIGKILL, as a watchdog reset or a crash would end it."""
        if self.alive():
            assert self.proc is not None
            os.kill(self.proc.pid, signal.SIGKILL)
        self._reap()

    def stop(self, timeout: float = 2.0) -> None:
        if self.alive():
            assert self.proc is not None
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                # It keeps running while it holds lockspaces (by design: a host that
                # crashed keeps its ids); the simulated host is going away anyway.
                os.kill(self.proc.pid, signal.SIGKILL)
        self._reap()

    def _reap(self) -> None:
        if self.proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(30)
            # Its sanlock-helper child exits by itself once the daemon is gone; a
            # restart must wait for the pid lock file to be released as well.
            lock = self.run_dir / "sanlock.pid"
            deadline = time.monotonic() + 10
            while lock.exists() and time.monotonic() < deadline:
                try:
                    pid = int(lock.read_text().split()[0])
                except (ValueError, IndexError, OSError):
                    break
                if not Path(f"/proc/{pid}").exists():
                    break
                time.sleep(0.05)
