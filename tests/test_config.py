"""Config loading: defaults, TOML files, precedence, and refusal of bad values."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from vdsmlite import config
from vdsmlite.errors import InvalidConfiguration

pytestmark = pytest.mark.unit


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "vdsmlite.conf"
    p.write_text(text)
    return p


def test_embedded_defaults(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("VDSMLITE_STATE_DIR", raising=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(config, "SYSTEM_CONFIG", tmp_path / "absent.conf")
    cfg = config.load()
    assert cfg.state_dir == tmp_path / "var"
    assert cfg.run_dir == tmp_path / "var" / "run"
    assert cfg.unix_socket_path == tmp_path / "var" / "run" / "vdsmlite.sock"
    assert (cfg.rpc.listen, cfg.rpc.port) == ("127.0.0.1", 54321)
    assert cfg.rpc.max_request_size == 16 * 1024 * 1024
    assert cfg.source == "embedded defaults"


def test_state_dir_from_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("VDSMLITE_STATE_DIR", str(tmp_path / "elsewhere"))
    monkeypatch.setattr(config, "SYSTEM_CONFIG", tmp_path / "absent.conf")
    assert config.load().state_dir == tmp_path / "elsewhere"


def test_file_then_overrides(tmp_path: Path) -> None:
    path = write(tmp_path, """
[daemon]
state_dir = "/srv/vdsmlite"
log_format = "json"
shutdown_timeout = 3

[rpc]
port = 5000
max_request_size = 2048
""")
    cfg = config.load(path, overrides={"rpc": {"port": 6000, "listen": None}})
    assert cfg.state_dir == Path("/srv/vdsmlite")
    assert cfg.daemon.log_format == "json"
    assert cfg.daemon.shutdown_timeout == 3.0
    assert cfg.rpc.port == 6000  # flag beats file
    assert cfg.rpc.listen == "127.0.0.1"  # None override keeps the file/default
    assert cfg.source == str(path)


@pytest.mark.parametrize(("text", "complaint"), [
    ("[daemon]\nstate_dirr = '/x'\n", "unknown setting(s) state_dirr"),
    ("[nosuch]\na = 1\n", "unknown config section(s): nosuch"),
    ("[rpc]\nport = '54321'\n", "[rpc] port: expected an integer"),
    ("[rpc]\nport = 70000\n", "is not a TCP port"),
    ("[rpc]\nunix_socket = 1\n", "expected true or false"),
    ("[rpc]\nmax_request_size = 10\n", "at least 1024"),
    ("[rpc]\ntls_cert = '/a.pem'\n", "must be set together"),
    ("[rpc]\nlisten = '0.0.0.0'\n", "refusing plain TCP on non-loopback"),
    ("[rpc]\nlisten = '10.1.2.3'\n", "refusing plain TCP on non-loopback"),
    ("[daemon]\nlog_level = 'LOUD'\n", "unknown level"),
    ("[daemon]\nhost_uuid = 'abc'\n", "is not a UUID"),
    ("[daemon]\nworker_threads = 0\n", "worker_threads"),
    ("[virt]\nmigration_destination_timeout = 0\n", "migration_destination_timeout: must"),
    ("[virt]\nmigration_port_min = 50000\nmigration_port_max = 49999\n",
     "migration_port_min..migration_port_max"),
    ("[virt]\nmigration_port_max = 70000\n", "migration_port_min..migration_port_max"),
    ("[virt]\nmigration_listen = 'host.example'\n", "migration_listen: expected an IP"),
    ("[virt]\nmax_outgoing_migrations = 0\n", "max_outgoing_migrations, max_incoming"),
    ("[virt]\nmigration_retry_timeout = 0\n", "migration_retry_timeout: must"),
    ("[virt]\nmigration_monitor_interval = -1\n", "migration_monitor_interval: must"),
    ("this is = not toml [", "config file"),
    ("daemon = 3\n", "must be a table"),
])
def test_bad_config_is_refused(tmp_path: Path, text: str, complaint: str) -> None:
    with pytest.raises(InvalidConfiguration) as e:
        config.load(write(tmp_path, text))
    assert complaint in str(e.value)


def test_insecure_allows_plain_tcp_off_loopback(tmp_path: Path) -> None:
    cfg = config.load(write(tmp_path, "[rpc]\nlisten = '0.0.0.0'\ninsecure = true\n"))
    assert cfg.rpc.listen == "0.0.0.0"


def test_loopback_addresses() -> None:
    assert config.is_loopback("127.0.0.1")
    assert config.is_loopback("::1")
    assert config.is_loopback("localhost")
    assert not config.is_loopback("::")
    assert not config.is_loopback("0.0.0.0")
    assert not config.is_loopback("example.com")


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(InvalidConfiguration, match="does not exist"):
        config.load(tmp_path / "nope.conf")


def test_daemon_show_config_applies_flags(tmp_path: Path) -> None:
    path = write(tmp_path, "[rpc]\nport = 5000\n")
    out = subprocess.run(
        [sys.executable, "-m", "vdsmlite", "--config", str(path), "--port", "6001",
         "--state-dir", str(tmp_path / "s"), "--show-config"],
        capture_output=True, text=True, check=True)
    shown = json.loads(out.stdout)
    assert shown["rpc"]["port"] == 6001
    assert shown["daemon"]["state_dir"] == str(tmp_path / "s")
    assert shown["daemon"]["run_dir"] == str(tmp_path / "s" / "run")


def test_daemon_exits_2_on_bad_config(tmp_path: Path) -> None:
    path = write(tmp_path, "[rpc]\nlisten = '0.0.0.0'\n")
    out = subprocess.run([sys.executable, "-m", "vdsmlite", "--config", str(path)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert "refusing plain TCP on non-loopback address '0.0.0.0'" in out.stderr


def test_packaged_config_file_is_valid() -> None:
    packaged = Path(__file__).parent.parent / "contrib" / "etc" / "vdsmlite.conf"
    cfg = config.load(packaged)
    assert cfg.state_dir == Path("/var/lib/vdsmlite")
    assert cfg.run_dir == Path("/run/vdsmlite")


@pytest.mark.parametrize("value", ["", "user", "bridge", "bridge:ovirtmgmt", "bridge:br-0.1"])
def test_nic_backend_accepted(value: str) -> None:
    assert config.load(overrides={"virt": {"nic_backend": value}}).virt.nic_backend == value


@pytest.mark.parametrize("value", ["tap", "bridge:", "bridge:a b", "bridge:x,y",
                                   "bridge:sixteen-chars-xy", "User"])
def test_nic_backend_refused(value: str) -> None:
    with pytest.raises(InvalidConfiguration, match=r"\[virt\] nic_backend"):
        config.load(overrides={"virt": {"nic_backend": value}})
