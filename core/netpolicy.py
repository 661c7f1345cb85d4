"""The address policy: where the node may open a connection because a stranger named a URL.

A requester names URLs the node then connects to: an ``https://`` input, a ``callback_url``. Left
alone, that makes the node a proxy into its own network (``127.0.0.1``, the LAN, a cloud's metadata
service at ``169.254.169.254``) and, through its error messages, a port scanner of it. The policy
refuses every address that is not a public unicast one, unless the operator allows it:

- loopback, private (RFC 1918, ULA), link-local, shared (CGNAT ``100.64.0.0/10``), multicast,
  unspecified, reserved and documentation ranges, IPv6 site-local, the deprecated IPv4-compatible
  ``::a.b.c.d``; IPv4-mapped, NAT64 (``64:ff9b::/96``) and 6to4 (``2002::/16``) addresses are judged by
  the IPv4 address inside them;
- ``localhost`` and ``*.localhost`` names (RFC 6761), which never leave the machine.

It is enforced before any connection is made, in two places that together see every address:

- :meth:`AddressPolicy.check_url` judges a URL's host as written. An IP literal in any spelling the
  system accepts (``2130706433``, ``0x7f.1``, ``0177.0.0.1``, ``[::ffff:127.0.0.1]``) is read as the
  address it means. aiohttp does not pass literals to its resolver, so this check is their gate: call
  it before every request, and before following every redirect.
- :class:`PolicyResolver`, the resolver of :meth:`AddressPolicy.connector`, judges every address a name
  resolves to. The connector connects only to the addresses the resolver returned, which were the
  ones checked: there is no second lookup, so no window for DNS rebinding between check and connect.

The operator's way out is data, not code: ``allow_private`` (everything goes) or ``allow_networks``
(``["10.20.0.0/16"]``: those networks go), read from ``node.toml``. Tests use the same seam.

A refusal is :class:`AddressNotAllowed`, which each caller turns into its own error; it is not an
``OSError`` on purpose (aiohttp would report an ``OSError`` raised while resolving as a connection
failure, and a refusal must stay a refusal).
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from yarl import URL

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
# A name lookup: host and port -> the addresses it resolves to, as text. The system's by default.
Lookup = Callable[[str, int], Awaitable[list[str]]]

# What inet_aton() and so getaddrinfo() read as an IPv4 address: one to four parts, each decimal,
# octal (leading 0) or hex (0x). Only strings of this shape are handed to inet_aton.
_INET_ATON_FORM = re.compile(r"(0[xX][0-9a-fA-F]*|[0-9]+)(\.(0[xX][0-9a-fA-F]*|[0-9]+)){0,3}")
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
# Ranges Python's tables (3.11) do not count as non-global, or not in every patch release.
_EXTRA_NON_PUBLIC: tuple[IPNetwork, ...] = (
    ipaddress.IPv4Network("192.0.0.0/24"),  # IETF protocol assignments (its two anycast services included)
    ipaddress.IPv6Network("3fff::/20"),  # documentation (RFC 9637)
)
_LOOPBACKS = (ipaddress.IPv4Address("127.0.0.1"), ipaddress.IPv6Address("::1"))


class AddressNotAllowed(Exception):
    """Raised before connecting: a URL's host, or an address its name resolves to, is not allowed.

    ``address`` is the address judged (``None`` for a ``localhost`` name or a URL without a host),
    ``reason`` a short word for it (``loopback``, ``private``, ``link-local``, ...) and ``resolved``
    whether the address came from resolving the name ``host`` (else ``host`` was refused as written).
    """

    def __init__(self, host: str, address: str | None, reason: str, *, resolved: bool = False) -> None:
        where = f"{host} resolves to {address}, which" if resolved else host
        super().__init__(f"{where} is a {reason} address; the node does not connect there")
        self.host = host
        self.address = address
        self.reason = reason
        self.resolved = resolved


def parse_networks(values: Iterable[str]) -> tuple[IPNetwork, ...]:
    """``["10.0.0.0/8", "::1/128"]`` as networks; a bare address is its own /32 or /128.

    Raises ``ValueError`` naming the entry for anything else, including host bits set past the prefix
    (``10.0.0.5/8`` is more likely a mistake than a wish for all of ``10.0.0.0/8``).
    """
    networks: list[IPNetwork] = []
    for value in values:
        try:
            networks.append(ipaddress.ip_network(value, strict=True))
        except ValueError as exc:
            raise ValueError(f"{value[:80]!r} is not an IP network ({exc})") from None
    return tuple(networks)


def literal_address(host: str) -> IPAddress | None:
    """``host`` as the IP address the system would read it as, or ``None`` when it is a name.

    Brackets and an IPv6 zone (``%eth0``) are dropped; the legacy IPv4 spellings ``inet_aton`` takes
    (decimal, octal, hex, fewer than four parts) are read as it reads them.
    """
    text = host.strip("[]").split("%", 1)[0]
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        pass
    candidate = text[:-1] if text.endswith(".") else text
    if _INET_ATON_FORM.fullmatch(candidate):
        try:
            return ipaddress.IPv4Address(socket.inet_aton(candidate))
        except OSError:
            return None
    return None


def _embedded_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 one carries and would reach (mapped, NAT64, 6to4), if any."""
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address in _NAT64:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return address.sixtofour


def non_public_reason(address: IPAddress) -> str | None:
    """Why ``address`` is not a public unicast address (``loopback``, ``private``, ...), or ``None``."""
    if isinstance(address, ipaddress.IPv6Address):
        inner = _embedded_ipv4(address)
        if inner is not None:
            return non_public_reason(inner)
        if address.is_site_local:
            return "site-local"
    for reason, flag in (
        ("unspecified", address.is_unspecified),
        ("loopback", address.is_loopback),
        ("link-local", address.is_link_local),
        ("multicast", address.is_multicast),
        ("reserved", address.is_reserved),  # for IPv6 this covers ::/8, the IPv4-compatible ::a.b.c.d too
        ("private", address.is_private),
    ):
        if flag:
            return reason
    if not address.is_global or any(address in net for net in _EXTRA_NON_PUBLIC):
        return "non-public"  # e.g. 100.64.0.0/10, shared address space: neither private nor global
    return None


def is_localhost_name(host: str) -> bool:
    """``localhost`` or a name under it (RFC 6761 keeps them on the machine), trailing dot or not."""
    name = host.rstrip(".").lower()
    return name == "localhost" or name.endswith(".localhost")


@dataclass(frozen=True, slots=True)
class AddressPolicy:
    """Which addresses the node may connect to on a requester's say-so (see the module docstring).

    ``trusted_hosts`` are hosts the operator named in config (IPFS gateways): they pass as written and
    as resolved, whatever their addresses. A requester never chooses them.
    """

    allow_private: bool = False
    allow_networks: tuple[IPNetwork, ...] = ()
    trusted_hosts: frozenset[str] = frozenset()

    @classmethod
    def from_settings(
        cls, *, allow_private: bool, allow_networks: Iterable[str] = (), trusted_hosts: Iterable[str] = ()
    ) -> AddressPolicy:
        """The policy from a config section's keys (the network list as text, validated here)."""
        return cls(
            allow_private,
            parse_networks(allow_networks),
            frozenset(h.rstrip(".").lower() for h in trusted_hosts),
        )

    def _allowed_network(self, address: IPAddress) -> bool:
        candidates: list[IPAddress] = [address]
        if isinstance(address, ipaddress.IPv6Address):
            inner = _embedded_ipv4(address)
            if inner is not None:
                candidates.append(inner)
        return any(a in net for a in candidates for net in self.allow_networks if a.version == net.version)

    def refusal(self, address: IPAddress) -> str | None:
        """Why the node may not connect to ``address`` under this policy, or ``None`` when it may."""
        if self.allow_private or self._allowed_network(address):
            return None
        return non_public_reason(address)

    def _trusted(self, host: str) -> bool:
        return host.rstrip(".").lower() in self.trusted_hosts

    def check_host(self, host: str) -> None:
        """Refuse ``host`` as written: a non-public IP literal, or a localhost name the policy does not
        allow. A name passes here; its addresses are judged when it resolves (:class:`PolicyResolver`).
        """
        if self.allow_private or self._trusted(host):
            return
        address = literal_address(host)
        if address is not None:
            reason = self.refusal(address)
            if reason is not None:
                raise AddressNotAllowed(host, str(address), reason)
        elif is_localhost_name(host) and not any(self._allowed_network(a) for a in _LOOPBACKS):
            raise AddressNotAllowed(host, None, "loopback")

    def check_url(self, url: str | URL) -> None:
        """:meth:`check_host` on ``url``'s host as aiohttp will read it (yarl parses both, the same way,
        so no parser difference can show this check one host and the connection another); a URL without
        a host is refused too.
        """
        try:
            host = (url if isinstance(url, URL) else URL(url)).raw_host
        except (TypeError, ValueError):
            host = None
        if not host:
            raise AddressNotAllowed(str(url)[:80], None, "missing")
        self.check_host(host)

    def check_address(self, host: str, address: str) -> None:
        """Refuse ``address``, which ``host`` resolved to, unless the policy allows it."""
        if self.allow_private or self._trusted(host):
            return
        parsed = literal_address(address)
        if parsed is None:  # a resolver answered something that is not an address: never connect to it
            raise AddressNotAllowed(host, address, "unreadable", resolved=True)
        reason = self.refusal(parsed)
        if reason is not None:
            raise AddressNotAllowed(host, address, reason, resolved=True)

    def connector(self, *, lookup: Lookup | None = None, **kwargs: Any) -> aiohttp.TCPConnector:
        """An aiohttp connector that connects only to addresses this policy allows (names; literals are
        :meth:`check_url`'s). ``lookup`` replaces the system resolver (a test seam); ``kwargs`` go to
        :class:`aiohttp.TCPConnector`.
        """
        return aiohttp.TCPConnector(resolver=PolicyResolver(self, lookup=lookup), **kwargs)


class PolicyResolver(AbstractResolver):
    """aiohttp's resolver, judging every address a name resolves to before aiohttp may connect to it.

    If any address is refused the whole name is: a name that answers one public and one private
    address is someone's attempt to get the private one tried.
    """

    def __init__(self, policy: AddressPolicy, *, lookup: Lookup | None = None) -> None:
        self._policy = policy
        self._lookup = lookup
        self._system: aiohttp.ThreadedResolver | None = None

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        if self._lookup is not None:
            results = [_result(host, address, port) for address in await self._lookup(host, port)]
        else:
            if self._system is None:
                self._system = aiohttp.ThreadedResolver(asyncio.get_running_loop())
            results = await self._system.resolve(host, port, family)
        for result in results:
            self._policy.check_address(host, result["host"])
        return results

    async def close(self) -> None:
        if self._system is not None:
            await self._system.close()


def _result(host: str, address: str, port: int) -> ResolveResult:
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    flags = socket.AI_NUMERICHOST | socket.AI_NUMERICSERV
    return ResolveResult(hostname=host, host=address, port=port, family=family, proto=0, flags=flags)
