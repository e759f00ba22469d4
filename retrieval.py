"""Every retrieval metric of the project, computed exactly in one pass over the similarity matrix.

Pure functions shared by training (validation) and ``evaluate.py``. Embeddings come from
``extraction``; scores, sort keys and the ranking rule are ``knn``'s: cosine similarities of
L2-normalised float32 embeddings; higher score first; equal scores break by the lower gallery
index; a query is never in its own result list (excluded by index, never by dropping a column).

Metric definitions (also in docs/reference.md, "Metrics"):

Product protocol (Song et al. 2016; Musgrave et al. 2020). Queries: every image. Gallery:
every other image. Relevant: same ``class_id``. R = number of relevant items of the query.

* ``recall@K`` (K = 1, 10, 100, 1000): share of queries with a relevant item in the top K.
* ``map@r``: mean over queries of AP@R = (1/R) * sum_{i<=R} P(i) * rel(i).
* ``r_precision``: relevant items in the top R, divided by R.

Queries without any relevant item (a product with a single image) are left out of the
product-protocol averages, as pytorch-metric-learning does; SOP has none.

Category protocol (the original project's). Queries: every image. Gallery: images of *other products*
(every image of the query's own product is excluded). Relevant: same ``super_class_id``.

* ``recall@K`` (K = 1, 5, 10, 20): share of queries with a relevant item in the top K.
* ``precision@K``: relevant items in the top K, divided by K.
* ``map@10``: mean over queries of sum_{i<=10} P(i) * rel(i) / (relevant items in the top 10),
  0 for a query with none.
"""

from __future__ import annotations

import concurrent.futures
import threading
import warnings

import numpy as np

from knn import KEY_NONE, SingleThreadBLAS, key_index, key_score, l2_normalize, score_key, thread_count

PRODUCT_RECALL_KS = (1, 10, 100, 1000)
# Metric names of the product protocol, as evaluate_embeddings returns them under "product".
PRODUCT_METRICS = tuple(f"recall@{k}" for k in PRODUCT_RECALL_KS) + ("map@r", "r_precision")
CATEGORY_KS = (1, 5, 10, 20)
CATEGORY_MAP_AT = 10
CATEGORY_METRICS = (
    tuple(f"recall@{k}" for k in CATEGORY_KS)
    + tuple(f"precision@{k}" for k in CATEGORY_KS)
    + (f"map@{CATEGORY_MAP_AT}",)
)
# candidate buffer per query, in units of K: a full buffer is compacted to its K best,
# which raises the query's threshold (wider = fewer compactions, staler thresholds)
_BUFFER_WIDTH = 3

# ============ tiled engine: metrics in one symmetric pass over the similarity matrix ============


class _ClassStructure:
    """Who is relevant to whom under the product protocol.

    ``rel_idx[q, :R[q]]`` are the other images of q's product in index order (padded with
    -1); ``pair_*`` list every ordered same-product pair (q, m), self pairs included, which
    are the only cells the category protocol masks out.
    """

    def __init__(self, class_ids: np.ndarray):
        n = len(class_ids)
        _, codes = np.unique(class_ids, return_inverse=True)
        codes = codes.reshape(-1)
        order = np.argsort(codes, kind="stable")
        counts = np.bincount(codes)
        starts = np.cumsum(counts) - counts
        size = counts[codes]
        position = np.empty(n, dtype=np.int64)
        position[order] = np.arange(n)
        position -= starts[codes]  # position of each item within its class (index order)
        self.R = size - 1
        self.max_r = int(self.R.max()) if n else 0
        q = np.repeat(np.arange(n), size)
        offs = np.arange(len(q)) - np.repeat(np.cumsum(size) - size, size)
        m = order[np.repeat(starts[codes], size) + offs]
        is_self = offs == position[q]
        slot = offs - (offs > position[q])
        self.pair_q, self.pair_m, self.pair_self = q, m, is_self
        self.pair_slot = np.where(is_self, -1, slot)
        self.rel_idx = np.full((n, max(self.max_r, 1)), -1, dtype=np.int64)
        self.rel_idx[q[~is_self], slot[~is_self]] = m[~is_self]


class _TopKBuffer:
    """Running exact top-K per query, as sort keys, with a score threshold per query.

    Candidates go into a fixed-width buffer row; a full row is compacted to its K best keys
    (np.partition on keys), which raises that query's threshold. The threshold only ever
    rises and is always <= the final K-th best score, so filtering tiles with
    ``score >= threshold`` never drops a true top-K item, even when a worker thread reads a
    stale value.
    """

    def __init__(self, n: int, k: int, width: int):
        self.k, self.width = k, max(width, 2 * k)
        self.keys = np.full((n, self.width), KEY_NONE, dtype=np.uint64)
        self.fill = np.zeros(n, dtype=np.int64)
        self.kth = np.full(n, KEY_NONE, dtype=np.uint64)  # K-th best key so far
        self.threshold = np.full(n, -np.inf, dtype=np.float32)

    def add(self, q: np.ndarray, keys: np.ndarray) -> None:
        ok = keys < self.kth[q]
        q, keys = q[ok], keys[ok]
        while len(q):
            order = np.argsort(q)  # grouping only: the order within a query does not matter
            q, keys = q[order], keys[order]
            heads = np.flatnonzero(np.concatenate(([True], q[1:] != q[:-1])))
            counts = np.diff(np.append(heads, len(q)))
            uq = q[heads]
            pos = np.repeat(self.fill[uq] - heads, counts) + np.arange(len(q))
            fits = pos < self.width
            self.keys[q[fits], pos[fits]] = keys[fits]
            self.fill[uq] = np.minimum(self.fill[uq] + counts, self.width)
            full = uq[self.fill[uq] >= self.width]
            if len(full):
                self.compact(full)  # then place what did not fit, against the new K-th key
            q, keys = q[~fits], keys[~fits]
            if len(q):
                ok = keys < self.kth[q]
                q, keys = q[ok], keys[ok]

    def compact(self, rows: np.ndarray) -> None:
        block = self.keys[rows]
        block.partition(self.k - 1, axis=1)
        block[:, self.k :] = KEY_NONE
        self.keys[rows] = block
        self.fill[rows] = self.k
        kth = block[:, self.k - 1]
        self.kth[rows] = kth
        real = kth != KEY_NONE
        self.threshold[rows[real]] = key_score(kth[real])

    def result(self) -> np.ndarray:
        """[N, K] keys, best first (padded with KEY_NONE)."""
        best = np.partition(self.keys, self.k - 1, axis=1)[:, : self.k]
        best.sort(axis=1)
        return best


def _tile_cells(structure, n, cs, nb, width_rel):
    """The same-product cells of every tile of the upper triangle, grouped by tile.

    Returns ``(cell, rel_target, bounds)``: ``cell`` is a cell's flat position in its tile
    (tiles (lo block, hi block); a cell below the diagonal lives transposed in tile (hi, lo)),
    ``rel_target`` its place in the flat relevant-score matrix (-1 for a self pair), and tile
    (a, b) holds ``cell[bounds[a * nb + b]:bounds[a * nb + b + 1]]``.
    """
    pq, pm = structure.pair_q, structure.pair_m
    bq, bm = pq // cs, pm // cs
    swap = bq > bm  # the cell lives in tile (bm, bq), transposed
    lo, hi = np.minimum(bq, bm), np.maximum(bq, bm)
    row = np.where(swap, pm, pq) - lo * cs
    col = np.where(swap, pq, pm) - hi * cs
    tile_width = np.minimum(cs, n - hi * cs)
    cell = row * tile_width + col
    rel_target = np.where(structure.pair_self, -1, pq * width_rel + structure.pair_slot)
    tile_id = lo * nb + hi
    order = np.argsort(tile_id, kind="stable")
    tile_id, cell, rel_target = tile_id[order], cell[order], rel_target[order]
    return cell, rel_target, np.searchsorted(tile_id, np.arange(nb * nb + 1))


class _SymmetricPass:
    """One pass over the upper triangle of the similarity matrix, tile by tile.

    Each tile ``x[a] @ x[b].T`` serves the rows of block a (as is) and the rows of block b
    (transposed), so the matrix products cost half of a full pass. Per tile: read the
    same-product scores (product protocol), mask every same-product cell (category
    protocol gallery), then keep the cells at or above each query's running threshold.

    `run` returns (top-K keys over other products [N, K], relevant-item scores [N, max_r]).
    """

    def __init__(self, x, structure, k, chunk_size):
        n = len(x)
        # at most 2048 blocks a side: the per-tile bookkeeping is nb x nb
        self.cs = max(1, min(max(int(chunk_size), -(-n // 2048)), n))
        self.nb = (n + self.cs - 1) // self.cs
        self.x, self.n, self.k = x, n, k
        self.buf = _TopKBuffer(n, k, width=_BUFFER_WIDTH * k)
        self.rel_scores = np.full(structure.rel_idx.shape, -np.inf, dtype=np.float32)
        self.rel_flat = self.rel_scores.reshape(-1)
        self.cell, self.rel_target, self.bounds = _tile_cells(structure, n, self.cs, self.nb, self.rel_scores.shape[1])
        self.staged = []

    def scratch(self):
        """A tile's score and mask buffers (one pair per thread)."""
        size = self.cs * self.cs
        return np.empty(size, np.float32), np.empty(size, bool)

    def take_same_product(self, a, b, flat_t):
        """Copy tile (a, b)'s relevant scores out, then mask its same-product cells."""
        lo, hi = self.bounds[a * self.nb + b], self.bounds[a * self.nb + b + 1]
        if hi > lo:
            cells, targets = self.cell[lo:hi], self.rel_target[lo:hi]
            is_rel = targets >= 0
            # each relevant (query, slot) has exactly one cell in one tile: no write races
            self.rel_flat[targets[is_rel]] = flat_t[cells[is_rel]]
            flat_t[cells] = -np.inf

    def run_tile(self, a, b, scratch):
        """Candidates of tile (a, b), as [(query rows, gallery columns, scores)]: for the rows
        of block a and, off the diagonal, for those of block b."""
        n, cs, k, buf = self.n, self.cs, self.k, self.buf
        a0, a1, b0, b1 = a * cs, min(n, (a + 1) * cs), b * cs, min(n, (b + 1) * cs)
        h, w = a1 - a0, b1 - b0
        t = scratch[0][: h * w].reshape(h, w)
        mask = scratch[1][: h * w].reshape(h, w)
        np.matmul(self.x[a0:a1], self.x[b0:b1].T, out=t)
        flat_t = t.reshape(-1)
        self.take_same_product(a, b, flat_t)
        out = []
        thr = buf.threshold[a0:a1].copy()
        if a == b and h > k:
            # first visit of these rows: start the threshold at the K-th best of this tile
            thr = np.maximum(thr, np.partition(t, w - k, axis=1)[:, w - k])
            np.maximum(buf.threshold[a0:a1], thr, out=buf.threshold[a0:a1])
        np.greater_equal(t, thr[:, None], out=mask)
        f = np.flatnonzero(mask)
        if len(f):
            r, c = np.divmod(f, w)
            out.append((r + a0, c + b0, flat_t[f]))
        if a != b:
            thr = buf.threshold[b0:b1].copy()
            np.greater_equal(t, thr[None, :], out=mask)
            f = np.flatnonzero(mask)
            if len(f):
                r, c = np.divmod(f, w)
                out.append((c + b0, r + a0, flat_t[f]))
        return out

    def merge(self, results, flush=False):
        """Stage tiles' candidates; add them to the top-K buffer every 8 (now with ``flush``)."""
        # candidates of a few tiles go in together: a merge costs ~20 numpy calls, whatever
        # its size, and thresholds a few tiles staler let through only a few more candidates
        staged = self.staged
        staged.extend(results)
        if staged and (flush or len(staged) >= 8):
            q = np.concatenate([r[0] for r in staged])
            g = np.concatenate([r[1] for r in staged])
            s = np.concatenate([r[2] for r in staged])
            staged.clear()
            keep = s > -np.inf  # masked same-product cells that met a -inf threshold
            self.buf.add(q[keep], score_key(s[keep], g[keep]))

    def tiles(self):
        """(the diagonal tiles, the others ordered by distance from the diagonal)."""
        # SOP-style files list products by category, so near tiles hold the strongest
        # competitors and raise the thresholds early
        nb = self.nb
        off = sorted(((a, b) for a in range(nb) for b in range(a + 1, nb)), key=lambda t: (t[1] - t[0], t[0]))
        return [(a, a) for a in range(nb)], off

    def run(self, threads):
        diagonal, off = self.tiles()
        if threads == 1:
            scratch = self.scratch()
            for a, b in diagonal + off:
                self.merge(self.run_tile(a, b, scratch))
            self.merge([], flush=True)
        else:
            self.run_threaded(threads, diagonal, off)
        return self.buf.result(), self.rel_scores

    def run_threaded(self, threads, diagonal, off):
        local = threading.local()

        def task(ab):
            if not hasattr(local, "scratch"):
                local.scratch = self.scratch()
            return self.run_tile(ab[0], ab[1], local.scratch)

        with SingleThreadBLAS(True), concurrent.futures.ThreadPoolExecutor(threads) as pool:
            # the diagonal first, all of it: it gives every row a threshold before any
            # off-diagonal tile is filtered
            for results in pool.map(task, diagonal):
                self.merge(results)
            self.merge([], flush=True)
            window = 2 * threads  # bounded look-ahead keeps thresholds fresh
            pending = []
            for ab in off:
                pending.append(pool.submit(task, ab))
                if len(pending) >= window:
                    self.merge(pending.pop(0).result())
            for fut in pending:
                self.merge(fut.result())
            self.merge([], flush=True)


def _rank_of_best_relevant(x, structure, rows, chunk_size, num_threads):
    """1-based rank, in the product-protocol ranking, of the best relevant item of each row
    in ``rows``: 1 + (other-product items scoring higher) + (equal-scoring ones with a lower
    index). Used for the few queries whose best relevant item lies beyond the top-K list.

    Every score of a row, its relevant items' included, comes from one matrix product, so the
    comparison is self-consistent (two BLAS calls may round the same dot product differently,
    which matters when embeddings collapse and scores tie)."""
    n = len(x)
    out = np.empty(len(rows), dtype=np.int64)
    if not len(rows):
        return out
    h = max(1, min(len(rows), (16 << 20) // (4 * n)))  # rows per block: <= 16 MB of scores

    def task(start):
        rr = rows[start : start + h]
        t = x[rr] @ x.T
        ridx = structure.rel_idx[rr]
        valid = ridx >= 0
        safe = np.maximum(ridx, 0)
        best = np.where(valid, score_key(np.take_along_axis(t, safe, axis=1), safe), KEY_NONE).min(axis=1)
        s1, b1 = key_score(best), key_index(best)
        # the query's own product (itself included) is not competition
        own_r, own_c = np.nonzero(valid)
        t[own_r, ridx[own_r, own_c]] = -np.inf
        t[np.arange(len(rr)), rr] = -np.inf
        count = np.count_nonzero(t > s1[:, None], axis=1)
        # an equal score ranks first only from a lower index
        tie_r, tie_c = np.divmod(np.flatnonzero(t == s1[:, None]), n)
        count += np.bincount(tie_r[tie_c < b1[tie_r]], minlength=len(rr))
        out[start : start + len(rr)] = 1 + count

    starts = range(0, len(rows), h)
    threads = min(thread_count(num_threads), len(starts))
    if threads == 1:
        for s in starts:
            task(s)
    else:
        with SingleThreadBLAS(True), concurrent.futures.ThreadPoolExecutor(threads) as pool:
            list(pool.map(task, starts))
    return out


def _product_protocol(x, structure, top_keys, rel_scores, k, chunk_size, num_threads):
    """(best_relevant_rank, ap_at_r, r_precision) per query, from the pass's top-K keys of other
    products (``top_keys``) and the scores of each query's relevant items (``rel_scores``)."""
    top_valid = top_keys != KEY_NONE
    R = structure.R
    rel_valid = structure.rel_idx >= 0
    rel_keys = np.where(rel_valid, score_key(rel_scores, np.maximum(structure.rel_idx, 0)), KEY_NONE)
    rel_keys.sort(axis=1)  # j-th column = j-th relevant item in ranking order
    before = np.zeros(rel_keys.shape, dtype=np.int64)  # other-product items ranked before it
    for j in range(rel_keys.shape[1]):  # loop over <= max R columns, not over queries
        before[:, j] = np.count_nonzero(top_keys < rel_keys[:, j : j + 1], axis=1)
    position = np.arange(1, rel_keys.shape[1] + 1)[None, :] + before
    in_top_r = rel_valid & (position <= R[:, None])
    with np.errstate(divide="ignore", invalid="ignore"):
        ap = np.where(R > 0, (in_top_r * (np.arange(1, rel_keys.shape[1] + 1) / position)).sum(1) / R, np.nan)
        rp = np.where(R > 0, in_top_r.sum(1) / R, np.nan)
    best_rank = np.where(R > 0, position[:, 0], 0)
    # the top-K list is complete when it holds fewer than K items; otherwise a best relevant
    # item behind all K of them has an unknown rank > K: count it exactly
    saturated = (R > 0) & (before[:, 0] >= k) & top_valid[:, -1]
    hard = np.flatnonzero(saturated)
    best_rank[hard] = _rank_of_best_relevant(x, structure, hard, chunk_size, num_threads)
    return best_rank, ap, rp


def retrieval_details(embeddings, class_ids, super_ids, chunk_size=1024, num_threads=None):
    """Per-query quantities behind `evaluate_embeddings` (arrays of length N):

    ``top_other`` [N, K] indices of the K best images of other products (K >= 20, -1 pad),
    ``top_other_scores``, ``best_relevant_rank`` (1-based, product protocol; 0 when the
    query has no relevant item), ``ap_at_r``, ``r_precision``, ``num_relevant`` (R), and
    ``category_relevant`` [N, 20] booleans.
    """
    x = l2_normalize(embeddings)
    n = len(x)
    class_ids = np.asarray(class_ids).reshape(-1)
    super_ids = np.asarray(super_ids).reshape(-1)
    if len(class_ids) != n or len(super_ids) != n:
        raise ValueError(f"got {n} embeddings but {len(class_ids)} class ids and {len(super_ids)} super ids")
    if n < 2:
        raise ValueError(f"need at least 2 embeddings to evaluate retrieval, got {n}")
    if n >= 2**32:
        raise ValueError("more than 2**32 embeddings: the sort keys hold 32-bit indices")
    spread = float(np.max(x.max(axis=0) - x.min(axis=0)))
    if spread < 1e-4:
        warnings.warn(
            f"the {n} embeddings have collapsed (every coordinate varies by < {spread:.1e} across "
            "images): scores differ only by float rounding, so the ranking is decided by ties and "
            "rounding and the metrics say nothing about the model",
            RuntimeWarning,
            stacklevel=2,
        )
    structure = _ClassStructure(class_ids)
    max_r = structure.max_r
    # K >= max R: a relevant item j sits at rank j + (other-product items before it); it is in
    # the top R only if fewer than R <= K of them come first, which the top-K list answers
    k = max(max(CATEGORY_KS), max_r)
    top_keys, rel_scores = _SymmetricPass(x, structure, k, chunk_size).run(thread_count(num_threads))
    top_valid = top_keys != KEY_NONE
    top_idx = np.where(top_valid, key_index(top_keys), -1)

    best_rank, ap, rp = _product_protocol(x, structure, top_keys, rel_scores, k, chunk_size, num_threads)
    # category protocol: the top-20 of other products, relevant when of the query's category
    n_cat = max(CATEGORY_KS)
    first = top_idx[:, :n_cat]
    cat_rel = (first >= 0) & (super_ids[np.maximum(first, 0)] == super_ids[:, None])
    return {
        "category_num_relevant": category_num_relevant(class_ids, super_ids),
        "num_categories": int(len(np.unique(super_ids))),
        "top_other": top_idx,
        "top_other_scores": np.where(top_valid, key_score(top_keys), -np.inf).astype(np.float32),
        "best_relevant_rank": best_rank,
        "num_relevant": structure.R,
        "ap_at_r": ap,
        "r_precision": rp,
        "category_relevant": cat_rel,
    }


def category_num_relevant(class_ids, super_ids) -> np.ndarray:
    """Per query, the relevant items of the category protocol: the images of its category
    that belong to other products (its own product is not in its gallery)."""
    _, cat_of, in_category = np.unique(np.asarray(super_ids).reshape(-1), return_inverse=True, return_counts=True)
    _, prod_of, in_product = np.unique(np.asarray(class_ids).reshape(-1), return_inverse=True, return_counts=True)
    return in_category[cat_of] - in_product[prod_of]


def undefined(keys, why: str) -> dict:
    """A protocol's metrics when none is defined: every value None, and ``why`` says why (a
    metric without a valid query is not 0)."""
    return {**{k: None for k in keys}, "why": why}


def product_undefined_reason(num_relevant, mask=None) -> str | None:
    """Why the product protocol has no query among ``mask`` (None when it has one): a query
    needs another image of its product."""
    valid = np.asarray(num_relevant) > 0
    if mask is not None:
        valid &= np.asarray(mask, dtype=bool)
    if valid.any():
        return None
    return "n/a: no product here has two images, so no query has a relevant item"


def category_undefined_reason(cat_relevant, num_categories: int, mask=None) -> str | None:
    """Why the category protocol says nothing among ``mask`` (None when it does): with a single
    category every other product is relevant (trivially 100%); when every category holds one
    product, no query has a relevant item (labels that are categories, not products)."""
    if num_categories == 1:
        return "trivial: one category, so every other product is relevant"
    valid = np.asarray(cat_relevant) > 0
    if mask is not None:
        valid &= np.asarray(mask, dtype=bool)
    if valid.any():
        return None
    return "n/a: every category here holds a single product, so no query has a relevant item"


def metrics_from_details(details, mask=None):
    """The metrics dict (evaluate_embeddings shape) from `retrieval_details`, over the queries in
    ``mask``. Each protocol averages over its valid queries only: those with a relevant item
    (another image of the product; another product of the category). A protocol without one,
    or the category protocol of a single category, is `undefined` (None values and ``why``)."""
    R = details["num_relevant"]
    mask = np.ones(len(R), dtype=bool) if mask is None else np.asarray(mask, dtype=bool)
    has_rel = mask & (R > 0)
    rank = details["best_relevant_rank"][has_rel]

    def mean(v):
        return float(np.mean(v)) if len(v) else float("nan")

    why = product_undefined_reason(R, mask)
    if why:
        product = undefined(PRODUCT_METRICS, why)
    else:
        product = {f"recall@{kk}": mean(rank <= kk) for kk in PRODUCT_RECALL_KS}
        product["map@r"] = mean(details["ap_at_r"][has_rel])
        product["r_precision"] = mean(details["r_precision"][has_rel])
    cat_relevant = details.get("category_num_relevant", np.ones(len(R), dtype=np.int64))
    why = category_undefined_reason(cat_relevant, details.get("num_categories", 2), mask)
    if why:
        return {"product": product, "category": undefined(CATEGORY_METRICS, why), "num_queries": int(mask.sum())}
    rel = details["category_relevant"][mask & (cat_relevant > 0)]
    category = {f"recall@{kk}": mean(rel[:, :kk].any(1)) for kk in CATEGORY_KS}
    category.update({f"precision@{kk}": mean(rel[:, :kk].sum(1) / kk) for kk in CATEGORY_KS})
    top = rel[:, :CATEGORY_MAP_AT]
    hits = top.sum(1)
    precision_at_i = np.cumsum(top, axis=1) / np.arange(1, CATEGORY_MAP_AT + 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        ap10 = np.where(hits > 0, (precision_at_i * top).sum(1) / hits, 0.0)
    category["map@10"] = mean(ap10)
    return {"product": product, "category": category, "num_queries": int(mask.sum())}


def evaluate_embeddings(embeddings, class_ids, super_ids, chunk_size=1024, num_threads=None):
    """Both retrieval protocols (module docstring) over ``embeddings`` (every image is a query).

    Returns ``{"product": {recall@1/10/100/1000, map@r, r_precision}, "category": {recall@1/5/
    10/20, precision@1/5/10/20, map@10}, "num_queries": N}`` with fractions in [0, 1].

    Exact: the ranking of every query over the whole gallery is honoured (ties by lower
    index), but no N x N matrix exists: tiles of ``chunk_size`` x ``chunk_size`` scores of the
    upper triangle are filtered against a running per-query top-K threshold, and each
    query's recall@K for K up to 1000 comes from the rank of its best relevant item.
    ``num_threads`` defaults to the CPUs this process may use.
    """
    details = retrieval_details(embeddings, class_ids, super_ids, chunk_size=chunk_size, num_threads=num_threads)
    return metrics_from_details(details)
