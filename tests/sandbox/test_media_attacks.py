"""Resource overruns and hostile media against a real daemon process, and the pieces those attacks rest on.

The rounds themselves (tests/sandbox/attacks.py) also run many times on the fault scoreboard; here each
runs once, beside what makes them trustworthy: the bomb really expands, and a probe that its sandbox
stops refuses the input instead of failing the node.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from core.envelope import node_job_id
from core.errors import ExecutionError
from node.http_errors import status_of
from payments.keys import new_ed25519
from sandbox.ffmpeg import sandboxed_probe_refusal
from tests.sandbox.attacks import QUOTE_BOUND_SECONDS, MediaKit, resource_round
from tests.sandbox.faultnode import AttackedNode, transcode_envelope

BOMB_FRAMES_DECODED = 20  # past frame_num's wrap (16 with x264's settings): every rewritten frame decodes


@pytest.fixture(scope="module")
def kit(tmp_path_factory: pytest.TempPathFactory) -> MediaKit:
    return MediaKit.make(tmp_path_factory.mktemp("media"))


@pytest.fixture
def attacked(tmp_path: Path, sandbox_images: dict[str, str]) -> Iterator[AttackedNode]:
    node = AttackedNode(tmp_path / "home", new_ed25519())
    node.start()
    try:
        yield node
    finally:
        node.stop()


def test_the_bomb_really_expands(kit: MediaKit) -> None:
    """~140 KB on disk; every frame decodes, without an error, to a full 8K picture (53 MB)."""
    bomb = kit.bomb
    assert bomb.file_bytes < 200_000
    assert bomb.decoded_bytes > 100 * 10**9
    argv = ["ffmpeg", "-nostdin", "-v", "error", "-i", str(bomb.path)]
    done = subprocess.run(
        [*argv, "-frames:v", str(BOMB_FRAMES_DECODED), "-f", "framemd5", "-"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert done.stderr == ""  # not one decoding complaint
    frames = [line.split(",") for line in done.stdout.splitlines() if not line.startswith("#")]
    assert len(frames) == BOMB_FRAMES_DECODED
    assert {int(f[4]) for f in frames} == {bomb.width * bomb.height * 3 // 2}


@pytest.mark.parametrize(
    ("sandbox_code", "details", "refusal"),
    [
        ("oom_killed", {"memory_mb": 256}, "input_probe_memory"),
        ("timeout", {"timeout_seconds": 60}, "input_probe_timeout"),
        ("output_cap_exceeded", {}, "input_not_media"),
        (
            "nonzero_exit",
            {"stderr_tail": "[hls @ 0x55d0] Format not on whitelist 'mov'"},
            "input_format_not_allowed",
        ),
        ("nonzero_exit", {"stderr_tail": "moov atom not found /etc/passwd"}, "input_not_media"),
    ],
)
def test_a_probe_stopped_by_its_sandbox_refuses_the_input(
    sandbox_code: str, details: dict[str, object], refusal: str
) -> None:
    refused = sandboxed_probe_refusal(ExecutionError(sandbox_code, "stopped", details=details))
    assert (refused.code, refused.domain, status_of(refused), refused.retryable) == (
        refusal,
        "validation",
        422,
        False,
    )
    assert "/etc/passwd" not in str(refused.to_dict())  # nothing of the file's own words comes back


def test_the_nodes_own_failures_stay_its_own() -> None:
    down = ExecutionError("docker_unavailable", "the engine does not answer", retryable=True)
    assert sandboxed_probe_refusal(down) is down


async def test_a_frame_too_deep_to_probe_is_refused_not_a_500(attacked: AttackedNode, kit: MediaKit) -> None:
    """Regression: an 8K 16-bit PNG (~400 KB) needs ~330 MB to probe; the probe's sandbox kills it at 256 MB.

    That used to surface as ``500 oom_killed`` at quote time (and fail a run in ``execution``): the node
    blamed itself for the input. It is the input's fault, refused like any unprobeable file.
    """
    async with attacked.session() as (session, watch):
        cid = await attacked.upload(session, kit.deep.read_bytes())
        for route in ("/v1/quotes", "/v1/jobs"):
            answer = await attacked.post_signed(session, route, transcode_envelope("deep", cid), limit=60)
            assert answer.well_formed_refusal(), answer
            assert answer.status == 422 and answer.error is not None
            assert (answer.error["code"], answer.error["domain"]) == ("input_probe_memory", "validation")
            assert answer.seconds < QUOTE_BOUND_SECONDS
        async with session.get(f"{attacked.url}/v1/jobs/{node_job_id(attacked.signer.did, 'deep')}") as r:
            assert r.status == 404  # refused before anything was recorded
    assert watch.prompt, watch.summary()


async def test_oom_timeout_and_output_cap_end_as_distinct_failures(
    attacked: AttackedNode, kit: MediaKit
) -> None:
    tally = await resource_round(attacked, kit, 0)
    assert tally.problems == []
    assert {code: tally.good[code] for code in ("oom_killed", "timeout", "output_cap_exceeded")} == {
        "oom_killed": 1,
        "timeout": 1,
        "output_cap_exceeded": 1,
    }
    assert tally.good["healthz_answers"] > 0
