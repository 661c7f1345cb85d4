"""``hearth models add|list``: the catalog in node.toml, written and verified through the CLI's ``main``.

Every test registers its own copy of the tiny test model, so that changing its bytes (to see verification
fail) never touches the session's model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from cli.main import main
from core.config import ModelSection, load_config
from tests.conftest import TinyModel
from tests.provider.test_catalog import copy_model, flip_a_byte

OPERATOR_NOTE = "# operator's note: keep this line\n"


@dataclass
class Hearth:
    """Runs ``hearth ... --json`` in-process; hands back the exit code and the JSON it printed."""

    capsys: pytest.CaptureFixture[str]

    def __call__(self, *args: str) -> tuple[int, Any]:
        self.capsys.readouterr()  # only this command's output
        code = main([*args, "--json"])
        return code, json.loads(self.capsys.readouterr().out)


@pytest.fixture
def hearth(capsys: pytest.CaptureFixture[str]) -> Hearth:
    return Hearth(capsys)


@pytest.fixture
def home(hearth: Hearth, tmp_path: Path) -> Path:
    """A home made by ``hearth init``, with a line of the operator's own added to its node.toml."""
    path = tmp_path / "home"
    code, _ = hearth("init", "--home", str(path))
    assert code == 0
    config = path / "node.toml"
    config.write_text(OPERATOR_NOTE + config.read_text())
    return path


@pytest.fixture
def weights(tiny_model: TinyModel, tmp_path: Path) -> Path:
    """This test's own copy of the tiny model, free to change."""
    return copy_model(tiny_model.path, tmp_path / "weights" / "tiny-llama")


def test_add_writes_an_entry_the_node_reads(
    hearth: Hearth, home: Path, weights: Path, tiny_model: TinyModel
) -> None:
    before = (home / "node.toml").read_text()
    code, report = hearth("models", "add", str(weights), "--name", "tiny", "--home", str(home))
    assert code == 0, report
    expected = ModelSection(name="tiny", path=str(weights.resolve()), cid=tiny_model.cid, max_context=2048)
    assert ModelSection(**report["model"]) == expected  # what it wrote; the keys left out at their defaults
    assert report["size_bytes"] == sum(p.stat().st_size for p in weights.iterdir())
    assert report["config"] == str(home / "node.toml")
    assert load_config(home).models == [expected]
    after = (home / "node.toml").read_text()
    assert after.startswith(before)  # every line of the operator's file kept, comments included
    code, report = hearth("models", "add", str(weights), "--name", "tiny-warm", "--warm", "--home", str(home))
    assert code == 0 and report["model"]["warm"] is True, report
    assert [m.warm for m in load_config(home).models] == [False, True]
    assert OPERATOR_NOTE in after and "[[models]]" in after[len(before) :]


def test_add_takes_the_directorys_name_and_the_given_settings(
    hearth: Hearth, home: Path, weights: Path
) -> None:
    code, report = hearth(
        "models", "add", str(weights), "--home", str(home), "--max-context", "1024",
        "--gpu-memory-mb", "4000", "--dtype", "float16",
        "--input-1k-tokens", "0.5", "--output-1k-tokens", "2",
    )  # fmt: skip
    assert code == 0, report
    [entry] = load_config(home).models
    assert entry.name == "tiny-llama"  # the directory's name
    assert (entry.max_context, entry.gpu_memory_mb, entry.dtype) == (1024, 4000, "float16")
    assert (entry.input_1k_tokens, entry.output_1k_tokens) == ("0.5", "2")


def test_add_without_init_writes_a_new_node_toml(hearth: Hearth, tmp_path: Path, weights: Path) -> None:
    home = tmp_path / "fresh"
    code, _ = hearth("models", "add", str(weights), "--name", "tiny", "--home", str(home))
    assert code == 0
    assert [m.name for m in load_config(home).models] == ["tiny"]


def test_a_name_is_added_once_unless_replaced(hearth: Hearth, home: Path, weights: Path) -> None:
    add = ("models", "add", str(weights), "--home", str(home))
    assert hearth(*add, "--name", "tiny")[0] == 0
    assert hearth(*add, "--name", "second")[0] == 0
    written = (home / "node.toml").read_text()

    code, report = hearth(*add, "--name", "tiny", "--max-context", "512")
    assert code == 2
    assert report["error"]["code"] == "model_exists"
    assert report["error"]["details"] == {"name": "tiny"}
    assert (home / "node.toml").read_text() == written  # a refusal writes nothing

    code, report = hearth(*add, "--name", "tiny", "--max-context", "512", "--replace")
    assert code == 0, report
    models = load_config(home).models
    assert [(m.name, m.max_context) for m in models] == [("tiny", 512), ("second", 2048)]  # in place
    assert OPERATOR_NOTE in (home / "node.toml").read_text()


@pytest.mark.parametrize("name", [" bad", "-lead", "has space", "x" * 129])
def test_an_invalid_name_is_refused(hearth: Hearth, home: Path, weights: Path, name: str) -> None:
    written = (home / "node.toml").read_text()
    code, report = hearth("models", "add", str(weights), f"--name={name}", "--home", str(home))
    assert code == 2
    assert report["error"]["code"] == "invalid_model_name"
    assert report["error"]["details"] == {"name": name}
    assert (home / "node.toml").read_text() == written


def test_a_directory_name_that_is_no_model_name_needs_name(
    hearth: Hearth, home: Path, tiny_model: TinyModel, tmp_path: Path
) -> None:
    spaced = copy_model(tiny_model.path, tmp_path / "my weights")
    code, report = hearth("models", "add", str(spaced), "--home", str(home))
    assert code == 2
    assert report["error"]["code"] == "invalid_model_name"
    assert report["error"]["details"] == {"name": "my weights"}


def test_weights_the_sandbox_cannot_read_are_refused(hearth: Hearth, home: Path, weights: Path) -> None:
    (weights / "model.safetensors").chmod(0o600)
    code, report = hearth("models", "add", str(weights), "--name", "tiny", "--home", str(home))
    assert code == 2
    assert report["error"]["code"] == "model_not_readable"
    assert load_config(home).models == []


@pytest.mark.parametrize("case", ["missing", "dangling_symlink"])
def test_a_folder_that_is_not_plain_weights_is_refused_first(
    hearth: Hearth, home: Path, weights: Path, case: str
) -> None:
    target = weights.parent / "nowhere" if case == "missing" else weights
    if case == "dangling_symlink":
        (weights / "extra.bin").symlink_to(weights / "gone.bin")
    code, report = hearth("models", "add", str(target), "--name", "tiny", "--home", str(home))
    assert code == 2
    assert report["error"]["code"] == "model_dir_unusable"
    assert load_config(home).models == []


def test_list_verifies_every_model_again(
    hearth: Hearth, home: Path, weights: Path, tiny_model: TinyModel
) -> None:
    assert hearth("models", "add", str(weights), "--name", "tiny", "--home", str(home))[0] == 0

    code, listed = hearth("models", "list", "--home", str(home))
    assert code == 0
    [row] = listed["models"]
    assert (row["name"], row["cid"], row["max_context"]) == ("tiny", tiny_model.cid, 2048)
    assert "verified" not in row  # only --verify hashes

    code, listed = hearth("models", "list", "--verify", "--home", str(home))
    assert code == 0
    [row] = listed["models"]
    assert (row["verified"], row["problem"]) == (True, None)

    flip_a_byte(weights / "model.safetensors")
    code, listed = hearth("models", "list", "--verify", "--home", str(home))
    assert code == 1
    [row] = listed["models"]
    assert row["verified"] is False
    assert row["problem"].startswith("model_hash_mismatch: ")
    assert tiny_model.cid in row["problem"]


def test_list_of_an_empty_catalog(hearth: Hearth, home: Path) -> None:
    assert hearth("models", "list", "--verify", "--home", str(home)) == (0, {"models": []})


def test_add_and_list_use_the_services_config_file_with_config(
    hearth: Hearth, home: Path, weights: Path, tmp_path: Path
) -> None:
    # A node installed as a service reads /etc/hearth/node.toml; its home holds state, not the config.
    etc = tmp_path / "etc" / "hearth"
    etc.mkdir(parents=True)
    config = etc / "node.toml"
    config.write_text((home / "node.toml").read_text())
    untouched = (home / "node.toml").read_text()
    code, report = hearth(
        "models", "add", str(weights), "--name", "tiny", "--home", str(home), "--config", str(config)
    )
    assert code == 0, report
    assert report["config"] == str(config)
    assert [m.name for m in load_config(home, path=config).models] == ["tiny"]
    assert (home / "node.toml").read_text() == untouched  # the home's file was not the one to change
    code, listed = hearth("models", "list", "--verify", "--home", str(home), "--config", str(config))
    assert code == 0
    assert [(r["name"], r["verified"]) for r in listed["models"]] == [("tiny", True)]
    assert hearth("models", "list", "--home", str(home)) == (0, {"models": []})
