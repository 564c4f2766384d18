"""Run a real vdsmlite daemon as a subprocess, the way systemd would.

The daemon gets its own config file, state and run dirs under a work dir, and
a ``NOTIFY_SOCKET`` owned by this harness: `Agent.start` returns once the
daemon sent ``READY=1`` and learns the TCP address it bound (port 0 means any
free port, so parallel daemons never race for ports). Stopping is by PID:
SIGTERM, then SIGKILL after a timeout.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from fake_storage.children import tied_to_this_process
from vdsmlite.client import Client

# Config sections every Agent of this process gets, under the caller's own `config`
# (which wins). Empty for tools; the test suite fills it in its conftest.
HARNESS_CONFIG: dict[str, dict[str, Any]] = {}


def to_toml(sections: dict[str, dict[str, Any]]) -> str:
    """Flat TOML for config sections (strings, numbers, booleans, paths)."""
    lines = []
    for name, values in sections.items():
        lines.append(f"[{name}]")
        for key, value in values.items():
            if isinstance(value, bool):
                text = "true" if value else "false"
            elif isinstance(value, int | float):
                text = repr(value)
            else:
                text = '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'
            lines.append(f"{key} = {text}")
        lines.append("")
    return "\n".join(lines)


class NotifyListener:
    """Collects sd_notify datagrams sent to a socket we own."""

    def __init__(self, path: Path) -> None:
        self.path = path
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(str(path))
        self._sock.settimeout(0.2)
        self.messages: list[dict[str, str]] = []
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._closed:
            try:
                data = self._sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            self._record(data)

    def _record(self, data: bytes) -> None:
        fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
        with self._cond:
            self.messages.append(fields)
            self._cond.notify_all()

    def wait_for(self, key: str, value: str | None = None, timeout: float = 30.0) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for msg in self.messages:
                    if key in msg and (value is None or msg[key] == value):
                        return msg
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"no {key}={value or '*'} notification in {timeout}s")
                self._cond.wait(remaining)

    def all(self, key: str) -> list[str]:
        with self._cond:
            return [m[key] for m in self.messages if key in m]

    def close(self) -> None:
        self._closed = True
        self._thread.join(timeout=2)
        # Whatever the daemon sent last (STOPPING=1) may still sit in the socket.
        self._sock.setblocking(False)
        with contextlib.suppress(OSError):
            while True:
                self._record(self._sock.recv(65536))
        self._sock.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


class Agent:
    """One vdsmlite daemon process with its own dirs, config and notify socket."""

    def __init__(
        self,
        workdir: Path,
        *,
        config: dict[str, dict[str, Any]] | None = None,
        env: dict[str, str] | None = None,
        args: list[str] | None = None,
        embedded: bool = False,
    ) -> None:
        self.workdir = workdir
        self.state_dir = workdir / "state"
        self.run_dir = workdir / "run"
        self.config_path = workdir / "vdsmlite.conf"
        self.log_path = workdir / "daemon.log"
        sections: dict[str, dict[str, Any]] = {
            "daemon": {"state_dir": str(self.state_dir), "run_dir": str(self.run_dir),
                       "log_level": "DEBUG", "shutdown_timeout": 5.0},
            "rpc": {"listen": "127.0.0.1", "port": 0},
            "devel": {"validate_returns": True},
        }
        for name, values in [*HARNESS_CONFIG.items(), *(config or {}).items()]:
            sections.setdefault(name, {}).update(values)
        self.config = sections
        self.extra_env = env or {}
        self.extra_args = args or []
        # embedded=True: no config file at all, only flags (the `make run` default).
        self.embedded = embedded
        self.proc: subprocess.Popen[bytes] | None = None
        self.notify: NotifyListener | None = None
        self.notifications: list[dict[str, str]] = []
        self.tcp_address: tuple[str, int] | None = None
        self.url: str | None = None
        self._log_file: Any = None

    @property
    def unix_socket(self) -> Path:
        return self.run_dir / "vdsmlite.sock"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, timeout: float = 60.0) -> Agent:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(to_toml(self.config))
        self.notify = NotifyListener(self.workdir / "notify.sock")
        # Kept after the listener closes, so tests can read what was sent at exit.
        self.notifications = self.notify.messages
        env = {k: v for k, v in os.environ.items() if not k.startswith("WATCHDOG_")}
        env["NOTIFY_SOCKET"] = str(self.notify.path)
        env.update(self.extra_env)
        self._log_file = open(self.log_path, "ab")  # noqa: SIM115 - outlives this call
        if self.embedded:
            cmd = ["--state-dir", str(self.state_dir), "--port", "0"]
            self.run_dir = self.state_dir / "run"
        else:
            cmd = ["--config", str(self.config_path)]
        self.proc = subprocess.Popen(
            tied_to_this_process([sys.executable, "-m", "vdsmlite", *cmd, *self.extra_args]),
            env=env, stdout=self._log_file, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.notify.wait_for("READY", "1", timeout=0.2)
                break
            except TimeoutError:
                if self.proc.poll() is not None:
                    raise RuntimeError(
                        f"vdsmlite exited with {self.proc.returncode} before READY:\n"
                        f"{self.log_text()[-4000:]}") from None
                if time.monotonic() > deadline:
                    self.kill()
                    raise RuntimeError(f"vdsmlite not ready in {timeout}s:\n"
                                       f"{self.log_text()[-4000:]}") from None
        ready = self.notify.wait_for("READY", "1")
        address = ready.get("VDSMLITE_HTTP") or ready.get("VDSMLITE_HTTPS")
        if address:
            self.url = address
            host, _, port = address.split("://", 1)[1].rpartition(":")
            self.tcp_address = (host.strip("[]"), int(port))
        return self

    def client(self, timeout: float = 60.0) -> Client:
        """A client over the unix socket (the CLI's default door)."""
        return Client.unix(self.unix_socket, timeout=timeout)

    def tcp_client(self, timeout: float = 60.0, **kw: Any) -> Client:
        assert self.tcp_address is not None
        return Client.tcp(*self.tcp_address, timeout=timeout, **kw)

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, sig)

    def wait(self, timeout: float = 30.0) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM and wait; SIGKILL if it does not exit in time. Returns the exit code."""
        if self.proc is None:
            return None
        rc = self.proc.poll()
        if rc is None:
            self.signal(signal.SIGTERM)
            try:
                rc = self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
                rc = self.proc.returncode
        self._cleanup()
        return rc

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)
        self._cleanup()

    def _cleanup(self) -> None:
        if self.notify is not None:
            self.notify.close()
            self.notify = None
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def log_size(self) -> int:
        """Bytes in the log so far: a mark for `crashes(since=...)`."""
        try:
            return self.log_path.stat().st_size
        except FileNotFoundError:
            return 0

    def crashes(self, since: int = 0) -> list[str]:
        """Log lines that show an unexpected exception inside the daemon (written
        after byte `since` of the log)."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(since)
                text = f.read().decode(errors="replace")
        except FileNotFoundError:
            return []
        return [line for line in text.splitlines()
                if "Traceback" in line or " crashed" in line]
