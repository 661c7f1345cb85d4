"""The escrow's events as a reputation scan reads them: ``Funded``, ``Released``, ``Refunded``, decoded from
raw ``eth_getLogs`` entries.

:func:`escrow_events` maps each event's topic to its name and arguments, from the committed ``HearthEscrow``
ABI; :func:`decode_log` turns one log (hex strings, as the RPC sends them) into an :class:`EscrowEvent`.
Every argument of these events is static, one 32-byte word, so decoding slices words rather than running a
general ABI decoder: the scan of a long chain spends its time here. Raises ``KeyError`` (a topic that is
none of the three), ``ValueError``, ``IndexError`` or ``TypeError`` for a malformed log; the caller turns
them into its own error.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Final

from eth_abi.abi import decode
from eth_utils.address import to_checksum_address
from eth_utils.crypto import keccak

from payments.escrow_build import load_artifact

EVENTS: Final = ("Funded", "Released", "Refunded")


@dataclass(frozen=True, slots=True)
class EscrowEvent:
    """One event: its name, where it is (block, index in the block) and its arguments by name."""

    name: str
    block: int
    log_index: int
    args: dict[str, Any]


@functools.cache
def escrow_events() -> dict[bytes, tuple[str, list[tuple[str, str, bool]]]]:
    """topic0 -> (event name, [(argument, ABI type, indexed)]) for the three events read, from the ABI."""
    events = {}
    for item in load_artifact("HearthEscrow").abi:
        if item.get("type") == "event" and item["name"] in EVENTS:
            inputs = [(i["name"], i["type"], bool(i["indexed"])) for i in item["inputs"]]
            signature = f"{item['name']}({','.join(t for _, t, _ in inputs)})"
            events[keccak(text=signature)] = (item["name"], inputs)
    assert len(events) == len(EVENTS), "HearthEscrow's ABI lacks an event the cache reads"
    return events


def decode_log(log: dict[str, Any]) -> EscrowEvent:
    """One raw ``eth_getLogs`` entry (hex strings, as the RPC sends them) as an event.

    The escrow's events have static arguments only (``bytes32``, ``address``, ``uint*``): each is one 32-byte
    word, of a topic when indexed, else of ``data`` in order, so they are sliced rather than run through a
    general ABI decoder (the scan's hot loop). Anything else would go through ``eth_abi``.
    """
    topics = [_hex_bytes(t) for t in log["topics"]]
    name, inputs = escrow_events()[topics[0]]
    data = _hex_bytes(log["data"])
    args: dict[str, Any] = {}
    topic, word = 1, 0
    for arg, kind, indexed in inputs:
        if indexed:
            raw, topic = topics[topic], topic + 1
        else:
            raw, word = data[32 * word : 32 * word + 32], word + 1
        args[arg] = _static(kind, raw)
    return EscrowEvent(name, int(log["blockNumber"], 16), int(log["logIndex"], 16), args)


def _static(kind: str, word: bytes) -> Any:
    """One ABI word of a static type: an address as checksummed text, an integer, or the bytes."""
    if len(word) != 32:
        raise ValueError(f"an event argument of {len(word)} bytes, not one 32-byte word")
    if kind == "address":
        return checksum("0x" + word[12:].hex())
    if kind.startswith("uint"):
        return int.from_bytes(word, "big")
    if kind == "bytes32":
        return word
    return decode([kind], word)[0]


def _hex_bytes(value: str) -> bytes:
    return bytes.fromhex(value[2:] if value.startswith(("0x", "0X")) else value)


@functools.lru_cache(maxsize=4096)
def checksum(address: str) -> str:
    """EIP-55 form of ``address``, cached: a chain's events name a few providers, payers and validators
    many times, and each checksum costs a keccak."""
    return to_checksum_address(address)


__all__ = ["EVENTS", "EscrowEvent", "checksum", "decode_log", "escrow_events"]
