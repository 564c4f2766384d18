"""Storage domains: what file and block domains share.

A `Domain` is a view of a domain on storage; it holds no state that storage
does not (metadata is re-read whenever it matters, because another host may
have changed it). Subclasses implement the layout: `FileDomain` (a directory
tree on a mount) and `BlockDomain` (an LVM VG). This module holds the parts
that are the same for both: metadata keys and their meaning, the info/stats
shapes VDSM returns. The rules of volume chains (who may be a parent, what a
snapshot must look like, what may be deleted) are `storage.image`'s.

All methods block (disk I/O, LVM); the API layer runs them in the executor.
A per-domain lock serializes structural changes made by this host.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vdsmlite import cancel, errors
from vdsmlite.storage import constants as sc
from vdsmlite.storage import directio
from vdsmlite.storage.volmeta import VolumeMetadata, truncate_description

log = logging.getLogger("vdsmlite.storage.sd")

Progress = Callable[[float], None]

# Metadata keys
K_ALIGNMENT = "ALIGNMENT"
K_BLOCK_SIZE = "BLOCK_SIZE"
K_CLASS = "CLASS"
K_DESCRIPTION = "DESCRIPTION"
K_POOL_UUID = "POOL_UUID"
K_ROLE = "ROLE"
K_SDUUID = "SDUUID"
K_TYPE = "TYPE"
K_VERSION = "VERSION"
K_REMOTE_PATH = "REMOTE_PATH"
K_VGUUID = "VGUUID"
# pool keys, on the master domain only
K_POOL_DESCRIPTION = "POOL_DESCRIPTION"
K_POOL_DOMAINS = "POOL_DOMAINS"
K_POOL_SPM_ID = "POOL_SPM_ID"
K_POOL_SPM_LVER = "POOL_SPM_LVER"
K_MASTER_VERSION = "MASTER_VERSION"

LEASE_DEFAULTS = {"IOOPTIMEOUTSEC": "10", "LEASERETRIES": "3", "LEASETIMESEC": "60",
                  "LOCKPOLICY": "", "LOCKRENEWALINTERVALSEC": "5"}


def initial_metadata(*, sd_uuid: str, storage_type: sc.StorageType, name: str,
                     domain_class: sc.DomainClass, block_size: int, alignment: int,
                     extra: dict[str, str]) -> dict[str, str]:
    md = {
        K_ALIGNMENT: str(alignment),
        K_BLOCK_SIZE: str(block_size),
        K_CLASS: domain_class.name,
        K_DESCRIPTION: name,
        K_POOL_UUID: "",
        K_ROLE: sc.ROLE_REGULAR,
        K_SDUUID: sd_uuid,
        K_TYPE: storage_type.name,
        K_VERSION: "5",
        **LEASE_DEFAULTS,
    }
    md.update(extra)
    return md


def parse_pools(value: str) -> list[str]:
    return [p for p in value.split(",") if p and p != sc.BLANK_UUID]


@dataclass(frozen=True)
class CreateVolumeRequest:
    img_uuid: str
    vol_uuid: str
    capacity: int
    format: sc.VolumeFormat
    prealloc: sc.Allocation
    disktype: str
    description: str
    parent_img: str
    parent_vol: str
    initial_size: int | None
    legal: bool
    sequence: int

    @property
    def has_parent(self) -> bool:
        return self.parent_vol != sc.BLANK_UUID


@dataclass(frozen=True)
class OpenVolume:
    """A prepared volume: where to do I/O and in what units (the domain's block size)."""

    path: Path
    block_size: int


@dataclass
class VolumeState:
    """A volume as found on storage, complete or not."""

    uuid: str
    image: str
    md: VolumeMetadata | None
    apparent_size: int
    true_size: int
    initializing: bool = False
    lease: tuple[str, int] | None = None
    children: list[str] = field(default_factory=list)
    slot: int | None = None
    problem: str | None = None
    # Where the volume lives, as the same read found it (a block domain's LV, with its
    # extents): `prepare_read_volume` maps it without reading it again.
    located: object = field(default=None, compare=False, repr=False)

    @property
    def legality(self) -> str:
        if self.initializing or self.md is None:
            return sc.ILLEGAL
        return self.md.legality

    @property
    def status(self) -> str:
        if self.md is None and not self.initializing:
            return "INVALID"
        return "ILLEGAL" if self.legality == sc.ILLEGAL else "OK"

    def info(self, sd_uuid: str) -> dict[str, Any]:
        """Volume.getInfo shape."""
        out: dict[str, Any] = {
            "uuid": self.uuid,
            "domain": sd_uuid,
            "image": self.image,
            "pool": "",
            "legality": self.legality,
            "status": self.status,
            "apparentsize": str(self.apparent_size),
            "truesize": str(self.true_size),
            "children": sorted(self.children),
            "mtime": "0",
        }
        md = self.md
        if md is not None:
            out.update({
                "type": md.type, "format": md.format, "disktype": md.disktype,
                "voltype": md.voltype, "capacity": str(md.capacity), "parent": md.parent,
                "description": md.description, "ctime": str(md.ctime),
                "generation": md.generation, "sequence": md.sequence,
            })
        if self.lease is not None:
            out["lease"] = {"path": self.lease[0], "offset": self.lease[1], "owners": [],
                            "version": None}
        if self.problem:
            out["problem"] = self.problem
        return out


class Domain(ABC):
    """One storage domain on storage this host can reach."""

    def __init__(self, sd_uuid: str) -> None:
        self.uuid = sd_uuid
        self.lock = threading.RLock()
        self._geometry: tuple[int, int] | None = None

    # --- metadata --------------------------------------------------------------

    @abstractmethod
    def read_metadata(self) -> dict[str, str]:
        """The verified metadata, fresh from storage (752 if the seal is broken)."""

    @abstractmethod
    def write_metadata(self, md: dict[str, str]) -> None:
        """Replace the metadata atomically (sealed)."""

    def update_metadata(self, **changes: str) -> dict[str, str]:
        with self.lock:
            md = self.read_metadata()
            md.update(changes)
            self.write_metadata(md)
            return md

    def remove_metadata_keys(self, *keys: str) -> None:
        with self.lock:
            md = self.read_metadata()
            for k in keys:
                md.pop(k, None)
            self.write_metadata(md)

    def read_storage_type(self) -> sc.StorageType:
        """The domain's TYPE, read from its metadata (storage I/O: off the loop)."""
        return sc.StorageType[self.read_metadata()[K_TYPE]]

    def read_version(self) -> int:
        """The domain format version, read from its metadata (storage I/O: off the loop)."""
        return int(self.read_metadata().get(K_VERSION, "0"))

    def geometry(self) -> tuple[int, int]:
        """(block_size, alignment): fixed when the domain is created, so read once."""
        if self._geometry is None:
            md = self.read_metadata()
            self._geometry = (int(md.get(K_BLOCK_SIZE, "512")),
                              int(md.get(K_ALIGNMENT, str(sc.MiB))))
        return self._geometry

    def pools(self) -> list[str]:
        return parse_pools(self.read_metadata().get(K_POOL_UUID, ""))

    @property
    @abstractmethod
    def path(self) -> Path:
        """The domain directory (file: on the mount; block: the blockSD link dir)."""

    def images_dir(self) -> Path:
        return self.path / sc.DOMAIN_IMAGES

    # --- info ----------------------------------------------------------------------

    def info(self) -> dict[str, Any]:
        md = self.read_metadata()
        return {
            "uuid": self.uuid,
            "type": md[K_TYPE],
            "class": md.get(K_CLASS, "Data"),
            "name": md.get(K_DESCRIPTION, ""),
            "role": md.get(K_ROLE, sc.ROLE_REGULAR),
            "pool": parse_pools(md.get(K_POOL_UUID, "")),
            "version": md.get(K_VERSION, "0"),
            "block_size": int(md.get(K_BLOCK_SIZE, "512")),
            "alignment": int(md.get(K_ALIGNMENT, str(sc.MiB))),
            **self._type_info(md),
        }

    @abstractmethod
    def _type_info(self, md: dict[str, str]) -> dict[str, Any]: ...

    @abstractmethod
    def stats(self) -> dict[str, Any]: ...

    # --- volumes ---------------------------------------------------------------

    @abstractmethod
    def image_ids(self) -> list[str]: ...

    @abstractmethod
    def volume_ids(self, img_uuid: str) -> list[str]: ...

    @abstractmethod
    def volume(self, img_uuid: str, vol_uuid: str) -> VolumeState:
        """The volume's state; raises VolumeDoesNotExist (201)."""

    def volumes(self, img_uuid: str) -> dict[str, VolumeState]:
        states = {v: self.volume(img_uuid, v) for v in self.volume_ids(img_uuid)}
        for state in states.values():
            if state.md is not None and state.md.parent in states:
                states[state.md.parent].children.append(state.uuid)
        return states

    def scan(self) -> dict[str, dict[str, VolumeState]]:
        """Every volume of the domain by image, children filled in, read in as few
        storage operations as the layout allows (the layouts override this)."""
        return {img: self.volumes(img) for img in self.image_ids()}

    def set_parent(self, img_uuid: str, vol_uuid: str, parent_uuid: str) -> None:
        """Make `parent_uuid` the volume's parent in its metadata (and wherever else
        the layout records it); the qcow2 backing file is the caller's."""
        self.update_volume(img_uuid, vol_uuid, parent=parent_uuid)

    def ensure_allocation(self, img_uuid: str, vol_uuid: str, size: int) -> None:  # noqa: B027
        """Make the volume's storage at least `size` bytes (block: extend the LV);
        nothing to do on layouts that grow on write."""

    def find_volume_image(self, vol_uuid: str) -> str | None:
        for img in self.image_ids():
            if vol_uuid in self.volume_ids(img):
                return img
        return None

    def new_metadata(self, req: CreateVolumeRequest, capacity: int,
                     legality: str) -> VolumeMetadata:
        return VolumeMetadata(
            domain=self.uuid, image=req.img_uuid, parent=req.parent_vol, capacity=capacity,
            format=req.format, type=req.prealloc, voltype=sc.LEAF, disktype=req.disktype,
            description=truncate_description(req.description), legality=legality,
            ctime=int(time.time()), generation=0, sequence=req.sequence)

    def create_volume(self, req: CreateVolumeRequest, progress: Progress) -> None:
        """Create a volume; a stop (`cancel`) in the middle removes what was made
        (`_undo_create`: data, metadata, link; a parent made INTERNAL is a leaf again)."""
        made: list[str] = []
        try:
            self._create_volume(req, progress, made)
        except cancel.Cancelled:
            if made:
                with cancel.shielded():
                    self._undo_create(req, made)
            raise

    @abstractmethod
    def _create_volume(self, req: CreateVolumeRequest, progress: Progress,
                       made: list[str]) -> None:
        """Create the volume, naming in `made` each step done that must be undone."""

    @abstractmethod
    def _undo_create(self, req: CreateVolumeRequest, made: list[str]) -> None:
        """Remove what a stopped `_create_volume` made (`made` says what)."""

    @abstractmethod
    def delete_volume(self, img_uuid: str, vol_uuid: str, *, post_zero: bool, force: bool,
                      progress: Progress) -> None: ...

    @abstractmethod
    def set_volume_metadata(self, img_uuid: str, vol_uuid: str, md: VolumeMetadata) -> None: ...

    def extend_volume(self, img_uuid: str, vol_uuid: str, new_size: int) -> None:
        with self.lock:
            state = self.volume(img_uuid, vol_uuid)
            if state.md is None:
                raise errors.VolumeMetadataReadError(vol_uuid, state.problem or "")
            if new_size < state.md.capacity:
                raise errors.VolumeResizeValueError(new_size)
            capacity = self._grow_volume(img_uuid, vol_uuid, state.md, new_size)
            self.set_volume_metadata(img_uuid, vol_uuid, state.md.replace(capacity=capacity))

    @abstractmethod
    def _grow_volume(self, img_uuid: str, vol_uuid: str, md: VolumeMetadata,
                     new_size: int) -> int:
        """Grow the volume's storage (and its qcow2 image) to `new_size`, under the
        domain lock; returns the capacity to record (a raw LV's is what LVM gave)."""

    @abstractmethod
    def prepare_volume(self, img_uuid: str, vol_uuid: str) -> Path:
        """Make the volume usable (activate); returns its path in the image dir."""

    def prepare_read_volume(self, state: VolumeState) -> Path:
        """`prepare_volume` for a volume the caller has just read as `state` and that
        nobody else can move or resize meanwhile (it holds the domain's SDM lease and
        the image's lock): on a block domain one ``lvs`` less."""
        return self.prepare_volume(state.image, state.uuid)

    @abstractmethod
    def teardown_volume(self, img_uuid: str, vol_uuid: str) -> None: ...

    @contextlib.contextmanager
    def opened(self, img_uuid: str, vol_uuid: str) -> Iterator[OpenVolume]:
        """The volume prepared for I/O for the duration of the block, torn down after."""
        path = self.prepare_volume(img_uuid, vol_uuid)
        try:
            block_size, _ = self.geometry()
            yield OpenVolume(path, block_size)
        finally:
            self.teardown_volume(img_uuid, vol_uuid)

    def update_volume(self, img_uuid: str, vol_uuid: str, **changes: object) -> VolumeMetadata:
        with self.lock:
            state = self.volume(img_uuid, vol_uuid)
            if state.md is None:
                raise errors.VolumeMetadataReadError(vol_uuid, state.problem or "no metadata")
            md = state.md.replace(**changes)
            # The state just read says where its metadata lives: no second lookup (on
            # a block domain, one lvs less - the OVF_STORE commit does this twice).
            self._write_volume_metadata(state, md)
            return md

    def update_read_volume(self, state: VolumeState, **changes: object) -> VolumeState:
        """`update_volume` for a volume the caller has just read as `state` and whose
        metadata nobody else can change meanwhile (it holds the domain's SDM lease and
        the image's lock): no second lookup - on a block domain one ``lvs`` less.
        Returns the volume as it now is."""
        with self.lock:
            if state.md is None:
                raise errors.VolumeMetadataReadError(state.uuid, state.problem or "no metadata")
            md = state.md.replace(**changes)
            self._write_volume_metadata(state, md)
            return dataclasses.replace(state, md=md)

    def update_volumes(self, img_uuid: str,
                       changes: dict[str, dict[str, object]]) -> dict[str, VolumeMetadata]:
        """Several volumes of one image changed under one lock and one read of the
        image (a live merge's chain change), written in the order given."""
        with self.lock:
            states = self.volumes(img_uuid)
            out: dict[str, VolumeMetadata] = {}
            for vol_uuid, fields in changes.items():
                state = states.get(vol_uuid)
                if state is None:
                    raise errors.VolumeDoesNotExist(vol_uuid)
                if state.md is None:
                    raise errors.VolumeMetadataReadError(vol_uuid,
                                                         state.problem or "no metadata")
                md = state.md.replace(**fields)
                self._write_volume_metadata(state, md)
                out[vol_uuid] = md
            return out

    def _write_volume_metadata(self, state: VolumeState, md: VolumeMetadata) -> None:
        """Write `md` for a volume just read as `state` (no second read needed)."""
        self.set_volume_metadata(state.image, state.uuid, md)

    # --- sanlock and health -------------------------------------------------------

    @abstractmethod
    def lockspace(self) -> tuple[str, str, int] | None:
        """(name, path, offset) of the domain's sanlock lockspace; None for domains
        that use no sanlock (local ones)."""

    @abstractmethod
    def leases_path(self) -> str:
        """The volume holding the domain's paxos leases (SDM at slot 1)."""

    @abstractmethod
    def xleases_path(self) -> str:
        """The external leases volume (VM and job leases), usable by sanlock here: the
        file, or the block domain's xleases LV activated and kept active."""

    def sdm_lease(self) -> tuple[str, str, list[tuple[str, int]]]:
        """(lockspace, resource, disks) of the lease that guards metadata changes."""
        _, alignment = self.geometry()
        return (self.uuid, sc.SDM_LEASE_NAME,
                [(self.leases_path(), sc.SDM_LEASE_SLOT * alignment)])

    @abstractmethod
    def health_path(self) -> Path:
        """What the domain monitor reads every cycle (the metadata, with direct I/O)."""

    def check_health(self) -> float:
        """Seconds one 4 KiB direct-I/O read of the metadata takes (VDSM's `delay`)."""
        start = time.monotonic()
        try:
            directio.read(self.health_path(), 0, 4096, block_size=4096)
        except OSError as e:
            raise errors.StorageDomainAccessError(self.uuid, str(e)) from e
        return time.monotonic() - start

    # --- lifecycle ---------------------------------------------------------------

    @abstractmethod
    def format(self) -> None:
        """Destroy the domain and everything in it."""

    def close(self) -> None:  # noqa: B027 - optional hook: file domains hold nothing
        """Release what this host holds for the domain (activations); idempotent."""
