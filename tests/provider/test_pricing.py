"""Pricing: Decimal arithmetic checked by hand, surge, GPU rates by model, and real pricing scripts."""

from __future__ import annotations

import asyncio
import os
import sys
import textwrap
import time
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path

import pytest

from core.config import ModelSection, PricingScriptSection, PricingSection
from core.errors import PricingError
from node.http_errors import status_of
from provider.estimate import WorkEstimate
from provider.pricing import Bid, Pricer, check_max_price, gpu_rate_for
from tests.provider.conftest import MakeEnv

RATES = PricingSection(
    cpu_second="0.00002",
    gpu_second="0.0005",
    output_mb="0.0001",
    input_1k_tokens="0.0002",
    output_1k_tokens="0.0006",
    minimum_per_job="0.01",
)
EST = WorkEstimate(
    cpu_seconds=1234.5,
    gpu_seconds=100.0,
    output_mb=50.25,
    input_tokens=12345,
    output_tokens=6789,
    basis="ffprobe",
)
# By hand: 0.00002 x 1234.5 = 0.02469; 0.0005 x 100 = 0.05; 0.0001 x 50.25 = 0.005025;
# 0.0002 x 12.345 = 0.002469; 0.0006 x 6.789 = 0.0040734. Sum = 0.0862574.
EST_BASE = Decimal("0.0862574")
TINY = WorkEstimate(
    cpu_seconds=1.0, gpu_seconds=0.0, output_mb=0.1, input_tokens=0, output_tokens=0, basis="clip"
)


def test_base_price_by_hand(make_env: MakeEnv) -> None:
    price = Pricer(RATES).base_price(make_env(), EST)
    assert price.cpu == Decimal("0.02469")
    assert price.gpu == Decimal("0.05")
    assert price.output == Decimal("0.005025")
    assert price.input_tokens == Decimal("0.002469")
    assert price.output_tokens == Decimal("0.0040734")
    assert price.subtotal == price.base == EST_BASE
    assert all(isinstance(v, Decimal) for v in (price.cpu, price.gpu, price.base))


def test_float_quantities_enter_as_their_shortest_decimal(make_env: MakeEnv) -> None:
    est = WorkEstimate(0.1, 0.0, 0.0, 0, 0, basis="clip")
    cfg = RATES.model_copy(update={"cpu_second": "1", "minimum_per_job": "0"})
    assert Pricer(cfg).base_price(make_env(), est).cpu == Decimal("0.1")


async def test_ask_rounds_up_to_micro_usdc(make_env: MakeEnv) -> None:
    bid = await Pricer(RATES).ask(make_env(), EST, utilisation=0.2)
    assert bid.ask == Decimal("0.086258")  # 0.0862574 rounded up, never down
    assert bid.ask.as_tuple().exponent == -6
    assert (bid.source, bid.currency, bid.surge_factor) == ("config", "usdc", Decimal(1))
    assert bid.breakdown["base"] == "0.0862574"
    assert bid.breakdown["config_price"] == "0.0862574"
    assert all(Decimal(v) >= 0 for v in bid.breakdown.values())
    assert bid.to_dict()["ask"] == "0.086258"


async def test_minimum_per_job(make_env: MakeEnv) -> None:
    pricer = Pricer(RATES)
    price = pricer.base_price(make_env(), TINY)
    assert price.subtotal == Decimal("0.00003")  # 0.00002 + 0.00001
    assert price.base == Decimal("0.01")
    bid = await pricer.ask(make_env(), TINY, utilisation=0.0)
    assert bid.ask == Decimal("0.010000")


@pytest.mark.parametrize(
    ("load", "factor"),
    [
        (0.0, "1"),
        (0.5, "1"),
        (0.6, "1.2"),
        (0.75, "1.5"),
        (0.9, "1.8"),
        (1.0, "2"),
        (1.4, "2"),
    ],
)
def test_surge_factor(load: float, factor: str) -> None:
    assert Pricer(RATES).surge_factor(load) == Decimal(factor)


def test_surge_with_a_threshold_of_one() -> None:
    cfg = RATES.model_copy(
        update={"surge": RATES.surge.model_copy(update={"threshold": 1.0, "max_factor": 3.0})}
    )
    pricer = Pricer(cfg)
    assert pricer.surge_factor(0.99) == Decimal(1)
    assert pricer.surge_factor(1.0) == Decimal(1)
    assert pricer.surge_factor(1.2) == Decimal(3)


async def test_surge_raises_the_ask(make_env: MakeEnv) -> None:
    bid = await Pricer(RATES).ask(make_env(), EST, utilisation=0.75)
    assert bid.surge_factor == Decimal("1.5")
    assert bid.ask == Decimal("0.129387")  # 0.0862574 x 1.5 = 0.1293861, rounded up


def test_gpu_price_by_model(make_env: MakeEnv) -> None:
    cfg = RATES.model_copy(
        update={"gpu_second_by_model": {"H100": "0.0009", "NVIDIA H100 80GB HBM3": "0.001", "A100": "0.0006"}}
    )
    assert gpu_rate_for(cfg, "NVIDIA H100 80GB HBM3") == Decimal("0.001")  # exact name
    assert gpu_rate_for(cfg, "NVIDIA H100 PCIe") == Decimal("0.0009")  # contains "H100"
    assert gpu_rate_for(cfg, "nvidia a100-sxm4-40gb") == Decimal("0.0006")  # case-insensitive
    assert gpu_rate_for(cfg, "Tesla T4") == Decimal("0.0005")  # the default gpu_second
    assert gpu_rate_for(cfg, None) == Decimal("0.0005")

    priced = Pricer(cfg, gpu_model="NVIDIA A100-SXM4-40GB").base_price(make_env(), EST)
    assert priced.gpu == Decimal("0.06")  # 100 GPU-seconds at 0.0006
    assert priced.gpu_second_rate == Decimal("0.0006")
    assert priced.base == EST_BASE - Decimal("0.05") + Decimal("0.06")


def test_longest_matching_model_wins() -> None:
    cfg = RATES.model_copy(update={"gpu_second_by_model": {"A100": "0.0006", "A100-SXM4-80GB": "0.0008"}})
    assert gpu_rate_for(cfg, "NVIDIA A100-SXM4-80GB") == Decimal("0.0008")


def make_bid(ask: str) -> Bid:
    return Bid(Decimal(ask), "usdc", {"base": ask}, Decimal(1), "config")


def test_check_max_price() -> None:
    check_max_price(make_bid("2.500000"), Decimal("2.50"))  # equal is within
    with pytest.raises(PricingError) as info:
        check_max_price(make_bid("2.500001"), Decimal("2.50"))
    err = info.value
    assert err.code == "price_above_max" and status_of(err) == 402 and err.domain == "pricing"
    assert err.details["ask"] == "2.500001"
    assert err.details["max_price"] == "2.50"
    assert err.details["currency"] == "usdc"
    assert err.details["breakdown"] == {"base": "2.500001"}


# -------------------------------------------------------------------------------------- pricing script


def script(tmp_path: Path, body: str, name: str = "price.py") -> Path:
    """An executable Python pricing script run by this interpreter."""
    path = tmp_path / name
    path.write_text(f"#!{sys.executable}\n" + textwrap.dedent(body))
    path.chmod(0o755)
    return path


def scripted(path: Path | str, timeout: float = 5.0) -> PricingSection:
    return RATES.model_copy(update={"script": PricingScriptSection(path=str(path), timeout_seconds=timeout)})


async def test_script_price_replaces_the_config_price(make_env: MakeEnv, tmp_path: Path) -> None:
    path = script(
        tmp_path,
        """
        import json, sys
        from decimal import Decimal
        ctx = json.load(sys.stdin)
        assert ctx["envelope"]["job_id"] == "job-1"
        assert ctx["estimate"]["basis"] == "ffprobe" and ctx["estimate"]["input_tokens"] == 12345
        price = Decimal(ctx["base_price"]) * Decimal(ctx["surge_factor"]) * 3
        print(price)
        """,
    )
    bid = await Pricer(scripted(path)).ask(make_env(), EST, utilisation=0.75)
    assert bid.source == "script"
    assert bid.ask == Decimal("0.388159")  # 0.0862574 x 1.5 x 3 = 0.3881583, rounded up
    assert bid.breakdown["script_price"] == "0.38815830"  # as the script printed it
    assert bid.breakdown["config_price"] == "0.12938610"  # 0.0862574 x 1.5


async def test_script_may_answer_json(make_env: MakeEnv, tmp_path: Path) -> None:
    path = script(tmp_path, 'print(\'{"price": "0.42"}\')\n')
    bid = await Pricer(scripted(path)).ask(make_env(), TINY, utilisation=0.0)
    assert bid.ask == Decimal("0.420000") and bid.source == "script"


async def test_script_path_is_resolved_against_home(make_env: MakeEnv, tmp_path: Path) -> None:
    script(tmp_path, 'print("1.5")\n', name="home-price.py")
    bid = await Pricer(scripted("home-price.py"), home=tmp_path).ask(make_env(), TINY, utilisation=0.0)
    assert bid.ask == Decimal("1.5")


def assert_script_failed(err: PricingError) -> None:
    assert err.code == "pricing_script_failed"
    assert status_of(err) == 503 and err.retryable is True and err.domain == "pricing"


def process_gone(pid: int) -> bool:
    """Whether ``pid`` has exited (a zombie awaiting its reaper counts as exited)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


async def eventually(predicate: Callable[[], bool], within: float = 5.0) -> bool:
    """Poll ``predicate`` until it holds or ``within`` seconds pass; returns its last answer."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if predicate():
            return True
        await asyncio.sleep(0.02)
    return predicate()


def read_pids(script_path: Path) -> tuple[int, int]:
    """The (script, child) pids a SLEEPER script wrote next to itself."""
    parent, child = (int(p) for p in Path(f"{script_path}.pids").read_text().split())
    return parent, child


SLEEPER = """
import os, subprocess, sys, time
pids = sys.argv[0] + ".pids"
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
with open(pids, "w") as f:
    f.write(f"{os.getpid()} {child.pid}")
time.sleep(60)
"""


async def test_script_timeout_kills_it_and_its_children(make_env: MakeEnv, tmp_path: Path) -> None:
    path = script(tmp_path, SLEEPER)
    started = time.monotonic()
    with pytest.raises(PricingError) as info:
        await Pricer(scripted(path, timeout=0.5)).ask(make_env(), EST, utilisation=0.0)
    elapsed = time.monotonic() - started
    assert_script_failed(info.value)
    assert "timeout" in info.value.message
    assert elapsed < 3.0
    parent, child = read_pids(path)
    assert process_gone(parent)
    assert await eventually(lambda: process_gone(child)), "the script's child outlived the timeout"


async def test_cancelling_a_bid_kills_the_script(make_env: MakeEnv, tmp_path: Path) -> None:
    path = script(tmp_path, SLEEPER)
    task = asyncio.create_task(Pricer(scripted(path, timeout=30)).ask(make_env(), EST, utilisation=0.0))
    pids = Path(f"{path}.pids")
    assert await eventually(pids.exists, within=10)
    await asyncio.sleep(0.05)  # the file is written; let the script reach its sleep
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    parent, child = read_pids(path)
    assert process_gone(parent)
    assert await eventually(lambda: process_gone(child))


@pytest.mark.parametrize(
    ("body", "why"),
    [
        ('print("about tree fiddy")\n', "no usable price"),
        ('print("-0.5")\n', "no usable price"),
        ('print("NaN")\n', "no usable price"),
        ('print("")\n', "no usable price"),
        ('print(\'{"cost": "1"}\')\n', "no usable price"),
        ("print('{\"price\": 1.25, ')\n", "no usable price"),
        ('import sys; sys.stdout.buffer.write(b"\\xff\\xfe")\n', "no usable price"),
        ('import sys; print("0.5"); sys.exit(1)\n', "exited with status 1"),
        ('raise SystemExit("pricing backend down")\n', "exited with status 1"),
    ],
)
async def test_failing_scripts_mean_no_bid(make_env: MakeEnv, tmp_path: Path, body: str, why: str) -> None:
    with pytest.raises(PricingError) as info:
        await Pricer(scripted(script(tmp_path, body))).ask(make_env(), EST, utilisation=0.0)
    assert_script_failed(info.value)
    assert why in info.value.message


async def test_script_json_number_price(make_env: MakeEnv, tmp_path: Path) -> None:
    path = script(tmp_path, "print('{\"price\": 0.3333333}')\n")
    bid = await Pricer(scripted(path)).ask(make_env(), EST, utilisation=0.0)
    assert bid.ask == Decimal("0.333334")  # parsed as Decimal, never through a float


async def test_missing_or_unrunnable_script(make_env: MakeEnv, tmp_path: Path) -> None:
    with pytest.raises(PricingError) as info:
        await Pricer(scripted(tmp_path / "absent.py")).ask(make_env(), EST, utilisation=0.0)
    assert_script_failed(info.value)
    assert "could not start" in info.value.message

    path = script(tmp_path, 'print("1")\n')
    os.chmod(path, 0o644)
    with pytest.raises(PricingError) as info:
        await Pricer(scripted(path)).ask(make_env(), EST, utilisation=0.0)
    assert "could not start" in info.value.message


# ------------------------------------------------------------------------------------ per-model tokens

BATCH_MODEL = "llama-3.1-8b-instruct"  # what make_env's vllm_batch envelopes name


def model_entry(name: str = BATCH_MODEL, **prices: str) -> ModelSection:
    return ModelSection(name=name, path="models/x", cid="bafy" + "a" * 55, max_context=8192, **prices)


def test_a_models_own_token_prices_replace_pricings(make_env: MakeEnv) -> None:
    pricer = Pricer(RATES, models=[model_entry(input_1k_tokens="0.5", output_1k_tokens="2")])
    price = pricer.base_price(make_env(kind="vllm_batch"), EST)
    assert price.input_tokens == Decimal("6.1725")  # 0.5 x 12.345
    assert price.output_tokens == Decimal("13.578")  # 2 x 6.789
    # the other lines are [pricing]'s as before
    assert (price.cpu, price.gpu, price.output) == (Decimal("0.02469"), Decimal("0.05"), Decimal("0.005025"))
    assert price.base == Decimal("0.02469") + Decimal("0.05") + Decimal("0.005025") + Decimal("19.7505")
    assert pricer.token_rates(make_env(kind="vllm_batch")) == (Decimal("0.5"), Decimal("2"))


def test_a_model_without_prices_is_priced_at_pricings_rates(make_env: MakeEnv) -> None:
    pricer = Pricer(RATES, models=[model_entry()])
    price = pricer.base_price(make_env(kind="vllm_batch"), EST)
    assert price.input_tokens == Decimal("0.002469")
    assert price.output_tokens == Decimal("0.0040734")
    assert price.base == EST_BASE


def test_a_model_may_set_one_price_and_take_the_other_from_pricing(make_env: MakeEnv) -> None:
    pricer = Pricer(RATES, models=[model_entry(output_1k_tokens="0.01")])
    assert pricer.token_rates(make_env(kind="vllm_batch")) == (Decimal("0.0002"), Decimal("0.01"))
    price = pricer.base_price(make_env(kind="vllm_batch"), EST)
    assert price.input_tokens == Decimal("0.002469")
    assert price.output_tokens == Decimal("0.06789")


def test_model_prices_apply_only_to_batches_naming_that_model(make_env: MakeEnv) -> None:
    pricer = Pricer(RATES, models=[model_entry("other-model", input_1k_tokens="0.5", output_1k_tokens="2")])
    pricing_rates = (Decimal("0.0002"), Decimal("0.0006"))
    assert pricer.token_rates(make_env(kind="vllm_batch")) == pricing_rates
    assert pricer.base_price(make_env(kind="vllm_batch"), EST).base == EST_BASE
    # a transcode is never priced by a model's rates, even one of the same name
    same_name = Pricer(RATES, models=[model_entry(input_1k_tokens="0.5", output_1k_tokens="2")])
    assert same_name.token_rates(make_env()) == pricing_rates
    transcode = same_name.base_price(make_env(), EST)
    assert (transcode.input_tokens, transcode.output_tokens) == (Decimal("0.002469"), Decimal("0.0040734"))


async def test_the_ask_carries_the_models_token_lines(make_env: MakeEnv) -> None:
    est = WorkEstimate(0.0, 0.0, 0.0, input_tokens=2000, output_tokens=500, basis="token_count")
    pricer = Pricer(RATES, models=[model_entry(input_1k_tokens="0.5", output_1k_tokens="2")])
    bid = await pricer.ask(make_env(kind="vllm_batch"), est, utilisation=0.0)
    assert Decimal(bid.breakdown["input_tokens"]) == Decimal(1)  # 0.5 x 2
    assert Decimal(bid.breakdown["output_tokens"]) == Decimal(1)  # 2 x 0.5
    assert bid.ask == Decimal("2.000000")
