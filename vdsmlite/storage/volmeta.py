"""Volume metadata (V5): sorted KEY=VALUE lines ending in ``EOF``, at most 512 bytes.

The same text lives in ``<vol>.meta`` on file domains and in the volume's
8 KiB slot of the ``metadata`` LV on block domains. No checksum (as VDSM).
``CAP`` is the virtual size in bytes; ``SEQ`` the sequence number; ``GEN``
the generation (0..999, wrapping).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from vdsmlite import errors
from vdsmlite.storage import constants as sc


@dataclass(frozen=True)
class VolumeMetadata:
    domain: str
    image: str
    parent: str
    capacity: int
    format: str  # RAW | COW
    type: str  # PREALLOCATED | SPARSE
    voltype: str  # LEAF | INTERNAL | SHARED
    disktype: str
    description: str
    legality: str
    ctime: int
    generation: int = 0
    sequence: int = 0

    def replace(self, **changes: object) -> VolumeMetadata:
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]

    def to_bytes(self) -> bytes:
        fields = {
            "CAP": str(self.capacity),
            "CTIME": str(self.ctime),
            "DESCRIPTION": self.description,
            "DISKTYPE": self.disktype,
            "DOMAIN": self.domain,
            "FORMAT": self.format,
            "GEN": str(self.generation),
            "IMAGE": self.image,
            "LEGALITY": self.legality,
            "PUUID": self.parent,
            "SEQ": str(self.sequence),
            "TYPE": self.type,
            "VOLTYPE": self.voltype,
        }
        for k, v in fields.items():
            if "\n" in v or "\0" in v:
                raise errors.MetaDataGeneralError(f"newline or NUL in {k}")
        text = "".join(f"{k}={v}\n" for k, v in sorted(fields.items())) + "EOF\n"
        data = text.encode("utf-8")
        if len(data) > sc.METADATA_SIZE:
            raise errors.MetadataOverflowError(f"data={data!r}")
        return data

    @classmethod
    def from_bytes(cls, data: bytes) -> VolumeMetadata:
        """Parse slot or file contents; raises VolumeMetadataReadError if incomplete."""
        try:
            text = data.rstrip(b"\0").decode("utf-8")
        except UnicodeDecodeError as e:
            raise errors.VolumeMetadataReadError(f"undecodable metadata: {e}") from e
        md: dict[str, str] = {}
        for line in text.splitlines():
            if line.startswith("EOF"):
                break
            key, sep, value = line.partition("=")
            if sep:
                md[key.strip()] = value.strip()
        if "NONE" in md or not md:
            raise errors.VolumeMetadataReadError("metadata cleared or empty")
        try:
            capacity = int(md["CAP"]) if "CAP" in md else int(md["SIZE"]) * 512
            return cls(
                domain=md["DOMAIN"], image=md["IMAGE"], parent=md["PUUID"],
                capacity=capacity, format=md["FORMAT"], type=md["TYPE"],
                voltype=md["VOLTYPE"], disktype=md.get("DISKTYPE", "DATA"),
                description=md.get("DESCRIPTION", ""), legality=md["LEGALITY"],
                ctime=int(md["CTIME"]), generation=int(md.get("GEN", "0")),
                sequence=int(md.get("SEQ", "0")))
        except (KeyError, ValueError) as e:
            raise errors.VolumeMetadataReadError(f"invalid metadata: {e!r}") from e


def truncate_description(desc: str) -> str:
    """VDSM keeps the first 210 *characters* of a description instead of refusing a
    longer one (VolumeMetadata.validate_description). Non-ASCII text can still
    make the metadata block overflow its 512 bytes: `to_bytes` then raises
    MetadataOverflowError, as VDSM does."""
    return desc[:sc.DESCRIPTION_SIZE]
