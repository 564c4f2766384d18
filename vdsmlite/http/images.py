"""VDSM's image stream door: ``PUT /`` (engine -> host) and ``GET /`` (host -> engine).

Answers exactly as VDSM's ``lib/vdsm/rpc/http.py`` does, so the engine's
UploadStream / RetrieveImageData commands work unchanged:

* both need ``Storage-Pool-Id``, ``Storage-Domain-Id`` and ``Image-Id``
  (missing -> 400); ``Volume-Id`` is optional (the image's only volume);
* PUT needs ``Content-Length`` (neither it nor chunked framing -> 411); unlike
  VDSM a chunked body is accepted; it answers ``200`` with a ``Task-Id`` header
  once the data is on storage;
* GET needs ``Range: bytes=0-<last>`` and answers ``206`` with
  ``content-range: bytes 0-<last>`` (no ``/total``) and ``Task-Id``;
* errors of the storage operation answer ``500`` with VDSM's JSON
  ``{"status": {"code": N, "message": ...}}`` and ``Content-Type:
  application/json`` exactly; refused requests (headers) answer 400/411 as VDSM
  does, with the same JSON where VDSM sends no body (diagnostics only).

Writes into an OVF_STORE volume are validated as archives while they stream
(``?check=xml``: every ``.ovf`` parsed as well, as the agent's own door can);
the engine itself flips the store's ``Updated`` flag around the PUT.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping

from aiohttp import web

from vdsmlite import errors
from vdsmlite.http import common
from vdsmlite.http.putserver import PutRequest, Reply
from vdsmlite.ids import parse_uuid
from vdsmlite.jobs import Job

log = logging.getLogger("vdsmlite.http.images")

_RANGE = re.compile(r"^bytes=0-(\d+)$")
_REQUIRED = ("Storage-Pool-Id", "Storage-Domain-Id", "Image-Id")


def _status_json(code: int, message: str) -> bytes:
    return json.dumps({"status": {"code": code, "message": message}}).encode()


def _error(status: int, code: int, message: str, task_id: str | None = None) -> web.Response:
    # VDSM's Content-Type is exactly "application/json": the engine compares the whole
    # header, so aiohttp's "; charset=utf-8" must not be added.
    headers = {"Content-Type": "application/json"}
    if task_id:
        headers["Task-Id"] = task_id
    return web.Response(status=status, body=_status_json(code, message), headers=headers)


def _put_error(status: int, code: int, message: str, task_id: str | None = None) -> Reply:
    headers = {"Content-Type": "application/json"}
    if task_id:
        headers["Task-Id"] = task_id
    return Reply(status, headers, _status_json(code, message))


def _from(exc: BaseException) -> web.Response:
    """What the storage operation refused: VDSM answers every such error with 500 and
    its status JSON (``_send_error_response``); the code in the JSON says which."""
    _, code, message = common.error_status(exc)
    return _error(500, code, message)


def _ids(headers: Mapping[str, str]) -> tuple[str, str, str | None]:
    """(domain, image, volume or None) from the headers (lower-case names); raises
    with a 400 answer."""
    values = []
    for name in _REQUIRED:
        raw = headers.get(name.lower())
        if raw is None:
            raise _IdError(errors.MissingParameter.code, f"missing header {name}")
        value = parse_uuid(raw.strip())
        if value is None:
            raise _IdError(errors.InvalidParameterException.code,
                           f"header {name}: {raw[:60]!r} is not a UUID")
        values.append(value)
    vol = None
    raw_vol = headers.get("volume-id")
    if raw_vol is not None:
        vol = parse_uuid(raw_vol.strip())
        if vol is None:
            raise _IdError(errors.InvalidParameterException.code,
                           f"header Volume-Id: {raw_vol[:60]!r} is not a UUID")
    return values[1], values[2], vol


class _IdError(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


async def handle_put(request: PutRequest, doors: common.StreamDoors) -> Reply:
    """``PUT /`` (served by `putserver`: the body goes straight into the volume's
    write buffers)."""
    try:
        sd, img, vol = _ids(request.headers)
    except _IdError as e:
        return _put_error(400, e.code, e.message)
    if not request.has_body_framing:
        return _put_error(411, errors.MissingParameter.code,
                          "Content-Length (or chunked Transfer-Encoding) required")
    try:
        strict = common.check_xml(request.query)
    except ValueError as e:
        return _put_error(400, errors.InvalidParameterException.code, str(e))
    length = request.content_length

    async def transfer(job: Job) -> int:
        return await doors.transfers.write(sd, img, vol, request, length=length, job=job,
                                           check_xml=strict)

    job = await doors.jobs.start(transfer, description=f"write image {img} from HTTP PUT",
                                 verb="Image.downloadFromStream")
    await job.wait()
    if job.error is not None:
        log.warning("PUT / into %s/%s failed: %s", sd, img, job.error)
        _, code, message = common.error_status(job.error)
        return _put_error(500, code, message, job.id)
    return Reply(200, {"Task-Id": job.id})


async def handle_get(request: web.Request) -> web.StreamResponse:
    try:
        sd, img, vol = _ids(request.headers)
    except _IdError as e:
        return _error(400, e.code, e.message)
    m = _RANGE.match(request.headers.get("Range", "").strip())
    if m is None:
        return _error(400, errors.MissingParameter.code, "Range must be 'bytes=0-<last>'")
    last = int(m.group(1))
    doors = request.app[common.DOORS]
    try:
        dom, target = await doors.transfers.open_read(sd, img, vol, last + 1)
    except errors.VdsmError as e:
        return _from(e)
    response = web.StreamResponse(status=206, headers={
        "Content-Type": "application/octet-stream",
        "Content-Length": str(last + 1),
        "Content-Range": f"bytes 0-{last}",
    })

    return await common.send_stream(request, response, doors.jobs,
                                    lambda job: doors.transfers.read(dom, img, target,
                                                                     last + 1, job),
                                    description=f"read image {img} for HTTP GET",
                                    verb="Image.uploadToStream")
