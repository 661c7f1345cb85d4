"""The ``[chain]`` table of ``node.toml``, as the devnet writes it: edited in place, comments kept.

:func:`set_chain_config` rewrites only ``[chain]`` (with tomlkit, so the rest of the file stays as the
operator wrote it) and checks the result before replacing the file atomically (:func:`write_atomically`).
:func:`set_market_registry` does the same for the one ``registry`` key of ``[market]``.
"""

from __future__ import annotations

import os
import re
import secrets
import tomllib
from pathlib import Path
from typing import Any

import tomlkit
from tomlkit.exceptions import TOMLKitError
from tomlkit.items import Table

from core.config import CONFIG_FILENAME, ChainSection, parse_config
from core.errors import ConfigError

CHAIN_TABLE_COMMENT = (
    "Written by `hearth devnet`; for a real chain set the RPC URL and deployed addresses here."
)
MARKET_TABLE_COMMENT = "The provider registry `hearth devnet` deployed; set `endpoint` to list this node."


def set_chain_config(home: Path, chain: ChainSection) -> Path:
    """Write ``chain`` as the ``[chain]`` table of ``<home>/node.toml``, keeping comments and formatting.

    An existing ``[chain]`` table is edited in place (its comments, and the layout of the keys whose values
    stay the same, are kept); otherwise a new one is appended. The result must parse to exactly the old
    document with the new chain and pass validation, else nothing is written (``config_not_editable``).
    """
    path = home / CONFIG_FILENAME
    text = path.read_text() if path.exists() else ""
    before = _toml(text, path)
    new_text = _with_chain_table(text, chain, path)
    try:
        after: dict[str, Any] | None = tomllib.loads(new_text)
    except tomllib.TOMLDecodeError:
        after = None
    expected = {k: v for k, v in before.items() if k != "chain"} | {"chain": chain.model_dump()}
    if after is None or after != expected:
        raise _not_editable(path)
    parse_config(after, source=str(path))
    write_atomically(path, new_text)
    return path


def set_market_registry(home: Path, registry: str) -> Path:
    """Set ``[market] registry`` in ``<home>/node.toml`` to ``registry``, keeping everything else as written.

    The other keys of ``[market]`` (``endpoint``, ``register``) are the operator's and stay; a missing table
    is appended. As :func:`set_chain_config`, the result must parse to the old document with only that value
    changed and pass validation, else nothing is written (``config_not_editable``).
    """
    path = home / CONFIG_FILENAME
    text = path.read_text() if path.exists() else ""
    before = _toml(text, path)
    try:
        doc = tomlkit.parse(text)
    except TOMLKitError:
        raise _not_editable(path, "market") from None
    market = before.get("market")
    expected = before | {"market": (market if isinstance(market, dict) else {}) | {"registry": registry}}
    table = doc.get("market")
    if table is None:
        block = f"# {MARKET_TABLE_COMMENT}\n{tomlkit.dumps({'market': {'registry': registry}})}"
        # next to [chain] (it names an address on that chain) when that reads back right, else at the end
        candidates = [
            _after_chain_keys(text, block),
            (text.rstrip("\n") + "\n\n" if text.strip() else "") + block,
        ]
    elif not isinstance(table, Table) or table.is_super_table():
        raise _not_editable(path, "market")
    else:
        if table.get("registry") != registry:
            table["registry"] = registry  # a replaced value keeps its line's comment; a new key goes last
        candidates = [tomlkit.dumps(doc)]
    new_text = next((c for c in candidates if c is not None and _reads_as(c, expected)), None)
    if new_text is None:
        raise _not_editable(path, "market")
    parse_config(expected, source=str(path))
    if new_text != text:
        write_atomically(path, new_text)
    return path


def write_atomically(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` so readers see the old or the new file, keeping an existing mode."""
    try:
        mode = path.stat().st_mode & 0o777
    except FileNotFoundError:
        mode = 0o644
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    try:
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except OSError as exc:
        raise ConfigError(
            "config_unwritable", f"cannot write {path}: {exc.strerror}", details={"path": str(path)}
        ) from None
    finally:
        temporary.unlink(missing_ok=True)


def _toml(text: str, source: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("invalid_toml", f"{source}: {exc}", details={"source": str(source)}) from None


def _with_chain_table(text: str, chain: ChainSection, path: Path) -> str:
    """``text`` with its ``[chain]`` table holding exactly ``chain``'s values; everything else as written.

    Only a plain ``[chain]`` table is edited: chain as an inline table, as dotted keys or as ``[chain.*]``
    tables alone is refused (``config_not_editable``).
    """
    try:
        doc = tomlkit.parse(text)
    except TOMLKitError:  # what tomllib reads, tomlkit should too
        raise _not_editable(path) from None
    values = chain.model_dump()
    table = doc.get("chain")
    if table is None:  # appended after one blank line, under a comment saying where it came from
        head = text.rstrip("\n") + "\n\n" if text.strip() else ""
        return f"{head}# {CHAIN_TABLE_COMMENT}\n{tomlkit.dumps({'chain': values})}"
    if not isinstance(table, Table) or table.is_super_table():
        raise _not_editable(path)
    for key in [k for k in table if k not in values]:  # e.g. [chain.*] sub-tables: chain is replaced whole
        del table[key]
    for key, value in values.items():
        if key in table and table[key] != value:
            table[key] = value  # a replaced value keeps its line's comment
    # New keys go after the table's last key, indented like it, not after the comments that close the
    # table (those usually introduce the next one).
    body = table.value.body
    end = max((i + 1 for i, (key, _) in enumerate(body) if key is not None), default=0)
    for key, value in values.items():
        if key in table:
            continue
        item = tomlkit.item(value)
        if end:
            item.trivia.indent = body[end - 1][1].trivia.indent
        if end < len(body):
            table.value._insert_at(end, key, item)
        else:
            table.add(key, item)
        end += 1
    return tomlkit.dumps(doc)


def _reads_as(text: str, expected: dict[str, Any]) -> bool:
    try:
        return tomllib.loads(text) == expected
    except tomllib.TOMLDecodeError:
        return False


_TABLE_HEADER = re.compile(r"^\s*\[")


def _after_chain_keys(text: str, block: str) -> str | None:
    """``text`` with ``block`` inserted after the last key line of its ``[chain]`` table (before the comments
    that close the table, which usually introduce the next one); None without a ``[chain]`` header."""
    lines = text.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if re.match(r"^\s*\[chain\]\s*(#.*)?$", line)), None)
    if start is None:
        return None
    last = start
    for i in range(start + 1, len(lines)):
        stripped = lines[i].strip()
        if _TABLE_HEADER.match(lines[i]):
            break
        if stripped and not stripped.startswith("#"):
            last = i
    head = "".join(lines[: last + 1])
    head = head if head.endswith("\n") else head + "\n"
    return f"{head}\n{block}{''.join(lines[last + 1 :])}"


def _not_editable(path: Path, table: str = "chain") -> ConfigError:
    return ConfigError(
        "config_not_editable",
        f"{path} defines {table} outside a plain [{table}] table; move it into one and re-run",
        details={"source": str(path)},
    )
