"""The embedded default (`make run`): no config file, a local file domain under the state dir."""

from __future__ import annotations

from pathlib import Path

import pytest

from fake_storage.agent import Agent
from tests.storage_helpers import BLANK, DomainUnderTest
from vdsmlite import config

pytestmark = pytest.mark.root


@pytest.fixture
def no_system_config() -> None:
    if config.SYSTEM_CONFIG.exists():
        pytest.fail(f"{config.SYSTEM_CONFIG} exists on this machine; the embedded default "
                    "cannot be tested here")


def test_embedded_default_serves_a_local_domain(tmp_path: Path, no_system_config: None) -> None:
    a = Agent(tmp_path / "embedded", embedded=True).start()
    try:
        with a.client() as c:
            domains = c.call("Host.getStorageDomains")
            assert len(domains) == 1
            info = c.call("StorageDomain.getInfo", {"storagedomainID": domains[0]})
        assert (info["type"], info["name"], info["remotePath"]) == \
            ("LOCALFS", "local", str(a.state_dir / "local-domain"))
        dom = DomainUnderTest(a, domains[0], "localfs", info["block_size"],
                              data_dir=a.state_dir / "local-domain")
        img, vol = dom.create_volume(size=1 << 20)
        assert a.stop() == 0
        a.start()  # the same domain, with its volume, after a restart
        with a.client() as c:
            assert c.call("Host.getStorageDomains") == domains
            assert c.call("StorageDomain.getVolumes", {"storagedomainID": domains[0],
                                                       "storagepoolID": BLANK,
                                                       "imageID": img}) == [vol]
        assert a.log_text().count("created local storage domain") == 1
    finally:
        a.stop()
    assert a.crashes() == []


def test_config_files_do_not_get_a_local_domain(tmp_path: Path) -> None:
    path = tmp_path / "c.conf"
    path.write_text("[daemon]\n")
    assert config.load(path).storage.local_domain is None
    path.write_text(f"[storage]\nlocal_domain = \"{tmp_path / 'mine'}\"\n")
    assert config.load(path).storage.local_domain == tmp_path / "mine"
