"""Reporting: percent formatting, Markdown tables, figure saving, and evaluate.py's results.md
and retrieval figure (train_multiple.py's comparison tables and plots: training.comparison_report).
Pure functions of results dicts; every file goes through fileio.atomic_write.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from dataio import catalogue, fileio, photos
import knn

NOT_DEFINED = "n/a"  # the cell of a metric retrieval.undefined left without a value
# The metrics both reports show, keys of retrieval.evaluate_embeddings (results.json).
PRODUCT_KEYS = ("recall@1", "recall@10", "recall@100", "recall@1000", "map@r", "r_precision")
CATEGORY_KEYS = (
    "recall@1",
    "recall@5",
    "recall@10",
    "recall@20",
    "precision@1",
    "precision@5",
    "precision@10",
    "precision@20",
    "map@10",
)


def pct(v, missing: str = "") -> str:
    """A fraction in [0, 1] as a percentage with two decimals ("12.34"); ``missing`` for None
    or a non-finite value. The one percent formatter: tables say "%" in their headings."""
    return missing if v is None or not np.isfinite(v) else f"{100 * v:.2f}"


def category_name(super_id: int, categories=None) -> str:
    """The name of category ``super_id`` (1-based) among ``categories`` (the dataset's
    names; default SOP's 12); the number itself when out of range."""
    names = catalogue.SOP_CATEGORIES if categories is None else categories
    sid = int(super_id)
    return names[sid - 1] if 1 <= sid <= len(names) else str(sid)


def md_table(frame: pd.DataFrame) -> str:
    """A Markdown table of ``frame``'s cells (text, as they are) under its column names."""
    lines = ["| " + " | ".join(frame.columns) + " |", "|" + "|".join("---" for _ in frame.columns) + "|"]
    lines += ["| " + " | ".join(cells) + " |" for cells in frame.itertuples(index=False)]
    return "\n".join(lines)


# ============ evaluate.py: results.md and retrieval.png ============


def cell(metrics: dict, key: str) -> str:
    """``metrics[key]`` in % for a table; "n/a" or "trivial" (its ``why``'s first word) when
    the protocol is undefined here (retrieval.undefined)."""
    why = metrics.get("why") or NOT_DEFINED
    return pct(metrics.get(key), why.split(":")[0])


def undefined_notes(rows, protocol: str) -> list[str]:
    """The lines under a protocol's table that say why its cells are n/a (one per reason)."""
    reasons = dict.fromkeys(r[protocol]["why"] for _, r in rows if r[protocol].get("why"))
    return [f"\n{why}." for why in reasons]


def held_out_lines(results: dict) -> list[str]:
    """results.md's sentences on whether the figures are held out (training.heldout) and, with
    a baseline, on the deploy gate; none for a held-out evaluation without a baseline."""
    lines = []
    for whose, r in (("These", results), ("The baseline's", results.get("baseline") or {})):
        if r.get("held_out") is False:
            lines += ["", f"**{whose} figures are not held out**: {r['held_out_why']}."]
        elif "held_out" in r and r["held_out"] is None:
            lines += ["", f"{whose} figures may not be held out: {r['held_out_why']}."]
    gate = results.get("gate")
    if gate:
        diff = "undefined" if gate["difference_points"] is None else f"{gate['difference_points']:+.2f} points"
        lines += [
            "",
            f"**Deploy gate {'passed' if gate['passed'] else 'FAILED'}**: {gate['metric']} "
            f"{diff} against the baseline (tolerance {gate['tolerance_points']:g} points).",
        ]
    return lines


def compared_models(results: dict) -> list[tuple[str, dict]]:
    """results.md's table rows, (name, metrics): the evaluated model, then the baseline and the
    zero-shot backbone when results.json holds them."""
    model = results["model"]
    rows = [(model["run"], results)]
    if results.get("baseline"):
        rows.append((f"baseline {results['baseline']['run']}", results["baseline"]))
    if results.get("zero_shot"):
        rows.append((f"zero-shot {model['backbone']} (ImageNet features, no training)", results["zero_shot"]))
    return rows


def header_lines(results: dict) -> list[str]:
    """results.md's title and its paragraph on the split and the model."""
    model = results["model"]
    params = f"{model['parameters'] / 1e6:.1f}M"
    if model.get("checkpoint"):
        title = f"# Evaluation of `{model['checkpoint']}`"
        what = f"checkpoint {model['checkpoint_size_mb']:.1f} MB (epoch {model.get('epoch')})."
    else:
        title = f"# Zero-shot evaluation of `{model['backbone']}` ({model.get('weights')} weights)"
        what = "pooled backbone features, L2-normalised, no head, nothing trained."
    single = results["data"].get("single_image_products") or 0
    lonely = (
        (f" ({single:,} products with a single image: in the gallery, not queries of the product protocol)")
        if single
        else ""
    )
    return [
        title,
        "",
        f"Split `{results['data']['split']}` of `{results['data']['root']}`: "
        f"{results['num_queries']:,} queries (every image), {results['data']['num_products']:,} products{lonely}, "
        f"{results['data']['num_categories']} categories. Backbone `{model['backbone']}`, "
        f"{model['embedding_size']}-d embeddings, {model['image_size']} px, {params} parameters, " + what,
    ]


def protocol_lines(rows: list[tuple[str, dict]], per_category: dict) -> list[str]:
    """results.md's tables: the product protocol, the category protocol, per category."""
    return [
        "",
        "## Product protocol (standard SOP: Song et al. 2016, Musgrave et al. 2020), in %",
        "",
        "Gallery: every other image; relevant: the other images of the same product.",
        "",
        product_table(rows),
        *undefined_notes(rows, "product"),
        "",
        "## Category protocol (the original project's protocol), in %",
        "",
        "Gallery: images of *other* products; relevant: same category. "
        "mAP@10 divides by the relevant items found in the top 10 (0 when none).",
        "",
        category_table(rows),
        *undefined_notes(rows, "category"),
        "",
        "## Per category, in %",
        "",
        per_category_table(per_category),
    ]


def product_table(rows: list[tuple[str, dict]]) -> str:
    """The product protocol's metrics, one Markdown row per (model name, results) of ``rows``."""
    return md_table(
        pd.DataFrame(
            [[n] + [cell(r["product"], k) for k in PRODUCT_KEYS] for n, r in rows],
            columns=["Model", "Recall@1", "Recall@10", "Recall@100", "Recall@1000", "MAP@R", "R-Precision"],
        )
    )


def category_table(rows: list[tuple[str, dict]]) -> str:
    """The category protocol's metrics, one Markdown row per (model name, results) of ``rows``."""
    return md_table(
        pd.DataFrame(
            [[n] + [cell(r["category"], k) for k in CATEGORY_KEYS] for n, r in rows],
            columns=["Model", "Recall@1", "Recall@5", "Recall@10", "Recall@20", "P@1", "P@5", "P@10", "P@20", "mAP@10"],
        )
    )


# The per-category table's metrics: (protocol, metric key).
PER_CATEGORY_METRICS = (
    ("product", "recall@1"),
    ("product", "map@r"),
    ("category", "recall@1"),
    ("category", "precision@10"),
    ("category", "map@10"),
)


def per_category_table(per_category: dict) -> str:
    """Queries and PER_CATEGORY_METRICS of each category (name -> its metrics), as Markdown."""
    return md_table(
        pd.DataFrame(
            [
                [cname, f"{m['num_queries']:,}"] + [cell(m[protocol], k) for protocol, k in PER_CATEGORY_METRICS]
                for cname, m in per_category.items()
            ],
            columns=[
                "Category",
                "Queries",
                "Product R@1",
                "Product MAP@R",
                "Category R@1",
                "Category P@10",
                "Category mAP@10",
            ],
        )
    )


def embedding_and_figure_lines(results: dict) -> list[str]:
    """results.md's last section (embedding statistics, timing) and its figures."""
    st, tm = results["embedding_stats"], results["timing"]
    lines = [
        "",
        "## Embeddings and timing",
        "",
        f"- Embedding mean {st['mean']:.4f}, std {st['std']:.4f}, mean L2 norm {st['norm_mean']:.4f}; "
        f"per-coordinate std across images {st['dim_std_mean']:.4f} and mean pairwise cosine "
        f"{st['mean_cosine']:.4f} (0 and 1 when the embeddings have collapsed).",
        f"- Extraction {tm['extract_s']:.1f} s"
        + (" (from the embeddings cache)" if tm.get("cached") else "")
        + f" on {tm['device']}; exact metrics of both protocols {tm['eval_s']:.1f} s.",
        "",
    ]
    if results.get("figure"):
        lines += [
            f"![retrieval examples]({results['figure']})",
            "",
            "Query (blue) and its top 5 among all other images: green = same product, red = another.",
            "",
        ]
    if results.get("worst_figure"):
        lines += [
            f"![worst queries]({results['worst_figure']})",
            "",
            "The queries whose true match ranked lowest: their top 4 and, last, that match.",
            "",
        ]
    return lines


def match_lines(results: dict) -> list[str]:
    """results.md's section on the same-product threshold (``results["match"]``) and on queries of
    several photos (``results["query_photos"]``); none when the results have neither."""
    lines = []
    match = results.get("match")
    if match:
        fitted = match.get("fitted_on") or {}
        where = " ".join(
            [f"the {fitted['split']} split" if "split" in fitted else "", f"({fitted.get('products', '?')} products)"]
        ).strip()
        lines += [
            "",
            "## Which product, or none",
            "",
            f"Same-product threshold {match['threshold']:.4f} (target false-match rate "
            f"{pct(match['target_fmr'])}%{', fitted on ' + where if where else ''}). On this split's "
            f"{match['impostor_pairs']:,} pairs of different products, {pct(match['fmr'])}% score at or "
            f"above it (false matches); of its {match['genuine_pairs']:,} pairs of one product, "
            f"{pct(match['tmr'])}% do (true matches).",
            "",
        ]
        if match.get("figure"):
            lines += [f"![false-match rate against true-match rate]({match['figure']})", ""]
    photos = results.get("query_photos")
    if photos:
        frame = pd.DataFrame(
            [
                {
                    "photos a query": str(n),
                    "queries": str(r["queries"]),
                    "MAP@R": pct(r["map@r"]),
                    "R@1": pct(r["recall@1"]),
                }
                for n, r in photos.items()
            ]
        )
        fusion = next(iter(photos.values())).get("fusion", "mean")
        lines += ["", f"## Several photos a query ({fusion} fusion)", "", md_table(frame), ""]
    return lines


def results_markdown(results: dict) -> str:
    """results.md of a results.json: the model and split, whether the figures are held out (and
    the deploy gate), both protocols' tables, per category, the same-product threshold and
    several-photo queries, embeddings, timing and figures."""
    return "\n".join(
        [
            *header_lines(results),
            *held_out_lines(results),
            *protocol_lines(compared_models(results), results["per_category"]),
            *match_lines(results),
            *embedding_and_figure_lines(results),
        ]
    )


def _figure_rows(path, dataset, rows, suptitle, explainer=None, thumb=128):
    """Draw ``rows`` (each (query, [(gallery index, title, colour), ...])) as a grid of thumbnails,
    the query first with a blue border; with ``explainer`` (explain.dataset_explainer), every
    cell is the model's view with its similarity map over it: a result's map against the query,
    the query's map against its first result."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    super_ids, products, names = np.asarray(dataset.super_ids), dataset.product_ids, dataset.categories
    width = 1 + max(len(cells) for _, cells in rows)
    fig, axes = plt.subplots(len(rows), width, figsize=(1.9 * width, 2.35 * len(rows)), squeeze=False)

    def show(ax, image, colour, title):
        ax.imshow(image)
        ax.set_xticks([])
        ax.set_yticks([])
        for side in ax.spines.values():
            side.set_edgecolor(colour)
            side.set_linewidth(4)
        ax.set_title(title, fontsize=7)

    def plain(i):
        return photos.load_image(dataset.paths[i], size=thumb).resize((thumb, thumb))

    approximate = False
    for row, (q, cells) in enumerate(rows):
        found = [g for g, _, _ in cells if g >= 0]
        maps = explainer(q, found) if explainer is not None and found else None
        if maps:
            from explain import overlay  # display only: the figure without maps needs no torch

            approximate |= not maps[0]["exact"]
            query_image = overlay(maps[0]["query_view"], maps[0]["query_map"])
            by_index = {g: overlay(m["result_view"], m["result_map"]) for g, m in zip(found, maps)}
        else:
            query_image, by_index = plain(q), {}
        show(axes[row, 0], query_image, "tab:blue", f"query\n{category_name(super_ids[q], names)} #{products[q]}")
        for col in range(width - 1):
            ax = axes[row, col + 1]
            if col >= len(cells) or cells[col][0] < 0:
                ax.axis("off")
                continue
            g, title, colour = cells[col]
            show(
                ax,
                by_index[g] if g in by_index else plain(g),
                colour,
                f"{title}\n{category_name(super_ids[g], names)} #{products[g]}",
            )
    if explainer is not None:
        suptitle += "\nheat: where each image agrees with the other's embedding " + (
            "(MLP head: a linearisation)" if approximate else "(maps sum to the score)"
        )
    fig.suptitle(suptitle, fontsize=9)
    fig.tight_layout()
    save_figure(fig, path, dpi=90)
    plt.close(fig)


def _same_product_colour(dataset, q, g):
    return "tab:green" if dataset.class_ids[g] == dataset.class_ids[q] else "tab:red"


def retrieval_figure(path, dataset, embeddings, num_examples=6, top=5, seed=0, thumb=128, explainer=None):
    """Queries (one per category first, seeded) with their top ``top`` over every other image;
    green borders for the same product, red for another; with ``explainer``, the similarity
    maps over each (`_figure_rows`). Returns the query indices."""
    rng = np.random.default_rng(seed)
    super_ids = np.asarray(dataset.super_ids)
    cats = rng.permutation(np.unique(super_ids))
    queries = [int(rng.choice(np.flatnonzero(super_ids == c))) for c in cats[:num_examples]]
    while len(queries) < min(num_examples, len(dataset)):
        queries.append(int(rng.integers(len(dataset))))
    queries = np.asarray(queries)
    scores, idx = knn.knn(embeddings[queries], embeddings, top, self_indices=queries)
    rows = [
        (
            int(q),
            [
                (int(g), f"{col + 1}. {scores[row, col]:.3f}", _same_product_colour(dataset, q, g))
                for col, g in enumerate(idx[row])
            ],
        )
        for row, q in enumerate(queries)
    ]
    _figure_rows(
        path,
        dataset,
        rows,
        f"Top {top} over all other images (green: same product, red: another product)",
        explainer=explainer,
        thumb=thumb,
    )
    return queries


def worst_queries(best_relevant_rank, num=3) -> np.ndarray:
    """The ``num`` queries whose first true match is ranked lowest (largest
    ``best_relevant_rank``, retrieval_details; queries without a relevant item excluded), worst
    first; ties by query index."""
    rank = np.asarray(best_relevant_rank)
    candidates = np.flatnonzero(rank > 0)
    order = np.lexsort((candidates, -rank[candidates]))
    return candidates[order[:num]]


def worst_queries_figure(path, dataset, embeddings, best_relevant_rank, num=3, top=4, thumb=128, explainer=None):
    """The `worst_queries`: each with its top ``top`` (all of another product) and, last, its
    best-ranked true match with its rank and score. Returns the query indices (empty: no figure)."""
    queries = worst_queries(best_relevant_rank, num)
    if len(queries) == 0:
        return queries
    x = knn.l2_normalize(embeddings)
    class_ids = np.asarray(dataset.class_ids)
    scores, idx = knn.knn(x[queries], x, top, self_indices=queries)
    rows = []
    for row, q in enumerate(queries):
        same = np.flatnonzero(class_ids == class_ids[q])
        same = same[same != q]
        match = int(same[np.argmax(x[same] @ x[q])])
        cells = [
            (int(g), f"{col + 1}. {scores[row, col]:.3f}", _same_product_colour(dataset, q, g))
            for col, g in enumerate(idx[row])
        ]
        cells.append(
            (match, f"true match: rank {int(best_relevant_rank[q])}, {float(x[match] @ x[q]):.3f}", "tab:green")
        )
        rows.append((int(q), cells))
    _figure_rows(
        path,
        dataset,
        rows,
        "Worst queries: their true match ranked lowest (last column)",
        explainer=explainer,
        thumb=thumb,
    )
    return queries


def save_figure(fig, path: Path, dpi: int = 120) -> None:
    """Save a matplotlib figure atomically, in the format its suffix names (png default)."""
    fileio.atomic_write(path, lambda f: fig.savefig(f, dpi=dpi, format=Path(path).suffix.lstrip(".") or "png"))
