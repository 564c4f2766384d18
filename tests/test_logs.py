"""The daemon's log setup: what reaches the log from libraries and what does not."""

from __future__ import annotations

import io
import logging
import sys
from collections.abc import Iterator

import pytest

from vdsmlite import logs

pytestmark = pytest.mark.unit


@pytest.fixture
def daemon_log(monkeypatch: pytest.MonkeyPatch) -> Iterator[io.StringIO]:
    """What the daemon's log handler writes (its stderr), while the test runs."""
    out = io.StringIO()
    monkeypatch.setattr(sys, "stderr", out)
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    logs.setup("DEBUG")
    try:
        yield out
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
        logging.getLogger("qemu.qmp").setLevel(logging.NOTSET)


def test_qmp_retries_and_protocol_dumps_stay_out(daemon_log: io.StringIO) -> None:
    """qemu.qmp reports the refused connect that open_session expects and retries as
    an ERROR with a traceback at DEBUG; neither is news. Its other errors are."""
    session = logging.getLogger("qemu.qmp.protocol.VM 7a1c2b3d")
    session.error("Failed to establish connection: ConnectionRefusedError: [Errno 111]")
    session.debug("Failed to establish connection:\n  | Traceback (most recent call last):")
    session.debug('<-- {"return": {}}')
    session.error("Disconnected unexpectedly: EOFError")
    logging.getLogger("vdsmlite.virt.qmp").debug("ours stays at DEBUG")
    err = daemon_log.getvalue()
    assert "ConnectionRefusedError" not in err and "Traceback" not in err
    assert '"return"' not in err
    assert "Disconnected unexpectedly" in err and "ours stays at DEBUG" in err
