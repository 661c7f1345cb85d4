"""The model catalog: the models this node serves to ``vllm_batch`` jobs, verified, with their tokenizers.

The operator declares each model in ``node.toml`` (``[[models]]``, see :class:`core.config.ModelSection`):
a name, a local weights directory and that directory's content hash, a CID. At start the node hashes
every directory again (:meth:`ModelCatalog.verify`) and refuses to start when one changed, so a job never
runs on weights other than those advertised. Envelopes name a model; any other name is refused before
capacity is held (:meth:`ModelCatalog.check`). Requesters never supply a path.

Token counts come from the model's own tokenizer and chat template (``transformers``, loaded on first
use), so the context-length check before a run sees exactly the prompt vLLM will see.
"""

from __future__ import annotations

import json
import logging
import os
import stat
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.config import ModelSection, resolve_path
from core.envelope import VllmBatchEnvelope
from core.errors import ConfigError, HearthError, PolicyError, RequestError
from sandbox.vllm import cpu_memory_needed_mb

log = logging.getLogger("hearth.models")


@dataclass(frozen=True, slots=True)
class CatalogModel:
    """One verified model: its catalog entry, where its weights are, and how big they are."""

    entry: ModelSection
    path: Path
    size_bytes: int

    @property
    def name(self) -> str:
        return self.entry.name

    @property
    def min_memory_mb(self) -> int:
        """The least ``limits.memory_mb`` a CPU run of this model needs: vLLM, the weights, a KV cache."""
        return cpu_memory_needed_mb(self.size_bytes)

    def offer(self, default_rates: Mapping[str, str]) -> dict[str, Any]:
        """How /v1/capacity advertises the model."""
        e = self.entry
        return {
            "name": e.name,
            "cid": e.cid,
            "max_context": e.max_context,
            "gpu_memory_mb": e.gpu_memory_mb,
            "runs_on": "gpu" if e.gpu_memory_mb else "cpu_or_gpu",
            "min_memory_mb": self.min_memory_mb,
            "size_bytes": self.size_bytes,
            # a warm model keeps an engine loaded between jobs (DESIGN §15): no load time per batch
            "warm": e.warm,
            "price": {
                "input_1k_tokens": e.input_1k_tokens or default_rates["input_1k_tokens"],
                "output_1k_tokens": e.output_1k_tokens or default_rates["output_1k_tokens"],
            },
        }


def hash_model_dir(path: Path) -> tuple[str, int]:
    """The UnixFS CIDv1 of a weights directory and its size in bytes (blocking; reads every byte).

    Raises ``ConfigError("model_dir_unusable")`` when ``path`` is not a directory of plain files (a
    symlink inside it would point outside what the container gets mounted).
    """
    from storage import import_path  # storage is imported by the daemon anyway; keep this module light

    if not path.is_dir():
        raise ConfigError(
            "model_dir_unusable",
            f"{path} is not a directory",
            details={"path": str(path)},
        )
    try:
        imported = import_path(path)
    except HearthError as exc:
        raise ConfigError(
            "model_dir_unusable",
            f"{path} cannot be hashed: {exc.message} (copy the weights into a plain directory, e.g. "
            "`huggingface-cli download --local-dir`, rather than pointing at a cache of symlinks)",
            details={"path": str(path), "cause": exc.code},
        ) from None
    return str(imported.cid), imported.size


def read_max_context(path: Path) -> int | None:
    """The context length a model directory's ``config.json`` declares, if it declares one."""
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return None
    for key in ("max_position_embeddings", "max_sequence_length", "seq_length", "n_positions"):
        value = config.get(key) if isinstance(config, dict) else None
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def check_readable(path: Path) -> None:
    """Refuse a weights directory the sandbox user could not read through its read-only mount.

    The container runs as a fixed non-root user, so every file must be world-readable and every folder
    world-searchable. Raises ``ConfigError("model_not_readable")`` naming the first that is not, and
    ``ConfigError("model_dir_unusable")`` for a path that is not a directory or holds a symlink.
    """
    if not path.is_dir() or path.is_symlink():
        raise ConfigError("model_dir_unusable", f"{path} is not a directory", details={"path": str(path)})
    for dirpath, dirnames, filenames in os.walk(path):
        for name, need in [(d, stat.S_IROTH | stat.S_IXOTH) for d in ["", *dirnames]] + [
            (f, stat.S_IROTH) for f in filenames
        ]:
            target = Path(dirpath, name)
            mode = os.lstat(target).st_mode
            if stat.S_ISLNK(mode):
                raise ConfigError(
                    "model_dir_unusable",
                    f"{target} is a symlink; the container sees only the directory itself, so copy the "
                    "weights into a plain directory (e.g. `huggingface-cli download --local-dir`)",
                    details={"path": str(target)},
                )
            if mode & need != need:
                raise ConfigError(
                    "model_not_readable",
                    f"{target} is not readable by the sandbox user; run `chmod -R a+rX {path}`",
                    details={"path": str(target)},
                )


class _TorchAdvisory(logging.Filter):
    """Drops the advisory ``transformers`` logs on its own logger when torch is absent."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno == logging.WARNING and "PyTorch" in record.getMessage())


def transformers_module() -> Any:
    """``transformers``, imported on first use (it is slow to import) and without its torch advisory.

    The node needs tokenizers and configs, not torch, and transformers warns at import that torch is
    missing. That one warning is filtered out on the ``transformers`` logger for the length of the import;
    the process environment is left as it was (transformers' own switch for it is an environment
    variable, which a library has no business setting for the whole process).
    """
    logger = logging.getLogger("transformers")
    advisory = _TorchAdvisory()
    logger.addFilter(advisory)
    try:
        import transformers
    finally:
        logger.removeFilter(advisory)
    return transformers


class ChatTokenizer:
    """A model's tokenizer and chat template, counting prompt tokens the way vLLM builds prompts."""

    def __init__(self, path: Path) -> None:
        try:
            auto = transformers_module().AutoTokenizer
            self._tok: Any = auto.from_pretrained(str(path), local_files_only=True)
        except (OSError, ValueError) as exc:
            raise ConfigError(
                "model_tokenizer_unusable",
                f"the tokenizer in {path} cannot be loaded: {exc}",
                details={"path": str(path)},
            ) from None
        if not getattr(self._tok, "chat_template", None):
            raise ConfigError(
                "model_has_no_chat_template",
                f"the tokenizer in {path} has no chat template; chat completion batches need one",
                details={"path": str(path)},
            )

    def prompt_tokens(self, messages: Sequence[Mapping[str, str]]) -> int:
        """Tokens of the prompt for ``messages`` (role and text content), generation prompt included."""
        ids = self._tok.apply_chat_template(
            [dict(m) for m in messages], tokenize=True, add_generation_prompt=True, return_dict=False
        )
        return len(ids)


class ModelCatalog:
    """The verified catalog; answers which models exist, what they need and how many tokens a prompt is."""

    def __init__(self, models: Sequence[CatalogModel], *, gpu_memory_mb: int = 0) -> None:
        self._models = {m.name: m for m in models}
        self._gpu_memory_mb = gpu_memory_mb
        self._tokenizers: dict[str, ChatTokenizer] = {}
        self._lock = threading.Lock()

    @classmethod
    def verify(cls, home: Path, entries: Sequence[ModelSection], *, gpu_memory_mb: int = 0) -> ModelCatalog:
        """Hash every model directory and compare it with its entry (blocking: reads all the weights).

        Raises ``ConfigError("model_hash_mismatch")`` naming the model, the CID expected and the CID found.
        """
        models = []
        for entry in entries:
            path = resolve_path(home, entry.path)
            started = time.monotonic()
            cid, size = hash_model_dir(path)
            check_readable(path)
            if cid != entry.cid:
                raise ConfigError(
                    "model_hash_mismatch",
                    f"model {entry.name!r}: {path} hashes to {cid}, not the catalog's {entry.cid}; if the "
                    f"weights changed on purpose, register them again with `hearth models add {path} "
                    f"--name {entry.name}`",
                    details={"model": entry.name, "path": str(path), "expected": entry.cid, "actual": cid},
                )
            log.info(
                "model %s verified (%s, %.1f MB in %.1f s)",
                entry.name,
                cid,
                size / 1e6,
                time.monotonic() - started,
            )
            models.append(CatalogModel(entry=entry, path=path, size_bytes=size))
        return cls(models, gpu_memory_mb=gpu_memory_mb)

    def __len__(self) -> int:
        return len(self._models)

    @property
    def names(self) -> list[str]:
        return sorted(self._models)

    def declared_by(self, entries: Sequence[ModelSection]) -> bool:
        """Whether ``entries`` (a re-read ``[[models]]``) declare exactly this catalog."""
        return {e.name: e for e in entries} == {name: m.entry for name, m in self._models.items()}

    def get(self, name: str) -> CatalogModel:
        """The model called ``name``; ``RequestError("unknown_model", 422)`` listing the known ones."""
        model = self._models.get(name)
        if model is None:
            raise RequestError(
                "unknown_model",
                f"this node serves no model called {name!r}",
                details={"model": name, "known": self.names},
            )
        return model

    def check(self, env: VllmBatchEnvelope) -> CatalogModel:
        """Refuse, before any capacity is held, a batch this node cannot run as its envelope asks."""
        model = self.get(env.output_spec.model)
        limits = env.limits
        needs = model.entry.gpu_memory_mb
        details: dict[str, Any] = {"model": model.name}
        if needs and limits.gpus == 0:
            raise PolicyError(
                "model_needs_gpu",
                f"model {model.name!r} runs on a GPU ({needs} MB); ask for limits.gpus >= 1",
                details=details | {"gpu_memory_mb": needs},
            )
        available = self._gpu_memory_mb * limits.gpus  # tensor parallel spreads it over the job's GPUs
        if needs and self._gpu_memory_mb and needs > available:
            raise PolicyError(
                "model_exceeds_gpu_memory",
                f"model {model.name!r} needs {needs} MB of GPU memory; {limits.gpus} of this node's GPUs "
                f"have {available} MB",
                details=details | {"gpu_memory_mb": needs, "available_mb": available, "gpus": limits.gpus},
            )
        if limits.gpus == 0 and limits.memory_mb < model.min_memory_mb:
            raise PolicyError(
                "memory_too_small_for_model",
                f"model {model.name!r} needs limits.memory_mb >= {model.min_memory_mb} on CPUs "
                f"(vLLM, the weights and a KV cache)",
                details=details | {"min_memory_mb": model.min_memory_mb, "memory_mb": limits.memory_mb},
            )
        if env.output_spec.max_tokens >= model.entry.max_context:
            raise RequestError(
                "max_tokens_exceeds_context",
                f"output_spec.max_tokens {env.output_spec.max_tokens} leaves no room for a prompt in "
                f"{model.name!r}'s context of {model.entry.max_context} tokens",
                details=details
                | {"max_tokens": env.output_spec.max_tokens, "max_context": model.entry.max_context},
            )
        return model

    def offers(self, default_rates: Mapping[str, str]) -> list[dict[str, Any]]:
        return [self._models[name].offer(default_rates) for name in self.names]

    # -- the estimator's view (provider.estimate.BatchModels) ----------------------------------------------

    def context_of(self, model: str) -> int:
        return self.get(model).entry.max_context

    def prompt_tokens(self, model: str, messages: Sequence[Mapping[str, str]]) -> int:
        """Exact prompt tokens of ``messages`` for ``model``; blocks (the first call loads the tokenizer)."""
        return self._tokenizer(model).prompt_tokens(messages)

    def _tokenizer(self, name: str) -> ChatTokenizer:
        with self._lock:
            tok = self._tokenizers.get(name)
            if tok is None:
                tok = ChatTokenizer(self.get(name).path)
                self._tokenizers[name] = tok
            return tok
