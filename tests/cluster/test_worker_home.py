"""A worker's home: worker.toml read with its defaults and checked once; ``prepare`` against the real Docker
engine and a real model folder; ``join``'s refusals before anything starts."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest

from cluster.names import MODEL_RESOURCE_UNITS, model_resource, worker_resource
from cluster.worker import (
    WORKER_HOME_ENV,
    WorkerHome,
    default_worker_name,
    join,
    prepare,
    ray_start_command,
)
from core.config import SandboxSection
from core.defaults import DEFAULT_DOCKER_URL
from core.errors import ConfigError
from tests.conftest import TinyModel

FFMPEG = "hearth/ffmpeg:latest"
BASE = "hearth/base:bookworm"


def _write(home: Path, text: str) -> Path:
    home.mkdir(parents=True, exist_ok=True)
    (home / "worker.toml").write_text(text)
    return home


def _refused(code: str, home: Path) -> ConfigError:
    with pytest.raises(ConfigError) as caught:
        WorkerHome.load(home)
    assert caught.value.code == code, caught.value.to_dict()
    assert caught.value.domain == "config"
    return caught.value


def test_a_missing_worker_toml_gives_the_defaults(tmp_path: Path) -> None:
    home = WorkerHome.load(tmp_path / "home")
    assert home.path == tmp_path / "home"
    assert home.name == default_worker_name()
    assert home.docker_url == DEFAULT_DOCKER_URL
    assert home.work_dir == tmp_path / "home" / "work"
    assert dict(home.models) == {}
    assert home.resources() == {worker_resource(home.name): 1.0}


def test_the_home_comes_from_the_environment_and_paths_are_made_absolute(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _write(tmp_path / "from-env", 'name = "box-7"\nwork_dir = "/var/tmp/hearth-work"\n')
    monkeypatch.setenv(WORKER_HOME_ENV, str(tmp_path / "from-env"))
    home = WorkerHome.load()
    assert (home.path, home.name, home.work_dir) == (
        tmp_path / "from-env",
        "box-7",
        Path("/var/tmp/hearth-work"),
    )
    monkeypatch.chdir(tmp_path)
    assert WorkerHome.load(Path("from-env")).path == tmp_path / "from-env"


def test_write_then_load_gives_the_same_worker_and_its_resources(
    tmp_path: Path, tiny_model: TinyModel
) -> None:
    written = WorkerHome.write(
        tmp_path / "home",
        name="box-1",
        docker_url="tcp://10.0.0.2:2375",
        models={tiny_model.cid: tiny_model.path},
    )
    loaded = WorkerHome.load(tmp_path / "home")
    assert loaded == written
    assert loaded.models == {tiny_model.cid: tiny_model.path}
    assert loaded.work_dir == tmp_path / "home" / "work"
    assert 'work_dir = "work"' in loaded.config_path.read_text()  # relative: the home can move
    assert loaded.resources() == {
        worker_resource("box-1"): 1.0,
        model_resource(tiny_model.cid): float(MODEL_RESOURCE_UNITS),
    }


@pytest.mark.parametrize("name", ["", "has space", "a" * 64, "slash/y", "ümlaut"])
def test_a_bad_name_is_refused_by_load_and_by_write(tmp_path: Path, name: str) -> None:
    _write(tmp_path, f"name = {name!r}\n".replace("'", '"'))
    error = _refused("invalid_worker_name" if name else "worker_config_invalid", tmp_path)
    assert error.details["field"] == "name"
    with pytest.raises(ConfigError):
        WorkerHome.write(tmp_path / "w", name=name)
    assert not (tmp_path / "w" / "worker.toml").exists()


def test_bad_toml_unknown_keys_and_wrong_types_are_refused_naming_the_field(tmp_path: Path) -> None:
    error = _refused("worker_config_invalid", _write(tmp_path / "a", 'name = "x\n'))
    assert "not valid TOML" in error.message
    assert (
        _refused("worker_config_invalid", _write(tmp_path / "b", 'nmae = "x"\n')).details["field"] == "nmae"
    )
    assert _refused("worker_config_invalid", _write(tmp_path / "c", "docker_url = 5\n")).details["field"] == (
        "docker_url"
    )
    assert (
        _refused("worker_config_invalid", _write(tmp_path / "d", 'models = "x"\n')).details["field"]
        == "models"
    )


def test_model_entries_must_be_cids_of_existing_absolute_folders(
    tmp_path: Path, tiny_model: TinyModel
) -> None:
    cid = tiny_model.cid
    error = _refused("worker_path_relative", _write(tmp_path / "a", f'[models]\n"{cid}" = "models/tiny"\n'))
    assert error.details["field"] == f"models.{cid}"
    error = _refused("model_dir_missing", _write(tmp_path / "b", f'[models]\n"{cid}" = "{tmp_path}/gone"\n'))
    assert "hearth worker prepare" in error.message
    _refused("invalid_model_cid", _write(tmp_path / "c", f'[models]\n"not-a-cid" = "{tiny_model.path}"\n'))


def test_prepare_hashes_the_model_checks_the_engine_and_writes_worker_toml(
    tmp_path: Path, tiny_model: TinyModel, sandbox_images: dict[str, str]
) -> None:
    report = prepare(tmp_path / "home", name="box-1", models=[tiny_model.path])
    assert report["models"] == [
        {"cid": tiny_model.cid, "path": str(tiny_model.path), "size_bytes": report["models"][0]["size_bytes"]}
    ]
    assert report["images"][FFMPEG] == {"id": sandbox_images[FFMPEG], "present": True, "required": True}
    assert report["images"]["hearth/vllm-cpu:latest"]["present"] is True
    home = WorkerHome.load(tmp_path / "home")
    assert (home.name, dict(home.models)) == ("box-1", {tiny_model.cid: tiny_model.path})
    assert home.work_dir.is_dir()
    assert report["resources"] == home.resources()
    assert str(home.path) in report["join_command"]
    # Again without --model: the name and models stay as they are.
    again = prepare(tmp_path / "home")
    assert again["name"] == "box-1"
    assert [m["cid"] for m in again["models"]] == [tiny_model.cid]


def test_prepare_with_new_models_replaces_a_home_whose_model_folder_is_gone(
    tmp_path: Path, tiny_model: TinyModel, sandbox_images: dict[str, str]
) -> None:
    _write(tmp_path / "home", f'name = "box-3"\n[models]\n"{tiny_model.cid}" = "{tmp_path}/moved-away"\n')
    _refused("model_dir_missing", tmp_path / "home")
    report = prepare(tmp_path / "home", models=[tiny_model.path])
    assert report["name"] == "box-3"
    assert WorkerHome.load(tmp_path / "home").models == {tiny_model.cid: tiny_model.path}


def test_prepare_loads_a_docker_save_archive_keeping_the_image_id(
    tmp_path: Path, sandbox_images: dict[str, str]
) -> None:
    archive = tmp_path / "images.tar"
    subprocess.run(["docker", "save", "-o", str(archive), BASE], check=True, timeout=120)
    report = prepare(tmp_path / "home", name="box-2", images=archive)
    assert [image["id"] for image in report["loaded_images"]] == [sandbox_images[BASE]]
    assert BASE in report["loaded_images"][0]["tags"]


@pytest.mark.parametrize(
    ("kwargs", "code"),
    [
        ({"docker_url": "unix:///nonexistent/docker.sock"}, "docker_unavailable"),
        ({"sandbox": SandboxSection(ffmpeg_image="hearth/not-built:latest")}, "image_missing"),
        ({"images": Path("/nonexistent/images.tar")}, "images_unreadable"),
        ({"name": "no spaces please"}, "invalid_worker_name"),
    ],
)
def test_prepare_refuses_a_machine_that_is_not_ready_and_writes_nothing(
    tmp_path: Path, sandbox_images: dict[str, str], kwargs: dict[str, Any], code: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        prepare(tmp_path / "home", **kwargs)
    assert caught.value.code == code, caught.value.to_dict()
    assert not (tmp_path / "home" / "worker.toml").exists()
    if code == "docker_unavailable":
        assert caught.value.retryable and "start it" in caught.value.message


def test_prepare_refuses_a_model_the_sandbox_user_cannot_read(
    tmp_path: Path, sandbox_images: dict[str, str]
) -> None:
    model = tmp_path / "model"
    model.mkdir(mode=0o755)
    (model / "config.json").write_text("{}")
    (model / "config.json").chmod(0o600)
    with pytest.raises(ConfigError) as caught:
        prepare(tmp_path / "home", models=[model])
    assert caught.value.code == "model_not_readable"


def test_ray_start_command_carries_the_resources_and_limits(tmp_path: Path) -> None:
    home = WorkerHome.write(tmp_path, name="box-1")
    command = ray_start_command(
        home,
        ray=Path("/x/ray"),
        address="10.0.0.1:6379",
        num_cpus=4,
        memory_mb=1024,
        object_store_mb=100,
        block=True,
    )
    assert command == [
        "/x/ray",
        "start",
        "--address",
        "10.0.0.1:6379",
        "--resources",
        '{"hearth-worker:box-1": 1.0}',
        "--disable-usage-stats",
        "--num-cpus",
        "4",
        "--memory",
        str(1024 * 1024 * 1024),
        "--object-store-memory",
        str(100 * 1024 * 1024),
        "--block",
    ]


@pytest.mark.parametrize("address", ["10.0.0.1", "10.0.0.1:0", "10.0.0.1:70000", "a b:1", ""])
def test_join_refuses_an_address_that_is_not_host_and_port(tmp_path: Path, address: str) -> None:
    with pytest.raises(ConfigError) as caught:
        join(tmp_path, address=address)
    assert caught.value.code == "invalid_address"


def test_a_failing_ray_start_is_a_structured_error_with_its_output(
    tmp_path: Path, sandbox_images: dict[str, str]
) -> None:
    fake_ray = tmp_path / "ray"
    fake_ray.write_text('#!/bin/sh\necho "cannot reach $3 (home $HEARTH_WORKER_HOME)"\nexit 3\n')
    fake_ray.chmod(0o755)
    home = WorkerHome.write(tmp_path / "home", name="box-1")
    with pytest.raises(ConfigError) as caught:
        join(home.path, address="127.0.0.1:1", ray_bin=fake_ray)
    error = caught.value
    assert (error.code, error.retryable, error.details["rc"]) == ("ray_start_failed", True, 3)
    assert f"cannot reach 127.0.0.1:1 (home {home.path})" in error.details["output_tail"]
    assert error.details["removed_containers"] == []


def test_join_without_ray_says_so(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        join(tmp_path, address="127.0.0.1:6379", ray_bin=tmp_path / "no-ray")
    assert caught.value.code == "ray_missing"
