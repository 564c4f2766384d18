"""Storage pools: the set of domains a host serves, anchored on a master domain.

Kept minimal but honest: the pool exists only on storage, in the master
domain's metadata (``ROLE=Master``, ``POOL_DESCRIPTION``, ``POOL_DOMAINS``
as ``<sd>:<Active|Attached>,...``, ``POOL_SPM_ID``, ``POOL_SPM_LVER``,
``MASTER_VERSION``), and each member's ``POOL_UUID``. Connecting a pool makes
this host serve it: links ``<repository>/<spUUID>/<sdUUID>`` and ``mastersd``,
and the host id later used to join each domain's sanlock lockspace. A host
serves at most one pool.

Detaching follows VDSM: the domain loses the pool from ``POOL_UUID`` and goes
back to ``ROLE=Regular``; attaching it to another pool later keeps every
image, which is how a domain moves between data centers.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vdsmlite import errors
from vdsmlite.storage import constants as sc
from vdsmlite.storage.domains import DomainStore
from vdsmlite.storage.sd import (
    K_MASTER_VERSION,
    K_POOL_DESCRIPTION,
    K_POOL_DOMAINS,
    K_POOL_SPM_ID,
    K_POOL_SPM_LVER,
    K_POOL_UUID,
    K_ROLE,
    Domain,
    parse_pools,
)

log = logging.getLogger("vdsmlite.storage.pool")

ACTIVE, ATTACHED = "Active", "Attached"


def parse_pool_domains(value: str) -> dict[str, str]:
    out = {}
    for item in value.split(","):
        sd, sep, status = item.partition(":")
        if sep and sd:
            out[sd] = status.capitalize()
    return out


def format_pool_domains(domains: dict[str, str]) -> str:
    return ",".join(f"{sd}:{status}" for sd, status in sorted(domains.items()))


@dataclass
class ConnectedPool:
    uuid: str
    host_id: int
    master_uuid: str
    master_version: int
    domains: dict[str, str] = field(default_factory=dict)


class PoolManager:
    def __init__(self, store: DomainStore, repository: Path) -> None:
        self.store = store
        self.repository = repository
        self.connected: ConnectedPool | None = None
        self._lock = threading.RLock()

    # --- helpers -------------------------------------------------------------------------

    def find_master(self, sp_uuid: str) -> Domain:
        if self.connected is not None and self.connected.uuid == sp_uuid:
            return self.store.get(self.connected.master_uuid)
        for dom in self.store.scan().values():
            try:
                md = dom.read_metadata()
            except errors.VdsmError:
                continue
            if md.get(K_ROLE) == sc.ROLE_MASTER and sp_uuid in parse_pools(md.get(K_POOL_UUID,
                                                                                    "")):
                return dom
        raise errors.StoragePoolMasterNotFound(sp_uuid, None)

    def _set_member_status(self, sp_uuid: str, sd_uuid: str, status: str | None) -> None:
        master = self.find_master(sp_uuid)
        with master.lock:
            md = master.read_metadata()
            members = parse_pool_domains(md.get(K_POOL_DOMAINS, ""))
            if status is None:
                members.pop(sd_uuid, None)
            else:
                members[sd_uuid] = status
            md[K_POOL_DOMAINS] = format_pool_domains(members)
            master.write_metadata(md)
        if self.connected is not None and self.connected.uuid == sp_uuid:
            self.connected.domains = members
            self._link(sp_uuid, sd_uuid, None if status is None else self.store.get(sd_uuid))

    def _pool_dir(self, sp_uuid: str) -> Path:
        return self.repository / sp_uuid

    def _link(self, sp_uuid: str, name: str, dom: Domain | None) -> None:
        link = self._pool_dir(sp_uuid) / name
        with contextlib.suppress(FileNotFoundError):
            link.unlink()
        if dom is not None:
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(dom.path)

    # --- verbs -------------------------------------------------------------------------

    def create(self, sp_uuid: str, name: str, master_uuid: str, master_version: int,
               domain_list: list[str]) -> None:
        if len(name) > sc.MAX_POOL_DESCRIPTION_SIZE:
            raise errors.InvalidParameterException("name", name)
        if master_uuid not in domain_list:
            raise errors.InvalidParameterException("masterSdUUID", "not in domainList")
        with self._lock:
            domains = [self.store.get(sd) for sd in domain_list]
            for dom in domains:
                pools = dom.pools()
                if pools and pools != [sp_uuid]:
                    raise errors.StorageDomainAlreadyAttached(pools[0], dom.uuid)
            for dom in domains:
                if dom.uuid != master_uuid:
                    dom.update_metadata(**{K_POOL_UUID: sp_uuid})
            master = next(d for d in domains if d.uuid == master_uuid)
            master.update_metadata(**{
                K_POOL_UUID: sp_uuid, K_ROLE: sc.ROLE_MASTER, K_POOL_DESCRIPTION: name,
                K_POOL_DOMAINS: format_pool_domains({d.uuid: ACTIVE for d in domains}),
                K_POOL_SPM_ID: "-1", K_POOL_SPM_LVER: "-1",
                K_MASTER_VERSION: str(master_version),
            })
            log.info("created pool %s with master %s and %d domain(s)", sp_uuid, master_uuid,
                     len(domains))

    def connect(self, sp_uuid: str, host_id: int, master_uuid: str, master_version: int,
                domain_dict: dict[str, str] | None) -> ConnectedPool:
        with self._lock:
            if self.connected is not None:
                if self.connected.uuid != sp_uuid:
                    raise errors.CannotConnectMultiplePools(sp_uuid, self.connected.uuid)
                return self.connected
            try:
                master = self.store.get(master_uuid)
            except errors.StorageDomainDoesNotExist as e:
                raise errors.StoragePoolMasterNotFound(sp_uuid, master_uuid) from e
            md = master.read_metadata()
            if md.get(K_ROLE) != sc.ROLE_MASTER or \
                    sp_uuid not in parse_pools(md.get(K_POOL_UUID, "")):
                raise errors.StoragePoolMasterNotFound(sp_uuid, master_uuid)
            if int(md.get(K_MASTER_VERSION, "0")) != master_version:
                raise errors.StoragePoolWrongMaster(master_uuid, sp_uuid)
            members = parse_pool_domains(md.get(K_POOL_DOMAINS, ""))
            if domain_dict:
                members = {sd: status.capitalize() for sd, status in domain_dict.items()}
            pool = ConnectedPool(sp_uuid, host_id, master_uuid, master_version, members)
            pool_dir = self._pool_dir(sp_uuid)
            shutil.rmtree(pool_dir, ignore_errors=True)
            pool_dir.mkdir(parents=True)
            for sd_uuid in members:
                try:
                    self._link(sp_uuid, sd_uuid, self.store.get(sd_uuid))
                except errors.StorageDomainDoesNotExist:
                    log.warning("pool %s: domain %s not visible on this host", sp_uuid, sd_uuid)
            self._link(sp_uuid, "mastersd", master)
            self.connected = pool
            log.info("connected pool %s as host id %d", sp_uuid, host_id)
            return pool

    def disconnect(self, sp_uuid: str) -> None:
        with self._lock:
            if self.connected is None or self.connected.uuid != sp_uuid:
                raise errors.StoragePoolUnknown(sp_uuid)
            shutil.rmtree(self._pool_dir(sp_uuid), ignore_errors=True)
            self.connected = None
            log.info("disconnected pool %s", sp_uuid)

    def info(self, sp_uuid: str) -> dict[str, Any]:
        master = self.find_master(sp_uuid)
        md = master.read_metadata()
        members = parse_pool_domains(md.get(K_POOL_DOMAINS, ""))
        dominfo = {}
        for sd_uuid, status in members.items():
            entry: dict[str, Any] = {"status": status, "alerts": [], "isoprefix": ""}
            try:
                dom = self.store.get(sd_uuid)
                stats = dom.stats()
                entry.update(version=dom.read_version(), disktotal=stats["disktotal"],
                             diskfree=stats["diskfree"])
            except errors.VdsmError as e:
                entry["alerts"] = [{"code": e.code, "message": e.message}]
            dominfo[sd_uuid] = entry
        connected = self.connected is not None and self.connected.uuid == sp_uuid
        return {
            "info": {
                "name": md.get(K_POOL_DESCRIPTION, ""),
                "type": md.get("TYPE", ""),
                "domains": format_pool_domains(members),
                "master_uuid": master.uuid,
                "master_ver": int(md.get(K_MASTER_VERSION, "0")),
                "lver": int(md.get(K_POOL_SPM_LVER, "-1")),
                "spm_id": int(md.get(K_POOL_SPM_ID, "-1")),
                "isoprefix": "",
                "pool_status": "connected" if connected else "disconnected",
                "version": md.get("VERSION", "5"),
            },
            "dominfo": dominfo,
        }

    # --- domain membership -------------------------------------------------------------

    def attach(self, sd_uuid: str, sp_uuid: str) -> None:
        with self._lock:
            dom = self.store.get(sd_uuid)
            pools = dom.pools()
            if sp_uuid in pools:
                return
            if pools:
                raise errors.StorageDomainAlreadyAttached(pools[0], sd_uuid)
            self.find_master(sp_uuid)  # the pool must exist before it can gain a member
            dom.update_metadata(**{K_POOL_UUID: sp_uuid})
            self._set_member_status(sp_uuid, sd_uuid, ATTACHED)
            log.info("attached domain %s to pool %s", sd_uuid, sp_uuid)

    def detach(self, sd_uuid: str, sp_uuid: str, force: bool) -> None:
        with self._lock:
            dom = self.store.get(sd_uuid)
            md = dom.read_metadata()
            if sp_uuid not in parse_pools(md.get(K_POOL_UUID, "")) and not force:
                raise errors.StorageDomainNotInPool(sp_uuid, sd_uuid)
            if md.get(K_ROLE) == sc.ROLE_MASTER and not force:
                raise errors.CannotDetachMasterStorageDomain(sd_uuid)
            remaining = [p for p in parse_pools(md.get(K_POOL_UUID, "")) if p != sp_uuid]
            if force:
                remaining = []  # forced detach: the domain belongs to no pool afterwards
            dom.update_metadata(**{K_POOL_UUID: ",".join(remaining), K_ROLE: sc.ROLE_REGULAR})
            if md.get(K_ROLE) != sc.ROLE_MASTER:
                try:
                    self._set_member_status(sp_uuid, sd_uuid, None)
                except errors.StoragePoolMasterNotFound:
                    if not force:
                        raise
                    log.warning("forced detach of %s: pool %s master not found", sd_uuid,
                                sp_uuid)
            log.info("detached domain %s from pool %s%s", sd_uuid, sp_uuid,
                     " (forced)" if force else "")

    def _require_member(self, sd_uuid: str, sp_uuid: str) -> Domain:
        dom = self.store.get(sd_uuid)
        if sp_uuid not in dom.pools():
            raise errors.StorageDomainNotInPool(sp_uuid, sd_uuid)
        return dom

    def activate(self, sd_uuid: str, sp_uuid: str) -> None:
        with self._lock:
            self._require_member(sd_uuid, sp_uuid)
            self._set_member_status(sp_uuid, sd_uuid, ACTIVE)

    def deactivate(self, sd_uuid: str, sp_uuid: str) -> None:
        with self._lock:
            self._require_member(sd_uuid, sp_uuid)
            self._set_member_status(sp_uuid, sd_uuid, ATTACHED)

    def domain_path(self, sp_uuid: str, dom: Domain) -> Path:
        """Where a pool member is reached through the pool (VDSM's paths)."""
        if self.connected is not None and self.connected.uuid == sp_uuid and \
                os.path.lexists(self._pool_dir(sp_uuid) / dom.uuid):
            return self._pool_dir(sp_uuid) / dom.uuid
        return dom.path
