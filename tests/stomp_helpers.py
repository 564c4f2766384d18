"""The tests' own STOMP 1.2 client, written from the spec (raw sockets, its own frame
reader), so the daemon's parser is not checked against itself: frames to send, JSON-RPC
requests for their bodies, and a connection that reads frames back."""

from __future__ import annotations

import json
import socket
import uuid
from typing import Any

from fake_storage.agent import Agent

REQUESTS = "jms.topic.vdsm_requests"


class Frame:
    def __init__(self, command: str, headers: dict[str, str], body: bytes) -> None:
        self.command, self.headers, self.body = command, headers, body

    def json(self) -> Any:
        return json.loads(self.body)

    def __repr__(self) -> str:
        return f"<{self.command} {self.headers} {self.body[:100]!r}>"


def frame(command: str, headers: dict[str, str] | None = None, body: bytes = b"",
          length: bool = True) -> bytes:
    lines = [command] + [f"{k}:{v}" for k, v in (headers or {}).items()]
    if length:
        lines.append(f"content-length:{len(body)}")
    return ("\n".join(lines) + "\n\n").encode() + body + b"\0"


def request(method: str, params: dict[str, Any] | None = None, msg_id: Any = None) -> bytes:
    msg: dict[str, Any] = {"jsonrpc": "2.0", "method": method,
                           "id": msg_id if msg_id is not None else str(uuid.uuid4())}
    if params is not None:
        msg["params"] = params
    return json.dumps(msg).encode()


class Conn:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.sock.settimeout(30)
        self.buf = b""
        self.heartbeats = 0

    @classmethod
    def tcp(cls, agent: Agent) -> Conn:
        assert agent.tcp_address is not None
        return cls(socket.create_connection(agent.tcp_address))

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self) -> None:
        data = self.sock.recv(65536)
        if not data:
            raise EOFError("closed by the daemon")
        self.buf += data

    def read(self) -> Frame:
        while True:
            while self.buf[:1] in (b"\n", b"\r"):
                self.heartbeats += self.buf[:1] == b"\n"
                self.buf = self.buf[1:]
            end = self.buf.find(b"\n\n")
            if end < 0:
                self._fill()
                continue
            head = self.buf[:end].decode().split("\n")
            headers: dict[str, str] = {}
            for line in head[1:]:
                k, _, v = line.partition(":")
                headers.setdefault(k, v.replace("\\c", ":").replace("\\n", "\n")
                                   .replace("\\r", "\r").replace("\\\\", "\\"))
            assert "content-length" in headers, f"frame without content-length: {head}"
            n = int(headers["content-length"])
            while len(self.buf) < end + 2 + n + 1:
                self._fill()
            body = self.buf[end + 2:end + 2 + n]
            assert self.buf[end + 2 + n] == 0
            self.buf = self.buf[end + 3 + n:]
            return Frame(head[0], headers, body)

    def connect(self, heart_beat: str = "0,0", **extra: str) -> Frame:
        self.send(frame("CONNECT", {"accept-version": "1.2", "heart-beat": heart_beat, **extra}))
        return self.read()

    def subscribe(self, destination: str, sub_id: str) -> None:
        self.send(frame("SUBSCRIBE", {"destination": destination, "id": sub_id, "ack": "auto"}))

    def call(self, method: str, params: dict[str, Any] | None = None,
             reply_to: str = "replies") -> Any:
        self.send(frame("SEND", {"destination": REQUESTS, "reply-to": reply_to,
                                 "content-type": "application/json"}, request(method, params)))
        while True:
            f = self.read()
            assert f.command == "MESSAGE", f
            reply = f.json()
            if "id" in reply:
                return reply

    def closed(self, timeout: float = 10.0) -> bool:
        """True once the daemon closed the connection (frames before that are skipped)."""
        self.sock.settimeout(timeout)
        try:
            while True:
                self.read()
        except EOFError:
            return True
        except (ConnectionResetError, BrokenPipeError):
            return True

    def close(self) -> None:
        self.sock.close()
