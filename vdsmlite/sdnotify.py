"""systemd notification protocol (sd_notify(3)), without libsystemd.

One datagram per message to ``$NOTIFY_SOCKET`` (a leading ``@`` is an abstract
socket). Everything is a no-op when the variable is unset, so the daemon runs
the same under systemd, in a terminal and in tests. The watchdog keepalive is
sent from a task on the event loop: if the loop stalls, the pings stop and
systemd restarts the service - which is the point.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket

log = logging.getLogger("vdsmlite.sdnotify")


class Notifier:
    def __init__(self, address: str | None = None) -> None:
        address = address if address is not None else os.environ.get("NOTIFY_SOCKET")
        self._address: str | None = None
        self._sock: socket.socket | None = None
        if address:
            self._address = "\0" + address[1:] if address.startswith("@") else address
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self._watchdog: asyncio.Task[None] | None = None

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def notify(self, *fields: str) -> None:
        if self._sock is None or self._address is None:
            return
        try:
            self._sock.sendto("\n".join(fields).encode(), self._address)
        except OSError as e:
            # systemd gone or socket full: never let notification break the daemon.
            log.warning("sd_notify %s failed: %s", fields, e)

    def ready(self, status: str, *extra: str) -> None:
        """READY=1; `extra` fields ride in the same datagram (systemd ignores unknown keys)."""
        self.notify("READY=1", f"STATUS={status}", f"MAINPID={os.getpid()}", *extra)

    def status(self, status: str) -> None:
        self.notify(f"STATUS={status}")

    def stopping(self, status: str = "Shutting down") -> None:
        self.notify("STOPPING=1", f"STATUS={status}")

    def start_watchdog(self) -> None:
        """Ping at half of ``WATCHDOG_USEC`` when systemd asked for a watchdog."""
        usec = watchdog_usec()
        if not self.enabled or usec is None:
            return
        interval = usec / 2 / 1_000_000
        log.info("systemd watchdog: pinging every %.1fs", interval)
        self._watchdog = asyncio.create_task(self._pet(interval), name="sd-watchdog")

    async def _pet(self, interval: float) -> None:
        while True:
            self.notify("WATCHDOG=1")
            await asyncio.sleep(interval)

    async def close(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watchdog
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def watchdog_usec() -> int | None:
    """The watchdog interval systemd set for *this* process, if any."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec:
        return None
    if pid and pid != str(os.getpid()):
        return None
    try:
        value = int(usec)
    except ValueError:
        return None
    return value if value > 0 else None
