"""OVF_STORE end to end: both upload doors, reads, entities, and every way an upload fails.

Runs on a local file domain and a block domain (loop LUN). After every failed
upload the previous good store must still be served byte for byte.
"""

from __future__ import annotations

import io
import json
import re
import socket
import tarfile
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import call, eventually
from tests.ovf_helpers import (
    conn,
    entities,
    entity_ovf,
    get_store,
    make_store,
    put_store,
    stamp_time,
    start_put,
    store_tar,
    stores,
)
from tests.stomp_helpers import Conn
from tests.storage_helpers import (
    BLANK,
    COW,
    DomainUnderTest,
    SharedDomains,
    StorageEnv,
    make_block_domain,
    make_localfs_domain,
    wait_task,
)
from tests.tar_helpers import ADVERSARIAL
from vdsmlite.client import ServerError
from vdsmlite.ovf import tarstream
from vdsmlite.sdm.ovfindex import OvfIndex

pytestmark = pytest.mark.root


STALL_TIMEOUT = 1.0


@pytest.fixture(scope="module")
def domains(module_env: StorageEnv) -> SharedDomains:
    return SharedDomains(module_env, config={
        "storage": {"upload_stall_timeout": STALL_TIMEOUT}}).build("localfs", "block-512")


@pytest.fixture(params=["localfs", "block"])
def dom(request: pytest.FixtureRequest, domains: SharedDomains) -> Iterator[DomainUnderTest]:
    """A domain of the module's host with no image, so no OVF_STORE yet: each test
    starts from a fresh domain's state, and its stores are deleted after it."""
    with domains.lend("localfs" if request.param == "localfs" else "block-512") as d:
        yield d


def test_upload_both_framings_read_back_and_list(dom: DomainUnderTest) -> None:
    a = dom.agent
    tar1, names1 = make_store(dom.sd, 5, "first")
    status, reply = put_store(a, dom.sd, tar1, chunked=True)
    assert status == 200, reply
    assert reply["size"] == len(tar1) and reply["entities"] == 5
    status, headers, body = get_store(a, dom.sd)
    assert status == 200 and body == tar1
    assert headers["x-ovf-store-volume"] == reply["volumeID"]
    listed = entities(dom)
    assert {e["id"]: e["name"] for e in listed["entities"]} == names1
    assert listed["lastUpdated"] == reply["lastUpdated"]
    assert all(e["type"] == "VM" and e["memory"] for e in listed["entities"])
    descs = stores(dom)
    assert len(descs) == 2  # created on first use
    assert descs[reply["volumeID"]] == {
        "Updated": True, "Size": len(tar1), "Last Updated": reply["lastUpdated"],
        "Storage Domains": [{"uuid": dom.sd}], "Disk Description": "OVF_STORE"}
    with dom.client as c:
        jobs = c.call("Host.getJobs")
    assert jobs[reply["taskID"]]["bytes_done"] == len(tar1)
    assert jobs[reply["taskID"]]["status"] == "done"

    # Last Updated has one-second resolution: a second upload within the same second
    # still gets a later stamp (ovfstore.next_stamp), so no waiting here.
    tar2, names2 = make_store(dom.sd, 3, "second")
    status, reply2 = put_store(a, dom.sd, tar2)  # Content-Length this time
    assert status == 200, reply2
    assert reply2["volumeID"] != reply["volumeID"]  # never the newest good store
    assert stamp_time(reply2["lastUpdated"]) > stamp_time(reply["lastUpdated"])
    assert get_store(a, dom.sd)[2] == tar2
    assert {e["id"]: e["name"] for e in entities(dom)["entities"]} == names2


def test_every_bad_upload_is_refused_and_the_good_store_survives(dom: DomainUnderTest) -> None:
    a = dom.agent
    good, names = make_store(dom.sd, 2)
    assert put_store(a, dom.sd, good)[0] == 200
    for case, (data, complaint) in sorted(ADVERSARIAL.items()):
        if case == "empty":
            continue
        status, reply = put_store(a, dom.sd, data, chunked=True)
        assert status == 400, (case, reply)
        assert complaint.lower() in reply["error"]["message"].lower(), (case, reply)
        assert reply["error"]["code"] == 1000
        assert get_store(a, dom.sd)[2] == good, case
    assert {e["id"] for e in entities(dom)["entities"]} == set(names)
    # The store that took the refused uploads says so.
    assert sorted(d["Updated"] for d in stores(dom).values()) == [False, True]


def test_archive_larger_than_the_volume(dom: DomainUnderTest) -> None:
    a = dom.agent
    if dom.is_block:
        # Block stores are at least one 128 MiB extent: declare more than that and
        # expect 413 before a byte of the body is read.
        put_store(a, dom.sd, make_store(dom.sd, 1)[0])
        assert a.tcp_address is not None
        s = socket.create_connection(a.tcp_address)
        s.sendall(f"PUT /ovfstore/{dom.sd} HTTP/1.1\r\nHost: x\r\n"
                  f"Content-Length: {200 << 20}\r\n\r\n".encode())
        s.settimeout(30)
        assert s.recv(100).startswith(b"HTTP/1.1 413")
        s.close()
        return
    with dom.client as c:  # small stores, so "too large" is cheap to reach
        for _ in range(2):
            img, vol = str(uuid.uuid4()), str(uuid.uuid4())
            wait_task(c, c.call("Volume.create", {
                "volumeID": vol, "storagepoolID": BLANK, "storagedomainID": dom.sd,
                "imageID": img, "size": str(1 << 20), "volFormat": 5,
                "preallocate": 1 if dom.is_block else 2, "diskType": "OVFS",
                "desc": '{"DiskAlias":"OVF_STORE","DiskDescription":"OVF_STORE"}',
                "srcImgUUID": BLANK, "srcVolUUID": BLANK}))
    small, _ = make_store(dom.sd, 1)
    assert put_store(a, dom.sd, small)[0] == 200
    big = store_tar(dom.sd, [entity_ovf(f"vm-{i}") for i in range(300)])
    assert len(big) > 1 << 20
    status, reply = put_store(a, dom.sd, big)  # Content-Length: refused before writing
    assert status == 413, reply
    status, reply = put_store(a, dom.sd, big, chunked=True)  # refused when it overflows
    assert status == 413, reply
    assert get_store(a, dom.sd)[2] == small


def test_vdsm_door_as_the_engine_uses_it(dom: DomainUnderTest) -> None:
    """setDescription(Updated:false) -> PUT / -> Task -> setDescription(Updated:true) -> GET /."""
    a = dom.agent
    good, _ = make_store(dom.sd, 1)
    put_store(a, dom.sd, good)  # creates the two stores
    target_vol, target = next((v, d) for v, d in stores(dom).items() if d.get("Size") is None)
    with dom.client as c:
        img = next(i for i in c.call("StorageDomain.getImages", {"storagedomainID": dom.sd})
                   if target_vol in c.call("StorageDomain.getVolumes", {
                       "storagedomainID": dom.sd, "storagepoolID": BLANK, "imageID": i}))
    tar, names = make_store(dom.sd, 4, "engine")
    headers = {"Storage-Pool-Id": BLANK, "Storage-Domain-Id": dom.sd, "Image-Id": img,
               "Volume-Id": target_vol, "Content-Type": "application/octet-stream"}
    c = conn(a)
    c.request("PUT", "/", body=tar, headers=headers)
    resp = c.getresponse()
    assert resp.status == 200 and resp.read() == b""
    task = resp.getheader("Task-Id")
    c.close()
    with dom.client as rpc:
        st = rpc.call("Task.getStatus", {"taskID": task})
        assert (st["taskState"], st["taskResult"]) == ("finished", "success")
        rpc.call("Task.clear", {"taskID": task})
        rpc.call("Volume.setDescription", {**dom.vol_params(img, target_vol), "description":
                 json.dumps({"Updated": True, "Size": len(tar),
                             "Last Updated": "Sat Nov 21 23:59:59 UTC 2099",
                             "Storage Domains": [{"uuid": dom.sd}],
                             "Disk Description": "OVF_STORE"})})
    c = conn(a)
    c.request("GET", "/", headers={**headers, "Range": f"bytes=0-{len(tar) - 1}"})
    resp = c.getresponse()
    assert resp.status == 206
    assert resp.getheader("Content-Range") == f"bytes 0-{len(tar) - 1}"
    assert resp.getheader("Task-Id")
    assert resp.read() == tar
    c.close()
    assert {e["id"]: e["name"] for e in entities(dom)["entities"]} == names
    assert target == {"DiskAlias": "OVF_STORE", "DiskDescription": "OVF_STORE"}  # as created


def test_vdsm_door_errors(dom: DomainUnderTest) -> None:
    a = dom.agent
    put_store(a, dom.sd, make_store(dom.sd, 1)[0])
    with dom.client as rpc:
        img = rpc.call("StorageDomain.getImages", {"storagedomainID": dom.sd})[0]
    base = {"Storage-Pool-Id": BLANK, "Storage-Domain-Id": dom.sd, "Image-Id": img}

    def request(method: str, headers: dict[str, str], body: Any = None) -> tuple[int, Any]:
        c = conn(a)
        try:
            c.putrequest(method, "/")
            for k, v in headers.items():
                c.putheader(k, v)
            c.endheaders(body)
            resp = c.getresponse()
            # The engine compares the whole header (VDSM's _send_error_response).
            assert resp.getheader("Content-Type") == "application/json"
            return resp.status, json.loads(resp.read() or b"null")
        finally:
            c.close()

    for missing in base:
        h = {k: v for k, v in base.items() if k != missing}
        status, body = request("PUT", {**h, "Content-Length": "0"})
        assert status == 400 and missing in body["status"]["message"]
    assert request("PUT", {**base, "Storage-Domain-Id": "../../etc",
                           "Content-Length": "0"})[0] == 400
    assert request("PUT", base)[0] == 411  # no Content-Length, not chunked
    assert request("GET", base)[0] == 400  # no Range
    assert request("GET", {**base, "Range": "bytes=5-10"})[0] == 400
    status, body = request("PUT", {**base, "Image-Id": str(uuid.uuid4()), "Content-Length": "1"},
                           b"x")
    # VDSM answers every refusal of the operation itself with 500; the code says which.
    assert status == 500 and body["status"]["code"] == 268
    status, body = request("PUT", {**base, "Storage-Domain-Id": str(uuid.uuid4()),
                                   "Content-Length": "1"}, b"x")
    assert status == 500 and body["status"]["code"] == 358

    # ?check=xml on this door too: a store with a malformed OVF goes in only without it.
    broken = store_tar(dom.sd, [entity_ovf("vm-0"), (str(uuid.uuid4()), b"<ovf:Envelope")])

    def put_raw(path: str) -> tuple[int, Any]:
        c = conn(a)
        try:
            c.request("PUT", path, body=broken, headers=base)
            resp = c.getresponse()
            return resp.status, resp.read()
        finally:
            c.close()

    status, raw = put_raw("/?check=xml")
    assert status == 500, raw
    reply = json.loads(raw)
    assert reply["status"]["code"] == 1000 and "malformed" in reply["status"]["message"]
    assert put_raw("/?check=bogus")[0] == 400
    assert put_raw("/")[0] == 200


# VDSM's own refusal vectors for this door (tests/lib/rpc/http_image_request_handler_test.py,
# test_irh_should_report_missing_headers): every one answers 400 there. Their values are
# theirs ("pool", "domain", "image": the request is refused before they are read).
VDSM_REFUSALS = {
    "GET - missing 'Range' header": ("GET", {}),
    "GET - invalid 'Range' header": ("GET", {"Range": "invalid range"}),
    "GET - missing storage pool header": (
        "GET", {"Range": "bytes=0-2000", "Storage-Domain-Id": "domain", "Image-Id": "image"}),
    "GET - missing storage domain header": (
        "GET", {"Range": "bytes=0-2000", "Storage-Pool-Id": "pool", "Image-Id": "image"}),
    "GET - missing image id header": (
        "GET", {"Range": "bytes=0-2000", "Storage-Pool-Id": "pool",
                "Storage-Domain-Id": "domain"}),
    "PUT - missing content length header": ("PUT", {}),
    "PUT - invalid content length header": ("PUT", {"content-length": "zorro"}),
    "PUT - missing storage pool header": (
        "PUT", {"content-length": "2000", "Storage-Domain-Id": "domain", "Image-Id": "image"}),
    "PUT - missing storage domain header": (
        "PUT", {"content-length": "2000", "Storage-Pool-Id": "pool", "Image-Id": "image"}),
    "PUT - missing image id header": (
        "PUT", {"content-length": "2000", "Storage-Pool-Id": "pool",
                "Storage-Domain-Id": "domain"}),
}


@pytest.mark.parametrize("case", sorted(VDSM_REFUSALS))
def test_vdsm_door_refuses_what_vdsm_refuses(domains: SharedDomains, case: str) -> None:
    method, headers = VDSM_REFUSALS[case]
    with domains.lend("localfs") as d:
        s = socket.create_connection(d.agent.tcp_address or ("127.0.0.1", 0), timeout=30)
        try:
            # Raw bytes: http.client would refuse to send "content-length: zorro" itself,
            # and would add a Content-Length of its own.
            head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
            s.sendall(f"{method} / HTTP/1.1\r\nHost: x\r\n{head}\r\n".encode())
            reply = b""
            while b"\r\n" not in reply:
                part = s.recv(4096)
                if not part:
                    break
                reply += part
        finally:
            s.close()
    # (aiohttp's own parser refuses the unreadable Content-Length, answering HTTP/1.0.)
    status_line = reply.split(b"\r\n", 1)[0].split(b" ")
    assert status_line[0] in (b"HTTP/1.1", b"HTTP/1.0") and status_line[1] == b"400", \
        (case, reply[:200])


def test_cut_connection_and_stalled_client(dom: DomainUnderTest) -> None:
    a = dom.agent
    good, _ = make_store(dom.sd, 2)
    put_store(a, dom.sd, good)
    big = store_tar(dom.sd, [entity_ovf(f"vm-{i}") for i in range(50)])
    with dom.client as c:  # the agent is shared: only the jobs of this test count
        earlier = set(c.call("Host.getJobs"))
    # Cut: half the body of a sized request, then the socket is closed.
    start_put(a, dom.sd, big, len(big) // 2).close()
    # Stall: half the body, then silence longer than the stall timeout.
    s = start_put(a, dom.sd, big, len(big) // 2)
    s.settimeout(30)
    reply = b""
    while b"\r\n\r\n" not in reply:
        part = s.recv(65536)
        if not part:
            break
        reply += part
    s.close()
    assert reply.startswith(b"HTTP/1.1 408"), reply[:200]

    def failed_uploads() -> list[dict[str, Any]]:
        with dom.client as c:
            failed = [j for jid, j in c.call("Host.getJobs").items()
                      if jid not in earlier and j["description"].startswith("upload OVF_STORE")
                      and j["status"] == "failed"]
        return failed if len(failed) >= 2 else []

    failed = eventually(failed_uploads, 30, "both failed uploads")
    assert {j["error"]["code"] for j in failed} == {2001}
    assert get_store(a, dom.sd)[2] == good


def test_sigkill_mid_upload_keeps_the_previous_store(dom: DomainUnderTest) -> None:
    a = dom.agent
    good, _ = make_store(dom.sd, 2)
    put_store(a, dom.sd, good)
    big = store_tar(dom.sd, [entity_ovf(f"vm-{i}") for i in range(50)])
    with dom.client as c:  # the agent is shared: only the jobs of this test count
        earlier = set(c.call("Host.getJobs"))
    s = start_put(a, dom.sd, big, len(big) // 2)

    def writing() -> bool:
        with dom.client as c:
            return any(j["status"] == "running" and j.get("bytes_done")
                       for jid, j in c.call("Host.getJobs").items() if jid not in earlier)

    eventually(writing, 30, "the daemon writing the upload")
    helpers = children(a.pid)
    assert helpers, "the parser processes start with the daemon"
    a.kill()
    s.close()
    # The parser processes notice their daemon is gone and leave: no orphans.
    eventually(lambda: not any(Path(f"/proc/{pid}").exists() for pid in helpers), 30,
               f"parser processes {helpers} to leave")
    a.start()
    assert get_store(a, dom.sd)[2] == good
    assert sorted(d["Updated"] for d in stores(dom).values()) == [False, True]


def children(pid: int) -> list[int]:
    """Processes whose parent is `pid` (from /proc; never by name)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # gone meanwhile
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def test_an_unreadable_ovf_is_listed_apart(dom: DomainUnderTest) -> None:
    # Well-formed XML 1.0 that is no VM: an unbound prefix, and an OVF without an id.
    # Uploads check the XML; what an OVF means is read per entity, so one bad
    # entity neither blocks the upload nor hides the others.
    ents = [entity_ovf("vm-0"), entity_ovf("vm-1")]
    unbound, no_id = str(uuid.uuid4()), str(uuid.uuid4())
    envelope = '<ovf:Envelope xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/1/">'
    bad = [(unbound, f"{envelope}<Content><x:Name/></Content></ovf:Envelope>".encode()),
           (no_id, f"{envelope}<Content><Name>x</Name></Content></ovf:Envelope>".encode())]
    status, reply = put_store(dom.agent, dom.sd, store_tar(dom.sd, ents + bad))
    assert status == 200, reply
    listed = entities(dom)
    assert sorted(e["name"] for e in listed["entities"]) == ["vm-0", "vm-1"]
    why = {e["id"]: e["error"] for e in listed["invalidEntities"]}
    assert set(why) == {unbound, no_id}
    assert "malformed" in why[unbound] and "prefix" in why[unbound]
    assert "id is missing" in why[no_id]


def test_malformed_ovf_is_kept_and_reported_unless_check_xml(dom: DomainUnderTest) -> None:
    # What protects the store is its framing and no XML that can hurt a parser; a VM
    # definition that is not well-formed is the engine's data, kept and reported - it
    # does not cost every other VM's newest definition. ?check=xml refuses it.
    a = dom.agent
    ents = [entity_ovf("vm-0"), entity_ovf("vm-1")]
    broken = str(uuid.uuid4())
    tar = store_tar(dom.sd, [*ents, (broken, b"<ovf:Envelope")])
    events = Conn.tcp(a)
    try:
        events.connect()
        events.subscribe("jms.queue.events", "ev")
        status, reply = put_store(a, dom.sd, tar)
        assert status == 200, reply
        assert reply["entities"] == 3 and reply["index"] == {"state": "building"}
        while True:  # the index's outcome, as an event
            msg = events.read().json()
            if msg["method"] == f"|ovfstore|indexed|{dom.sd}":
                break
    finally:
        events.sock.close()
    note = msg["params"]
    assert note["volumeID"] == reply["volumeID"]
    assert note["lastUpdated"] == reply["lastUpdated"]
    assert note["entities"] == 2 and note["failedCount"] == 1
    assert note["failed"][0]["id"] == broken and "malformed" in note["failed"][0]["error"]
    listed = entities(dom)
    assert sorted(e["name"] for e in listed["entities"]) == ["vm-0", "vm-1"]
    assert [e["id"] for e in listed["invalidEntities"]] == [broken]
    assert get_store(a, dom.sd)[2] == tar

    status, waited = put_store(a, dom.sd, tar, query="wait=index")
    assert status == 200, waited
    assert waited["index"]["state"] == "ready" and waited["index"]["entities"] == 2
    assert [f["id"] for f in waited["index"]["failed"]] == [broken]
    assert waited["index"]["seconds"] >= 0

    status, refused = put_store(a, dom.sd, tar, chunked=True, query="check=xml")
    assert status == 400, refused
    assert broken in refused["error"]["message"]
    assert "malformed" in refused["error"]["message"]
    assert get_store(a, dom.sd)[2] == tar  # the newest good store is untouched
    good = store_tar(dom.sd, ents)
    status, strict = put_store(a, dom.sd, good, query="check=xml&wait=index")
    assert status == 200, strict
    assert strict["index"]["entities"] == 2 and strict["index"]["failedCount"] == 0
    for query in ("check=everything", "wait=forever"):
        status, reply = put_store(a, dom.sd, good, query=query)
        assert status == 400 and reply["error"]["code"] == 1000, (query, reply)
    assert get_store(a, dom.sd)[2] == good


def test_single_entity_update_and_remove(dom: DomainUnderTest) -> None:
    a = dom.agent
    ents = [entity_ovf(f"vm-{i}") for i in range(3)]
    put_store(a, dom.sd, store_tar(dom.sd, ents, {ents[0][0]: 1}))
    target, _ = ents[1]
    renamed = entity_ovf("renamed", target)[1]
    with dom.client as c:
        result = c.call("StorageDomain.updateOVFEntity", {"storagedomainID": dom.sd,
                                                          "entityID": target,
                                                          "ovf": renamed.decode()})
        assert result["entities"] == 3
        got = c.call("StorageDomain.getOVFEntity", {"storagedomainID": dom.sd,
                                                    "entityID": target})
        assert got["ovf"].encode() == renamed
        assert got["entity"]["name"] == "renamed"
        listed = {e["id"]: e for e in entities(dom)["entities"]}
        assert listed[ents[0][0]]["status"] == 1  # metadata.json carried over
        new_id, new_ovf = entity_ovf("added")
        c.call("StorageDomain.updateOVFEntity", {"storagedomainID": dom.sd,
                                                 "entityID": new_id, "ovf": new_ovf.decode()})
        c.call("StorageDomain.removeOVFEntity", {"storagedomainID": dom.sd,
                                                 "entityID": ents[2][0]})
        assert {e["id"] for e in entities(dom)["entities"]} == {ents[0][0], target, new_id}
        with pytest.raises(ServerError) as e:
            c.call("StorageDomain.removeOVFEntity", {"storagedomainID": dom.sd,
                                                     "entityID": ents[2][0]})
        assert e.value.code == 320
        with pytest.raises(ServerError) as e:  # OVF for another entity
            c.call("StorageDomain.updateOVFEntity", {"storagedomainID": dom.sd,
                                                     "entityID": str(uuid.uuid4()),
                                                     "ovf": renamed.decode()})
        assert e.value.code == 1000
    # The rebuilt tar is a proper archive anybody can read.
    _, _, body = get_store(a, dom.sd)
    with tarfile.open(fileobj=io.BytesIO(body)) as tar:
        names = tar.getnames()
        ovfs = {m.name[:-4]: tar.extractfile(m).read()  # type: ignore[union-attr]
                for m in tar.getmembers() if m.name.endswith(".ovf")}
    assert names[0] == "info.json" and names[-1] == "metadata.json"
    # The edits' index knows where each OVF is in the new store: each entity is read
    # alone, not by reading the store through.
    seen = len(a.log_text())
    with dom.client as c:
        for entity_id, ovf in ovfs.items():
            got = c.call("StorageDomain.getOVFEntity", {"storagedomainID": dom.sd,
                                                        "entityID": entity_id})
            assert got["ovf"].encode() == ovf
    assert "reading the store for" not in a.log_text()[seen:]


def test_concurrent_edits_and_uploads_lose_nothing(dom: DomainUnderTest) -> None:
    """Edits rebuild the store from its newest copy under the domain's upload lock: of
    several edits racing each other (and an upload they must follow), none is lost."""
    base = [entity_ovf(f"base-{i}") for i in range(2)]
    put_store(dom.agent, dom.sd, store_tar(dom.sd, base))
    added = [entity_ovf(f"added-{i}") for i in range(6)]
    errors: list[BaseException] = []

    def edit(entity_id: str, ovf: bytes) -> None:
        try:
            with dom.client as c:
                c.call("StorageDomain.updateOVFEntity", {"storagedomainID": dom.sd,
                                                         "entityID": entity_id,
                                                         "ovf": ovf.decode()})
        except BaseException as e:  # reported below, with the test's own words
            errors.append(e)

    threads = [threading.Thread(target=edit, args=entity) for entity in added]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors, errors
    assert {e["id"] for e in entities(dom)["entities"]} == \
        {eid for eid, _ in base + added}


MEMORY_LIST = re.compile(r"<Memory>([^<]*)</Memory>")


def test_unregistered_disks(dom: DomainUnderTest) -> None:
    """The engine's rules (GetUnregisteredDisksQuery, GetUnregisteredDiskQuery,
    OvfUtils.fetchVmDisks/fetchMemoryDisks): an image is a floating disk when no OVF
    of the newest store refers to it - by References or as a snapshot's memory disk -
    it is no OVF_STORE and no memory disk, and it has a single volume."""
    mb = 1 << 20
    img_claimed, _ = dom.create_volume(size=mb)
    img_floating, vol_floating = dom.create_volume(
        size=mb, desc='{"DiskAlias":"orphan-disk","DiskDescription":"left behind"}')
    # The sample's snapshot memory: items 2 and 4 of its <Memory> list are our images.
    img_mem_dump, _ = dom.create_volume(size=mb, disk_type="MEMD")
    img_mem_meta, _ = dom.create_volume(size=mb, disk_type="MEMM")
    img_mem_data, _ = dom.create_volume(size=mb)  # a memory disk that says only DATA
    # Memory disks no OVF names: by DISKTYPE, and by the engine's description or alias.
    dom.create_volume(size=mb, disk_type="MEMD")
    dom.create_volume(size=mb, disk_type="MEMM")
    dom.create_volume(size=mb, desc=json.dumps({
        "DiskAlias": "vm1_snapshot_memory",
        "DiskDescription": "Memory snapshot disk for snapshot 'snap' of VM 'vm1' "
                           f"(VM ID: '{uuid.uuid4()}')"}))
    dom.create_volume(size=mb, desc=json.dumps({"DiskAlias": "vm1_hibernation_metadata",
                                                "DiskDescription": ""}))
    # An image with a snapshot: not registrable, not listed.
    img_chain, base = dom.create_volume(size=mb, fmt=COW)
    dom.create_volume(img_chain, size=mb, fmt=COW, parent=base)
    # Named only by an OVF that does not parse (it has no entity id): not floating.
    img_in_bad, _ = dom.create_volume(size=mb)

    eid, ovf = entity_ovf("owner")
    text = ovf.decode()
    old_img = text.split('ovf:fileRef="', 1)[1].split("/", 1)[0]
    text = text.replace(old_img, img_claimed)
    guids = MEMORY_LIST.search(text)
    assert guids is not None
    memory = guids.group(1).split(",")
    memory[2], memory[4] = img_mem_dump, img_mem_meta
    text = text.replace(guids.group(1), ",".join(memory))
    # A second VM whose only memory snapshot names the DATA image as its dump disk.
    eid2, ovf2 = entity_ovf("owner-2")
    text2 = ovf2.decode().replace(guids.group(1), ",".join(
        [*memory[:2], img_mem_data, *memory[3:4], BLANK, BLANK]))
    bad_id = str(uuid.uuid4())
    envelope = '<ovf:Envelope xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/1/">'
    bad = (f'{envelope}<References><File ovf:href="{img_in_bad}/{uuid.uuid4()}"/>'
           "</References><Content><Name>x</Name></Content></ovf:Envelope>").encode()
    status, reply = put_store(dom.agent, dom.sd, store_tar(
        dom.sd, [(eid, text.encode()), (eid2, text2.encode()), (bad_id, bad)]))
    assert status == 200, reply
    listed = entities(dom)
    assert [e["id"] for e in listed["invalidEntities"]] == [bad_id]
    snaps = {e["id"]: e["snapshots"] for e in listed["entities"]}
    assert snaps[eid][1]["memoryDisks"] == [img_mem_dump, img_mem_meta]
    assert snaps[eid2][1]["memoryDisks"] == [img_mem_data]
    assert len(stores(dom)) == 2  # the OVF_STORE images: on the domain, never listed

    with dom.client as c:
        floating = c.call("StorageDomain.getUnregisteredDisks", {"storagedomainID": dom.sd})
    assert [d["imageID"] for d in floating] == [img_floating]
    assert floating[0]["volumeIDs"] == [vol_floating]
    assert (floating[0]["alias"], floating[0]["description"]) == ("orphan-disk", "left behind")

    # Once its VM is gone from the store, the claimed image floats; the memory disks of
    # that VM's snapshot are still memory disks by their DISKTYPE.
    with dom.client as c:
        c.call("StorageDomain.removeOVFEntity", {"storagedomainID": dom.sd, "entityID": eid})
        floating = c.call("StorageDomain.getUnregisteredDisks", {"storagedomainID": dom.sd})
    assert sorted(d["imageID"] for d in floating) == sorted([img_floating, img_claimed])


def test_entities_survive_detach_and_attach_to_a_new_pool(env: StorageEnv,
                                                          tmp_path: Path) -> None:
    a = env.agent()
    master1 = make_localfs_domain(a, tmp_path / "m1")
    master2 = make_localfs_domain(a, tmp_path / "m2")
    data = make_block_domain(a, env.farm)
    tar, names = make_store(data.sd, 3)
    assert put_store(a, data.sd, tar)[0] == 200
    sp1, sp2 = str(uuid.uuid4()), str(uuid.uuid4())
    with a.client() as c:
        c.call("StoragePool.create", {"storagepoolID": sp1, "name": "dc1",
                                      "masterSdUUID": master1.sd, "masterVersion": 1,
                                      "domainList": [master1.sd, data.sd]})
        c.call("StorageDomain.detach", {"storagedomainID": data.sd, "storagepoolID": sp1})
        c.call("StoragePool.create", {"storagepoolID": sp2, "name": "dc2",
                                      "masterSdUUID": master2.sd, "masterVersion": 1,
                                      "domainList": [master2.sd]})
        c.call("StorageDomain.attach", {"storagedomainID": data.sd, "storagepoolID": sp2})
    other = env.agent("other-host")  # a host that never saw the domain
    with other.client() as c:
        listed = c.call("StorageDomain.getOVFEntities", {"storagedomainID": data.sd})
    assert {e["id"]: e["name"] for e in listed["entities"]} == names
    assert get_store(other, data.sd)[2] == tar


def test_a_formatted_domain_leaves_no_kept_index(domains: SharedDomains,
                                                   tmp_path: Path) -> None:
    # Its kept index files (and what is in memory) go with it, not left for ever in
    # the state dir.
    dom = make_localfs_domain(domains.agent, tmp_path / "formatted")
    a = dom.agent
    tar, _ = make_store(dom.sd, 3, "gone")
    status, reply = put_store(a, dom.sd, tar, query="wait=index")
    assert status == 200 and reply["index"]["state"] == "ready", reply
    kept = a.state_dir / "ovf-index"
    eventually(lambda: list(kept.glob(f"{dom.sd}.*.json")), 30, "the index kept on disk")
    with dom.client as c:
        c.call("StorageDomain.format", {"storagedomainID": dom.sd, "autoDetach": True})
    assert not list(kept.glob(f"{dom.sd}.*.json"))


def test_a_stalled_upload_holds_no_thread_blocking_work_needs(agent_factory: Any,
                                                               tmp_path: Path) -> None:
    # The body is read by a thread of the upload server's own pool: with a single
    # thread for blocking work (LVM, fsync, metadata reads), a client that stops
    # sending mid-body must not take it from every other verb.
    a = agent_factory(config={"daemon": {"worker_threads": 1},
                              "storage": {"upload_stall_timeout": 300}})
    dom = make_localfs_domain(a, tmp_path / "one-thread")
    tar, _ = make_store(dom.sd, 50, "slow")
    with dom.client as c:
        earlier = set(c.call("Host.getJobs"))
    s = start_put(a, dom.sd, tar, len(tar) // 3)
    try:
        def receiving() -> bool:
            with dom.client as c:
                return any(j["status"] == "running" and j.get("bytes_done")
                           for jid, j in c.call("Host.getJobs").items() if jid not in earlier)

        eventually(receiving, 60, "the upload receiving")
        # A verb that reads the domain's metadata in the blocking pool answers now,
        # not after the stall timeout (300 s, beyond this call's timeout).
        with a.client(timeout=30) as c:
            info = c.call("StorageDomain.getInfo", {"storagedomainID": dom.sd})
        assert info["uuid"] == dom.sd
    finally:
        s.close()


_COMMAND = re.compile(r"vdsmlite\.storage\.commands (?:\[req=[^\]]*\] )?(\S+)(?: --(\S+))?")


def test_a_block_uploads_index_reuses_the_volume_the_upload_prepared(
        domains: SharedDomains) -> None:
    # An upload prepares its store's volume once for itself and its index job: one
    # lvs (the stores' scan) and one loop device an upload. The index job used to find
    # the LV and map it again after the upload had let it go, and once more to read
    # the whole store back for its digest (now computed as it is written).
    with domains.lend("block-512") as dom:
        a = dom.agent
        tar, _ = make_store(dom.sd, 3)
        status, first = put_store(a, dom.sd, tar, query="wait=index")  # stores made
        assert status == 200 and first["index"]["state"] == "ready", first

        def settled() -> bool:  # the index job keeps the index on disk after the reply
            return all(j["status"] != "running" for j in call(a, "Host.getJobs").values())

        eventually(settled, 60, "the first upload's index job to end")
        seen = len(a.log_text())
        status, reply = put_store(a, dom.sd, tar, query="wait=index")
        assert status == 200 and reply["index"]["state"] == "ready", reply
        assert reply["volumeID"] != first["volumeID"]  # the other store this time
        eventually(settled, 60, "the second upload's index job to end")
        commands = [m.groups() for m in _COMMAND.finditer(a.log_text()[seen:])]
        assert commands.count(("lvs", "config")) == 1, commands
        assert commands.count(("losetup", "find")) == 1, commands
        assert commands.count(("losetup", "detach")) == 1, commands  # released once
        assert get_store(a, dom.sd)[2] == tar


def test_a_store_cut_into_more_ranges_than_are_queued_is_indexed_whole(
        domains: SharedDomains) -> None:
    # The parsers get a few byte ranges each at a time (OvfIndex.RANGES_QUEUED), the
    # next as one comes back, in archive order: none lost, none twice.
    entity_count = 24
    padded, names = [], {}
    for i in range(entity_count):
        entity_id, data = entity_ovf(f"ranged-{i}")
        head, rest = data.split(b"?>", 1)
        padded.append((entity_id, head + b"?><!--" + b"p" * (1 << 20) + b"-->" + rest))
        names[entity_id] = f"ranged-{i}"
    with domains.lend("localfs") as dom:
        tar = store_tar(dom.sd, padded)
        # the default 2 parser processes, 2 ranges queued each: 4 at a time of 12
        assert len(tar) // tarstream.SPLIT_BYTES >= 3 * 2 * OvfIndex.RANGES_QUEUED
        status, reply = put_store(dom.agent, dom.sd, tar, query="wait=index")
        assert status == 200 and reply["index"]["entities"] == entity_count, reply
        listed = entities(dom)
        assert {e["id"]: e["name"] for e in listed["entities"]} == names
        assert not listed["invalidEntities"]
