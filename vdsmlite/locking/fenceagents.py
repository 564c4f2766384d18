"""Fence agents other than sanlock: ``fence_<agent>`` programs, run as VDSM runs them.

The agent gets its parameters on stdin, one ``key=value`` a line (VDSM's
format, the engine's free-form options appended as given); its exit code says
the power state for ``status`` (0 on, 2 off) and success otherwise (0, 1, 2).
The password travels on stdin only and is never logged.
"""

from __future__ import annotations

import asyncio
import logging
import re
from pathlib import Path
from typing import Any

from vdsmlite import errors

log = logging.getLogger("vdsmlite.locking.fenceagents")

AGENT_NAME = re.compile(r"[A-Za-z0-9_]{1,64}")


class FenceAgents:
    def __init__(self, agents_dir: Path, timeout: float) -> None:
        self._agents_dir = agents_dir
        self._timeout = timeout

    async def run(self, agent: str, action: str, *, addr: str, port: str, username: str,
                  password: str, secure: bool, options: str) -> dict[str, Any]:
        """Host.fenceNode's answer for `agent` doing `action` on `addr`."""
        if not AGENT_NAME.fullmatch(agent):
            raise errors.UnsupportedFenceAgent(agent)
        program = self._agents_dir / f"fence_{agent}"
        if not program.is_file():
            raise errors.UnsupportedFenceAgent(agent)
        lines = [f"agent=fence_{agent}", f"ipaddr={addr}", f"login={username}",
                 f"action={action}", f"passwd={password}"]
        if port:
            lines.append(f"port={port}")
        if secure:
            lines.append("secure=yes")
        # VDSM appends the engine's free-form options (one key=value per line) as given.
        lines += [line for line in options.strip().splitlines() if line.strip()]
        stdin = ("\n".join(lines) + "\n").encode()
        proc = await asyncio.create_subprocess_exec(
            str(program), stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE)
        try:
            out, err = await asyncio.wait_for(proc.communicate(stdin), self._timeout)
        except TimeoutError as e:
            proc.kill()
            await proc.wait()
            raise errors.GeneralException(f"fence_{agent} timed out") from e
        rc = proc.returncode
        log.info("fence_%s %s for %s: rc=%s", agent, action, addr, rc)
        if action == "status":
            power = {0: "on", 2: "off"}.get(rc or 0, "unknown")
            return {"operationStatus": "initiated", "power": power}
        if rc not in (0, 1, 2):
            raise errors.GeneralException(
                f"fence_{agent} {action} failed with {rc}: "
                f"{(out + err).decode(errors='replace').strip()[-500:]}")
        return {"operationStatus": "initiated", "power": "unknown"}
