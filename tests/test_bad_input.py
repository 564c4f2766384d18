"""Hostile and broken clients: the daemon keeps serving, and says what was wrong."""

from __future__ import annotations

import asyncio
import json
import socket
from typing import Any

import aiohttp

from fake_storage.agent import Agent
from tests.helpers import RawHttp, run

MiB = 1024 * 1024


def assert_serving(agent: Agent) -> None:
    with agent.client() as c:
        assert c.call("Host.ping2") is True


def test_oversize_request_gets_413(agent_factory: Any) -> None:
    a = agent_factory(config={"rpc": {"max_request_size": 64 * 1024}})
    raw = RawHttp(a)
    big = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "Host.ping2",
                      "params": {"pad": "x" * (70 * 1024)}}).encode()
    status, _, _ = raw.request("POST", "/jsonrpc", big)
    assert status == 413
    ok = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "Host.ping2",
                     "params": {"pad": "x" * (60 * 1024)}}).encode()
    assert raw.request("POST", "/jsonrpc", ok)[0] == 200
    assert_serving(a)


def test_default_limit_is_16_mib(shared_agent: Agent) -> None:
    raw = RawHttp(shared_agent)
    status, _, _ = raw.request("POST", "/jsonrpc", b" " * (16 * MiB + 1))
    assert status == 413
    assert_serving(shared_agent)


def test_oversize_websocket_message_closes_with_1009(agent_factory: Any) -> None:
    a = agent_factory(config={"rpc": {"max_request_size": 64 * 1024}})
    assert a.url is not None

    async def main() -> None:
        async with aiohttp.ClientSession() as s, s.ws_connect(a.url + "/jsonrpc") as ws:
            await ws.send_str("x" * (65 * 1024))
            msg = await asyncio.wait_for(ws.receive(), 30)
            assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED,
                                aiohttp.WSMsgType.CLOSING)
            assert ws.close_code == 1009
    run(main())
    assert_serving(a)


def test_client_disconnects_mid_call(shared_agent: Agent) -> None:
    """The client sends a batch of slow-ish calls and hangs up before the reply."""
    assert shared_agent.tcp_address is not None
    body = json.dumps([{"jsonrpc": "2.0", "id": i, "method": "Host.getCapabilities"}
                       for i in range(100)]).encode()
    for _ in range(5):
        s = socket.create_connection(shared_agent.tcp_address)
        s.sendall(b"POST /jsonrpc HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        s.close()
    assert_serving(shared_agent)


def test_client_disconnects_mid_body(shared_agent: Agent) -> None:
    assert shared_agent.tcp_address is not None
    s = socket.create_connection(shared_agent.tcp_address)
    s.sendall(b"POST /jsonrpc HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n{\"json")
    s.close()
    assert_serving(shared_agent)


def test_garbage_on_the_port(shared_agent: Agent) -> None:
    assert shared_agent.tcp_address is not None
    for junk in (b"\x16\x03\x01\x02\x00" + bytes(range(256)) * 4,  # TLS hello on plain port
                 b"HELLO\r\n\r\n", b"\x00" * 10000, b"GET / HTTP/9.9\r\n\r\n"):
        s = socket.create_connection(shared_agent.tcp_address, timeout=10)
        s.sendall(junk)
        try:
            s.recv(4096)  # a 400 or a close, either is fine
        except OSError:
            pass
        s.close()
    assert_serving(shared_agent)


def test_wrong_types_everywhere(raw: RawHttp) -> None:
    cases = [
        {"jsonrpc": "2.0", "id": 1, "method": "Host.getJobs", "params": {"job_ids": "abc"}},
        {"jsonrpc": "2.0", "id": 1, "method": "Host.getJobs", "params": {"job_ids": [1, 2]}},
        {"jsonrpc": "2.0", "id": 1, "method": "Host.getJobs", "params": {"job_type": 3}},
        {"jsonrpc": "2.0", "id": 1, "method": "Task.clear", "params": {"taskID": ["x"]}},
        {"jsonrpc": "2.0", "id": 1, "method": "Task.stop", "params": {"taskID": {"a": 1}}},
    ]
    for msg in cases:
        status, reply = raw.rpc(msg)
        assert status == 200
        assert reply["error"]["code"] == -32602, msg


def test_flood_of_concurrent_calls(shared_agent: Agent) -> None:
    """Thousands of concurrent calls over many connections: all answered, still serving."""
    assert shared_agent.url is not None
    url = shared_agent.url + "/jsonrpc"

    async def http_caller(s: aiohttp.ClientSession, i: int) -> bool:
        async with s.post(url, json={"jsonrpc": "2.0", "id": i, "method": "Host.ping2"}) as r:
            return (await r.json())["result"]

    async def ws_caller(s: aiohttp.ClientSession) -> int:
        async with s.ws_connect(url) as ws:
            for i in range(100):
                await ws.send_str(json.dumps({"jsonrpc": "2.0", "id": i, "method": "Host.ping2"}))
            got = 0
            while got < 100:
                msg = await asyncio.wait_for(ws.receive(), 60)
                got += json.loads(msg.data)["result"] is True
            return got

    async def main() -> None:
        conn = aiohttp.TCPConnector(limit=200)
        async with aiohttp.ClientSession(connector=conn) as s:
            results = await asyncio.gather(
                *(http_caller(s, i) for i in range(3000)),
                *(ws_caller(s) for _ in range(20)))
        assert all(r is True for r in results[:3000])
        assert results[3000:] == [100] * 20
    run(main())
    assert_serving(shared_agent)
