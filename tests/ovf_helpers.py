"""OVF_STORE archives for tests, built with Python's tarfile (an independent writer)."""

from __future__ import annotations

import io
import json
import os
import re
import tarfile
import time
import uuid
from pathlib import Path

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


def make_store(sd: str, count: int, prefix: str = "vm") -> tuple[bytes, dict[str, str]]:
    """A store of `count` entities named <prefix>-<n>; returns (tar, {id: name})."""
    entities = [entity_ovf(f"{prefix}-{i}") for i in range(count)]
    names = {}
    for (eid, data), i in zip(entities, range(count), strict=True):
        names[eid] = f"{prefix}-{i}"
        assert data
    return store_tar(sd, entities), names
