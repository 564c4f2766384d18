"""Who uses what storage on this host: volumes and LUNs held by running VMs.

A VM that runs on a volume chain or a direct LUN holds it here for as long
as its qemu process may open it. The holds are what make the storage verbs
safe next to VMs: an image in use is not torn down or deleted under the VM
(203, Volume is busy), a LUN in use does not become a PV of a new VG, and two
VMs do not write one image or LUN unless both asked to share it.

The table is in memory; after an agent restart the VM manager re-takes every
hold from the VMs it recovers before it serves a verb. Thread-safe: storage
code asks from executor threads.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from dataclasses import dataclass

from vdsmlite import errors


@dataclass(frozen=True)
class ImageKey:
    """An image of a domain (its whole chain is prepared for the user)."""

    domain_id: str
    image_id: str


@dataclass(frozen=True)
class LunKey:
    guid: str


Key = ImageKey | LunKey


@dataclass(frozen=True)
class Hold:
    owner: str  # a VM id
    key: Key
    readonly: bool
    shared: bool


class StorageUsers:
    def __init__(self) -> None:
        self._holds: dict[Key, list[Hold]] = {}
        self._lock = threading.Lock()

    def acquire(self, holds: Iterable[Hold]) -> None:
        """Take every hold or none: a writer refuses (LUN busy) while another owner
        holds the LUN read-write, unless both say shared."""
        holds = list(holds)
        with self._lock:
            for hold in holds:
                self._check(hold)
            for hold in holds:
                self._holds.setdefault(hold.key, []).append(hold)

    def _check(self, hold: Hold) -> None:
        for other in self._holds.get(hold.key, []):
            if other.owner == hold.owner:
                continue
            writers = not (hold.readonly and other.readonly)
            if writers and not (hold.shared and other.shared):
                raise errors.VolumeIsBusy(
                    _name(hold.key), f"used by VM {other.owner} (read-write use by two "
                                     "VMs needs both to share it)")

    def release(self, owner: str, keys: Iterable[Key] | None = None) -> None:
        """Drop `owner`'s holds (all of them, or those on `keys`)."""
        wanted = set(keys) if keys is not None else None
        with self._lock:
            for key in list(self._holds):
                if wanted is not None and key not in wanted:
                    continue
                left = [h for h in self._holds[key] if h.owner != owner]
                if left:
                    self._holds[key] = left
                else:
                    del self._holds[key]

    def owners(self, key: Key) -> list[str]:
        with self._lock:
            return sorted({h.owner for h in self._holds.get(key, [])})

    def require_unused(self, key: Key, what: str) -> None:
        """Refuse (203) to `what` (delete, tear down, ...) storage a VM holds."""
        owners = self.owners(key)
        if owners:
            raise errors.VolumeIsBusy(_name(key), f"cannot {what}: in use by VM "
                                                  f"{', '.join(owners)}")


def _name(key: Key) -> str:
    return key.guid if isinstance(key, LunKey) else key.image_id
