"""Structured logging with a request id per call.

Every record carries the id of the JSON-RPC call (or HTTP stream) it belongs
to, taken from a context variable the dispatcher sets, so the lines of one
call can be found among a hundred concurrent ones. Two formats:

* ``text``: ``LEVEL logger [req=<id>] message k=v`` - for humans; when stderr
  is connected to journald (``JOURNAL_STREAM`` set) the timestamp is left out
  and a ``<N>`` syslog priority prefix is added so journald keeps the level.
* ``json``: one JSON object per line, for log shippers.
"""

from __future__ import annotations

import contextvars
import json
import logging
import os
import sys
import time
from typing import Any

from aiohttp.http_exceptions import HttpProcessingError

request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)

# syslog priorities for sd-daemon(3) "<N>" prefixes
_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3,
             logging.CRITICAL: 2}


class _RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id.get()
        return True


class _QmpRetryFilter(logging.Filter):
    """qemu.qmp logs a refused connect at ERROR (and its traceback at DEBUG); qemu
    binds its QMP socket a moment before it listens, so `virt.qmp.open_session`
    expects that refusal and retries. Only that record is dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        # qemu.qmp logs per session under child loggers ("qemu.qmp.protocol.VM <id>"),
        # which a filter on a parent logger never sees: this one sits on the handler.
        return not (record.name.startswith("qemu.qmp") and record.getMessage().startswith(
            "Failed to establish connection: ConnectionRefusedError"))


class _BadRequestFilter(logging.Filter):
    """Malformed requests from clients are the client's problem: one INFO line, no traceback.

    aiohttp logs some of them (bad status lines, TLS on the plain port) at ERROR
    with a full traceback, which would page an operator for a port scanner.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):
            record.levelno, record.levelname = logging.INFO, "INFO"
            reason = " ".join(str(exc.message).split())
            record.msg = f"{record.getMessage()}: {exc.code} {reason[:200]}"
            record.args = None
            record.exc_info = None
            record.exc_text = None
        return True


class TextFormatter(logging.Formatter):
    def __init__(self, journald: bool) -> None:
        super().__init__()
        self.journald = journald

    def format(self, record: logging.LogRecord) -> str:
        rid = getattr(record, "request_id", None)
        parts = []
        if self.journald:
            parts.append(f"<{_PRIORITY.get(record.levelno, 6)}>")
        else:
            ts = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(record.created))
            parts.append(f"{ts},{int(record.msecs):03d}")
        parts.append(f"{record.levelname:<7} {record.name}")
        if rid:
            parts.append(f"[req={rid}]")
        parts.append(record.getMessage())
        line = " ".join(parts)
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": round(record.created, 6),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        rid = getattr(record, "request_id", None)
        if rid:
            out["request_id"] = rid
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def setup(level: str = "INFO", fmt: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_RequestIdFilter())
    journald = bool(os.environ.get("JOURNAL_STREAM"))
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter(journald))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # aiohttp's access log repeats what the dispatcher logs per call, at a cost per request.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    # aiohttp logs a full traceback at DEBUG for every malformed request a client
    # sends; the 400 it answers is the whole story.
    server_log = logging.getLogger("aiohttp.server")
    server_log.setLevel(max(root.level, logging.INFO))
    server_log.addFilter(_BadRequestFilter())
    # qemu.qmp's DEBUG is every QMP message pretty-printed (stats polls included): far
    # too much for a daemon log. Our own virt loggers say what was sent and why.
    logging.getLogger("qemu.qmp").setLevel(max(root.level, logging.INFO))
    handler.addFilter(_QmpRetryFilter())
