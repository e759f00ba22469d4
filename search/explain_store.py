"""Stored similarity-map projections of a gallery: what makes "Show why" cost dot products.

A result's similarity map against a query is ``P_r . e_q`` (`explain.projections`): P_r, the
per-location projections of the result's feature grid [H, W, D], depends on the result alone.
This store keeps P_r of every gallery image in one ``.npy`` file beside the gallery index
(`store_path`), read into memory, so that explaining K results needs no forward pass over them.

File: a numpy structured array of N records ``(key uint64, proj float16 [H, W, D])``. ``key``
is `row_key` of the gallery index's embedding of that image: a record is found by the vector the
index holds, so rows follow the gallery through any reordering,
addition or removal, and an image whose embedding changed (new file content, other weights) is
simply not found (its map is then computed from the image, as without a store). Each record
sums over its locations to the image's unit embedding (checked when it is written).

float16 keeps 12.5 KB per image for a 7 x 7 grid and 128-d embeddings (SOP's 60,502 test images:
0.76 GB); a stored result map then sums to the cosine score within ~1e-3 instead of 1e-6.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import numpy as np

from dataio import fileio

logger = logging.getLogger("app_stanford")

SUFFIX = ".why.npy"
# |sum of a record over its locations - the index's embedding| allowed when it is written: float16
# rounding of [H, W, D] summands, plus the batch / runtime rounding between the index's pass and
# this one. More means the image file changed after it was indexed: the record is not stored.
CONSISTENCY_ATOL = 2e-2


def store_path(index_path) -> Path:
    """``gallery_test.npz`` -> ``gallery_test.why.npy`` (beside the index it belongs to)."""
    p = Path(index_path)
    return p.with_name(p.stem + SUFFIX)


def row_key(vector) -> int:
    """The uint64 a record is found by: the first 8 bytes (little-endian) of the BLAKE2b hash of
    the float32 bytes of an embedding as the gallery index stores it."""
    data = np.ascontiguousarray(vector, dtype=np.float32).tobytes()
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


def record_dtype(grid_shape, dim) -> np.dtype:
    h, w = grid_shape
    return np.dtype([("key", "<u8"), ("proj", "<f2", (int(h), int(w), int(dim)))])


def store_bytes(num_images, grid_shape, dim) -> int:
    return int(num_images) * record_dtype(grid_shape, dim).itemsize


class ExplainStore:
    """Records (module docstring) by key: ``get(vector)`` -> float32 [H, W, D] or None."""

    def __init__(self, table: np.ndarray):
        if table.dtype.names != ("key", "proj") or table["proj"].ndim != 4:
            raise ValueError(f"not an explanation store (dtype {table.dtype})")
        self.table = table
        self.rows = {int(k): r for r, k in enumerate(table["key"].tolist())}

    def __len__(self):
        return len(self.table)

    @property
    def grid_shape(self):
        return tuple(self.table.dtype["proj"].shape[:2])

    @property
    def dim(self):
        return int(self.table.dtype["proj"].shape[2])

    def get(self, vector):
        row = self.rows.get(row_key(vector))
        return None if row is None else np.asarray(self.table["proj"][row], dtype=np.float32)

    @classmethod
    def load(cls, path) -> ExplainStore:
        """Read the store at ``path`` into memory; ValueError for a file that is not a whole store.
        Not memory-mapped: a mapped file truncated in place under a serving demo would kill it
        (SIGBUS) at the next read."""
        try:
            table = np.load(path, allow_pickle=False)
        except (OSError, ValueError, EOFError) as e:
            raise ValueError(f"{path} is not a readable explanation store ({type(e).__name__}: {e})") from e
        return cls(table)


def _previous(path: Path, grid_shape, dim):
    if not path.exists():
        return None
    try:
        store = ExplainStore.load(path)
    except ValueError as e:
        logger.warning("Explanation store %s: %s; rebuilding it", path, e)
        return None
    if (store.grid_shape, store.dim) != (tuple(grid_shape), int(dim)):
        logger.info(
            "Explanation store %s holds %s x %d records, not %s x %d; rebuilding it",
            path,
            store.grid_shape,
            store.dim,
            tuple(grid_shape),
            dim,
        )
        return None
    return store


def sync_store(path, vectors, files, compute, grid_shape, batch_size=32, progress=True) -> ExplainStore:
    """The store at ``path`` for a gallery whose row i is embedded as ``vectors[i]`` ([N, D]) from
    image file ``files[i]``: records whose key is already in the file are kept, the others are
    made with ``compute(files) -> projections [B, H, W, D]`` (NaN for a file that does not
    decode) in batches of ``batch_size`` and kept when their projections sum to ``vectors[i]``
    (`CONSISTENCY_ATOL`); the others are counted, logged and left out.
    The file is rewritten (atomically: fileio.atomic_write) only when its records changed.
    Returns the store, read back from the file."""
    path = Path(path)
    vectors = np.asarray(vectors, dtype=np.float32)
    dtype = record_dtype(grid_shape, vectors.shape[1])
    previous = _previous(path, grid_shape, vectors.shape[1])
    keys = [row_key(v) for v in vectors]
    first_row = {}  # key -> its first gallery row: identical images share one record
    for r, k in enumerate(keys):
        first_row.setdefault(k, r)
    unique = list(first_row)
    have = previous.rows if previous is not None else {}
    todo = [first_row[k] for k in unique if k not in have]
    if previous is not None and not todo and len(previous) == len(unique):
        return previous
    table = np.zeros(len(unique), dtype=dtype)
    slot = {k: n for n, k in enumerate(unique)}
    table["key"] = np.array(unique, dtype=np.uint64)
    for k in unique:
        if k in have:
            table["proj"][slot[k]] = previous.table["proj"][have[k]]
    rejected, unreadable = _fill_records(table, slot, keys, todo, vectors, files, compute, batch_size, progress)
    _warn_left_out(len(rejected), unreadable)
    if rejected:
        table = table[~np.isin(table["key"], np.array(sorted(rejected), dtype=np.uint64))]
    fileio.atomic_write(path, lambda f: np.save(f, table, allow_pickle=False))
    logger.info("Saved explanation store %s (%d images, %.1f MB)", path, len(table), path.stat().st_size / 1e6)
    return ExplainStore.load(path)


def _fill_records(table, slot, keys, todo, vectors, files, compute, batch_size, progress):
    """Compute the records of gallery rows ``todo`` (`sync_store`) into ``table`` (row r's at
    ``slot[keys[r]]``), in batches of ``batch_size``. Returns ``(rejected keys, unreadable count)``:
    the rows whose projections do not sum to their vector, of which that many did not decode."""
    rejected, unreadable = set(), 0
    if not todo:
        return rejected, unreadable
    from tqdm import tqdm

    bar = tqdm(total=len(todo), desc="explanation store", unit="img", disable=not progress)
    for start in range(0, len(todo), batch_size):
        rows = todo[start : start + batch_size]
        proj = np.asarray(compute([files[r] for r in rows]), dtype=np.float32)
        sums = proj.sum((1, 2))
        for n, r in enumerate(rows):
            if np.abs(sums[n] - vectors[r]).max() <= CONSISTENCY_ATOL:
                table["proj"][slot[keys[r]]] = proj[n]
            else:  # changed or unreadable since it was indexed: no record, its map is computed live
                rejected.add(keys[r])
                unreadable += int(not np.isfinite(sums[n]).all())
        bar.update(len(rows))
    bar.close()
    return rejected, unreadable


def _warn_left_out(rejected: int, unreadable: int) -> None:
    """Warn of the ``rejected`` records left out of the store, ``unreadable`` of them for an
    image that did not decode, the rest for one that no longer matches its embedding."""
    if unreadable:
        logger.warning(
            "Explanation store: %d gallery images could not be read (corrupt, vanished or not "
            "readable) and are skipped",
            unreadable,
        )
    if rejected > unreadable:
        logger.warning(
            "Explanation store: %d images no longer match their index embedding (changed "
            "since indexing?); their maps are computed when asked",
            rejected - unreadable,
        )
