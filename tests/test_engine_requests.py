"""The engine-style requests of ../shared/reference/vdsm.md §8, replayed verbatim (copied
to tests/data/engine-requests/vdsm-md-section8.jsonl) against a running agent: every
answer is a JSON-RPC 2.0 response with VDSM's shape - a result of the verb's type, or an
error {code, message} with VDSM's code for that failure.

Nothing here exists on this host (no iSCSI portal, NFS server, LUN, pool or domain of
those ids), so most requests must fail, and fail as VDSM does.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import RawHttp

REQUESTS = Path(__file__).parent / "data" / "engine-requests" / "vdsm-md-section8.jsonl"


def requests() -> dict[str, dict[str, Any]]:
    out = {}
    for line in REQUESTS.read_text().splitlines():
        req = json.loads(line)
        out[req["id"]] = req
    return out


def replay(raw: RawHttp, req_id: str) -> dict[str, Any]:
    req = requests()[req_id]
    status, body = raw.rpc(req)
    assert status == 200, (status, body)
    assert body["jsonrpc"] == "2.0" and body["id"] == req_id
    assert ("result" in body) != ("error" in body), body
    if "error" in body:
        err = body["error"]
        assert isinstance(err["code"], int) and isinstance(err["message"], str), err
    return body


def error_code(body: dict[str, Any]) -> int:
    assert "error" in body, body
    return int(body["error"]["code"])


def test_all_requests_parse_as_in_the_reference() -> None:
    assert sorted(requests(), key=int) == [str(i) for i in range(1, 17)]


def test_capabilities(raw: RawHttp) -> None:
    caps = replay(raw, "1")["result"]
    assert isinstance(caps, dict) and caps["uuid"]


def test_discovery_of_an_unreachable_portal_is_475(raw: RawHttp) -> None:
    assert error_code(replay(raw, "2")) == 475  # iSCSIDiscoveryError


@pytest.mark.parametrize(("req_id", "status"), [
    ("3", 464),  # iSCSILoginError: no portal (and no iscsi_tcp module here)
    ("4", 477),  # MountError: no NFS server
])
def test_connect_storage_server_answers_a_status_per_connection(
        raw: RawHttp, req_id: str, status: int) -> None:
    body = replay(raw, req_id)
    conn_id = requests()[req_id]["params"]["connectionParams"][0]["id"]
    assert body["result"] == [{"id": conn_id, "status": status}]


def test_device_list_of_an_absent_guid_is_empty(raw: RawHttp) -> None:
    assert replay(raw, "5")["result"] == []


def test_vg_on_an_absent_lun_fails(raw: RawHttp) -> None:
    # VDSM: lvm.createVG on devices multipath does not know.
    assert error_code(replay(raw, "6")) == 606  # InaccessiblePhysDev


def test_block_domain_on_an_absent_vg_is_506(raw: RawHttp) -> None:
    assert error_code(replay(raw, "7")) == 506  # VolumeGroupDoesNotExist


@pytest.mark.parametrize("req_id", ["8", "9", "13"])
def test_volume_verbs_on_an_absent_domain_fail_with_a_storage_code(
        raw: RawHttp, req_id: str) -> None:
    # 358 StorageDomainDoesNotExist (VDSM may say 309 StoragePoolUnknown first for a
    # pool it is not connected to).
    assert error_code(replay(raw, req_id)) in (358, 309)


def test_unknown_task_is_401_with_vdsms_message(raw: RawHttp) -> None:
    body = replay(raw, "10")
    task = requests()["10"]["params"]["taskID"]
    assert body["error"] == {"code": 401, "message": f"Task id unknown: ('{task}',)"}


def test_pool_connect_without_its_master_fails(raw: RawHttp) -> None:
    assert error_code(replay(raw, "11")) in (304, 309, 358)


def test_repo_stats_of_an_unmonitored_domain_is_empty(raw: RawHttp) -> None:
    assert replay(raw, "12")["result"] == {}


@pytest.mark.xfail(strict=True, reason="vdsmlite has no SDM.copy_data (VDSM's 'SDM' "
                   "namespace verb): -32601 where VDSM schedules a job")
def test_copy_data_is_a_known_verb(raw: RawHttp) -> None:
    assert error_code(replay(raw, "15")) != -32601


def test_jobs_of_an_unknown_job_is_empty(raw: RawHttp) -> None:
    assert replay(raw, "16")["result"] == {}


def test_unknown_method_and_missing_domain(raw: RawHttp) -> None:
    status, body = raw.rpc({"jsonrpc": "2.0", "id": "x", "method": "Host.noSuchVerb",
                            "params": {}})
    assert status == 200 and body["error"]["code"] == -32601
    sd = requests()["7"]["params"]["storagedomainID"]
    status, body = raw.rpc({"jsonrpc": "2.0", "id": "y", "method": "StorageDomain.getInfo",
                            "params": {"storagedomainID": sd}})
    assert status == 200 and body["error"]["code"] == 358
