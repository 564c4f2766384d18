"""Helpers for tests with sanlock: what a host's sanlock holds, a stalled upload that
holds SDM."""

from __future__ import annotations

import os
import socket
import subprocess
from typing import Any

from fake_storage.cluster import SimHost


def sanlock_lockspaces(host: SimHost) -> str:
    """`sanlock client gets` of the host's daemon: one "s LS:ID:PATH:OFFSET" line each."""
    out = subprocess.run(["sanlock", "client", "gets"], env={**os.environ, **host.sanlock.env},
                         capture_output=True, text=True, timeout=30, check=True)
    return out.stdout


def holds(host: SimHost, resource: str) -> bool:
    """Whether any process of the host holds a lease named `resource`."""
    return f":{resource}:" in host.sanlock.status()


def holder_pid(host: SimHost, sd: str, vm_id: str) -> int | None:
    """The pid holding the VM's lease on `host`, as its sanlock daemon reports it
    (``sanlock client status``: ``r <lockspace>:<resource>:<path>:<offset>:<lver> p <pid>``),
    not as the agent says."""
    if not host.sanlock.alive():
        return None
    for line in host.sanlock.status().splitlines():
        words = line.split()
        if len(words) >= 4 and words[0] == "r" and words[1].startswith(f"{sd}:{vm_id}:") \
                and words[2] == "p":
            return int(words[3])
    return None


class StalledUpload:
    """A chunked PUT /ovfstore that sends nothing after its headers: the domain's SDM
    lease is held until the body ends (on exit: an empty store is sent)."""

    def __init__(self, agent: Any, sd: str) -> None:
        self.agent = agent
        self.sd = sd
        self.sock: socket.socket | None = None

    def __enter__(self) -> StalledUpload:
        assert self.agent.tcp_address is not None
        self.sock = socket.create_connection(self.agent.tcp_address, timeout=120)
        self.sock.sendall(f"PUT /ovfstore/{self.sd} HTTP/1.1\r\nHost: x\r\n"
                          "Transfer-Encoding: chunked\r\n\r\n".encode())
        return self

    def __exit__(self, *exc: object) -> None:
        assert self.sock is not None
        with self.sock:
            # An empty store is a valid one: the two zero blocks, one chunk, then the end.
            end = b"\0" * 1024
            self.sock.sendall(b"%x\r\n" % len(end) + end + b"\r\n0\r\n\r\n")
            reply = self.sock.recv(65536)
        assert b" 200 " in reply.split(b"\r\n", 1)[0], reply[:500]
