"""vdsmlite-client against a real daemon."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from fake_storage.agent import Agent
from vdsmlite.cli import parse_params

CLIENT = [sys.executable, "-m", "vdsmlite.cli"]


def cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLIENT, *args], capture_output=True, text=True, timeout=120,
                          input=stdin)


def test_entry_point_is_installed() -> None:
    exe = shutil.which("vdsmlite-client", path=str(Path(sys.executable).parent))
    assert exe is not None
    out = subprocess.run([exe, "--help"], capture_output=True, text=True, check=True)
    assert "Namespace" in out.stdout


def test_call_over_unix_socket(shared_agent: Agent) -> None:
    out = cli("--config", str(shared_agent.config_path), "Host", "ping2")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) is True


def test_call_over_explicit_socket_and_tcp(shared_agent: Agent) -> None:
    out = cli("--unix", str(shared_agent.unix_socket), "Host", "getCapabilities")
    assert out.returncode == 0, out.stderr
    assert "uuid" in json.loads(out.stdout)
    assert shared_agent.tcp_address is not None
    host, port = shared_agent.tcp_address
    out = cli("--host", host, "--port", str(port), "Host", "getJobs", "job_type=storage")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == {}


def test_port_alone_means_tcp_on_localhost(shared_agent: Agent) -> None:
    """`--port N` without --host is the TCP port on this machine, not the unix socket
    of a config that may not exist."""
    assert shared_agent.tcp_address is not None
    _, port = shared_agent.tcp_address
    out = cli("--port", str(port), "Host", "ping2")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) is True
    out = cli("--unix", str(shared_agent.unix_socket), "--port", str(port), "Host", "ping2")
    assert out.returncode == 2
    assert "--unix goes alone" in out.stderr


def test_verb_error_is_json_on_stderr_with_exit_1(shared_agent: Agent) -> None:
    task = str(uuid.uuid4())
    out = cli("--unix", str(shared_agent.unix_socket), "Task", "getStatus", f"taskID={task}")
    assert out.returncode == 1
    assert json.loads(out.stderr) == {"code": 401, "message": f"Task id unknown: ('{task}',)"}
    out = cli("--unix", str(shared_agent.unix_socket), "Task", "getStatus", "taskID=nope")
    assert out.returncode == 1
    assert json.loads(out.stderr)["code"] == -32602


def test_params_from_file_and_stdin(shared_agent: Agent, tmp_path: Path) -> None:
    params = tmp_path / "p.json"
    params.write_text(json.dumps({"job_ids": [str(uuid.uuid4())]}))
    out = cli("--unix", str(shared_agent.unix_socket), "-f", str(params), "Host", "getJobs")
    assert out.returncode == 0, out.stderr
    out = cli("--unix", str(shared_agent.unix_socket), "-f", "-", "Host", "getJobs",
              stdin='{"job_type": "v2v"}')
    assert out.returncode == 0, out.stderr


def test_help_is_generated_from_the_schema() -> None:
    top = cli("--help")
    assert top.returncode == 0
    assert "Host" in top.stdout and "Task" in top.stdout
    ns = cli("Host", "--help")
    assert "getCapabilities" in ns.stdout and "ping2" in ns.stdout
    verb = cli("Host", "getJobs", "--help")
    assert "job_type (JobType, default null)" in verb.stdout
    assert "job_ids (list of uuid, default [])" in verb.stdout
    task = cli("Task", "getStatus", "--help")
    assert "taskID (uuid, required)" in task.stdout


def test_usage_errors_exit_2(shared_agent: Agent) -> None:
    assert cli("Nope", "verb").returncode == 2
    assert cli("Host", "noSuchVerb").returncode == 2
    out = cli("--unix", str(shared_agent.unix_socket), "Host", "ping2", "notakeyvalue")
    assert out.returncode == 2
    assert "expected key=value" in out.stderr
    assert cli("--host", "127.0.0.1", "--tls-cert", "/x", "Host", "ping2").returncode == 2


def test_unreachable_daemon_exits_3(tmp_path: Path) -> None:
    out = cli("--unix", str(tmp_path / "nobody.sock"), "Host", "ping2")
    assert out.returncode == 3
    assert "cannot reach the daemon" in out.stderr


@pytest.mark.parametrize(("pair", "expected"), [
    ("storageType=3", {"storageType": 3}),
    ("checkStatus=false", {"checkStatus": False}),
    ('guids=["a","b"]', {"guids": ["a", "b"]}),
    ("name=my domain", {"name": "my domain"}),
    ("sd=c2a6d7c8-8d81-4e01-9ed4-7eb670713448", {"sd": "c2a6d7c8-8d81-4e01-9ed4-7eb670713448"}),
    ("empty=", {"empty": ""}),
    ("expr=a=b", {"expr": "a=b"}),
])
def test_value_parsing(pair: str, expected: dict) -> None:
    assert parse_params([pair]) == expected


def test_a_reader_that_leaves_early_is_no_error(shared_agent: Agent) -> None:
    # `vdsmlite-client Host getVerbs | head -1`: a big answer, a reader gone after a line.
    proc = subprocess.Popen([*CLIENT, "--unix", str(shared_agent.unix_socket), "Host",
                             "getVerbs"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    assert proc.stdout.readline().strip() == b"{"
    proc.stdout.close()
    stderr = proc.stderr.read()
    assert proc.wait(timeout=120) == 0
    assert b"Traceback" not in stderr and b"BrokenPipe" not in stderr, stderr
