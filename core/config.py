"""Node configuration: one TOML file (``node.toml``), validated once at start, with env overrides.

Every default a key has is a named constant of :mod:`core.defaults`; nothing deeper reads the
environment. ``HEARTH_<SECTION>__<KEY>=value`` overrides ``[section] key`` (values parsed as TOML
scalars, falling back to a string), e.g. ``HEARTH_API__PORT=8080``.
"""

from __future__ import annotations

import os
import tomllib
import warnings
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

from core import defaults as d
from core.errors import ConfigError
from core.netpolicy import parse_networks
from core.paths import default_home as default_home
from core.paths import key_path as key_path
from core.paths import resolve_path as resolve_path

CONFIG_FILENAME = "node.toml"
# The systemd credentials (LoadCredential= IDs) that replace [node] key_file and [chain] wallet_key_file.
NODE_KEY_CREDENTIAL = "node.key"
WALLET_KEY_CREDENTIAL = "wallet.key"


def _money_text(value: object) -> object:
    """Accept TOML/env numbers for prices but keep them exact: 2e-05 -> "0.00002"."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return format(Decimal(str(value)), "f")
    return value


JobKind = Literal["ffmpeg_transcode", "vllm_batch"]

Money = Annotated[str, BeforeValidator(_money_text), Field(pattern=r"^(0|[1-9][0-9]{0,11})(\.[0-9]{1,9})?$")]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class NodeSection(_Section):
    """Who the node is and where it keeps its things (relative paths are under the node home)."""

    name: str = Field(default=d.DEFAULT_NODE_NAME, min_length=1, max_length=64)
    key_file: str = d.KEY_FILENAME
    state_dir: str = d.DEFAULT_NODE_STATE_DIR
    public_url: str | None = None


class ApiSection(_Section):
    """The HTTP listener and the limits applied before a request is parsed."""

    host: str = d.DEFAULT_HOST
    port: int = Field(default=d.DEFAULT_PORT, ge=0, le=65535)
    max_body_bytes: int = Field(default=d.DEFAULT_MAX_BODY_BYTES, ge=1024, le=64 * 1024 * 1024)
    clock_skew_seconds: int = Field(default=d.DEFAULT_CLOCK_SKEW_SECONDS, ge=0, le=600)
    max_token_lifetime_seconds: int = Field(default=d.DEFAULT_MAX_TOKEN_LIFETIME_SECONDS, ge=10, le=86_400)
    quote_ttl_seconds: int = Field(default=d.DEFAULT_QUOTE_TTL_SECONDS, ge=5, le=86_400)
    body_timeout_seconds: float = Field(default=d.DEFAULT_BODY_TIMEOUT_SECONDS, gt=0, le=600)
    header_timeout_seconds: float = Field(default=d.DEFAULT_HEADER_TIMEOUT_SECONDS, gt=0, le=600)
    idle_timeout_seconds: float = Field(default=d.DEFAULT_IDLE_TIMEOUT_SECONDS, gt=0, le=3600)
    max_connections: int = Field(default=d.DEFAULT_MAX_CONNECTIONS, ge=1, le=1_000_000)
    reserved_descriptors: int = Field(default=d.DEFAULT_RESERVED_DESCRIPTORS, ge=1, le=1_000_000)
    max_header_line_bytes: int = Field(default=d.DEFAULT_MAX_HEADER_LINE_BYTES, ge=1024, le=65_536)


class SurgeSection(_Section):
    """Prices rise linearly from ``threshold`` utilisation up to ``max_factor`` at full load."""

    threshold: float = Field(default=d.DEFAULT_PRICING_SURGE_THRESHOLD, ge=0, le=1)
    max_factor: float = Field(default=d.DEFAULT_PRICING_SURGE_MAX_FACTOR, ge=1, le=100)


class PricingScriptSection(_Section):
    """An operator program: reads the bid context as JSON on stdin, prints a price; failure means no bid."""

    path: str
    timeout_seconds: float = Field(default=d.DEFAULT_PRICING_SCRIPT_TIMEOUT_SECONDS, gt=0, le=30)


class PricingSection(_Section):
    """Operator prices, in currency units (USDC), as decimal strings."""

    currency: Literal["usdc"] = d.DEFAULT_PRICING_CURRENCY
    cpu_second: Money = d.DEFAULT_PRICING_CPU_SECOND
    gpu_second: Money = d.DEFAULT_PRICING_GPU_SECOND
    gpu_second_by_model: dict[str, Money] = Field(
        default_factory=lambda: dict(d.DEFAULT_PRICING_GPU_SECOND_BY_MODEL)
    )
    output_mb: Money = d.DEFAULT_PRICING_OUTPUT_MB
    input_1k_tokens: Money = d.DEFAULT_PRICING_INPUT_1K_TOKENS
    output_1k_tokens: Money = d.DEFAULT_PRICING_OUTPUT_1K_TOKENS
    minimum_per_job: Money = d.DEFAULT_PRICING_MINIMUM_PER_JOB
    surge: SurgeSection = Field(default_factory=SurgeSection)
    script: PricingScriptSection | None = None

    def dec(self, name: str) -> Decimal:
        return Decimal(getattr(self, name))


class PolicySection(_Section):
    """Screening applied before any capacity is reserved. Empty allow list means everyone not denied."""

    allow_dids: list[str] = Field(default_factory=lambda: list(d.DEFAULT_POLICY_ALLOW_DIDS))
    deny_dids: list[str] = Field(default_factory=lambda: list(d.DEFAULT_POLICY_DENY_DIDS))
    kinds: list[JobKind] = Field(default_factory=lambda: list(d.DEFAULT_POLICY_KINDS))
    max_timeout_seconds: int = Field(default=d.DEFAULT_POLICY_MAX_TIMEOUT_SECONDS, ge=1)
    max_output_mb: int = Field(default=d.DEFAULT_POLICY_MAX_OUTPUT_MB, ge=1)
    max_cpus: float = Field(default=d.DEFAULT_POLICY_MAX_CPUS, gt=0)
    max_memory_mb: int = Field(default=d.DEFAULT_POLICY_MAX_MEMORY_MB, ge=64)
    max_gpus: int = Field(default=d.DEFAULT_POLICY_MAX_GPUS, ge=0)
    per_did_concurrency: int = Field(default=d.DEFAULT_PER_DID_CONCURRENCY, ge=1)
    retry_budget: int = Field(default=d.DEFAULT_RETRY_BUDGET, ge=0, le=10)


class CapacitySection(_Section):
    """What the node offers. ``auto`` reads the machine (psutil, NVML); numbers cap it."""

    cpus: float | Literal["auto"] = d.DEFAULT_CAPACITY_CPUS
    memory_mb: int | Literal["auto"] = d.DEFAULT_CAPACITY_MEMORY_MB
    gpus: int | Literal["auto"] = d.DEFAULT_CAPACITY_GPUS
    reserve_cpus: float = Field(default=d.DEFAULT_CAPACITY_RESERVE_CPUS, ge=0)  # CPUs kept back for the host
    reserve_memory_mb: int = Field(default=d.DEFAULT_CAPACITY_RESERVE_MEMORY_MB, ge=0)
    # sell up to this multiple of CPU and memory; excess queues
    overcommit: float = Field(default=d.DEFAULT_CAPACITY_OVERCOMMIT, ge=1.0, le=1000.0)
    # Unfunded holds cost their requester nothing, so they may take only shares of each resource: all of
    # them together (quote_hold_share) and one requester's (per_requester_hold_share).
    quote_hold_share: float = Field(default=d.DEFAULT_QUOTE_HOLD_SHARE, ge=0, le=1)
    per_requester_hold_share: float = Field(default=d.DEFAULT_PER_REQUESTER_HOLD_SHARE, ge=0, le=1)
    # Retry-After of a 503 that only running or funded jobs (no known end) cause
    busy_retry_after_seconds: int = Field(default=d.DEFAULT_BUSY_RETRY_AFTER_SECONDS, ge=1, le=3600)


class JournalSection(_Section):
    """The SQLite journal. ``normal`` survives a crash of the daemon; ``full`` also a power cut."""

    filename: str = d.DEFAULT_JOURNAL_FILENAME
    synchronous: Literal["normal", "full"] = d.DEFAULT_JOURNAL_SYNCHRONOUS


class StorageSection(_Section):
    """The local blockstore, the blob upload cap and the IPFS gateways inputs are fetched from."""

    blocks_dir: str = d.DEFAULT_STORAGE_BLOCKS_DIR
    max_blob_mb: int = Field(default=d.DEFAULT_MAX_BLOB_MB, ge=1, le=1_000_000)
    # longest pause mid-upload of a blob
    upload_stall_seconds: float = Field(default=d.DEFAULT_UPLOAD_STALL_SECONDS, gt=0, le=3600)
    max_input_mb: int = Field(default=d.DEFAULT_MAX_INPUT_MB, ge=1, le=1_000_000)
    # trustless gateways for ipfs:// inputs
    gateways: list[str] = Field(default_factory=lambda: list(d.DEFAULT_STORAGE_GATEWAYS))
    # whole fetch of one input
    fetch_timeout_seconds: float = Field(default=d.DEFAULT_FETCH_TIMEOUT_SECONDS, gt=0, le=3600)
    connect_timeout_seconds: float = Field(default=d.DEFAULT_FETCH_CONNECT_TIMEOUT_SECONDS, gt=0, le=300)
    # longest stall mid-download
    read_timeout_seconds: float = Field(default=d.DEFAULT_FETCH_READ_TIMEOUT_SECONDS, gt=0, le=3600)
    verify_reads: bool = d.DEFAULT_STORAGE_VERIFY_READS  # re-hash every block read from disk
    # how long a quote waits for its input to probe it; past that it prices on limits
    quote_fetch_timeout_seconds: float = Field(default=d.DEFAULT_QUOTE_FETCH_TIMEOUT_SECONDS, gt=0, le=600)
    # The address policy of https:// inputs (core/netpolicy.py): requester-named URLs may reach only public
    # addresses unless allow_private_addresses (loopback, private, link-local) or allow_networks (those
    # networks) allow more. Configured gateways are the operator's and are trusted as named.
    allow_private_addresses: bool = d.DEFAULT_STORAGE_ALLOW_PRIVATE_ADDRESSES
    allow_networks: list[str] = Field(
        default_factory=lambda: list(d.DEFAULT_STORAGE_ALLOW_NETWORKS), max_length=256
    )
    # redirects an https input may follow
    max_redirects: int = Field(default=d.DEFAULT_INPUT_MAX_REDIRECTS, ge=0, le=20)

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
    """The Docker engine and the per-container controls every workload runs under (the README's Execution)."""

    docker_url: str = d.DEFAULT_DOCKER_URL
    ffmpeg_image: str = d.DEFAULT_SANDBOX_FFMPEG_IMAGE  # tag; the node runs its image ID
    vllm_cpu_image: str = d.DEFAULT_SANDBOX_VLLM_CPU_IMAGE  # vLLM for jobs without a GPU
    vllm_gpu_image: str = d.DEFAULT_SANDBOX_VLLM_GPU_IMAGE  # vLLM for jobs given GPUs
    # /dev/shm for vLLM's worker processes
    vllm_shm_mb: int = Field(default=d.DEFAULT_VLLM_SHM_MB, ge=64, le=65_536)
    pids_limit: int = Field(default=d.DEFAULT_PIDS_LIMIT, ge=8, le=65_536)
    tmpfs_mb: int = Field(default=d.DEFAULT_TMPFS_MB, ge=1, le=65_536)
    work_dir: str = d.DEFAULT_SANDBOX_WORK_DIR
    # numeric uid:gid inside the container; never root
    user: str = Field(default=d.DEFAULT_SANDBOX_USER, pattern=r"^[1-9][0-9]{0,9}:[0-9]{1,10}$")
    docker_timeout_seconds: float = Field(default=d.DEFAULT_DOCKER_API_TIMEOUT_SECONDS, gt=0, le=600)
    # how often the output cap is checked
    output_poll_seconds: float = Field(default=d.DEFAULT_OUTPUT_POLL_SECONDS, ge=0.01, le=10)
    stderr_tail_bytes: int = Field(default=d.DEFAULT_STDERR_TAIL_BYTES, ge=256, le=1024 * 1024)
    # ffprobe of one input (sandboxed)
    probe_timeout_seconds: float = Field(default=d.DEFAULT_PROBE_TIMEOUT_SECONDS, gt=0, le=600)
    # memory of the ffprobe sandbox
    probe_memory_mb: int = Field(default=d.DEFAULT_PROBE_MEMORY_MB, ge=64, le=65_536)


class GpuSection(_Section):
    """The GPU self-test (DESIGN §15): measured figures for the offer, and health checks that withhold a GPU.

    ``selftest`` runs, per GPU, a short matmul and a memory bandwidth run in the sandbox (the vLLM GPU image)
    and reads NVML health, at start (in the background) and every ``selftest_hours`` (0: only at start). A
    GPU hotter than ``max_temperature_c``, with more than ``max_ecc_uncorrected`` uncorrected ECC errors,
    a failed or pending row remap, one of ``withhold_throttle_reasons``, or measured below ``min_tflops`` or
    ``min_memory_bandwidth_gbs`` (0: not judged) is withheld from capacity until a later test passes.
    """

    selftest: bool = d.DEFAULT_GPU_SELFTEST
    selftest_hours: float = Field(default=d.DEFAULT_GPU_SELFTEST_HOURS, ge=0, le=8760)
    selftest_timeout_seconds: float = Field(default=d.DEFAULT_GPU_SELFTEST_TIMEOUT_SECONDS, gt=0, le=3600)
    selftest_memory_mb: int = Field(default=d.DEFAULT_GPU_SELFTEST_MEMORY_MB, ge=512, le=1_000_000)
    max_temperature_c: int = Field(default=d.DEFAULT_GPU_MAX_TEMPERATURE_C, ge=30, le=120)
    max_ecc_uncorrected: int = Field(default=d.DEFAULT_GPU_MAX_ECC_UNCORRECTED, ge=0, le=1_000_000)
    withhold_throttle_reasons: list[d.GpuThrottleReason] = Field(
        default_factory=lambda: list(d.DEFAULT_GPU_WITHHOLD_THROTTLE_REASONS), max_length=8
    )
    min_tflops: float = Field(default=d.DEFAULT_GPU_MIN_TFLOPS, ge=0, le=1_000_000)
    min_memory_bandwidth_gbs: float = Field(
        default=d.DEFAULT_GPU_MIN_MEMORY_BANDWIDTH_GBS, ge=0, le=1_000_000
    )


class WebhooksSection(_Section):
    """Delivery of job status changes to an envelope's ``callback_url``: signed, retried with backoff.

    ``allow_private_addresses`` lets callbacks reach loopback, private and link-local addresses, and
    ``allow_networks`` (``["10.20.0.0/16"]``) only the networks it names; both off by default, so a
    requester cannot aim the node at services on its own network. Redirects are never followed.
    """

    timeout_seconds: float = Field(default=d.DEFAULT_WEBHOOKS_TIMEOUT_SECONDS, gt=0, le=120)
    # per event; then the node gives up
    max_attempts: int = Field(default=d.DEFAULT_WEBHOOKS_MAX_ATTEMPTS, ge=1, le=100)
    backoff_base_seconds: float = Field(default=d.DEFAULT_WEBHOOKS_BACKOFF_BASE_SECONDS, gt=0, le=600)
    backoff_max_seconds: float = Field(default=d.DEFAULT_WEBHOOKS_BACKOFF_MAX_SECONDS, gt=0, le=86_400)
    poll_seconds: float = Field(default=d.DEFAULT_WEBHOOKS_POLL_SECONDS, ge=0.01, le=60)
    allow_private_addresses: bool = d.DEFAULT_WEBHOOKS_ALLOW_PRIVATE_ADDRESSES
    # networks callbacks may reach though not public
    allow_networks: list[str] = Field(
        default_factory=lambda: list(d.DEFAULT_WEBHOOKS_ALLOW_NETWORKS), max_length=256
    )

    @field_validator("allow_networks")
    @classmethod
    def _callback_networks(cls, v: list[str]) -> list[str]:
        parse_networks(v)
        return v


class LoggingSection(_Section):
    """How ``hearth run`` logs: JSON lines (with job and trace id) for journald and collectors, or text."""

    format: Literal["json", "text"] = d.DEFAULT_LOGGING_FORMAT
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = d.DEFAULT_LOGGING_LEVEL
    # Warnings and errors of one kind pass repeat_burst times per window; the rest are counted and reported.
    repeat_burst: int = Field(default=d.DEFAULT_LOG_REPEAT_BURST, ge=1, le=100_000)
    repeat_window_seconds: float = Field(default=d.DEFAULT_LOG_REPEAT_WINDOW_SECONDS, gt=0, le=86_400)


class SchedulerSection(_Section):
    """How accepted jobs are run. ``paused`` keeps accepting and queueing but starts nothing new."""

    paused: bool = d.DEFAULT_SCHEDULER_PAUSED
    drain_grace_seconds: float = Field(default=d.DEFAULT_DRAIN_GRACE_SECONDS, ge=0, le=86_400)


ETH_ADDRESS_PATTERN = r"^0x[0-9a-fA-F]{40}$"


class ChainSection(_Section):
    """The settlement chain: where the escrow and token live and which key pays gas for ``release``.

    ``hearth devnet`` writes this for a local anvil; pointing the node at a real chain means changing
    ``rpc_url``, ``chain_id`` and the two addresses here.
    """

    rpc_url: str = Field(pattern=r"^(https?|wss?)://", max_length=2048)
    chain_id: int = Field(ge=1)
    escrow: str = Field(pattern=ETH_ADDRESS_PATTERN)  # HearthEscrow contract address
    token: str = Field(pattern=ETH_ADDRESS_PATTERN)  # the USDC (ERC-20) contract address
    # the token's EIP-712 domain name, which payers sign EIP-3009 authorizations under
    token_name: str = Field(default=d.DEFAULT_CHAIN_TOKEN_NAME, min_length=1, max_length=128)
    # blocks before a tx counts as final
    confirmations: int = Field(default=d.DEFAULT_CHAIN_CONFIRMATIONS, ge=0, le=1000)
    # the node's Ethereum key (mode 0600)
    wallet_key_file: str = Field(default=d.DEFAULT_WALLET_KEY_FILE, min_length=1)
    # how long an accepted job waits for its escrow funding before it expires
    funding_timeout_seconds: int = Field(default=d.DEFAULT_FUNDING_TIMEOUT_SECONDS, ge=1, le=7 * 86_400)
    # time for validation and release after the job's last possible run (escrow deadline)
    settlement_window_seconds: int = Field(
        default=d.DEFAULT_SETTLEMENT_WINDOW_SECONDS, ge=60, le=365 * 86_400
    )
    # how often funding and txs are read
    poll_seconds: float = Field(default=d.DEFAULT_CHAIN_POLL_SECONDS, ge=0.05, le=600)
    rpc_timeout_seconds: float = Field(default=d.DEFAULT_RPC_TIMEOUT_SECONDS, gt=0, le=300)
    # the longest wait between retries while the RPC is down
    rpc_backoff_max_seconds: float = Field(default=d.DEFAULT_RPC_BACKOFF_MAX_SECONDS, gt=0, le=3600)


MAX_REGISTRIES = 32


class RegistrySection(_Section):
    """Registries the node pushes its signed offer to (POST, the body GET /v1/capacity returns).

    The offer goes to every URL at start, whenever it changes (capacity, prices, models; compared every
    ``check_seconds``) and at least every ``heartbeat_seconds``. A registry that fails is retried after
    ``backoff_initial_seconds``, doubling up to ``backoff_max_seconds``; the others are not held up.
    """

    urls: list[str] = Field(default_factory=lambda: list(d.DEFAULT_REGISTRY_URLS), max_length=MAX_REGISTRIES)
    # the longest time between two pushes of an unchanged offer
    heartbeat_seconds: float = Field(default=d.DEFAULT_REGISTRY_HEARTBEAT_SECONDS, ge=0.1, le=86_400)
    # how often the offer is compared with the one last pushed
    check_seconds: float = Field(default=d.DEFAULT_REGISTRY_CHECK_SECONDS, ge=0.01, le=600)
    timeout_seconds: float = Field(default=d.DEFAULT_REGISTRY_TIMEOUT_SECONDS, gt=0, le=300)
    backoff_initial_seconds: float = Field(default=d.DEFAULT_REGISTRY_BACKOFF_INITIAL_SECONDS, gt=0, le=3600)
    # the longest wait between retries of a failing registry
    backoff_max_seconds: float = Field(default=d.DEFAULT_REGISTRY_BACKOFF_MAX_SECONDS, gt=0, le=86_400)

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


# ``register`` is also a method of every model class (ABCMeta.register, through pydantic's metaclass); the
# field shadows it harmlessly, since instances never see metaclass methods, so pydantic's warning is muted.
with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message='Field name "register"', category=UserWarning)

    class MarketSection(_Section):
        """The on-chain provider registry (``HearthRegistry``) the node lists itself in.

        With ``registry`` (the contract's address, on the ``[chain]`` chain) and a public ``endpoint``
        set and ``register`` on, the node registers its DID and endpoint from its wallet at start, or
        updates its record when it differs. ``hearth devnet`` writes ``registry``.
        """

        registry: str | None = Field(default=d.DEFAULT_MARKET_REGISTRY, pattern=ETH_ADDRESS_PATTERN)
        # the URL requesters reach this node at, as registered (its signed offer names the same)
        endpoint: str | None = d.DEFAULT_MARKET_ENDPOINT
        # whether the node registers (or updates) itself at start
        register: bool = d.DEFAULT_MARKET_REGISTER

        @field_validator("endpoint")
        @classmethod
        def _endpoint_url(cls, v: str | None) -> str | None:
            if v is None:
                return v
            parts = urlsplit(v)
            if parts.scheme not in ("http", "https") or not parts.hostname or len(v.encode()) > 2048:
                raise ValueError(
                    f"endpoint {v[:80]!r} must be an http(s):// URL with a host, at most 2048 bytes"
                )
            if parts.username is not None or parts.password is not None:
                raise ValueError(f"endpoint at {parts.hostname!r} must not carry a user or password")
            return v


class ClusterSection(_Section):
    """The machines attempts run on (docs/operating.md): without ``[cluster]`` every container runs on
    this machine; with it, each run is a task on a worker of a Ray cluster, the node staying its head.

    ``address`` is the Ray head's ``host:port``, or ``"local"`` to start a Ray instance on this machine
    (development). ``head_url`` is where workers fetch inputs from (this node's gateway); without it, the
    node's endpoint, else the address its API listens on.
    """

    engine: d.ClusterEngine = d.DEFAULT_CLUSTER_ENGINE
    address: str = Field(default=d.DEFAULT_CLUSTER_ADDRESS, min_length=1, max_length=255)
    head_url: str | None = d.DEFAULT_CLUSTER_HEAD_URL
    connect_timeout_seconds: float = Field(default=d.DEFAULT_CLUSTER_CONNECT_TIMEOUT_SECONDS, gt=0, le=3600)
    placement_timeout_seconds: float = Field(
        default=d.DEFAULT_CLUSTER_PLACEMENT_TIMEOUT_SECONDS, gt=0, le=86_400
    )
    refresh_seconds: float = Field(default=d.DEFAULT_CLUSTER_REFRESH_SECONDS, ge=0.5, le=3600)

    @field_validator("address")
    @classmethod
    def _address(cls, v: str) -> str:
        if v == "local":
            return v
        host, sep, port = v.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536 or "/" in v:
            raise ValueError(f'address {v[:80]!r} must be the Ray head\'s host:port, or "local"')
        return v

    @field_validator("head_url")
    @classmethod
    def _head_url(cls, v: str | None) -> str | None:
        if v is None:
            return v
        parts = urlsplit(v)
        if parts.scheme not in ("http", "https") or not parts.hostname or len(v.encode()) > 2048:
            raise ValueError(f"head_url {v[:80]!r} must be an http(s):// URL with a host, at most 2048 bytes")
        return v.rstrip("/")


MODEL_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,127}$"  # the envelope's output_spec.model


class ModelSection(_Section):
    """One model of the catalog (``[[models]]``): what a ``vllm_batch`` envelope may name.

    ``hearth models add DIR`` writes one of these: it hashes the directory and reads its max context.
    The node re-hashes ``path`` at start and refuses to start when the content is not ``cid`` any more.
    """

    name: str = Field(pattern=MODEL_NAME_PATTERN)  # what envelopes name as output_spec.model
    path: str = Field(min_length=1)  # the local weights directory (relative: under the home)
    # content hash: the directory's UnixFS CIDv1 (sha2-256), as `hearth models add` prints
    cid: str = Field(pattern=r"^b[a-z2-7]{20,100}$")
    max_context: int = Field(ge=16, le=10_000_000)  # prompt + completion tokens per request
    # GPU memory the model needs in all (split over a job's GPUs); 0: it also runs on CPUs
    gpu_memory_mb: int = Field(default=d.DEFAULT_MODEL_GPU_MEMORY_MB, ge=0, le=10_000_000)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = d.DEFAULT_MODEL_DTYPE
    # price; unset: [pricing] input_1k_tokens
    input_1k_tokens: Money | None = None
    # price; unset: [pricing] output_1k_tokens
    output_1k_tokens: Money | None = None
    # a warm engine (DESIGN §15): one long-lived vLLM server for this model's batches
    warm: bool = d.DEFAULT_MODEL_WARM
    preload: bool = d.DEFAULT_MODEL_PRELOAD  # start it with the node (else at the first job)
    max_idle_seconds: float = Field(default=d.DEFAULT_MODEL_MAX_IDLE_SECONDS, gt=0, le=31_536_000)
    warm_cpus: float = Field(default=d.DEFAULT_MODEL_WARM_CPUS, gt=0, le=1024)
    warm_memory_mb: int = Field(default=d.DEFAULT_MODEL_WARM_MEMORY_MB, ge=0, le=100_000_000)
    warm_gpus: int = Field(default=d.DEFAULT_MODEL_WARM_GPUS, ge=0, le=64)
    warm_concurrency: int = Field(default=d.DEFAULT_MODEL_WARM_CONCURRENCY, ge=1, le=1024)
    warm_start_seconds: float = Field(default=d.DEFAULT_MODEL_WARM_START_SECONDS, gt=0, le=86_400)


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
    gpu: GpuSection = Field(default_factory=GpuSection)
    logging: LoggingSection = Field(default_factory=LoggingSection)
    webhooks: WebhooksSection = Field(default_factory=WebhooksSection)
    chain: ChainSection | None = None
    registry: RegistrySection = Field(default_factory=RegistrySection)
    market: MarketSection = Field(default_factory=MarketSection)
    cluster: ClusterSection | None = None
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

    @property
    def endpoint(self) -> str | None:
        """Where requesters reach this node, as its signed offer and its registry record name it:
        ``[market] endpoint``, else ``[node] public_url`` (they may not differ when both are set)."""
        return self.market.endpoint or self.node.public_url

    @model_validator(mode="after")
    def _one_endpoint(self) -> NodeConfig:
        market, public = self.market.endpoint, self.node.public_url
        if market is not None and public is not None and market != public:
            raise ValueError(
                f"market.endpoint {market!r} and node.public_url {public!r} differ: the registry and the "
                "signed offer must name one endpoint; set one of them, or both alike"
            )
        return self

    @field_validator("pricing")
    @classmethod
    def _gpu_models_priced(cls, v: PricingSection) -> PricingSection:
        for model in v.gpu_second_by_model:
            if not model.strip():
                raise ValueError("gpu_second_by_model keys must be GPU model names")
        return v


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
