"""An emulated watchdog device for one simulated host.

These machines have no /dev/watchdog and no softdog module, so a simulated
host gets this instead: it listens on a unix datagram socket for the agent's
``vdsmlite.locking.watchdog.EmulatedWatchdog`` (``arm <seconds>``, ``pet``,
``V`` for the magic close), and when an armed watchdog goes unpetted for its
timeout it "resets the host": it calls `on_reset` (the harness kills that
host's agent and sanlock daemon by PID, as a hardware reset would end them)
and records the reset. A thread of the harness process, not a daemon: it
lives exactly as long as the simulated host.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("fake_storage.watchdog")


@dataclass(frozen=True)
class Reset:
    at: float              # time.monotonic() when the watchdog fired
    last_keepalive: float  # time.monotonic() of the last pet before that
    timeout: int


class WatchdogEmulator:
    def __init__(self, socket_path: Path, on_reset: Callable[[], None], *,
                 name: str = "host") -> None:
        self.socket_path = Path(socket_path)
        self.on_reset = on_reset
        self.name = name
        self.timeout = 0
        self.armed = False
        self.keepalives = 0
        self.last_keepalive: float | None = None
        self.resets: list[Reset] = []
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()

    def start(self) -> WatchdogEmulator:
        self.socket_path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(str(self.socket_path))
        self._sock.settimeout(0.1)
        self._thread = threading.Thread(target=self._run, name=f"watchdog-{self.name}",
                                        daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        assert self._sock is not None
        while not self._stop.is_set():
            try:
                message = self._sock.recv(256)
            except TimeoutError:
                message = b""
            except OSError:
                return
            now = time.monotonic()
            with self._lock:
                if message.startswith(b"arm "):
                    self.timeout = int(message.split()[1])
                    self.armed = True
                    self.last_keepalive = now
                elif message == b"pet" and self.armed:
                    self.keepalives += 1
                    self.last_keepalive = now
                elif message == b"V":
                    self.armed = False
                fire = (self.armed and self.last_keepalive is not None
                        and now - self.last_keepalive >= self.timeout)
                if fire:
                    assert self.last_keepalive is not None
                    self.armed = False
                    reset = Reset(now, self.last_keepalive, self.timeout)
            if fire:
                log.warning("watchdog of %s fired: resetting the host", self.name)
                try:
                    self.on_reset()
                except Exception:
                    log.exception("resetting %s failed", self.name)
                # Recorded once the host is down, so waiters see the reset complete.
                with self._lock:
                    self.resets.append(reset)

    def wait_reset(self, timeout: float) -> Reset:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if self.resets:
                    return self.resets[-1]
            time.sleep(0.05)
        raise TimeoutError(f"watchdog of {self.name} did not fire in {timeout}s")

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._sock is not None:
            self._sock.close()
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()
