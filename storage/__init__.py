"""Content-addressed storage (docs/architecture.md): UnixFS import, a crash-safe blockstore, CAR, the
gateway, inputs.

- :func:`import_path` / :func:`import_stream` / :func:`import_bytes` build UnixFS DAGs under the IPIP-499
  ``unixfs-v1-2025`` profile (CIDs equal to ``ipfs-car``'s) and store them in a :class:`Blockstore`.
- :func:`write_car` / :func:`read_car` / :class:`CarReader` speak CAR v1, verifying every block read.
- :class:`Gateway` (or :func:`add_routes`) serves ``/ipfs/{cid}`` as a Trustless Gateway and takes
  uploads on ``PUT /v1/blobs``.
- :func:`fetch_input` brings a job's input (``ipfs://``, ``https://`` with sha256, or a local blob CID)
  to a local file, verified; :func:`fetch_car` brings any DAG from one trustless gateway into a store
  (every block checked against its CID and the DAG's links, the size bounded).
- :class:`CarImport` takes a CAR pushed piece by piece (a cluster worker's output), verified the same way.
- :func:`export_file` writes one UnixFS file out of a store; :func:`export_tree` a whole file or
  directory DAG, under limits that hold against a hostile DAG.
"""

from __future__ import annotations

from pathlib import Path

from core.config import StorageSection, resolve_path
from storage._blockstore import BlockBatch, Blockstore, StoreStats
from storage._car import CarReader, iter_car, read_car, write_car
from storage._cid import CID, DAG_PB, RAW
from storage._dag import ExportedFile, export_file, export_tree
from storage._fetch import CarImport, FetchedInput, fetch_car, fetch_input
from storage._gateway import Gateway, add_routes
from storage._importer import ImportResult, import_bytes, import_path, import_stream

__all__ = [
    "CID",
    "DAG_PB",
    "RAW",
    "BlockBatch",
    "Blockstore",
    "CarImport",
    "CarReader",
    "ExportedFile",
    "FetchedInput",
    "Gateway",
    "ImportResult",
    "StoreStats",
    "add_routes",
    "export_file",
    "export_tree",
    "fetch_car",
    "fetch_input",
    "import_bytes",
    "import_path",
    "import_stream",
    "iter_car",
    "open_blockstore",
    "read_car",
    "write_car",
]


def open_blockstore(home: Path, config: StorageSection) -> Blockstore:
    """The node's blockstore: ``[storage] blocks_dir`` (relative to the node home), as configured."""
    return Blockstore.open(resolve_path(home, config.blocks_dir), verify_reads=config.verify_reads)
