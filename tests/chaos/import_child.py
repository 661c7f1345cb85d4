"""The target of the "kill -9 during artifact writes" row: a process that imports artifacts until killed.

:func:`import_forever` does what a node does with a job's output and with an upload, through the real
importer and blockstore: it opens the store as a restarted node does (sweeping what an earlier process
left half-written), says it is ready, then imports, alternately, a directory tree (an HLS-like output:
many small files and one of several chunks) and a multi-chunk byte stream (an upload), each with fresh
random content so every block is new. After each import returns it appends the root CID to the
acknowledgement file: from then on the DAG must survive any kill whole.

It runs in a process forked from a forkserver that has already imported Hearth, so a kill costs
milliseconds rather than an interpreter start.
"""

from __future__ import annotations

import io
import random
import shutil
from multiprocessing.connection import Connection
from pathlib import Path

from storage import Blockstore, import_path, import_stream

SMALL_FILES = 40  # files in each tree, 1 to 16 KiB each
LARGE_FILE_BYTES = 1_100_000  # one file of two 1 MiB chunks per tree
STREAM_BYTES = 2_100_000  # an upload of three chunks


def _tree(root: Path, rng: random.Random) -> Path:
    root.mkdir(parents=True)
    for n in range(SMALL_FILES):
        (root / f"seg-{n:03}.ts").write_bytes(rng.randbytes(rng.randint(1024, 16 * 1024)))
    (root / "video.mp4").write_bytes(rng.randbytes(LARGE_FILE_BYTES))
    return root


def import_forever(store_dir: Path, work: Path, seed: int, acks: Path, ready: Connection) -> None:
    """Import fresh artifacts into ``store_dir`` until killed; each acknowledged root goes to ``acks``."""
    rng = random.Random(seed)
    store = Blockstore.open(store_dir)
    store.sweep_temp_files()
    tree = _tree(work / "tree-0", rng)  # made before the clock starts: the first kill may hit its import
    n = 0
    with acks.open("a") as out:
        ready.send_bytes(b"ready")
        while True:
            n += 1
            if n % 2:
                result = import_path(tree, store)
                shutil.rmtree(tree)
            else:
                result = import_stream(io.BytesIO(rng.randbytes(STREAM_BYTES)), store)
            out.write(f"{result.cid}\n")
            out.flush()  # in the page cache: a SIGKILL of this process does not lose it
            if n % 2 == 0:
                tree = _tree(work / f"tree-{n}", rng)
