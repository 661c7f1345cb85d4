"""Envelope models: strict, closed kinds, typed presets; JCS hashing; the idempotency key."""

from __future__ import annotations

import copy
import hashlib
import json

import pytest
import rfc8785
from hypothesis import given, settings
from hypothesis import strategies as st

from core.envelope import (
    canonical_json,
    envelope_dict,
    envelope_digests,
    envelope_hash,
    idempotency_key,
    node_job_id,
    parse_envelope,
)
from core.errors import RequestError
from node.http_errors import status_of
from tests.conftest import make_envelope


def problems(data: object) -> list[dict[str, str]]:
    with pytest.raises(RequestError) as exc:
        parse_envelope(data)
    assert exc.value.code == "invalid_envelope"
    assert status_of(exc.value) == 422
    result: list[dict[str, str]] = exc.value.details["problems"]
    return result


def test_valid_envelopes_of_both_kinds() -> None:
    ff = parse_envelope(make_envelope())
    assert ff.kind == "ffmpeg_transcode" and ff.output_spec.format == "mp4"
    batch = make_envelope(kind="vllm_batch", output_spec={"model": "tiny-llama", "max_tokens": 64})
    vb = parse_envelope(batch)
    assert vb.kind == "vllm_batch" and vb.output_spec.model == "tiny-llama"


@pytest.mark.parametrize(
    "spec",
    [
        {"format": "hls", "renditions": ["360p", "720p"], "segment_seconds": 4},
        {"format": "thumbnails", "timestamps": [0, 1.5, 10]},
        {"format": "audio", "audio_codec": "mp3", "clip": {"start_seconds": 5, "duration_seconds": 10}},
        {"format": "mp4", "resolution": "1080p", "clip": {"start_seconds": 0, "duration_seconds": 30}},
    ],
)
def test_typed_presets(spec: dict[str, object]) -> None:
    assert parse_envelope(make_envelope(output_spec=spec)).output_spec.format == spec["format"]


@pytest.mark.parametrize(
    ("mutate", "loc"),
    [
        (lambda e: e.update(kind="shell"), "kind"),
        (lambda e: e["output_spec"].update(args=["-i", "/etc/passwd"]), "output_spec.mp4.args"),
        (lambda e: e["output_spec"].update(resolution="8k"), "output_spec.mp4.resolution"),
        (lambda e: e["limits"].update(cpus="2"), "limits.cpus"),
        (lambda e: e["payment"].update(max_price="2.5e3"), "payment.max_price"),
        (lambda e: e["payment"].update(max_price=2.5), "payment.max_price"),
        (lambda e: e["payment"].update(escrow="0x12"), "payment.escrow"),
        (lambda e: e.update(input_uri="file:///etc/passwd"), "input_uri"),
        (lambda e: e.update(job_id="../x"), "job_id"),
        (lambda e: e.update(unknown=1), "unknown"),
        (lambda e: e.update(input_uri="https://example.org/a.mp4"), ""),
        (
            lambda e: e["output_spec"].update(format="hls", renditions=["720p", "720p"]),
            "output_spec.hls.renditions",
        ),
    ],
)
def test_invalid_envelopes_name_the_field(mutate: object, loc: str) -> None:
    env = make_envelope()
    mutate(env)  # type: ignore[operator]
    locs = [p["loc"] for p in problems(env)]
    assert any(loc in got for got in locs), locs


def test_not_an_object() -> None:
    assert problems([1, 2, 3])
    assert problems(None)


def test_envelope_hash_is_sha256_of_jcs() -> None:
    env = parse_envelope(make_envelope())
    data = env.model_dump(mode="json")
    expected = hashlib.sha256(canonical_json(data)).hexdigest()
    assert envelope_hash(env) == expected
    # JCS: sorted keys, no whitespace, independent of input key order
    shuffled = json.loads(json.dumps(make_envelope(), sort_keys=True))
    assert envelope_hash(parse_envelope(dict(reversed(list(shuffled.items()))))) == expected
    assert canonical_json({"b": 1, "a": [1.0, "é"]}) == '{"a":[1,"é"],"b":1}'.encode()


def test_idempotency_key_covers_exactly_iss_job_kind_input_output() -> None:
    base = parse_envelope(make_envelope())
    key = idempotency_key("did:key:z6MkA", base)
    assert len(key) == 64
    other_payment = make_envelope(max_price="9.99")
    assert idempotency_key("did:key:z6MkA", parse_envelope(other_payment)) == key
    other_limits = make_envelope(limits={"cpus": 2})
    assert idempotency_key("did:key:z6MkA", parse_envelope(other_limits)) == key
    assert idempotency_key("did:key:z6MkB", base) != key
    changed = copy.deepcopy(make_envelope())
    changed["output_spec"]["resolution"] = "1080p"
    assert idempotency_key("did:key:z6MkA", parse_envelope(changed)) != key
    changed = make_envelope(input_uri="ipfs://bafybeihdwdcefgh4dqkjv67uzcmw7ojee6xedzdetojuzjevtenxquvyku")
    assert idempotency_key("did:key:z6MkA", parse_envelope(changed)) != key


def test_node_job_id_is_stable_and_per_requester() -> None:
    a = node_job_id("did:key:z6MkA", "clip-1")
    assert a == node_job_id("did:key:z6MkA", "clip-1")
    assert a != node_job_id("did:key:z6MkB", "clip-1")
    assert a.startswith("hj_") and len(a) == 29


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**53) + 1, 2**53 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4)
    ),
    max_leaves=20,
)


@given(json_values)
@settings(max_examples=400, deadline=None)
def test_canonical_json_fast_path_equals_rfc8785(value: object) -> None:
    assert canonical_json(value) == rfc8785.dumps(value)


@pytest.mark.parametrize(
    "value",
    [
        1e-7,
        1e16,
        1e21,
        123.0,
        9007199254740994.0,
        2.0**60,
        -0.0,
        2**53 - 1,
        -(2**53) + 1,
        {"é": 1, "z": 2},
        {"\U0001f600": 1, "\ue000": 2},
    ],
)
def test_canonical_json_edge_values(value: object) -> None:
    assert canonical_json(value) == rfc8785.dumps(value)


@pytest.mark.parametrize(
    "doc",
    [
        envelope_dict(parse_envelope(make_envelope())),
        {**envelope_dict(parse_envelope(make_envelope())), "job_id": "ünïcode-é"},
        # not on the fast path (a float JCS writes with an exponent): the reference implementation
        {**envelope_dict(parse_envelope(make_envelope())), "output_spec": {"scale": 1e-9}},
    ],
)
def test_envelope_digests_are_the_hash_and_the_idempotency_key(doc: dict[str, object]) -> None:
    iss = "did:key:z6MkA"
    assert envelope_digests(iss, doc) == (envelope_hash(doc), idempotency_key(iss, doc))
