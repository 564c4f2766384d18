"""Daemon process lifecycle: readiness, sd_notify, watchdog, signals, restarts."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from fake_storage.agent import Agent
from tests.helpers import RawHttp, eventually, run


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_clean_shutdown_on_signal(agent: Agent, sig: int) -> None:
    ready = agent.notify.wait_for("READY", "1")  # type: ignore[union-attr]
    assert ready["STATUS"].startswith("Serving on http://127.0.0.1:")
    assert ready["MAINPID"] == str(agent.pid)
    assert agent.unix_socket.exists()
    agent.signal(sig)
    assert agent.wait(30) == 0
    agent.stop()
    assert any(m.get("STOPPING") == "1" for m in agent.notifications)
    assert not agent.unix_socket.exists()
    log = agent.log_text()
    assert f"received {signal.Signals(sig).name}, shutting down" in log
    assert "vdsmlite stopped" in log
    assert "Task was destroyed but it is pending" not in log


def test_shutdown_with_open_connections(agent: Agent) -> None:
    """Idle keep-alive and WebSocket clients do not hold the daemon up, nor leak tasks."""
    assert agent.url is not None

    async def main() -> float:
        async with aiohttp.ClientSession() as s, s.ws_connect(agent.url + "/jsonrpc") as ws:
            async with s.post(agent.url + "/jsonrpc",
                              json={"jsonrpc": "2.0", "id": 1, "method": "Host.ping2"}) as r:
                assert (await r.json())["result"] is True
            start = time.monotonic()
            agent.signal(signal.SIGTERM)
            msg = await asyncio.wait_for(ws.receive(), 30)
            assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
            assert ws.close_code == 1001  # going away
            return time.monotonic() - start

    elapsed = run(main())
    assert agent.wait(30) == 0
    assert elapsed < 5  # no call was in flight: nothing to wait for
    assert "Task was destroyed but it is pending" not in agent.log_text()


def test_systemd_watchdog_pings(agent_factory: Any) -> None:
    a = agent_factory(env={"WATCHDOG_USEC": "200000"})
    start = time.monotonic()
    # Every 0.1 s (half the interval systemd was given): 4 pings well within a second.
    eventually(lambda: len([m for m in a.notifications if m.get("WATCHDOG") == "1"]) >= 4,
               5, "4 watchdog pings")
    assert time.monotonic() - start < 1.0
    assert "systemd watchdog: pinging every 0.1s" in a.log_text()


def test_watchdog_for_another_pid_is_ignored(agent_factory: Any) -> None:
    a = agent_factory(env={"WATCHDOG_USEC": "200000", "WATCHDOG_PID": "1"})
    time.sleep(0.5)
    assert not [m for m in a.notifications if m.get("WATCHDOG") == "1"]


def test_host_uuid_survives_restart(tmp_path: Path) -> None:
    a = Agent(tmp_path / "a").start()
    with a.client() as c:
        first = c.call("Host.getCapabilities")["uuid"]
    assert a.stop() == 0
    a.start()
    try:
        with a.client() as c:
            assert c.call("Host.getCapabilities")["uuid"] == first
    finally:
        a.stop()


def test_configured_host_uuid_wins(agent_factory: Any) -> None:
    wanted = "5890a292-0390-01d2-01ed-00000000029a"
    a = agent_factory(config={"daemon": {"host_uuid": wanted.upper()}})
    with a.client() as c:
        assert c.call("Host.getCapabilities")["uuid"] == wanted


def test_request_id_in_logs(agent: Agent) -> None:
    with agent.client() as c:
        c.call("Host.ping2", headers={"X-Request-Id": "flow-1234"})
        c.call("Host.getStats", headers={"X-Request-Id": "bad id with spaces"})
    log = agent.log_text()
    assert "[req=flow-1234] Host.ping2 success" in log
    assert "bad id with spaces" not in log  # untrusted text never reaches the log


def test_json_log_format(agent_factory: Any) -> None:
    a = agent_factory(config={"daemon": {"log_format": "json"}})
    with a.client() as c:
        c.call("Host.ping2", headers={"X-Request-Id": "j-1"})
    a.stop()
    records = [json.loads(line) for line in a.log_text().splitlines() if line.startswith("{")]
    assert any(r.get("request_id") == "j-1" and "Host.ping2" in r["msg"] for r in records)
    assert all({"ts", "level", "logger", "msg"} <= set(r) for r in records)


def test_port_in_use_is_a_clear_startup_error(agent: Agent, tmp_path: Path) -> None:
    assert agent.tcp_address is not None
    port = agent.tcp_address[1]
    out = subprocess.run(
        [sys.executable, "-m", "vdsmlite", "--state-dir", str(tmp_path / "other"),
         "--port", str(port)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 1
    assert f"127.0.0.1:{port} is already in use" in out.stderr


def test_second_daemon_on_the_same_unix_socket_is_refused(agent: Agent) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "vdsmlite", "--config", str(agent.config_path), "--port", "0"],
        capture_output=True, text=True, timeout=60)
    assert out.returncode == 1
    assert "another vdsmlite is already listening" in out.stderr
    with agent.client() as c:  # the first one is unharmed
        assert c.call("Host.ping2") is True


def test_stale_unix_socket_from_a_killed_daemon_is_reclaimed(tmp_path: Path) -> None:
    a = Agent(tmp_path / "a").start()
    a.kill()  # SIGKILL: no cleanup, the socket file stays
    assert a.unix_socket.exists()
    a.start()
    try:
        with a.client() as c:
            assert c.call("Host.ping2") is True
    finally:
        a.stop()


def test_daemon_answers_while_another_call_runs(agent: Agent) -> None:
    """A busy executor (slow blocking call) does not stall the event loop."""
    raw = RawHttp(agent)
    batch = [{"jsonrpc": "2.0", "id": i, "method": "Host.getCapabilities"} for i in range(64)]

    async def main() -> None:
        loop = asyncio.get_running_loop()
        busy = loop.run_in_executor(None, raw.rpc, batch)
        for _ in range(20):
            _, reply = await loop.run_in_executor(None, raw.rpc,
                                                       {"jsonrpc": "2.0", "id": 1,
                                                        "method": "Host.ping2"})
            assert reply["result"] is True
        _, replies = await busy
        assert len(replies) == 64
    run(main())
