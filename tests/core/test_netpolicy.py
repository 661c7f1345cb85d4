"""The address policy on its own: every spelling of an address, names, the operator's allowances, and the
resolver that judges what a name resolves to before aiohttp may connect (loopback only).
"""

from __future__ import annotations

import ipaddress

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from core.netpolicy import (
    AddressNotAllowed,
    AddressPolicy,
    PolicyResolver,
    literal_address,
    non_public_reason,
    parse_networks,
)

NON_PUBLIC = {
    "127.0.0.1": "loopback",
    "127.255.0.9": "loopback",
    "0.0.0.0": "unspecified",
    "0.1.2.3": "private",  # "this network"
    "10.0.0.1": "private",
    "172.16.0.1": "private",
    "172.31.255.254": "private",
    "192.168.0.1": "private",
    "169.254.169.254": "link-local",
    "100.64.0.1": "non-public",  # shared address space (CGNAT)
    "100.127.255.254": "non-public",
    "192.0.0.8": "non-public",  # IETF protocol assignments
    "192.0.2.1": "private",  # documentation
    "198.18.0.1": "private",  # benchmarking
    "240.0.0.1": "reserved",
    "255.255.255.255": "reserved",
    "224.0.0.1": "multicast",
    "239.255.255.250": "multicast",
    "::": "unspecified",
    "::1": "loopback",
    "::127.0.0.1": "reserved",  # IPv4-compatible, deprecated
    "::8.8.8.8": "reserved",
    "::ffff:127.0.0.1": "loopback",  # IPv4-mapped: judged by the IPv4 inside
    "::ffff:10.1.1.1": "private",
    "::ffff:169.254.169.254": "link-local",
    "64:ff9b::7f00:1": "loopback",  # NAT64
    "64:ff9b::a9fe:a9fe": "link-local",
    "64:ff9b:1::1": "reserved",  # NAT64 local use
    "2002:7f00:1::": "loopback",  # 6to4
    "2002:a00:1::1": "private",
    "2001::1": "private",  # Teredo
    "2001:db8::1": "private",  # documentation
    "3fff::1": "non-public",  # documentation (RFC 9637)
    "fc00::1": "private",
    "fd12:3456::1": "private",
    "fe80::1": "link-local",
    "fec0::1": "site-local",
    "ff02::1": "multicast",
    "ff0e::1": "multicast",
    "100::1": "reserved",  # discard-only
}
PUBLIC = ["8.8.8.8", "1.1.1.1", "93.184.216.34", "2606:4700:4700::1111", "::ffff:8.8.8.8", "64:ff9b::808:808"]


@pytest.mark.parametrize(("text", "reason"), sorted(NON_PUBLIC.items()))
def test_non_public_addresses_and_why(text: str, reason: str) -> None:
    assert non_public_reason(ipaddress.ip_address(text)) == reason


@pytest.mark.parametrize("text", PUBLIC)
def test_public_addresses_pass(text: str) -> None:
    assert non_public_reason(ipaddress.ip_address(text)) is None
    AddressPolicy().check_host(text)


@pytest.mark.parametrize(
    ("host", "address"),
    [
        ("127.0.0.1", "127.0.0.1"),
        ("2130706433", "127.0.0.1"),
        ("0x7f000001", "127.0.0.1"),
        ("0X7F000001", "127.0.0.1"),
        ("0177.0.0.1", "127.0.0.1"),
        ("0x7f.1", "127.0.0.1"),
        ("127.1", "127.0.0.1"),
        ("10.1", "10.0.0.1"),
        ("127.0.0.1.", "127.0.0.1"),
        ("0", "0.0.0.0"),
        ("[::1]", "::1"),
        ("[::ffff:127.0.0.1]", "::ffff:7f00:1"),
        ("fe80::1%eth0", "fe80::1"),
        ("[fe80::1%25eth0]", "fe80::1"),
    ],
)
def test_literals_are_read_as_the_system_reads_them(host: str, address: str) -> None:
    assert literal_address(host) == ipaddress.ip_address(address)
    with pytest.raises(AddressNotAllowed) as info:
        AddressPolicy().check_host(host)
    assert info.value.address == address and not info.value.resolved


@pytest.mark.parametrize("host", ["example.com", "0x", "1.2.3.4.5", "0xg", "127.0.0.1.nip.io", "deadbeef"])
def test_names_are_not_literals(host: str) -> None:
    assert literal_address(host) is None


@pytest.mark.parametrize("host", ["localhost", "LOCALHOST", "localhost.", "a.b.localhost", "x.LocalHost."])
def test_localhost_names_are_refused_as_written(host: str) -> None:
    with pytest.raises(AddressNotAllowed) as info:
        AddressPolicy().check_host(host)
    assert info.value.reason == "loopback"


@pytest.mark.parametrize(
    "url",
    [
        "https://127.0.0.1/x",
        "https://user:pw@127.0.0.1:8443/x",
        "https://2130706433/x",
        "https://[::ffff:127.0.0.1]:9/x",
        "https://localhost./x",
        "https://169.254.169.254/latest/meta-data/",
        "http://[fd00::1]/",
        "https:///nohost",
        "not a url",
    ],
)
def test_urls_are_judged_by_the_host_aiohttp_would_connect_to(url: str) -> None:
    with pytest.raises(AddressNotAllowed):
        AddressPolicy().check_url(url)


def test_the_operator_allows_networks_or_everything() -> None:
    policy = AddressPolicy.from_settings(allow_private=False, allow_networks=["127.0.0.2/32", "fd00::/8"])
    for allowed in ("127.0.0.2", "::ffff:127.0.0.2", "fd00::5", "8.8.8.8"):
        assert policy.refusal(ipaddress.ip_address(allowed)) is None, allowed
        policy.check_address("name.example", allowed)
    for refused in ("127.0.0.1", "127.0.0.3", "fe80::1", "::1"):
        assert policy.refusal(ipaddress.ip_address(refused)) is not None, refused
    with pytest.raises(AddressNotAllowed):
        policy.check_host("localhost")  # the allowance does not cover 127.0.0.1 or ::1
    AddressPolicy.from_settings(allow_private=False, allow_networks=["127.0.0.0/8"]).check_host("localhost")
    everything = AddressPolicy.from_settings(allow_private=True)
    for host in ("127.0.0.1", "localhost", "[::1]", "169.254.169.254"):
        everything.check_host(host)


def test_trusted_hosts_pass_as_written_and_as_resolved() -> None:
    policy = AddressPolicy.from_settings(allow_private=False, trusted_hosts=["127.0.0.1", "Kubo.Local."])
    policy.check_host("127.0.0.1")
    policy.check_address("kubo.local", "10.0.0.5")
    with pytest.raises(AddressNotAllowed):
        policy.check_host("127.0.0.2")


@pytest.mark.parametrize("value", ["10.0.0.5/8", "example.com", "10.0.0.0/33", ""])
def test_network_lists_are_validated(value: str) -> None:
    with pytest.raises(ValueError, match="is not an IP network"):
        parse_networks([value])


def test_a_bare_address_is_its_own_network() -> None:
    assert parse_networks(["127.0.0.2", "::1"]) == (
        ipaddress.ip_network("127.0.0.2/32"),
        ipaddress.ip_network("::1/128"),
    )


async def test_the_resolver_refuses_a_name_with_any_refused_address() -> None:
    answers = {"mixed.example": ["93.184.216.34", "10.1.2.3"], "public.example": ["93.184.216.34"]}

    async def lookup(host: str, port: int) -> list[str]:
        return answers[host]

    resolver = PolicyResolver(AddressPolicy(), lookup=lookup)
    with pytest.raises(AddressNotAllowed) as info:
        await resolver.resolve("mixed.example", 443)
    assert (info.value.address, info.value.resolved) == ("10.1.2.3", True)
    [result] = await resolver.resolve("public.example", 443)
    assert (result["host"], result["port"]) == ("93.184.216.34", 443)
    await resolver.close()


async def test_the_connector_never_connects_to_a_refused_resolved_address() -> None:
    """A name that resolves to loopback (the rebinding case): the server there sees no request."""
    seen: list[str] = []

    async def hello(request: web.Request) -> web.Response:
        seen.append(request.path)
        return web.Response(text="hi")

    app = web.Application()
    app.router.add_get("/", hello)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()

    async def lookup(host: str, port: int) -> list[str]:
        return ["127.0.0.1"]

    try:
        url = f"http://rebound.example:{server.port}/"
        async with aiohttp.ClientSession(connector=AddressPolicy().connector(lookup=lookup)) as session:
            with pytest.raises(AddressNotAllowed):
                await session.get(url)
        allowed = AddressPolicy.from_settings(allow_private=False, allow_networks=["127.0.0.1/32"])
        async with (
            aiohttp.ClientSession(connector=allowed.connector(lookup=lookup)) as session,
            session.get(url) as response,
        ):
            assert await response.text() == "hi"
    finally:
        await server.close()
    assert seen == ["/"]  # only the allowed session's request arrived
