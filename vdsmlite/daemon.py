"""The vdsmlite daemon: start-up, listeners, signals and an orderly shutdown.

Start-up order: config -> logging -> services -> verb handlers bound to the
schema -> HTTP application and STOMP server -> listeners (TCP, optionally TLS;
unix socket; each tells HTTP from STOMP by the first bytes) ->
READY=1. Shutdown on SIGTERM/SIGINT, in the order that loses nothing:

1. STOPPING=1; new calls are refused (3001) while calls in flight continue;
2. listeners close, so no new connections arrive;
3. calls in flight get ``shutdown_timeout`` seconds, then are cancelled and
   answered with 443 (Action was stopped);
4. WebSockets are closed (1001 going away), jobs are given the same grace and
   then aborted, the worker threads finish.

A second signal during shutdown exits at once.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import json
import logging
import os
import signal
import socket
import ssl
import sys
from pathlib import Path
from typing import Any

from aiohttp import web

from vdsmlite import __version__, config, http, logs
from vdsmlite.api import build_handlers
from vdsmlite.blocking import RunBlocking
from vdsmlite.errors import InvalidConfiguration
from vdsmlite.gcwatch import GcWatch
from vdsmlite.http import wire
from vdsmlite.http.common import DOORS, StreamDoors
from vdsmlite.http.putserver import PutProtocol
from vdsmlite.locking.watchdog import WatchdogError
from vdsmlite.ovf import tarstream
from vdsmlite.rpc import http as rpc_http
from vdsmlite.rpc.detect import DetectingProtocol
from vdsmlite.rpc.dispatch import Dispatcher
from vdsmlite.rpc.schema import default_schema
from vdsmlite.rpc.stompserver import StompServer
from vdsmlite.sdnotify import Notifier
from vdsmlite.services import Services

log = logging.getLogger("vdsmlite.daemon")


class StartupError(Exception):
    """The daemon cannot start; the message says why and what to do."""


def server_ssl_context(cfg: config.Config) -> ssl.SSLContext | None:
    r = cfg.rpc
    if r.tls_cert is None:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(r.tls_ca))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    # Clients must prove who they are: the engine and admins hold certs signed by our CA.
    ctx.verify_mode = ssl.CERT_REQUIRED
    try:
        ctx.load_cert_chain(str(r.tls_cert), str(r.tls_key))
    except (OSError, ssl.SSLError) as e:
        raise StartupError(f"cannot load TLS certificate/key: {e}") from e
    return ctx


def _claim_unix_socket(path: Path) -> None:
    """Remove a stale socket file, refusing if another daemon is listening on it."""
    if not path.exists():
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError:
        path.unlink()  # left behind by a daemon that died; nobody answers on it
        return
    finally:
        probe.close()
    raise StartupError(f"another vdsmlite is already listening on {path}")


# The event loop receives upload bodies (the GIL released in each recv) while
# validator threads run Python over full buffers. At CPython's default of 5 ms,
# the loop coming back from every recv waited up to 5 ms for the GIL: 1 GiB
# block-domain uploads ran at ~400 MiB/s, at 0.5 ms at ~515 (bench/ovfstore.py).
GIL_SWITCH_INTERVAL = 0.0005


class _Detecting:
    """A protocol factory: each connection starts with protocol detection (HTTP or STOMP)."""

    def __init__(self, runner: web.AppRunner, stomp: StompServer, doors: StreamDoors,
                 run_blocking: RunBlocking, timeout: float) -> None:
        assert runner.server is not None
        self._http = runner.server
        self._stomp = stomp
        self._uploads = http.put_handler(doors)
        self._stall_timeout = doors.stall_timeout
        self._run_blocking = run_blocking
        self._timeout = timeout

    def _put(self) -> PutProtocol:
        return PutProtocol(self._uploads, stall_timeout=self._stall_timeout,
                           run_blocking=self._run_blocking)

    def __call__(self) -> DetectingProtocol:
        return DetectingProtocol(self._http, self._stomp.protocol, self._timeout,
                                 put=self._put)


class MultiProtocolTCPSite(web.TCPSite):
    """aiohttp's TCP site, with STOMP detected on the same port (after TLS)."""

    def __init__(self, runner: web.AppRunner, factory: _Detecting, *args: Any,
                 **kw: Any) -> None:
        super().__init__(runner, *args, **kw)
        self._factory = factory

    async def start(self) -> None:
        self._runner._reg_site(self)
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            self._factory, self._host, self._port, ssl=self._ssl_context,
            backlog=self._backlog, reuse_address=self._reuse_address,
            reuse_port=self._reuse_port)


class MultiProtocolUnixSite(web.UnixSite):
    def __init__(self, runner: web.AppRunner, factory: _Detecting, path: str) -> None:
        super().__init__(runner, path)
        self._factory = factory

    async def start(self) -> None:
        self._runner._reg_site(self)
        loop = asyncio.get_running_loop()
        self._server = await loop.create_unix_server(self._factory, self._path,
                                                     backlog=self._backlog)


def build_app(services: Services) -> tuple[web.Application, Dispatcher]:
    """The HTTP application with every door, wired to `services` (tests reuse it)."""
    cfg = services.config
    dispatcher = Dispatcher(
        default_schema(),
        build_handlers(services),
        services.metrics,
        max_concurrent=cfg.rpc.max_concurrent_calls,
        validate_returns=cfg.devel.validate_returns,
    )
    app = web.Application(client_max_size=cfg.rpc.max_request_size)
    rpc_http.add_routes(app, dispatcher, services.events, cfg.rpc.max_request_size)
    app.router.add_get("/metrics", services.metrics.handle)
    http.add_routes(app, StreamDoors(jobs=services.jobs, ovf=services.ovf,
                                     transfers=services.transfers,
                                     stall_timeout=cfg.storage.upload_stall_timeout))
    return app, dispatcher


async def _warm_up_ovf_workers(services: Services, delay: float) -> None:
    await asyncio.sleep(delay)
    await services.run_blocking(services.ovf_workers.start)


def _log_warm_up(task: asyncio.Future[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.warning("could not start the OVF parser processes: %s", task.exception())


class Daemon:
    def __init__(self, cfg: config.Config) -> None:
        self.cfg = cfg
        self.notifier = Notifier()
        self._stop = asyncio.Event()
        self.addresses: list[str] = []
        # Set once *we* bound the unix socket; a daemon refused at start-up must
        # not remove the socket of the one already running.
        self._own_socket: Path | None = None
        self._warm_up: asyncio.Future[None] | None = None

    def request_stop(self, signame: str) -> None:
        if self._stop.is_set():
            log.warning("second %s during shutdown: exiting now", signame)
            os._exit(1)
        log.info("received %s, shutting down", signame)
        self._stop.set()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop, sig.name)
        self.notifier.status("Starting")
        cfg = self.cfg
        for d in (cfg.state_dir, cfg.run_dir):
            d.mkdir(parents=True, exist_ok=True)

        services = Services(cfg)
        gc_watch = GcWatch(services.metrics.gc_pauses)
        gc_watch.install()
        # Armed before serving: from now on a fence request can reset this host.
        try:
            await services.watchdog.start()
        except WatchdogError as e:
            raise StartupError(str(e)) from e
        # After an agent restart sanlock still renews the lockspaces it joined (peers see
        # this host live there): hear fence requests in them before anything else.
        await services.fencing.listen_to_joined()
        app, dispatcher = build_app(services)
        runner = web.AppRunner(app, handle_signals=False, access_log=None,
                               shutdown_timeout=cfg.daemon.shutdown_timeout)
        await runner.setup()
        stomp = StompServer(dispatcher, services.events,
                            max_request_size=cfg.rpc.max_request_size,
                            stall_timeout=cfg.rpc.stall_timeout)
        try:
            await self._listen(runner, _Detecting(runner, stomp, app[DOORS],
                                                  services.receivers.run,
                                                  cfg.rpc.stall_timeout))
            if cfg.storage.local_domain is not None:
                # Calls are answered 99 (initializing) until the local domain is ready.
                sd = await services.provisioner.ensure_local_domain(cfg.storage.local_domain)
                log.info("serving local storage domain %s from %s", sd, cfg.storage.local_domain)
            # VMs that outlived the previous agent are found (and their storage held
            # again) before any verb can touch that storage.
            await services.vms.recover()
            dispatcher.serve()
            status = "Serving on " + ", ".join(self.addresses)
            # Machine-readable addresses for harnesses that start us on port 0.
            self.notifier.ready(status, *(f"VDSMLITE_{a.split(':', 1)[0].upper()}={a}"
                                          for a in self.addresses))
            self.notifier.start_watchdog()
            # In the background, a little after start-up (a daemon started for one call
            # never spawns them); a failure only means starting them on first use.
            delay = cfg.storage.ovf_parser_warmup_delay
            if delay >= 0:
                self._warm_up = asyncio.ensure_future(_warm_up_ovf_workers(services, delay))
                self._warm_up.add_done_callback(_log_warm_up)
            if not (tarstream.ACCELERATED and wire.ACCELERATED):
                log.warning("the C hot loops of OVF_STORE uploads (vdsmlite.ovf._tarscan, "
                            "vdsmlite.http._chunked) were not built: uploads run in "
                            "Python, slower")
            log.info("vdsmlite %s ready (host %s, config: %s); %s", __version__,
                     services.host_uuid, cfg.source, status)
            await self._stop.wait()
        finally:
            if self._warm_up is not None:
                self._warm_up.cancel()
            self.notifier.stopping()
            dispatcher.begin_shutdown()
            for site in list(runner.sites):
                with contextlib.suppress(Exception):
                    await site.stop()
            await dispatcher.drain(grace=cfg.daemon.shutdown_timeout)
            stomp.close()
            await rpc_http.close_websockets(app)
            await runner.cleanup()
            await services.close()
            if self._own_socket is not None:
                with contextlib.suppress(FileNotFoundError):
                    self._own_socket.unlink()
            await self.notifier.close()
            gc_watch.uninstall()
            log.info("vdsmlite stopped")

    async def _listen(self, runner: web.AppRunner, factory: _Detecting) -> None:
        cfg = self.cfg
        ssl_ctx = server_ssl_context(cfg)
        site = MultiProtocolTCPSite(runner, factory, cfg.rpc.listen, cfg.rpc.port,
                                    ssl_context=ssl_ctx, reuse_address=True, backlog=1024)
        try:
            await site.start()
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise StartupError(
                    f"{cfg.rpc.listen}:{cfg.rpc.port} is already in use "
                    "(another vdsmlite or vdsm running?)") from e
            raise StartupError(f"cannot listen on {cfg.rpc.listen}:{cfg.rpc.port}: {e}") from e
        server = site._server  # the bound port matters when port 0 asked for any
        assert server is not None
        for sock in server.sockets:  # type: ignore[attr-defined]
            host, port = sock.getsockname()[:2]
            scheme = "https" if ssl_ctx else "http"
            self.addresses.append(f"{scheme}://{host}:{port}" if ":" not in host
                                  else f"{scheme}://[{host}]:{port}")
        path = cfg.unix_socket_path
        if path is not None:
            _claim_unix_socket(path)
            usite = MultiProtocolUnixSite(runner, factory, str(path))
            await usite.start()
            self._own_socket = path
            # Root (and the admin group) only: the socket is unauthenticated.
            os.chmod(path, 0o660)
            self.addresses.append(f"unix://{path}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="vdsmlite",
        description="vdsmlite host storage agent (VDSM-compatible JSON-RPC).")
    p.add_argument("--config", type=Path, help=f"config file (default {config.SYSTEM_CONFIG} "
                   "if it exists, else embedded defaults)")
    p.add_argument("--state-dir", type=Path, help="state directory (default ./var or "
                   "$VDSMLITE_STATE_DIR)")
    p.add_argument("--listen", help="TCP address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="TCP port (default 54321; 0 picks a free one)")
    p.add_argument("--show-config", action="store_true",
                   help="print the effective config as JSON and exit")
    p.add_argument("--version", action="version", version=f"vdsmlite {__version__}")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    overrides = {
        "daemon": {"state_dir": str(args.state_dir) if args.state_dir else None},
        "rpc": {"listen": args.listen, "port": args.port},
    }
    try:
        cfg = config.load(args.config, overrides=overrides)
    except InvalidConfiguration as e:
        print(f"vdsmlite: invalid configuration: {e.value[0] if e.value else e}", file=sys.stderr)
        sys.exit(2)
    if args.show_config:
        print(json.dumps(cfg.as_dict(), indent=2, sort_keys=True))
        return
    logs.setup(cfg.daemon.log_level, cfg.daemon.log_format)
    sys.setswitchinterval(GIL_SWITCH_INTERVAL)
    try:
        asyncio.run(Daemon(cfg).run())
    except StartupError as e:
        log.error("cannot start: %s", e)
        sys.exit(1)
    except KeyboardInterrupt:  # only before the signal handlers are installed
        sys.exit(130)
