"""iSCSI through open-iscsi's iscsiadm: node records, CHAP, login/logout, discovery.

The flows mirror VDSM's so a host behaves the same under either agent:

* connect: ``-m node -o new`` for (target, portal, tpgt, iface), CHAP set with
  ``-o update``, then ``--login``; a failed login deletes the node record it
  created, so nothing half-done remains.
* disconnect: ``--logout``, then ``-o delete`` of the node record.
* discovery: a temporary ``discoverydb`` record (with discovery CHAP), then
  ``--discover``, then the record is deleted; results come back in VDSM's
  ``"<host>:<port>,<tpgt> <iqn>"`` form.

CHAP passwords travel on iscsiadm's argv (as with VDSM); they are masked in
every log line and error message.
"""

from __future__ import annotations

import ipaddress
import logging
import re
from dataclasses import dataclass

from vdsmlite import errors
from vdsmlite.storage import commands

log = logging.getLogger("vdsmlite.storage.iscsi")

ISCSIADM = "iscsiadm"

# iscsiadm exit codes (open-iscsi include/iscsi_err.h)
ERR_SESS_NOT_FOUND = 2
ERR_TRANS_NOT_FOUND = 12
ERR_SESS_EXISTS = 15
ERR_ISCSID_NOTCONN = 20
ERR_NO_OBJS_FOUND = 21
ERR_LOGIN_AUTH_FAILED = 24

_IQN_RE = re.compile(r"^(iqn\.\d{4}-\d{2}\.[^\s,]+|eui\.[0-9A-Fa-f]{16}|naa\.[0-9A-Fa-f]{16,32})$")
_HOST_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9.-]{0,252})$")
_IFACE_RE = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
_DISCOVERED_RE = re.compile(r"^(?P<addr>\[[0-9A-Fa-f:.]+\]|[^\s:\[\]]+):(?P<port>\d+),"
                            r"(?P<tpgt>-?\d+)\s+(?P<iqn>\S+)$")


def valid_host(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return bool(_HOST_RE.match(host))


def valid_iqn(iqn: str) -> bool:
    return len(iqn) <= 223 and bool(_IQN_RE.match(iqn))


def valid_iface(name: str) -> bool:
    return bool(_IFACE_RE.match(name))


def valid_secret(value: str) -> bool:
    return len(value) <= 255 and not any(c in value for c in "\0\n\r")


@dataclass(frozen=True)
class Chap:
    user: str
    password: str


@dataclass(frozen=True)
class Target:
    address: str
    port: int
    iqn: str
    tpgt: int = 1
    iface: str = "default"

    @property
    def host_port(self) -> str:
        host = f"[{self.address}]" if ":" in self.address else self.address
        return f"{host}:{self.port}"

    @property
    def portal(self) -> str:
        return f"{self.host_port},{self.tpgt}"

    def node_args(self) -> list[str]:
        return ["-m", "node", "-T", self.iqn, "-I", self.iface, "-p", self.portal]


class Iscsiadm:
    def __init__(self, timeout: float = 60.0) -> None:
        self.timeout = timeout

    async def _run(self, args: list[str], secrets: tuple[str, ...] = (),
                   check: bool = True) -> commands.Result:
        return await commands.run_async([ISCSIADM, *args], timeout=self.timeout,
                                        secrets=secrets, check=check)

    async def add_node(self, target: Target, chap: Chap | None) -> None:
        try:
            await self._run([*target.node_args(), "-o", "new"])
        except commands.CommandError as e:
            raise errors.AddiSCSINodeError(target.iqn, target.portal, e.err.strip()) from e
        if chap is None:
            return
        try:
            for name, value in (("node.session.auth.authmethod", "CHAP"),
                                ("node.session.auth.username", chap.user),
                                ("node.session.auth.password", chap.password)):
                await self._run([*target.node_args(), "-o", "update", "-n", name, "-v", value],
                                secrets=(chap.password,))
        except commands.CommandError as e:
            await self.delete_node(target)
            raise errors.SetiSCSIAuthError(target.iqn, target.portal, e.err.strip()) from e

    async def login(self, target: Target) -> None:
        result = await self._run([*target.node_args(), "--login"], check=False)
        if result.rc in (0, ERR_SESS_EXISTS):
            return
        detail = result.err.strip()[-300:] or f"iscsiadm rc={result.rc}"
        if result.rc == ERR_LOGIN_AUTH_FAILED:
            raise errors.iSCSILoginAuthError(target.iqn, target.portal, detail)
        raise errors.iSCSILoginError(target.iqn, target.portal, detail)

    async def logout(self, target: Target) -> None:
        result = await self._run([*target.node_args(), "--logout"], check=False)
        if result.rc not in (0, ERR_SESS_NOT_FOUND, ERR_NO_OBJS_FOUND):
            raise errors.iSCSILogoutError(target.iqn, target.portal, result.err.strip()[-300:])

    async def delete_node(self, target: Target) -> None:
        result = await self._run([*target.node_args(), "-o", "delete"], check=False)
        if result.rc not in (0, ERR_NO_OBJS_FOUND):
            log.warning("cannot delete node record %s %s: %s", target.iqn, target.portal,
                        result.err.strip())

    async def node_exists(self, target: Target) -> bool:
        result = await self._run(target.node_args(), check=False)
        return result.rc == 0

    async def discover(self, host: str, port: int, chap: Chap | None = None,
                       iface: str = "default", ipv6_enabled: bool = False) -> list[str]:
        """SendTargets discovery; VDSM's ``"host:port,tpgt iqn"`` strings."""
        portal = Target(host, port, "iqn.0000-00.unused", iface=iface).host_port
        base = ["-m", "discoverydb", "-t", "sendtargets", "-p", portal, "-I", iface]
        secrets = (chap.password,) if chap else ()
        try:
            await self._run([*base, "-o", "new"])
            if chap is not None:
                for name, value in (("discovery.sendtargets.auth.authmethod", "CHAP"),
                                    ("discovery.sendtargets.auth.username", chap.user),
                                    ("discovery.sendtargets.auth.password", chap.password)):
                    await self._run([*base, "-o", "update", "-n", name, "-v", value],
                                    secrets=secrets)
            result = await self._run([*base, "--discover"], secrets=secrets)
        except commands.CommandError as e:
            raise errors.iSCSIDiscoveryError(portal, e.err.strip()[-300:] or str(e)) from e
        finally:
            await self._run([*base, "-o", "delete"], check=False)
        return parse_discovery(result.out, ipv6_enabled)

    async def rescan_sessions(self) -> None:
        result = await self._run(["-m", "session", "-R"], check=False)
        if result.rc not in (0, ERR_NO_OBJS_FOUND, ERR_ISCSID_NOTCONN):
            log.warning("iSCSI session rescan failed: %s", result.err.strip())


def parse_discovery(out: str, ipv6_enabled: bool) -> list[str]:
    """Lines of ``iscsiadm --discover`` as VDSM returns them (IPv6 only when enabled)."""
    found = []
    for line in out.splitlines():
        m = _DISCOVERED_RE.match(line.strip())
        if not m:
            continue
        addr = m.group("addr")
        if addr.startswith("[") and not ipv6_enabled:
            continue
        found.append(f"{addr}:{m.group('port')},{m.group('tpgt')} {m.group('iqn')}")
    return found
