"""The lease holder: a helper process that owns the agent's sanlock leases.

sanlock ties a lease to the process that registered with it, and when the
lockspace behind the lease is lost it kills that process so the lease cannot
be used any more. The agent therefore never registers itself: it runs one of
these per lockspace (`vdsmlite.locking.leases`) and asks it to acquire and
release. If sanlock kills it, the agent sees the pipe close and knows every
lease of that lockspace is gone; the agent lives on.

Protocol: one JSON object per line on stdin, one answer per line on stdout.

    -> {"op": "acquire", "resource": "SDM", "disks": [["/path", 1048576]]}
    <- {"ok": true}
    -> {"op": "release", "resource": "SDM", "disks": [...]}
    <- {"ok": false, "errno": 243, "message": "..."}
    -> {"op": "inquire"}
    <- {"ok": true, "leases": [["<lockspace>", "SDM"]]}

The first line it writes is {"ready": true, "pid": ...} once registered (or
{"ready": false, ...} and it exits). End of stdin - the agent closed the pipe
or died - makes it exit, and sanlock releases whatever it still held.

Run as ``python -m vdsmlite.locking.holder <lockspace>``; it talks to the sanlock
daemon named by ``SANLOCK_RUN_DIR`` like any client.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any, TextIO

from vdsmlite.locking import sanlock


def _answer(out: TextIO, message: dict[str, Any]) -> None:
    out.write(json.dumps(message) + "\n")
    out.flush()


def _error(e: sanlock.SanlockError | ValueError) -> dict[str, Any]:
    if isinstance(e, sanlock.SanlockError):
        return {"ok": False, "errno": e.errno, "message": e.message}
    return {"ok": False, "errno": 22, "message": str(e)}


def _handle(sock: int, lockspace: str, request: dict[str, Any]) -> dict[str, Any]:
    op = request.get("op")
    if op == "inquire":
        return {"ok": True, "leases": [list(x) for x in sanlock.inquire(sock)]}
    resource = request.get("resource")
    disks = request.get("disks")
    if not isinstance(resource, str) or not isinstance(disks, list) or not all(
            isinstance(d, list) and len(d) == 2 and isinstance(d[0], str)
            and isinstance(d[1], int) for d in disks):
        return {"ok": False, "errno": 22, "message": f"malformed request: {request!r}"}
    pairs = [(path, offset) for path, offset in disks]
    if op == "acquire":
        sanlock.acquire(sock, lockspace, resource, pairs,
                        owner_nowait=bool(request.get("owner_nowait", True)))
        return {"ok": True}
    if op == "release":
        sanlock.release(sock, lockspace, resource, pairs)
        return {"ok": True}
    return {"ok": False, "errno": 22, "message": f"unknown op {op!r}"}


def serve(lockspace: str, inp: TextIO, out: TextIO) -> int:
    try:
        sock = sanlock.register()
    except sanlock.SanlockError as e:
        _answer(out, {"ready": False, **_error(e)})
        return 1
    _answer(out, {"ready": True, "pid": os.getpid()})
    for line in inp:
        try:
            request = json.loads(line)
            if not isinstance(request, dict):
                raise ValueError("request is not an object")
        except ValueError as e:
            _answer(out, {"ok": False, "errno": 22, "message": f"bad request: {e}"})
            continue
        try:
            reply = _handle(sock, lockspace, request)
        except (sanlock.SanlockError, ValueError) as e:
            reply = _error(e)
        _answer(out, reply)
    return 0


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit("usage: python -m vdsmlite.locking.holder <lockspace>")
    sys.exit(serve(sys.argv[1], sys.stdin, sys.stdout))


if __name__ == "__main__":
    main()
