"""Policy screening: each refusal with its code, domain and status; the first refusal wins."""

from __future__ import annotations

import pytest

from core.config import PolicySection
from core.errors import CapacityError, HearthError, PolicyError
from node.http_errors import status_of
from provider.policy import DEFAULT_CHECKS, Screening, check_concurrency, check_limits, screen
from tests.provider.conftest import MakeEnv

ALICE = "did:key:z6MkhaXgBZDvotDkL5257faiztiGiC2QtKLGpbnnEGta2doK"
MALLORY = "did:key:z6MkpTHR8VNsBxYAAWHut2Geadd9jSwuBV8xRoAnwWsdvktH"


def test_a_job_within_policy_passes(make_env: MakeEnv) -> None:
    screening = Screening(make_env(), ALICE, PolicySection(), active_for_did=3)
    assert [check(screening) for check in DEFAULT_CHECKS] == [None, None, None, None]
    screen(make_env(), ALICE, PolicySection(), active_for_did=3)  # and so screen raises nothing


def test_denied_did(make_env: MakeEnv) -> None:
    with pytest.raises(PolicyError) as info:
        screen(make_env(), MALLORY, PolicySection(deny_dids=[MALLORY]), active_for_did=0)
    err = info.value
    assert err.code == "did_denied" and err.domain == "auth" and status_of(err) == 403
    assert err.retryable is False
    assert err.details == {"iss": MALLORY}


def test_did_missing_from_allow_list(make_env: MakeEnv) -> None:
    policy = PolicySection(allow_dids=[ALICE])
    screen(make_env(), ALICE, policy, active_for_did=0)
    with pytest.raises(PolicyError) as info:
        screen(make_env(), MALLORY, policy, active_for_did=0)
    assert info.value.code == "did_denied" and status_of(info.value) == 403
    assert "allow list" in info.value.message


def test_deny_beats_allow(make_env: MakeEnv) -> None:
    with pytest.raises(PolicyError) as info:
        screen(make_env(), ALICE, PolicySection(allow_dids=[ALICE], deny_dids=[ALICE]), active_for_did=0)
    assert "deny list" in info.value.message


def test_kind_not_offered(make_env: MakeEnv) -> None:
    with pytest.raises(PolicyError) as info:
        screen(
            make_env(kind="vllm_batch"), ALICE, PolicySection(kinds=["ffmpeg_transcode"]), active_for_did=0
        )
    err = info.value
    assert err.code == "kind_not_offered" and status_of(err) == 422 and err.domain == "pricing"
    assert err.details == {"kind": "vllm_batch", "offered": ["ffmpeg_transcode"]}


@pytest.mark.parametrize(
    ("limit", "asked", "policy_field", "most"),
    [
        ("timeout_seconds", 7200, "max_timeout_seconds", 3600),
        ("max_output_mb", 4096, "max_output_mb", 2048),
        ("cpus", 4.5, "max_cpus", 4),
        ("memory_mb", 16384, "max_memory_mb", 8192),
        ("gpus", 2, "max_gpus", 1),
    ],
)
def test_each_limit_above_policy(
    make_env: MakeEnv, limit: str, asked: float, policy_field: str, most: float
) -> None:
    policy = PolicySection(**{policy_field: most})
    with pytest.raises(PolicyError) as info:
        screen(make_env(limits={limit: asked}), ALICE, policy, active_for_did=0)
    err = info.value
    assert err.code == "limits_exceeded" and status_of(err) == 422
    assert (err.details["limit"], err.details["asked"], err.details["max"]) == (limit, asked, most)
    assert err.details["exceeded"] == [{"limit": limit, "asked": asked, "max": most}]


def test_a_limit_equal_to_the_maximum_passes(make_env: MakeEnv) -> None:
    env = make_env(limits={"timeout_seconds": 3600, "cpus": 4, "gpus": 1})
    assert check_limits(Screening(env, ALICE, PolicySection(), 0)) is None


def test_every_exceeded_limit_is_listed(make_env: MakeEnv) -> None:
    env = make_env(limits={"cpus": 8, "memory_mb": 65536})
    with pytest.raises(PolicyError) as info:
        screen(env, ALICE, PolicySection(), active_for_did=0)
    assert info.value.details["limit"] == "cpus"
    assert [e["limit"] for e in info.value.details["exceeded"]] == ["cpus", "memory_mb"]


def test_per_did_concurrency(make_env: MakeEnv) -> None:
    policy = PolicySection(per_did_concurrency=2)
    screen(make_env(), ALICE, policy, active_for_did=1)
    with pytest.raises(CapacityError) as info:
        screen(make_env(), ALICE, policy, active_for_did=2)
    err = info.value
    assert err.code == "did_concurrency" and status_of(err) == 429 and err.retryable is True
    assert err.details == {"active": 2, "max": 2}


def test_first_refusal_wins(make_env: MakeEnv) -> None:
    env = make_env(kind="vllm_batch", limits={"cpus": 64})
    policy = PolicySection(deny_dids=[MALLORY], kinds=["ffmpeg_transcode"], per_did_concurrency=1)
    with pytest.raises(HearthError) as info:
        screen(env, MALLORY, policy, active_for_did=5)
    assert info.value.code == "did_denied"
    with pytest.raises(HearthError) as info:
        screen(env, ALICE, policy, active_for_did=5)
    assert info.value.code == "kind_not_offered"


def test_checks_are_pluggable(make_env: MakeEnv) -> None:
    seen: list[str] = []

    def no_weekend_jobs(s: Screening) -> HearthError | None:
        seen.append(s.iss)
        return PolicyError("closed", "closed today")

    with pytest.raises(PolicyError) as info:
        screen(
            make_env(), ALICE, PolicySection(), active_for_did=0, checks=(*DEFAULT_CHECKS, no_weekend_jobs)
        )
    assert info.value.code == "closed" and seen == [ALICE]
    # Without the concurrency check, a busy requester passes.
    screen(make_env(), ALICE, PolicySection(per_did_concurrency=1), active_for_did=9, checks=())
    assert check_concurrency(Screening(make_env(), ALICE, PolicySection(), 0)) is None
