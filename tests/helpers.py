"""Helpers shared by tests (importable as ``tests.helpers``)."""

from __future__ import annotations

import asyncio
import http.client
import json
import socket
import subprocess
import sys
from collections.abc import Coroutine
from typing import Any, TypeVar

from fake_storage.agent import Agent

T = TypeVar("T")

BLANK_UUID = "00000000-0000-0000-0000-000000000000"


class RawHttp:
    """Plain HTTP/1.1 to the daemon, for protocol tests that need raw bytes and status codes."""

    def __init__(self, agent: Agent) -> None:
        assert agent.tcp_address is not None
        self.host, self.port = agent.tcp_address

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=60)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            resp = conn.getresponse()
            return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
        finally:
            conn.close()

    def rpc(self, payload: Any) -> tuple[int, Any]:
        """POST a JSON value (or raw bytes) to /jsonrpc; returns (status, parsed body or None)."""
        body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        status, _, data = self.request("POST", "/jsonrpc", body,
                                       {"Content-Type": "application/json"})
        return status, json.loads(data) if data else None



def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine to completion from a synchronous test."""
    return asyncio.run(coro)


def output_of_a_killed_runner(script: str) -> str:
    """Run `script` in a fresh Python that SIGKILLs itself at the end (no atexit, no
    finally, no fixture teardown: a CI timeout), and return what it printed."""
    script += "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)\n"
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert out.returncode == -9, out.stderr
    return out.stdout
