"""``hearth worker prepare|join`` through the CLI's ``main``: JSON for machines, lines for people, errors as
every command prints them. (``join`` starting Ray for real runs in tests/cluster/test_devcluster.py.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cli.main import main
from cluster.names import worker_resource
from cluster.worker import WorkerHome
from tests.conftest import TinyModel


def _run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_prepare_json_reports_the_model_images_and_join_command(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, tiny_model: TinyModel, sandbox_images: dict[str, str]
) -> None:
    home = tmp_path / "worker"
    code, out, _ = _run(
        capsys,
        *(
            "worker",
            "prepare",
            "--worker-home",
            str(home),
            "--name",
            "box-1",
            "--model",
            str(tiny_model.path),
        ),
        "--json",
    )
    assert code == 0
    report = json.loads(out)
    assert [m["cid"] for m in report["models"]] == [tiny_model.cid]
    assert report["images"]["hearth/ffmpeg:latest"]["id"] == sandbox_images["hearth/ffmpeg:latest"]
    assert json.loads(report["resources_json"])[worker_resource("box-1")] == 1
    assert report["join_command"].startswith(f"hearth worker join --worker-home {home} --address ")
    assert WorkerHome.load(home).models == {tiny_model.cid: tiny_model.path}


def test_prepare_for_people_says_what_is_ready_and_what_to_run(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, sandbox_images: dict[str, str]
) -> None:
    code, out, _ = _run(capsys, "worker", "prepare", "--worker-home", str(tmp_path), "--name", "box-2")
    assert code == 0
    assert f"worker box-2 is ready: {tmp_path}/worker.toml" in out
    assert "hearth/ffmpeg:latest" in out and sandbox_images["hearth/ffmpeg:latest"] in out
    assert f"hearth worker join --worker-home {tmp_path} --address HEAD:6379" in out


def test_prepare_refusal_is_a_structured_error_with_exit_2(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    args = ("worker", "prepare", "--worker-home", str(tmp_path), "--docker-url", "unix:///nonexistent/d.sock")
    code, out, _ = _run(capsys, *args, "--json")
    assert code == 2
    error = json.loads(out)["error"]
    assert (error["code"], error["domain"], error["retryable"]) == ("docker_unavailable", "config", True)
    code, _, err = _run(capsys, *args)
    assert code == 2
    assert err.startswith(
        "error [config/docker_unavailable]: the Docker engine at unix:///nonexistent/d.sock"
    )


def test_join_refuses_a_bad_address_and_bad_numbers(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    code, out, _ = _run(
        capsys, "worker", "join", "--worker-home", str(tmp_path), "--address", "nohost", "--json"
    )
    assert code == 2
    assert json.loads(out)["error"]["code"] == "invalid_address"
    with pytest.raises(SystemExit) as caught:
        main(["worker", "join", "--address", "10.0.0.1:6379", "--num-cpus", "0"])
    assert caught.value.code == 2
    assert "not a positive whole number" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["worker", "join", "--worker-home", str(tmp_path)])  # --address is required
    assert "--address" in capsys.readouterr().err
