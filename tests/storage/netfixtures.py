"""Network fixtures for the address-policy tests: closed and counting ports, names and spellings that
reach loopback, and a self-signed certificate for the loopback origins (used by tests/storage and
tests/node)."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import ssl
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest


def closed_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])  # nothing listens once the socket closes


@dataclass
class Listener:
    """A TCP port that counts the connections it accepts and closes each at once.

    The private target that must see none when the policy refuses a URL; and an open port that
    speaks neither HTTP nor TLS.
    """

    host: str
    port: int = 0
    connections: int = 0


@asynccontextmanager
async def listening(host: str = "127.0.0.1") -> AsyncIterator[Listener]:
    listener = Listener(host)

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        listener.connections += 1
        writer.close()

    server = await asyncio.start_server(accept, host, 0)
    listener.port = int(server.sockets[0].getsockname()[1])
    try:
        yield listener
    finally:
        server.close()
        await server.wait_closed()


def loopback_name() -> str:
    """A name, not spelled ``localhost``, that this machine resolves to loopback addresses only: one from
    /etc/hosts (``ip6-localhost``, the container's name, ...), else the host name (Debian: 127.0.1.1).
    """
    names: list[str] = []
    for line in Path("/etc/hosts").read_text().splitlines():
        fields = line.split("#", 1)[0].split()
        names += fields[1:]
    for name in [*names, socket.gethostname()]:
        if name.rstrip(".").lower().endswith("localhost"):
            continue
        try:
            infos = socket.getaddrinfo(name, 443, type=socket.SOCK_STREAM)
        except OSError:
            continue
        found = {ipaddress.ip_address(str(info[4][0]).split("%")[0]) for info in infos}
        if found and all(a.is_loopback for a in found):
            return name
    pytest.fail("no name on this machine resolves to loopback only (see /etc/hosts)")


def refused_hosts(port: int, port6: int) -> list[str]:
    """``host:port`` spellings of addresses the policy refuses. Those that reach this machine's loopback
    name ``port`` (IPv4) or ``port6`` (``::1``), where a :class:`Listener` counts connections.
    """
    return [
        f"127.0.0.1:{port}",
        f"2130706433:{port}",  # decimal
        f"0x7f000001:{port}",  # hex
        f"0177.0.0.1:{port}",  # octal
        f"0x7f.1:{port}",
        f"127.1:{port}",
        f"0.0.0.0:{port}",  # Linux connects this to loopback
        f"[::ffff:127.0.0.1]:{port}",  # IPv4-mapped
        f"[::ffff:7f00:1]:{port}",
        f"[64:ff9b::7f00:1]:{port}",  # NAT64 of 127.0.0.1
        f"[2002:7f00:1::]:{port}",  # 6to4 of 127.0.0.1
        f"localhost:{port}",
        f"LOCALHOST.:{port}",
        f"hearth.localhost:{port}",
        f"{loopback_name()}:{port}",  # a name: refused once resolved, before any connection
        f"[::1]:{port6}",
        f"[::]:{port6}",
        "10.0.0.1",
        "172.16.5.4",
        "192.168.1.1",
        "169.254.169.254",  # cloud metadata
        "100.64.0.1",  # shared address space (CGNAT)
        "[fe80::1]",
        "[fc00::1]",
        "[fec0::1]",  # site-local
        "224.0.0.1",
    ]


def make_certificate(directory: Path) -> tuple[Path, Path]:
    """A fresh self-signed certificate (and its key) for 127.0.0.1 and 127.0.0.2."""
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
            "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
            "-addext", "subjectAltName=IP:127.0.0.1,IP:127.0.0.2",
            "-keyout", str(key), "-out", str(cert),
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return cert, key


def server_context(cert: Path, key: Path) -> ssl.SSLContext:
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(cert, key)
    return server
