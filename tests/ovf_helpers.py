"""OVF_STORE archives for tests, built with Python's tarfile (an independent writer)."""

from __future__ import annotations

import http.client
import io
import json
import os
import re
import socket
import tarfile
import time
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any

from fake_storage.agent import Agent
from tests.storage_helpers import BLANK, DomainUnderTest

# Real OVFs from oVirt projects (see SOURCES.md there); VDSMLITE_OVF_SAMPLES points elsewhere.
SAMPLES = Path(os.environ.get("VDSMLITE_OVF_SAMPLES",
                              Path(__file__).resolve().parent / "data" / "ovf-samples"))
ENGINE_SAMPLE = SAMPLES / "engine-vmOvfData-vm-lun-snapshots.ovf"
HE_SAMPLE = SAMPLES / "he-ha-ovf_test_v4.2.ovf"


def sample_id(text: str) -> str:
    """The entity id of a sample (OperatingSystemSection ovf:id or VirtualSystem ovf:id)."""
    m = re.search(r"ovf:id=[\"']([0-9a-fA-F-]{36})[\"'][^>]*OperatingSystemSection_Type", text) \
        or re.search(r"<VirtualSystem[^>]*ovf:id=[\"']([0-9a-fA-F-]{36})[\"']", text)
    assert m, "sample without an entity id"
    return m.group(1)


def entity_ovf(name: str, entity_id: str | None = None,
               sample: Path = ENGINE_SAMPLE) -> tuple[str, bytes]:
    """A real OVF with its id and name replaced: (id, bytes)."""
    text = sample.read_text()
    old = sample_id(text)
    new = entity_id or str(uuid.uuid4())
    text = text.replace(old, new)
    text = re.sub(r"<Name>[^<]*</Name>", f"<Name>{name}</Name>", text, count=1)
    return new, text.encode()


def build_tar(members: list[tuple[str, bytes]], *, fmt: int = tarfile.USTAR_FORMAT) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = int(time.time())
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def store_tar(sd: str, entities: list[tuple[str, bytes]],
              statuses: dict[str, int] | None = None) -> bytes:
    """An OVF_STORE tar as the engine builds it: info.json, <id>.ovf..., metadata.json."""
    info = json.dumps({"Last Updated": "Thu Feb 18 00:23:07 UTC 2016",
                       "Storage Domains": [{"uuid": sd}]}, indent=2).encode()
    meta = json.dumps({"VM Status": statuses or {}}, indent=2).encode()
    return build_tar([("info.json", info),
                      *[(f"{eid}.ovf", data) for eid, data in entities],
                      ("metadata.json", meta)])


def stamp_time(text: str) -> datetime:
    """A "Last Updated" stamp ("Thu Feb 18 00:23:07 UTC 2016", Java's Date.toString)."""
    return datetime.strptime(text, "%a %b %d %H:%M:%S %Z %Y")


def make_store(sd: str, count: int, prefix: str = "vm") -> tuple[bytes, dict[str, str]]:
    """A store of `count` entities named <prefix>-<n>; returns (tar, {id: name})."""
    entities = [entity_ovf(f"{prefix}-{i}") for i in range(count)]
    names = {}
    for (eid, data), i in zip(entities, range(count), strict=True):
        names[eid] = f"{prefix}-{i}"
        assert data
    return store_tar(sd, entities), names


# --- talking to an agent's OVF_STORE doors ---------------------------------------


def conn(agent: Agent) -> http.client.HTTPConnection:
    assert agent.tcp_address is not None
    return http.client.HTTPConnection(*agent.tcp_address, timeout=120)


def put_store(agent: Agent, sd: str, data: bytes, chunked: bool = False,
              query: str = "") -> tuple[int, Any]:
    """PUT /ovfstore/<sd>[?query]: (status, the JSON reply)."""
    c = conn(agent)
    url = f"/ovfstore/{sd}" + (f"?{query}" if query else "")
    try:
        if chunked:
            chunks = (data[i:i + 65536] for i in range(0, len(data), 65536))
            c.request("PUT", url, body=chunks,
                      headers={"Transfer-Encoding": "chunked"}, encode_chunked=True)
        else:
            c.request("PUT", url, body=data)
        resp = c.getresponse()
        return resp.status, json.loads(resp.read() or b"null")
    finally:
        c.close()


def get_store(agent: Agent, sd: str) -> tuple[int, dict[str, str], bytes]:
    c = conn(agent)
    try:
        c.request("GET", f"/ovfstore/{sd}")
        resp = c.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        c.close()


def entities(dom: DomainUnderTest) -> dict[str, Any]:
    with dom.client as c:
        return c.call("StorageDomain.getOVFEntities", {"storagedomainID": dom.sd})


def stores(dom: DomainUnderTest) -> dict[str, dict[str, Any]]:
    """vol -> description JSON of each OVF_STORE volume."""
    out = {}
    with dom.client as c:
        for img in c.call("StorageDomain.getImages", {"storagedomainID": dom.sd}):
            for vol in c.call("StorageDomain.getVolumes", {"storagedomainID": dom.sd,
                                                           "storagepoolID": BLANK,
                                                           "imageID": img}):
                info = c.call("Volume.getInfo", dom.vol_params(img, vol))
                if info.get("disktype") == "OVFS":
                    out[vol] = json.loads(info["description"])
    return out


def start_put(agent: Agent, sd: str, body: bytes, send: int) -> socket.socket:
    """A sized PUT /ovfstore of `body` of which only the first `send` bytes are sent
    (the caller sends more, stalls, or cuts the connection)."""
    assert agent.tcp_address is not None
    s = socket.create_connection(agent.tcp_address, timeout=120)
    s.sendall(f"PUT /ovfstore/{sd} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n"
              .encode() + body[:send])
    return s
