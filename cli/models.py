"""``hearth models add|list``: the operator's commands for the model catalog (see :mod:`provider.catalog`).

``add DIR`` hashes a local weights directory (its UnixFS CID), reads its context length from
``config.json``, checks that the sandbox user can read it and that its tokenizer has a chat template,
and writes a ``[[models]]`` entry into ``node.toml`` (every other line of the file is kept as it is).
``list`` prints the catalog; with ``--verify`` it hashes every directory again, as the node does at
start. Exit codes as the rest of the CLI: 0 done, 1 a model failed verification, 2 bad usage or input.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any

from cli.common import Out
from core.config import CONFIG_FILENAME, MODEL_NAME_PATTERN, ModelSection, load_config, parse_config
from core.errors import ConfigError, HearthError


def add_parser(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser], parents: list[argparse.ArgumentParser]
) -> argparse.ArgumentParser:
    """Add ``models`` to ``hearth``'s subcommands; ``parents`` bring --home, --json and --config."""
    models = subparsers.add_parser("models", help="the model catalog vllm_batch jobs run on")
    sub = models.add_subparsers(dest="models_cmd", required=True)
    p = sub.add_parser("add", parents=parents, help="hash a local model directory and add it to node.toml")
    p.add_argument("dir", type=Path, help="the weights directory (config.json, tokenizer, safetensors)")
    p.add_argument("--name", help="the name envelopes use (default: the directory's name)")
    p.add_argument("--max-context", type=int, help="tokens per request (default: from config.json)")
    p.add_argument("--gpu-memory-mb", type=int, default=0, help="GPU memory it needs; 0: it runs on CPUs too")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto")
    p.add_argument("--input-1k-tokens", help="price per 1k prompt tokens (default: [pricing]'s)")
    p.add_argument("--output-1k-tokens", help="price per 1k completion tokens (default: [pricing]'s)")
    p.add_argument(
        "--warm", action="store_true", help="keep one engine of it running between jobs (warm = true)"
    )
    p.add_argument("--replace", action="store_true", help="replace an entry of the same name")
    p.set_defaults(func=cmd_models_add)
    p = sub.add_parser("list", parents=parents, help="the catalog in node.toml")
    p.add_argument(
        "--verify", action="store_true", help="hash every directory again, as the node does at start"
    )
    p.set_defaults(func=cmd_models_list)
    return models


def cmd_models_add(args: argparse.Namespace, out: Out) -> int:
    from provider.catalog import ChatTokenizer, check_readable, hash_model_dir, read_max_context

    directory: Path = args.dir.resolve()
    check_readable(directory)  # first: a missing folder or a symlink inside is the clearest refusal
    name = args.name or directory.name
    if not re.fullmatch(MODEL_NAME_PATTERN, name):
        raise ConfigError(
            "invalid_model_name",
            f"{name!r} is not a model name (letters, digits and ._/- ; give --name)",
            details={"name": name},
        )
    max_context = args.max_context or read_max_context(directory)
    if max_context is None:
        raise ConfigError(
            "max_context_unknown",
            f"{directory}/config.json declares no context length; give --max-context",
            details={"path": str(directory)},
        )
    ChatTokenizer(directory)  # a model whose tokenizer cannot build chat prompts is refused now
    cid, size = hash_model_dir(directory)
    entry: dict[str, Any] = {
        "name": name,
        "path": str(directory),
        "cid": cid,
        "max_context": max_context,
        "gpu_memory_mb": args.gpu_memory_mb,
        "dtype": args.dtype,
    }
    for key in ("input_1k_tokens", "output_1k_tokens"):
        if getattr(args, key) is not None:
            entry[key] = getattr(args, key)
    if args.warm:
        entry["warm"] = True
    path = _write_entry(args.config or args.home / CONFIG_FILENAME, entry, replace=args.replace)
    report = {"model": entry, "size_bytes": size, "config": str(path)}

    def human() -> None:
        print(f"model {name}: {cid} ({size / 1e6:.1f} MB, context {max_context})")
        print(f"  added to {path}; restart the node (or start it) to offer it")

    out.emit(report, human)
    return 0


def cmd_models_list(args: argparse.Namespace, out: Out) -> int:
    cfg = load_config(args.home, path=args.config)
    rows: list[dict[str, Any]] = []
    failed = False
    for entry in cfg.models:
        row: dict[str, Any] = entry.model_dump(exclude_none=True)
        if args.verify:
            row["verified"], row["problem"] = _verify(args.home, entry)
            failed = failed or not row["verified"]
        rows.append(row)

    def human() -> None:
        if not rows:
            where = args.config or args.home / CONFIG_FILENAME
            print(f"no models in {where}; add one with `hearth models add DIR`")
        for row in rows:
            state = (
                ""
                if "verified" not in row
                else ("  ok" if row["verified"] else f"  FAILED: {row['problem']}")
            )
            print(f"{row['name']:24} {row['cid']}  context {row['max_context']:>7}  {row['path']}{state}")

    out.emit({"models": rows}, human)
    return 1 if failed else 0


def _verify(home: Path, entry: ModelSection) -> tuple[bool, str | None]:
    from provider.catalog import ModelCatalog

    try:
        ModelCatalog.verify(home, [entry])
    except HearthError as exc:
        return False, f"{exc.code}: {exc.message}"
    return True, None


def _write_entry(path: Path, entry: dict[str, Any], *, replace: bool) -> Path:
    """Add ``entry`` to the ``[[models]]`` of the node.toml at ``path``, keeping the rest as written."""
    import tomlkit

    doc = tomlkit.parse(path.read_text()) if path.exists() else tomlkit.document()
    models = doc.get("models")
    if models is None:
        if doc.body:
            doc.add(tomlkit.nl())
        models = tomlkit.aot()
        doc["models"] = models
    if not isinstance(models, list):
        raise ConfigError("invalid_config", f"{path}: models must be an array of tables ([[models]])")
    same = [i for i, m in enumerate(models) if m.get("name") == entry["name"]]
    if same and not replace:
        raise ConfigError(
            "model_exists",
            f"{path} already has a model called {entry['name']!r}; pass --replace to update it",
            details={"name": entry["name"]},
        )
    table = tomlkit.table()
    table.update(entry)
    if same:
        models[same[0]] = table
    else:
        models.append(table)
    text = tomlkit.dumps(doc)
    import tomllib

    parse_config(tomllib.loads(text), source=str(path))  # never write a file the node would refuse
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path
