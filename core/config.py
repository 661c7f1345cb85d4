"""Node configuration: one TOML file (``node.toml``), validated once at start, with env overrides.

Every limit, timeout and price the node uses is a named default here; nothing deeper reads the
environment. ``HEARTH_<SECTION>__<KEY>=value`` overrides ``[section] key`` (values parsed as TOML
scalars, falling back to a string), e.g. ``HEARTH_API__PORT=8080``.
"""

from __future__ import annotations

import os
import tomllib
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from core.errors import ConfigError
from core.netpolicy import parse_networks

DEFAULT_PORT = 8787
DEFAULT_HOST = "127.0.0.1"
DEFAULT_MAX_BODY_BYTES = 256 * 1024
# The HTTP connection layer (node/http_guard.py): timeouts, the cap on open connections (clamped below
# RLIMIT_NOFILE less the reserve) and the longest request or header line aiohttp's parser accepts.
DEFAULT_HEADER_TIMEOUT_SECONDS = 10.0
DEFAULT_IDLE_TIMEOUT_SECONDS = 60.0
DEFAULT_MAX_CONNECTIONS = 1024
DEFAULT_RESERVED_DESCRIPTORS = 256
DEFAULT_MAX_HEADER_LINE_BYTES = 8190
DEFAULT_BODY_TIMEOUT_SECONDS = 10.0  # a signed request or receipt body must arrive whole within this
DEFAULT_CLOCK_SKEW_SECONDS = 60
DEFAULT_MAX_TOKEN_LIFETIME_SECONDS = 3600
DEFAULT_QUOTE_TTL_SECONDS = 300
DEFAULT_RETRY_BUDGET = 2
DEFAULT_PRICING_SCRIPT_TIMEOUT_SECONDS = 2.0
DEFAULT_PER_DID_CONCURRENCY = 4
DEFAULT_MAX_BLOB_MB = 2048
DEFAULT_MAX_INPUT_MB = 4096
DEFAULT_UPLOAD_STALL_SECONDS = 30.0
DEFAULT_FETCH_TIMEOUT_SECONDS = 600.0
DEFAULT_FETCH_CONNECT_TIMEOUT_SECONDS = 10.0
DEFAULT_FETCH_READ_TIMEOUT_SECONDS = 60.0
DEFAULT_QUOTE_FETCH_TIMEOUT_SECONDS = 20.0
DEFAULT_INPUT_MAX_REDIRECTS = 5  # each hop checked by the address policy before it is requested
DEFAULT_PIDS_LIMIT = 256
DEFAULT_TMPFS_MB = 256
DEFAULT_DOCKER_URL = "unix:///var/run/docker.sock"
DEFAULT_SANDBOX_USER = "10001:10001"  # the fixed non-root uid:gid the images in sandbox/images/ create
DEFAULT_DOCKER_API_TIMEOUT_SECONDS = 30.0
DEFAULT_OUTPUT_POLL_SECONDS = 0.25
DEFAULT_STDERR_TAIL_BYTES = 8192
DEFAULT_DRAIN_GRACE_SECONDS = 30.0
DEFAULT_LOG_REPEAT_BURST = 10
DEFAULT_LOG_REPEAT_WINDOW_SECONDS = 60.0
DEFAULT_VLLM_SHM_MB = 512
# ffprobe reads headers only: it runs in a sandbox with a small, fixed share of its own.
DEFAULT_PROBE_TIMEOUT_SECONDS = 60.0
DEFAULT_PROBE_MEMORY_MB = 256
CONFIG_FILENAME = "node.toml"
KEY_FILENAME = "node.key"
# The systemd credentials (LoadCredential= IDs) that replace [node] key_file and [chain] wallet_key_file.
NODE_KEY_CREDENTIAL = "node.key"
WALLET_KEY_CREDENTIAL = "wallet.key"


def _money_text(value: object) -> object:
    """Accept TOML/env numbers for prices but keep them exact: 2e-05 -> "0.00002"."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return format(Decimal(str(value)), "f")
    return value


JobKind = Literal["ffmpeg_transcode", "vllm_batch"]
ALL_KINDS: tuple[JobKind, ...] = ("ffmpeg_transcode", "vllm_batch")

Money = Annotated[str, BeforeValidator(_money_text), Field(pattern=r"^(0|[1-9][0-9]{0,11})(\.[0-9]{1,9})?$")]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class NodeSection(_Section):
    """Who the node is and where it keeps its things (relative paths are under the node home)."""

    name: str = Field(default="hearth-node", min_length=1, max_length=64)
    key_file: str = KEY_FILENAME
    state_dir: str = "state"
    public_url: str | None = None


class ApiSection(_Section):
    """The HTTP listener and the limits applied before a request is parsed."""

    host: str = DEFAULT_HOST
    port: int = Field(default=DEFAULT_PORT, ge=0, le=65535)
    max_body_bytes: int = Field(default=DEFAULT_MAX_BODY_BYTES, ge=1024, le=64 * 1024 * 1024)
    clock_skew_seconds: int = Field(default=DEFAULT_CLOCK_SKEW_SECONDS, ge=0, le=600)
    max_token_lifetime_seconds: int = Field(default=DEFAULT_MAX_TOKEN_LIFETIME_SECONDS, ge=10, le=86_400)
    quote_ttl_seconds: int = Field(default=DEFAULT_QUOTE_TTL_SECONDS, ge=5, le=86_400)
    body_timeout_seconds: float = Field(default=DEFAULT_BODY_TIMEOUT_SECONDS, gt=0, le=600)
    header_timeout_seconds: float = Field(default=DEFAULT_HEADER_TIMEOUT_SECONDS, gt=0, le=600)
    idle_timeout_seconds: float = Field(default=DEFAULT_IDLE_TIMEOUT_SECONDS, gt=0, le=3600)
    max_connections: int = Field(default=DEFAULT_MAX_CONNECTIONS, ge=1, le=1_000_000)
    reserved_descriptors: int = Field(default=DEFAULT_RESERVED_DESCRIPTORS, ge=1, le=1_000_000)
    max_header_line_bytes: int = Field(default=DEFAULT_MAX_HEADER_LINE_BYTES, ge=1024, le=65_536)


class SurgeSection(_Section):
    """Prices rise linearly from ``threshold`` utilisation up to ``max_factor`` at full load."""

    threshold: float = Field(default=0.5, ge=0, le=1)
    max_factor: float = Field(default=2.0, ge=1, le=100)


class PricingScriptSection(_Section):
    """An operator program: reads the bid context as JSON on stdin, prints a price; failure means no bid."""

    path: str
    timeout_seconds: float = Field(default=DEFAULT_PRICING_SCRIPT_TIMEOUT_SECONDS, gt=0, le=30)


class PricingSection(_Section):
    """Operator prices, in currency units (USDC), as decimal strings."""

    currency: Literal["usdc"] = "usdc"
    cpu_second: Money = "0.00002"
    gpu_second: Money = "0.0005"
    gpu_second_by_model: dict[str, Money] = Field(default_factory=dict)
    output_mb: Money = "0.0001"
    input_1k_tokens: Money = "0.0002"
    output_1k_tokens: Money = "0.0006"
    minimum_per_job: Money = "0.01"
    surge: SurgeSection = Field(default_factory=SurgeSection)
    script: PricingScriptSection | None = None

    def dec(self, name: str) -> Decimal:
        return Decimal(getattr(self, name))


class PolicySection(_Section):
    """Screening applied before any capacity is reserved. Empty allow list means everyone not denied."""

    allow_dids: list[str] = Field(default_factory=list)
    deny_dids: list[str] = Field(default_factory=list)
    kinds: list[JobKind] = Field(default_factory=lambda: list(ALL_KINDS))
    max_timeout_seconds: int = Field(default=3600, ge=1)
    max_output_mb: int = Field(default=2048, ge=1)
    max_cpus: float = Field(default=4, gt=0)
    max_memory_mb: int = Field(default=8192, ge=64)
    max_gpus: int = Field(default=1, ge=0)
    per_did_concurrency: int = Field(default=DEFAULT_PER_DID_CONCURRENCY, ge=1)
    retry_budget: int = Field(default=DEFAULT_RETRY_BUDGET, ge=0, le=10)


DEFAULT_QUOTE_HOLD_SHARE = 0.5
DEFAULT_PER_REQUESTER_HOLD_SHARE = 0.25
DEFAULT_BUSY_RETRY_AFTER_SECONDS = 30


class CapacitySection(_Section):
    """What the node offers. ``auto`` reads the machine (psutil, NVML); numbers cap it."""

    cpus: float | Literal["auto"] = "auto"
    memory_mb: int | Literal["auto"] = "auto"
    gpus: int | Literal["auto"] = "auto"
    reserve_cpus: float = Field(default=0.0, ge=0, description="CPUs kept back for the host")
    reserve_memory_mb: int = Field(default=512, ge=0)
    overcommit: float = Field(
        default=1.0,
        ge=1.0,
        le=1000.0,
        description="sell up to this multiple of CPU and memory; excess queues",
    )
    # Unfunded holds (quotes, and accepted jobs awaiting funding) cost their requester nothing, so they may
    # take only these shares of the total; a quote beyond them is issued but holds nothing (README, Bidding).
    quote_hold_share: float = Field(
        default=DEFAULT_QUOTE_HOLD_SHARE,
        ge=0,
        le=1,
        description="the share of each resource all unfunded holds together may take",
    )
    per_requester_hold_share: float = Field(
        default=DEFAULT_PER_REQUESTER_HOLD_SHARE,
        ge=0,
        le=1,
        description="the share of each resource one requester's unfunded holds may take",
    )
    busy_retry_after_seconds: int = Field(
        default=DEFAULT_BUSY_RETRY_AFTER_SECONDS,
        ge=1,
        le=3600,
        description="Retry-After of a 503 that only running or funded jobs (no known end) cause",
    )


class JournalSection(_Section):
    """The SQLite journal. ``normal`` survives a crash of the daemon; ``full`` also a power cut."""

    filename: str = "journal.sqlite3"
    synchronous: Literal["normal", "full"] = "normal"


class StorageSection(_Section):
    """The local blockstore, the blob upload cap and the IPFS gateways inputs are fetched from."""

    blocks_dir: str = "blocks"
    max_blob_mb: int = Field(default=DEFAULT_MAX_BLOB_MB, ge=1, le=1_000_000)
    upload_stall_seconds: float = Field(
        default=DEFAULT_UPLOAD_STALL_SECONDS, gt=0, le=3600, description="longest pause mid-upload of a blob"
    )
    max_input_mb: int = Field(default=DEFAULT_MAX_INPUT_MB, ge=1, le=1_000_000)
    gateways: list[str] = Field(default_factory=list, description="trustless gateways for ipfs:// inputs")
    fetch_timeout_seconds: float = Field(
        default=DEFAULT_FETCH_TIMEOUT_SECONDS, gt=0, le=3600, description="whole fetch of one input"
    )
    connect_timeout_seconds: float = Field(default=DEFAULT_FETCH_CONNECT_TIMEOUT_SECONDS, gt=0, le=300)
    read_timeout_seconds: float = Field(
        default=DEFAULT_FETCH_READ_TIMEOUT_SECONDS, gt=0, le=3600, description="longest stall mid-download"
    )
    verify_reads: bool = Field(default=True, description="re-hash every block read from disk")
    quote_fetch_timeout_seconds: float = Field(
        default=DEFAULT_QUOTE_FETCH_TIMEOUT_SECONDS,
        gt=0,
        le=600,
        description="how long a quote waits for its input to probe it; past that it prices on limits",
    )
    # The address policy of https:// inputs (core/netpolicy.py): requester-named URLs may reach only public
    # addresses unless these allow more. Configured gateways are the operator's and are trusted as named.
    allow_private_addresses: bool = Field(
        default=False, description="https inputs may reach loopback, private and link-local addresses"
    )
    allow_networks: list[str] = Field(
        default_factory=list, max_length=256, description="networks https inputs may reach though not public"
    )
    max_redirects: int = Field(
        default=DEFAULT_INPUT_MAX_REDIRECTS, ge=0, le=20, description="redirects an https input may follow"
    )

    @field_validator("allow_networks")
    @classmethod
    def _input_networks(cls, v: list[str]) -> list[str]:
        parse_networks(v)
        return v

    @field_validator("gateways")
    @classmethod
    def _gateway_urls(cls, v: list[str]) -> list[str]:
        for url in v:
            if not url.startswith(("https://", "http://")) or len(url) > 2048:
                raise ValueError(f"gateway {url[:80]!r} must be an http(s):// URL")
        return [url.rstrip("/") for url in v]


class SandboxSection(_Section):
    """The Docker engine and the per-container controls every workload runs under (DESIGN §6)."""

    docker_url: str = DEFAULT_DOCKER_URL
    ffmpeg_image: str = Field(default="hearth/ffmpeg:latest", description="tag; the node runs its image ID")
    vllm_cpu_image: str = Field(default="hearth/vllm-cpu:latest", description="vLLM for jobs without a GPU")
    vllm_gpu_image: str = Field(default="hearth/vllm-gpu:latest", description="vLLM for jobs given GPUs")
    vllm_shm_mb: int = Field(
        default=DEFAULT_VLLM_SHM_MB, ge=64, le=65_536, description="/dev/shm for vLLM's worker processes"
    )
    pids_limit: int = Field(default=DEFAULT_PIDS_LIMIT, ge=8, le=65_536)
    tmpfs_mb: int = Field(default=DEFAULT_TMPFS_MB, ge=1, le=65_536)
    work_dir: str = "work"
    user: str = Field(
        default=DEFAULT_SANDBOX_USER,
        pattern=r"^[1-9][0-9]{0,9}:[0-9]{1,10}$",
        description="numeric uid:gid inside the container; never root",
    )
    docker_timeout_seconds: float = Field(default=DEFAULT_DOCKER_API_TIMEOUT_SECONDS, gt=0, le=600)
    output_poll_seconds: float = Field(
        default=DEFAULT_OUTPUT_POLL_SECONDS, ge=0.01, le=10, description="how often the output cap is checked"
    )
    stderr_tail_bytes: int = Field(default=DEFAULT_STDERR_TAIL_BYTES, ge=256, le=1024 * 1024)
    probe_timeout_seconds: float = Field(
        default=DEFAULT_PROBE_TIMEOUT_SECONDS, gt=0, le=600, description="ffprobe of one input (sandboxed)"
    )
    probe_memory_mb: int = Field(
        default=DEFAULT_PROBE_MEMORY_MB, ge=64, le=65_536, description="memory of the ffprobe sandbox"
    )


class WebhooksSection(_Section):
    """Delivery of job status changes to an envelope's ``callback_url``: signed, retried with backoff.

    ``allow_private_addresses`` lets callbacks reach loopback, private and link-local addresses, and
    ``allow_networks`` (``["10.20.0.0/16"]``) only the networks it names; both off by default, so a
    requester cannot aim the node at services on its own network. Redirects are never followed.
    """

    timeout_seconds: float = Field(default=10.0, gt=0, le=120)
    max_attempts: int = Field(default=12, ge=1, le=100, description="per event; then the node gives up")
    backoff_base_seconds: float = Field(default=1.0, gt=0, le=600)
    backoff_max_seconds: float = Field(default=300.0, gt=0, le=86_400)
    poll_seconds: float = Field(default=0.5, ge=0.01, le=60)
    allow_private_addresses: bool = False
    allow_networks: list[str] = Field(
        default_factory=list, max_length=256, description="networks callbacks may reach though not public"
    )

    @field_validator("allow_networks")
    @classmethod
    def _callback_networks(cls, v: list[str]) -> list[str]:
        parse_networks(v)
        return v


class LoggingSection(_Section):
    """How ``hearth run`` logs: JSON lines (with job and trace id) for journald and collectors, or text."""

    format: Literal["json", "text"] = "json"
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    # Warnings and errors of one kind (logger, level, message template) pass repeat_burst times per
    # window; the rest are counted and reported, so a fault repeated in a loop cannot flood the log.
    repeat_burst: int = Field(default=DEFAULT_LOG_REPEAT_BURST, ge=1, le=100_000)
    repeat_window_seconds: float = Field(default=DEFAULT_LOG_REPEAT_WINDOW_SECONDS, gt=0, le=86_400)


class SchedulerSection(_Section):
    """How accepted jobs are run. ``paused`` keeps accepting and queueing but starts nothing new."""

    paused: bool = False
    drain_grace_seconds: float = Field(default=DEFAULT_DRAIN_GRACE_SECONDS, ge=0, le=86_400)


DEFAULT_CHAIN_CONFIRMATIONS = 3
DEFAULT_WALLET_KEY_FILE = "wallet.key"
DEFAULT_DEVNET_PORT = 8545
DEFAULT_FUNDING_TIMEOUT_SECONDS = 600
DEFAULT_SETTLEMENT_WINDOW_SECONDS = 86_400
DEFAULT_CHAIN_POLL_SECONDS = 2.0
DEFAULT_RPC_TIMEOUT_SECONDS = 10.0
DEFAULT_RPC_BACKOFF_MAX_SECONDS = 10.0
ETH_ADDRESS_PATTERN = r"^0x[0-9a-fA-F]{40}$"


class ChainSection(_Section):
    """The settlement chain: where the escrow and token live and which key pays gas for ``release``.

    ``hearth devnet`` writes this for a local anvil; pointing the node at a real chain means changing
    ``rpc_url``, ``chain_id`` and the two addresses here.
    """

    rpc_url: str = Field(pattern=r"^(https?|wss?)://", max_length=2048)
    chain_id: int = Field(ge=1)
    escrow: str = Field(pattern=ETH_ADDRESS_PATTERN, description="HearthEscrow contract address")
    token: str = Field(pattern=ETH_ADDRESS_PATTERN, description="the USDC (ERC-20) contract address")
    token_name: str = Field(
        default="USD Coin",
        min_length=1,
        max_length=128,
        description="the token's EIP-712 domain name, which payers sign EIP-3009 authorizations under",
    )
    confirmations: int = Field(
        default=DEFAULT_CHAIN_CONFIRMATIONS, ge=0, le=1000, description="blocks before a tx counts as final"
    )
    wallet_key_file: str = Field(
        default=DEFAULT_WALLET_KEY_FILE, min_length=1, description="the node's Ethereum key (mode 0600)"
    )
    funding_timeout_seconds: int = Field(
        default=DEFAULT_FUNDING_TIMEOUT_SECONDS,
        ge=1,
        le=7 * 86_400,
        description="how long an accepted job waits for its escrow funding before it expires",
    )
    settlement_window_seconds: int = Field(
        default=DEFAULT_SETTLEMENT_WINDOW_SECONDS,
        ge=60,
        le=365 * 86_400,
        description="time for validation and release after the job's last possible run (escrow deadline)",
    )
    poll_seconds: float = Field(
        default=DEFAULT_CHAIN_POLL_SECONDS, ge=0.05, le=600, description="how often funding and txs are read"
    )
    rpc_timeout_seconds: float = Field(default=DEFAULT_RPC_TIMEOUT_SECONDS, gt=0, le=300)
    rpc_backoff_max_seconds: float = Field(
        default=DEFAULT_RPC_BACKOFF_MAX_SECONDS,
        gt=0,
        le=3600,
        description="the longest wait between retries while the RPC is down",
    )


DEFAULT_REGISTRY_HEARTBEAT_SECONDS = 60.0
DEFAULT_REGISTRY_CHECK_SECONDS = 1.0
DEFAULT_REGISTRY_TIMEOUT_SECONDS = 10.0
DEFAULT_REGISTRY_BACKOFF_INITIAL_SECONDS = 1.0
DEFAULT_REGISTRY_BACKOFF_MAX_SECONDS = 300.0
MAX_REGISTRIES = 32


class RegistrySection(_Section):
    """Registries the node pushes its signed offer to (POST, the body GET /v1/capacity returns).

    The offer goes to every URL at start, whenever it changes (capacity, prices, models; compared every
    ``check_seconds``) and at least every ``heartbeat_seconds``. A registry that fails is retried after
    ``backoff_initial_seconds``, doubling up to ``backoff_max_seconds``; the others are not held up.
    """

    urls: list[str] = Field(default_factory=list, max_length=MAX_REGISTRIES)
    heartbeat_seconds: float = Field(
        default=DEFAULT_REGISTRY_HEARTBEAT_SECONDS,
        ge=0.1,
        le=86_400,
        description="the longest time between two pushes of an unchanged offer",
    )
    check_seconds: float = Field(
        default=DEFAULT_REGISTRY_CHECK_SECONDS,
        ge=0.01,
        le=600,
        description="how often the offer is compared with the one last pushed",
    )
    timeout_seconds: float = Field(default=DEFAULT_REGISTRY_TIMEOUT_SECONDS, gt=0, le=300)
    backoff_initial_seconds: float = Field(default=DEFAULT_REGISTRY_BACKOFF_INITIAL_SECONDS, gt=0, le=3600)
    backoff_max_seconds: float = Field(
        default=DEFAULT_REGISTRY_BACKOFF_MAX_SECONDS,
        gt=0,
        le=86_400,
        description="the longest wait between retries of a failing registry",
    )

    @field_validator("urls")
    @classmethod
    def _registry_urls(cls, v: list[str]) -> list[str]:
        for url in v:
            shown = url[:80]
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.hostname or len(url) > 2048:
                raise ValueError(f"registry {shown!r} must be an http(s):// URL with a host")
            if parts.username is not None or parts.password is not None:
                # The URL is shown in logs and metrics labels; secrets have no place in it (nor in this
                # message, which names the registry by its host only).
                raise ValueError(f"registry at {parts.hostname!r} must not carry a user or password")
            if parts.fragment:
                raise ValueError(f"registry {shown!r} must not have a #fragment")
        repeated = sorted({url for url in v if v.count(url) > 1})
        if repeated:
            raise ValueError(f"registry URLs must be unique; repeated: {', '.join(repeated)}")
        return v

    @model_validator(mode="after")
    def _backoff_order(self) -> RegistrySection:
        if self.backoff_initial_seconds > self.backoff_max_seconds:
            raise ValueError("backoff_initial_seconds must not exceed backoff_max_seconds")
        return self


MODEL_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,127}$"  # the envelope's output_spec.model


class ModelSection(_Section):
    """One model of the catalog (``[[models]]``): what a ``vllm_batch`` envelope may name.

    ``hearth models add DIR`` writes one of these: it hashes the directory and reads its max context.
    The node re-hashes ``path`` at start and refuses to start when the content is not ``cid`` any more.
    """

    name: str = Field(pattern=MODEL_NAME_PATTERN, description="what envelopes name as output_spec.model")
    path: str = Field(min_length=1, description="the local weights directory (relative: under the home)")
    cid: str = Field(
        pattern=r"^b[a-z2-7]{20,100}$",
        description="content hash: the directory's UnixFS CIDv1 (sha2-256), as `hearth models add` prints",
    )
    max_context: int = Field(ge=16, le=10_000_000, description="prompt + completion tokens per request")
    gpu_memory_mb: int = Field(
        default=0,
        ge=0,
        le=10_000_000,
        description="GPU memory the model needs in all (split over a job's GPUs); 0: it also runs on CPUs",
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    input_1k_tokens: Money | None = Field(default=None, description="price; unset: [pricing] input_1k_tokens")
    output_1k_tokens: Money | None = Field(
        default=None, description="price; unset: [pricing] output_1k_tokens"
    )


class NodeConfig(_Section):
    """The whole of ``node.toml``."""

    node: NodeSection = Field(default_factory=NodeSection)
    api: ApiSection = Field(default_factory=ApiSection)
    pricing: PricingSection = Field(default_factory=PricingSection)
    policy: PolicySection = Field(default_factory=PolicySection)
    capacity: CapacitySection = Field(default_factory=CapacitySection)
    journal: JournalSection = Field(default_factory=JournalSection)
    storage: StorageSection = Field(default_factory=StorageSection)
    sandbox: SandboxSection = Field(default_factory=SandboxSection)
    scheduler: SchedulerSection = Field(default_factory=SchedulerSection)
    logging: LoggingSection = Field(default_factory=LoggingSection)
    webhooks: WebhooksSection = Field(default_factory=WebhooksSection)
    chain: ChainSection | None = None
    registry: RegistrySection = Field(default_factory=RegistrySection)
    models: list[ModelSection] = Field(default_factory=list, max_length=256)

    @field_validator("models")
    @classmethod
    def _model_names_unique(cls, v: list[ModelSection]) -> list[ModelSection]:
        names = [m.name for m in v]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"model names must be unique; repeated: {', '.join(repeated)}")
        return v

    def model(self, name: str) -> ModelSection | None:
        """The catalog entry called ``name``, if there is one."""
        return next((m for m in self.models if m.name == name), None)

    @field_validator("pricing")
    @classmethod
    def _gpu_models_priced(cls, v: PricingSection) -> PricingSection:
        for model in v.gpu_second_by_model:
            if not model.strip():
                raise ValueError("gpu_second_by_model keys must be GPU model names")
        return v


def default_home() -> Path:
    """``$HEARTH_HOME``, else ``/var/lib/hearth`` as root under systemd, else ``~/.hearth``."""
    env = os.environ.get("HEARTH_HOME")
    if env:
        return Path(env)
    if os.geteuid() == 0 and os.environ.get("INVOCATION_ID"):
        return Path("/var/lib/hearth")
    return Path.home() / ".hearth"


def _apply_env(data: dict[str, Any], environ: dict[str, str]) -> dict[str, Any]:
    for key, raw in environ.items():
        if not key.startswith("HEARTH_") or "__" not in key:
            continue
        path = key[len("HEARTH_") :].lower().split("__")
        try:
            value: Any = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw
        node = data
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError("bad_env_override", f"{key} overrides a value that is not a table")
            node = child
        node[path[-1]] = value
    return data


def parse_config(data: dict[str, Any], *, source: str = "node.toml") -> NodeConfig:
    """Validate decoded TOML, raising ``ConfigError`` that names each bad field."""
    try:
        return NodeConfig.model_validate(data)
    except ValidationError as exc:
        problems = [
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}"
            for e in exc.errors(include_url=False, include_input=False)
        ]
        raise ConfigError(
            "invalid_config",
            f"{source} is invalid: " + "; ".join(problems),
            details={"problems": problems, "source": source},
        ) from None


def load_config(home: Path, *, environ: dict[str, str] | None = None, path: Path | None = None) -> NodeConfig:
    """Read ``home/node.toml`` (missing file = all defaults), apply env overrides, validate.

    ``path`` names the file instead (``hearth run --config``: the service keeps it in /etc/hearth, the
    state in its home); it must exist. Relative paths inside still resolve under ``home``.
    """
    if path is not None and not path.is_file():
        raise ConfigError("config_missing", f"no config file at {path}", details={"source": str(path)})
    path = home / CONFIG_FILENAME if path is None else path
    data: dict[str, Any] = {}
    if path.exists():
        try:
            data = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError("invalid_toml", f"{path}: {exc}", details={"source": str(path)}) from None
    data = _apply_env(data, dict(os.environ if environ is None else environ))
    return parse_config(data, source=str(path))


def resolve_path(home: Path, value: str) -> Path:
    p = Path(value)
    return p if p.is_absolute() else home / p


def key_path(home: Path, configured: str, *, credential: str, credentials_dir: Path | None) -> Path:
    """Where to read a key: the systemd credential ``credential`` if the service manager passed one that is
    not blank, else ``configured`` (relative: under ``home``).

    Under the unit in ``systemd/``, LoadCredential= hands the keys over in ``$CREDENTIALS_DIRECTORY``, so
    the service user never reads root's key files; a blank credential is the unit's SetCredential=
    fallback for a key file that does not exist (a node without a wallet).
    """
    if credentials_dir is not None:
        candidate = credentials_dir / credential
        try:
            if candidate.read_bytes().strip():
                return candidate
        except FileNotFoundError:
            pass
    return resolve_path(home, configured)
