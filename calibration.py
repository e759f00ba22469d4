"""The calibrated same-product threshold: is a query photo one of the catalogue's products, or none?

Definitions (scores are cosines of unit embeddings; a pair is two photos, never a photo with itself):

* genuine pair: two photos of one product; impostor pair: photos of two different products;
* false-match rate FMR(t) = share of impostor pairs scoring >= t; true-match rate TMR(t) = share
  of genuine pairs scoring >= t;
* the threshold at a target FMR is the smallest t with FMR(t) <= target (`threshold_at_fmr`):
  every lower threshold lets more than the target's share of impostors through.

Fitting (`fit_threshold`) uses products the model never trained on (validation, or any labelled
catalogue). Impostor pairs of a few products are not independent: every pair of one product shares
its photos, so the quantile of a handful of products scatters widely and an unseen product
scores above it more often than the target. The carry-over rule:

1. when the fitting photos cover fewer than ``MIN_PRODUCTS`` products and photos of other products
   are given (the training split), each fitting photo against each of them adds impostor pairs;
2. the threshold is the ``confidence`` quantile (the median) over a product bootstrap, never below
   the plain estimate: the fitting products are drawn with replacement ``bootstrap`` times, each
   draw's pairs weighted by how often their products were drawn, and its threshold at the target
   taken. The median, not a cautious upper quantile: measured on unseen real products
   (bench/README.md, `bench_match.py`), it keeps the test FMR within 2x of the target most
   often; the 90th percentile stayed below the target by 2-4x.

The record written to a checkpoint, an ONNX model and a gallery index is `match_record`'s dict.
"""

from __future__ import annotations

import numpy as np

DEFAULT_TARGET_FMR = 0.01
MAX_PAIRS = 2_000_000  # impostor pairs kept (sampled, seeded, beyond): memory ~ 16 bytes a pair
MIN_PRODUCTS = 50  # below: the carry-over pairs against other products' photos are added
BOOTSTRAP = 200  # product bootstrap draws
CONFIDENCE = 0.5  # quantile of the bootstrap thresholds taken (module docstring: why the median)
BOOTSTRAP_PAIRS = 200_000  # impostor pairs one bootstrap draw weighs (a seeded subsample beyond)


def _unit(embeddings) -> np.ndarray:
    e = np.asarray(embeddings, dtype=np.float64)
    return e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)


def _dots(a: np.ndarray, b: np.ndarray, i: np.ndarray, j: np.ndarray, chunk=1 << 16) -> np.ndarray:
    """Row-wise a[i] . b[j], in chunks (bounded memory)."""
    return np.concatenate(
        [np.einsum("nd,nd->n", a[i[s : s + chunk]], b[j[s : s + chunk]]) for s in range(0, len(i), chunk)]
        or [np.zeros(0)]
    )


def genuine_pairs(labels) -> tuple[np.ndarray, np.ndarray]:
    """Every (i, j), i < j, of two photos with one label (exact: a product has a few photos)."""
    labels = np.asarray(labels)
    order = np.argsort(labels, kind="stable")
    starts = np.flatnonzero(np.r_[True, labels[order][1:] != labels[order][:-1]])
    ends = np.r_[starts[1:], len(order)]
    pairs = [np.triu_indices(e - s, 1) for s, e in zip(starts, ends)]
    i = np.concatenate([order[s + a] for s, (a, _) in zip(starts, pairs)] or [np.zeros(0, int)])
    j = np.concatenate([order[s + b] for s, (_, b) in zip(starts, pairs)] or [np.zeros(0, int)])
    return np.minimum(i, j), np.maximum(i, j)


def impostor_pairs(labels, *, max_pairs=MAX_PAIRS, seed=0) -> tuple[np.ndarray, np.ndarray]:
    """(i, j), i < j, of photos with different labels: all of them when there are at most
    ``max_pairs`` photo pairs, else ``max_pairs`` drawn uniformly (with replacement, seeded)."""
    labels = np.asarray(labels)
    n = len(labels)
    if n * (n - 1) // 2 <= max_pairs:
        i, j = np.triu_indices(n, 1)
    else:
        rng = np.random.default_rng(seed)
        i, j = rng.integers(0, n, (2, int(max_pairs * 1.2) + 16))
    keep = labels[i] != labels[j]
    i, j = i[keep][:max_pairs], j[keep][:max_pairs]
    return np.minimum(i, j), np.maximum(i, j)


def cross_pairs(n_query: int, n_ref: int, *, max_pairs=MAX_PAIRS, seed=0) -> tuple[np.ndarray, np.ndarray]:
    """(i, j): every query photo i against every reference photo j, or ``max_pairs`` of them
    drawn uniformly (seeded). The caller's two sets hold different products."""
    if n_query * n_ref <= max_pairs:
        i, j = np.divmod(np.arange(n_query * n_ref), n_ref)
        return i, j
    rng = np.random.default_rng(seed)
    return rng.integers(0, n_query, max_pairs), rng.integers(0, n_ref, max_pairs)


def pair_scores(embeddings, labels, *, max_pairs=MAX_PAIRS, seed=0) -> tuple[np.ndarray, np.ndarray]:
    """(genuine scores, impostor scores) of the photos' unit embeddings (float64 cosines)."""
    e = _unit(embeddings)
    gi, gj = genuine_pairs(labels)
    ii, ij = impostor_pairs(labels, max_pairs=max_pairs, seed=seed)
    return _dots(e, e, gi, gj), _dots(e, e, ii, ij)


def threshold_at_fmr(impostor_scores, target_fmr: float, weights=None) -> float:
    """The smallest threshold t with FMR(t) <= ``target_fmr``: the next float above the highest
    impostor score that would make the (weighted) share at or above it exceed the target.
    ``weights`` (one per pair, default 1) count pairs. Raises ValueError without impostor pairs
    or with a target outside (0, 1)."""
    if not 0 < target_fmr < 1:
        raise ValueError(f"target false-match rate must be in (0, 1) (got {target_fmr})")
    s = np.asarray(impostor_scores, dtype=np.float64)
    w = np.ones_like(s) if weights is None else np.asarray(weights, dtype=np.float64)
    if not len(s) or w.sum() <= 0:
        raise ValueError(
            "no impostor pairs (pairs of photos of two different products) to fit a "
            "threshold on: fit on a catalogue of at least two products"
        )
    order = np.argsort(-s, kind="stable")
    return _threshold_sorted(s[order], w[order], target_fmr)


def _threshold_sorted(s_desc: np.ndarray, w: np.ndarray, target_fmr: float) -> float:
    """`threshold_at_fmr` of scores sorted descending with their weights."""
    cum = np.cumsum(w)
    # t above s[k] admits exactly the pairs scoring > s[k]; ties enter together, so step over them.
    over = np.argmax(cum > target_fmr * cum[-1] * (1 + 1e-12))
    return float(np.nextafter(s_desc[over], np.inf))


def rates(genuine_scores, impostor_scores, threshold: float) -> dict:
    """FMR and TMR at ``threshold`` (None where there is no pair of that kind)."""
    g, i = np.asarray(genuine_scores), np.asarray(impostor_scores)
    return {
        "fmr": float((i >= threshold).mean()) if len(i) else None,
        "tmr": float((g >= threshold).mean()) if len(g) else None,
    }


def roc_curve(genuine_scores, impostor_scores) -> tuple[np.ndarray, np.ndarray]:
    """(FMR, TMR) at every distinct score, thresholds descending: the curve drawn by the report."""
    g = np.sort(np.asarray(genuine_scores, dtype=np.float64))
    i = np.sort(np.asarray(impostor_scores, dtype=np.float64))
    t = np.unique(np.concatenate([g, i]))[::-1]
    fmr = (len(i) - np.searchsorted(i, t, side="left")) / max(len(i), 1)
    tmr = (len(g) - np.searchsorted(g, t, side="left")) / max(len(g), 1)
    return fmr, tmr


def bootstrap_threshold(
    scores, pair_products, target_fmr: float, *, draws=BOOTSTRAP, confidence=CONFIDENCE, seed=0
) -> float:
    """The ``confidence`` quantile, over ``draws`` product bootstraps, of `threshold_at_fmr`.
    ``pair_products``: (a, b) per impostor pair, the fitting products' indices 0..P-1, b = -1
    for a carry-over pair (its other photo is outside the fitting products). A draw weighs a pair
    by how often each of its fitting products was drawn."""
    a, b = (np.asarray(x) for x in pair_products)
    rng = np.random.default_rng(seed)
    if len(scores) > BOOTSTRAP_PAIRS:
        keep = rng.choice(len(scores), BOOTSTRAP_PAIRS, replace=False)
        scores, a, b = np.asarray(scores)[keep], a[keep], b[keep]
    products = int(max(a.max(), b.max())) + 1
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")  # sorted once for every draw
    s_desc, a, b = np.asarray(scores, dtype=np.float64)[order], a[order], b[order]
    found = []
    for _ in range(draws):
        counts = np.r_[np.bincount(rng.integers(0, products, products), minlength=products), 1.0]
        w = counts[a] * counts[b]  # b = -1 reads the trailing 1
        if w.sum() > 0:
            found.append(_threshold_sorted(s_desc, w, target_fmr))
    return float(np.quantile(found, confidence)) if found else threshold_at_fmr(scores, target_fmr)


def fit_threshold(
    embeddings,
    labels,
    *,
    target_fmr=DEFAULT_TARGET_FMR,
    other_embeddings=None,
    max_pairs=MAX_PAIRS,
    draws=BOOTSTRAP,
    confidence=CONFIDENCE,
    seed=0,
) -> dict:
    """The threshold at ``target_fmr`` fitted on the labelled photos (held-out products), by the
    module's carry-over rule; ``other_embeddings``: photos of other products (the training split)
    for the carry-over pairs. Returns the `match_record` with ``fitted_on`` describing the pairs
    and the in-sample FMR / TMR."""
    labels = np.asarray(labels)
    products, index = np.unique(labels, return_inverse=True)
    e = _unit(embeddings)
    gi, gj = genuine_pairs(labels)
    ii, ij = impostor_pairs(labels, max_pairs=max_pairs, seed=seed)
    genuine, impostor = _dots(e, e, gi, gj), _dots(e, e, ii, ij)
    pa, pb = index[ii], index[ij]
    carry = other_embeddings is not None and len(other_embeddings) and len(products) < MIN_PRODUCTS
    if carry:
        o = _unit(other_embeddings)
        ci, cj = cross_pairs(len(e), len(o), max_pairs=max_pairs, seed=seed + 1)
        impostor = np.concatenate([impostor, _dots(e, o, ci, cj)])
        pa, pb = np.concatenate([pa, index[ci]]), np.concatenate([pb, np.full(len(ci), -1)])
    point = threshold_at_fmr(impostor, target_fmr)
    threshold = (
        max(point, bootstrap_threshold(impostor, (pa, pb), target_fmr, draws=draws, confidence=confidence, seed=seed))
        if draws
        else point
    )
    fitted_on = {
        "photos": int(len(labels)),
        "products": int(len(products)),
        "genuine_pairs": int(len(genuine)),
        "impostor_pairs": int(len(impostor)),
        "carry_over_pairs": int(len(ci)) if carry else 0,
        "point_threshold": point,
        "bootstrap": int(draws),
        "confidence": float(confidence),
        **{f"fit_{k}": v for k, v in rates(genuine, impostor, threshold).items()},
    }
    return match_record(threshold, target_fmr, fitted_on)


def match_record(threshold: float, target_fmr: float, fitted_on: dict | None = None) -> dict:
    """The record a checkpoint, an ONNX model and a gallery index carry: ``threshold`` (a result
    matches when its score >= it), ``target_fmr`` and ``fitted_on`` (what it was fitted on)."""
    return {"threshold": float(threshold), "target_fmr": float(target_fmr), "fitted_on": dict(fitted_on or {})}


def is_match(scores, threshold: float | None):
    """score >= threshold per score (a numpy bool array); None when no threshold is known."""
    return None if threshold is None else np.asarray(scores) >= threshold
