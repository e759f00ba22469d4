"""What a search returns: photos, or products (one row each), each marked ``match`` against the
same-product threshold (calibration.py).

Definitions:

* ``match``: the result's score >= the threshold; absent (None) when no threshold is known;
* product rows (``results_mode`` "products"): the ranked photo hits of the top candidates grouped by
  product id in rank order; a product's row is its best (first) photo, with ``photos`` = how many of
  its photos are among the candidates and ``matched_photos`` = how many of those match. A hit without
  a product id (an unlabelled folder) is a row of its own.
"""

from __future__ import annotations

RESULTS_MODES = ("products", "photos")
CANDIDATES_PER_RESULT = 10  # photo hits searched per product row asked for (products of <= 12 photos)
MIN_CANDIDATES = 50


def candidate_count(k: int, mode: str, gallery_size: int) -> int:
    """How many photo hits to rank for ``k`` rows of ``mode``."""
    if mode == "photos":
        return k
    return min(gallery_size, max(k * CANDIDATES_PER_RESULT, MIN_CANDIDATES))


def threshold_of(*sources) -> float | None:
    """The first known threshold among ``sources``: match records (calibration.match_record), or
    dicts holding one under ``match`` (a model's checkpoint_info, an index's meta); None if none."""
    for source in sources:
        record = (source or {}).get("match") if isinstance(source, dict) and "threshold" not in source else source
        if isinstance(record, dict) and record.get("threshold") is not None:
            return float(record["threshold"])
    return None


def mark_matches(results: list[dict], threshold: float | None) -> list[dict]:
    """Each result with ``match`` (score >= threshold; None without a threshold)."""
    return [{**r, "match": None if threshold is None else bool(r["score"] >= threshold)} for r in results]


def product_rows(results: list[dict], k: int) -> list[dict]:
    """The first ``k`` product rows of ranked, match-marked photo hits (module docstring), ranked anew."""
    rows, by_product = [], {}
    for r in results:
        key = r.get("product_id")
        if key is None or key not in by_product:
            row = {**r, "photos": 0, "matched_photos": 0}
            rows.append(row)
            if key is not None:
                by_product[key] = row
        row = by_product[key] if key is not None else rows[-1]
        row["photos"] += 1
        row["matched_photos"] += bool(r.get("match"))
    return [{**row, "rank": rank} for rank, row in enumerate(rows[:k], 1)]


def shape_results(results: list[dict], k: int, mode: str, threshold: float | None) -> list[dict]:
    """The results a search returns: ``results`` (ranked photo hits) marked, then grouped into
    product rows in "products" mode, cut to ``k``."""
    if mode not in RESULTS_MODES:
        raise ValueError(f"unknown results mode {mode!r}; choose one of {', '.join(RESULTS_MODES)}")
    marked = mark_matches(results, threshold)
    return product_rows(marked, k) if mode == "products" else marked[:k]


def verdict(results: list[dict], threshold: float | None) -> str:
    """The line the page shows above the results: which product matched, or plainly none."""
    if threshold is None:
        return "No calibrated threshold for this model: results are ranked by similarity only."
    matched = [r for r in results if r.get("match")]
    if not matched:
        return (
            f"**No catalogue product matches this photo** (no score reaches the threshold "
            f"{threshold:.3f}); the nearest are shown below."
        )
    best = matched[0]
    name = f"product #{best['product_id']}" if best.get("product_id") else best["catalogue_path"]
    more = f" ({len(matched) - 1} more above the threshold)" if len(matched) > 1 else ""
    return f"**Match: {name}** ({best['category']}, score {best['score']:.3f} >= {threshold:.3f}){more}."
