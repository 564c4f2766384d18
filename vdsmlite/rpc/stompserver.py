"""JSON-RPC over STOMP 1.2: the door VDSM's clients (the engine, vdsm-client) use.

VDSM's ``yajsonrpc/stompserver.py`` is the definition; this follows it:

* ``CONNECT``/``STOMP`` must accept version 1.2, else ``ERROR "Version
  unsupported"``. ``CONNECTED`` carries ``version:1.2`` and ``heart-beat:cy,cx``:
  the client's ``cx,cy`` swapped, non-zero values raised to 1000 ms. The server
  sends a heart-beat (a bare EOL) when it has written nothing for ``cy`` ms and
  drops a client silent for ``cx`` ms plus VDSM's grace (``GRACE_PERIOD_FACTOR``
  = 0.2). Frames before ``CONNECT`` are accepted, as VDSM does (the engine
  subscribes before ``CONNECTED`` arrives).
* ``SUBSCRIBE`` (``destination`` and ``id`` required, ids unique per
  connection) / ``UNSUBSCRIBE``; acks are ``auto``.
* ``SEND`` to a request queue (``jms.topic.vdsm_requests``,
  ``jms.topic.vdsm_irs_requests``, or below one: ``<queue>.<anything>``) is a
  JSON-RPC message for the dispatcher. Its reply goes as ``MESSAGE`` to every
  subscription of the request's ``reply-to`` destination (default
  ``jms.topic.vdsm_responses``), each with its own ``subscription`` id; with no
  subscriber there the reply is dropped with a warning, as VDSM does. Calls
  run concurrently; replies leave in completion order.
* ``SEND`` anywhere also reaches the subscribers of that destination or of a
  dot-parent of it (broker behaviour); a non-request destination without
  subscribers gets ``ERROR "Subscription not available"``.
* Events published on the bus go as JSON-RPC notifications to the
  subscribers of ``jms.queue.events``. A connection whose unsent output
  exceeds `EVENT_BACKLOG` when an event is due is a slow subscriber: it is
  dropped with a log line, never slowing anyone else.
* ``receipt`` on any frame -> ``RECEIPT``; ``DISCONNECT`` closes after it.
* Every frame sent carries ``content-length``.

Protection: the parser's limits (`vdsmlite.rpc.stomp`); a frame left
incomplete for ``stall_timeout`` seconds drops the connection; a SEND body
above ``max_request_size`` is skipped and answered with a JSON-RPC -32600
(not a dropped connection); at most `MAX_IN_FLIGHT` calls per connection run
at once, and reading stops while the client does not read its replies.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import re
from dataclasses import dataclass
from typing import Any

from vdsmlite.events import Event, EventBus
from vdsmlite.rpc import stomp
from vdsmlite.rpc.dispatch import CallContext, Dispatcher
from vdsmlite.rpc.errors import JsonRpcInvalidRequest

log = logging.getLogger("vdsmlite.rpc.stomp")

REQUEST_QUEUES = ("jms.topic.vdsm_requests", "jms.topic.vdsm_irs_requests")
RESPONSE_QUEUE = "jms.topic.vdsm_responses"
EVENT_QUEUE = "jms.queue.events"
GRACE_PERIOD_FACTOR = 0.2
MAX_IN_FLIGHT = 1024
EVENT_BACKLOG = 8 * 1024 * 1024

_FLOW_ID_RE = re.compile(r"^[\w.:@-]{1,64}$")
# The id of a JSON-RPC request, when it is the last member of the top-level object
# (the engine writes it last): found in the kept tail of an oversized body.
_TAIL_ID_RE = re.compile(rb'"id"\s*:\s*("(?:[^"\\]|\\.){0,128}"|-?\d{1,18})\s*\}\s*$')


def _event_name(name: str) -> str:
    """The engine drops events not named ``|namespace|name|id``; VDSM's id-less
    events use ``no_id`` (``|net|host_conn|no_id``)."""
    parts = name.split("|")
    if len(parts) == 3 and parts[0] == "":
        return f"{name}|no_id"
    return name


@dataclass(eq=False)
class Subscription:
    conn: StompConnection
    destination: str
    id: str


class StompServer:
    def __init__(self, dispatcher: Dispatcher, events: EventBus, *, max_request_size: int,
                 stall_timeout: float = 30.0) -> None:
        self.dispatcher = dispatcher
        self.max_request_size = max_request_size
        self.stall_timeout = stall_timeout
        self.connections: set[StompConnection] = set()
        self._subs: dict[str, list[Subscription]] = {}
        self._message_ids = itertools.count(1)
        self._closed = False
        events.add_listener(self._on_event)

    def protocol(self) -> StompConnection:
        return StompConnection(self)

    # --- subscriptions -----------------------------------------------------------------

    def add(self, sub: Subscription) -> None:
        self._subs.setdefault(sub.destination, []).append(sub)

    def remove(self, sub: Subscription) -> None:
        subs = self._subs.get(sub.destination)
        if subs and sub in subs:
            subs.remove(sub)
            if not subs:
                del self._subs[sub.destination]

    def subscribers(self, destination: str) -> list[Subscription]:
        """Subscribers of `destination` or of any dot-parent of it (VDSM's broker)."""
        found: list[Subscription] = []
        parts = destination.split(".")
        for n in range(1, len(parts) + 1):
            found += self._subs.get(".".join(parts[:n]), ())
        return found

    def next_message_id(self) -> str:
        return str(next(self._message_ids))

    # --- outgoing ----------------------------------------------------------------------

    def reply(self, destination: str, body: bytes) -> None:
        subs = self._subs.get(destination)
        if not subs:
            log.warning("reply to a destination nobody subscribes to: %s", destination)
            return
        for sub in list(subs):
            sub.conn.send_frame(stomp.encode("MESSAGE", {
                "destination": destination, "content-type": "application/json",
                "subscription": sub.id, "message-id": self.next_message_id()}, body))

    def _on_event(self, event: Event) -> None:
        if self._closed:
            return
        subs = self._subs.get(EVENT_QUEUE)
        if not subs:
            return
        note = event.to_notification()
        note["method"] = _event_name(event.name)
        body = json.dumps(note, separators=(",", ":")).encode()
        for sub in list(subs):
            sub.conn.send_event(stomp.encode("MESSAGE", {
                "destination": EVENT_QUEUE, "content-type": "application/json",
                "subscription": sub.id, "message-id": self.next_message_id()}, body))

    def close(self) -> None:
        self._closed = True
        for conn in list(self.connections):
            conn.close()


def _is_request_queue(destination: str) -> bool:
    return any(destination == q or destination.startswith(q + ".") for q in REQUEST_QUEUES)


class StompConnection(asyncio.Protocol):
    def __init__(self, server: StompServer) -> None:
        self.server = server
        self.parser = stomp.Parser(max_body=server.max_request_size)
        self.transport: asyncio.Transport | None = None
        self.peer = "unix"
        self.subs: dict[str, Subscription] = {}
        self.calls: set[asyncio.Task[None]] = set()
        self._loop = asyncio.get_running_loop()
        self._send_every = 0.0    # seconds; 0 = no heart-beats
        self._expect_every = 0.0  # seconds, grace included; 0 = not checked
        self._last_in = self._last_out = self._loop.time()
        self._frame_started: float | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._paused: set[str] = set()
        self._closing = False

    # --- asyncio.Protocol --------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple):
            self.peer = f"{peer[0]}:{peer[1]}"
        self.server.connections.add(self)
        self._arm(self.server.stall_timeout)
        log.info("STOMP connection from %s", self.peer)

    def data_received(self, data: bytes) -> None:
        if self._closing:
            return
        now = self._loop.time()
        self._last_in = now
        try:
            frames = self.parser.feed(data)
        except stomp.FrameError as e:
            log.warning("STOMP client %s sent a bad frame: %s", self.peer, e)
            self._error(str(e), close=True)
            return
        for frame in frames:
            if self._closing:
                return
            if isinstance(frame, stomp.Oversized):
                self._oversized(frame)
            else:
                self._handle(frame)
        if self.parser.mid_frame:
            if self._frame_started is None:
                self._frame_started = now
        else:
            self._frame_started = None

    def eof_received(self) -> bool | None:
        return None

    def pause_writing(self) -> None:
        self._pause("writing")

    def resume_writing(self) -> None:
        self._resume("writing")

    def connection_lost(self, exc: Exception | None) -> None:
        self._closing = True
        if self._timer is not None:
            self._timer.cancel()
        for sub in self.subs.values():
            self.server.remove(sub)
        self.subs.clear()
        self.server.connections.discard(self)
        log.info("STOMP connection from %s closed", self.peer)

    # --- output ------------------------------------------------------------------------

    def send_frame(self, data: bytes) -> None:
        if self._closing or self.transport is None:
            return
        self.transport.write(data)
        self._last_out = self._loop.time()

    def send_event(self, data: bytes) -> None:
        if self._closing or self.transport is None:
            return
        if self.transport.get_write_buffer_size() > EVENT_BACKLOG:
            log.warning("dropping STOMP subscriber %s: it does not read its events "
                        "(%d bytes waiting)", self.peer, self.transport.get_write_buffer_size())
            self.abort()
            return
        self.send_frame(data)

    def _error(self, message: str, close: bool = False) -> None:
        # VDSM puts the text in the body; the engine's client reads the header.
        self.send_frame(stomp.encode("ERROR", {"message": message.splitlines()[0][:200],
                                               "content-type": "text/plain"}, message.encode()))
        if close:
            self.close()

    def close(self) -> None:
        """Close after what is already written (replies of calls in flight are dropped)."""
        if not self._closing and self.transport is not None:
            self._closing = True
            self.transport.close()

    def abort(self) -> None:
        self._closing = True
        if self.transport is not None:
            self.transport.abort()

    # --- timers ------------------------------------------------------------------------

    def _arm(self, delay: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self._loop.call_later(max(delay, 0.01), self._tick)

    def _tick(self) -> None:
        self._timer = None
        if self._closing:
            return
        now = self._loop.time()
        reading = not self._paused
        if reading and self._expect_every and now - self._last_in > self._expect_every:
            log.warning("STOMP client %s sent nothing for %.1fs (heart-beat %.1fs + grace): "
                        "disconnecting", self.peer, now - self._last_in,
                        self._expect_every / (1 + GRACE_PERIOD_FACTOR))
            self.abort()
            return
        stall = self.server.stall_timeout
        if reading and self._frame_started is not None and now - self._frame_started > stall:
            log.warning("STOMP client %s left a frame incomplete for %.0fs: disconnecting",
                        self.peer, stall)
            self.abort()
            return
        if self._send_every and now - self._last_out >= self._send_every:
            self.send_frame(stomp.HEARTBEAT)
        deadlines = [now + stall]
        if self._send_every:
            deadlines.append(self._last_out + self._send_every)
        if self._expect_every:
            deadlines.append(self._last_in + self._expect_every)
        if self._frame_started is not None:
            deadlines.append(self._frame_started + stall)
        self._arm(min(deadlines) - now + 0.005)

    def _pause(self, reason: str) -> None:
        if not self._paused and self.transport is not None and not self._closing:
            self.transport.pause_reading()
        self._paused.add(reason)

    def _resume(self, reason: str) -> None:
        self._paused.discard(reason)
        if not self._paused and self.transport is not None and not self._closing:
            self._last_in = self._loop.time()  # not the client's silence: we did not read
            if self._frame_started is not None:
                self._frame_started = self._last_in
            self.transport.resume_reading()

    # --- frames ------------------------------------------------------------------------

    def _handle(self, frame: stomp.Frame) -> None:
        cmd = frame.command
        if cmd in ("CONNECT", "STOMP"):
            if not self._connect(frame):
                return
        elif cmd == "SEND":
            self._send(frame)
        elif cmd == "SUBSCRIBE":
            self._subscribe(frame)
        elif cmd == "UNSUBSCRIBE":
            self._unsubscribe(frame)
        elif cmd == "DISCONNECT":
            receipt = frame.headers.get("receipt")
            if receipt:
                self.send_frame(stomp.encode("RECEIPT", {"receipt-id": receipt}))
            log.info("STOMP client %s disconnected", self.peer)
            self.close()
            return
        elif cmd in ("ACK", "NACK"):
            pass  # every subscription is ack:auto
        else:
            log.warning("STOMP client %s sent unsupported command %s", self.peer, cmd)
            self._error(f"Unknown command {cmd}", close=True)
            return
        receipt = frame.headers.get("receipt")
        if receipt:
            self.send_frame(stomp.encode("RECEIPT", {"receipt-id": receipt}))

    def _connect(self, frame: stomp.Frame) -> bool:
        versions = frame.headers.get("accept-version", "").split(",")
        if "1.2" not in (v.strip() for v in versions):
            log.warning("STOMP client %s refused: accept-version %r", self.peer,
                        frame.headers.get("accept-version"))
            self._error("Version unsupported", close=True)
            return False
        send_ms, expect_ms = stomp.negotiate_heartbeat(frame.headers.get("heart-beat"))
        self.send_frame(stomp.encode("CONNECTED", {
            "version": "1.2", "heart-beat": f"{send_ms},{expect_ms}"}))
        self._send_every = send_ms / 1000
        self._expect_every = expect_ms / 1000 * (1 + GRACE_PERIOD_FACTOR)
        self._last_in = self._loop.time()
        self._tick()
        log.info("STOMP client %s connected (heart-beat %d,%d)", self.peer, send_ms, expect_ms)
        return True

    def _subscribe(self, frame: stomp.Frame) -> None:
        dest = frame.headers.get("destination")
        sub_id = frame.headers.get("id")
        if not dest or not sub_id:
            self._error("Missing destination or subscription id header")
            return
        if sub_id in self.subs:
            self._error("Subscription id already exists")
            return
        sub = Subscription(self, dest, sub_id)
        self.subs[sub_id] = sub
        self.server.add(sub)
        log.debug("STOMP client %s subscribed to %s as %s", self.peer, dest, sub_id)

    def _unsubscribe(self, frame: stomp.Frame) -> None:
        sub_id = frame.headers.get("id")
        if not sub_id:
            self._error("Missing id header")
            return
        sub = self.subs.pop(sub_id, None)
        if sub is None:
            log.debug("STOMP client %s: no subscription %s", self.peer, sub_id)
            return
        self.server.remove(sub)

    def _send(self, frame: stomp.Frame) -> None:
        dest = frame.headers.get("destination")
        if not dest:
            self._error("Missing destination header")
            return
        subs = self.server.subscribers(dest)
        if subs:
            for sub in subs:
                headers = {"subscription": sub.id, "message-id": self.server.next_message_id()}
                headers.update(frame.headers)
                sub.conn.send_frame(stomp.encode("MESSAGE", headers, frame.body))
        if _is_request_queue(dest):
            self._call(frame)
        elif not subs:
            self._error("Subscription not available")

    def _call(self, frame: stomp.Frame) -> None:
        flow = frame.headers.get("ovirtCorrelationId")
        if flow is not None and not _FLOW_ID_RE.match(flow):
            flow = None
        ctx = CallContext(transport="stomp", peer=self.peer, flow_id=flow)
        reply_to = frame.headers.get("reply-to") or RESPONSE_QUEUE
        task = self._loop.create_task(self._run(frame.body, reply_to, ctx))
        self.calls.add(task)
        task.add_done_callback(self._call_done)
        if len(self.calls) >= MAX_IN_FLIGHT:
            self._pause("calls")

    def _call_done(self, task: asyncio.Task[None]) -> None:
        self.calls.discard(task)
        if len(self.calls) < MAX_IN_FLIGHT and "calls" in self._paused:
            self._resume("calls")

    async def _run(self, body: bytes, reply_to: str, ctx: CallContext) -> None:
        reply = await self.server.dispatcher.handle(body, ctx)
        if reply is not None:
            self.server.reply(reply_to, reply)

    def _oversized(self, frame: stomp.Oversized) -> None:
        dest = frame.headers.get("destination", "")
        limit = self.server.max_request_size
        log.warning("STOMP client %s sent a %s frame of %d bytes (limit %d)",
                    self.peer, frame.command, frame.size, limit)
        if frame.command != "SEND" or not _is_request_queue(dest):
            self._error(f"Frame too large: {frame.size} bytes (limit {limit})", close=True)
            return
        msg_id: Any = None
        m = _TAIL_ID_RE.search(frame.tail)
        if m is not None:
            try:
                msg_id = json.loads(m.group(1))
            except ValueError:
                msg_id = None
        err = JsonRpcInvalidRequest(f"request of {frame.size} bytes exceeds the "
                                    f"{limit} bytes limit (max_request_size)")
        reply = {"jsonrpc": "2.0", "id": msg_id, "error": err.to_json()}
        self.server.reply(frame.headers.get("reply-to") or RESPONSE_QUEUE,
                          json.dumps(reply, separators=(",", ":")).encode())
