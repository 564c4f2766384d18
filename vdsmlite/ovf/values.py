"""How OVF element text reads as values, the same for every reader of the format.

The engine and virt-v2v write the same fields differently (``true`` and
``True``, surrounding whitespace, an empty element for "none"); what a value
means is decided here once.
"""

from __future__ import annotations

from lxml import etree


def text(el: etree._Element) -> str | None:
    """The element's text without surrounding whitespace; None when empty."""
    value = el.text
    if value is None:
        return None
    return value.strip() or None


def integer(value: str | None) -> int | None:
    """An integer field; None when absent or not a number (the caller decides)."""
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        return None


def flag(value: str | None) -> bool:
    # The engine writes true/false, virt-v2v True/False.
    return value is not None and value.lower() == "true"
