"""Small synchronous JSON-RPC clients for vdsmlite: HTTP (`Client`) or STOMP
(`StompClient`), over TCP, TLS or a unix socket.

Used by `vdsmlite-client`, the tests and the benchmarks::

    c = Client.unix("/run/vdsmlite/vdsmlite.sock")
    c.call("Host.getDeviceList", {"storageType": 3})
"""

from __future__ import annotations

import gc
import http.client
import itertools
import json
import socket
import ssl
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vdsmlite.rpc import stomp


class ClientError(Exception):
    """Could not talk to the daemon at all (connection, HTTP or protocol failure)."""


class ServerError(Exception):
    """The daemon answered with a JSON-RPC error."""

    def __init__(self, code: int, message: str, data: Any = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.data = data


# Replies above this size are decoded with the cyclic garbage collector paused.
LARGE_REPLY = 1 << 20


def decode_reply(body: bytes) -> Any:
    """A JSON-RPC reply's body as Python objects (ValueError if it is not JSON).

    A large reply (a listing of 10,000 OVF entities is ~10 MiB, ~500,000 objects)
    makes the collector run dozens of times during `json.loads`, each over everything
    just decoded, though nothing in it can be garbage yet: that doubled the decoding
    time, measured. So the collector waits until the reply is whole. The pause is
    process-wide; it is undone only if this call made it, so an application that
    disabled the collector itself keeps it disabled. (orjson decodes no faster
    here, the cost being the Python objects, and it turns integers beyond 64 bits
    into floats, which an OVF's disk size can hold.)"""
    if len(body) < LARGE_REPLY or not gc.isenabled():
        return json.loads(body)
    gc.disable()
    try:
        return json.loads(body)
    finally:
        gc.enable()


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self._path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


@dataclass(frozen=True)
class TlsFiles:
    cert: Path
    key: Path
    ca: Path

    def context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(self.ca))
        ctx.load_cert_chain(str(self.cert), str(self.key))
        return ctx


class Client:
    def __init__(self, conn_factory: Any, describe: str) -> None:
        self._factory = conn_factory
        self._conn: http.client.HTTPConnection | None = None
        self._ids = itertools.count(1)
        self.address = describe

    @classmethod
    def unix(cls, path: str | Path, timeout: float = 60.0) -> Client:
        return cls(lambda: _UnixHTTPConnection(str(path), timeout), f"unix://{path}")

    @classmethod
    def tcp(cls, host: str, port: int, tls: TlsFiles | None = None,
            timeout: float = 60.0) -> Client:
        if tls is None:
            return cls(lambda: http.client.HTTPConnection(host, port, timeout=timeout),
                       f"http://{host}:{port}")
        ctx = tls.context()
        return cls(lambda: http.client.HTTPSConnection(host, port, timeout=timeout, context=ctx),
                   f"https://{host}:{port}")

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def post(self, body: bytes, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
        """POST raw bytes to /jsonrpc; returns (status, body). Reconnects once if idle-closed."""
        hdrs = {"Content-Type": "application/json", **(headers or {})}
        while True:
            # Only a kept-alive connection the server may have closed while idle is
            # retried; a fresh connection failing means the daemon is gone, and a
            # blind resend could run a non-idempotent verb twice.
            reused = self._conn is not None
            if self._conn is None:
                self._conn = self._factory()
            try:
                self._conn.request("POST", "/jsonrpc", body=body, headers=hdrs)
                resp = self._conn.getresponse()
                data = resp.read()
                if resp.will_close:
                    self.close()
                return resp.status, data
            except (ConnectionResetError, BrokenPipeError, http.client.RemoteDisconnected) as e:
                self.close()
                if not reused:
                    raise ClientError(f"{self.address}: {e}") from e
            except (OSError, http.client.HTTPException) as e:
                self.close()
                raise ClientError(f"{self.address}: {e}") from e

    def call(self, method: str, params: dict[str, Any] | list[Any] | None = None,
             headers: dict[str, str] | None = None) -> Any:
        msg: dict[str, Any] = {"jsonrpc": "2.0", "id": next(self._ids), "method": method}
        if params is not None:
            msg["params"] = params
        status, body = self.post(json.dumps(msg).encode(), headers)
        if status != 200:
            raise ClientError(f"{self.address}: HTTP {status}: {body[:200]!r}")
        try:
            reply = decode_reply(body)
        except ValueError as e:
            raise ClientError(f"{self.address}: invalid JSON reply: {e}") from e
        if "error" in reply:
            err = reply["error"]
            raise ServerError(err.get("code", -1), err.get("message", ""), err.get("data"))
        return reply.get("result")


class StompClient:
    """JSON-RPC over STOMP 1.2, as VDSM's own client does it: CONNECT, SUBSCRIBE to a
    private response queue, SEND requests to ``jms.topic.vdsm_requests`` with
    ``reply-to`` that queue. Same `call` interface as `Client`."""

    REQUEST_QUEUE = "jms.topic.vdsm_requests"

    def __init__(self, sock_factory: Any, describe: str, timeout: float = 60.0) -> None:
        self._factory = sock_factory
        self._sock: socket.socket | None = None
        self._parser: Any = None
        self._frames: list[Any] = []
        self._ids = itertools.count(1)
        self._timeout = timeout
        self.response_queue = f"vdsmlite-client.{uuid.uuid4()}"
        self.address = describe

    @classmethod
    def unix(cls, path: str | Path, timeout: float = 60.0) -> StompClient:
        def connect() -> socket.socket:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(timeout)
            try:
                sock.connect(str(path))
            except OSError:
                sock.close()
                raise
            return sock
        return cls(connect, f"stomp+unix://{path}", timeout)

    @classmethod
    def tcp(cls, host: str, port: int, tls: TlsFiles | None = None,
            timeout: float = 60.0) -> StompClient:
        ctx = tls.context() if tls is not None else None

        def connect() -> socket.socket:
            sock = socket.create_connection((host, port), timeout=timeout)
            if ctx is not None:
                try:
                    return ctx.wrap_socket(sock, server_hostname=host)
                except (OSError, ssl.SSLError):
                    sock.close()
                    raise
            return sock
        scheme = "stomp+ssl" if tls else "stomp"
        return cls(connect, f"{scheme}://{host}:{port}", timeout)

    def _connect(self) -> socket.socket:
        try:
            sock = self._factory()
        except OSError as e:
            raise ClientError(f"{self.address}: {e}") from e
        self._sock = sock
        self._parser = stomp.Parser(max_body=1 << 31)
        self._frames = []
        self._send(stomp.encode("CONNECT", {"accept-version": "1.2", "heart-beat": "0,0"}))
        frame = self._read()
        if frame.command != "CONNECTED":
            self.close()
            raise ClientError(f"{self.address}: {frame.command}: {frame.body[:200]!r}")
        self._send(stomp.encode("SUBSCRIBE", {"destination": self.response_queue,
                                              "id": str(uuid.uuid4()), "ack": "auto"}))
        return sock

    def _send(self, data: bytes) -> None:
        assert self._sock is not None
        try:
            self._sock.sendall(data)
        except OSError as e:
            self.close()
            raise ClientError(f"{self.address}: {e}") from e

    def _read(self) -> Any:
        while not self._frames:
            assert self._sock is not None
            try:
                data = self._sock.recv(65536)
            except OSError as e:
                self.close()
                raise ClientError(f"{self.address}: {e}") from e
            if not data:
                self.close()
                raise ClientError(f"{self.address}: connection closed by the daemon")
            self._frames += self._parser.feed(data)
        return self._frames.pop(0)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> StompClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def call(self, method: str, params: dict[str, Any] | list[Any] | None = None,
             headers: dict[str, str] | None = None) -> Any:
        if self._sock is None:
            self._connect()
        msg_id = f"{next(self._ids)}"
        msg: dict[str, Any] = {"jsonrpc": "2.0", "id": msg_id, "method": method}
        if params is not None:
            msg["params"] = params
        self._send(stomp.encode("SEND", {
            "destination": self.REQUEST_QUEUE, "reply-to": self.response_queue,
            "content-type": "application/json", **(headers or {})},
            json.dumps(msg).encode()))
        while True:
            frame = self._read()
            if frame.command == "ERROR":
                raise ClientError(f"{self.address}: ERROR: {frame.body[:200]!r}")
            if frame.command != "MESSAGE":
                continue
            try:
                reply = decode_reply(frame.body)
            except ValueError as e:
                raise ClientError(f"{self.address}: invalid JSON reply: {e}") from e
            if not isinstance(reply, dict) or reply.get("id") != msg_id:
                continue  # not ours (e.g. an event)
            if "error" in reply:
                err = reply["error"]
                raise ServerError(err.get("code", -1), err.get("message", ""), err.get("data"))
            return reply.get("result")
