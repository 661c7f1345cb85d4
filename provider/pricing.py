"""Pricing: turns a work estimate into the node's ask, in Decimal from end to end (the README's Bidding).

The config price is the operator's rates times the estimate, floored at the minimum per job, times a surge
factor that rises with load. An optional operator script may replace it: it reads the bid context as JSON
on stdin and prints a price; if it fails in any way the node does not bid. No float ever touches money:
rates are decimal strings in config and quantities enter as ``Decimal(repr(float))``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import ROUND_HALF_EVEN, ROUND_UP, Decimal, InvalidOperation
from pathlib import Path
from typing import Any, Literal

from core.config import ModelSection, PricingSection, resolve_path
from core.envelope import FfmpegTranscodeEnvelope, VllmBatchEnvelope, envelope_dict
from core.errors import PricingError
from provider.estimate import WorkEstimate

Envelope = FfmpegTranscodeEnvelope | VllmBatchEnvelope

log = logging.getLogger(__name__)

# USDC has 6 decimals: an ask is rounded up to a whole micro-dollar so the node never under-asks.
ASK_QUANTUM = Decimal("0.000001")
SURGE_QUANTUM = Decimal("0.000001")
_THOUSAND = Decimal(1000)
# Only the end of a failing script's stderr is logged; it is the operator's, not the requester's, business.
_STDERR_LOG_CHARS = 500


# Estimated quantities (seconds, MB, tokens) are kept to a millionth of their unit: finer is float noise.
QUANTITY_DIGITS = 6


def _dec(value: float) -> Decimal:
    # repr gives the shortest string that round-trips, so 0.1 becomes Decimal("0.1"), not its binary noise.
    return Decimal(repr(round(value, QUANTITY_DIGITS)))


def _s(value: Decimal) -> str:
    return format(value, "f")


@dataclass(frozen=True, slots=True)
class PriceBreakdown:
    """Each line of the config price, exact (unrounded), and the base it adds up to."""

    cpu: Decimal
    gpu: Decimal
    output: Decimal
    input_tokens: Decimal
    output_tokens: Decimal
    subtotal: Decimal
    minimum_per_job: Decimal
    base: Decimal
    gpu_second_rate: Decimal

    def to_dict(self) -> dict[str, str]:
        return {
            "cpu": _s(self.cpu),
            "gpu": _s(self.gpu),
            "output": _s(self.output),
            "input_tokens": _s(self.input_tokens),
            "output_tokens": _s(self.output_tokens),
            "subtotal": _s(self.subtotal),
            "minimum_per_job": _s(self.minimum_per_job),
            "base": _s(self.base),
            "gpu_second_rate": _s(self.gpu_second_rate),
        }


@dataclass(frozen=True, slots=True)
class Bid:
    """The node's ask for one job: what a quote carries and the most it will charge."""

    ask: Decimal
    currency: str
    breakdown: dict[str, str]
    surge_factor: Decimal
    source: Literal["config", "script"]

    def to_dict(self) -> dict[str, Any]:
        return {
            "ask": _s(self.ask),
            "currency": self.currency,
            "breakdown": dict(self.breakdown),
            "surge_factor": _s(self.surge_factor),
            "source": self.source,
        }


class Pricer:
    """Prices jobs with the operator's ``[pricing]`` rates and, if configured, the pricing script.

    ``gpu_model`` is this node's GPU name as NVML reports it (e.g. ``"NVIDIA H100 80GB HBM3"``); it picks
    the per-model GPU rate. ``models`` is the catalog's entries: a model's own token prices, where set,
    replace ``[pricing]``'s for batches naming it. ``home`` resolves a relative script path.
    """

    def __init__(
        self,
        cfg: PricingSection,
        *,
        gpu_model: str | None = None,
        models: Sequence[ModelSection] = (),
        home: Path | None = None,
    ) -> None:
        self._cfg = cfg
        self._gpu_rate = gpu_rate_for(cfg, gpu_model)
        # the rates and surge bounds as Decimals, once (the config is frozen; a reload makes a new Pricer)
        self._cpu_rate = cfg.dec("cpu_second")
        self._output_rate = cfg.dec("output_mb")
        self._minimum = cfg.dec("minimum_per_job")
        self._default_token_rates = (cfg.dec("input_1k_tokens"), cfg.dec("output_1k_tokens"))
        self._surge_threshold = _dec(cfg.surge.threshold)
        self._surge_top = _dec(cfg.surge.max_factor)
        self._token_rates = {
            m.name: (
                Decimal(m.input_1k_tokens or cfg.input_1k_tokens),
                Decimal(m.output_1k_tokens or cfg.output_1k_tokens),
            )
            for m in models
        }
        self._script: tuple[Path, float] | None = None
        if cfg.script is not None:
            path = Path(cfg.script.path) if home is None else resolve_path(home, cfg.script.path)
            self._script = (path, cfg.script.timeout_seconds)

    @property
    def gpu_second_rate(self) -> Decimal:
        return self._gpu_rate

    def base_price(self, env: Envelope, est: WorkEstimate) -> PriceBreakdown:
        """Rates times the estimate, floored at ``minimum_per_job``; before surge."""
        cpu = self._cpu_rate * _dec(est.cpu_seconds)
        gpu = self._gpu_rate * _dec(est.gpu_seconds)
        output = self._output_rate * _dec(est.output_mb)
        input_rate, output_rate = self.token_rates(env)
        input_tokens = input_rate * Decimal(est.input_tokens) / _THOUSAND
        output_tokens = output_rate * Decimal(est.output_tokens) / _THOUSAND
        subtotal = cpu + gpu + output + input_tokens + output_tokens
        minimum = self._minimum
        return PriceBreakdown(
            cpu=cpu,
            gpu=gpu,
            output=output,
            input_tokens=input_tokens,
            output_tokens=output_tokens,
            subtotal=subtotal,
            minimum_per_job=minimum,
            base=max(subtotal, minimum),
            gpu_second_rate=self._gpu_rate,
        )

    def token_rates(self, env: Envelope) -> tuple[Decimal, Decimal]:
        """Prices per 1k input and output tokens for ``env``: its model's own, else ``[pricing]``'s."""
        if isinstance(env, VllmBatchEnvelope) and env.output_spec.model in self._token_rates:
            return self._token_rates[env.output_spec.model]
        return self._default_token_rates

    def surge_factor(self, utilisation: float) -> Decimal:
        """1 up to the surge threshold, then rising linearly to ``max_factor`` at full load (and beyond)."""
        threshold, top = self._surge_threshold, self._surge_top
        load = _dec(utilisation)
        if load <= threshold:
            return Decimal(1)
        factor = top if load >= 1 else 1 + (top - 1) * (load - threshold) / (1 - threshold)
        # Trailing zeros dropped, so a factor of 1.5 multiplies as "1.5", not "1.500000".
        return factor.quantize(SURGE_QUANTUM, rounding=ROUND_HALF_EVEN).normalize()

    async def ask(self, env: Envelope, est: WorkEstimate, utilisation: float) -> Bid:
        """The node's ask: config price x surge, or the pricing script's price when one is configured.

        Raises ``PricingError("pricing_script_failed", 503, retryable)`` when the script times out, exits
        non-zero, or prints something that is not a non-negative decimal: no script price, no bid.
        """
        breakdown = self.base_price(env, est)
        surge = self.surge_factor(utilisation)
        config_price = breakdown.base * surge
        lines = breakdown.to_dict()
        lines["config_price"] = _s(config_price)
        price = config_price
        source: Literal["config", "script"] = "config"
        if self._script is not None:
            context = {
                "envelope": envelope_dict(env),
                "estimate": est.to_dict(),
                "base_price": _s(breakdown.base),
                "breakdown": breakdown.to_dict(),
                "surge_factor": _s(surge),
                "utilisation": utilisation,
                "currency": self._cfg.currency,
            }
            price = await _run_script(*self._script, context)
            lines["script_price"] = _s(price)
            source = "script"
        return Bid(
            ask=price.quantize(ASK_QUANTUM, rounding=ROUND_UP),
            currency=self._cfg.currency,
            breakdown=lines,
            surge_factor=surge,
            source=source,
        )


async def _run_script(path: Path, time_limit: float, context: dict[str, Any]) -> Decimal:
    """Run the operator's pricing script on ``context`` and return the price it prints."""
    payload = json.dumps(context).encode()
    try:
        # A session of its own lets a timeout kill the whole process group, not just the script.
        proc = await asyncio.create_subprocess_exec(
            str(path),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,
        )
    except OSError as exc:
        raise _script_failed(f"could not start the pricing script: {exc.strerror or exc}") from None
    try:
        async with asyncio.timeout(time_limit):
            out, err = await proc.communicate(payload)
    except TimeoutError:
        raise _script_failed(f"the pricing script ran past its {time_limit}s timeout") from None
    finally:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()
    if proc.returncode != 0:
        log.warning(
            "pricing script %s exited %s: %s",
            path,
            proc.returncode,
            err.decode("utf-8", "replace")[-_STDERR_LOG_CHARS:],
        )
        raise _script_failed(f"the pricing script exited with status {proc.returncode}")
    return _parse_script_price(out)


def _script_failed(reason: str) -> PricingError:
    return PricingError(
        "pricing_script_failed",
        f"no bid: {reason}",
        details={"reason": reason},
        retryable=True,
    )


def _parse_script_price(out: bytes) -> Decimal:
    """A price from the script's stdout: a bare decimal string, or JSON ``{"price": "..."}``."""
    try:
        text = out.decode("utf-8").strip()
        if text.startswith("{"):
            doc = json.loads(text, parse_float=Decimal, parse_int=Decimal)
            raw = doc.get("price")
            price = Decimal(raw) if isinstance(raw, str | Decimal) else None
        else:
            price = Decimal(text)
    except (UnicodeDecodeError, json.JSONDecodeError, InvalidOperation):
        price = None
    if price is None or not price.is_finite() or price < 0:
        raise _script_failed(f"the pricing script printed no usable price: {out[:80]!r}")
    return price


def gpu_rate_for(cfg: PricingSection, gpu_model: str | None) -> Decimal:
    """The GPU-second rate for a GPU model: an exact key, else the longest key the name contains
    (case-insensitive, so ``"H100"`` prices an ``"NVIDIA H100 80GB HBM3"``), else ``gpu_second``."""
    by_model = cfg.gpu_second_by_model
    if gpu_model:
        if gpu_model in by_model:
            return Decimal(by_model[gpu_model])
        name = gpu_model.lower()
        matches = [key for key in by_model if key.lower() in name]
        if matches:
            return Decimal(by_model[max(matches, key=len)])
    return cfg.dec("gpu_second")


def check_max_price(bid: Bid, max_price: Decimal) -> None:
    """Refuse when the ask is above the requester's ``max_price``, carrying the ask so it can decide."""
    if bid.ask <= max_price:
        return
    raise PricingError(
        "price_above_max",
        f"the node's ask {_s(bid.ask)} {bid.currency} is above max_price {_s(max_price)}",
        details={
            "ask": _s(bid.ask),
            "max_price": _s(max_price),
            "currency": bid.currency,
            "breakdown": dict(bid.breakdown),
            "surge_factor": _s(bid.surge_factor),
        },
    )
