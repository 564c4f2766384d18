"""Running external storage commands (lvm, mount, iscsiadm, qemu-img).

Every command has a timeout: a hung NFS server or a stuck SAN must cost a
bounded wait and a clear error, never a worker thread forever. On timeout the
whole process group is killed (mount helpers fork). Output is captured and
decoded leniently; argv is always a list (never a shell), so nothing a client
sent can become shell syntax.

Two flavours with the same semantics: `run` for code already in the blocking
executor (LVM sequences), `run_async` for the event loop (mounts, iscsiadm),
which waits without holding a thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from vdsmlite import cancel

log = logging.getLogger("vdsmlite.storage.commands")

DEFAULT_TIMEOUT = 120.0


@dataclass(frozen=True)
class Result:
    argv: tuple[str, ...]
    rc: int
    out: str
    err: str


def _redact(text: str, secrets: Sequence[str]) -> str:
    for secret in secrets:
        if secret:
            text = text.replace(secret, "********")
    return text


def _redacted(result: Result, secrets: Sequence[str]) -> Result:
    if not secrets:
        return result
    return Result(tuple(_redact(a, secrets) for a in result.argv), result.rc,
                  _redact(result.out, secrets), _redact(result.err, secrets))


class CommandError(Exception):
    def __init__(self, result: Result, timed_out: bool = False) -> None:
        self.result = result
        self.timed_out = timed_out
        what = "timed out" if timed_out else f"failed with rc={result.rc}"
        super().__init__(f"{result.argv[0]} {what}: {result.err.strip()[-500:]}")

    @property
    def rc(self) -> int:
        return self.result.rc

    @property
    def err(self) -> str:
        return self.result.err


def _env(extra: Mapping[str, str] | None) -> dict[str, str]:
    env = dict(os.environ)
    # Stable, parseable output whatever the host's locale.
    env["LC_ALL"] = "C"
    env["LANG"] = "C"
    if extra:
        env.update(extra)
    return env


def _decode(data: bytes | None) -> str:
    return (data or b"").decode("utf-8", errors="replace")


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


def run(
    argv: Sequence[str],
    *,
    timeout: float = DEFAULT_TIMEOUT,
    input: bytes | None = None,
    env: Mapping[str, str] | None = None,
    check: bool = True,
    secrets: Sequence[str] = (),
    cwd: str | None = None,
) -> Result:
    """Run a command to completion (blocking; call from the executor).

    `secrets` (passwords on argv) are masked in the returned result, logs and errors.

    A stopped task (`cancel`) starts no command, and the command it is running is
    terminated (SIGTERM to its group, SIGKILL later); `cancel.Cancelled` is raised
    once it ended.
    """
    argv = tuple(str(a) for a in argv)
    token = cancel.current()
    if token is not None:
        token.check()
    start = time.monotonic()
    proc = subprocess.Popen(
        argv, stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env(env),
        start_new_session=True, close_fds=True, cwd=cwd)
    try:
        with (token.child_process(proc) if token is not None else contextlib.nullcontext()):
            out, err = proc.communicate(input, timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(proc.pid)
        out, err = proc.communicate()
        result = _redacted(Result(argv, -9, _decode(out), _decode(err)), secrets)
        log.warning("%s timed out after %.0fs", argv[0], timeout)
        # Not `from e`: TimeoutExpired shows the unredacted argv (CHAP passwords).
        raise CommandError(result, timed_out=True) from None
    result = _redacted(Result(argv, proc.returncode, _decode(out), _decode(err)), secrets)
    _log(result, time.monotonic() - start)
    if token is not None and token.cancelled:
        log.info("%s ended (rc=%d) after its task was stopped", argv[0], result.rc)
        raise cancel.Cancelled()
    if check and result.rc != 0:
        raise CommandError(result)
    return result


async def run_async(
    argv: Sequence[str],
    *,
    timeout: float = DEFAULT_TIMEOUT,
    input: bytes | None = None,
    env: Mapping[str, str] | None = None,
    check: bool = True,
    secrets: Sequence[str] = (),
) -> Result:
    """Run a command from the event loop without blocking it (same contract as `run`)."""
    argv = tuple(str(a) for a in argv)
    start = time.monotonic()
    proc = await asyncio.create_subprocess_exec(
        *argv, stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env(env),
        start_new_session=True)
    try:
        out, err = await asyncio.wait_for(proc.communicate(input), timeout)
    except (TimeoutError, asyncio.CancelledError) as e:
        _kill_group(proc.pid)
        out, err = await proc.communicate()
        if isinstance(e, asyncio.CancelledError):
            raise
        result = _redacted(Result(argv, -9, _decode(out), _decode(err)), secrets)
        log.warning("%s timed out after %.0fs", argv[0], timeout)
        raise CommandError(result, timed_out=True) from e
    assert proc.returncode is not None
    result = _redacted(Result(argv, proc.returncode, _decode(out), _decode(err)), secrets)
    _log(result, time.monotonic() - start)
    if check and result.rc != 0:
        raise CommandError(result)
    return result


def _log(result: Result, elapsed: float) -> None:
    if log.isEnabledFor(logging.DEBUG):
        log.debug("%s rc=%d in %.3fs", " ".join(result.argv)[:300], result.rc, elapsed)
