"""The node as one object with a lifetime: config, identity, journal, capacity ledger, admission.

``Node.start()`` opens the journal, rebuilds the capacity holds from it and starts the housekeeping
task; ``Node.stop()`` stops it and closes the journal. Nothing is lost in between: jobs, quotes,
holds and the replay cache all live in the journal.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from core.config import (
    NODE_KEY_CREDENTIAL,
    WALLET_KEY_CREDENTIAL,
    NodeConfig,
    key_path,
    load_config,
    resolve_path,
)
from core.envelope import FfmpegTranscodeEnvelope, VllmBatchEnvelope
from core.errors import CapacityError, ConfigError
from core.faults import NO_FAULTS, FaultPoints
from core.journal import Journal
from core.logs import log_transition
from node.admission import Admission, hold_policy
from node.executor import Executors, TranscodeExecutor, Workspace
from node.headship import follow_cluster, join_cluster
from node.inference import InferenceExecutor
from node.metrics import Metrics
from node.scheduler import Scheduler
from node.warm import WarmEngines
from node.webhooks import WebhookDispatcher
from payments.keys import EthSigner, Signer, load_eth_key, load_key
from provider.capacity import CapacityLedger, MachineInfo, NvmlLoader, Resources, discover, load_nvml
from provider.catalog import ModelCatalog
from provider.estimate import InputProbe
from provider.offers import OfferIssuer
from provider.registry import OfferPusher
from sandbox.runner import Runner, SandboxRunner
from storage import Blockstore, open_blockstore

if TYPE_CHECKING:
    from cluster import RayCluster
    from payments.settlement import Settlement
    from provider.gpu_health import GpuReport
    from provider.gpu_selftest import GpuSelfTest
    from provider.listing import MarketListing

log = logging.getLogger("hearth.node")

HOUSEKEEPING_INTERVAL_SECONDS = 1.0


def _is_credential(path: Path, credentials_dir: Path | None) -> bool:
    """Whether ``path`` is a systemd credential: 0440, in a directory only the service may open."""
    return credentials_dir is not None and path.parent == credentials_dir


class Node:
    """Everything one running node holds; the HTTP layer and the CLI talk to it."""

    def __init__(
        self,
        home: Path,
        cfg: NodeConfig,
        signer: Signer,
        *,
        now: Callable[[], float] = time.time,
        config_path: Path | None = None,
        credentials_dir: Path | None = None,
        faults: FaultPoints | None = None,
        nvml: NvmlLoader = load_nvml,
    ) -> None:
        """``faults``: the fault points settlement reaches (:mod:`core.faults`); none fire when omitted.
        ``nvml``: where discovery and the GPU self-test reach NVML (recorded answers in tests)."""
        self.home = home
        self.cfg = cfg
        self.config_path = config_path
        self.credentials_dir = credentials_dir
        self.signer = signer
        self.now = now
        self.faults: FaultPoints = NO_FAULTS if faults is None else faults
        self.metrics = Metrics()
        self._nvml = nvml
        self.machine: MachineInfo = discover(
            cfg.capacity, disk_path=resolve_path(home, cfg.node.state_dir), nvml=nvml
        )
        self.ledger = CapacityLedger(self.sold(self.machine), hold_policy(cfg.capacity))
        # the Ray cluster the node is the head of (``[cluster]``), joined at start; None: this machine alone
        self.cluster: RayCluster | None = None
        self._journal: Journal | None = None
        self._admission: Admission | None = None
        self.store: Blockstore = open_blockstore(home, cfg.storage)
        self.runner: Runner = SandboxRunner.from_config(
            cfg.sandbox, node=signer.did, on_start=lambda _spec: self.metrics.container_started()
        )
        self._executor: TranscodeExecutor | None = None
        self._inference: InferenceExecutor | None = None
        self.warm: WarmEngines | None = None  # the warm engines of `warm = true` models (node.warm)
        self.models = ModelCatalog([])
        self._scheduler: Scheduler | None = None
        self._settlement: Settlement | None = None
        self._webhooks: WebhookDispatcher | None = None
        # where the API listens (set by node.server.serve once bound): the endpoint a validation notice
        # names when neither [market] endpoint nor [node] public_url is set
        self.listen_url: str | None = None
        self._housekeeping: asyncio.Task[None] | None = None
        # The signed offer of GET /v1/capacity and of the registry pushes: one sequence for both.
        self.offers = OfferIssuer(self, signer, now=now)
        self._registry: OfferPusher | None = None
        self._listing: MarketListing | None = None
        self._gpu_selftest: GpuSelfTest | None = None
        self.ready = False
        self.draining = False
        self.started_at = 0.0

    @classmethod
    def from_home(
        cls, home: Path, *, config_path: Path | None = None, credentials_dir: Path | None = None
    ) -> Node:
        """The node of ``home``: its node.toml (or ``config_path``), its key (or the systemd credential)."""
        cfg = load_config(home, path=config_path)
        path = key_path(
            home, cfg.node.key_file, credential=NODE_KEY_CREDENTIAL, credentials_dir=credentials_dir
        )
        if not path.exists():
            raise ConfigError(
                "missing_node_key",
                f"no node key at {path}; run `hearth init --home {home}` first",
                details={"path": str(path)},
            )
        signer = load_key(path, group_readable=_is_credential(path, credentials_dir))
        return cls(home, cfg, signer, config_path=config_path, credentials_dir=credentials_dir)

    @property
    def did(self) -> str:
        return self.signer.did

    @property
    def journal(self) -> Journal:
        if self._journal is None:
            raise RuntimeError("node not started")
        return self._journal

    async def settled(self) -> None:
        """Wait until the journal has committed what it holds (an answer states only durable facts)."""
        if self._journal is not None:
            await self._journal.settled()

    @property
    def admission(self) -> Admission:
        if self._admission is None:
            raise RuntimeError("node not started")
        return self._admission

    @property
    def executor(self) -> TranscodeExecutor:
        if self._executor is None:
            raise RuntimeError("node not started")
        return self._executor

    @property
    def inference(self) -> InferenceExecutor:
        if self._inference is None:
            raise RuntimeError("node not started")
        return self._inference

    @property
    def scheduler(self) -> Scheduler | None:
        """The scheduler, or None while ``[scheduler] paused`` keeps jobs queued."""
        return self._scheduler

    @property
    def settlement(self) -> Settlement | None:
        """Payments (escrow funding and settlement), or None when node.toml has no ``[chain]``."""
        return self._settlement

    def _wallet(self) -> EthSigner:
        assert self.cfg.chain is not None
        path = key_path(
            self.home,
            self.cfg.chain.wallet_key_file,
            credential=WALLET_KEY_CREDENTIAL,
            credentials_dir=self.credentials_dir,
        )
        if not path.exists():
            raise ConfigError(
                "missing_wallet_key",
                f"[chain] is configured but there is no wallet key at {path}; run `hearth devnet` or "
                f"`hearth keys new --type eth --out {path}`",
                details={"path": str(path)},
            )
        return load_eth_key(path, group_readable=_is_credential(path, self.credentials_dir))

    @property
    def state_dir(self) -> Path:
        return resolve_path(self.home, self.cfg.node.state_dir)

    @property
    def listing(self) -> MarketListing | None:
        """The node's listing in the on-chain registry, or None when ``[market]`` does not ask for one."""
        return self._listing

    @property
    def payout_address(self) -> str | None:
        """The wallet the escrow pays this node's earnings to; None without ``[chain]`` (or before start)."""
        return None if self._settlement is None else self._settlement.provider

    def sold(self, machine: MachineInfo) -> Resources:
        """What the ledger may hold: the offered resources, CPUs and memory overcommitted as configured."""
        offered, overcommit = machine.offered, self.cfg.capacity.overcommit
        return Resources(
            cpus=offered.cpus * overcommit, memory_mb=int(offered.memory_mb * overcommit), gpus=offered.gpus
        )

    def _hold_engine(self, key: str, need: Resources) -> tuple[str, ...]:
        """A warm engine starts: its capacity is held in the ledger (quotes see it) and by the scheduler
        (jobs wait for it), with GPUs pinned; ``CapacityError`` when it does not fit now."""
        if self._scheduler is None:
            raise CapacityError("scheduler_paused", "the scheduler is paused: no engine starts")
        pinned = self._scheduler.reserve(key, need)
        try:
            self.ledger.reserve(key, need, None, now=self.now())
        except CapacityError:
            self._scheduler.unreserve(key)
            raise
        return pinned

    def _unhold_engine(self, key: str) -> None:
        if self._scheduler is not None:
            self._scheduler.unreserve(key)
        self.ledger.release(key)

    async def start(self) -> None:
        t0 = time.perf_counter()
        self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        await join_cluster(self)
        # Before anything is offered: a model whose weights changed stops the start (ConfigError).
        self.models = await asyncio.to_thread(
            ModelCatalog.verify, self.home, self.cfg.models, gpu_memory_mb=self.machine.gpu_memory_mb
        )
        journal = Journal.open(
            self.state_dir / self.cfg.journal.filename, synchronous=self.cfg.journal.synchronous, now=self.now
        )
        self._journal = journal
        journal.checkpoint_in_background()
        now = self.now()
        journal.expire_quotes(now)
        # Live quotes with their requesters: the ledger holds them again under the unfunded shares they
        # were held under (provider.ledger).
        self.ledger.load(
            (id, Resources(cpus=cpus, memory_mb=memory_mb, gpus=gpus), expires_at, iss)
            for id, cpus, memory_mb, gpus, expires_at, iss in journal.held_resources(now)
        )
        self.metrics.watch_journal(journal.count_by_state)
        self.metrics.watch_failures(journal.failed_by_domain)
        journal.add_listener(log_transition)
        self._webhooks = WebhookDispatcher(
            self.cfg.webhooks,
            journal,
            self.signer,
            now=self.now,
            endpoint=lambda: self.cfg.endpoint or self.listen_url,
        )
        await self._webhooks.start()
        if self.cfg.chain is not None:
            from payments.settlement import Settlement  # web3 and eth-account: only for a node with a chain

            settlement = Settlement(
                self.cfg.chain,
                journal,
                self._wallet(),
                self.did,
                retry_budget=self.cfg.policy.retry_budget,
                on_funded=self._funded,
                on_closed=self.ledger.release,
                now=self.now,
                faults=self.faults,
            )
            self._settlement = settlement
            self.metrics.watch_payments(journal.payment_totals, lambda: settlement.chain_up)
            await settlement.start()
        else:
            log.warning("no [chain] in node.toml: jobs run unpaid (run `hearth devnet` to take payments)")
        warm_models = {name: self.models.get(name) for name in self.models.names}
        if self.cluster is not None and any(m.entry.warm for m in warm_models.values()):
            # an engine's socket would be on a worker, out of the head's reach: its batches run cold there
            log.warning(
                "warm models are served cold on a cluster: engines run only on a node without [cluster]"
            )
            warm_models = {}
        self.warm = WarmEngines(
            self.runner,
            self.cfg.sandbox,
            warm_models,
            folder=self.state_dir / "engines",
            hold=self._hold_engine,
            unhold=self._unhold_engine,
            now=self.now,
        )
        self.metrics.watch_engines(self.warm.states)
        self._admission = Admission(
            self.cfg,
            self.signer,
            journal,
            self.ledger,
            self.metrics,
            home=self.home,
            gpu_model=self.machine.gpu_model,
            now=self.now,
            prober=self._probe_input,
            settlement=self._settlement,
            models=self.models,
            warm=self.warm.is_warm,
        )
        space = Workspace(
            runner=self.runner,
            store=self.store,
            work_dir=resolve_path(self.state_dir, self.cfg.sandbox.work_dir),
            node_did=self.did,
        )
        self._executor = TranscodeExecutor(self.cfg, self._admission.pricer, space)
        self._inference = InferenceExecutor(
            self.cfg, self._admission.pricer, space, catalog=self.models, warm=self.warm
        )
        if not self.cfg.scheduler.paused:
            self._scheduler = Scheduler(
                journal,
                Executors({"ffmpeg_transcode": self._executor, "vllm_batch": self._inference}),
                self.ledger,
                self.machine.offered,
                retry_budget=self.cfg.policy.retry_budget,
                gpu_ids=self.cluster.gpu_slots()
                if self.cluster is not None
                else tuple(str(gpu.index) for gpu in self.machine.gpus),
                on_attempt=self.metrics.attempt_ended,
                runnable=None if self._settlement is None else self._settlement.is_funded,
            )
            await self._scheduler.start()
            await self.warm.start()  # after recovery removed what engines of an earlier run left
        self._housekeeping = asyncio.create_task(self._housekeep(), name="hearth-housekeeping")
        self.ready = True
        self.metrics.ready.set(1)
        self.started_at = time.time()
        # Advertised only once the node takes work; the pusher never blocks the node (see provider.registry).
        self._registry = OfferPusher(self.cfg.registry, self.offers, on_push=self.metrics.offer_pushed)
        await self._registry.start()
        await self._start_listing()
        await self._start_gpu_selftest()
        log.info(
            "node ready",
            extra={"did": self.did, "startup_ms": round((time.perf_counter() - t0) * 1000, 1)},
        )

    async def _start_listing(self) -> None:
        """List the node in the on-chain registry, in the background (see provider.listing)."""
        from provider.listing import MarketListing, listing_wanted

        market = self.cfg.market
        if self._settlement is None or not listing_wanted(self.cfg):
            if market.registry is not None and market.register and self._settlement is not None:
                log.warning(
                    "[market] registry is set but neither [market] endpoint nor [node] public_url: "
                    "the node is not listed"
                )
            return
        self._listing = MarketListing(
            self.cfg, self._settlement, self.did, on_state=self.metrics.market_listing, now=self.now
        )
        await self._listing.start()

    async def _start_gpu_selftest(self) -> None:
        """With GPUs on this machine and ``[gpu] selftest`` on: measure and check them in the background
        (provider.gpu_selftest), now and every ``selftest_hours``. A node without GPUs imports nothing of it;
        a cluster's GPUs are its workers', not this machine's, and are not tested from here."""
        if not self.machine.gpus or not self.cfg.gpu.selftest or self.cluster is not None:
            return
        from provider.gpu_selftest import GpuSelfTest, SandboxBench

        work_dir = resolve_path(self.state_dir, self.cfg.sandbox.work_dir)
        self.metrics.watch_gpus(lambda: self.machine.gpu_selftest)
        self._gpu_selftest = GpuSelfTest(
            self.cfg,
            self.machine.gpus,
            SandboxBench(self.runner, self.cfg, work_dir),
            on_report=self.gpus_tested,
            claims=lambda: self._scheduler,
            nvml=self._nvml,
        )
        await self._gpu_selftest.start()

    def gpus_tested(self, reports: tuple[GpuReport, ...]) -> None:
        """A GPU self-test reported: its figures go into the offer; GPUs failing health are withheld.

        What the node offers becomes the healthy GPUs (capped by ``[capacity] gpus``): the ledger, the
        scheduler's devices and the offer follow, and registries hear of a change at once.
        """
        healthy = tuple(str(report.index) for report in reports if report.healthy)
        cap = self.cfg.capacity.gpus
        offered = healthy if cap == "auto" else healthy[:cap]
        before = self.machine
        self.machine = dataclasses.replace(
            before, gpu_selftest=reports, offered=dataclasses.replace(before.offered, gpus=len(offered))
        )
        withheld = {r.index: r.reasons for r in reports if r.reasons}
        was = {r.index: r.reasons for r in before.gpu_selftest if r.reasons}
        for index, reasons in withheld.items():
            if was.get(index) != reasons:  # said once, not at every report
                log.warning(
                    "GPU %d withheld from capacity: %s", index, "; ".join(reasons), extra={"gpu": index}
                )
        for index in was.keys() - withheld.keys():
            log.info("GPU %d passed its health checks again: offered", index, extra={"gpu": index})
        if self.machine.offered != before.offered:
            log.info("GPUs offered: %d of %d", len(offered), len(self.machine.gpus))
            self.ledger.resize(self.sold(self.machine))
            if self._scheduler is not None:
                self._scheduler.set_gpus(offered)
        if self._registry is not None:
            self._registry.changed()

    async def _probe_input(self, env: FfmpegTranscodeEnvelope | VllmBatchEnvelope) -> InputProbe | None:
        """Admission's prober: transcode inputs are probed, batches read and counted, when at hand."""
        if isinstance(env, FfmpegTranscodeEnvelope):
            return await self.executor.quote_probe(env)
        return await self.inference.quote_probe(env)

    def _funded(self, job: str) -> None:
        if self._admission is not None:  # before it exists the ledger was loaded with the job committed
            self._admission.funded(job)
        if self._scheduler is not None:
            self._scheduler.admit(job)

    def stop_accepting(self) -> None:
        """Refuse new work from now on: /readyz, quotes and submissions answer 503 ``draining``.

        Called first thing on SIGTERM, before :meth:`drain` waits, so no request slips in meanwhile.
        """
        self.draining = True
        self.ready = False
        self.metrics.ready.set(0)

    async def drain(self, grace: float) -> None:
        """Stop accepting work and starting queued jobs; running jobs get ``grace`` seconds to finish.

        What is still running after that is stopped and stays ``running`` in the journal, and queued jobs
        stay ``accepted``: the next start retries (recovery) and runs them. The API keeps answering
        meanwhile (status, events, results); :meth:`stop` closes the rest.
        """
        self.stop_accepting()
        if self._registry is not None:  # a node that takes no more work stops advertising at once
            await self._registry.stop()
            self._registry = None
        if self._scheduler is not None:
            running = len(self._scheduler.running)
            if running:
                log.info("draining: %d running job(s) get up to %.0f s to finish", running, grace)
            await self._scheduler.stop(grace)
            if self.warm is not None:
                await self.warm.stop()
            self._scheduler = None

    def status_line(self) -> str:
        """One line for the service manager (``systemctl status``): state, running and queued jobs."""
        state = "draining" if self.draining else "ready" if self.ready else "starting"
        scheduler = self._scheduler
        if scheduler is not None:
            return f"{state}: {len(scheduler.running)} running, {scheduler.queue_depth} queued"
        if self.ready and self.cfg.scheduler.paused:
            return f"{state}: scheduler paused"
        return state

    async def stop(self, grace: float = 0.0) -> None:
        """Stop accepting work; running jobs get ``grace`` seconds, then stay ``running`` for recovery."""
        await self.drain(grace)
        if self._gpu_selftest is not None:
            await self._gpu_selftest.stop()
            self._gpu_selftest = None
        if self._listing is not None:
            await self._listing.stop()
            self._listing = None
        if self._settlement is not None:
            await self._settlement.stop()
            self._settlement = None
        if self._webhooks is not None:
            await self._webhooks.stop()
            self._webhooks = None
        self.runner.close()
        if self.cluster is not None:
            await self.cluster.close()
            self.cluster = None
        if self._housekeeping is not None:
            self._housekeeping.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._housekeeping
            self._housekeeping = None
        if self._journal is not None:
            self._journal.close()
            self._journal = None

    def reload(self) -> None:
        """Re-read node.toml: new prices and policy apply to new quotes; jobs are untouched.

        An invalid file raises ``ConfigError`` and changes nothing: the node keeps its current config.
        """
        cfg = load_config(self.home, path=self.config_path)
        previous, self.cfg = self.cfg, cfg
        self.admission.reconfigure(cfg)
        self.executor.reconfigure(cfg, self.admission.pricer)
        self.inference.reconfigure(cfg, self.admission.pricer)
        if not self.models.declared_by(cfg.models):
            log.warning("[[models]] changed: the catalog is verified at start; restart the node to apply it")
        if cfg.gpu != previous.gpu:
            log.warning("[gpu] changed: restart the node to test its GPUs under the new settings")
        if cfg.registry != previous.registry:
            log.warning("[registry] changed: restart the node to push to the new registries")
        if cfg.market != previous.market or cfg.endpoint != previous.endpoint:
            log.warning("[market] or the endpoint changed: restart the node to update its registry record")
        if self._registry is not None:
            self._registry.changed()  # new prices or policy: registries hear of them now
        log.info("configuration reloaded")

    async def _housekeep(self) -> None:
        # After ready, not before: a large store takes a while to sweep, and only files of an earlier
        # process are removed, so uploads may run meanwhile.
        try:
            swept = await asyncio.to_thread(self.store.sweep_temp_files)
            if swept:
                log.warning("removed %d half-written block file(s) left by a previous run", swept)
        except Exception:
            log.exception("sweeping the blockstore failed")
        while True:
            await asyncio.sleep(HOUSEKEEPING_INTERVAL_SECONDS)
            try:
                self.admission.expire_quotes()
                follow_cluster(self)
                if self.warm is not None:
                    await self.warm.housekeep()
            except Exception:  # keep the loop alive; the next round retries
                log.exception("housekeeping failed")
