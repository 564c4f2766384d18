"""The gate for untrusted OVF XML: nothing reaches libxml2 unchecked.

The input is untrusted - anyone who can write to the storage domain can write it.
A DTD is refused outright, in the raw bytes before libxml2 sees them, so no entity
is ever declared, let alone expanded (XXE, billion laughs); the parsers also
resolve no entities, load no DTD and touch no network. Documents are decoded as
UTF-8 whatever their declaration says, so a declared UTF-7 or EBCDIC encoding
cannot hide a ``<!DOCTYPE`` from that byte scan. Size is capped, the root must be
an OVF Envelope, and errors say what is wrong without echoing the input.

Two ways through: `read_envelope` parses a whole document into a tree for the
`reader`; `OvfValidator` checks a streamed one chunk by chunk without building a
tree (uploads). Both refuse the same documents for the same reasons, except what
only a tree shows (namespace prefixes bound, the entity's id and fields), which
the reader checks when the store is read.
"""

from __future__ import annotations

import threading
from typing import NoReturn, cast

from lxml import etree

from vdsmlite.ovf.model import OvfError, excerpt

MAX_OVF_SIZE = 32 * 1024 * 1024

# The OVF envelope namespace, as spelled with and without a trailing slash (some 4.2
# engines wrote it without, BZ 1518887); a document's spelling is its root's.
OVF_NAMESPACES = (
    "http://schemas.dmtf.org/ovf/envelope/1/",
    "http://schemas.dmtf.org/ovf/envelope/1",
)


def read_envelope(data: bytes) -> tuple[etree._Element, str]:
    """The root of a whole document that passed the gate, and its OVF namespace.

    OvfError if the document is too large, has a DTD, is malformed or is not an
    OVF Envelope - checked in that order.
    """
    root = read_document(data)
    return root, _envelope_namespace(root)


def read_document(data: bytes) -> etree._Element:
    """The root of a whole document that passed the gate, whatever its root element.

    For documents nested in an OVF, such as the engine's libvirt XML in ``EngineXml``:
    the same size, DTD and well-formedness checks as `read_envelope`, in that order.
    """
    if len(data) > MAX_OVF_SIZE:
        raise OvfError(f"OVF is {len(data)} bytes, more than the limit of {MAX_OVF_SIZE}")
    if _has_dtd_markup(data):
        raise _dtd_error()
    try:
        root = etree.fromstring(data, _thread_parser())
    except etree.XMLSyntaxError as e:
        raise _malformed(e) from e
    _refuse_doctype(root)
    return root


class OvfValidator:
    """Incremental check that a streamed document is a well-formed, DTD-free OVF Envelope.

    A tar streamer feeds each chunk of an ``.ovf`` member as it copies it. DTD markup
    is looked for in every chunk - and across the seam with the previous one - before
    lxml is given the chunk, so a billion-laughs payload is refused unexpanded.
    Once an error has been raised, every later call raises too.

    Uploads validate every byte, so this is the hot path of an OVF_STORE upload and
    builds no tree: libxml2 checks well-formedness with no callbacks into Python and
    without the GIL (a parser with a target that only has ``close``), which is two to
    three times faster than building the tree. Only the root element is looked at, by
    a second parser fed just the bytes up to the root's start tag. What this does not
    check - namespace prefixes bound, the entity's id and fields - `reader.parse`
    checks when the store is read, per entity.
    """

    def __init__(self) -> None:
        self._checker = _checkers.take()
        self._root_probe: etree.XMLPullParser | None = _new_root_probe()
        self._size = 0
        # The last bytes fed, so a marker split across two chunks is still seen.
        self._tail = b""
        self._failure: OvfError | None = None
        self._closed = False

    def feed(self, data: bytes) -> None:
        self._check_usable()
        self._size += len(data)
        if self._size > MAX_OVF_SIZE:
            self._fail(OvfError(f"OVF is more than the limit of {MAX_OVF_SIZE} bytes"))
        seam = self._tail + data[:_MARKER_TAIL]
        if _has_dtd_markup(seam) or _has_dtd_markup(data):
            self._fail(_dtd_error())
        self._tail = data[-_MARKER_TAIL:] if len(data) >= _MARKER_TAIL else seam[-_MARKER_TAIL:]
        try:
            if self._root_probe is not None:
                self._probe_root(data)
            self._checker.feed(data)
        except etree.XMLSyntaxError as e:
            self._fail(_malformed(e))

    def close(self) -> None:
        self._check_usable()
        self._closed = True
        try:
            self._checker.close()
        except etree.XMLSyntaxError as e:
            self._fail(_malformed(e))
        if self._root_probe is not None:
            # Unreachable for a document libxml2 accepted; kept so that a surprise
            # cannot let a rootless document through.
            self._fail(OvfError("OVF has no root element"))
        _checkers.give_back(self._checker)

    def _probe_root(self, data: bytes) -> None:
        # Fed in small slices so the probe stops parsing (and building) right after
        # the root start tag, which the engine writes within the first few hundred bytes.
        assert self._root_probe is not None
        for offset in range(0, len(data), _PROBE_SLICE):
            self._root_probe.feed(data[offset:offset + _PROBE_SLICE])
            for _event, found in self._root_probe.read_events():
                # Only "start" events were asked for, so each carries an element.
                element = cast(etree._Element, found)
                self._root_probe = None
                if element.tag not in _ENVELOPES:
                    self._fail(OvfError("root element is not an OVF Envelope: "
                                        f"{excerpt(repr(element.tag))}"))
                return

    def _check_usable(self) -> None:
        if self._failure is not None:
            raise OvfError(f"OVF already refused: {self._failure}")
        if self._closed:
            raise OvfError("OVF validator already closed")

    def _fail(self, error: OvfError) -> NoReturn:
        # A parser that saw an error is dropped, never reused.
        self._failure = error
        self._root_probe = None
        raise error


# --- parsing safely --------------------------------------------------------------------

# Markup that can only start a DTD. ENTITY is only legal inside a DOCTYPE, but is
# refused on its own as well so the check does not depend on that reasoning.
_DTD_MARKERS = (b"<!DOCTYPE", b"<!ENTITY")
_MARKER_TAIL = max(len(m) for m in _DTD_MARKERS) - 1

_ENVELOPES = {f"{{{ns}}}Envelope": ns for ns in OVF_NAMESPACES}


def _new_parser() -> etree.XMLParser:
    return etree.XMLParser(
        resolve_entities=False, no_network=True, load_dtd=False, dtd_validation=False,
        huge_tree=False, remove_comments=True, remove_pis=True, collect_ids=False,
        remove_blank_text=True,
        # Overrides the declared encoding: see the module docstring.
        encoding="utf-8",
    )


_thread_state = threading.local()


def _thread_parser() -> etree.XMLParser:
    # Reusing a parser saves a tenth of the parse time. lxml serialises users of one
    # parser with a lock, so give each thread its own instead of sharing one.
    parser: etree.XMLParser | None = getattr(_thread_state, "parser", None)
    if parser is None:
        parser = _thread_state.parser = _new_parser()
    return parser


class _WellFormedOnly:
    """A parser target that wants no events: libxml2 only checks the syntax."""

    def close(self) -> None:
        return None


def _new_checker() -> etree.XMLParser:
    return etree.XMLParser(
        # lxml-stubs want a target with every callback; having none is the point here.
        target=_WellFormedOnly(),  # type: ignore[arg-type]
        resolve_entities=False, no_network=True, load_dtd=False,
        huge_tree=False, encoding="utf-8")


class _CheckerPool:
    """Idle well-formedness parsers: creating one costs as much as checking a 9 KB OVF.

    A pool rather than one per thread, because a validator may be fed from whichever
    worker thread an upload's chunks land on. Only parsers that closed cleanly (and
    so were reset by lxml) come back.
    """

    def __init__(self, keep: int) -> None:
        self._idle: list[etree.XMLParser] = []
        self._keep = keep
        self._lock = threading.Lock()

    def take(self) -> etree.XMLParser:
        with self._lock:
            if self._idle:
                return self._idle.pop()
        return _new_checker()

    def give_back(self, checker: etree.XMLParser) -> None:
        with self._lock:
            if len(self._idle) < self._keep:
                self._idle.append(checker)


_checkers = _CheckerPool(keep=8)
_PROBE_SLICE = 512


def _new_root_probe() -> etree.XMLPullParser:
    return etree.XMLPullParser(
        events=("start",), resolve_entities=False, no_network=True, load_dtd=False,
        huge_tree=False, encoding="utf-8")


def _has_dtd_markup(data: bytes) -> bool:
    # A memchr for "!" first: most OVFs contain none, and then no marker either.
    return b"!" in data and any(marker in data for marker in _DTD_MARKERS)


def _dtd_error() -> OvfError:
    return OvfError("OVF must not contain a DTD (<!DOCTYPE> or <!ENTITY>)")


def _malformed(error: etree.XMLSyntaxError) -> OvfError:
    return OvfError(f"malformed OVF XML: {excerpt(str(error))}")


def _envelope_namespace(root: etree._Element) -> str:
    """The OVF namespace spelling of a parsed document, after the checks scanning cannot do."""
    _refuse_doctype(root)
    ns = _ENVELOPES.get(root.tag)
    if ns is None:
        raise OvfError(f"root element is not an OVF Envelope: {excerpt(repr(root.tag))}")
    return ns


def _refuse_doctype(root: etree._Element) -> None:
    # Defence in depth: the byte scan already refused any DOCTYPE it could see.
    # (lxml has DocInfo.doctype; lxml-stubs 0.5 do not know it.)
    if root.getroottree().docinfo.doctype:  # type: ignore[attr-defined]
        raise _dtd_error()
