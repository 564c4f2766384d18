"""Finding storage domains on connected storage, including ones this host never saw.

* File domains: ``<repository>/mnt/<conn>/<sdUUID>/dom_md/metadata`` (and
  ``mnt/glusterSD/...``) on every connected mount or local link.
* Block domains: VGs named by a UUID and tagged ``RHAT_storage_domain`` on
  the host's LUNs (one udev enumeration, one ``pvs`` and one ``vgs`` call).

That is what makes "import an existing domain" work: a domain written by
another host (or by VDSM) is found by looking, not by remembering. Domain
objects are cached; a lookup that misses rescans once before answering 358.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from vdsmlite import errors
from vdsmlite.ids import parse_uuid
from vdsmlite.storage import constants as sc
from vdsmlite.storage import devices, lvm
from vdsmlite.storage.activation import Activator
from vdsmlite.storage.blocksd import BlockDomain
from vdsmlite.storage.filesd import FileDomain
from vdsmlite.storage.sd import Domain

log = logging.getLogger("vdsmlite.storage.domains")


class DomainStore:
    def __init__(self, repository: Path, activator: Activator, *, io_timeout: int = 10) -> None:
        self.repository = repository
        self.activator = activator
        self.io_timeout = io_timeout
        self._domains: dict[str, Domain] = {}
        self._guids: dict[str, str] = {}
        self._lock = threading.Lock()

    @property
    def mnt(self) -> Path:
        return self.repository / "mnt"

    # --- block devices -----------------------------------------------------------------

    def lun_nodes(self) -> dict[str, str]:
        """LUN device node -> GUID, refreshed from udev."""
        found = {lun.node: lun.guid for lun in devices.discover()}
        self._guids = found
        return found

    def guid_of(self, node: str) -> str:
        return self._guids.get(node) or Path(node).name

    # --- scanning ------------------------------------------------------------------------

    def _scan_file(self) -> dict[str, Domain]:
        found: dict[str, Domain] = {}
        roots = []
        for base in (self.mnt, self.mnt / "glusterSD"):
            try:
                roots += [p for p in base.iterdir()
                          if p.name not in (sc.BLOCKSD_DIR, "glusterSD")]
            except FileNotFoundError:
                continue
        for root in roots:
            try:
                entries = list(root.iterdir())
            except OSError as e:
                log.warning("cannot scan %s: %s", root, e)
                continue
            for entry in entries:
                if parse_uuid(entry.name) != entry.name:
                    continue
                if (entry / sc.DOMAIN_META_DATA / sc.METADATA).exists():
                    found[entry.name] = FileDomain(entry.name, root, io_timeout=self.io_timeout)
        return found

    def _scan_block(self) -> dict[str, Domain]:
        nodes = list(self.lun_nodes())
        if not nodes:
            return {}
        pvs = lvm.pvs(nodes)
        by_vg: dict[str, list[str]] = {}
        for pv in pvs.values():
            if pv.vg_name and parse_uuid(pv.vg_name) == pv.vg_name:
                by_vg.setdefault(pv.vg_name, []).append(pv.name)
        if not by_vg:
            return {}
        vgs = lvm.vgs(sorted({d for ds in by_vg.values() for d in ds}), sorted(by_vg))
        found: dict[str, Domain] = {}
        for name, vg in vgs.items():
            if sc.TAG_DOMAIN in vg.tags:
                found[name] = BlockDomain(name, sorted(by_vg[name]), self.activator,
                                          self.repository, self.guid_of)
        return found

    def scan(self) -> dict[str, Domain]:
        """All domains visible now (blocking; LVM and udev)."""
        found = {**self._scan_block(), **self._scan_file()}
        with self._lock:
            for sd_uuid, dom in found.items():
                cached = self._domains.get(sd_uuid)
                if cached is not None and type(cached) is type(dom) and \
                        getattr(cached, "devices", None) == getattr(dom, "devices", None) and \
                        getattr(cached, "mount_root", None) == getattr(dom, "mount_root", None):
                    found[sd_uuid] = cached  # keep held activations
            for sd_uuid, dom in self._domains.items():
                if sd_uuid not in found:
                    dom.close()
            self._domains = dict(found)
            return dict(found)

    def get(self, sd_uuid: str) -> Domain:
        with self._lock:
            dom = self._domains.get(sd_uuid)
        if dom is not None:
            return dom
        dom = self.scan().get(sd_uuid)
        if dom is None:
            raise errors.StorageDomainDoesNotExist(sd_uuid)
        return dom

    def add(self, dom: Domain) -> None:
        with self._lock:
            self._domains[dom.uuid] = dom

    def forget(self, sd_uuid: str) -> None:
        with self._lock:
            dom = self._domains.pop(sd_uuid, None)
        if dom is not None:
            dom.close()

    def close(self) -> None:
        with self._lock:
            domains, self._domains = list(self._domains.values()), {}
        for dom in domains:
            dom.close()
