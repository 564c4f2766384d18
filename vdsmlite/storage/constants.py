"""Storage constants shared with VDSM (names, sizes, enum values on disk and on the wire)."""

from __future__ import annotations

import enum

from vdsmlite.ids import BLANK_UUID
from vdsmlite.units import GiB, KiB, MiB

__all__ = ["BLANK_UUID", "GiB", "KiB", "MiB"]  # re-exported: storage code says sc.MiB

# Domain layout
DOMAIN_META_DATA = "dom_md"
DOMAIN_IMAGES = "images"
METADATA = "metadata"
IDS = "ids"
LEASES = "leases"
INBOX = "inbox"
OUTBOX = "outbox"
XLEASES = "xleases"
MASTER = "master"
BLOCKSD_DIR = "blockSD"
SPECIAL_LVS = (METADATA, IDS, LEASES, INBOX, OUTBOX, XLEASES, MASTER)

# Domain versions this agent creates and serves.
SUPPORTED_VERSIONS = (5,)
MAX_DOMAIN_DESCRIPTION_SIZE = 50
MAX_POOL_DESCRIPTION_SIZE = 50

# Sanlock geometry (clusterlock.alignment)
LEASES_SLOTS = 2048
XLEASES_SLOTS = 1024
RESERVED_LEASES = 100  # slot 0 legacy SPM, 1 SDM, 2..99 reserved
SDM_LEASE_NAME = "SDM"
SDM_LEASE_SLOT = 1
HOSTS_MAX = 2000

# Block domains
VG_EXTENT_SIZE = 128 * MiB
VG_METADATA_SIZE = 128 * MiB
MIN_VG_SIZE = 10 * GiB
METADATA_LV_SIZE = 128 * MiB
SPECIAL_LV_SIZES_MIB = {IDS: 8, INBOX: 16, OUTBOX: 16}  # leases/xleases scale with alignment
MASTER_LV_SIZE = 1 * GiB
RESERVED_METADATA_SIZE = 17 * MiB
METADATA_BASE_V5 = 1 * MiB
METADATA_SLOT_SIZE_V5 = 8 * KiB
FIRST_SLOT_V5 = 1
MAX_SLOTS_V5 = (RESERVED_METADATA_SIZE - METADATA_BASE_V5) // METADATA_SLOT_SIZE_V5
MAILBOX_SIZE = 4 * KiB
MAX_HOST_ID = 250
RESERVED_MAILBOX_SIZE = MAILBOX_SIZE * MAX_HOST_ID
FILE_MAILBOX_SIZE = 16 * MiB

# Block LV tags
TAG_IMAGE = "IU_"
TAG_PARENT = "PU_"
TAG_SLOT = "MD_"
TAG_INITIALIZING = "OVIRT_VOL_INITIALIZING"
TAG_DOMAIN = "RHAT_storage_domain"
TAG_DOMAIN_UNREADY = "RHAT_storage_domain_UNREADY"

# Volumes
METADATA_SIZE = 512
DESCRIPTION_SIZE = 210
FILE_VOLUME_PERMISSIONS = 0o660
COW_OVERHEAD = 1.1
VOLUME_CHUNK = 2560 * MiB  # [irs] volume_utilization_chunk_mb
MAX_GENERATION = 999
MAX_SEQUENCE = 2**32 - 1
META_EXT = ".meta"
LEASE_EXT = ".lease"


class StorageType(enum.IntEnum):
    UNKNOWN = 0
    NFS = 1
    FCP = 2
    ISCSI = 3
    LOCALFS = 4
    CIFS = 5
    POSIXFS = 6
    GLUSTERFS = 7

    @property
    def is_block(self) -> bool:
        return self in (StorageType.FCP, StorageType.ISCSI)

    @property
    def is_file(self) -> bool:
        return self in (StorageType.NFS, StorageType.LOCALFS, StorageType.POSIXFS,
                        StorageType.GLUSTERFS)


class DomainClass(enum.IntEnum):
    Data = 1
    Iso = 2
    Backup = 3


class VolFormat(enum.IntEnum):
    UNKNOWN = 3
    COW = 4
    RAW = 5


class VolType(enum.IntEnum):
    PREALLOCATED = 1
    SPARSE = 2


# The words volume metadata uses (``FORMAT``, ``TYPE``, ``LEGALITY``, ``VOLTYPE``);
# VolFormat and VolType above are the ints the same choices have on the wire.
class VolumeFormat(enum.StrEnum):
    COW = "COW"
    RAW = "RAW"


class Allocation(enum.StrEnum):
    PREALLOCATED = "PREALLOCATED"
    SPARSE = "SPARSE"


class Legality(enum.StrEnum):
    LEGAL = "LEGAL"
    ILLEGAL = "ILLEGAL"
    FAKE = "FAKE"


class VolumeRole(enum.StrEnum):
    """A volume's place in its chain (VDSM's VOLTYPE)."""

    LEAF = "LEAF"
    INTERNAL = "INTERNAL"
    SHARED = "SHARED"  # a template's volume, used by other images


LEGAL, ILLEGAL, FAKE = Legality.LEGAL, Legality.ILLEGAL, Legality.FAKE
LEAF, INTERNAL, SHARED = VolumeRole.LEAF, VolumeRole.INTERNAL, VolumeRole.SHARED

ROLE_MASTER = "Master"
ROLE_REGULAR = "Regular"
DISK_TYPES = ("DATA", "ISOF", "MEMD", "MEMM", "OVFS", "HEVD", "HESD", "HEMD", "HECI", "SCRD",
              "2", "1")


def alignment_for(block_size: int, max_hosts: int) -> int:
    """sanlock alignment (clusterlock.alignment): 512-byte sectors always use 1 MiB."""
    if block_size == 512:
        return MiB
    if max_hosts > 1000:
        return 8 * MiB
    if max_hosts > 500:
        return 4 * MiB
    if max_hosts > 250:
        return 2 * MiB
    return MiB
