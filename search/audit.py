"""The catalogue audit's findings, from unit embeddings and product ids (numpy only).

Definitions (docs/audit.md has the reasoning; s(i, j) is the cosine similarity of photos i, j):

* ``duplicate``: photos i, j under *different* product ids with s(i, j) >= the duplicate
  threshold and near copies in pixels (`search.near_copy`), each the other's best such match
  (`mutual_best`); score s(i, j). Both thresholds (`duplicate_threshold`) are a low quantile of
  the scores between catalogue photos and edited copies of themselves (`edited_copy`: crop,
  resize, colour, JPEG re-encoding): how close "the same photo" is, for the model and in pixels.
* ``mislabelled``: photo i of product p whose best match in another product q, b(i) =
  max_j s(i, j) over j of q, beats its best match in its own product, o(i) = max s(i, j) over
  the other photos j of p, by a margin m(i) = b(i) - o(i) above the catalogue's own outlier
  bound (`margin_threshold`), and i is among the nearest neighbours of the photo j that claims it
  as a genuine match is of its own (`reciprocal_rank` within `reciprocal_bound`); score m(i).
  Photos alone in their product have no o(i) and are not judged. b(i) skips i's duplicate
  partner (the copy does not make its source mislabelled), and a photo of a duplicate finding
  whose best other product is its partner's is not listed again: the duplicate row already names
  that product and the photo it is a copy of.

Neighbours come from `search.index.GalleryIndex.search` (the serving index: exact, or faiss
IVF / HNSW with an exact re-rank), the k nearest of each photo, itself left out.
"""

import dataclasses
import io
import random

import numpy as np
from PIL import Image, ImageEnhance

from search.index import GalleryIndex

KINDS = ("duplicate", "mislabelled", "unreadable")
# quantile of the edited-copy scores taken as the duplicate threshold: 5% of the edited copies
# of a catalogue photo (edits as strong as `edited_copy` draws) score below it and would be missed
DUPLICATE_QUANTILE = 0.05
# modified z-score above which a margin is an outlier (Iglewicz & Hoaglin's 3.5 for the
# median / MAD z-score): the catalogue's own spread of margins, not a fixed score
OUTLIER_Z = 3.5
# quantile of the catalogue's genuine reciprocal ranks (a photo's position in its own best
# same-product match's neighbour list) that a mislabelled claim may reach: 5% of genuine matches
# are less mutual than that, as 5% of edited copies fall below the duplicate threshold
RECIPROCAL_QUANTILE = 0.95
QUERY_BATCH = 1024  # queries per GalleryIndex.search call: a [1024, N] float32 block at a time


@dataclasses.dataclass
class Finding:
    """One row of audit.csv (the column definitions are the kinds' in the module docstring)."""

    kind: str
    row: int
    other_row: int = -1
    score: float = float("nan")


# ============ neighbours ============


def neighbour_count(product_ids, extra=16) -> int:
    """k for the neighbour lists: the largest product's size plus ``extra``, so that a photo's
    own product cannot fill its whole list and hide the nearest other product."""
    _, counts = np.unique(np.asarray(product_ids, dtype=object).astype(str), return_counts=True)
    return int(counts.max()) + extra if len(counts) else extra


def vector_index(vectors, index_type="exact") -> GalleryIndex:
    """A GalleryIndex over bare vectors (rows are their own ids), for `neighbours`."""
    n = len(vectors)
    return GalleryIndex(
        embeddings=vectors,
        paths=[str(i) for i in range(n)],
        class_ids=np.arange(n),
        super_ids=np.ones(n, np.int64),
        categories=["all"],
        index_type=index_type,
    )


def neighbours(vectors, k, index_type="exact", progress=True, index=None):
    """``(scores float32 [N, k], rows int64 [N, k])``: each photo's k nearest other photos, best
    first (ties by lower row; -inf / -1 past the end), from ``index`` (a GalleryIndex over
    ``vectors``; default `vector_index`). A photo's own row is removed from its list even when
    an identical vector ties with it."""
    from tqdm.auto import tqdm

    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    n = len(vectors)
    index = vector_index(vectors, index_type) if index is None else index
    k = max(1, min(int(k), n - 1))
    out_s = np.empty((n, k), np.float32)
    out_i = np.empty((n, k), np.int64)
    for start in tqdm(
        range(0, n, QUERY_BATCH), desc="neighbours", unit="batch", disable=not progress, dynamic_ncols=True, leave=False
    ):
        rows = np.arange(start, min(start + QUERY_BATCH, n))
        scores, idx = index.search(vectors[rows], k + 1)
        out_s[rows], out_i[rows] = drop_self(scores, idx, rows)
    return out_s, out_i


def drop_self(scores, idx, rows):
    """The lists without each query's own row (or without their last entry when it is absent)."""
    is_self = idx == rows[:, None]
    missing = ~is_self.any(axis=1)
    is_self[missing, -1] = True
    keep = ~is_self
    k = idx.shape[1] - 1
    return scores[keep].reshape(-1, k), idx[keep].reshape(-1, k)


def own_product_best(vectors, product_ids):
    """``(score, row)`` per photo: its most similar *other* photo of the same product (-inf, -1
    when it is alone in its product). Exact: one small Gram matrix per product."""
    ids = np.asarray(product_ids, dtype=object).astype(str)
    order = np.argsort(ids, kind="stable")
    starts = np.flatnonzero(np.r_[True, ids[order][1:] != ids[order][:-1]])
    best_s = np.full(len(ids), -np.inf, np.float32)
    best_r = np.full(len(ids), -1, np.int64)
    for group in np.split(order, starts[1:]):
        if len(group) < 2:
            continue
        gram = vectors[group] @ vectors[group].T
        np.fill_diagonal(gram, -np.inf)
        arg = gram.argmax(axis=1)
        best_s[group] = gram[np.arange(len(group)), arg]
        best_r[group] = group[arg]
    return best_s, best_r


def other_product_best(product_ids, scores, idx, partner=None):
    """``(score, row)`` per photo: its nearest neighbour under another product id, skipping its
    ``partner`` row (-1: none; a duplicate finding's other photo); -inf, -1 when none is left."""
    ids = np.asarray(product_ids, dtype=object).astype(str)
    other = (idx >= 0) & (ids[np.maximum(idx, 0)] != ids[:, None])
    if partner is not None:
        other &= idx != np.asarray(partner)[:, None]
    first = other.argmax(axis=1)
    found = other[np.arange(len(ids)), first]
    rows = np.arange(len(ids))
    return (np.where(found, scores[rows, first], -np.inf).astype(np.float32), np.where(found, idx[rows, first], -1))


# ============ thresholds ============


def edited_copy(image: Image.Image, rng: random.Random) -> Image.Image:
    """A copy of ``image`` as a catalogue might hold it twice: a crop keeping 85-100% of each side
    at a random place, a resize to 50-100%, brightness and contrast x0.9-1.1, JPEG quality 50-95."""
    image = image.convert("RGB")
    w, h = image.size
    cw, ch = max(1, round(w * rng.uniform(0.85, 1.0))), max(1, round(h * rng.uniform(0.85, 1.0)))
    left, top = rng.randint(0, w - cw), rng.randint(0, h - ch)
    image = image.crop((left, top, left + cw, top + ch))
    scale = rng.uniform(0.5, 1.0)
    image = image.resize((max(1, round(cw * scale)), max(1, round(ch * scale))), Image.BILINEAR)
    image = ImageEnhance.Brightness(image).enhance(rng.uniform(0.9, 1.1))
    image = ImageEnhance.Contrast(image).enhance(rng.uniform(0.9, 1.1))
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=rng.randint(50, 95))
    buf.seek(0)
    return Image.open(buf).convert("RGB")


def duplicate_threshold(copy_scores, quantile=DUPLICATE_QUANTILE) -> float:
    """The duplicate threshold: the ``quantile`` of the scores between photos and their edited
    copies (`edited_copy`). ValueError when there is no score to take it from."""
    copy_scores = np.asarray(copy_scores, dtype=np.float64)
    copy_scores = copy_scores[np.isfinite(copy_scores)]
    if not len(copy_scores):
        raise ValueError(
            "no edited-copy score to derive the duplicate threshold from: pass "
            "--duplicate_threshold, or a catalogue with readable photos"
        )
    return float(np.quantile(copy_scores, quantile))


def margin_threshold(margins, z=OUTLIER_Z) -> float:
    """The mislabelled bound: median + z * 1.4826 * MAD of the finite margins (the modified
    z-score's outlier rule), and at least 0: another product must beat the photo's own."""
    m = np.asarray(margins, dtype=np.float64)
    m = m[np.isfinite(m)]
    if not len(m):
        return float("inf")
    median = float(np.median(m))
    mad = float(np.median(np.abs(m - median)))
    return max(0.0, median + z * 1.4826 * mad)


# ============ findings ============


def find_duplicates(product_ids, scores, idx, threshold):
    """Duplicate findings (module docstring), one per unordered pair, highest score first; in
    each pair ``row`` is the later row (the copy, when rows follow the catalogue's order)."""
    ids = np.asarray(product_ids, dtype=object).astype(str)
    n, k = idx.shape
    rows = np.repeat(np.arange(n), k)
    cols, s = idx.reshape(-1), scores.reshape(-1)
    hit = (cols >= 0) & (s >= threshold)
    hit[hit] = ids[rows[hit]] != ids[cols[hit]]
    a, b = np.maximum(rows[hit], cols[hit]), np.minimum(rows[hit], cols[hit])
    pairs, first = np.unique(np.stack([a, b], 1), axis=0, return_index=True)
    best = s[hit][first]  # the same pair seen from both ends has the same score
    order = np.lexsort((pairs[:, 1], pairs[:, 0], -best))
    return [Finding("duplicate", int(pairs[i, 0]), int(pairs[i, 1]), float(best[i])) for i in order]


def mutual_best(findings):
    """The findings that are the best (first) of both their photos' findings, order kept: a photo
    copied under another product pairs with its source, not with every look-alike of it."""
    first = {}
    for n, f in enumerate(findings):
        first.setdefault(f.row, n)
        first.setdefault(f.other_row, n)
    return [f for n, f in enumerate(findings) if first[f.row] == n and first[f.other_row] == n]


def reciprocal_rank(idx, of) -> np.ndarray:
    """Per photo i, its position in the neighbour list of photo ``of[i]`` (0: that photo's nearest
    other photo), ``idx.shape[1]`` when it is not in the list or ``of[i]`` is -1."""
    n, k = idx.shape
    rows = np.arange(n)
    lists = idx[np.maximum(of, 0)]
    found = (lists == rows[:, None]) & (np.asarray(of) >= 0)[:, None]
    return np.where(found.any(axis=1), found.argmax(axis=1), k)


def reciprocal_bound(genuine_ranks, quantile=RECIPROCAL_QUANTILE) -> float:
    """The reciprocal-rank bound: the ``quantile`` of the ranks of photos in their own best
    same-product match's list (`reciprocal_rank`); inf without any (nothing to learn it from)."""
    ranks = np.asarray(genuine_ranks, dtype=np.float64)
    return float(np.quantile(ranks, quantile)) if len(ranks) else float("inf")


def find_mislabelled(vectors, product_ids, scores, idx, threshold=None, duplicates=()):
    """``(findings, info)``: mislabelled findings (module docstring), largest margin first, and
    ``info`` = {"margin_threshold", "reciprocal_rank_bound", "judged"} (judged: photos with an own
    product to compare to).
    ``threshold``: the margin bound (default `margin_threshold` of the catalogue's margins).
    ``duplicates``: duplicate findings; a photo's duplicate partner is not what claims it for
    another product (else the source of every copy would be "mislabelled" by its own copy)."""
    partner = np.full(len(idx), -1, np.int64)
    for d in duplicates:
        partner[d.row], partner[d.other_row] = d.other_row, d.row
    own_s, own_r = own_product_best(vectors, product_ids)
    other_s, other_r = other_product_best(product_ids, scores, idx, partner)
    judged = np.isfinite(own_s) & np.isfinite(other_s)
    margin = np.where(judged, other_s - own_s, np.nan)
    bound = margin_threshold(margin[judged]) if threshold is None else float(threshold)
    # the claim must be mutual as a genuine match is: i among the nearest of the photo claiming it
    rank_bound = reciprocal_bound(reciprocal_rank(idx, own_r)[judged])
    mutual = reciprocal_rank(idx, other_r) <= rank_bound
    ids = np.asarray(product_ids, dtype=object).astype(str)
    # the duplicate row already says so: the photo is the same as one of the product claiming it
    told = (partner >= 0) & (other_r >= 0) & (ids[np.maximum(other_r, 0)] == ids[np.maximum(partner, 0)])
    hits = np.flatnonzero(judged & ~told & mutual & (np.nan_to_num(margin, nan=-np.inf) > bound)).tolist()
    hits.sort(key=lambda i: (-margin[i], i))
    findings = [Finding("mislabelled", int(i), int(other_r[i]), float(margin[i])) for i in hits]
    return findings, {"margin_threshold": bound, "reciprocal_rank_bound": rank_bound, "judged": int(judged.sum())}
