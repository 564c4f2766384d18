"""HTTP doors for image streams, next to JSON-RPC on the same port.

* `images`: VDSM's ``PUT /`` and ``GET /`` with ``Storage-*-Id`` headers,
  answering exactly as VDSM does, so an engine written for VDSM can write and
  read OVF_STOREs unchanged (plus chunked uploads, which VDSM lacks).
* `ovfstore`: ``PUT /ovfstore/<sdUUID>`` and ``GET /ovfstore/<sdUUID>``: the
  agent picks the store and runs the whole commit protocol itself.

Both stream in bounded memory and run each transfer as a job (Host.getJobs
shows bytes done; the VDSM door returns its id as ``Task-Id``).
"""

from __future__ import annotations

from aiohttp import web

from vdsmlite.http import images, ovfstore
from vdsmlite.http.common import DOORS, StreamDoors


def add_routes(app: web.Application, doors: StreamDoors) -> None:
    app[DOORS] = doors
    app.router.add_put("/", images.handle_put)
    app.router.add_get("/", images.handle_get)
    app.router.add_put("/ovfstore/{sd}", ovfstore.handle_put)
    app.router.add_get("/ovfstore/{sd}", ovfstore.handle_get)
