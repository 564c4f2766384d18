"""JSON-RPC 2.0 conformance over HTTP POST, against a real daemon."""

from __future__ import annotations

import uuid

import pytest

from fake_storage.agent import Agent
from tests.helpers import RawHttp


def test_single_request_echoes_string_and_int_ids(raw: RawHttp) -> None:
    for msg_id in ("abc-1", 7, 0):
        status, reply = raw.rpc({"jsonrpc": "2.0", "id": msg_id, "method": "Host.ping2"})
        assert status == 200
        assert reply == {"jsonrpc": "2.0", "id": msg_id, "result": True}


def test_null_id_is_a_request_not_a_notification(raw: RawHttp) -> None:
    status, reply = raw.rpc({"jsonrpc": "2.0", "id": None, "method": "Host.ping2"})
    assert status == 200
    assert reply == {"jsonrpc": "2.0", "id": None, "result": True}


def test_notification_gets_no_reply(raw: RawHttp) -> None:
    status, reply = raw.rpc({"jsonrpc": "2.0", "method": "Host.ping2"})
    assert (status, reply) == (204, None)
    # Even an error is not reported for a notification.
    status, reply = raw.rpc({"jsonrpc": "2.0", "method": "No.such"})
    assert (status, reply) == (204, None)


def test_named_and_positional_params(raw: RawHttp) -> None:
    task = str(uuid.uuid4())
    for params in ({"taskID": task}, [task]):
        _, reply = raw.rpc({"jsonrpc": "2.0", "id": 1, "method": "Task.getStatus",
                            "params": params})
        assert reply["error"]["code"] == 401
        assert reply["error"]["message"] == f"Task id unknown: ('{task}',)"


def test_too_many_positional_params(raw: RawHttp) -> None:
    _, reply = raw.rpc({"jsonrpc": "2.0", "id": 1, "method": "Task.getStatus",
                        "params": [str(uuid.uuid4()), "extra"]})
    assert reply["error"]["code"] == -32602


def test_uuid_params_are_normalized(raw: RawHttp) -> None:
    task = str(uuid.uuid4())
    _, reply = raw.rpc({"jsonrpc": "2.0", "id": 1, "method": "Task.getStatus",
                        "params": {"taskID": task.upper()}})
    assert reply["error"]["message"] == f"Task id unknown: ('{task}',)"


def test_parse_error(raw: RawHttp) -> None:
    for body in (b"{", b'{"jsonrpc": "2.0", "method": }', b"\xff\xfe\x00", b""):
        status, reply = raw.rpc(body)
        assert status == 200
        assert reply["id"] is None
        assert reply["error"]["code"] == -32700


def test_deeply_nested_json_is_a_parse_error(raw: RawHttp) -> None:
    status, reply = raw.rpc(b"[" * 200_000 + b"]" * 200_000)
    assert status == 200
    assert reply["error"]["code"] == -32700


@pytest.mark.parametrize("msg", [
    {"id": 1, "method": "Host.ping2"},                       # no jsonrpc
    {"jsonrpc": "1.0", "id": 1, "method": "Host.ping2"},     # wrong version
    {"jsonrpc": 2.0, "id": 1, "method": "Host.ping2"},       # version as number
    {"jsonrpc": "2.0", "id": 1},                             # no method
    {"jsonrpc": "2.0", "id": 1, "method": 5},                # method not a string
    {"jsonrpc": "2.0", "id": 1, "method": ""},               # empty method
    {"jsonrpc": "2.0", "id": 1, "method": "Host.ping2", "params": "x"},
    {"jsonrpc": "2.0", "id": 1, "method": "Host.ping2", "params": 3},
])
def test_invalid_request(raw: RawHttp, msg: dict) -> None:
    _, reply = raw.rpc(msg)
    assert reply["error"]["code"] == -32600
    assert reply["id"] == 1


@pytest.mark.parametrize("bad_id", [1.5, True, {"a": 1}, [1]])
def test_invalid_id_types(raw: RawHttp, bad_id: object) -> None:
    _, reply = raw.rpc({"jsonrpc": "2.0", "id": bad_id, "method": "Host.ping2"})
    assert reply["error"]["code"] == -32600
    assert reply["id"] is None


def test_request_that_is_not_an_object(raw: RawHttp) -> None:
    for body in (1, "x", None, True):
        _, reply = raw.rpc(body)
        assert reply == {"jsonrpc": "2.0", "id": None,
                         "error": {"code": -32600, "message": "Invalid request: request must be "
                                   "an object"}}


def test_unknown_method(raw: RawHttp) -> None:
    for method in ("Host.noSuchVerb", "NoNamespace.verb", "ping"):
        _, reply = raw.rpc({"jsonrpc": "2.0", "id": 9, "method": method})
        assert reply["error"]["code"] == -32601
        assert method in reply["error"]["message"]


@pytest.mark.parametrize(("params", "field"), [
    ({}, "taskID"),
    ({"taskID": "not-a-uuid"}, "taskID"),
    ({"taskID": 12}, "taskID"),
    ({"taskID": None}, "taskID"),
])
def test_invalid_params_name_the_field(raw: RawHttp, params: dict, field: str) -> None:
    _, reply = raw.rpc({"jsonrpc": "2.0", "id": 3, "method": "Task.getStatus",
                        "params": params})
    err = reply["error"]
    assert err["code"] == -32602
    assert err["data"]["param"] == field
    assert field in err["message"]


def test_enum_and_list_params(raw: RawHttp) -> None:
    _, reply = raw.rpc({"jsonrpc": "2.0", "id": 1, "method": "Host.getJobs",
                        "params": {"job_type": "storage", "job_ids": [str(uuid.uuid4())]}})
    assert reply["result"] == {}
    _, reply = raw.rpc({"jsonrpc": "2.0", "id": 1, "method": "Host.getJobs",
                        "params": {"job_type": "bogus"}})
    assert reply["error"]["code"] == -32602
    assert reply["error"]["data"]["param"] == "job_type"
    _, reply = raw.rpc({"jsonrpc": "2.0", "id": 1, "method": "Host.getJobs",
                        "params": {"job_ids": ["x"]}})
    assert reply["error"]["data"]["param"] == "job_ids[0]"


def test_unknown_named_params_are_ignored_like_vdsm(raw: RawHttp) -> None:
    _, reply = raw.rpc({"jsonrpc": "2.0", "id": 1, "method": "Host.ping2",
                        "params": {"lastClientIface": "ovirtmgmt"}})
    assert reply["result"] is True


def test_batch_mixed(raw: RawHttp) -> None:
    task = str(uuid.uuid4())
    status, replies = raw.rpc([
        {"jsonrpc": "2.0", "id": "a", "method": "Host.ping2"},
        {"jsonrpc": "2.0", "method": "Host.ping2"},  # notification: no reply
        1,
        {"jsonrpc": "2.0", "id": "b", "method": "Host.nope"},
        {"jsonrpc": "2.0", "id": "c", "method": "Task.getStatus", "params": {"taskID": task}},
        {"jsonrpc": "2.0", "id": "d", "method": "Task.getStatus", "params": {"taskID": "x"}},
    ])
    assert status == 200
    assert len(replies) == 5
    by_id = {r["id"]: r for r in replies if r["id"] is not None}
    assert by_id["a"]["result"] is True
    assert by_id["b"]["error"]["code"] == -32601
    assert by_id["c"]["error"]["code"] == 401
    assert by_id["d"]["error"]["code"] == -32602
    anonymous = [r for r in replies if r["id"] is None]
    assert len(anonymous) == 1 and anonymous[0]["error"]["code"] == -32600


def test_batch_of_notifications_only(raw: RawHttp) -> None:
    status, reply = raw.rpc([{"jsonrpc": "2.0", "method": "Host.ping2"}] * 3)
    assert (status, reply) == (204, None)


def test_empty_batch(raw: RawHttp) -> None:
    _, reply = raw.rpc([])
    assert reply["id"] is None
    assert reply["error"]["code"] == -32600


def test_batch_of_invalid_elements(raw: RawHttp) -> None:
    _, replies = raw.rpc([1, 2, 3])
    assert [r["error"]["code"] for r in replies] == [-32600] * 3


def test_large_batch_runs_concurrently(raw: RawHttp) -> None:
    msgs = [{"jsonrpc": "2.0", "id": i, "method": "Host.getStats"} for i in range(200)]
    _, replies = raw.rpc(msgs)
    assert sorted(r["id"] for r in replies) == list(range(200))
    assert all("elapsedTime" in r["result"] for r in replies)


def test_capabilities(shared_agent: Agent) -> None:
    with shared_agent.client() as c:
        caps = c.call("Host.getCapabilities")
    host_uuid = (shared_agent.state_dir / "host_uuid").read_text().strip()
    assert caps["uuid"] == host_uuid
    assert 5 in caps["domain_versions"]
    assert caps["liveMerge"] in ("true", "false")
    assert set(caps["supported_block_size"]) >= {"FCP", "ISCSI", "NFS", "LOCALFS", "POSIXFS"}
    assert set(caps["HBAInventory"]) == {"iSCSI", "FC"}
    assert int(caps["memSize"]) > 0


def test_stats(shared_agent: Agent) -> None:
    with shared_agent.client() as c:
        stats = c.call("Host.getStats")
    assert float(stats["elapsedTime"]) >= 0
    assert stats["memAvailable"] > 0
    assert stats["rpcCallsInFlight"] >= 1  # this call itself
    assert stats["storageDomains"] == {}


def test_get_verbs_serves_the_schema(shared_agent: Agent) -> None:
    with shared_agent.client() as c:
        schema = c.call("Host.getVerbs")
    verbs = schema["verbs"]
    assert {"Host.ping2", "Host.getCapabilities", "Host.getJobs", "Task.getStatus",
            "Task.clear", "Host.getVerbs"} <= set(verbs)
    task_status = verbs["Task.getStatus"]
    assert task_status["params"][0]["name"] == "taskID"
    assert task_status["params"][0]["type"] == "uuid"
    assert task_status["params"][0]["required"] is True
    assert {"name": "UnknownTask", "code": 401, "message": "Task id unknown"} in \
        task_status["errors"]
    assert all(v["doc"] for v in verbs.values())
    assert schema["enums"]["JobType"]["values"] == {"storage": "storage", "v2v": "v2v"}
