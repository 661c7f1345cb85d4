"""What a worker streams back is untrusted at the head: hostile items end the run with a structured error.

These drive the head's side of one run (``cluster._runner``) with items a broken or hostile worker could
send, without a cluster: the real stream is exercised end to end in test_cluster_e2e.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from cluster._runner import _rebuilt, _Run
from core.errors import ExecutionError, HearthError, OutputValidationError, StorageError
from sandbox.runner import RunSpec
from storage import Blockstore, import_bytes, iter_car


class Counts:
    """The cluster's bookkeeping of runs per worker, as _Run reports to it."""

    def __init__(self) -> None:
        self.started: list[str] = []
        self.ended: list[str] = []

    def run_started(self, node_id: str) -> None:
        self.started.append(node_id)

    def run_ended(self, node_id: str) -> None:
        self.ended.append(node_id)


def spec(tmp_path: Path, **overrides: Any) -> RunSpec:
    fields: dict[str, Any] = {
        "image": "sha256:" + "0" * 64,
        "argv": ("ffmpeg",),
        "job_id": "hj_test",
        "output_dir": tmp_path / "attempt" / "out",
        "cpus": 1.0,
        "memory_mb": 256,
        "timeout_seconds": 60,
        "max_output_bytes": 10_000,
    }
    (tmp_path / "attempt").mkdir(exist_ok=True)
    return RunSpec(**(fields | overrides))


PLACED = {"type": "placed", "worker": "w1", "node_id": "n1"}


async def test_a_good_stream_gives_the_result_and_the_output_folder(tmp_path: Path) -> None:
    counts = Counts()
    run = _Run(spec(tmp_path), counts)  # type: ignore[arg-type]
    worker = Blockstore.open(tmp_path / "worker")
    root = import_bytes(b"the artifact", worker).cid
    run.placed(PLACED, None)
    await run.take({"type": "root", "cid": str(root)}, None, None)
    for piece in iter_car(worker, root):
        await run.take({"type": "car", "data": piece}, None, None)
    done = {"exit_code": 0, "wall_seconds": 1.5, "output_bytes": 12, "container_id": "c", "image_id": "i"}
    await run.take({"type": "done", "result": done | {"stderr_tail": ""}}, None, None)
    result = await run.result()
    run.close()
    assert result.worker == "w1" and result.wall_seconds == 1.5
    assert (tmp_path / "attempt" / "out").read_bytes() == b"the artifact"
    assert counts.started == counts.ended == ["n1"]
    assert [p.name for p in (tmp_path / "attempt").iterdir()] == ["out"]  # the run's own store is gone


@pytest.mark.parametrize(
    "items, code",
    [
        ([{"type": "car", "data": b"\x00" * 10}], "unexpected_block"),  # blocks before their root
        ([{"type": "root", "cid": "not-a-cid"}], "invalid_cid"),
        (
            [{"type": "root", "cid": "bafkreigh2akiscaildcqabsyg3dfr6chu3fgpregiymsck7e7aqa4s52zy"}],
            "worker_failed",
        ),
    ],
)
async def test_a_hostile_stream_ends_in_a_structured_error(
    tmp_path: Path, items: list[dict[str, Any]], code: str
) -> None:
    counts = Counts()
    run = _Run(spec(tmp_path), counts)  # type: ignore[arg-type]
    run.placed(PLACED, None)
    with pytest.raises(HearthError) as failed:
        for item in items:
            await run.take(item, None, None)
        await run.result()  # no "done": the task ended without a result
    run.close()
    assert failed.value.code == code
    assert counts.ended == ["n1"]


def test_a_task_that_ends_before_it_says_where_it_runs_is_a_worker_failure(tmp_path: Path) -> None:
    run = _Run(spec(tmp_path), Counts())  # type: ignore[arg-type]
    for first in (None, {"type": "lines", "stdout": ["x"]}, {"type": "placed"} | {"type": "done"}):
        with pytest.raises(ExecutionError) as failed:
            run.placed(first, None)
        assert failed.value.code == "worker_failed" and failed.value.retryable
    # a worker that failed before it could say where it runs says why
    refusal = {"type": "error", "class": "ConfigError", "code": "worker_config_invalid", "message": "m"}
    with pytest.raises(HearthError) as failed:
        run.placed(refusal, None)
    assert failed.value.code == "worker_config_invalid" and failed.value.domain == "config"


@pytest.mark.parametrize(
    "item, cls, domain, retryable",
    [
        (
            {"class": "OutputValidationError", "code": "checks_failed", "message": "m", "retryable": False},
            OutputValidationError,
            "validation",
            False,
        ),
        (
            {
                "class": "StorageError",
                "code": "gateway_unreachable",
                "message": "m",
                "retryable": True,
                "details": {"gateway": "g"},
            },
            StorageError,
            "storage",
            True,
        ),
        (
            {"class": "SystemExit", "code": "x", "message": "m"},
            HearthError,
            "internal",
            False,
        ),  # no such class
        (
            {"class": ["a"], "code": 7, "message": None, "details": "nope", "domain": 3},
            HearthError,
            "internal",
            False,
        ),
        ({}, HearthError, "internal", False),
        (
            {"class": "ExecutionError", "domain": "made-up", "code": "c", "message": "m"},
            ExecutionError,
            "execution",
            False,
        ),
    ],
)
def test_a_worker_s_error_keeps_its_class_domain_and_retryability_and_nothing_else(
    item: dict[str, Any], cls: type[HearthError], domain: str, retryable: bool
) -> None:
    error = _rebuilt(item)
    assert type(error) is cls and error.domain == domain and error.retryable is retryable
    assert isinstance(error.code, str) and isinstance(error.message, str) and isinstance(error.details, dict)
