"""A verb's result encoded as JSON ahead of the call that returns it.

A verb whose answer is large and unchanging between calls (an OVF_STORE listing:
10 MB for 10,000 entities) keeps it encoded and returns an `Encoded`: the
dispatcher puts its bytes into the response as they are (through an
`orjson.Fragment`) instead of walking the objects again; with
``devel.validate_returns`` it checks what they decode to, like any result.
"""

from __future__ import annotations

from typing import Any

import orjson


class Encoded:
    __slots__ = ("fragment", "json")

    def __init__(self, value: Any) -> None:
        self.json: bytes = orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS)
        self.fragment = orjson.Fragment(self.json)

    def decoded(self) -> Any:
        return orjson.loads(self.json)
