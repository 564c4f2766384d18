"""How a live migration's stream travels from the source's qemu to the destination's.

Over TCP, between hosts. The destination's qemu listens (`IncomingListener`) on the
first free port of ``[virt] migration_port_min..migration_port_max`` (libvirt's
49152-49215), one port per incoming VM, until the source's qemu connects: qemu takes
one connection and stops listening. It binds ``[virt] migration_listen`` if set, else
the address the source said it will connect to (`Incoming.address`: VM.migrate's
``dstqemu``, else the destination agent's host), so the port is open on that network
only, not on every interface.

``encrypted`` (VM.migrate's param, set by the engine per cluster) puts the stream in
TLS made from the host's PKI, the certificate, key and CA the agent serves JSON-RPC
with (``[rpc] tls_cert``, ``tls_key``, ``tls_ca``): the destination's qemu presents its
host certificate and accepts only a peer whose certificate the CA signed
(``verify-peer``); the source's qemu checks the destination's certificate against
the address it connects to. Without ``encrypted`` the stream is plain TCP, as VDSM's
unencrypted migrations are (libvirt's): what protects the port is that it listens
only during the migration and takes only the first connection.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import random
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vdsmlite import errors
from vdsmlite.blocking import RunBlocking
from vdsmlite.client import TlsFiles
from vdsmlite.virt.qmp import QmpCommandError, QmpSession

log = logging.getLogger("vdsmlite.virt.migtransport")

# The qemu object holding the TLS credentials; made again for every migration, so a
# renewed host certificate is used from the next migration on.
TLS_CREDS_ID = "vdsmlite-migration-tls"
TLS_DIR = "migration-tls"  # in the VM's run dir: the names qemu looks for
PORT_IN_USE = "Address already in use"  # in qemu's error when the port is taken


@dataclass(frozen=True)
class Incoming:
    """What the source asks of the destination's listener (vdsmlite's own
    ``incoming`` member of VM.migrationCreate's params)."""

    address: str | None = None  # where the source's qemu will connect
    encrypted: bool = False

    def to_params(self) -> dict[str, Any]:
        return {"address": self.address, "encrypted": self.encrypted}

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> Incoming:
        """From VM.migrationCreate's params; the engine's form has none: plain TCP
        at the listener's own address."""
        value = params.get("incoming")
        if value is None:
            return cls()
        if not isinstance(value, dict):
            raise errors.InvalidParameter(f"incoming: expected an object, got {value!r}")
        address, encrypted = value.get("address"), value.get("encrypted", False)
        if address is not None:
            address = check_host(address, "incoming.address")
        if not isinstance(encrypted, bool):
            raise errors.InvalidParameter(
                f"incoming.encrypted: expected a boolean, got {encrypted!r}")
        return cls(address, encrypted)


def check_host(value: Any, name: str) -> str:
    """A host name or an IP address (an IPv6 one with or without brackets)."""
    if not isinstance(value, str):
        raise errors.InvalidParameter(f"{name}: expected a host name or address, got "
                                      f"{value!r}")
    host = value[1:-1] if value.startswith("[") and value.endswith("]") else value
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        pass
    labels = host.rstrip(".").split(".")
    if not host or len(host) > 253 or not all(
            0 < len(label) <= 63 and label.replace("-", "").isalnum() and label.isascii()
            and not label.startswith("-") for label in labels):
        raise errors.InvalidParameter(f"{name}: expected a host name or address, got "
                                      f"{value!r}")
    return host


def _unspecified(address: str) -> bool:
    """0.0.0.0 or ::, where a listener binds every address and nobody connects."""
    try:
        return ipaddress.ip_address(address).is_unspecified
    except ValueError:
        return False


def tcp_uri(host: str, port: int) -> str:
    """qemu's migration URI; an IPv6 address goes in brackets."""
    return f"tcp:[{host}]:{port}" if ":" in host else f"tcp:{host}:{port}"


async def use_tls(session: QmpSession, tls: TlsFiles | None, run_dir: Path, *,
                  endpoint: str, hostname: str = "",
                  run_blocking: RunBlocking) -> None:
    """Set the migration's TLS in qemu: credentials from the host's PKI as `endpoint`
    ("server": the destination, "client": the source, checking the server's
    certificate against `hostname`); `tls` None: no TLS (the source's qemu may keep
    credentials from an earlier migration)."""
    if tls is None:
        await session.execute("migrate-set-parameters", {"tls-creds": "", "tls-hostname": ""})
        return
    creds_dir = await run_blocking(_link_creds, tls, run_dir / TLS_DIR, endpoint)
    # Out of use first (an earlier migration's), then made again from the files.
    await session.execute("migrate-set-parameters", {"tls-creds": ""})
    with contextlib.suppress(QmpCommandError):  # none yet
        await session.execute("object-del", {"id": TLS_CREDS_ID})
    try:
        await session.execute("object-add", {
            "qom-type": "tls-creds-x509", "id": TLS_CREDS_ID, "dir": str(creds_dir),
            "endpoint": endpoint, "verify-peer": True})
    except QmpCommandError as e:
        raise errors.MigrationError(f"qemu cannot use this host's TLS files: {e.desc}") from e
    params: dict[str, Any] = {"tls-creds": TLS_CREDS_ID}
    if endpoint == "client":
        params["tls-hostname"] = hostname
    await session.execute("migrate-set-parameters", params)


def _link_creds(tls: TlsFiles, creds_dir: Path, endpoint: str) -> Path:
    """The host's PKI under the names qemu's tls-creds-x509 reads (``ca-cert.pem``,
    ``<endpoint>-cert.pem``, ``<endpoint>-key.pem``): links, so no copy of the key is
    left in the VM's directory."""
    creds_dir.mkdir(mode=0o700, exist_ok=True)
    for name, target in (("ca-cert.pem", tls.ca), (f"{endpoint}-cert.pem", tls.cert),
                         (f"{endpoint}-key.pem", tls.key)):
        link = creds_dir / name
        link.unlink(missing_ok=True)
        os.symlink(os.path.abspath(target), link)
    return creds_dir


class IncomingListener:
    """The destination's side: qemu listening for one incoming migration."""

    def __init__(self, *, listen: str, default_address: str, ports: range,
                 tls: TlsFiles | None, run_blocking: RunBlocking) -> None:
        self._listen = listen  # [virt] migration_listen; "" for the source's address
        self._default_address = default_address  # [rpc] listen: the engine's form
        self._ports = ports
        self.tls = tls
        self._run_blocking = run_blocking

    def check(self, incoming: Incoming) -> None:
        """Refuse at once what this host cannot do (before storage is prepared)."""
        if incoming.encrypted and self.tls is None:
            raise errors.MigrationError("an encrypted migration needs this host's TLS "
                                        "([rpc] tls_cert, tls_key, tls_ca); it has none")

    async def listen(self, session: QmpSession, incoming: Incoming, run_dir: Path) -> str:
        """Make the (``-incoming defer``) qemu listen; the URI the source sends to."""
        self.check(incoming)
        if incoming.encrypted:
            await use_tls(session, self.tls, run_dir, endpoint="server",
                          run_blocking=self._run_blocking)
        bind = self._listen or incoming.address or self._default_address
        advertised = incoming.address or bind
        if _unspecified(advertised):  # nobody connects to 0.0.0.0: our name (DNS: off loop)
            advertised = await self._run_blocking(socket.getfqdn)
        # From a random place in the range: agents and VMs starting together do not
        # all race for its first port.
        start = random.randrange(len(self._ports))
        for port in (*self._ports[start:], *self._ports[:start]):
            try:
                await session.execute("migrate-incoming", {"uri": tcp_uri(bind, port)})
            except QmpCommandError as e:
                if PORT_IN_USE in e.desc:
                    continue
                raise errors.MigrationError(
                    f"cannot listen for the migration on {bind}: {e.desc}") from e
            log.info("listening for the migration on %s port %d%s", bind, port,
                     " (TLS)" if incoming.encrypted else "")
            return tcp_uri(advertised, port)
        raise errors.MigrationError(
            f"no free migration port on {bind} in {self._ports.start}-{self._ports.stop - 1}")
