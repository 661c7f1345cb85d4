"""A requester's local budgets, read from ``HOME/requester/requester.toml`` (DESIGN §12).

::

    [budgets]
    per_day = "5.00"          # USDC per UTC day, over every workflow (absent: no daily cap)
    attempts_per_key = 3      # routings of one idempotency key, the first included

    [budgets.workflows]       # USDC per workflow, over its whole life (absent: no cap for it)
    transcode = "1.50"
    nightly-batch = "20"

    [agent]                   # what `hearth mcp` acts as (requester.agent_tools)
    key_file = "agent.key"    # the agent's Ethereum key, relative to HOME/requester (it signs requests)
    grant = 3                 # fund jobs from this spending grant (absent: jobs are submitted unfunded)
    registry = "0x…"          # route through this HearthRegistry (default: node.toml's [market] registry)
    rpc_url = "http://…"      # the chain's RPC (default: node.toml's [chain] rpc_url)
    allow_private_endpoints = false   # accept providers on private addresses (a local devnet)

Amounts are decimal USDC strings with at most 6 decimals; the home keeps them in base units. A file that is
absent means no spending caps and the default number of attempts. :class:`requester.home.RequesterHome`
enforces them: a spend is reserved atomically before anything is signed, or refused with what is left.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from core import defaults as d
from core.errors import ConfigError
from payments.receipts import usdc_units

DEFAULT_ATTEMPTS_PER_KEY: Final = 3
DEFAULT_WORKFLOW: Final = d.DEFAULT_REQUESTER_WORKFLOW
MAX_AMOUNT: Final = 2**63 - 1  # base units SQLite keeps exactly (9.2 trillion USDC)


def config_path(home: Path) -> Path:
    """Where a requester home keeps its budgets: ``HOME/requester/requester.toml``."""
    return home / "requester" / "requester.toml"


def _units(value: str) -> int:
    units = usdc_units(value)  # ValueError unless an exact, non-negative USDC amount
    if units > MAX_AMOUNT:
        raise ValueError(f"{value} USDC is above the largest budget ({MAX_AMOUNT} base units)")
    return units


class BudgetsSection(BaseModel):
    """``[budgets]`` of requester.toml."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    per_day: str | None = None
    attempts_per_key: int = Field(default=DEFAULT_ATTEMPTS_PER_KEY, ge=1, le=1000)
    workflows: dict[str, str] = Field(default_factory=dict)

    @field_validator("per_day")
    @classmethod
    def _day(cls, v: str | None) -> str | None:
        if v is not None:
            _units(v)
        return v

    @field_validator("workflows")
    @classmethod
    def _workflows(cls, v: dict[str, str]) -> dict[str, str]:
        for name, amount in v.items():
            check_workflow(name)
            _units(amount)
        return v


class AgentSection(BaseModel):
    """``[agent]`` of requester.toml: the key, grant and market an agent's tools (``hearth mcp``) use."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    key_file: str | None = Field(default=None, min_length=1)
    grant: int | None = Field(default=None, ge=1)
    registry: str | None = Field(default=None, pattern=r"^0x[0-9a-fA-F]{40}$")
    rpc_url: str | None = Field(default=None, pattern=r"^https?://", max_length=2048)
    allow_private_endpoints: bool = False


class RequesterConfig(BaseModel):
    """requester.toml: ``[budgets]`` and ``[agent]``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    budgets: BudgetsSection = Field(default_factory=BudgetsSection)
    agent: AgentSection = Field(default_factory=AgentSection)


def check_workflow(name: str) -> str:
    """A workflow name: 1 to 64 printable characters without spaces; ``ValueError`` otherwise."""
    if not 1 <= len(name) <= 64 or not name.isprintable() or any(c.isspace() for c in name):
        raise ValueError(f"a workflow name is 1 to 64 printable characters without spaces, not {name!r}")
    return name


@dataclass(frozen=True)
class Budgets:
    """The caps a home enforces, in USDC base units (None: no cap)."""

    per_day: int | None = None
    workflows: dict[str, int] = field(default_factory=dict)
    attempts_per_key: int = DEFAULT_ATTEMPTS_PER_KEY

    @classmethod
    def from_config(cls, cfg: RequesterConfig) -> Budgets:
        b = cfg.budgets
        return cls(
            per_day=None if b.per_day is None else _units(b.per_day),
            workflows={name: _units(amount) for name, amount in b.workflows.items()},
            attempts_per_key=b.attempts_per_key,
        )


def load_budgets(home: Path) -> Budgets:
    """The budgets of ``HOME/requester/requester.toml``; none (no caps) when the file is absent.

    Raises :class:`ConfigError` ``invalid_requester_config`` when the file is not valid TOML or names an
    unknown key or an inexact amount.
    """
    return Budgets.from_config(load_requester_config(home))


def load_requester_config(home: Path) -> RequesterConfig:
    """``HOME/requester/requester.toml`` (all defaults when absent); errors as :func:`load_budgets`."""
    path = config_path(home)
    try:
        text = path.read_text()
    except FileNotFoundError:
        return RequesterConfig()
    except OSError as exc:
        raise ConfigError("invalid_requester_config", f"cannot read {path}: {exc}") from None
    try:
        return RequesterConfig.model_validate(tomllib.loads(text))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("invalid_requester_config", f"{path}: {exc}") from None
    except ValidationError as exc:
        problems = [
            {"loc": ".".join(str(p) for p in e["loc"]), "msg": e["msg"]}
            for e in exc.errors(include_url=False)
        ]
        raise ConfigError(
            "invalid_requester_config", f"{path}: {problems[0]['loc']}: {problems[0]['msg']}",
            details={"problems": problems},
        ) from None  # fmt: skip


__all__ = [
    "DEFAULT_ATTEMPTS_PER_KEY",
    "DEFAULT_WORKFLOW",
    "AgentSection",
    "Budgets",
    "BudgetsSection",
    "RequesterConfig",
    "check_workflow",
    "config_path",
    "load_budgets",
    "load_requester_config",
]
