"""Every default of ``node.toml``, named: what a node does with an empty file (or none at all).

The sections of :mod:`core.config` take each default from here and nowhere else; modules that need a
default outside a loaded config (the CLI's flags, the sandbox runner's keyword arguments, the JWT checks)
import it from here too. Names follow ``DEFAULT_<SECTION>_<KEY>``, except those older than this module
(``DEFAULT_PORT``, ``DEFAULT_MAX_BLOB_MB``, ...), which keep their names. Keys whose absence means
"unset" (``[node] public_url``, ``[pricing.script]``, ``[chain]``, a model's own token prices) have no
default and are not listed; neither are the keys a section requires (``[chain] rpc_url``, a model's
``cid``). Collections are tuples here; the sections copy them into fresh lists.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Final, Literal

# [node]: who the node is and where it keeps its things (relative paths are under the node home).
DEFAULT_NODE_NAME: Final = "hearth-node"
KEY_FILENAME: Final = "node.key"  # [node] key_file: the node DID's Ed25519 key
DEFAULT_NODE_STATE_DIR: Final = "state"  # holds the journal

# [api]: the HTTP listener and the limits applied before a request is parsed.
DEFAULT_HOST: Final = "127.0.0.1"  # loopback: exposing the node is the operator's choice
DEFAULT_PORT: Final = 8787
DEFAULT_MAX_BODY_BYTES: Final = 256 * 1024  # refused before parsing when larger
DEFAULT_CLOCK_SKEW_SECONDS: Final = 60  # tolerated difference between a token's clock and ours
DEFAULT_MAX_TOKEN_LIFETIME_SECONDS: Final = 3600
DEFAULT_QUOTE_TTL_SECONDS: Final = 300
DEFAULT_BODY_TIMEOUT_SECONDS: Final = 10.0  # a signed request or receipt body must arrive whole within this
# The HTTP connection layer (node/http_guard.py): timeouts, the cap on open connections (clamped below
# RLIMIT_NOFILE less the reserve) and the longest request or header line aiohttp's parser accepts.
DEFAULT_HEADER_TIMEOUT_SECONDS: Final = 10.0
DEFAULT_IDLE_TIMEOUT_SECONDS: Final = 60.0
DEFAULT_MAX_CONNECTIONS: Final = 1024
DEFAULT_RESERVED_DESCRIPTORS: Final = 256
DEFAULT_MAX_HEADER_LINE_BYTES: Final = 8190  # aiohttp's own default

# [pricing]: operator prices in USDC, as exact decimal strings.
DEFAULT_PRICING_CURRENCY: Final = "usdc"  # the only settlement currency
DEFAULT_PRICING_CPU_SECOND: Final = "0.00002"
DEFAULT_PRICING_GPU_SECOND: Final = "0.0005"
DEFAULT_PRICING_GPU_SECOND_BY_MODEL: Final[Mapping[str, str]] = MappingProxyType({})  # every GPU: gpu_second
DEFAULT_PRICING_OUTPUT_MB: Final = "0.0001"
DEFAULT_PRICING_INPUT_1K_TOKENS: Final = "0.0002"
DEFAULT_PRICING_OUTPUT_1K_TOKENS: Final = "0.0006"
DEFAULT_PRICING_MINIMUM_PER_JOB: Final = "0.01"
# [pricing.surge]: prices rise linearly from `threshold` utilisation up to `max_factor` at full load.
DEFAULT_PRICING_SURGE_THRESHOLD: Final = 0.5
DEFAULT_PRICING_SURGE_MAX_FACTOR: Final = 2.0
# [pricing.script]: an operator program that prices a bid; absent unless configured.
DEFAULT_PRICING_SCRIPT_TIMEOUT_SECONDS: Final = 2.0  # past this the script has failed: no bid

# [policy]: screening applied before any capacity is reserved.
DEFAULT_POLICY_ALLOW_DIDS: Final[tuple[str, ...]] = ()  # empty: anyone not denied
DEFAULT_POLICY_DENY_DIDS: Final[tuple[str, ...]] = ()
# every kind the node can run (core.config.JobKind; tests/core/test_config.py keeps the two alike)
DEFAULT_POLICY_KINDS: Final[tuple[Literal["ffmpeg_transcode", "vllm_batch"], ...]] = (
    "ffmpeg_transcode",
    "vllm_batch",
)
DEFAULT_POLICY_MAX_TIMEOUT_SECONDS: Final = 3600
DEFAULT_POLICY_MAX_OUTPUT_MB: Final = 2048
DEFAULT_POLICY_MAX_CPUS: Final = 4  # an int, as node.toml writes it; the field takes fractions too
DEFAULT_POLICY_MAX_MEMORY_MB: Final = 8192
DEFAULT_POLICY_MAX_GPUS: Final = 1
DEFAULT_PER_DID_CONCURRENCY: Final = 4  # jobs of one requester that may hold resources at once
DEFAULT_RETRY_BUDGET: Final = 2  # times a job whose run failed retryably is queued again

# [capacity]: what the node offers. "auto" reads the machine (psutil, NVML); numbers cap it.
DEFAULT_CAPACITY_CPUS: Final = "auto"
DEFAULT_CAPACITY_MEMORY_MB: Final = "auto"
DEFAULT_CAPACITY_GPUS: Final = "auto"
DEFAULT_CAPACITY_RESERVE_CPUS: Final = 0.0
DEFAULT_CAPACITY_RESERVE_MEMORY_MB: Final = 512  # kept back for the host: the daemon, Docker, the kernel
DEFAULT_CAPACITY_OVERCOMMIT: Final = 1.0  # sell no more than the machine has
# Unfunded holds (quotes, and accepted jobs awaiting funding) cost their requester nothing, so they may
# take only these shares of the total; a quote beyond them is issued but holds nothing (README, Bidding).
DEFAULT_QUOTE_HOLD_SHARE: Final = 0.5
DEFAULT_PER_REQUESTER_HOLD_SHARE: Final = 0.25
DEFAULT_BUSY_RETRY_AFTER_SECONDS: Final = 30  # Retry-After of a 503 caused by jobs with no known end

# [journal]: the SQLite journal, under [node] state_dir.
DEFAULT_JOURNAL_FILENAME: Final = "journal.sqlite3"
DEFAULT_JOURNAL_SYNCHRONOUS: Final = "normal"  # survives a crash of the daemon; "full" also a power cut

# [storage]: the local blockstore, the blob upload cap and the IPFS gateways inputs are fetched from.
DEFAULT_STORAGE_BLOCKS_DIR: Final = "blocks"
DEFAULT_MAX_BLOB_MB: Final = 2048
DEFAULT_UPLOAD_STALL_SECONDS: Final = 30.0
DEFAULT_MAX_INPUT_MB: Final = 4096
DEFAULT_STORAGE_GATEWAYS: Final[tuple[str, ...]] = ()  # none: ipfs:// inputs only from the local blockstore
DEFAULT_FETCH_TIMEOUT_SECONDS: Final = 600.0
DEFAULT_FETCH_CONNECT_TIMEOUT_SECONDS: Final = 10.0
DEFAULT_FETCH_READ_TIMEOUT_SECONDS: Final = 60.0
DEFAULT_STORAGE_VERIFY_READS: Final = True  # a block corrupted on disk is caught, not served
DEFAULT_QUOTE_FETCH_TIMEOUT_SECONDS: Final = 20.0
# The address policy of https:// inputs (core/netpolicy.py): requester-named URLs reach only public
# addresses unless these allow more, so a requester cannot aim the node at its own network.
DEFAULT_STORAGE_ALLOW_PRIVATE_ADDRESSES: Final = False
DEFAULT_STORAGE_ALLOW_NETWORKS: Final[tuple[str, ...]] = ()
DEFAULT_INPUT_MAX_REDIRECTS: Final = 5  # each hop checked by the address policy before it is requested

# [sandbox]: the Docker engine and the per-container controls every workload runs under (the README's
# Execution).
DEFAULT_DOCKER_URL: Final = "unix:///var/run/docker.sock"
# Image tags (built from sandbox/images/); the node resolves each to its image ID and runs that.
DEFAULT_SANDBOX_FFMPEG_IMAGE: Final = "hearth/ffmpeg:latest"
DEFAULT_SANDBOX_VLLM_CPU_IMAGE: Final = "hearth/vllm-cpu:latest"
DEFAULT_SANDBOX_VLLM_GPU_IMAGE: Final = "hearth/vllm-gpu:latest"
DEFAULT_VLLM_SHM_MB: Final = 512
DEFAULT_PIDS_LIMIT: Final = 256
DEFAULT_TMPFS_MB: Final = 256
DEFAULT_SANDBOX_WORK_DIR: Final = "work"  # per-job directories, under [node] state_dir
DEFAULT_SANDBOX_USER: Final = "10001:10001"  # the fixed non-root uid:gid the images in sandbox/images/ create
DEFAULT_DOCKER_API_TIMEOUT_SECONDS: Final = 30.0
DEFAULT_OUTPUT_POLL_SECONDS: Final = 0.25
DEFAULT_STDERR_TAIL_BYTES: Final = 8192  # the end of a run's stderr that is kept
# ffprobe reads headers only: it runs in a sandbox with a small, fixed share of its own.
DEFAULT_PROBE_TIMEOUT_SECONDS: Final = 60.0
DEFAULT_PROBE_MEMORY_MB: Final = 256

# [gpu]: the GPU self-test (DESIGN §15): each GPU measured (a matmul and a memory bandwidth run in the
# sandbox) and its NVML health read, at start and then every selftest_hours; a GPU failing a health check
# is withheld from capacity.
GpuThrottleReason = Literal[
    "hw_slowdown", "hw_thermal_slowdown", "sw_thermal_slowdown", "hw_power_brake", "sw_power_cap"
]
DEFAULT_GPU_SELFTEST: Final = True
DEFAULT_GPU_SELFTEST_HOURS: Final = 24.0  # 0: only at start
DEFAULT_GPU_SELFTEST_TIMEOUT_SECONDS: Final = 180.0  # one GPU's sandboxed run, CUDA start-up included
DEFAULT_GPU_SELFTEST_MEMORY_MB: Final = 8192  # host memory of that run (PyTorch and the CUDA context)
DEFAULT_GPU_MAX_TEMPERATURE_C: Final = 85  # hotter than this at rest: withheld
DEFAULT_GPU_MAX_ECC_UNCORRECTED: Final = 0  # volatile (since the driver loaded) uncorrected ECC errors
# Clock throttle reasons that mean a fault (cooling, power delivery), not load: any of them withholds.
DEFAULT_GPU_WITHHOLD_THROTTLE_REASONS: Final[tuple[GpuThrottleReason, ...]] = (
    "hw_slowdown",
    "hw_thermal_slowdown",
    "sw_thermal_slowdown",
    "hw_power_brake",
)
DEFAULT_GPU_MIN_TFLOPS: Final = 0.0  # 0: the matmul's TFLOP/s is reported, not judged
DEFAULT_GPU_MIN_MEMORY_BANDWIDTH_GBS: Final = 0.0  # 0: the bandwidth is reported, not judged

# [scheduler]: how accepted jobs are run.
DEFAULT_SCHEDULER_PAUSED: Final = False
DEFAULT_DRAIN_GRACE_SECONDS: Final = 30.0  # on SIGTERM: how long running jobs get to finish

# [logging]: how `hearth run` logs.
DEFAULT_LOGGING_FORMAT: Final = "json"  # JSON lines, with job and trace id, for journald and collectors
DEFAULT_LOGGING_LEVEL: Final = "INFO"
# Warnings and errors of one kind (logger, level, message template) pass repeat_burst times per window;
# the rest are counted and reported, so a fault repeated in a loop cannot flood the log.
DEFAULT_LOG_REPEAT_BURST: Final = 10
DEFAULT_LOG_REPEAT_WINDOW_SECONDS: Final = 60.0

# [webhooks]: delivery of job status changes to an envelope's callback_url, retried with backoff
# (base doubling per attempt, up to max).
DEFAULT_WEBHOOKS_TIMEOUT_SECONDS: Final = 10.0
DEFAULT_WEBHOOKS_MAX_ATTEMPTS: Final = 12
DEFAULT_WEBHOOKS_BACKOFF_BASE_SECONDS: Final = 1.0
DEFAULT_WEBHOOKS_BACKOFF_MAX_SECONDS: Final = 300.0
DEFAULT_WEBHOOKS_POLL_SECONDS: Final = 0.5  # longest wait between delivery rounds when nothing wakes them
# Callbacks are requester-named URLs: only public addresses unless these allow more (core/netpolicy.py).
DEFAULT_WEBHOOKS_ALLOW_PRIVATE_ADDRESSES: Final = False
DEFAULT_WEBHOOKS_ALLOW_NETWORKS: Final[tuple[str, ...]] = ()

# [chain]: absent by default (no payments); these fill the keys a [chain] table leaves out.
DEFAULT_CHAIN_TOKEN_NAME: Final = "USD Coin"  # USDC's own EIP-712 domain name
DEFAULT_CHAIN_CONFIRMATIONS: Final = 3
DEFAULT_WALLET_KEY_FILE: Final = "wallet.key"
DEFAULT_FUNDING_TIMEOUT_SECONDS: Final = 600
DEFAULT_SETTLEMENT_WINDOW_SECONDS: Final = 86_400  # a day for validation and release
DEFAULT_CHAIN_POLL_SECONDS: Final = 2.0
DEFAULT_RPC_TIMEOUT_SECONDS: Final = 10.0
DEFAULT_RPC_BACKOFF_MAX_SECONDS: Final = 10.0
DEFAULT_DEVNET_PORT: Final = 8545  # `hearth devnet`: the local anvil's port (anvil's own default)

# [registry]: registries the node pushes its signed offer to; none by default.
DEFAULT_REGISTRY_URLS: Final[tuple[str, ...]] = ()
DEFAULT_REGISTRY_HEARTBEAT_SECONDS: Final = 60.0
DEFAULT_REGISTRY_CHECK_SECONDS: Final = 1.0
DEFAULT_REGISTRY_TIMEOUT_SECONDS: Final = 10.0
DEFAULT_REGISTRY_BACKOFF_INITIAL_SECONDS: Final = 1.0
DEFAULT_REGISTRY_BACKOFF_MAX_SECONDS: Final = 300.0

# [market]: the on-chain provider registry; unset by default (the node lists itself nowhere).
DEFAULT_MARKET_REGISTRY: Final[str | None] = None  # the HearthRegistry address; `hearth devnet` writes it
DEFAULT_MARKET_ENDPOINT: Final[str | None] = None  # the public URL registered for this node
DEFAULT_MARKET_REGISTER: Final = True  # register (or update the record) at start when both are set

# [cluster]: the machines attempts run on; absent = this machine alone (the local executor).
ClusterEngine = Literal["ray"]
DEFAULT_CLUSTER_ENGINE: Final[ClusterEngine] = "ray"
DEFAULT_CLUSTER_ADDRESS: Final = "local"  # "local" starts a one-machine Ray instance (development)
DEFAULT_CLUSTER_HEAD_URL: Final[str | None] = None  # where workers fetch inputs; else the endpoint
DEFAULT_CLUSTER_CONNECT_TIMEOUT_SECONDS: Final = 60.0  # joining the cluster at start
DEFAULT_CLUSTER_PLACEMENT_TIMEOUT_SECONDS: Final = 600.0  # a run waiting for a worker that fits it
DEFAULT_CLUSTER_REFRESH_SECONDS: Final = 5.0  # how often the workers and their resources are read again

# Routing a job among the market's providers (requester side: `hearth job submit --market`).
RoutingStrategy = Literal["cheapest", "reputation"]
ROUTING_STRATEGIES: Final[tuple[RoutingStrategy, ...]] = ("cheapest", "reputation")
DEFAULT_ROUTING_MIN_SETTLED: Final = 3  # `reputation`: settled jobs a provider needs on the escrow
DEFAULT_ROUTING_MAX_FAILURE_RATE: Final = 0.1  # `reputation`: highest refunded share of settled jobs
DEFAULT_ROUTING_QUOTE_TIMEOUT_SECONDS: Final = 10.0  # each provider's time to quote
DEFAULT_REQUESTER_WORKFLOW: Final = "default"  # the requester home's workflow when none is named

# [[models]]: the catalog is empty by default; these fill the keys an entry leaves out.
DEFAULT_MODEL_GPU_MEMORY_MB: Final = 0  # 0: the model also runs on CPUs
DEFAULT_MODEL_DTYPE: Final = "auto"  # vLLM picks from the model's own config
# warm engines (DESIGN §15): a model with `warm = true` keeps one vLLM server running between jobs
DEFAULT_MODEL_WARM: Final = False
DEFAULT_MODEL_PRELOAD: Final = False  # start the engine when the node starts, not at the first job
DEFAULT_MODEL_MAX_IDLE_SECONDS: Final = 900.0  # an engine unused this long is stopped (its capacity freed)
DEFAULT_MODEL_WARM_CPUS: Final = 1.0  # what the engine holds while it runs
DEFAULT_MODEL_WARM_MEMORY_MB: Final = 0  # 0: what a CPU run of the model needs (weights, runtime, cache)
DEFAULT_MODEL_WARM_GPUS: Final = 0  # GPUs pinned to the engine (its model split over them)
DEFAULT_MODEL_WARM_CONCURRENCY: Final = 8  # a job's requests in flight to the engine at once
DEFAULT_MODEL_WARM_START_SECONDS: Final = 600.0  # the most an engine may take to load and answer
