"""HTTP doors for image streams, next to JSON-RPC on the same port.

* `images`: VDSM's ``PUT /`` and ``GET /`` with ``Storage-*-Id`` headers,
  answering exactly as VDSM does, so an engine written for VDSM can write and
  read OVF_STOREs unchanged (plus chunked uploads, which VDSM lacks).
* `ovfstore`: ``PUT /ovfstore/<sdUUID>`` and ``GET /ovfstore/<sdUUID>``: the
  agent picks the store and runs the whole commit protocol itself.

Both stream in bounded memory and run each transfer as a job (Host.getJobs
shows bytes done; the VDSM door returns its id as ``Task-Id``). Downloads are
aiohttp routes (`add_routes`); uploads are served by `putserver`, which
`rpc.detect` gives every connection that begins with ``PUT `` (`put_handler`
routes them).
"""

from __future__ import annotations

import json
import re

from aiohttp import web

from vdsmlite import errors
from vdsmlite.http import images, ovfstore
from vdsmlite.http.common import DOORS, StreamDoors
from vdsmlite.http.putserver import Handler, PutRequest, Reply

_OVFSTORE = re.compile(r"/ovfstore/([^/]+)")


def add_routes(app: web.Application, doors: StreamDoors) -> None:
    app[DOORS] = doors
    app.router.add_get("/", images.handle_get)
    app.router.add_get("/ovfstore/{sd}", ovfstore.handle_get)


def put_handler(doors: StreamDoors) -> Handler:
    """The upload doors by path, for `putserver.PutProtocol`."""

    async def handle(request: PutRequest) -> Reply:
        if request.path == "/":
            return await images.handle_put(request, doors)
        m = _OVFSTORE.fullmatch(request.path)
        if m is not None:
            return await ovfstore.handle_put(request, doors, m.group(1))
        body = {"error": {"code": errors.InvalidParameterException.code,
                          "message": f"no upload door at {request.path[:100]}"}}
        return Reply(404, {"Content-Type": "application/json"}, json.dumps(body).encode())

    return handle
