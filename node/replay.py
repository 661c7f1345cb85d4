"""``hearth job replay``: run a completed job again from this node's journal and blockstore, and say whether
the artifact's CID comes out the same (a check of the node's determinism, run by its operator).

The node's own parts do the work: its configuration, sandbox runner and blockstore (as :class:`Node`
builds them) and the transcode executor's :meth:`~node.executor.TranscodeExecutor.replay`. The journal is
opened read for the job's record and closed again; nothing is written to it.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from core.errors import ConflictError, NotFoundError
from core.journal import Journal
from node.daemon import Node
from node.executor import TranscodeExecutor, Workspace
from provider.pricing import Pricer


async def replay_job(home: Path, job_id: str, *, config_path: Path | None = None) -> dict[str, Any]:
    """The replay report of ``job_id`` (a node job id, ``hj_...``) on the node whose home is ``home``.

    Raises :class:`NotFoundError` for a job the journal does not hold and :class:`ConflictError` for one
    that has no result to compare with.
    """
    node = Node.from_home(home, config_path=config_path)
    journal = Journal.open(
        node.state_dir / node.cfg.journal.filename, synchronous=node.cfg.journal.synchronous
    )
    try:
        job = journal.get(job_id)
        if job is None:
            raise NotFoundError("job_not_found", f"no job {job_id} in this node's journal")
        if job.result is None:
            raise ConflictError(
                "job_not_completed", f"job {job.id} is {job.state}; only a completed job can be replayed"
            )
        with tempfile.TemporaryDirectory(prefix="hearth-replay-") as work:
            executor = TranscodeExecutor(
                node.cfg,
                Pricer(node.cfg.pricing, home=node.home),
                Workspace(runner=node.runner, store=node.store, work_dir=Path(work), node_did=node.did),
            )
            return await executor.replay(job)
    finally:
        journal.close()
        node.runner.close()
