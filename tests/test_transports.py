"""The doors: HTTP POST, WebSocket, the unix socket, TLS with client certificates."""

from __future__ import annotations

import asyncio
import http.client
import json
import ssl
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from fake_storage.agent import Agent
from tests.helpers import RawHttp, run
from tests.tls_helpers import make_ca, make_cert
from vdsmlite import config
from vdsmlite.client import Client, ClientError, TlsFiles
from vdsmlite.daemon import build_app
from vdsmlite.jobs import Job
from vdsmlite.services import Services


def test_unix_socket_and_tcp_reach_the_same_daemon(shared_agent: Agent) -> None:
    with shared_agent.client() as unix, shared_agent.tcp_client() as tcp:
        assert unix.call("Host.ping2") is True
        assert tcp.call("Host.ping2") is True
        assert unix.call("Host.getCapabilities")["uuid"] == \
            tcp.call("Host.getCapabilities")["uuid"]
        # keep-alive: many calls over one connection
        for _ in range(50):
            assert unix.call("Host.ping2") is True
    assert shared_agent.unix_socket.stat().st_mode & 0o777 == 0o660


def test_get_without_upgrade_explains(raw: RawHttp) -> None:
    status, _, body = raw.request("GET", "/jsonrpc")
    assert status == 400
    assert b"WebSocket" in body


def test_unknown_paths_are_404(raw: RawHttp) -> None:
    assert raw.request("GET", "/nope")[0] == 404
    assert raw.request("POST", "/")[0] in (404, 405)


async def _ws_exchange(url: str, messages: list[Any]) -> list[Any]:
    async with aiohttp.ClientSession() as s, s.ws_connect(url + "/jsonrpc") as ws:
        for m in messages:
            await ws.send_str(json.dumps(m))
        expected = sum(1 for m in messages if not (isinstance(m, dict) and "id" not in m))
        out = []
        while len(out) < expected:
            msg = await asyncio.wait_for(ws.receive(), 30)
            assert msg.type == aiohttp.WSMsgType.TEXT
            out.append(json.loads(msg.data))
        return out


def test_websocket_requests_batches_and_notifications(shared_agent: Agent) -> None:
    assert shared_agent.url is not None
    task = str(uuid.uuid4())
    replies = run(_ws_exchange(shared_agent.url, [
        {"jsonrpc": "2.0", "id": 1, "method": "Host.ping2"},
        {"jsonrpc": "2.0", "method": "Host.ping2"},  # notification: nothing comes back
        [{"jsonrpc": "2.0", "id": 2, "method": "Host.ping2"},
         {"jsonrpc": "2.0", "id": 3, "method": "Task.getStatus", "params": {"taskID": task}}],
        {"jsonrpc": "2.0", "id": 4, "method": "Host.nope"},
    ]))
    flat = {}
    for r in replies:
        for item in r if isinstance(r, list) else [r]:
            flat[item["id"]] = item
    assert flat[1]["result"] is True
    assert flat[2]["result"] is True
    assert flat[3]["error"]["code"] == 401
    assert flat[4]["error"]["code"] == -32601


def test_websocket_handles_many_calls_concurrently(shared_agent: Agent) -> None:
    assert shared_agent.url is not None
    msgs = [{"jsonrpc": "2.0", "id": i, "method": "Host.getStats"} for i in range(300)]
    replies = run(_ws_exchange(shared_agent.url, msgs))
    assert sorted(r["id"] for r in replies) == list(range(300))


def test_websocket_parse_error_keeps_the_socket(shared_agent: Agent) -> None:
    assert shared_agent.url is not None

    async def main() -> None:
        async with aiohttp.ClientSession() as s, s.ws_connect(shared_agent.url + "/jsonrpc") as ws:
            await ws.send_str("{nope")
            reply = json.loads((await ws.receive()).data)
            assert reply["error"]["code"] == -32700
            await ws.send_bytes(b'{"jsonrpc":"2.0","id":5,"method":"Host.ping2"}')
            reply = json.loads((await ws.receive()).data)
            assert reply == {"jsonrpc": "2.0", "id": 5, "result": True}
    run(main())


def test_job_events_are_pushed_over_websocket(tmp_path: Path) -> None:
    """A job's status changes reach a WebSocket client as |jobs|status|<id> notifications.

    In-process daemon wiring (the same build_app the daemon uses) on a real socket,
    so the test can start a job directly.
    """
    async def main() -> None:
        cfg = config.load(None, overrides={"daemon": {"state_dir": str(tmp_path / "s")}})
        services = Services(cfg)
        app, dispatcher = build_app(services)
        dispatcher.serve()
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        try:
            async with aiohttp.ClientSession() as s, \
                    s.ws_connect(f"http://127.0.0.1:{port}/jsonrpc") as ws:
                await ws.send_str(json.dumps({"jsonrpc": "2.0", "id": 1, "method": "Host.ping2"}))
                assert json.loads((await ws.receive()).data)["result"] is True

                async def body(job: Job) -> None:
                    job.update(progress=50)
                    await asyncio.sleep(0.05)

                job = await services.jobs.start(body, description="demo", verb="Test.demo")
                statuses = []
                while not statuses or statuses[-1] != "done":
                    note = json.loads((await asyncio.wait_for(ws.receive(), 10)).data)
                    assert "id" not in note
                    assert note["method"] == f"|jobs|status|{job.id}"
                    assert isinstance(note["params"]["notify_time"], int)
                    statuses.append(note["params"]["status"])
                assert statuses == ["pending", "running", "done"]
                # The same job answers the task vocabulary over JSON-RPC.
                await ws.send_str(json.dumps({"jsonrpc": "2.0", "id": 2, "method": "Task.getStatus",
                                              "params": {"taskID": job.id}}))
                reply = json.loads((await ws.receive()).data)
                assert reply["result"]["taskResult"] == "success"
                await ws.send_str(json.dumps({"jsonrpc": "2.0", "id": 3, "method": "Host.getJobs"}))
                reply = json.loads((await ws.receive()).data)
                assert reply["result"][job.id]["status"] == "done"
                await ws.send_str(json.dumps({"jsonrpc": "2.0", "id": 4, "method": "Task.clear",
                                              "params": {"taskID": job.id}}))
                assert json.loads((await ws.receive()).data)["result"] is True
                assert services.jobs.find(job.id) is None
        finally:
            await runner.cleanup()
            await services.close()
    run(main())


def test_metrics(shared_agent: Agent, raw: RawHttp) -> None:
    with shared_agent.client() as c:
        c.call("Host.ping2")
        with pytest.raises(Exception):  # noqa: B017 - any error; we count it below
            c.call("Task.getStatus", {"taskID": str(uuid.uuid4())})
    raw.rpc({"jsonrpc": "2.0", "id": 1, "method": "Task.getStatus", "params": {"taskID": "x"}})
    raw.rpc(b"{")
    status, headers, body = raw.request("GET", "/metrics")
    assert status == 200
    assert headers["content-type"].startswith("text/plain")
    assert "version=" in headers["content-type"]
    text = body.decode()
    assert 'vdsmlite_rpc_calls_total{outcome="success",verb="Host.ping2"}' in text
    assert 'vdsmlite_rpc_calls_total{outcome="error",verb="Task.getStatus"}' in text
    assert 'vdsmlite_rpc_calls_total{outcome="invalid_params",verb="Task.getStatus"}' in text
    assert 'vdsmlite_rpc_requests_rejected_total{reason="parse_error"}' in text
    assert 'vdsmlite_rpc_call_duration_seconds_bucket{le="0.001",verb="Host.ping2"}' in text
    assert "vdsmlite_rpc_calls_in_flight 0.0" in text
    assert 'vdsmlite_jobs{state="running"} 0.0' in text
    assert "_created" not in text


# --- TLS -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("pki")
    make_ca(d, "ca")
    make_cert(d, "ca", "server", "IP:127.0.0.1,DNS:localhost")
    make_cert(d, "ca", "engine", "DNS:engine")
    make_ca(d, "rogue-ca")
    make_cert(d, "rogue-ca", "rogue", "DNS:rogue")
    return d


@pytest.fixture
def tls_agent(agent_factory: Any, pki: Path) -> Iterator[Agent]:
    yield agent_factory(config={"rpc": {
        "tls_cert": str(pki / "server.pem"), "tls_key": str(pki / "server.key"),
        "tls_ca": str(pki / "ca.pem")}})


def test_tls_with_client_certificate(tls_agent: Agent, pki: Path) -> None:
    assert tls_agent.url is not None and tls_agent.url.startswith("https://")
    files = TlsFiles(pki / "engine.pem", pki / "engine.key", pki / "ca.pem")
    with tls_agent.tcp_client(tls=files) as c:
        assert c.call("Host.ping2") is True


def test_tls_refuses_clients_without_a_trusted_certificate(tls_agent: Agent, pki: Path) -> None:
    assert tls_agent.tcp_address is not None
    host, port = tls_agent.tcp_address
    # No client certificate at all.
    ctx = ssl.create_default_context(cafile=str(pki / "ca.pem"))
    no_cert = Client(lambda: http.client.HTTPSConnection(host, port, timeout=10, context=ctx),
                     "no-cert")
    with pytest.raises(ClientError):
        no_cert.call("Host.ping2")
    # A certificate from a CA the daemon does not trust.
    rogue = TlsFiles(pki / "rogue.pem", pki / "rogue.key", pki / "ca.pem")
    with pytest.raises(ClientError):
        Client.tcp(host, port, tls=rogue, timeout=10).call("Host.ping2")
    # Plain HTTP on the TLS port.
    with pytest.raises(ClientError):
        Client.tcp(host, port, timeout=10).call("Host.ping2")
    # The unix socket stays available to local root without certificates.
    with tls_agent.client() as c:
        assert c.call("Host.ping2") is True


def test_tls_listens_off_loopback(agent_factory: Any, pki: Path) -> None:
    a = agent_factory(config={"rpc": {
        "listen": "0.0.0.0", "tls_cert": str(pki / "server.pem"),
        "tls_key": str(pki / "server.key"), "tls_ca": str(pki / "ca.pem")}})
    assert a.url is not None and a.url.startswith("https://0.0.0.0:")


def test_plain_off_loopback_needs_explicit_insecure(agent_factory: Any) -> None:
    a = agent_factory(config={"rpc": {"listen": "0.0.0.0", "insecure": True}})
    assert a.url is not None and a.url.startswith("http://0.0.0.0:")


def test_upload_door_over_tls(tls_agent: Agent, pki: Path) -> None:
    # The upload server reads bodies through asyncio's TLS layer into its own buffers;
    # a body it refuses unread is drained (TLS cannot half-close) and answered.
    assert tls_agent.tcp_address is not None
    host, port = tls_agent.tcp_address
    ctx = ssl.create_default_context(cafile=str(pki / "ca.pem"))
    ctx.load_cert_chain(str(pki / "engine.pem"), str(pki / "engine.key"))
    for path, status, code in ((f"/ovfstore/{uuid.uuid4()}", 404, 358),
                               ("/ovfstore/not-a-uuid", 400, 1000)):
        conn = http.client.HTTPSConnection(host, port, timeout=30, context=ctx)
        try:
            conn.request("PUT", path, body=b"\0" * (1 << 20))
            resp = conn.getresponse()
            assert resp.status == status
            assert resp.getheader("Content-Type") == "application/json"
            assert json.loads(resp.read())["error"]["code"] == code
        finally:
            conn.close()
