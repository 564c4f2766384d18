"""The peer for bench/rpc_throughput.py: a bare aiohttp JSON-RPC endpoint.

It does the least any JSON-RPC server must do (read the body, parse it, echo
the id in a result) and nothing else, so the ratio against it is the cost of
vdsmlite's dispatch: envelope checks, schema coercion, metrics, logging.
Prints its port on stdout once listening.
"""

from __future__ import annotations

import asyncio
import json
import sys

from aiohttp import web


async def handle(request: web.Request) -> web.Response:
    msg = json.loads(await request.read())
    body = json.dumps({"jsonrpc": "2.0", "id": msg["id"], "result": True},
                      separators=(",", ":")).encode()
    return web.Response(body=body, content_type="application/json")


async def main() -> None:
    app = web.Application()
    app.router.add_post("/jsonrpc", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, backlog=1024)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    print(port, flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        sys.exit(0)
