"""What both stream doors share: what they use, query flags, errors as answers.

Uploads (PUT) are served by `putserver`, downloads (GET) by aiohttp. Either
way the doors own their transport: a body that stops arriving (stall) or
breaks off (a cut connection, a torn chunked encoding) becomes a VDSM error
there, so the services below see only bytes or
`TransferStalled`/`TransferInterrupted`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from vdsmlite import errors
from vdsmlite.jobs import Job, JobRegistry
from vdsmlite.sdm.ovfstore import OvfService
from vdsmlite.sdm.transfers import ImageTransfers

log = logging.getLogger("vdsmlite.http")


@dataclass(frozen=True)
class StreamDoors:
    """What the stream doors use, handed over once by the daemon."""

    jobs: JobRegistry
    ovf: OvfService
    transfers: ImageTransfers
    # Seconds an upload may go without a byte before it is abandoned.
    stall_timeout: float


DOORS = web.AppKey("stream_doors", StreamDoors)


def query_flag(query: Mapping[str, str], name: str, value: str) -> bool:
    """Whether the query says ``name=value``; ValueError for any other value of `name`
    (a typo must not quietly mean the default)."""
    given = query.get(name)
    if given is None:
        return False
    if given != value:
        raise ValueError(f"{name}={given[:20]!r}: only {name}={value} is known")
    return True


def check_xml(query: Mapping[str, str]) -> bool:
    """``?check=xml``: parse every ``.ovf`` before the commit (strict uploads)."""
    return query_flag(query, "check", "xml")


def error_status(exc: BaseException) -> tuple[int, int, str]:
    """(HTTP status, VDSM code, message) for what a transfer raised."""
    if isinstance(exc, errors.VdsmError):
        return exc.http_status, exc.code, exc.message
    return 500, errors.GeneralException.code, f"{type(exc).__name__}: {exc}"


def json_error(status: int, body: dict[str, Any],
               headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response(body, status=status, headers=headers)


async def send_stream(request: web.Request, response: web.StreamResponse, jobs: JobRegistry,
                      chunks: Callable[[Job], AsyncIterator[bytes]], *, description: str,
                      verb: str) -> web.StreamResponse:
    """Send `response` with the body `chunks(job)` yields, written by a job whose id
    the Task-Id header names (so Host.getJobs shows the transfer and its bytes)."""

    prepared = asyncio.Event()

    async def body(job: Job) -> None:
        await prepared.wait()  # the job runs while `start` writes its record
        async for chunk in chunks(job):
            await response.write(chunk)

    job = await jobs.start(body, description=description, verb=verb)
    response.headers["Task-Id"] = job.id
    try:
        await response.prepare(request)
    except BaseException:
        job.abort()  # the client is gone: nothing to send to
        raise
    finally:
        prepared.set()
    await job.wait()
    if job.error is not None:
        # The status line is gone already: a short body is the only honest signal left,
        # and closing the connection makes sure the client sees it.
        log.warning("%s failed after %s bytes: %s", description, job.bytes_done, job.error)
        if request.transport is not None:
            request.transport.close()
        return response
    await response.write_eof()
    return response
