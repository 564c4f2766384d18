"""A small in-process event bus.

Publishers call `EventBus.publish(name, params)`; each subscriber (one per
WebSocket client) owns a bounded queue. Event names follow VDSM
(``|jobs|status|<id>``, ``|virt|VM_status|<id>``) and every event carries
``notify_time`` in milliseconds of the monotonic clock, as VDSM's do.

A subscriber that stops reading never makes the daemon grow: once its queue is
full, new events for it are dropped and counted (`dropped`), and the
subscriber is told how many it missed by a ``|vdsmlite|events_dropped|`` event as
soon as it drains, so it knows to re-poll state.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("vdsmlite.events")

DROPPED_EVENT = "|vdsmlite|events_dropped|"


@dataclass(frozen=True)
class Event:
    name: str
    params: dict[str, Any]

    def to_notification(self) -> dict[str, Any]:
        return {"jsonrpc": "2.0", "method": self.name, "params": self.params}


class Subscription:
    def __init__(self, bus: EventBus, maxsize: int) -> None:
        self._bus = bus
        self._queue: asyncio.Queue[Event] = asyncio.Queue(maxsize)
        self.dropped = 0

    def _offer(self, event: Event) -> None:
        try:
            self._queue.put_nowait(event)
        except asyncio.QueueFull:
            self.dropped += 1
            self._bus.dropped_total += 1

    async def get(self) -> Event:
        # The events kept are older than the ones dropped, so the notice comes
        # once the kept ones are drained.
        if self.dropped and self._queue.empty():
            missed, self.dropped = self.dropped, 0
            log.warning("subscriber missed %d events (slow consumer)", missed)
            return Event(DROPPED_EVENT, {"count": missed, "notify_time": _now_ms()})
        return await self._queue.get()

    def close(self) -> None:
        self._bus._subscribers.discard(self)

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _now_ms() -> int:
    return int(time.monotonic() * 1000)


class EventBus:
    def __init__(self, queue_size: int = 1000) -> None:
        self._queue_size = queue_size
        self._subscribers: set[Subscription] = set()
        self._listeners: list[Callable[[Event], None]] = []
        self.dropped_total = 0
        self.published_total = 0

    def subscribe(self) -> Subscription:
        sub = Subscription(self, self._queue_size)
        self._subscribers.add(sub)
        return sub

    def add_listener(self, fn: Callable[[Event], None]) -> None:
        """In-process listeners are called synchronously on publish."""
        self._listeners.append(fn)

    @property
    def subscriber_count(self) -> int:
        return len(self._subscribers)

    def publish(self, name: str, params: dict[str, Any]) -> None:
        """Publish from the event loop thread (use `loop.call_soon_threadsafe` elsewhere)."""
        event = Event(name, {**params, "notify_time": _now_ms()})
        self.published_total += 1
        for sub in list(self._subscribers):
            sub._offer(event)
        for fn in self._listeners:
            try:
                fn(event)
            except Exception:
                log.exception("event listener failed for %s", name)
