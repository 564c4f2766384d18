"""qemu-img, for qcow2 volumes: create (with a backing file), info, resize."""

from __future__ import annotations

import json
from typing import Any

from vdsmlite.storage import commands

QEMU_IMG = "qemu-img"
TIMEOUT = 600.0

RAW = "raw"
QCOW2 = "qcow2"


class QemuImgError(Exception):
    pass


def _run(*args: str, timeout: float = TIMEOUT) -> commands.Result:
    try:
        return commands.run([QEMU_IMG, *args], timeout=timeout)
    except commands.CommandError as e:
        raise QemuImgError(str(e)) from e


def create(path: str, fmt: str, size: int | None = None, *, backing: str | None = None,
           backing_fmt: str | None = None, cwd: str | None = None) -> None:
    """Create an image. qcow2 uses compat=1.1.

    A backing file is stored exactly as given - VDSM stores the bare parent
    volume UUID, resolved relative to the image directory, so a chain survives
    being mounted elsewhere - and is not opened (``-u``): the parent may not be
    active, and the size is always given.
    """
    args = ["create", "-q", "-f", fmt]
    if fmt == QCOW2:
        args += ["-o", "compat=1.1"]
    if backing is not None:
        args += ["-b", backing, "-F", backing_fmt or RAW, "-u"]
    # "--": the path is never an option, whatever it looks like.
    args += ["--", path]
    if size is not None:
        args.append(str(size))
    try:
        commands.run([QEMU_IMG, *args], timeout=TIMEOUT, cwd=cwd)
    except commands.CommandError as e:
        raise QemuImgError(str(e)) from e


def info(path: str, fmt: str | None = None) -> dict[str, Any]:
    args = ["info", "--output", "json", "-U"]
    if fmt:
        args += ["-f", fmt]
    out = _run(*args, "--", path)
    try:
        result: dict[str, Any] = json.loads(out.out)
    except ValueError as e:
        raise QemuImgError(f"qemu-img info {path}: bad JSON: {e}") from e
    return result


def resize(path: str, fmt: str, size: int) -> None:
    _run("resize", "-q", "-f", fmt, "--", path, str(size))


def commit(top: str, top_fmt: str, base: str, *, cwd: str | None = None,
           timeout: float = 3600.0) -> None:
    """``qemu-img commit -b base``: copy the data of `top` (and any volumes between it
    and `base`) into `base`. With ``-b`` qemu-img leaves `top` as it was, so a commit
    that is interrupted and run again gives the same result (VDSM's cold merge)."""
    args = ["commit", "-q", "-t", "none", "-b", base, "-f", top_fmt, "--", top]
    try:
        commands.run([QEMU_IMG, *args], timeout=timeout, cwd=cwd)
    except commands.CommandError as e:
        raise QemuImgError(str(e)) from e


def rebase_unsafe(path: str, backing: str, backing_fmt: str, *,
                  cwd: str | None = None) -> None:
    """Point a qcow2 image at another backing file without copying (``rebase -u``);
    `backing` is stored as given (a bare volume UUID, relative to the image dir)."""
    args = ["rebase", "-q", "-u", "-f", QCOW2, "-b", backing, "-F", backing_fmt, "--", path]
    try:
        commands.run([QEMU_IMG, *args], timeout=TIMEOUT, cwd=cwd)
    except commands.CommandError as e:
        raise QemuImgError(str(e)) from e


def measure_subchain(chain: list[tuple[str, str]], *, block: bool) -> dict[str, Any]:
    """``qemu-img measure -O qcow2`` of the volumes `chain` ((path, format), base first)
    as one image, ignoring whatever is below the base (VDSM's measure with ``base``)."""
    protocol = "host_device" if block else "file"
    node: dict[str, Any] | None = None
    for path, fmt in chain:
        current: dict[str, Any] = {"driver": fmt, "file": {"driver": protocol,
                                                           "filename": path}}
        if fmt == QCOW2:
            current["backing"] = node
        node = current
    assert node is not None
    out = _run("measure", "--output", "json", "-O", QCOW2, "json:" + json.dumps(node))
    try:
        result: dict[str, Any] = json.loads(out.out)
    except ValueError as e:
        raise QemuImgError(f"qemu-img measure: bad JSON: {e}") from e
    return result
