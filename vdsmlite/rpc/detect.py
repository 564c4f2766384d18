"""One port, two protocols: pick STOMP or HTTP from a connection's first bytes.

As VDSM's ``protocoldetector`` does (after TLS, when TLS is on), but reading
no further than needed: bytes are looked at as they arrive and the decision
is taken as soon as they can only begin one thing:

* a STOMP command followed by an end of line (``CONNECT\\n``, ``SEND\\r\\n``...)
  -> the STOMP server;
* ``PUT `` -> the upload doors' own server (`http.putserver`: bodies go
  straight into the volume's write buffers), when one is given;
* another HTTP method followed by a space (``POST /``, ``GET /``, ``CONNECT
  host``...) -> aiohttp's own protocol, unchanged;
* anything that cannot begin either -> a log line and the connection closed.

The chosen protocol takes over the transport (`transport.set_protocol`) and
gets the bytes read so far through `data_received` (a `BufferedProtocol` such
as the upload server's too, once, before reading into its own buffers), so it sees the stream
exactly as if it had owned the connection from the start. A client that sends
nothing decisive within `timeout` seconds is closed.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from vdsmlite.rpc.stomp import CLIENT_COMMANDS

log = logging.getLogger("vdsmlite.rpc.detect")

HTTP_METHODS = ("GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH", "TRACE", "CONNECT")

_STOMP = tuple(c.encode() + eol for c in CLIENT_COMMANDS for eol in (b"\n", b"\r\n"))
_HTTP = tuple(m.encode() + b" " for m in HTTP_METHODS)
_PREFIXES = _STOMP + _HTTP
_LONGEST = max(len(p) for p in _PREFIXES)

STOMP = "stomp"
HTTP = "http"
PUT = "put"


def classify(data: bytes) -> str | None:
    """STOMP, PUT, HTTP, "" (neither, ever) or None (need more bytes)."""
    if data.startswith(_STOMP):
        return STOMP
    if data.startswith(b"PUT "):
        return PUT
    if data.startswith(_HTTP):
        return HTTP
    head = data[:_LONGEST]
    if any(p.startswith(head) for p in _PREFIXES):
        return None
    return ""


ProtocolFactory = Callable[[], asyncio.BaseProtocol]


class DetectingProtocol(asyncio.Protocol):
    """Buffers the first bytes, then hands the transport to the protocol they name."""

    def __init__(self, http: ProtocolFactory, stomp: ProtocolFactory, timeout: float,
                 put: ProtocolFactory | None = None) -> None:
        self._factories = {HTTP: http, STOMP: stomp, PUT: put or http}
        self._timeout = timeout
        self._buf = b""
        self._transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        self._timer = asyncio.get_running_loop().call_later(self._timeout, self._give_up)

    def _peer(self) -> str:
        assert self._transport is not None
        peer = self._transport.get_extra_info("peername")
        return f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else "unix"

    def _give_up(self) -> None:
        if self._transport is not None and not self._transport.is_closing():
            log.info("closing connection from %s: no request within %.0fs",
                     self._peer(), self._timeout)
            self._transport.abort()

    def data_received(self, data: bytes) -> None:
        transport = self._transport
        assert transport is not None
        self._buf += data
        kind = classify(self._buf)
        if kind is None:
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not kind:
            log.warning("closing connection from %s: unrecognized protocol: %r",
                        self._peer(), self._buf[:_LONGEST])
            transport.abort()
            return
        log.debug("detected %s from %s", kind, self._peer())
        proto = self._factories[kind]()
        transport.set_protocol(proto)
        proto.connection_made(transport)
        buffered, self._buf = self._buf, b""
        if not transport.is_closing():
            proto.data_received(buffered)  # type: ignore[attr-defined]

    def eof_received(self) -> bool | None:
        return None  # close

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._transport = None
