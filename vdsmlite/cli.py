"""vdsmlite-client: call any verb from a shell, vdsm-client style.

    vdsmlite-client Host getDeviceList storageType=3 checkStatus=false
    vdsmlite-client Task getStatus taskID=...
    vdsmlite-client -f params.json StorageDomain create

Namespaces, verbs and their params come from the API schema, so ``--help``
at every level lists exactly what the daemon accepts. Values are parsed as
JSON when they are JSON (numbers, booleans, lists, objects) and taken as
strings otherwise; the daemon coerces them the same way it coerces the engine's.
By default the client talks over the daemon's unix socket (from the same config
the daemon reads); ``--host``/``--port`` and ``--tls-*`` reach it over TCP (a
port alone means TCP on localhost);
``--stomp`` speaks JSON-RPC over STOMP 1.2 (the engine's door) instead of HTTP.

Exit status: 0 success, 1 the verb failed (error printed as JSON on stderr),
2 usage error, 3 the daemon could not be reached.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from vdsmlite import config
from vdsmlite.client import Client, ClientError, ServerError, StompClient, TlsFiles
from vdsmlite.errors import InvalidConfiguration
from vdsmlite.rpc.schema import Schema, Verb, default_schema

DEFAULT_PORT = 54321


def _param_help(verb: Verb) -> str:
    if not verb.params:
        return "This verb takes no params."
    lines = ["params (key=value):"]
    for p in verb.params:
        t = p.spec.get("type", "any")
        if t == "list":
            t = f"list of {p.spec['items'].get('type', 'any')}"
        req = "required" if p.required else f"default {json.dumps(p.default)}"
        doc = f" - {p.doc}" if p.doc else ""
        lines.append(f"  {p.name} ({t}, {req}){doc}")
    return "\n".join(lines)


def build_parser(schema: Schema) -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="vdsmlite-client",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Call a vdsmlite verb: vdsmlite-client Namespace verb [key=value ...]",
        epilog="Run 'vdsmlite-client <Namespace> --help' for its verbs.")
    conn = top.add_argument_group("connection")
    conn.add_argument("--config", type=Path, help="daemon config to find the unix socket in")
    conn.add_argument("--unix", type=Path, help="unix socket path (default: from the config)")
    conn.add_argument("--host", help="connect over TCP to this host instead of the unix socket")
    conn.add_argument("--port", type=int, default=None,
                      help="TCP port (default 54321); given alone: TCP on localhost")
    conn.add_argument("--tls-cert", type=Path, help="client certificate (TLS)")
    conn.add_argument("--tls-key", type=Path, help="client key (TLS)")
    conn.add_argument("--tls-ca", type=Path, help="CA that signed the daemon's certificate")
    conn.add_argument("--stomp", action="store_true",
                      help="speak JSON-RPC over STOMP (as vdsm-client) instead of HTTP")
    conn.add_argument("--timeout", type=float, default=600.0, help="seconds (default 600)")
    top.add_argument("-f", "--file", type=Path,
                     help="read params as a JSON object from FILE ('-' for stdin)")
    namespaces = top.add_subparsers(dest="namespace", metavar="Namespace", required=True)
    for ns, verbs in sorted(schema.namespaces().items()):
        ns_parser = namespaces.add_parser(
            ns, help=f"{len(verbs)} verbs",
            formatter_class=argparse.RawDescriptionHelpFormatter,
            description=f"{ns} verbs")
        methods = ns_parser.add_subparsers(dest="method", metavar="verb", required=True)
        for v in sorted(verbs, key=lambda v: v.method):
            first_line = v.doc.splitlines()[0] if v.doc else ""
            mp = methods.add_parser(
                v.method, help=first_line, description=v.doc, epilog=_param_help(v),
                formatter_class=argparse.RawDescriptionHelpFormatter)
            mp.add_argument("params", nargs="*", metavar="key=value")
    return top


def parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def parse_params(pairs: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"expected key=value, got {pair!r}")
        out[key] = parse_value(value)
    return out


def connect(args: argparse.Namespace) -> Client | StompClient:
    kind: Any = StompClient if args.stomp else Client
    if args.unix is not None and (args.host or args.port is not None):
        raise ValueError("--unix goes alone; --host/--port mean TCP")
    if args.host or args.port is not None:
        host = args.host or "localhost"
        port = DEFAULT_PORT if args.port is None else args.port
        tls = None
        if args.tls_cert or args.tls_key or args.tls_ca:
            if not (args.tls_cert and args.tls_key and args.tls_ca):
                raise ValueError("--tls-cert, --tls-key and --tls-ca go together")
            tls = TlsFiles(args.tls_cert, args.tls_key, args.tls_ca)
        return kind.tcp(host, port, tls, timeout=args.timeout)
    path = args.unix
    if path is None:
        cfg = config.load(args.config)
        path = cfg.unix_socket_path
        if path is None:
            raise ValueError("the daemon's config disables the unix socket; use --host")
    return kind.unix(path, timeout=args.timeout)


def main(argv: list[str] | None = None) -> None:
    schema = default_schema()
    parser = build_parser(schema)
    args = parser.parse_args(argv)
    try:
        params = parse_params(args.params)
        if args.file:
            text = sys.stdin.read() if str(args.file) == "-" else args.file.read_text()
            from_file = json.loads(text)
            if not isinstance(from_file, dict):
                raise ValueError("params file must hold a JSON object")
            params = {**from_file, **params}
    except (ValueError, OSError) as e:
        parser.error(str(e))
    try:
        client = connect(args)
    except (ValueError, InvalidConfiguration) as e:
        parser.error(str(e))
    method = f"{args.namespace}.{args.method}"
    try:
        with client:
            result = client.call(method, params)
    except ServerError as e:
        json.dump({"code": e.code, "message": e.message}, sys.stderr, indent=4)
        sys.stderr.write("\n")
        sys.exit(1)
    except ClientError as e:
        print(f"vdsmlite-client: cannot reach the daemon: {e}", file=sys.stderr)
        sys.exit(3)
    try:
        json.dump(result, sys.stdout, indent=4, sort_keys=True)
        sys.stdout.write("\n")
        sys.stdout.flush()
    except BrokenPipeError:
        # `vdsmlite-client ... | head`: the reader left; that is no error of ours.
        # Point stdout at /dev/null so the interpreter's final flush is quiet too.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(0)


if __name__ == "__main__":
    main()
