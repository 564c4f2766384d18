"""Identifiers: what a UUID looks like, its canonical form, and VDSM's blank UUID.

The bottom of the house: every layer (config, storage, the doors, the wire
protocol) checks UUIDs with these, so none of them needs another's module.
"""

from __future__ import annotations

import re
from typing import Any

# The textual UUID form VDSM and the engine use (8-4-4-4-12 hex digits), unanchored
# so that other patterns (an OVF member name, a padded XML value) can embed it.
UUID_PATTERN = "[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
UUID_RE = re.compile(f"^{UUID_PATTERN}$")

# VDSM's "no such thing" UUID: no parent volume, no pool.
BLANK_UUID = "00000000-0000-0000-0000-000000000000"


def parse_uuid(value: Any) -> str | None:
    """The canonical (lower case) form of a UUID string, or None."""
    if isinstance(value, str) and UUID_RE.match(value):
        return value.lower()
    return None
