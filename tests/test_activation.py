"""The loop strategy never maps an LV onto a loop device that is going away."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from vdsmlite.storage.activation import LoopActivation

pytestmark = pytest.mark.root

MiB = 1 << 20


def test_a_loop_being_detached_is_not_reused(tmp_path: Path) -> None:
    backing = tmp_path / "pv.img"
    backing.write_bytes(b"\0" * (4 * MiB))
    loop = subprocess.run(["losetup", "--find", "--show", "--offset", str(MiB),
                           "--sizelimit", str(MiB), str(backing)],
                          capture_output=True, text=True, check=True).stdout.strip()
    strategy = LoopActivation()
    fd = os.open(loop, os.O_RDONLY)
    try:
        assert strategy.find(str(backing), MiB) == loop
        # Still open, so detaching only marks it (autoclear) and it keeps its backing.
        subprocess.run(["losetup", "--detach", loop], check=True)
        assert strategy.find(str(backing), MiB) is None
        # Who must remove every mapping of the extents (before an LV goes) sees it.
        assert strategy.find(str(backing), MiB, detaching=True) == loop
    finally:
        os.close(fd)
        subprocess.run(["losetup", "--detach", loop], capture_output=True)
