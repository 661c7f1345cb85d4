"""What judging a result yields (:class:`Judgement`) and where its files live meanwhile (:func:`workspace`).

:mod:`validator.transcode` judges an ``ffmpeg_transcode`` result, :mod:`validator.batch` a ``vllm_batch``
one; both fetch into a :func:`workspace` and return a :class:`Judgement`.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from sandbox.ffmpeg import Checks
from sandbox.vllm import BatchChecks


@dataclass(frozen=True, slots=True)
class Judgement:
    """What the validator found: its own checks, and whether the artifact is the one the result names.

    ``argv_hash_match`` says whether the rebuilt ffmpeg command is the node's; None for a batch, whose
    command depends on the node's model catalog.
    """

    checks: Checks | BatchChecks
    artifact_sha256: str
    digest_ok: bool
    argv_hash_match: bool | None

    @property
    def passed(self) -> bool:
        return self.digest_ok and self.checks["passed"]


@asynccontextmanager
async def workspace() -> AsyncIterator[Path]:
    """A new temporary folder for one judgement's blocks, input and unpacked artifact; removed on exit."""
    tmp = Path(await asyncio.to_thread(tempfile.mkdtemp, prefix="hearth-validate-"))
    try:
        yield tmp
    finally:
        await asyncio.to_thread(shutil.rmtree, tmp, True)
