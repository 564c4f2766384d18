"""OVF_STORE commit protocol under SIGKILL, unreadable stores and concurrent uploads.

The daemon SIGKILLs itself (vdsmlite.failpoints) at each step of an upload of
several O_DIRECT buffers that reaches the disk: after the data is written and
before fdatasync, after fdatasync, after the ``Updated:true`` write. Restarted,
it must serve the previous good store byte for byte until the ``Updated:true``
write is on storage, and the new one after it.
"""

from __future__ import annotations

import http.client
import io
import json
import os
import tarfile
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.helpers import eventually
from tests.ovf_helpers import (
    entities,
    entity_ovf,
    get_store,
    make_store,
    put_store,
    start_put,
    store_tar,
    stores,
)
from tests.storage_helpers import (
    DomainUnderTest,
    SharedDomains,
    StorageEnv,
    join_lockspace,
    write_durably,
)
from vdsmlite.storage import streamio

pytestmark = pytest.mark.root

MiB = 1 << 20
# Before the Updated:true write: the previous store is served after a restart.
BEFORE_UPDATED = ["streamio.finish.before_fdatasync", "ovfstore.commit.after_fdatasync"]
AFTER_UPDATED = ["ovfstore.commit.after_updated"]


@pytest.fixture(scope="module")
def domains(module_env: StorageEnv) -> SharedDomains:
    return SharedDomains(module_env).build("block-512", "localfs")


@pytest.fixture(params=["block", "localfs"])
def dom(request: pytest.FixtureRequest, domains: SharedDomains) -> Iterator[DomainUnderTest]:
    with domains.lend("localfs" if request.param == "localfs" else "block-512") as d:
        yield d


def big_store(sd: str, prefix: str, count: int = 4) -> tuple[bytes, dict[str, str]]:
    """A store just over two upload buffers: `count` OVFs padded with an XML comment."""
    pad = (2 * streamio.DEFAULT_BUFFER + MiB) // count
    ents, names = [], {}
    for i in range(count):
        eid, data = entity_ovf(f"{prefix}-{i}")
        head, rest = data.split(b"?>", 1)
        ents.append((eid, head + b"?><!--" + b"p" * pad + b"-->" + rest))
        names[eid] = f"{prefix}-{i}"
    tar = store_tar(sd, ents)
    assert len(tar) > 2 * streamio.DEFAULT_BUFFER
    return tar, names


def restart(dom: DomainUnderTest, failpoint: str | None) -> None:
    agent = dom.agent
    # A clean stop, then a join at once: before activation waited for loops being
    # detached, this join read a dead loop now and then and never got its host id.
    agent.stop()
    agent.extra_env.pop("VDSMLITE_FAILPOINTS", None)
    if failpoint is not None:
        agent.extra_env["VDSMLITE_FAILPOINTS"] = failpoint
    agent.start()
    if dom.kind != "localfs":
        join_lockspace(agent, dom.sd)


def listed(dom: DomainUnderTest) -> dict[str, str]:
    return {e["id"]: e["name"] for e in entities(dom)["entities"]}


# Every step on the local domain; on block (each case there costs two lockspace joins,
# about 10 s) the step where torn data sits on the LV unsynced.
CRASH_CASES = [("localfs", step) for step in BEFORE_UPDATED + AFTER_UPDATED] + \
    [("block", "streamio.finish.before_fdatasync")]


@pytest.mark.parametrize("dom, step", CRASH_CASES, indirect=["dom"])
def test_sigkill_at_each_commit_step(dom: DomainUnderTest, step: str) -> None:
    a = dom.agent
    good, good_names = make_store(dom.sd, 2, "good")
    status, first = put_store(a, dom.sd, good)
    assert status == 200, first
    new, new_names = big_store(dom.sd, "new")
    restart(dom, step)
    try:
        try:
            status, reply = put_store(a, dom.sd, new)
        except (ConnectionError, http.client.HTTPException):
            pass  # the daemon died under the request, as it should
        else:
            raise AssertionError(f"the upload survived failpoint {step}: {status} {reply}")
        assert a.wait(60) == -9
        assert f"failpoint {step}" in a.log_text()
    finally:
        a.extra_env.pop("VDSMLITE_FAILPOINTS", None)
    restart(dom, None)

    descs = stores(dom)
    target = next(v for v in descs if v != first["volumeID"])
    assert descs[first["volumeID"]]["Updated"] is True
    assert descs[first["volumeID"]]["Size"] == len(good)
    if step in BEFORE_UPDATED:
        assert descs[target]["Updated"] is False  # the torn store says so
        assert get_store(a, dom.sd)[2] == good
        assert listed(dom) == good_names
    else:
        assert descs[target]["Updated"] is True and descs[target]["Size"] == len(new)
        status, headers, body = get_store(a, dom.sd)
        assert status == 200 and headers["x-ovf-store-volume"] == target
        assert body == new
        assert listed(dom) == new_names


def test_unreadable_newest_store_falls_back_to_the_older(dom: DomainUnderTest) -> None:
    a = dom.agent
    older, older_names = make_store(dom.sd, 2, "older")
    status, r1 = put_store(a, dom.sd, older)
    assert status == 200, r1
    newer, _ = make_store(dom.sd, 3, "newer")
    status, r2 = put_store(a, dom.sd, newer)
    assert status == 200, r2
    assert r2["volumeID"] != r1["volumeID"]
    # Restarted, so nothing read before the corruption is remembered.
    restart(dom, None)
    path = dom.prepare(r2["imageID"], r2["volumeID"])
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, b"\xff" * 4096, 0)  # the first tar header's checksum is gone
        os.fsync(fd)
    finally:
        os.close(fd)
    dom.teardown(r2["imageID"], r2["volumeID"])
    descs = stores(dom)
    assert descs[r2["volumeID"]]["Updated"] is True  # still claims to be the newest good one
    mark = a.log_size()
    assert listed(dom) == older_names
    status, headers, body = get_store(a, dom.sd)
    assert status == 200 and body == older
    assert headers["x-ovf-store-volume"] == r1["volumeID"]
    log = a.log_text()[mark:]
    assert f"OVF_STORE {r2['imageID']}/{r2['volumeID']} of {dom.sd} is unreadable" in log

    # A failed upload must not take the one store that reads: it lands on the corrupt
    # newest one (which still says Updated:true), never on the older good one.
    bad = bytearray(make_store(dom.sd, 2, "bad")[0])
    bad[0] ^= 1  # the first header's checksum
    status, refused = put_store(a, dom.sd, bytes(bad))
    assert status == 400, refused
    descs = stores(dom)
    assert descs[r1["volumeID"]]["Updated"] is True
    assert descs[r2["volumeID"]]["Updated"] is False
    assert get_store(a, dom.sd)[2] == older
    status, r3 = put_store(a, dom.sd, newer)
    assert status == 200 and r3["volumeID"] == r2["volumeID"], r3
    assert get_store(a, dom.sd)[2] == newer


def overwrite(dom: DomainUnderTest, img: str, vol: str, offset: int, data: bytes) -> None:
    """Change the bytes of a volume behind the agent's back."""
    write_durably(dom.prepare(img, vol), offset, data)
    dom.teardown(img, vol)


def test_kept_index_is_used_after_restart_only_while_the_store_is_unchanged(
        dom: DomainUnderTest) -> None:
    a = dom.agent
    tar, names = make_store(dom.sd, 3, "kept")
    status, reply = put_store(a, dom.sd, tar, query="wait=index")
    assert status == 200 and reply["index"]["entities"] == 3, reply
    restart(dom, None)
    mark = a.log_size()
    assert listed(dom) == names
    log = a.log_text()[mark:]
    assert "kept index of 3 entities checked" in log
    assert " indexed: " not in log  # no OVF parsed again
    # One entity is read from where the index says it is.
    with tarfile.open(fileobj=io.BytesIO(tar)) as archive:
        member = archive.extractfile(f"{next(iter(names))}.ovf")
        assert member is not None
        expected = member.read()
    with dom.client as c:
        got = c.call("StorageDomain.getOVFEntity",
                     {"storagedomainID": dom.sd, "entityID": next(iter(names))})
    assert got["ovf"].encode() == expected
    assert "as indexed; reading the store" not in a.log_text()[mark:]

    # Same Last Updated and Size, other bytes (a name in one OVF, framing intact): the
    # kept index is not believed.
    first_id = next(iter(names))
    offset = tar.index(b"<Name>kept-0</Name>")
    overwrite(dom, reply["imageID"], reply["volumeID"], offset - offset % 512,
              tar[offset - offset % 512:offset + 512 - offset % 512]
              .replace(b"<Name>kept-0</Name>", b"<Name>kept-X</Name>"))
    restart(dom, None)
    mark = a.log_size()
    assert listed(dom) == {**names, first_id: "kept-X"}
    assert "changed since it was indexed" in a.log_text()[mark:]


def test_uploads_to_one_domain_are_serialized(dom: DomainUnderTest) -> None:
    a = dom.agent
    put_store(a, dom.sd, make_store(dom.sd, 1)[0])  # both stores exist from here on
    first, _ = big_store(dom.sd, "first")
    second, _ = big_store(dom.sd, "second", count=3)
    with dom.client as c:
        earlier = set(c.call("Host.getJobs"))

    def uploads() -> dict[str, dict[str, Any]]:
        with dom.client as c:
            return {jid: j for jid, j in c.call("Host.getJobs").items()
                    if jid not in earlier and j["description"].startswith("upload OVF_STORE")}

    # The first upload is half sent and writing; the second starts meanwhile.
    sock = start_put(a, dom.sd, first, len(first) // 2)
    eventually(lambda: any(j.get("bytes_done") for j in uploads().values()), 30,
               "the first upload writing")
    replies: list[tuple[int, Any]] = []
    t = threading.Thread(target=lambda: replies.append(put_store(a, dom.sd, second)))
    t.start()
    eventually(lambda: len(uploads()) == 2, 30, "the second upload to start")
    time.sleep(0.5)  # a negative: only shown over time (unserialized, it writes in ms)
    # It waits for the domain: not a byte of it is written while the first one runs.
    writing = [j for j in uploads().values() if j.get("bytes_done")]
    assert len(writing) == 1, uploads()
    sock.sendall(first[len(first) // 2:])
    sock.settimeout(120)
    raw = b""
    while True:
        part = sock.recv(65536)
        if not part:
            break
        raw += part
        if raw.startswith(b"HTTP/1.1 ") and b"\r\n\r\n" in raw:
            head, _, body = raw.partition(b"\r\n\r\n")
            length = int(next(line.split(b":", 1)[1] for line in head.split(b"\r\n")
                              if line.lower().startswith(b"content-length:")))
            if len(body) >= length:
                break
    sock.close()
    assert raw.startswith(b"HTTP/1.1 200"), raw[:300]
    t.join(120)
    assert replies and replies[0][0] == 200, replies
    # The second saw the first's commit: it wrote the other store.
    r1 = json.loads(raw.partition(b"\r\n\r\n")[2])
    r2 = replies[0][1]
    assert r1["volumeID"] != r2["volumeID"]
    final = get_store(a, dom.sd)[2]
    assert final in (first, second)
    assert final == second  # committed last
    assert {d["Updated"] for d in stores(dom).values()} == {True}
