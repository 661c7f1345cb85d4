"""Row: kill -9 during artifact writes. No partial block is ever visible; the store works after restart.

Each iteration starts a child process that imports fresh artifacts into one blockstore through the real
importer (:mod:`tests.chaos.import_child`: directory trees like a job's output, multi-chunk streams like
an upload), kills it with SIGKILL at a random moment while it writes, then checks, as a restarted node
would find the store:

- every visible block (any name in a shard directory that is not a temporary file) is named by a CID
  and its bytes hash to that CID: nothing half-written answers to a CID;
- every import the child acknowledged (the importer returned its root) is whole: its CAR exports with
  every block verified;
- the store is usable after the restart: opening it and sweeping removes every temporary file left by
  the dead process, and a new block is stored and read back.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.context
import os
import shutil
import signal
import time
from pathlib import Path

from core.errors import HearthError
from storage import CID, Blockstore, write_car
from storage._blockstore import TEMP_PREFIX
from tests.chaos.harness import seeded
from tests.chaos.import_child import import_forever
from tests.chaos.scoreboard import Row, scenario

NAME = "kill -9 during artifact writes"
KILL_WINDOW_SECONDS = 0.1  # the kill lands uniformly in this long after the child starts writing
CHILD_READY_TIMEOUT_SECONDS = 30.0  # a fork and a store open on a loaded machine
MAX_KILLS_PER_RUN = 8  # kills that fall between two imports are retried, up to this many per counted one
AIM_SECONDS = 0.5  # after the random delay, how long the kill waits for a block being written
AIM_POLL_SECONDS = 0.0005


def _temp_files(root: Path) -> list[Path]:
    return sorted(root.glob(f"*/{TEMP_PREFIX}*"))


class _Checker:
    """Verifies each visible block once (blocks never change) and every acknowledged DAG after each kill."""

    def __init__(self, root: Path, work: Path, row: Row) -> None:
        self.root = root
        self.work = work
        self.row = row
        self.verified: set[str] = set()
        self.reported: set[str] = set()  # bad files already counted (each counts once)
        self.acknowledged: list[CID] = []

    def scan(self, *, again: bool = False) -> None:
        """Hash every visible block not yet verified (``again``: every one)."""
        for shard in sorted(p for p in self.root.iterdir() if p.is_dir()):
            for entry in os.scandir(shard):
                seen = entry.path in self.verified or entry.path in self.reported
                if entry.name.startswith(TEMP_PREFIX) or (seen and not again):
                    continue
                self._check_block(Path(entry.path))

    def _check_block(self, path: Path) -> None:
        try:
            cid = CID.parse(path.name)
        except HearthError:
            self._report(path, "stray_file", "is visible in the store but is not named by a CID")
            return
        data = path.read_bytes()
        if not cid.matches(data):
            self._report(
                path, "partial_block_visible", f"holds {len(data)} bytes that do not hash to its CID"
            )
            return
        if str(path) not in self.verified:
            self.verified.add(str(path))
            self.row.good["blocks_verified"] = len(self.verified)

    def _report(self, path: Path, outcome: str, what: str) -> None:
        if str(path) not in self.reported:
            self.reported.add(str(path))
            self.row.fail(outcome, f"{path} {what}")

    def check_acknowledged(self, store: Blockstore, roots: list[CID]) -> None:
        with open(os.devnull, "wb") as sink:
            for root in roots:
                try:
                    write_car(store, root, sink)  # reads every block of the DAG, each verified
                except HearthError as exc:
                    self.row.fail("acknowledged_dag_incomplete", f"{root}: {exc.code}: {exc.message}")


def _context() -> multiprocessing.context.ForkServerContext:
    # The server preloads Hearth from the working directory: runs start in the repository root (make, pytest).
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["tests.chaos.import_child"])
    return ctx


def _one_kill(
    ctx: multiprocessing.context.ForkServerContext, delay: float, seed: int, checker: _Checker
) -> bool:
    """Start an importing child, SIGKILL it ``delay`` seconds into its writes, check the store as a
    restarted node finds it. True when the kill caught blocks being written."""
    row, root = checker.row, checker.root
    acks, trees = checker.work / f"acks-{seed}", checker.work / f"trees-{seed}"
    receive, send = ctx.Pipe(duplex=False)
    child = ctx.Process(target=import_forever, args=(root, trees, seed, acks, send), daemon=True)
    child.start()
    send.close()
    try:
        if not receive.poll(CHILD_READY_TIMEOUT_SECONDS) or receive.recv_bytes() != b"ready":
            row.fail("harness_error", "the importing child did not start")
            return False
        time.sleep(delay)
        # then aim: kill as soon as a block is seen half-written (a loaded machine can otherwise land most
        # kills between two imports, and the run would count too few)
        aim_until = time.monotonic() + AIM_SECONDS
        while time.monotonic() < aim_until and not _temp_files(root):
            time.sleep(AIM_POLL_SECONDS)
    finally:
        child.kill()  # SIGKILL: no finally, no abort, no cleanup runs in the child
        child.join(CHILD_READY_TIMEOUT_SECONDS)
        receive.close()
    if child.exitcode != -signal.SIGKILL:
        row.fail("harness_error", f"the importing child ended by itself with status {child.exitcode}")
        return False
    mid_write = bool(_temp_files(root))  # what the kill caught half-done, before any restart sweeps it
    # whole lines only: a line cut by the kill is an acknowledgement the child never finished giving
    text = acks.read_text() if acks.exists() else ""
    acknowledged = [CID.parse(line) for line in text.split("\n")[:-1]]
    acks.unlink(missing_ok=True)
    shutil.rmtree(trees, ignore_errors=True)  # the child's inputs, not the store
    checker.acknowledged += acknowledged
    row.good["imports_acknowledged"] = len(checker.acknowledged)
    checker.scan()

    # the restart, as a node does it: open the store, sweep what the dead process left, carry on
    store = Blockstore.open(root)
    row.good["temp_files_swept"] = row.good.get("temp_files_swept", 0) + store.sweep_temp_files()
    if _temp_files(root):
        row.fail("temp_not_swept", f"{len(_temp_files(root))} temporary file(s) survive the restart sweep")
    checker.check_acknowledged(store, acknowledged)
    try:
        block = os.urandom(4096)
        if store.get(store.put(block)) != block:
            row.fail("store_unusable", "a block stored after the restart reads back different")
    except HearthError as exc:
        row.fail("store_unusable", f"{exc.code}: {exc.message}")
    return mid_write


@scenario(NAME, stated=100, short=5)
def run(count: int, workdir: Path) -> Row:
    row = Row(NAME, count)
    rng = seeded(row)
    root, work = workdir / "blocks", workdir / "work"
    work.mkdir(parents=True, exist_ok=True)
    Blockstore.open(root)
    checker = _Checker(root, work, row)
    ctx = _context()
    kills = 0
    # Only kills that caught blocks being written count; those that fell between two imports are
    # checked all the same and tallied apart.
    while row.runs < count and kills < MAX_KILLS_PER_RUN * count:
        kills += 1
        if _one_kill(ctx, rng.uniform(0.0, KILL_WINDOW_SECONDS), rng.randrange(2**32), checker):
            row.runs += 1
        else:
            row.good["kills_between_writes"] = row.good.get("kills_between_writes", 0) + 1
    checker.scan(again=True)  # one last pass over everything, as the store stands at the end
    checker.check_acknowledged(Blockstore.open(root), checker.acknowledged)
    return row
