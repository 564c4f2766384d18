"""The host watchdog: petted while this host may run, abandoned when it is fenced.

Fencing through storage ends with the target host being reset, and what
resets it is a watchdog the agent stops petting. The agent pets from its
event loop, so a hung agent stops petting too. Backends:

* `DeviceWatchdog`: a Linux watchdog device (``/dev/watchdog``): the timeout is
  set with WDIOC_SETTIMEOUT, petting is WDIOC_KEEPALIVE, and a clean stop
  writes the magic ``V`` before closing so the host is not reset. Abandoning
  keeps the device open and silent: the hardware fires after the timeout.
* `EmulatedWatchdog`: `fake_storage.watchdog`'s emulated device, over a unix
  datagram socket (``arm <timeout>``, ``pet``, ``V``); it "resets" the
  simulated host when petting stops. For machines without a watchdog.
* `NoWatchdog`: nothing will reset this host; a fence request is logged and
  answered with "cannot reset" (see fencing.EVENT_CANNOT_RESET).

Backends block (ioctl, sendto): `WatchdogService` calls them in the executor
for open/close and inline for the keepalive, which never blocks for long.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import socket
import struct
import time
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

from vdsmlite import background

log = logging.getLogger("vdsmlite.locking.watchdog")

# <linux/watchdog.h>: _IOR('W', 5, int) and _IOWR('W', 6, int)
WDIOC_KEEPALIVE = 0x80045705
WDIOC_SETTIMEOUT = 0xC0045706


class WatchdogError(Exception):
    pass


class Watchdog(ABC):
    name: str = "none"
    can_reset = True  # False: nothing resets this host when petting stops

    def __init__(self, timeout: int) -> None:
        self.timeout = timeout

    @abstractmethod
    def arm(self) -> None:
        """Start the countdown; from now on it must be petted within `timeout`."""

    @abstractmethod
    def keepalive(self) -> None: ...

    @abstractmethod
    def disarm(self) -> None:
        """Stop the countdown for good (a clean stop of the agent)."""

    def abandon(self) -> None:  # noqa: B027 - the default is to simply stop petting
        """Stop petting and let it fire; keep whatever keeps it armed."""


class NoWatchdog(Watchdog):
    name = "none"
    can_reset = False

    def arm(self) -> None:
        log.warning("no watchdog configured: a fence request cannot reset this host")

    def keepalive(self) -> None:
        pass

    def disarm(self) -> None:
        pass


class DeviceWatchdog(Watchdog):
    name = "device"

    def __init__(self, device: Path, timeout: int) -> None:
        super().__init__(timeout)
        self.device = device
        self._fd: int | None = None

    def arm(self) -> None:
        try:
            self._fd = os.open(self.device, os.O_WRONLY | os.O_CLOEXEC)
        except OSError as e:
            raise WatchdogError(f"cannot open watchdog {self.device}: {e}") from e
        try:
            actual = fcntl.ioctl(self._fd, WDIOC_SETTIMEOUT, struct.pack("i", self.timeout))
            self.timeout = struct.unpack("i", actual)[0] or self.timeout
        except OSError as e:
            # Some drivers have a fixed timeout; theirs is what counts then.
            log.warning("watchdog %s: cannot set a %ds timeout (%s)", self.device,
                        self.timeout, e)

    def keepalive(self) -> None:
        if self._fd is not None:
            fcntl.ioctl(self._fd, WDIOC_KEEPALIVE, struct.pack("i", 0))

    def disarm(self) -> None:
        if self._fd is not None:
            try:
                os.write(self._fd, b"V")  # magic close: the driver stops the countdown
            finally:
                os.close(self._fd)
                self._fd = None

    def abandon(self) -> None:
        # Closing without the magic character also leaves it armed on most drivers,
        # but keeping it open leaves no room for doubt.
        pass


class EmulatedWatchdog(Watchdog):
    name = "emulated"

    def __init__(self, socket_path: Path, timeout: int) -> None:
        super().__init__(timeout)
        self.socket_path = socket_path
        self._sock: socket.socket | None = None

    def _send(self, message: bytes) -> None:
        if self._sock is None:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        try:
            self._sock.sendto(message, str(self.socket_path))
        except OSError as e:
            raise WatchdogError(f"emulated watchdog {self.socket_path}: {e}") from e

    def arm(self) -> None:
        self._send(f"arm {self.timeout}".encode())

    def keepalive(self) -> None:
        self._send(b"pet")

    def disarm(self) -> None:
        self._send(b"V")
        if self._sock is not None:
            self._sock.close()
            self._sock = None


class WatchdogService:
    """Pets the watchdog from the event loop until the host is fenced or stops."""

    def __init__(self, watchdog: Watchdog) -> None:
        self.watchdog = watchdog
        # A quarter of the timeout leaves three missed beats of slack for a busy loop.
        self.interval = max(0.5, watchdog.timeout / 4)
        self.armed = False
        self.fenced: str | None = None
        self.keepalives = 0
        self.failures = 0
        self.last_keepalive: float | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def can_reset(self) -> bool:
        """Whether abandoning the watchdog resets this host (not with "none")."""
        return self.watchdog.can_reset

    async def start(self) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self.watchdog.arm)
        if isinstance(self.watchdog, NoWatchdog):
            return
        self.armed = True
        self._pet()
        self._task = background.spawn(self._loop(), name="watchdog")
        log.info("watchdog %s armed: timeout %ds, keepalive every %.1fs",
                 self.watchdog.name, self.watchdog.timeout, self.interval)

    async def _loop(self) -> None:
        while self.fenced is None:
            await asyncio.sleep(self.interval)
            if self.fenced is None:
                self._pet()

    def _pet(self) -> None:
        try:
            self.watchdog.keepalive()
        except (OSError, WatchdogError) as e:
            self.failures += 1
            log.error("watchdog keepalive failed: %s", e)
            return
        self.keepalives += 1
        self.last_keepalive = time.monotonic()

    def stop_petting(self, reason: str) -> None:
        """This host must be reset: stop petting, and never disarm."""
        if self.fenced is not None:
            return
        self.fenced = reason
        self.watchdog.abandon()
        log.critical("stopped petting the %s watchdog: %s; this host will be reset within "
                     "%ds", self.watchdog.name, reason, self.watchdog.timeout)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self.armed and self.fenced is None:
            await asyncio.get_running_loop().run_in_executor(None, self.watchdog.disarm)
            self.armed = False
            log.info("watchdog disarmed")

    def status(self) -> dict[str, Any]:
        since = (None if self.last_keepalive is None
                 else round(time.monotonic() - self.last_keepalive, 1))
        return {"backend": self.watchdog.name, "armed": self.armed,
                "petting": self.armed and self.fenced is None, "timeout": self.watchdog.timeout,
                "interval": self.interval, "keepalives": self.keepalives,
                "failures": self.failures, "lastKeepalive": since, "fenced": self.fenced}


def from_config(backend: str, *, device: Path, socket_path: Path | None,
                timeout: int) -> Watchdog:
    if backend == "device":
        return DeviceWatchdog(device, timeout)
    if backend == "emulated":
        assert socket_path is not None
        return EmulatedWatchdog(socket_path, timeout)
    return NoWatchdog(timeout)
