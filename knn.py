"""Exact k-nearest-neighbour search by inner product, and the ranking rule every search here shares.

Scores are cosine similarities of L2-normalised float32 embeddings (inner products). Ranking
rule: higher score first; equal scores break by the lower gallery index; a query is never in
its own result list (excluded by index, never by dropping a column). A sort key (`score_key`)
packs (score, index) into one uint64 whose ascending order is that ranking order; the metrics
(``retrieval``) and the gallery index (``search.index``) rank with the same keys and BLAS rule.
"""

from __future__ import annotations

import os
import threading

import numpy as np

# ============ sort keys ============

# A sort key packs (score, index) into one uint64 whose ascending order is the ranking
# order: high 32 bits = score bits flipped so that larger scores come first, low 32 bits =
# gallery index so that equal scores break by the lower index. Keys are unique per row, so
# np.partition / np.sort on them give exact top-k with the tie rule, no lexsort needed.
KEY_NONE = np.iinfo(np.uint64).max
_LOW32 = np.uint64(0xFFFFFFFF)


def score_key(scores: np.ndarray, index: np.ndarray) -> np.ndarray:
    """uint64 keys ordered by (score descending, index ascending)."""
    s = np.asarray(scores, dtype=np.float32) + np.float32(0.0)  # -0.0 -> +0.0: they tie
    bits = s.view(np.uint32)
    ascending = np.where(bits >> 31, ~bits, bits | np.uint32(0x80000000))
    return ((~ascending).astype(np.uint64) << np.uint64(32)) | np.asarray(index).astype(np.uint64)


def key_score(keys: np.ndarray) -> np.ndarray:
    """Inverse of the score half of `score_key`."""
    ascending = ~((keys >> np.uint64(32)).astype(np.uint32))
    bits = np.where(ascending >> 31, ascending & np.uint32(0x7FFFFFFF), ~ascending)
    return bits.view(np.float32)


def key_index(keys: np.ndarray) -> np.ndarray:
    return (keys & _LOW32).astype(np.int64)


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Rows divided by their L2 norm, as C-contiguous float32 (zero rows stay zero)."""
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"embeddings must be a 2-D array [N, D], got shape {x.shape}")
    if not np.isfinite(x).all():
        bad = np.flatnonzero(~np.isfinite(x).all(axis=1))
        raise ValueError(
            f"embeddings hold NaN/inf in {len(bad)} rows (first: {bad[:5].tolist()}); "
            "the model diverged or the input is corrupt: re-extract the embeddings"
        )
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.ascontiguousarray(x / np.maximum(norms, np.float32(1e-12)), dtype=np.float32)


def thread_count(num_threads: int | None) -> int:
    """``num_threads`` when given, else the CPUs this process may run on."""
    if num_threads:
        return max(1, int(num_threads))
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def _release_openblas_control() -> None:
    """Let any thread set OpenBLAS's thread count next (threadpoolctl >= 3.6 tracks one
    controlling thread for pthreads OpenBLAS; older versions have no such state)."""
    try:
        from threadpoolctl import OpenBLASController
    except ImportError:  # pragma: no cover - threadpoolctl ships with scikit-learn
        return
    clear = getattr(OpenBLASController, "clear_controlling_thread", None)
    if clear is not None:
        clear(force=True)


class SingleThreadBLAS:
    """Pin BLAS to one thread for the duration of a block.

    Two reasons: our own worker threads each run a matrix product (two single-threaded
    products on two cores run as fast as one two-threaded product, and the filtering beside
    them then runs in parallel too); and a single query's matrix-vector product is ~2 ms on
    one thread but 10-30 ms when OpenBLAS's spinning threads compete with other processes.
    The limit is process-wide, so overlapping blocks (concurrent demo requests) are counted:
    the first one in sets it, the last one out restores the original.

    With a pthreads OpenBLAS, threadpoolctl lets only one "controlling thread" change limits and
    silently ignores the others; the first and the last block may run on different threads
    (demo workers), so each change here takes control first and hands it back afterwards, or
    the restore (and every later limit in the process) would be a silent no-op.
    """

    _lock = threading.Lock()
    _depth = 0
    _limiter = None
    _controller = []  # threadpoolctl controller, created once (scanning libraries costs ~10 ms)

    def __init__(self, active: bool = True):
        self.active = active

    def __enter__(self):
        if not self.active:
            return self
        cls = type(self)
        with cls._lock:
            if not cls._controller:
                try:
                    from threadpoolctl import ThreadpoolController
                except ImportError:  # pragma: no cover - threadpoolctl ships with scikit-learn
                    cls._controller.append(None)
                else:
                    cls._controller.append(ThreadpoolController())
            if cls._depth == 0 and cls._controller[0] is not None:
                _release_openblas_control()
                cls._limiter = cls._controller[0].limit(limits=1, user_api="blas")
                _release_openblas_control()
            cls._depth += 1
        return self

    def __exit__(self, *exc):
        if self.active:
            cls = type(self)
            with cls._lock:
                cls._depth -= 1
                if cls._depth == 0 and cls._limiter is not None:
                    _release_openblas_control()
                    cls._limiter.restore_original_limits()
                    _release_openblas_control()
                    cls._limiter = None
        return False


# ============ exact k-nearest neighbours ============


def topk_dense(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k of each row of a dense score block, ties by lower column.

    Entries equal to -inf count as excluded. Rows with fewer than k admissible columns are
    padded with score -inf and index -1.
    """
    rows, n = scores.shape
    out_s = np.full((rows, k), -np.inf, dtype=np.float32)
    out_i = np.full((rows, k), -1, dtype=np.int64)
    if rows == 0 or n == 0 or k == 0:
        return out_s, out_i
    if k < n:
        # value of the k-th largest: everything >= it is a candidate (ties included), the
        # exact order among the few candidates then comes from the (score, index) keys
        kth = np.partition(scores, n - k, axis=1)[:, n - k]
        flat = np.flatnonzero(scores >= kth[:, None])
    else:
        flat = np.arange(rows * n)
    s = scores.reshape(-1)[flat]
    keep = s > -np.inf
    flat, s = flat[keep], s[keep]
    r, c = np.divmod(flat, n)
    order = np.lexsort((score_key(s, c), r))
    r, c, s = r[order], c[order], s[order]
    rank = np.arange(len(r)) - np.searchsorted(r, r, side="left")
    sel = rank < k
    out_s[r[sel], rank[sel]] = s[sel]
    out_i[r[sel], rank[sel]] = c[sel]
    return out_s, out_i


def knn(
    queries,
    gallery,
    k,
    exclude_self=False,
    self_indices=None,
    query_groups=None,
    gallery_groups=None,
    chunk_size=None,
    normalize=True,
):
    """Exact k nearest neighbours by inner product, in chunks of ``chunk_size`` queries.

    Memory is bounded by ``chunk_size x len(gallery)`` scores (default: as many queries as
    fit in 64 MB of scores): the full similarity matrix is never built. Ties break by the
    lower gallery index.

    exclude_self: queries are the gallery itself (same order); query i never returns i.
    self_indices: gallery index of each query (queries taken from the gallery), excluded
        from that query's results; ``exclude_self=True`` is ``self_indices=arange(N)``.
    query_groups / gallery_groups: integer ids; gallery items sharing the query's group are
        excluded (the category protocol drops the query's whole product this way).
    Returns ``(scores float32 [Nq, k], indices int64 [Nq, k])``, padded with -inf / -1 when
    fewer than k gallery items are admissible.
    """
    q = l2_normalize(queries) if normalize else np.ascontiguousarray(queries, dtype=np.float32)
    g = l2_normalize(gallery) if normalize else np.ascontiguousarray(gallery, dtype=np.float32)
    if q.shape[1] != g.shape[1]:
        raise ValueError(f"queries have dimension {q.shape[1]} but the gallery has {g.shape[1]}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    self_indices = _query_self_indices(exclude_self, self_indices, len(q), len(g))
    pairs = _group_exclusions(query_groups, gallery_groups)
    scores = np.empty((len(q), k), dtype=np.float32)
    indices = np.empty((len(q), k), dtype=np.int64)
    chunk_size = max(1, int(chunk_size or (16 << 20) // max(1, len(g))))
    for start in range(0, len(q), chunk_size):
        stop = min(len(q), start + chunk_size)
        block = q[start:stop] @ g.T
        _exclude_from_block(block, start, stop, self_indices, pairs)
        scores[start:stop], indices[start:stop] = topk_dense(block, k)
    return scores, indices


def _query_self_indices(exclude_self, self_indices, num_queries, num_gallery):
    """The gallery index each query must not return (int64 [Nq]), or None when no query is in the gallery."""
    if exclude_self and num_queries != num_gallery:
        raise ValueError(
            "exclude_self=True needs the queries to be the gallery itself "
            f"(got {num_queries} queries and {num_gallery} gallery items)"
        )
    if exclude_self:
        self_indices = np.arange(num_queries)
    if self_indices is not None:
        self_indices = np.asarray(self_indices, dtype=np.int64).reshape(-1)
        if len(self_indices) != num_queries:
            raise ValueError(f"self_indices has {len(self_indices)} entries for {num_queries} queries")
    return self_indices


def _group_exclusions(query_groups, gallery_groups):
    """The (query, gallery) index pairs sharing a group, sorted by query index, or None without groups.

    Same-group pairs are few (a product holds <= 12 images), so they are listed once instead
    of comparing every pair of ids per chunk."""
    if (query_groups is None) != (gallery_groups is None):
        raise ValueError("pass both query_groups and gallery_groups, or neither")
    if query_groups is None:
        return None
    return _same_group_pairs(np.asarray(query_groups), np.asarray(gallery_groups))


def _exclude_from_block(block, start, stop, self_indices, pairs):
    """Set to -inf the scores of queries ``start:stop`` against their own gallery item and their group."""
    if self_indices is not None:
        own = self_indices[start:stop]
        ok = (own >= 0) & (own < block.shape[1])
        block[np.flatnonzero(ok), own[ok]] = -np.inf
    if pairs is not None:
        pairs_q, pairs_g = pairs
        lo, hi = np.searchsorted(pairs_q, [start, stop])
        block[pairs_q[lo:hi] - start, pairs_g[lo:hi]] = -np.inf


def _same_group_pairs(query_groups, gallery_groups):
    """All (query, gallery) index pairs with equal group ids, sorted by query index."""
    order = np.argsort(gallery_groups, kind="stable")
    sorted_groups = gallery_groups[order]
    lo = np.searchsorted(sorted_groups, query_groups, side="left")
    hi = np.searchsorted(sorted_groups, query_groups, side="right")
    counts = hi - lo
    pairs_q = np.repeat(np.arange(len(query_groups)), counts)
    offsets = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
    pairs_g = order[np.repeat(lo, counts) + offsets]
    return pairs_q, pairs_g
