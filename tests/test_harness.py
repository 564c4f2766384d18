"""The harness cleans up after runs that die: daemons go with the runner."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from fake_storage.children import tied_to_this_process
from tests.helpers import output_of_a_killed_runner


def test_daemon_started_by_a_killed_runner_does_not_outlive_it() -> None:
    # The runner dies only once the daemon runs (setpriv has set the signal by then:
    # a parent gone before that is a race the harness never has, it waits for READY).
    script = (
        "import subprocess, time\n"
        "from pathlib import Path\n"
        "from fake_storage.children import tied_to_this_process\n"
        "p = subprocess.Popen(tied_to_this_process(['sleep', '300'], 'KILL'),"
        " start_new_session=True, stdout=subprocess.DEVNULL)\n"
        "while Path(f'/proc/{p.pid}/comm').read_text().strip() != 'sleep':\n"
        "    time.sleep(0.01)\n"
        "print(p.pid, flush=True)\n")
    daemon = int(output_of_a_killed_runner(script))
    deadline = time.monotonic() + 30
    while True:
        try:
            # Reparented to init (or a subreaper) which reaps it; until then a zombie.
            stat = Path(f"/proc/{daemon}/stat").read_text()
        except FileNotFoundError:
            break
        if stat.rsplit(")", 1)[1].split()[0] == "Z":
            break
        assert time.monotonic() < deadline, f"pid {daemon} outlived its runner"
        time.sleep(0.05)


def test_wrapping_keeps_the_command_and_its_pid() -> None:
    argv = tied_to_this_process([sys.executable, "-c", "import os; print(os.getpid())"])
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    out, _ = p.communicate(timeout=30)
    assert int(out) == p.pid
    assert os.path.basename(argv[0]) in ("setpriv", os.path.basename(sys.executable))
