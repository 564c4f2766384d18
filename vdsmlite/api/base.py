"""The `@verb` marker and the helper that collects marked methods."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from vdsmlite.rpc.dispatch import Handler

F = TypeVar("F", bound=Callable[..., Any])


def verb(name: str) -> Callable[[F], F]:
    """Mark a namespace method as the handler of verb `name` (``"Host.ping2"``)."""

    def mark(fn: F) -> F:
        fn.__vdsm_verb__ = name  # type: ignore[attr-defined]
        return fn

    return mark


def collect(namespace: object) -> dict[str, Handler]:
    found: dict[str, Handler] = {}
    for attr in dir(type(namespace)):
        fn = getattr(namespace, attr)
        name = getattr(fn, "__vdsm_verb__", None)
        if name is not None:
            found[name] = fn
    return found
