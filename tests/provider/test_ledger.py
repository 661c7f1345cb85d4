"""The ledger's rules for unfunded holds: shares, over-quotes, acceptance, precedence, expiry, retry hints.

The attack these rules answer: quotes cost nothing and DIDs are free, so a stranger can ask for every
free CPU from as many fresh did:keys as it likes. Whatever it does, unfunded holds stay within their
shares, the rest stays free for whoever accepts, and prices do not move.
"""

from __future__ import annotations

import pytest

from core.errors import CapacityError
from node.http_errors import status_of
from provider.capacity import CapacityLedger, Hold, HoldPolicy, Resources

TOTAL = Resources(cpus=4.0, memory_mb=8192, gpus=1)
POLICY = HoldPolicy(unfunded_share=0.5, per_requester_share=0.25, busy_retry_seconds=42)
NOW = 1_000.0
TTL = 300.0


def ledger() -> CapacityLedger:
    return CapacityLedger(TOTAL, POLICY)


def quote(led: CapacityLedger, key: str, owner: str, cpus: float, *, at: float = NOW, mb: int = 512) -> bool:
    return led.hold_unfunded(key, owner, Resources(cpus, mb, 0), at + TTL, now=at)


def refusal(info: pytest.ExceptionInfo[CapacityError]) -> tuple[str, int, int | None]:
    err = info.value
    return err.code, status_of(err), err.details.get("retry_after_seconds")


def test_fresh_dids_asking_for_everything_hold_at_most_the_total_share() -> None:
    led = ledger()
    # one quote for every CPU: issued (no refusal) but it holds nothing
    assert quote(led, "all", "did:key:zA0", 4.0) is False
    assert led.used() == Resources() and led.free() == TOTAL
    # a swarm of fresh DIDs, each within its own share: the first two fill the total share, no more
    held = [quote(led, f"q{i}", f"did:key:zA{i}", 1.0) for i in range(1, 9)]
    assert held == [True, True] + [False] * 6
    assert led.unfunded() == Resources(2.0, 1024, 0)
    assert led.free().cpus == 2.0  # half the node stays free whatever the attacker does
    assert len(led) == 2  # an over-quote leaves no hold behind


def test_one_requester_holds_at_most_its_own_share() -> None:
    led = ledger()
    assert quote(led, "a", "did:key:zMe", 1.0) is True
    assert quote(led, "b", "did:key:zMe", 0.5) is False  # 1.5 CPUs would be beyond 0.25 of 4
    assert quote(led, "c", "did:key:zOther", 1.0) is True
    assert led.release("a") is True
    assert quote(led, "d", "did:key:zMe", 1.0) is True  # released share is the requester's again


def test_every_axis_is_bounded_and_a_single_gpu_is_never_held_by_a_quote() -> None:
    led = ledger()
    assert led.hold_unfunded("mem", "did:key:z1", Resources(0.1, 4096, 0), NOW + TTL, now=NOW) is False
    assert led.hold_unfunded("gpu", "did:key:z2", Resources(0.1, 64, 1), NOW + TTL, now=NOW) is False
    assert led.used() == Resources()


def test_shares_of_one_hold_everything_and_zero_nothing() -> None:
    open_ledger = CapacityLedger(TOTAL, HoldPolicy(unfunded_share=1.0, per_requester_share=1.0))
    assert quote(open_ledger, "all", "did:key:z", 4.0) is True
    closed = CapacityLedger(TOTAL, HoldPolicy(unfunded_share=0.0, per_requester_share=1.0))
    assert quote(closed, "small", "did:key:z", 0.1) is False


def test_an_over_quote_is_accepted_when_the_capacity_is_free_then() -> None:
    led = ledger()
    quote(led, "x1", "did:key:zX1", 1.0)
    quote(led, "x2", "did:key:zX2", 1.0)
    assert quote(led, "honest", "did:key:zH", 2.0) is False  # beyond the shares: held nothing
    led.commit("honest", Resources(2.0, 512, 0), now=NOW + 5)  # but 2 CPUs are free: accepted
    hold = led.get("honest")
    assert hold == Hold("honest", Resources(2.0, 512, 0), None, "committed", "")
    assert led.free().cpus == 0.0 and led.committed().cpus == 2.0


def test_an_acceptance_that_does_not_fit_is_a_503_saying_when_to_retry_and_changes_nothing() -> None:
    led = ledger()
    quote(led, "x1", "did:key:zX1", 1.0, at=NOW)  # lapses at NOW + 300
    quote(led, "x2", "did:key:zX2", 1.0, at=NOW + 100)  # lapses at NOW + 400
    led.commit("job", Resources(1.5, 512, 0), now=NOW)
    before = led.snapshot()
    with pytest.raises(CapacityError) as info:
        led.commit("late", Resources(1.0, 512, 0), now=NOW + 10)
    # 0.5 CPU is free; x1 lapsing frees 1.0 more, which is enough: 290 s from now
    assert refusal(info) == ("insufficient_capacity", 503, 290)
    assert info.value.retryable is True
    with pytest.raises(CapacityError) as info:
        led.commit("later", Resources(2.5, 512, 0), now=NOW + 10)
    assert refusal(info)[2] == 390  # needs both quotes to lapse: the later one
    assert led.snapshot() == before and "late" not in led


def test_a_quote_is_refused_only_when_committed_work_leaves_too_little() -> None:
    led = ledger()
    led.commit("running", Resources(3.0, 512, 0), now=NOW)
    quote(led, "x", "did:key:zX", 0.5)
    assert quote(led, "fits", "did:key:zH", 1.0) is False  # over-quoted: free only once x lapses
    with pytest.raises(CapacityError) as info:
        quote(led, "too-big", "did:key:zH", 1.5)
    # nothing lapses by itself: running work has no known end, so the operator's hint
    assert refusal(info) == ("insufficient_capacity", 503, 42)
    assert "too-big" not in led
    with pytest.raises(CapacityError) as info:
        quote(led, "never", "did:key:zH", 5.0)
    assert refusal(info) == ("exceeds_capacity", 422, None)
    assert info.value.retryable is False


def test_a_refused_requote_keeps_the_hold_it_had() -> None:
    led = ledger()
    assert quote(led, "k", "did:key:zK", 1.0) is True
    led.commit("big", Resources(3.0, 512, 0), now=NOW, must_fit=False)
    with pytest.raises(CapacityError):
        led.hold_unfunded("k", "did:key:zK", Resources(2.0, 512, 0), NOW + TTL, now=NOW)
    assert led.get("k") == Hold("k", Resources(1.0, 512, 0), NOW + TTL, "unfunded", "did:key:zK")


def test_acceptance_awaiting_funding_keeps_its_quote_hold_even_when_funded_work_overcommits() -> None:
    led = ledger()
    assert quote(led, "mine", "did:key:zH", 1.0) is True
    led.commit("paid", Resources(4.0, 512, 0), now=NOW, must_fit=False)  # funded: held regardless
    assert led.free_raw().cpus == -1.0
    # the quote's hold is the requester's: its acceptance keeps it until the funding deadline
    deadline = NOW + 900
    assert led.hold_unfunded("mine", "did:key:zH", Resources(1.0, 512, 0), deadline, now=NOW, must_fit=True)
    hold = led.get("mine")
    assert hold is not None and hold.expires_at == deadline and hold.kind == "unfunded"
    led.commit("mine", Resources(1.0, 512, 0), now=NOW)  # funded later: committed without a check
    assert led.unfunded() == Resources() and led.committed().cpus == 5.0


def test_acceptance_awaiting_funding_without_a_hold_needs_free_capacity() -> None:
    led = ledger()
    quote(led, "x1", "did:key:zX1", 1.0)
    quote(led, "x2", "did:key:zX2", 1.0)
    deadline = NOW + 900
    # free (2 CPUs), but the unfunded share is taken: accepted, holding nothing until funded
    assert (
        led.hold_unfunded("h", "did:key:zH", Resources(1.0, 512, 0), deadline, now=NOW, must_fit=True)
        is False
    )
    assert "h" not in led
    led.commit("paid", Resources(2.0, 512, 0), now=NOW)
    with pytest.raises(CapacityError) as info:  # nothing free now: refused until x1 lapses
        led.hold_unfunded("h2", "did:key:zH", Resources(1.0, 512, 0), deadline, now=NOW, must_fit=True)
    assert refusal(info) == ("insufficient_capacity", 503, 300)


def test_expiry_returns_the_share() -> None:
    led = ledger()
    quote(led, "x1", "did:key:zX1", 1.0)
    quote(led, "x2", "did:key:zX2", 1.0)
    assert quote(led, "h", "did:key:zH", 1.0) is False
    assert sorted(led.expire(NOW + TTL)) == ["x1", "x2"]
    assert led.used() == Resources()
    assert quote(led, "h", "did:key:zH", 1.0, at=NOW + TTL) is True


def test_restore_undoes_a_change_exactly() -> None:
    led = ledger()
    quote(led, "q", "did:key:zQ", 1.0)
    before, snap = led.get("q"), led.snapshot()
    led.commit("q", Resources(1.0, 512, 0), now=NOW)
    led.restore("q", before)
    assert led.get("q") == before and led.snapshot() == snap
    led.restore("fresh", None)
    led.commit("fresh", Resources(0.5, 512, 0), now=NOW)
    led.restore("fresh", None)
    assert "fresh" not in led and led.snapshot() == snap


def test_unfunded_holds_do_not_move_utilisation_and_so_not_prices() -> None:
    led = ledger()
    quote(led, "x1", "did:key:zX1", 1.0)
    quote(led, "x2", "did:key:zX2", 1.0)
    assert led.utilisation() == 0.0
    assert led.utilisation(extra=Resources(1.0, 0, 0)) == 0.25
    led.commit("job", Resources(2.0, 0, 0), now=NOW)
    assert led.utilisation() == 0.5


def test_load_holds_quotes_again_only_within_free_capacity_and_the_shares() -> None:
    led = ledger()
    led.load(
        [
            ("job", Resources(2.0, 512, 0), None, "did:key:zJ"),
            ("q-late", Resources(1.0, 512, 0), NOW + 200, "did:key:zL"),
            ("q-early", Resources(1.0, 512, 0), NOW + 100, "did:key:zE"),
            ("q-third", Resources(1.0, 512, 0), NOW + 300, "did:key:zT"),
            ("q-gpu", Resources(0.1, 64, 1), NOW + 50, "did:key:zG"),
        ]
    )
    # committed rows are facts; quotes held earliest first while free and within the shares
    assert {h.key for h in led.holds()} == {"job", "q-early", "q-late"}
    assert led.committed().cpus == 2.0 and led.unfunded().cpus == 2.0
    # one requester's quotes are held within its own share again, in the order given on a tie
    mine = ledger()
    mine.load([(f"m{i}", Resources(0.5, 512, 0), NOW + 100, "did:key:zM") for i in range(3)])
    assert [h.key for h in mine.holds()] == ["m0", "m1"]
    over = CapacityLedger(Resources(1.0, 1024, 0), POLICY)
    over.load([("a", Resources(2.0, 512, 0), None, "")])  # an over-commitment stays recorded
    assert over.free_raw().cpus == -1.0


def test_running_totals_survive_mixed_churn() -> None:
    led = CapacityLedger(TOTAL, HoldPolicy(unfunded_share=1.0, per_requester_share=1.0))
    for i in range(3_000):
        key, owner, need = f"k{i}", f"did:key:z{i % 7}", Resources(0.1, 1, 0)
        held = led.hold_unfunded(key, owner, need, float(i + 5), now=float(i))
        if held and i % 2:
            led.commit(key, need, now=float(i))
        if i % 3 or i % 2:
            led.release(key)  # unfunded holds of the other third are left to lapse
        led.expire(float(i))
    led.expire(1e12)
    assert len(led) == 0
    assert led.used() == Resources(0.0, 0, 0) and led.unfunded() == Resources(0.0, 0, 0)
    assert led._by_owner == {}
