"""JSON-RPC over STOMP 1.2 on the management port (VDSM's and the engine's door).

The client is the tests' own (`tests.stomp_helpers`), written from the STOMP 1.2 spec
(raw sockets, its own frame reader), so the daemon's parser is not checked against itself.
"""

from __future__ import annotations

import json
import ssl
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from fake_storage.agent import Agent
from tests.helpers import BLANK_UUID, RawHttp
from tests.stomp_helpers import REQUESTS, Conn, frame, request
from tests.tls_helpers import make_ca, make_cert
from vdsmlite.client import StompClient, TlsFiles
from vdsmlite.rpc import stomp

MAX_REQUEST = 65536
STALL = 2.0


# --- fixtures ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Agent]:
    d = tmp_path_factory.mktemp("stomp")
    a = Agent(d / "agent", config={
        "rpc": {"max_request_size": MAX_REQUEST, "stall_timeout": STALL},
        "storage": {"local_domain": str(d / "local")}}).start()
    yield a
    a.stop()
    assert a.crashes() == []


@pytest.fixture
def conn(agent: Agent) -> Iterator[Conn]:
    c = Conn.tcp(agent)
    assert c.connect().command == "CONNECTED"
    c.subscribe("replies", "sub-replies")
    yield c
    c.close()


# --- parser (unit) ----------------------------------------------------------------------


def test_parser_handles_a_stream_split_at_every_byte() -> None:
    data = (frame("CONNECT", {"accept-version": "1.2", "host": "null"}, length=False)
            + b"\n\r\n"
            + frame("SEND", {"destination": "a\\cb", "x": "1\\n2"}, b"{\"a\":\0\"b\"}")
            + frame("SUBSCRIBE", {"destination": "q", "id": "1", "id\\\\": "first"}, length=False))
    whole = stomp.Parser(1024).feed(data)
    assert [f.command for f in whole] == ["CONNECT", "SEND", "SUBSCRIBE"]  # type: ignore[union-attr]
    send = whole[1]
    assert isinstance(send, stomp.Frame)
    assert send.headers["destination"] == "a:b" and send.headers["x"] == "1\n2"
    assert send.body == b"{\"a\":\0\"b\"}"
    for cut in range(len(data) + 1):
        p = stomp.Parser(1024)
        assert p.feed(data[:cut]) + p.feed(data[cut:]) == whole, cut
    p = stomp.Parser(1024)
    assert [f for b in data for f in p.feed(bytes([b]))] == whole
    assert p.heartbeats == 2 and not p.mid_frame


def test_parser_encoder_round_trip_with_escapes() -> None:
    headers = {"destination": "a:b\\c", "reply-to": "x\ny\rz"}
    out = stomp.Parser(1024).feed(stomp.encode("MESSAGE", headers, b"body"))
    assert out == [stomp.Frame("MESSAGE", {**headers, "content-length": "4"}, b"body")]
    # The first of repeated headers wins.
    out = stomp.Parser(1024).feed(b"SEND\ndestination:a\ndestination:b\n\n\0")
    assert out[0].headers == {"destination": "a"}  # type: ignore[union-attr]


@pytest.mark.parametrize(("data", "error"), [
    (b"HELLO\n\n\0", "Unknown command"),
    (b"SEND\ncontent-length:2\n\nabc\0", "Frame doesn't end with NULL byte"),
    (b"SEND\n" + b"x:" + b"y" * 9000, "longer than"),
    (b"SEND\n" + b"".join(b"h%d:v\n" % i for i in range(100)), "more than 64 headers"),
    (b"SEND\nno-colon\n\n\0", "without ':'"),
    (b"SEND\na:\\t\n\n\0", "invalid escape"),
    (b"SEND\ncontent-length:-1\n\n\0", "invalid content-length"),
    (b"x" * 9000, "longer than"),
])
def test_parser_refuses_bad_frames(data: bytes, error: str) -> None:
    with pytest.raises(stomp.FrameError, match=error):
        stomp.Parser(1024).feed(data)


def test_parser_skips_oversized_bodies_and_keeps_the_tail() -> None:
    body = b'{"jsonrpc":"2.0","method":"X","params":{"a":"' + b"x" * 5000 + b'"},"id":"r1"}'
    for data in (frame("SEND", {"destination": "q"}, body),
                 frame("SEND", {"destination": "q"}, body, length=False)):
        p = stomp.Parser(1024)
        out = [f for i in range(0, len(data) + 10, 700) for f in p.feed(data[i:i + 700])]
        out += p.feed(frame("SEND", {"destination": "q"}, b"ok"))
        assert isinstance(out[0], stomp.Oversized) and out[0].size == len(body)
        assert out[0].tail.endswith(b'"id":"r1"}')
        assert out[1] == stomp.Frame("SEND", {"destination": "q", "content-length": "2"}, b"ok")


def test_heartbeat_negotiation_follows_vdsm() -> None:
    assert stomp.negotiate_heartbeat("0,0") == (0, 0)
    assert stomp.negotiate_heartbeat("10000,5000") == (5000, 10000)
    assert stomp.negotiate_heartbeat("10,20") == (1000, 1000)
    assert stomp.negotiate_heartbeat("junk") == (0, 0)
    assert stomp.negotiate_heartbeat(None) == (0, 0)


# --- the daemon ---------------------------------------------------------------------------


def test_connect_negotiates_version_and_heart_beat(agent: Agent) -> None:
    c = Conn.tcp(agent)
    f = c.connect("10000,5000")
    assert f.command == "CONNECTED"
    assert f.headers["version"] == "1.2" and f.headers["heart-beat"] == "5000,10000"
    c.close()
    c = Conn.tcp(agent)
    c.send(frame("STOMP", {"accept-version": "1.0,1.1,1.2", "heart-beat": "0,0"}))
    assert c.read().headers["heart-beat"] == "0,0"
    c.close()
    c = Conn.tcp(agent)
    c.send(frame("CONNECT", {"accept-version": "1.0,1.1"}))
    err = c.read()
    assert err.command == "ERROR" and err.body == b"Version unsupported"
    assert c.closed()


def test_engine_client_quirks(agent: Agent) -> None:
    """host:null, SUBSCRIBE sent before CONNECTED arrived, SEND without content-type,
    all in one write: the engine's Java client does exactly this."""
    c = Conn.tcp(agent)
    c.send(frame("CONNECT", {"accept-version": "1.2", "host": "null", "heart-beat": "0,8000"})
           + frame("SUBSCRIBE", {"destination": "jms.topic.vdsm_responses", "id": "s1",
                                 "ack": "auto"})
           + frame("SEND", {"destination": "jms.topic.vdsm_requests",
                            "reply-to": "jms.topic.vdsm_responses"},
                   request("Host.ping2", msg_id="q1")))
    assert c.read().command == "CONNECTED"
    msg = c.read()
    assert msg.command == "MESSAGE"
    assert msg.headers["destination"] == "jms.topic.vdsm_responses"
    assert msg.headers["subscription"] == "s1"
    assert msg.headers["content-type"] == "application/json"
    assert msg.json() == {"jsonrpc": "2.0", "id": "q1", "result": True}
    c.close()


def test_sync_and_task_verbs_and_job_events(agent: Agent, conn: Conn) -> None:
    conn.subscribe("jms.queue.events", "sub-events")
    domains = conn.call("Host.getStorageDomains")["result"]
    assert len(domains) == 1
    assert conn.call("Task.getStatus", {"taskID": str(uuid.uuid4())})["error"]["code"] == 401
    img, vol = str(uuid.uuid4()), str(uuid.uuid4())
    conn.send(frame("SEND", {"destination": "jms.topic.vdsm_irs_requests", "reply-to": "replies"},
                    request("Volume.create", {
                        "volumeID": vol, "storagepoolID": BLANK_UUID, "storagedomainID": domains[0],
                        "imageID": img, "size": str(1 << 20), "volFormat": 5, "preallocate": 2,
                        "diskType": "DATA", "desc": "", "srcImgUUID": BLANK_UUID,
                        "srcVolUUID": BLANK_UUID}, msg_id="create")))
    task = None
    statuses: list[str] = []
    while task is None or statuses[-1:] != ["done"]:
        f = conn.read()
        msg = f.json()
        if msg.get("id") == "create":
            assert f.headers["subscription"] == "sub-replies"
            task = msg["result"]
            continue
        assert f.headers["subscription"] == "sub-events"
        assert f.headers["destination"] == "jms.queue.events"
        assert "id" not in msg
        name = msg["method"]
        assert len(name.split("|")) == 4, name  # the engine drops anything else
        assert isinstance(msg["params"]["notify_time"], int)
        if name.startswith("|jobs|status|"):
            statuses.append(msg["params"]["status"])
            assert task is None or name == f"|jobs|status|{task}"
    assert statuses[0] == "pending" and statuses[-1] == "done"
    status = conn.call("Task.getStatus", {"taskID": task})["result"]
    assert status["taskState"] == "finished" and status["taskResult"] == "success"
    assert conn.call("Host.getJobs")["result"][task]["status"] == "done"
    conn.send(frame("UNSUBSCRIBE", {"id": "sub-events"}))
    assert conn.call("Task.clear", {"taskID": task})["result"] is True


def test_reply_to_routing_on_one_and_two_connections(agent: Agent) -> None:
    one = Conn.tcp(agent)
    one.connect()
    one.subscribe("dest-a", "a")
    one.subscribe("dest-b", "b")
    one.send(frame("SEND", {"destination": REQUESTS, "reply-to": "dest-a"},
                   request("Host.ping2", msg_id=1))
             + frame("SEND", {"destination": REQUESTS + ".sub", "reply-to": "dest-b"},
                     request("Host.ping2", msg_id=2)))
    got = {}
    for _ in range(2):
        f = one.read()
        got[f.json()["id"]] = (f.headers["destination"], f.headers["subscription"])
    assert got == {1: ("dest-a", "a"), 2: ("dest-b", "b")}

    two = Conn.tcp(agent)
    two.connect()
    two.subscribe("dest-c", "c")
    two.send(frame("SEND", {"destination": REQUESTS, "reply-to": "dest-c"},
                   request("Host.ping2", msg_id=3)))
    one.send(frame("SEND", {"destination": REQUESTS, "reply-to": "dest-a", "receipt": "r9"},
                   request("Host.ping2", msg_id=4)))
    f = two.read()
    assert (f.json()["id"], f.headers["subscription"]) == (3, "c")
    frames = [one.read(), one.read()]
    receipt = next(f for f in frames if f.command == "RECEIPT")
    assert receipt.headers["receipt-id"] == "r9"
    reply = next(f for f in frames if f.command == "MESSAGE")
    assert (reply.json()["id"], reply.headers["subscription"]) == (4, "a")

    # SEND elsewhere is forwarded to that destination's subscribers (and its children's).
    two.subscribe("chat", "c2")
    one.send(frame("SEND", {"destination": "chat.room", "x-note": "hi"}, b"hello"))
    f = two.read()
    assert (f.command, f.headers["subscription"], f.headers["x-note"], f.body) == \
        ("MESSAGE", "c2", "hi", b"hello")
    one.send(frame("SEND", {"destination": "nobody.listens"}, b"x"))
    err = one.read()
    assert err.command == "ERROR" and err.body == b"Subscription not available"
    one.send(frame("SUBSCRIBE", {"destination": "x", "id": "a"}))
    assert one.read().body == b"Subscription id already exists"
    # DISCONNECT with a receipt: RECEIPT, then the daemon closes.
    one.send(frame("DISCONNECT", {"receipt": "bye"}))
    assert one.read().headers == {"receipt-id": "bye", "content-length": "0"}
    assert one.closed()
    two.close()


def test_heart_beats_both_ways(agent: Agent) -> None:
    c = Conn.tcp(agent)
    # We send every 1000 ms (we promise), and want one every 1000 ms.
    assert c.connect("1000,1000").headers["heart-beat"] == "1000,1000"
    start = time.monotonic()
    c.sock.settimeout(10)
    received = b""
    while data := c.sock.recv(100):
        received += data
    # The daemon sent its heart-beat at 1000 ms; we said nothing and were dropped
    # after 1000 ms plus VDSM's grace (20%).
    assert received == b"\n"
    assert time.monotonic() - start >= 1.2
    assert "sent nothing for" in agent.log_text()
    # A client that does send its heart-beats stays.
    c = Conn.tcp(agent)
    c.connect("1000,0")
    c.subscribe("replies", "s")
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        c.send(b"\n")
        assert c.call("Host.ping2")["result"] is True
        time.sleep(0.3)
    c.close()


def _assert_refused(agent: Agent, data: bytes, error: str) -> None:
    c = Conn.tcp(agent)
    c.send(data)
    f = c.read()
    assert f.command == "ERROR" and error in f.body.decode(), f
    assert c.closed()


def test_bad_frames_close_only_their_connection(agent: Agent, conn: Conn) -> None:
    connect = frame("CONNECT", {"accept-version": "1.2"})
    _assert_refused(agent, connect + b"HELLO\n\n\0", "Unknown command")
    _assert_refused(agent, connect + b"SEND\nx:" + b"y" * 10000, "longer than")
    _assert_refused(agent, connect + b"SEND\n" + b"".join(b"h%d:v\n" % i for i in range(70)),
                    "more than 64 headers")
    _assert_refused(agent, connect + b"SEND\ndestination:q\ncontent-length:2\n\nabc\0",
                    "Frame doesn't end with NULL byte")
    # No NUL: the frame never ends; the client is dropped after the stall timeout.
    c = Conn.tcp(agent)
    c.send(connect + b"SEND\ndestination:jms.topic.vdsm_requests\n\n{\"jsonrpc\"")
    start = time.monotonic()
    assert c.closed(timeout=STALL * 5)
    assert time.monotonic() - start >= STALL * 0.9
    # Garbage that is neither STOMP nor HTTP.
    g = Conn.tcp(agent)
    g.send(b"\x16\x03\x01garbage")
    assert g.closed()
    # The well-behaved connection never noticed.
    assert conn.call("Host.ping2")["result"] is True


def test_oversized_request_is_a_json_rpc_error(conn: Conn) -> None:
    # As the engine writes it: the id last, where the daemon finds it without the body.
    big = json.dumps({"jsonrpc": "2.0", "method": "Host.ping2",
                      "params": {"pad": "x" * MAX_REQUEST}, "id": "big"}).encode()
    conn.send(frame("SEND", {"destination": REQUESTS, "reply-to": "replies"}, big))
    reply = conn.read().json()
    assert reply["id"] == "big" and reply["error"]["code"] == -32600
    assert "max_request_size" in reply["error"]["message"]
    assert conn.call("Host.ping2")["result"] is True


def test_a_thousand_pipelined_requests(conn: Conn) -> None:
    n = 1000
    conn.send(b"".join(frame("SEND", {"destination": REQUESTS, "reply-to": "replies"},
                             request("Host.ping2", msg_id=i)) for i in range(n)))
    seen = set()
    for _ in range(n):
        reply = conn.read().json()
        assert reply["result"] is True
        seen.add(reply["id"])
    assert seen == set(range(n))


def test_http_on_the_same_port_while_stomp_clients_are_connected(agent: Agent,
                                                                 conn: Conn) -> None:
    raw = RawHttp(agent)
    others = [Conn.tcp(agent) for _ in range(5)]
    for o in others:
        o.connect()
    status, reply = raw.rpc({"jsonrpc": "2.0", "id": 1, "method": "Host.ping2"})
    assert (status, reply["result"]) == (200, True)
    assert raw.request("GET", "/metrics")[0] == 200
    with agent.tcp_client() as c:
        for _ in range(20):
            assert c.call("Host.ping2") is True
    assert conn.call("Host.ping2")["result"] is True
    for o in others:
        o.close()


def test_unix_socket_and_the_cli(agent: Agent) -> None:
    with StompClient.unix(agent.unix_socket) as c:
        assert c.call("Host.ping2") is True
        assert c.call("Host.getStorageDomains")
    assert agent.tcp_address is not None
    with StompClient.tcp(*agent.tcp_address) as c:
        assert c.call("Host.ping2") is True
    out = subprocess.run([sys.executable, "-m", "vdsmlite.cli", "--unix", str(agent.unix_socket),
                          "--stomp", "Host", "ping2"], capture_output=True, text=True)
    assert (out.returncode, out.stdout.strip()) == (0, "true"), out.stderr
    out = subprocess.run([sys.executable, "-m", "vdsmlite.cli", "--unix", str(agent.unix_socket),
                          "--stomp", "Task", "getStatus", f"taskID={uuid.uuid4()}"],
                         capture_output=True, text=True)
    assert out.returncode == 1 and json.loads(out.stderr)["code"] == 401


@pytest.fixture(scope="module")
def tls_agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Agent, Path]]:
    pki = tmp_path_factory.mktemp("pki")
    make_ca(pki, "ca")
    make_cert(pki, "ca", "server", "IP:127.0.0.1,DNS:localhost")
    make_cert(pki, "ca", "engine", "DNS:engine")
    a = Agent(tmp_path_factory.mktemp("tls") / "agent", config={"rpc": {
        "tls_cert": str(pki / "server.pem"), "tls_key": str(pki / "server.key"),
        "tls_ca": str(pki / "ca.pem")}}).start()
    yield a, pki
    a.stop()


def test_tls_on_the_same_port(tls_agent: tuple[Agent, Path]) -> None:
    agent, pki = tls_agent
    assert agent.tcp_address is not None
    files = TlsFiles(pki / "engine.pem", pki / "engine.key", pki / "ca.pem")
    with StompClient.tcp(*agent.tcp_address, tls=files) as c:
        assert c.call("Host.ping2") is True
        with agent.tcp_client(tls=files) as h:
            assert h.call("Host.ping2") is True
        assert c.call("Host.ping2") is True
    # STOMP in clear on the TLS port goes nowhere.
    plain = Conn.tcp(agent)
    plain.send(frame("CONNECT", {"accept-version": "1.2"}))
    with pytest.raises((EOFError, ConnectionResetError, ssl.SSLError)):
        plain.read()
