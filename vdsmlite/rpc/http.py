"""JSON-RPC over HTTP POST and WebSocket, on aiohttp.

* ``POST /jsonrpc``: one message per request; 200 with the reply, 204 when only
  notifications were sent, 413 when the body exceeds ``max_request_size``.
* ``GET /jsonrpc`` (WebSocket upgrade): any number of messages per connection,
  handled concurrently; events from the bus are pushed to the client as
  JSON-RPC notifications on the same socket.

Both speak to the same `Dispatcher`; the HTTP image doors and ``/metrics``
are added to the same application by the daemon.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import weakref

from aiohttp import WSCloseCode, WSMsgType, web

from vdsmlite.events import EventBus
from vdsmlite.rpc.dispatch import CallContext, Dispatcher

log = logging.getLogger("vdsmlite.rpc.transport")

DISPATCHER = web.AppKey("dispatcher", Dispatcher)
EVENTS = web.AppKey("events", EventBus)
WEBSOCKETS = web.AppKey("websockets", weakref.WeakSet[web.WebSocketResponse])
MAX_REQUEST_SIZE = web.AppKey("max_request_size", int)

_FLOW_ID_RE = re.compile(r"^[\w.:@-]{1,64}$")


def _context(request: web.Request, transport: str) -> CallContext:
    peer = request.remote or "unix"
    flow = request.headers.get("X-Request-Id") or request.headers.get("ovirtCorrelationId")
    if flow is not None and not _FLOW_ID_RE.match(flow):
        flow = None  # never put arbitrary client text into every log line
    return CallContext(transport=transport, peer=peer, flow_id=flow)


async def handle_post(request: web.Request) -> web.StreamResponse:
    ctx = _context(request, "http")
    try:
        # request.read() enforces client_max_size and raises 413 beyond it.
        body = await request.read()
    except ConnectionResetError:
        # The client hung up before sending the whole request: nothing ran, nothing to answer.
        log.debug("client %s disconnected before the request body was complete", ctx.peer)
        return web.Response(status=400)
    reply = await request.app[DISPATCHER].handle(body, ctx)
    if reply is None:
        return web.Response(status=204)
    return web.Response(body=reply, content_type="application/json")


async def handle_websocket(request: web.Request) -> web.StreamResponse:
    max_size = request.app[MAX_REQUEST_SIZE]
    ws = web.WebSocketResponse(max_msg_size=max_size, heartbeat=30.0)
    if not ws.can_prepare(request).ok:
        raise web.HTTPBadRequest(text="POST JSON-RPC here, or upgrade to WebSocket\n")
    await ws.prepare(request)
    request.app[WEBSOCKETS].add(ws)
    dispatcher = request.app[DISPATCHER]
    ctx = _context(request, "ws")
    send_lock = asyncio.Lock()
    calls: set[asyncio.Task[None]] = set()

    async def send(data: str) -> None:
        async with send_lock:
            if not ws.closed:
                await ws.send_str(data)

    async def call(data: str | bytes) -> None:
        reply = await dispatcher.handle(data, ctx)
        if reply is not None:
            with contextlib.suppress(ConnectionError, RuntimeError):
                await send(reply.decode())

    async def forward_events() -> None:
        with request.app[EVENTS].subscribe() as sub:
            while True:
                event = await sub.get()
                await send(json.dumps(event.to_notification(), separators=(",", ":")))

    forwarder = asyncio.create_task(forward_events(), name="ws-events")
    try:
        async for msg in ws:
            if msg.type in (WSMsgType.TEXT, WSMsgType.BINARY):
                task = asyncio.create_task(call(msg.data))
                calls.add(task)
                task.add_done_callback(calls.discard)
            elif msg.type == WSMsgType.ERROR:
                log.info("websocket from %s closed with error: %s", ctx.peer, ws.exception())
    finally:
        forwarder.cancel()
        with contextlib.suppress(asyncio.CancelledError, ConnectionError, RuntimeError):
            await forwarder
        # Calls already dispatched run to completion (the dispatcher owns them);
        # their replies have nowhere to go and are dropped.
    return ws


async def close_websockets(app: web.Application) -> None:
    sockets = app[WEBSOCKETS]
    for ws in list(sockets):
        with contextlib.suppress(Exception):
            await ws.close(code=WSCloseCode.GOING_AWAY, message=b"server shutdown")


def add_routes(app: web.Application, dispatcher: Dispatcher, events: EventBus,
               max_request_size: int) -> None:
    app[DISPATCHER] = dispatcher
    app[EVENTS] = events
    app[WEBSOCKETS] = weakref.WeakSet()
    app[MAX_REQUEST_SIZE] = max_request_size
    app.router.add_post("/jsonrpc", handle_post)
    app.router.add_get("/jsonrpc", handle_websocket)
