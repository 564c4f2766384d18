"""The agent's own OVF_STORE door: ``PUT`` and ``GET /ovfstore/<sdUUID>``.

PUT takes a tar (chunked or with Content-Length) and runs the whole commit
protocol (`OvfService.upload`): the agent picks which store to write, never
the newest one that reads. The answer is JSON: the store written, its size,
the number of entities, the time taken, and ``index``: ``{"state":
"building"}`` (the ``|ovfstore|indexed|<sdUUID>`` event tells how it went), or
with ``?wait=index`` the index's outcome - entities indexed, the ``.ovf``
members that failed and why. ``?check=xml`` parses every ``.ovf`` before the
commit and refuses the upload if one is not well-formed OVF XML. GET returns
the newest store that validates. Errors are JSON ``{"error": {"code": N,
"message": ...}}``.
"""

from __future__ import annotations

import json
import logging

import orjson
from aiohttp import web

from vdsmlite import errors
from vdsmlite.http import common
from vdsmlite.http.putserver import PutRequest, Reply
from vdsmlite.ids import parse_uuid
from vdsmlite.jobs import Job

log = logging.getLogger("vdsmlite.http.ovfstore")


def _error(status: int, code: int, message: str, task_id: str | None = None) -> web.Response:
    body = {"error": {"code": code, "message": message}}
    if task_id:
        body["taskID"] = task_id  # type: ignore[assignment]
    return common.json_error(status, body)


def _put_error(status: int, code: int, message: str, task_id: str | None = None) -> Reply:
    body: dict[str, object] = {"error": {"code": code, "message": message}}
    if task_id:
        body["taskID"] = task_id
    return Reply(status, {"Content-Type": "application/json"}, json.dumps(body).encode())


def _domain(request: web.Request) -> str | None:
    # The path segment is only ever a UUID: it never becomes a path.
    return parse_uuid(request.match_info["sd"])


async def handle_put(request: PutRequest, doors: common.StreamDoors, segment: str) -> Reply:
    """``PUT /ovfstore/<segment>`` (served by `putserver`: the body goes straight
    into the store's write buffers)."""
    sd = parse_uuid(segment)  # only ever a UUID: it never becomes a path
    if sd is None:
        return _put_error(400, errors.InvalidParameterException.code,
                          "storage domain id must be a UUID")
    if not request.has_body_framing:
        return _put_error(411, errors.MissingParameter.code,
                          "Content-Length or chunked Transfer-Encoding required")
    try:
        strict = common.check_xml(request.query)
        wait_index = common.query_flag(request.query, "wait", "index")
    except ValueError as e:
        return _put_error(400, errors.InvalidParameterException.code, str(e))

    async def upload(job: Job) -> dict[str, object]:
        return await doors.ovf.upload(sd, request, length=request.content_length, job=job,
                                      check_xml=strict, wait_index=wait_index)

    job = await doors.jobs.start(upload, description=f"upload OVF_STORE of {sd}",
                                 verb="StorageDomain.uploadOVFStore")
    await job.wait()
    if job.error is not None:
        status, code, message = common.error_status(job.error)
        log.warning("OVF_STORE upload to %s refused: %s", sd, message)
        return _put_error(status, code, message, job.id)
    return Reply(200, {"Content-Type": "application/json"}, orjson.dumps(job.result))


async def handle_get(request: web.Request) -> web.StreamResponse:
    sd = _domain(request)
    if sd is None:
        return _error(400, errors.InvalidParameterException.code,
                      "storage domain id must be a UUID")
    doors = request.app[common.DOORS]
    try:
        contents = await doors.ovf.newest(sd)
    except errors.VdsmError as e:
        status, code, message = common.error_status(e)
        return _error(status, code, message)
    store = contents.store
    response = web.StreamResponse(status=200, headers={
        "Content-Type": "application/x-tar",
        "Content-Length": str(store.size),
        "X-OVF-Store-Image": store.img,
        "X-OVF-Store-Volume": store.vol,
        "X-OVF-Store-Last-Updated": store.last_updated or "",
    })

    return await common.send_stream(request, response, doors.jobs,
                                    lambda job: doors.ovf.read_stream(sd, contents, job),
                                    description=f"read OVF_STORE of {sd}",
                                    verb="StorageDomain.downloadOVFStore")
