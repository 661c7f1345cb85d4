"""The project's own docs stay true to the code.

- Every error code the code can raise is a row of the error tables of ``docs/protocol.md``, with the HTTP
  status the node's boundary gives it (``node.http_errors.status_of``) and the domain it is raised with,
  and no row names a code the code no longer raises.
- Every key of ``node.toml`` (every field of :class:`NodeConfig`, section by section) is in
  ``docs/operating.md``; every route of the OpenAPI document is in ``docs/protocol.md``.
- Each sample envelope in ``docs/envelopes/`` parses, one per job kind.
- Links between the docs point at files and headings that exist.

Codes are read from the source with :mod:`ast`, not imported: a code lives in the call that raises it
(``RequestError("code", ...)``, a helper such as ``bad_input("code", ...)``, a conditional between two
codes, a ``code = ...`` chosen just before, a job's ``failure_code``), so a new raise anywhere in the
packages without a row in the table fails here.
"""

from __future__ import annotations

import ast
import functools
import json
import re
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from core.config import NodeConfig
from core.envelope import JOB_KINDS, parse_envelope
from core.errors import DOMAINS, HearthError
from node.http_errors import status_of
from node.openapi import openapi_document

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PROTOCOL = DOCS / "protocol.md"
OPERATING = DOCS / "operating.md"
ENVELOPES = DOCS / "envelopes"

# Codes chosen from a lookup table rather than named at the raise: aiohttp's own refusals
# (node/http_errors.py), the HTTP parser's descriptions (node/http_guard.py), the validator's names for
# storage's refusals (validator/fetch.py). Each must still be a string literal somewhere in the source
# (checked below), so this list cannot outlive the tables.
TABLE_CODES = frozenset(
    {
        "not_found",
        "method_not_allowed",
        "http_error",
        "conflicting_framing",
        "too_many_headers",
        "bad_transfer_encoding",
        # the validator's names for storage's refusals of an artifact (validator/fetch.py)
        "artifact_malformed",
        "artifact_too_large",
        "artifact_incomplete",
        "artifact_unpack_failed",
    }
)
CODE_RE = re.compile(r"^[a-z][a-z0-9_]*$")
ROW_RE = re.compile(r"^\|\s*`([a-z0-9_{}<>]+)`\s*\|([^|]*)\|([^|]*)\|([^|]*)\|")


def packages() -> list[Path]:
    """The project's top-level packages, as pyproject.toml names them for setuptools."""
    found = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    names = [pattern.rstrip("*") for pattern in found["include"]]
    assert "core" in names and "node" in names, names
    dirs = [ROOT / name for name in names]
    missing = [str(d) for d in dirs if not d.is_dir()]
    assert not missing, f"pyproject.toml names packages that do not exist: {missing}"
    return dirs


def modules() -> list[tuple[str, ast.Module]]:
    return [
        (str(path.relative_to(ROOT)), ast.parse(path.read_text(), str(path)))
        for package in packages()
        for path in sorted(package.rglob("*.py"))
    ]


# -- what the source raises ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Raised:
    """One code at one raise site, with the status and domain the site gives it (None: not a constant)."""

    code: str  # a code, or "{…}_suffix" for a code made by an f-string
    status: int | None
    domain: str | None
    where: str


@dataclass(frozen=True, slots=True)
class Maker:
    """Something that makes an error from a code: an error class, or a function (or a class's
    ``__init__``) with a ``code`` parameter."""

    code_index: int  # the position of the code among the call's positional arguments
    status: int | None
    domain: str | None
    domain_index: int | None = None  # where the caller passes the domain, if it does
    cls: str | None = None  # the error class it makes, when known


def _const(node: ast.AST | None) -> Any:
    return node.value if isinstance(node, ast.Constant) else None


def _class_constants(cls: ast.ClassDef) -> dict[str, Any]:
    """The ``name = constant`` assignments (annotated or not) of a class body."""
    found: dict[str, Any] = {}
    for item in cls.body:
        if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
            found[item.target.id] = _const(item.value)
        elif (
            isinstance(item, ast.Assign) and len(item.targets) == 1 and isinstance(item.targets[0], ast.Name)
        ):
            found[item.targets[0].id] = _const(item.value)
    return found


def _class_defaults(trees: list[tuple[str, ast.Module]]) -> dict[str, Maker]:
    """Every subclass of HearthError, with the status and domain its class body fixes (inherited)."""
    defs: dict[str, ast.ClassDef] = {}
    for _, tree in trees:
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                defs.setdefault(node.name, node)
    makers: dict[str, Maker] = {}

    def resolve(name: str) -> Maker | None:
        if name == "HearthError":  # the root: its own class body fixes the defaults
            own = _class_constants(defs[name])
            return Maker(0, None, own["domain"], cls=name)
        if name in makers:
            return makers[name]
        cls = defs.get(name)
        if cls is None:
            return None
        for base in cls.bases:
            if isinstance(base, ast.Name) and (parent := resolve(base.id)) is not None:
                own = _class_constants(cls)
                makers[name] = Maker(0, None, own.get("domain", parent.domain), cls=name)
                return makers[name]
        return None

    assert "HearthError" in defs, "no class HearthError in the packages"
    for name in list(defs):
        resolve(name)
    root = resolve("HearthError")
    assert root is not None
    makers["HearthError"] = root
    return makers


def _keywords(call: ast.Call, base: Maker) -> tuple[int | None, str | None]:
    status, domain = base.status, base.domain
    for kw in call.keywords:
        if kw.arg == "status":  # a refusal at the HTTP boundary carries the protocol's status
            status = _const(kw.value)
        elif kw.arg == "domain":
            domain = _const(kw.value)
    return status, domain


def _helpers(trees: list[tuple[str, ast.Module]], classes: dict[str, Maker]) -> dict[str, Maker]:
    """Functions taking a ``code`` parameter that make an error with it, hand it to one that does, or
    record it as a job's failure: by name (a class whose ``__init__`` does: by the class's name)."""
    funcs: list[tuple[str, ast.FunctionDef]] = []
    for _, tree in trees:
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef) and node.name != "__init__":
                funcs.append((node.name, node))
            if isinstance(node, ast.ClassDef) and node.name not in classes:
                init = next(
                    (f for f in node.body if isinstance(f, ast.FunctionDef) and f.name == "__init__"), None
                )
                if init is not None:
                    funcs.append((node.name, init))
    helpers: dict[str, Maker] = {}
    while True:  # helpers handing the code to helpers: until no new one is found
        found = {
            name: maker
            for name, func in funcs
            if name not in helpers and (maker := _helper(func, classes, helpers)) is not None
        }
        if not found:
            return helpers
        helpers.update(found)


def _helper(func: ast.FunctionDef, classes: dict[str, Maker], helpers: dict[str, Maker]) -> Maker | None:
    params = [a.arg for a in func.args.args]
    if params and params[0] in ("self", "cls"):
        params = params[1:]
    if "code" not in params:
        return None
    at, domain_at = params.index("code"), params.index("domain") if "domain" in params else None
    for node in ast.walk(func):
        if not isinstance(node, ast.Call):
            continue
        name = node.func.id if isinstance(node.func, ast.Name) else None
        if name in classes:  # the error it makes: status and domain as its own raise gives them
            status, domain = _keywords(node, classes[name])
            return Maker(at, status, None if domain_at is not None else domain, domain_at, cls=name)
        if name in helpers and any(isinstance(a, ast.Name) and a.id == "code" for a in node.args):
            return Maker(at, None, None, domain_at)  # hands the code to a helper
        if isinstance(node.func, ast.Attribute) and node.func.attr == "transition":
            return Maker(at, None, None, domain_at)  # records the code as a job's failure
    return None


def _codes_of(value: ast.AST, scope: ast.AST) -> Iterator[str]:
    """The codes an argument can be: a literal, a conditional between literals, a name assigned one of
    those in the same function, or an f-string (its literal tail, as ``{…}_tail``)."""
    if isinstance(value, ast.Constant) and isinstance(value.value, str):
        yield value.value
    elif isinstance(value, ast.IfExp):
        yield from _codes_of(value.body, scope)
        yield from _codes_of(value.orelse, scope)
    elif isinstance(value, ast.JoinedStr) and value.values:
        tail = _const(value.values[-1])
        if isinstance(tail, str):
            yield "{…}" + tail
    elif isinstance(value, ast.Name):
        for node in ast.walk(scope):
            if (
                isinstance(node, ast.Assign)
                and len(node.targets) == 1
                and isinstance(node.targets[0], ast.Name)
                and node.targets[0].id == value.id
                and isinstance(node.value, ast.Constant | ast.IfExp)
            ):
                yield from _codes_of(node.value, scope)


def _names_assigned(name: str, scope: ast.AST) -> Iterator[str]:
    """The names ``name`` is assigned in ``scope``: ``name = A`` or ``name = A if ... else B``."""
    for node in ast.walk(scope):
        if (
            isinstance(node, ast.Assign)
            and len(node.targets) == 1
            and isinstance(node.targets[0], ast.Name)
            and node.targets[0].id == name
        ):
            values = (
                [node.value.body, node.value.orelse] if isinstance(node.value, ast.IfExp) else [node.value]
            )
            yield from (v.id for v in values if isinstance(v, ast.Name))


def _walk_scoped(
    node: ast.AST, makers: dict[str, Maker], classes: dict[str, Maker], scope: ast.AST, cls: str | None = None
) -> Iterator[tuple[ast.Call, Maker, ast.AST]]:
    """Calls of error makers under ``node``; a function defined inside a function shadows a helper of the
    same name elsewhere (e.g. a local ``refuse(field, ...)`` beside another module's ``refuse(code, ...)``),
    and ``super().__init__(code, ...)`` in an error class is that class's own raise."""
    if isinstance(node, ast.ClassDef):
        cls = node.name
    if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
        local = dict(makers)
        for child in ast.walk(node):
            if child is not node and isinstance(child, ast.FunctionDef):
                maker = _helper(child, classes, makers)
                if maker is None:
                    local.pop(child.name, None)
                else:
                    local[child.name] = maker
        makers, scope = local, node
    if isinstance(node, ast.Call):
        func = node.func
        name = (
            func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else None
        )
        if name is not None and name in makers:
            yield node, makers[name], scope
        elif (
            isinstance(func, ast.Attribute)
            and func.attr == "__init__"
            and isinstance(func.value, ast.Call)
            and isinstance(func.value.func, ast.Name)
            and func.value.func.id == "super"
            and cls in classes
        ):
            yield node, classes[cls], scope
        elif isinstance(func, ast.Name):  # error = RequestError if ... else SettlementError; error(...)
            for chosen in _names_assigned(func.id, scope):
                if chosen in classes:
                    yield node, classes[chosen], scope
    for child in ast.iter_child_nodes(node):
        yield from _walk_scoped(child, makers, classes, scope, cls)


@functools.cache
def _error_classes() -> dict[str, type[HearthError]]:
    """Every error class of the packages by name (their modules imported once)."""
    import importlib
    import pkgutil

    for package in packages():
        for info in pkgutil.walk_packages([str(package)], prefix=f"{package.name}."):
            if info.name.endswith("__main__"):
                continue
            importlib.import_module(info.name)
    found: dict[str, type[HearthError]] = {}
    todo: list[type[HearthError]] = [HearthError]
    while todo:
        cls = todo.pop()
        found.setdefault(cls.__name__, cls)
        todo.extend(cls.__subclasses__())
    return found


def _boundary_status(cls_name: str, code: str, domain: str | None) -> int | None:
    """The status the node's HTTP boundary gives an error of class ``cls_name`` with ``code``."""
    cls = _error_classes().get(cls_name)
    if cls is None:
        return None
    error = Exception.__new__(cls)  # no constructor: some take other arguments (a client's NodeError)
    error.code, error.message, error.details = code, code, {}
    error.domain = domain if domain is not None else cls.domain  # type: ignore[assignment]
    return status_of(error)


@functools.cache
def raised_codes() -> tuple[Raised, ...]:
    """Every code the packages raise, once per raise site (computed once per test session)."""
    trees = modules()
    classes = _class_defaults(trees)
    makers = {**_helpers(trees, classes), **classes}
    found: list[Raised] = []
    for where, tree in trees:
        for call, maker, scope in _walk_scoped(tree, makers, classes, tree):
            args = call.args
            value = next((kw.value for kw in call.keywords if kw.arg == "code"), None)
            if value is None and len(args) > maker.code_index:
                value = args[maker.code_index]
            if value is None:
                continue
            status, domain = _keywords(call, maker)
            if maker.domain_index is not None and len(args) > maker.domain_index:
                domain = _const(args[maker.domain_index])
            for code in _codes_of(value, scope):
                if CODE_RE.match(code) or code.startswith("{…}"):
                    code_status = status
                    if code_status is None and maker.cls is not None and not code.startswith("{…}"):
                        code_status = _boundary_status(maker.cls, code, domain)
                    found.append(Raised(code, code_status, domain, f"{where}:{call.lineno}"))
        for node in ast.walk(tree):  # codes written into documents: {"failure_code": ...}, {"code": ...}
            if isinstance(node, ast.Dict):
                for key, value in zip(node.keys, node.values, strict=True):
                    code = _const(value)
                    if (
                        _const(key) in ("failure_code", "code")
                        and isinstance(code, str)
                        and CODE_RE.match(code)
                    ):
                        found.append(Raised(code, None, None, f"{where}:{node.lineno}"))
    return tuple(found)


# -- what the docs say ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Row:
    code: str
    status: str
    domain: str
    retryable: str


def error_rows() -> dict[str, Row]:
    """The rows of the error tables (after the "## Errors" heading): code, status, domain, retryable."""
    text = PROTOCOL.read_text()
    assert "\n## Errors" in text, "docs/protocol.md has no '## Errors' section"
    section = text.split("\n## Errors", 1)[1].split("\n## ", 1)[0]
    rows: dict[str, Row] = {}
    for line in section.splitlines():
        match = ROW_RE.match(line)
        if match is None:
            continue
        code, status, domain, retryable = (g.strip() for g in match.groups())
        assert code not in rows, f"{code} has two rows in the error tables"
        rows[code] = Row(code, status, domain, retryable)
    return rows


def test_every_raised_code_has_a_row() -> None:
    raised = raised_codes()
    codes = {r.code for r in raised}
    assert len(codes) > 200, f"only {len(codes)} codes found: the source scan is broken"
    rows = error_rows()
    suffixes = {code[len("{…}") :] for code in codes if code.startswith("{…}")}
    plain = {code for code in codes if not code.startswith("{…}")} | TABLE_CODES
    missing = sorted(plain - set(rows))
    assert not missing, f"codes without a row in docs/protocol.md's error tables: {missing}"
    for suffix in suffixes:
        assert any(code.endswith(suffix) and "<" in code for code in rows), (
            f"no row for the codes ending {suffix!r} (write them as `<name>{suffix}`)"
        )


def test_every_row_is_a_raised_code() -> None:
    raised = {r.code for r in raised_codes()}
    suffixes = tuple(code[len("{…}") :] for code in raised if code.startswith("{…}"))
    source = "\n".join(p.read_text() for package in packages() for p in package.rglob("*.py"))
    for code in TABLE_CODES:
        assert f'"{code}"' in source, f"{code} is no longer a literal in the source; drop it from TABLE_CODES"
    stale = [
        code
        for code in error_rows()
        if code not in raised
        and code not in TABLE_CODES
        and not (code.startswith("<") and code.endswith(suffixes))
    ]
    assert not stale, f"rows for codes the source no longer raises: {stale}"


def test_rows_give_the_status_and_domain_of_every_raise() -> None:
    rows = error_rows()
    wrong = []
    for r in raised_codes():
        row = rows.get(r.code)
        if row is None:
            continue  # reported by test_every_raised_code_has_a_row
        if r.status is not None and row.status != "—" and str(r.status) not in row.status:
            wrong.append(f"{r.code}: status {r.status} at {r.where}, the row says {row.status!r}")
        if r.domain is not None and r.domain not in row.domain:
            wrong.append(f"{r.code}: domain {r.domain} at {r.where}, the row says {row.domain!r}")
    assert not wrong, "\n".join(wrong)


def test_rows_are_well_formed() -> None:
    rows = error_rows()
    for row in rows.values():
        domains = [d.strip() for d in row.domain.split("/")]
        assert domains and all(d in DOMAINS for d in domains), f"{row.code}: unknown domain {row.domain!r}"
        assert row.status == "—" or re.fullmatch(r"(\d{3}|\dxx)( / (\d{3}|\dxx))*", row.status), (
            f"{row.code}: status {row.status!r} is not '—' or NNN[ / NNN]"
        )
        assert row.retryable in ("yes", "no", "varies"), f"{row.code}: retryable {row.retryable!r}"


# -- node.toml, routes, envelopes, links -------------------------------------------------------------------


def _model_of(annotation: Any) -> type[BaseModel] | None:
    """The section model a field holds: itself, optional (``X | None``) or repeated (``list[X]``)."""
    candidates = (annotation, *getattr(annotation, "__args__", ()))
    return next((a for a in candidates if isinstance(a, type) and issubclass(a, BaseModel)), None)


def config_keys(model: type[BaseModel], section: str = "") -> Iterator[tuple[str, str, str]]:
    """``(section, key, default as written in the docs)`` of every leaf of node.toml, nested tables
    (``[pricing.surge]``) as sections of their own."""
    for name, field in model.model_fields.items():
        nested = _model_of(field.annotation)
        if nested is not None:
            yield from config_keys(nested, f"{section}.{name}" if section else name)
            continue
        if field.is_required():
            default = "required"
        else:
            value = field.get_default(call_default_factory=True)
            default = "unset" if value is None else json.dumps(value)
        yield section, name, default


def section_block(text: str, section: str) -> str:
    """The part of operating.md under the heading that names ``[section]`` (``[[models]]`` for the list)."""
    heading = f"[[{section}]]" if section == "models" else f"[{section}]"
    match = re.search(rf"^#+ `{re.escape(heading)}`.*$", text, re.MULTILINE)
    assert match is not None, f"docs/operating.md has no heading for `{heading}`"
    rest = text[match.end() :]
    following = re.search(r"^#+ ", rest, re.MULTILINE)
    return rest if following is None else rest[: following.start()]


def test_every_config_key_is_documented_with_its_default() -> None:
    text = OPERATING.read_text()
    keys = list(config_keys(NodeConfig))
    assert len(keys) > 80, keys
    wrong = []
    for section, key, default in keys:
        block = section_block(text, section)
        row = next((line for line in block.splitlines() if line.startswith(f"| `{key}` |")), None)
        if row is None:
            wrong.append(f"[{section}] {key}: no row")
            continue
        written = row.split("|")[2].strip().strip("`")
        if written != default:
            wrong.append(f"[{section}] {key}: the row gives the default {written}, the code {default}")
    assert not wrong, "\n".join(wrong)


def test_every_route_is_documented() -> None:
    text = PROTOCOL.read_text()
    paths = openapi_document()["paths"]
    missing = [
        f"{method.upper()} {path}"
        for path, ops in paths.items()
        for method in ops
        if f"`{method.upper()} {path}`" not in text
    ]
    assert not missing, f"routes missing from docs/protocol.md: {missing}"


def test_one_sample_envelope_per_kind() -> None:
    assert sorted(p.stem for p in ENVELOPES.glob("*.json")) == sorted(JOB_KINDS)


@pytest.mark.parametrize("kind", JOB_KINDS)
def test_sample_envelope_parses(kind: str) -> None:
    data = json.loads((ENVELOPES / f"{kind}.json").read_text())
    envelope = parse_envelope(data)
    assert envelope.kind == kind
    assert envelope.job_id == data["job_id"]


LINK_RE = re.compile(r"\]\(([^)\s]+)\)")


def anchors(doc: Path) -> set[str]:
    """The anchors of a Markdown file's headings, as GitHub makes them."""
    slugs = set()
    for line in doc.read_text().splitlines():
        if line.startswith("#"):
            title = line.lstrip("#").strip().replace("`", "").lower()
            slugs.add(re.sub(r"[^a-z0-9 _-]", "", title).replace(" ", "-"))
    return slugs


@pytest.mark.parametrize("doc", sorted(p.name for p in DOCS.glob("*.md")))
def test_links_between_docs_resolve(doc: str) -> None:
    """Links from one doc to another (or to a sample envelope), and to their headings, point somewhere."""
    broken = []
    for match in LINK_RE.finditer((DOCS / doc).read_text()):
        target, _, anchor = match.group(1).partition("#")
        if "://" in target or target.startswith("../"):
            continue
        path = DOCS / (target or doc)
        if not path.exists() or (anchor and path.suffix == ".md" and anchor not in anchors(path)):
            broken.append(match.group(1))
    assert not broken, f"{doc} links to files or headings that do not exist: {broken}"
