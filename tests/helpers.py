"""Helpers shared by tests (importable as ``tests.helpers``): calls to a daemon and the
code of their refusals, one polling wait, raw HTTP, and the daemon log check."""

from __future__ import annotations

import asyncio
import http.client
import json
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import pytest

from fake_storage.agent import Agent
from vdsmlite.client import ServerError

T = TypeVar("T")

BLANK_UUID = "00000000-0000-0000-0000-000000000000"


# --- calls and refusals --------------------------------------------------------------


def call(agent: Any, method: str, /, **params: Any) -> Any:
    """One JSON-RPC call over the agent's unix socket."""
    with agent.client() as c:
        return c.call(method, params)


def code_of(target: Any, *args: Any, **params: Any) -> int:
    """The error code of a call that must be refused.

    `code_of(agent, "Verb.name", **params)` calls the verb; `code_of(fn, *args, **kw)`
    calls any function that talks to a daemon (e.g. `dom.create_volume`).
    """
    with pytest.raises(ServerError) as e:
        if callable(target):
            target(*args, **params)
        else:
            call(target, *args, **params)
    return e.value.code


# --- waiting -------------------------------------------------------------------------


def eventually(predicate: Callable[[], T], timeout: float = 30.0, what: str = "a condition",
               interval: float = 0.05) -> T:
    """Poll `predicate` until it returns something true, and return that; fail the test
    after `timeout` seconds. The one wait of the suite: no fixed sleeps."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


# --- daemons -------------------------------------------------------------------------


def check_clean(agent: Agent, since: int = 0) -> None:
    """No unexpected exception in the daemon's log (from byte `since` on)."""
    crashes = agent.crashes(since)
    if crashes:
        # Each crash with what the log says around it: the tail alone may be noise.
        text = agent.log_text()
        excerpts = []
        for line in crashes[:3]:
            at = text.find(line)
            excerpts.append(text[max(0, at - 1500):at + 3000])
        raise AssertionError("daemon logged unexpected exceptions:\n" +
                             "\n-----\n".join(excerpts))


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


def c_and_python(module: Any, attribute: str) -> Any:
    """An autouse fixture running every test of a module twice: with the C module
    `module.<attribute>` (it must have been built: setup.py) and with the Python code
    that replaces it (the attribute set to None). Its value is "c" or "python"."""

    @pytest.fixture(autouse=True, params=["c", "python"])
    def fixture(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
        if request.param == "python":
            monkeypatch.setattr(module, attribute, None)
        else:
            assert getattr(module, attribute) is not None, \
                f"{module.__name__}.{attribute} was not built (setup.py)"
        return str(request.param)

    return fixture
