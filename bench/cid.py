"""Benchmark: UnixFS import into the blockstore against ``sha256sum`` of the same file, same run.

Generates one file (256 MiB by default) in a temporary directory, then alternates ``sha256sum FILE``
(the bare baseline: read and hash) with Hearth's import (chunk, hash, build the DAG, write every block
durably into a fresh blockstore on the same filesystem), best of ``--repeat`` each, the file in the page
cache for both. Prints both rates and their ratio; the target is a ratio of at least 0.80. Exits
non-zero when the target is missed or the CIDs of the runs disagree.

    .venv/bin/python bench/cid.py [--size-mb 256] [--repeat 3] [--dir DIR] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from storage import Blockstore, import_path  # noqa: E402

TARGET_RATIO = 0.80
MIB = 1024 * 1024


def make_file(path: Path, size_mb: int) -> None:
    rng = random.Random(2025)
    with path.open("wb") as f:
        for _ in range(size_mb):
            f.write(rng.randbytes(MIB))


def time_sha256sum(path: Path) -> float:
    t0 = time.perf_counter()
    subprocess.run(["sha256sum", str(path)], check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def time_import(path: Path, blocks: Path, *, store: bool) -> tuple[float, str]:
    t0 = time.perf_counter()
    result = import_path(path, Blockstore.open(blocks) if store else None)
    seconds = time.perf_counter() - t0
    shutil.rmtree(blocks, ignore_errors=True)
    # Commit the deletion now: on a filesystem mounted with discard, its TRIM would otherwise land in
    # the next run's first fsync and be billed to it.
    os.sync()
    return seconds, str(result.cid)


def run(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="hearth-bench-cid-", dir=args.dir) as tmp:
        tmpdir = Path(tmp)
        data = tmpdir / "input.bin"
        make_file(data, args.size_mb)
        os.sync()  # the generated file's own writeback must not compete with the runs
        time_sha256sum(data)  # warm the page cache for both sides
        size = data.stat().st_size
        baseline: list[float] = []
        stored: list[float] = []
        computed: list[float] = []
        cids: set[str] = set()
        for _ in range(args.repeat):
            baseline.append(time_sha256sum(data))
            seconds, cid = time_import(data, tmpdir / "blocks", store=True)
            stored.append(seconds)
            cids.add(cid)
            seconds, cid = time_import(data, tmpdir / "blocks", store=False)
            computed.append(seconds)
            cids.add(cid)
    mb = size / 1e6
    results: dict[str, Any] = {
        "bytes": size,
        "repeat": args.repeat,
        "cid": sorted(cids),
        "sha256sum": {"seconds": min(baseline), "mb_per_s": mb / min(baseline)},
        "import_and_store": {"seconds": min(stored), "mb_per_s": mb / min(stored)},
        "cid_only": {"seconds": min(computed), "mb_per_s": mb / min(computed)},
    }
    results["ratio"] = results["import_and_store"]["mb_per_s"] / results["sha256sum"]["mb_per_s"]
    results["targets"] = {
        f"ratio>={TARGET_RATIO:.2f}": results["ratio"] >= TARGET_RATIO,
        "one_cid": len(cids) == 1,
    }
    return results


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mb", type=int, default=256, help="size of the generated file in MiB")
    ap.add_argument("--repeat", type=int, default=3, help="runs of each side; the best counts")
    ap.add_argument("--dir", default=None, help="where to put the file and the store (default: $TMPDIR)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    r = run(args)
    if args.json:
        print(json.dumps(r, indent=2))
    else:
        print(f"file              : {r['bytes'] / MIB:.0f} MiB, CID {', '.join(r['cid'])}")
        print(f"sha256sum         : {r['sha256sum']['mb_per_s']:8.1f} MB/s")
        print(f"import + store    : {r['import_and_store']['mb_per_s']:8.1f} MB/s  (fsync'd blockstore)")
        print(f"CID only          : {r['cid_only']['mb_per_s']:8.1f} MB/s")
        print(f"ratio             : {r['ratio']:.2f}   (target >= {TARGET_RATIO:.2f})")
    return 0 if all(r["targets"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
