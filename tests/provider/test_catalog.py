"""The model catalog: hashing weights directories, verifying them at start, refusing envelopes it cannot run,
and counting prompt tokens with the real tokenizer and chat template of the tiny test model.

Whatever a test changes it changes in a copy of the model (:func:`copy_model`): the session's tiny model is
shared with every other test.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from core.config import ModelSection
from core.envelope import VllmBatchEnvelope, parse_envelope
from core.errors import ConfigError, PolicyError, RequestError
from node.http_errors import status_of
from provider.catalog import (
    CatalogModel,
    ChatTokenizer,
    ModelCatalog,
    check_readable,
    hash_model_dir,
    read_max_context,
)
from provider.testmodel import build_test_model
from sandbox.vllm import cpu_memory_needed_mb
from tests.conftest import REPO, TinyModel, make_envelope

MODEL = "tiny-llama"
RATES = {"input_1k_tokens": "0.0002", "output_1k_tokens": "0.0006"}


def copy_model(src: Path, dest: Path) -> Path:
    """A plain copy of a model directory, world-readable as ``build_test_model`` leaves its own."""
    dest.mkdir(parents=True)
    for path in src.iterdir():
        shutil.copyfile(path, dest / path.name)
        (dest / path.name).chmod(0o644)
    return dest


def flip_a_byte(path: Path, offset: int = -1) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def entry_for(model: TinyModel, **fields: Any) -> ModelSection:
    return ModelSection(
        **({"name": MODEL, "path": str(model.path), "cid": model.cid, "max_context": 2048} | fields)
    )


def model_size(model: TinyModel) -> int:
    return sum(p.stat().st_size for p in model.path.iterdir())


def catalog_model(model: TinyModel, **fields: Any) -> CatalogModel:
    """The tiny model as the catalog holds it (its entry changed by ``fields``), without hashing it again."""
    return CatalogModel(entry=entry_for(model, **fields), path=model.path, size_bytes=model_size(model))


def catalog_of(model: TinyModel, *, node_gpu_mb: int = 0, **fields: Any) -> ModelCatalog:
    """A catalog of the tiny model alone, on a node whose GPUs have ``node_gpu_mb`` (0: unknown or none)."""
    return ModelCatalog([catalog_model(model, **fields)], gpu_memory_mb=node_gpu_mb)


def batch_env(*, model: str = MODEL, max_tokens: int = 16, **limits: Any) -> VllmBatchEnvelope:
    env = parse_envelope(
        make_envelope(
            "batch-1",
            kind="vllm_batch",
            output_spec={
                "format": "openai_batch_jsonl",
                "model": model,
                "max_tokens": max_tokens,
                "max_requests": 10,
            },
            limits={"timeout_seconds": 600, "max_output_mb": 10, "cpus": 2, "memory_mb": 4096, "gpus": 0}
            | limits,
            validation={"all_answered": True},
        )
    )
    assert isinstance(env, VllmBatchEnvelope)
    return env


# ------------------------------------------------------------------------------------------ hashing


def test_hash_is_a_cid_of_every_byte(tiny_model: TinyModel, tmp_path: Path) -> None:
    cid, size = hash_model_dir(tiny_model.path)
    assert cid == tiny_model.cid and cid.startswith("bafy")
    assert size == model_size(tiny_model)
    twin = copy_model(tiny_model.path, tmp_path / "twin")
    assert hash_model_dir(twin) == (cid, size)  # where the directory lives does not matter
    flip_a_byte(twin / "model.safetensors")
    changed, changed_size = hash_model_dir(twin)
    assert changed != cid and changed.startswith("bafy")
    assert changed_size == size


def test_a_renamed_file_changes_the_hash(tiny_model: TinyModel, tmp_path: Path) -> None:
    twin = copy_model(tiny_model.path, tmp_path / "twin")
    (twin / "chat_template.jinja").rename(twin / "template.jinja")
    assert hash_model_dir(twin)[0] != tiny_model.cid


def test_a_symlink_inside_makes_the_directory_unusable(tiny_model: TinyModel, tmp_path: Path) -> None:
    twin = copy_model(tiny_model.path, tmp_path / "twin")
    (twin / "extra.json").symlink_to(twin / "config.json")
    with pytest.raises(ConfigError) as info:
        hash_model_dir(twin)
    assert info.value.code == "model_dir_unusable"
    assert info.value.details["path"] == str(twin)
    assert "cause" in info.value.details


@pytest.mark.parametrize("kind", ["missing", "file"])
def test_what_is_not_a_directory_is_unusable(tmp_path: Path, kind: str) -> None:
    target = tmp_path / "weights"
    if kind == "file":
        target.write_bytes(b"not a directory")
    with pytest.raises(ConfigError) as info:
        hash_model_dir(target)
    assert info.value.code == "model_dir_unusable"
    assert info.value.details == {"path": str(target)}


def test_the_test_model_is_built_deterministically(tiny_model: TinyModel, tmp_path: Path) -> None:
    again = build_test_model(tmp_path / "again")
    assert hash_model_dir(again)[0] == tiny_model.cid
    assert sorted(p.name for p in again.iterdir()) == sorted(p.name for p in tiny_model.path.iterdir())
    assert all((p.stat().st_mode & 0o777) == 0o644 for p in again.iterdir())
    other_seed = build_test_model(tmp_path / "seed-1", seed=1)
    assert hash_model_dir(other_seed)[0] != tiny_model.cid  # the seed draws the weights


# ------------------------------------------------------------------------------ readable, max_context


def test_check_readable_accepts_the_built_model(tiny_model: TinyModel) -> None:
    check_readable(tiny_model.path)


def test_a_private_file_is_not_readable_by_the_sandbox(tiny_model: TinyModel, tmp_path: Path) -> None:
    twin = copy_model(tiny_model.path, tmp_path / "twin")
    (twin / "model.safetensors").chmod(0o600)
    with pytest.raises(ConfigError) as info:
        check_readable(twin)
    assert info.value.code == "model_not_readable"
    assert info.value.details == {"path": str(twin / "model.safetensors")}


def test_a_closed_subdirectory_is_not_readable_by_the_sandbox(tiny_model: TinyModel, tmp_path: Path) -> None:
    twin = copy_model(tiny_model.path, tmp_path / "twin")
    sub = twin / "extra"
    sub.mkdir()
    (sub / "notes.txt").write_text("x")
    (sub / "notes.txt").chmod(0o644)
    sub.chmod(0o744)  # readable but not searchable by others
    with pytest.raises(ConfigError) as info:
        check_readable(twin)
    assert info.value.code == "model_not_readable"
    assert info.value.details == {"path": str(sub)}
    sub.chmod(0o755)
    check_readable(twin)


def test_read_max_context(tiny_model: TinyModel, tmp_path: Path) -> None:
    assert read_max_context(tiny_model.path) == 2048
    assert read_max_context(tmp_path) is None  # no config.json
    cases: list[tuple[Any, int | None]] = [
        ({"n_positions": 1024}, 1024),
        ({"max_position_embeddings": 4096, "n_positions": 1024}, 4096),  # the first key found wins
        ({"max_position_embeddings": True, "seq_length": 512}, 512),  # a bool is no length
        ({"max_position_embeddings": 0}, None),
        ({"max_position_embeddings": "2048"}, None),
        ([2048], None),
    ]
    for config, expected in cases:
        (tmp_path / "config.json").write_text(json.dumps(config))
        assert read_max_context(tmp_path) == expected, config
    (tmp_path / "config.json").write_text("{not json")
    assert read_max_context(tmp_path) is None


# ------------------------------------------------------------------------------------------- verify


def test_verify_builds_the_catalog(tiny_model: TinyModel) -> None:
    catalog = ModelCatalog.verify(Path("/nonexistent-home"), [entry_for(tiny_model)])
    assert len(catalog) == 1 and catalog.names == [MODEL]
    model = catalog.get(MODEL)
    assert model.path == tiny_model.path
    assert model.size_bytes == model_size(tiny_model)
    assert model.min_memory_mb == cpu_memory_needed_mb(model.size_bytes)
    assert catalog.context_of(MODEL) == 2048


def test_verify_resolves_a_relative_path_under_the_home(tiny_model: TinyModel, tmp_path: Path) -> None:
    copy_model(tiny_model.path, tmp_path / "models" / "tiny")
    catalog = ModelCatalog.verify(tmp_path, [entry_for(tiny_model, path="models/tiny")])
    assert catalog.get(MODEL).path == tmp_path / "models" / "tiny"


def test_verify_refuses_changed_weights(tiny_model: TinyModel, tmp_path: Path) -> None:
    twin = copy_model(tiny_model.path, tmp_path / "twin")
    flip_a_byte(twin / "model.safetensors", offset=len((twin / "model.safetensors").read_bytes()) // 2)
    with pytest.raises(ConfigError) as info:
        ModelCatalog.verify(tmp_path, [entry_for(tiny_model, path=str(twin))])
    err = info.value
    assert err.code == "model_hash_mismatch"
    assert err.details["model"] == MODEL
    assert err.details["expected"] == tiny_model.cid
    assert err.details["actual"] == hash_model_dir(twin)[0] != tiny_model.cid
    assert err.details["path"] == str(twin)


def test_verify_refuses_weights_the_sandbox_cannot_read(tiny_model: TinyModel, tmp_path: Path) -> None:
    twin = copy_model(tiny_model.path, tmp_path / "twin")
    (twin / "config.json").chmod(0o600)
    with pytest.raises(ConfigError) as info:
        ModelCatalog.verify(tmp_path, [entry_for(tiny_model, path=str(twin))])
    assert info.value.code == "model_not_readable"


# ------------------------------------------------------------------------------------ get and check


def test_an_unknown_model_lists_the_known_ones(tiny_model: TinyModel) -> None:
    catalog = catalog_of(tiny_model)
    with pytest.raises(RequestError) as info:
        catalog.get("gpt-4o")
    err = info.value
    assert (err.code, status_of(err)) == ("unknown_model", 422)
    assert err.details == {"model": "gpt-4o", "known": [MODEL]}
    with pytest.raises(RequestError) as info:
        catalog.check(batch_env(model="gpt-4o"))
    assert info.value.code == "unknown_model"


def test_check_passes_a_batch_the_node_can_run(tiny_model: TinyModel) -> None:
    catalog = catalog_of(tiny_model)
    assert catalog.check(batch_env()).name == MODEL
    # on a GPU the CPU memory floor does not apply
    assert catalog.check(batch_env(memory_mb=512, gpus=1)).name == MODEL


def test_a_gpu_model_needs_a_gpu(tiny_model: TinyModel) -> None:
    catalog = catalog_of(tiny_model, node_gpu_mb=24_000, gpu_memory_mb=16_000)
    with pytest.raises(PolicyError) as info:
        catalog.check(batch_env(gpus=0))
    assert info.value.code == "model_needs_gpu"
    assert info.value.details == {"model": MODEL, "gpu_memory_mb": 16_000}
    assert catalog.check(batch_env(gpus=1)).entry.gpu_memory_mb == 16_000


def test_a_model_larger_than_the_nodes_gpus(tiny_model: TinyModel) -> None:
    catalog = catalog_of(tiny_model, node_gpu_mb=8_000, gpu_memory_mb=16_000)
    with pytest.raises(PolicyError) as info:
        catalog.check(batch_env(gpus=1))
    assert info.value.code == "model_exceeds_gpu_memory"
    assert info.value.details == {"model": MODEL, "gpu_memory_mb": 16_000, "available_mb": 8_000, "gpus": 1}
    # tensor parallel over two such GPUs holds it
    assert catalog.check(batch_env(gpus=2)).name == MODEL


def test_a_cpu_run_needs_room_for_the_model(tiny_model: TinyModel) -> None:
    catalog = catalog_of(tiny_model)
    floor = catalog.get(MODEL).min_memory_mb
    assert catalog.check(batch_env(memory_mb=floor)).name == MODEL
    with pytest.raises(PolicyError) as info:
        catalog.check(batch_env(memory_mb=floor - 1))
    assert info.value.code == "memory_too_small_for_model"
    assert info.value.details == {"model": MODEL, "min_memory_mb": floor, "memory_mb": floor - 1}


def test_max_tokens_must_leave_room_for_a_prompt(tiny_model: TinyModel) -> None:
    catalog = catalog_of(tiny_model, max_context=64)
    assert catalog.check(batch_env(max_tokens=63)).name == MODEL
    with pytest.raises(RequestError) as info:
        catalog.check(batch_env(max_tokens=64))
    err = info.value
    assert (err.code, status_of(err)) == ("max_tokens_exceeds_context", 422)
    assert err.details == {"model": MODEL, "max_tokens": 64, "max_context": 64}


# --------------------------------------------------------------------------------- declared_by, offers


def test_declared_by_compares_whole_entries(tiny_model: TinyModel) -> None:
    catalog = catalog_of(tiny_model)
    assert catalog.declared_by([entry_for(tiny_model)])
    assert not catalog.declared_by([entry_for(tiny_model, max_context=1024)])
    assert not catalog.declared_by([entry_for(tiny_model, input_1k_tokens="1")])
    assert not catalog.declared_by([entry_for(tiny_model), entry_for(tiny_model, name="other")])
    assert not catalog.declared_by([])
    assert ModelCatalog([]).declared_by([])


def test_offers_advertise_each_model_with_its_prices(tiny_model: TinyModel) -> None:
    size = model_size(tiny_model)
    models = [
        catalog_model(tiny_model, name="zeta", input_1k_tokens="0.5"),
        catalog_model(tiny_model, name="alpha", gpu_memory_mb=8000),
    ]
    offers = ModelCatalog(models).offers(RATES)
    assert [o["name"] for o in offers] == ["alpha", "zeta"]  # sorted by name
    alpha, zeta = offers
    assert alpha == {
        "name": "alpha",
        "cid": tiny_model.cid,
        "max_context": 2048,
        "gpu_memory_mb": 8000,
        "runs_on": "gpu",
        "min_memory_mb": cpu_memory_needed_mb(size),
        "size_bytes": size,
        "warm": False,
        "price": RATES,
    }
    assert zeta["runs_on"] == "cpu_or_gpu"
    assert zeta["price"] == {"input_1k_tokens": "0.5", "output_1k_tokens": "0.0006"}


# --------------------------------------------------------------------------------------------- tokens


def test_prompt_tokens_use_the_models_chat_template(tiny_model: TinyModel) -> None:
    catalog = catalog_of(tiny_model)
    short = catalog.prompt_tokens(MODEL, [{"role": "user", "content": "hello world 0"}])
    assert short == 7
    longer = catalog.prompt_tokens(MODEL, [{"role": "user", "content": "hello world 0 hello world"}])
    assert longer > short
    two = catalog.prompt_tokens(
        MODEL, [{"role": "system", "content": "hello"}, {"role": "user", "content": "hello world 0"}]
    )
    assert two > short
    # the same count from a tokenizer loaded on its own: the catalog adds nothing of its own
    alone = ChatTokenizer(tiny_model.path)
    assert alone.prompt_tokens([{"role": "user", "content": "hello world 0"}]) == short
    with pytest.raises(RequestError) as info:
        catalog.prompt_tokens("gpt-4o", [{"role": "user", "content": "hi"}])
    assert info.value.code == "unknown_model"


def test_a_tokenizer_without_a_chat_template_is_refused(tiny_model: TinyModel, tmp_path: Path) -> None:
    twin = copy_model(tiny_model.path, tmp_path / "twin")
    (twin / "chat_template.jinja").unlink()
    config_path = twin / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config.pop("chat_template", None)
    config_path.write_text(json.dumps(config))
    with pytest.raises(ConfigError) as info:
        ChatTokenizer(twin)
    assert info.value.code == "model_has_no_chat_template"
    assert info.value.details == {"path": str(twin)}


def test_a_directory_without_a_tokenizer_is_refused(tiny_model: TinyModel, tmp_path: Path) -> None:
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copyfile(tiny_model.path / "config.json", bare / "config.json")
    with pytest.raises(ConfigError) as info:
        ChatTokenizer(bare)
    assert info.value.code == "model_tokenizer_unusable"
    assert info.value.details == {"path": str(bare)}


# A fresh process: transformers is imported for the first time there, through the catalog, as in the node.
FIRST_USE_PROBE = """
import json, os, sys
from pathlib import Path
before = dict(os.environ)
from core.config import ModelSection
from provider.catalog import ModelCatalog
entry = ModelSection(name="tiny-llama", path=sys.argv[1], cid=sys.argv[2], max_context=2048)
catalog = ModelCatalog.verify(Path("/"), [entry])
tokens = catalog.prompt_tokens("tiny-llama", [{"role": "user", "content": "hello world 0"}])
print(json.dumps({"tokens": tokens, "transformers": "transformers" in sys.modules,
                  "environ_changed": sorted(set(os.environ.items()) ^ set(before.items()))}))
"""


def test_using_the_catalog_leaves_the_environment_as_it_was(tiny_model: TinyModel) -> None:
    """Loading a tokenizer (and with it transformers) sets nothing in ``os.environ`` and prints no torch
    advisory; in this process and in a fresh one where transformers is imported for the first time."""
    before = dict(os.environ)
    catalog_of(tiny_model).prompt_tokens(MODEL, [{"role": "user", "content": "hello world 0"}])
    ChatTokenizer(tiny_model.path)
    assert dict(os.environ) == before

    env = {k: v for k, v in os.environ.items() if not k.startswith("TRANSFORMERS_")}
    done = subprocess.run(
        [sys.executable, "-c", FIRST_USE_PROBE, str(tiny_model.path), tiny_model.cid],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert json.loads(done.stdout) == {"tokens": 7, "transformers": True, "environ_changed": []}
    assert "PyTorch" not in done.stderr, done.stderr
