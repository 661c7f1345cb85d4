"""The house's floors hold: import-linter's contracts (``make lint``) pass on the tree, cover every private
module, and break when an upward import is added."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"
PACKAGES = (
    "cli",
    "node",
    "requester",
    "validator",
    "cluster",
    "provider",
    "payments",
    "storage",
    "sandbox",
    "core",
)


def _contracts() -> dict[str, dict[str, object]]:
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]
    return {c["id"]: c for c in config["contracts"]}


def _lint(root: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache"],
        cwd=root,
        env={"PATH": str(LINT_IMPORTS.parent), "PYTHONPATH": str(root)},
        capture_output=True,
        text=True,
        timeout=300,
    )


GUARDED = ("storage", "sandbox", "cluster")  # packages with private modules, each under a contract


def test_every_private_module_is_in_a_contract() -> None:
    contracts = _contracts()
    for package in GUARDED:
        private = {
            f"{package}.{p.stem}" for p in (REPO / package).glob("_*.py") if not p.stem.startswith("__")
        }
        listed = set(contracts[f"private-{package}"]["forbidden_modules"])  # type: ignore[arg-type]
        assert listed == private, f"pyproject.toml's private-{package} contract must list {sorted(private)}"
    for package in PACKAGES:
        if package in GUARDED:
            continue
        underscored = [p.name for p in (REPO / package).rglob("_*.py") if not p.name.startswith("__")]
        assert not underscored, f"{package} has private modules no contract guards: {underscored}"


def test_the_layers_name_every_package() -> None:
    layers = _contracts()["floors"]["layers"]
    named = {name.strip() for layer in layers for name in str(layer).split("|")}  # type: ignore[union-attr]
    assert named == set(PACKAGES)


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the packages and pyproject.toml, to break on purpose."""
    root = tmp_path_factory.mktemp("house")
    for package in PACKAGES:
        shutil.copytree(REPO / package, root / package, ignore=shutil.ignore_patterns("__pycache__", "ui"))
    shutil.copy(REPO / "pyproject.toml", root / "pyproject.toml")
    return root


def test_the_contracts_hold_on_the_tree(tree: Path) -> None:
    done = _lint(tree)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "0 broken" in done.stdout and "BROKEN" not in done.stdout


@pytest.mark.parametrize(
    ("victim", "line", "broken"),
    [
        ("provider/policy.py", "import node.daemon", "Floors"),  # a middle floor importing a roof
        ("core/lifecycle.py", "import payments.keys", "Floors"),  # the ground importing a floor
        ("storage/_cid.py", "import sandbox.runner", "Floors"),  # sideways on one floor
        ("node/metrics.py", "import validator", "Floors"),  # sideways between roofs
        ("payments/jwt.py", "import storage._car", "Storage's private modules"),
    ],
)
def test_an_upward_sideways_or_private_import_breaks_the_lint(
    tree: Path, victim: str, line: str, broken: str
) -> None:
    path = tree / victim
    original = path.read_text()
    path.write_text(original + f"\n{line}  # noqa\n")
    try:
        done = _lint(tree)
    finally:
        path.write_text(original)
    assert done.returncode != 0, done.stdout[-2000:]
    assert broken in done.stdout and "BROKEN" in done.stdout
