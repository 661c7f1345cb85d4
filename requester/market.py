"""Finding providers: the on-chain registry read, each provider's signed offer fetched and checked both ways.

:func:`discover` reads ``HearthRegistry`` (at most ``max_providers`` listings, all at one block; the result
says how many were left unread), fetches every listed endpoint's offer (``GET {endpoint}/v1/capacity``)
concurrently, and keeps a provider only when the registry and the offer agree (docs/protocol.md,
"Market"):

- the offer is signed by the DID the wallet registered (its token's issuer; the document served is exactly
  the one the token carries under ``offer``), and names it as ``node``;
- the offer's ``payout_address`` is the wallet that registered (a squatter's wallet listing someone else's
  DID and endpoint is not the one the node is paid to, so it is dropped);
- the offer's ``endpoint`` is the registered one (a trailing slash aside);
- the offer's payment terms are on the requester's chain and escrow, when the caller names them.

Everything a provider sends, and every endpoint the chain names, is a stranger's: an endpoint must be an
``http(s)://`` URL whose host is a public address, as written and as resolved (:mod:`core.netpolicy`, the
policy webhooks use; ``allow_private`` lets devnets and tests on ``127.0.0.1`` through); each fetch is bounded
in time (``timeout``, connecting and reading together), in size (:data:`MAX_OFFER_BYTES`) and in shape
(:func:`core.untrusted.parse_json`); redirects are not followed. An endpoint listed by several wallets is
fetched once. A provider that fails any of this is :class:`Dropped` with a reason code (:data:`REASONS`) and a
message; one bad provider never fails the discovery. Registry failures do (``ChainError``, ``ConfigError``).

:func:`fits` tells whether an offer can take an envelope (kind, model, the offer's limits, free capacity).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

import aiohttp
from eth_utils.address import is_address, to_checksum_address
from yarl import URL

from core.envelope import FfmpegTranscodeEnvelope, VllmBatchEnvelope, parse_envelope
from core.errors import AuthError
from core.netpolicy import AddressNotAllowed, AddressPolicy
from core.untrusted import UntrustedJSONError, parse_json
from payments.chain import rpc_errors
from payments.did import canonical_did
from payments.jwt import decode_unverified, verify_node_token
from payments.registry_chain import MAX_PAGE, Listing, RegistryChain
from provider.offers import OFFER_CLAIM
from requester.reputation import Reputation

OFFER_PATH: Final = "/v1/capacity"
MAX_OFFER_BYTES: Final = 256 * 1024
"""An offer is a few KiB (a node with many models and GPUs some tens); a larger answer is refused unread."""
MAX_OFFER_DEPTH: Final = 12
"""An offer nests four levels deep (``machine.gpus[i].name``); room to grow, none for a depth bomb."""
DEFAULT_MAX_PROVIDERS: Final = 256
DEFAULT_TIMEOUT_SECONDS: Final = 5.0
DEFAULT_CONCURRENCY: Final = 32

REASONS: Final = {
    "endpoint_invalid": "the registered endpoint is not an http(s) URL with a host (and no user, query or "
    "fragment)",
    "endpoint_refused": "the registered endpoint is a private, loopback or link-local address",
    "unreachable": "no answer from the endpoint in time (refused, reset, DNS, timeout)",
    "offer_unavailable": "the endpoint answered something other than 200 (a redirect included)",
    "offer_invalid": "the answer is not an offer: too large, not bounded JSON, not an object, or malformed",
    "signature_invalid": "the offer is unsigned, its signature does not verify, or it differs from what "
    "its token signed",
    "offer_expired": "the offer's token has expired",
    "did_mismatch": "the offer is not signed by, or does not name, the DID the wallet registered",
    "wallet_mismatch": "the offer's payout_address is not the wallet that registered",
    "endpoint_mismatch": "the offer's endpoint is not the one registered",
    "wrong_chain": "the offer's payment terms are on another chain or escrow than the requester's",
    "no_kind": "the provider does not offer the job's kind",
    "no_model": "the provider does not offer the job's model",
    "over_limits": "the job's limits exceed what the provider accepts",
    "no_capacity": "the provider has too little free capacity for the job",
}
"""Every reason a provider is dropped for, with what it means."""

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class Provider:
    """A registered provider whose binding holds: its wallet (checksummed, from the registry), DID, endpoint,
    verified signed offer (``jwt`` included), and its reputation when the caller gave one."""

    wallet: str
    did: str
    endpoint: str
    offer: dict[str, Any]
    reputation: Reputation | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "wallet": self.wallet,
            "did": self.did,
            "endpoint": self.endpoint,
            "offer": self.offer,
            "reputation": None if self.reputation is None else self.reputation.to_json(),
        }


@dataclass(frozen=True)
class Dropped:
    """A registered provider left out: what the registry said, and why (a code of :data:`REASONS`)."""

    wallet: str
    did: str
    endpoint: str
    reason: str
    message: str

    def to_json(self) -> dict[str, Any]:
        return {
            "wallet": self.wallet,
            "did": self.did,
            "endpoint": self.endpoint,
            "reason": self.reason,
            "message": self.message,
        }


@dataclass
class Discovery:
    """One read of the market at ``block``: providers kept and dropped, in registry order.

    ``registered`` is the registry's count at that block; ``unread`` how many listings past
    ``max_providers`` were not read at all (neither kept nor dropped).
    """

    block: int
    providers: list[Provider]
    dropped: list[Dropped]
    registry: str = ""
    registered: int = 0
    unread: int = 0
    fetched: int = 0  # distinct endpoints asked for an offer
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "block": self.block,
            "registry": self.registry,
            "registered": self.registered,
            "unread": self.unread,
            "fetched": self.fetched,
            "seconds": round(self.seconds, 3),
            "providers": [p.to_json() for p in self.providers],
            "dropped": [d.to_json() for d in self.dropped],
        }


class OfferRefused(Exception):
    """A provider's endpoint or offer fails a check: ``reason`` (a code of :data:`REASONS`) and ``message``.
    :func:`discover` turns it into a :class:`Dropped`."""

    def __init__(self, reason: str, message: str) -> None:
        assert reason in REASONS, reason
        super().__init__(message)
        self.reason = reason
        self.message = message


# -- discovery ---------------------------------------------------------------------------------------------


async def discover(
    registry: RegistryChain,
    *,
    kind: str | None = None,
    model: str | None = None,
    chain_id: int | None,
    escrow: str | None,
    max_providers: int = DEFAULT_MAX_PROVIDERS,
    timeout: float = DEFAULT_TIMEOUT_SECONDS,  # noqa: ASYNC109 (per fetch, not for the whole call)
    concurrency: int = DEFAULT_CONCURRENCY,
    allow_private: bool = False,
    on_progress: Progress | None = None,
    session: aiohttp.ClientSession | None = None,
    reputation: Mapping[str, Reputation] | None = None,
) -> Discovery:
    """The providers ``registry`` lists (up to ``max_providers``) whose offers bind to their listing.

    ``kind``/``model`` drop providers that do not offer them (``no_kind``, ``no_model``); ``chain_id`` and
    ``escrow`` (None: not checked) those whose payment terms differ (``wrong_chain``). ``timeout`` bounds
    each fetch, ``concurrency`` how many run at once; ``on_progress(done, total)`` is called as offers come
    in (first with ``done = 0``). ``session``, when given, is used as is: build it on
    :meth:`core.netpolicy.AddressPolicy.connector` for names to be judged by the addresses they resolve to
    (literal addresses are judged here either way); without one, discover makes such a session and closes
    it. ``reputation`` (by checksummed wallet, e.g. :meth:`ReputationCache.all`) is attached to each
    provider kept; a wallet it does not name gets an empty record.
    """
    if max_providers < 1 or concurrency < 1 or timeout <= 0:
        raise ValueError("max_providers and concurrency must be >= 1 and timeout > 0")
    started = asyncio.get_running_loop().time()
    block, registered, listings = await read_listings(registry, max_providers)
    policy = AddressPolicy(allow_private=allow_private)
    urls: dict[str, str | OfferRefused] = {}  # registered endpoint -> offer URL, or why it is not fetched
    for listing in listings:
        if listing.endpoint not in urls:
            urls[listing.endpoint] = _offer_url(listing.endpoint, policy)
    to_fetch = sorted({url for url in urls.values() if isinstance(url, str)})
    answers = await _fetch_all(to_fetch, policy, timeout, concurrency, on_progress, session)
    providers: list[Provider] = []
    dropped: list[Dropped] = []
    for listing in listings:
        url = urls[listing.endpoint]
        verdict = _judge(
            url if isinstance(url, OfferRefused) else answers[url], listing, chain_id, escrow, kind, model
        )
        if isinstance(verdict, OfferRefused):
            dropped.append(
                Dropped(listing.wallet, listing.did, listing.endpoint, verdict.reason, verdict.message)
            )
            continue
        rep = None if reputation is None else reputation.get(listing.wallet, Reputation(listing.wallet))
        providers.append(Provider(listing.wallet, listing.did, listing.endpoint, verdict, rep))
    return Discovery(
        block=block,
        providers=providers,
        dropped=dropped,
        registry=registry.address,
        registered=registered,
        unread=max(0, registered - len(listings)),
        fetched=len(to_fetch),
        seconds=asyncio.get_running_loop().time() - started,
    )


def _judge(
    answer: dict[str, Any] | OfferRefused,
    listing: Listing,
    chain_id: int | None,
    escrow: str | None,
    kind: str | None,
    model: str | None,
) -> dict[str, Any] | OfferRefused:
    """The offer that ``answer`` (a fetched offer, or why there is none) makes for ``listing``, or why not."""
    if isinstance(answer, OfferRefused):
        return answer
    try:
        offer = check_offer(answer, listing, chain_id=chain_id, escrow=escrow)
        _check_offered(offer, kind, model)
    except OfferRefused as exc:
        return exc
    return offer


async def read_listings(registry: RegistryChain, limit: int) -> tuple[int, int, list[Listing]]:
    """``(block, registered, listings)``: the first ``limit`` listings, every page read at one block."""
    async with rpc_errors("eth_blockNumber", registry.rpc_url):
        block = int(await registry.w3.eth.block_number)
    registered = await registry.count(block)
    found: list[Listing] = []
    want = min(registered, limit)
    while len(found) < want:
        page = await registry.page(len(found), min(MAX_PAGE, want - len(found)), block)
        if not page:
            break
        found.extend(page)
    return block, registered, found[:want]


def _offer_url(endpoint: str, policy: AddressPolicy) -> str | OfferRefused:
    """The offer's URL under ``endpoint``, or why it is not fetched (``endpoint_invalid``/``_refused``)."""
    try:
        url = URL(endpoint)
    except (TypeError, ValueError):
        return OfferRefused("endpoint_invalid", f"{endpoint[:120]!r} is not a URL")
    if (
        url.scheme not in ("http", "https")
        or not url.raw_host
        or url.user is not None
        or url.password is not None
        or url.query_string
        or url.fragment
    ):
        return OfferRefused(
            "endpoint_invalid",
            f"{endpoint[:120]!r} is not an http(s) URL with a host and without user, query or fragment",
        )
    try:
        policy.check_url(url)
    except AddressNotAllowed as exc:
        return OfferRefused("endpoint_refused", str(exc))
    return endpoint.removesuffix("/") + OFFER_PATH


async def _fetch_all(
    urls: list[str],
    policy: AddressPolicy,
    fetch_seconds: float,
    concurrency: int,
    on_progress: Progress | None,
    session: aiohttp.ClientSession | None,
) -> dict[str, dict[str, Any] | OfferRefused]:
    """Each URL's answer as a JSON object, or why there is none; ``concurrency`` at a time."""
    answers: dict[str, dict[str, Any] | OfferRefused] = {}
    if on_progress is not None:
        on_progress(0, len(urls))
    if not urls:
        return answers
    gate = asyncio.Semaphore(concurrency)

    async def one(client: aiohttp.ClientSession, url: str) -> None:
        async with gate:
            answers[url] = await fetch_offer(client, url, fetch_seconds)
        if on_progress is not None:
            on_progress(len(answers), len(urls))

    owned = session is None
    client = session or aiohttp.ClientSession(
        connector=policy.connector(limit=concurrency),
        timeout=aiohttp.ClientTimeout(total=fetch_seconds),
        headers={"Accept": "application/json"},
    )
    try:
        await asyncio.gather(*(one(client, url) for url in urls))
    finally:
        if owned:
            await client.close()
    return answers


async def fetch_offer(
    session: aiohttp.ClientSession, url: str, seconds: float
) -> dict[str, Any] | OfferRefused:
    """GET ``url`` within ``seconds`` (connect and read together) and parse the answer as an
    untrusted JSON object of at most :data:`MAX_OFFER_BYTES`; never raises for what the endpoint does."""
    try:
        async with asyncio.timeout(seconds):
            async with session.get(url, allow_redirects=False) as resp:
                if resp.status != 200:
                    return OfferRefused("offer_unavailable", f"{url} answered HTTP {resp.status}")
                if resp.content_length is not None and resp.content_length > MAX_OFFER_BYTES:
                    return _too_large(url)
                body = bytearray()
                async for chunk in resp.content.iter_chunked(64 * 1024):
                    body += chunk
                    if len(body) > MAX_OFFER_BYTES:
                        return _too_large(url)
    except AddressNotAllowed as exc:  # a name resolving to a refused address (the policy's resolver)
        return OfferRefused("endpoint_refused", str(exc))
    except TimeoutError:
        return OfferRefused("unreachable", f"{url} did not answer within {seconds:g} s")
    except (aiohttp.ClientError, OSError, ValueError) as exc:
        return OfferRefused("unreachable", f"{url}: {type(exc).__name__}: {str(exc)[:200]}")
    try:
        doc = parse_json(bytes(body), max_depth=MAX_OFFER_DEPTH)
    except UntrustedJSONError as exc:
        return OfferRefused("offer_invalid", f"{url}: {exc.message}")
    if not isinstance(doc, dict):
        return OfferRefused("offer_invalid", f"{url} answered JSON that is not an object")
    return doc


def _too_large(url: str) -> OfferRefused:
    return OfferRefused("offer_invalid", f"{url} answered more than {MAX_OFFER_BYTES} bytes")


# -- the binding -------------------------------------------------------------------------------------------


def check_offer(
    doc: Mapping[str, Any], listing: Listing, *, chain_id: int | None, escrow: str | None
) -> dict[str, Any]:
    """``doc`` (a fetched offer) when it binds to ``listing`` (see the module docstring); raises
    :class:`OfferRefused` with the first check that fails."""
    token = doc.get("jwt")
    if not isinstance(token, str):
        raise OfferRefused("signature_invalid", "the offer carries no jwt")
    try:
        issuer = decode_unverified(token)[1].get("iss")
    except AuthError as exc:
        raise OfferRefused("signature_invalid", f"the offer's token is malformed: {exc.message}") from None
    if not isinstance(issuer, str) or _canonical(issuer) != _canonical(listing.did):
        raise OfferRefused(
            "did_mismatch", f"the offer is signed by {str(issuer)[:120]}, not {listing.did[:120]}"
        )
    try:
        payload = verify_node_token(token, issuer)
    except AuthError as exc:
        if exc.code == "expired":
            raise OfferRefused("offer_expired", f"the offer's token expired: {exc.message}") from None
        raise OfferRefused(
            "signature_invalid", f"the offer's token does not verify: {exc.code}: {exc.message}"
        ) from None
    document = {key: value for key, value in doc.items() if key != "jwt"}
    if payload.get(OFFER_CLAIM) != document or payload.get("sub") != issuer:
        raise OfferRefused("signature_invalid", "the offer differs from what its token signed")
    if document.get("node") != issuer:
        raise OfferRefused(
            "did_mismatch", f"the offer names node {str(document.get('node'))[:120]}, not {issuer}"
        )
    payout = document.get("payout_address")
    if not (isinstance(payout, str) and is_address(payout) and to_checksum_address(payout) == listing.wallet):
        raise OfferRefused(
            "wallet_mismatch",
            f"the offer pays {str(payout)[:60]}, not the wallet that registered it ({listing.wallet})",
        )
    endpoint = document.get("endpoint")
    if not (isinstance(endpoint, str) and endpoint.removesuffix("/") == listing.endpoint.removesuffix("/")):
        raise OfferRefused(
            "endpoint_mismatch",
            f"the offer names endpoint {str(endpoint)[:120]}, not the registered {listing.endpoint[:120]}",
        )
    _check_chain(document.get("payment"), chain_id, escrow)
    return dict(doc)


def _canonical(did: str) -> str:
    """``did`` in its one spelling (:func:`payments.did.canonical_did`); as written when it is no DID."""
    try:
        return canonical_did(did)
    except AuthError:
        return did


def _check_chain(payment: Any, chain_id: int | None, escrow: str | None) -> None:
    if chain_id is None and escrow is None:
        return
    if not isinstance(payment, dict):
        raise OfferRefused("wrong_chain", "the offer takes no payments (no payment terms)")
    offered_chain, offered_escrow = payment.get("chain_id"), payment.get("escrow")
    if chain_id is not None and (type(offered_chain) is not int or offered_chain != chain_id):
        raise OfferRefused(
            "wrong_chain", f"the offer is paid on chain {str(offered_chain)[:40]}, not {chain_id}"
        )
    if escrow is not None and not (
        isinstance(offered_escrow, str) and offered_escrow.lower() == escrow.lower()
    ):
        raise OfferRefused(
            "wrong_chain", f"the offer is paid through escrow {str(offered_escrow)[:60]}, not {escrow}"
        )


def _offered_kinds(offer: Mapping[str, Any]) -> list[str]:
    kinds = offer.get("kinds")
    if not isinstance(kinds, list):
        raise OfferRefused("offer_invalid", "the offer's kinds are not a list")
    return [k for k in kinds if isinstance(k, str)]


def offered_models(offer: Mapping[str, Any]) -> list[str]:
    """The names of the models ``offer`` lists (malformed entries skipped)."""
    models = offer.get("models")
    if not isinstance(models, list):
        return []
    return [m["name"] for m in models if isinstance(m, dict) and isinstance(m.get("name"), str)]


def _check_offered(offer: Mapping[str, Any], kind: str | None, model: str | None) -> None:
    if kind is not None and kind not in _offered_kinds(offer):
        raise OfferRefused("no_kind", f"the provider does not offer {kind[:60]}")
    if model is not None and model not in offered_models(offer):
        raise OfferRefused("no_model", f"the provider does not offer model {model[:128]}")


# -- fitting an envelope -----------------------------------------------------------------------------------

AnyEnvelope = FfmpegTranscodeEnvelope | VllmBatchEnvelope

_LIMITS: Final = (  # (envelope limit, offer limit)
    ("timeout_seconds", "max_timeout_seconds"),
    ("max_output_mb", "max_output_mb"),
    ("cpus", "max_cpus"),
    ("memory_mb", "max_memory_mb"),
    ("gpus", "max_gpus"),
)
_FREE: Final = (("cpus", "cpus"), ("memory_mb", "memory_mb"), ("gpus", "gpus"))  # (envelope, offer free)


def fits(offer: Mapping[str, Any], envelope: AnyEnvelope | Mapping[str, Any]) -> str | None:
    """None when ``offer`` can take ``envelope``, else the reason code: ``no_kind``, ``no_model`` (a
    ``vllm_batch`` job's model is not offered), ``over_limits`` (a limit above the offer's ``limits``),
    ``no_capacity`` (more CPUs, memory or GPUs than ``resources.free``), ``offer_invalid`` (the offer
    lacks what this needs). A mapping envelope is parsed first (``RequestError`` when it is not one)."""
    env = parse_envelope(dict(envelope)) if isinstance(envelope, Mapping) else envelope
    try:
        _check_offered(offer, env.kind, env.output_spec.model if isinstance(env, VllmBatchEnvelope) else None)
        limits, resources = offer.get("limits"), offer.get("resources")
        free = resources.get("free") if isinstance(resources, dict) else None
        if not isinstance(limits, dict) or not isinstance(free, dict):
            raise OfferRefused("offer_invalid", "the offer has no limits or free resources")
        for need, most in _LIMITS:
            if getattr(env.limits, need) > _number(limits, most):
                return "over_limits"
        for need, have in _FREE:
            if getattr(env.limits, need) > _number(free, have):
                return "no_capacity"
    except OfferRefused as drop:
        return drop.reason
    return None


def _number(section: Mapping[str, Any], key: str) -> float:
    value = section.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise OfferRefused("offer_invalid", f"the offer's {key} is not a number")
    return float(value)
