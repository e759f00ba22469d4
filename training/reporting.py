"""Reporting: percent formatting, evaluate.py's results.md and retrieval figure, and the
comparison tables (Markdown, CSV) and plots of train_multiple.py. Pure functions of results
dicts and metrics.csv rows; every file goes through fileio.atomic_write.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from dataio import catalogue, fileio, photos
import knn
from training.runs import CSV_LINE_END  # comparison.csv ends its lines as metrics.csv does

NOT_DEFINED = "n/a"  # the cell of a metric retrieval.undefined left without a value


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
        md_table(
            pd.DataFrame(
                [[n] + [cell(r["product"], k) for k in PRODUCT_KEYS] for n, r in rows],
                columns=["Model", "Recall@1", "Recall@10", "Recall@100", "Recall@1000", "MAP@R", "R-Precision"],
            )
        ),
        *undefined_notes(rows, "product"),
        "",
        "## Category protocol (the original project's protocol), in %",
        "",
        "Gallery: images of *other* products; relevant: same category. "
        "mAP@10 divides by the relevant items found in the top 10 (0 when none).",
        "",
        md_table(
            pd.DataFrame(
                [[n] + [cell(r["category"], k) for k in CATEGORY_KEYS] for n, r in rows],
                columns=[
                    "Model",
                    "Recall@1",
                    "Recall@5",
                    "Recall@10",
                    "Recall@20",
                    "P@1",
                    "P@5",
                    "P@10",
                    "P@20",
                    "mAP@10",
                ],
            )
        ),
        *undefined_notes(rows, "category"),
        "",
        "## Per category, in %",
        "",
        md_table(
            pd.DataFrame(
                [
                    [cname, f"{m['num_queries']:,}"]
                    + [
                        cell(m[protocol], k)
                        for protocol, k in (
                            ("product", "recall@1"),
                            ("product", "map@r"),
                            ("category", "recall@1"),
                            ("category", "precision@10"),
                            ("category", "map@10"),
                        )
                    ]
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
        ),
    ]


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


def results_markdown(results: dict) -> str:
    """results.md of a results.json: the model and split, whether the figures are held out (and
    the deploy gate), both protocols' tables, per category, embeddings, timing and figures."""
    return "\n".join(
        [
            *header_lines(results),
            *held_out_lines(results),
            *protocol_lines(compared_models(results), results["per_category"]),
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


# ============ train_multiple.py: comparison tables and plots ============

# Comparison columns: (csv column, where it comes from). Product / category metric keys are
# those of retrieval.evaluate_embeddings (results.json).
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
ID_COLUMNS = ("run", "backbone", "loss", "sampler", "status", "error")
METRIC_COLUMNS = tuple(f"product_{k}" for k in PRODUCT_KEYS) + tuple(f"category_{k}" for k in CATEGORY_KEYS)
INFO_COLUMNS = (
    "num_queries",
    "parameters",
    "weights_bytes",
    "checkpoint_bytes",
    "train_time_s",
    "eval_time_s",
    "best_epoch",
    "epochs",
    "best_val_recall@1",
    "checkpoint_epoch",
    "checkpoint",
)
# Why a protocol's metrics are empty when it is undefined on the test split (results.json's
# "why", retrieval.undefined): the tables then say "n/a" or "trivial" instead of a number.
WHY_COLUMNS = ("product_why", "category_why")
CSV_COLUMNS = ID_COLUMNS + METRIC_COLUMNS + INFO_COLUMNS + WHY_COLUMNS

# Training curves: (metrics.csv column, panel title).
CURVES = (
    ("train_loss", "train loss"),
    ("val_loss", "validation loss"),
    ("val_recall@1", "validation Recall@1 (product)"),
    ("lr", "learning rate"),
    ("train_valid_triplets", "valid triplets per batch (train)"),
    ("train_active_triplets", "active triplets per batch (train)"),
)


# ============ tables ============

# Columns of comparison.csv read back as text (the others are numbers).
TEXT_COLUMNS = ID_COLUMNS + ("checkpoint",) + WHY_COLUMNS


def write_csv(rows: list[dict], path: Path) -> None:
    """comparison.csv: one row per run, metrics as fractions in full precision (repr)."""
    # dtype object: every cell keeps its Python type (an int count stays "12", not "12.0")
    frame = pd.DataFrame(rows, columns=list(CSV_COLUMNS), dtype=object)
    fileio.atomic_write_text(path, frame.to_csv(index=False, na_rep="", lineterminator=CSV_LINE_END))


def read_csv(path: Path) -> list[dict]:
    """comparison.csv back: numbers as float/int (as written: "12" an int, "12.0" a float),
    empty cells as None, the text columns as text."""
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)

    def number(cell: str):
        if cell == "":
            return None
        return int(cell) if cell.lstrip("-").isdigit() else float(cell)

    return [{k: v if k in TEXT_COLUMNS else number(v) for k, v in row.items()} for row in frame.to_dict("records")]


def _scaled(values: pd.Series, divisor: float, fmt: str) -> pd.Series:
    """``values / divisor`` formatted with ``fmt``; empty where a value is missing."""
    return values.map(lambda v: "" if v is None or pd.isna(v) else format(v / divisor, fmt))


def format_markdown(rows: list[dict], title: str = "Comparison", notes: str = "") -> str:
    """comparison.md: a summary table, one table per protocol, and the failures. Metrics in %
    (two decimals), parameters in millions, sizes in MB (10^6 bytes: weights = the network's
    tensors, checkpoint = the evaluated .pth file with optimizer state), times in minutes
    (training) and seconds (evaluation)."""
    df = pd.DataFrame(rows, columns=list(CSV_COLUMNS), dtype=object)
    percent = df[list(METRIC_COLUMNS)].apply(lambda column: column.map(pct))
    notes_of = {}
    for protocol in ("product", "category"):  # an undefined protocol: its marker, and why
        columns = [c for c in METRIC_COLUMNS if c.startswith(protocol + "_")]
        for i, why in enumerate(df[f"{protocol}_why"]):
            if isinstance(why, str) and why:
                percent.loc[i, columns] = why.split(":")[0]
                notes_of.setdefault(protocol, []).append(f"`{df['run'][i]}`: {why}.")
    best = [("" if e is None or pd.isna(e) else f"{e}/{n}") for e, n in zip(df["best_epoch"], df["epochs"])]
    summary = pd.DataFrame(
        {
            "run": df["run"],
            "backbone": df["backbone"],
            "loss": df["loss"],
            "sampler": df["sampler"],
            "status": df["status"].map(lambda v: "" if v is None or pd.isna(v) else v),
            "product R@1": percent["product_recall@1"],
            "MAP@R": percent["product_map@r"],
            "category R@1": percent["category_recall@1"],
            "mAP@10": percent["category_map@10"],
            "params (M)": _scaled(df["parameters"], 1e6, ".2f"),
            "weights (MB)": _scaled(df["weights_bytes"], 1e6, ".1f"),
            "checkpoint (MB)": _scaled(df["checkpoint_bytes"], 1e6, ".1f"),
            "training (min)": _scaled(df["train_time_s"], 60, ".1f"),
            "evaluation (s)": _scaled(df["eval_time_s"], 1, ".1f"),
            "best epoch": best,
        }
    )
    product = pd.concat([df[["run"]], percent[[f"product_{k}" for k in PRODUCT_KEYS]]], axis=1)
    product.columns = ["run", "R@1", "R@10", "R@100", "R@1000", "MAP@R", "R-precision"]
    category = pd.concat([df[["run"]], percent[[f"category_{k}" for k in CATEGORY_KEYS]]], axis=1)
    category.columns = ["run", "R@1", "R@5", "R@10", "R@20", "P@1", "P@5", "P@10", "P@20", "mAP@10"]
    parts = [f"# {title}", ""]
    if notes:
        parts += [notes, ""]
    parts += ["## Summary (test split; metrics in %)", "", md_table(summary), ""]
    parts += [
        "## Product protocol (queries: every test image; relevant: same product)",
        "",
        md_table(product),
        "",
        *(f"{n}\n" for n in notes_of.get("product", [])),
    ]
    parts += [
        "## Category protocol (the original project's: gallery = other products; relevant: same category)",
        "",
        md_table(category),
        "",
        *(f"{n}\n" for n in notes_of.get("category", [])),
    ]
    failed = [r for r in rows if r.get("error")]
    if failed:
        parts += ["## Failures", ""]
        parts += [f"- `{r['run']}` ({r['status']}): {r['error']}" for r in failed]
        parts.append("")
    return "\n".join(parts)


# ============ plots ============


def run_labels(rows: list[dict]) -> list[str]:
    """Shortest unambiguous label per run: the fields that vary across the grid."""
    fields = [f for f in ("backbone", "loss", "sampler") if len({r[f] for r in rows}) > 1]
    fields = fields or ["backbone"]
    return ["\n".join(str(r[f]) for f in fields) for r in rows]


def plot_recall_bars(rows: list[dict], path: Path) -> None:
    """Grouped bars per run: test product Recall@1, product MAP@R and category Recall@1 (%)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = run_labels(rows)
    x = list(range(len(rows)))
    width = 0.27
    fig, ax = plt.subplots(figsize=(max(5.0, 1.5 * len(rows) + 2), 4.2))
    for offset, key, name in (
        (-width, "product_recall@1", "product Recall@1"),
        (0.0, "product_map@r", "product MAP@R"),
        (width, "category_recall@1", "category Recall@1 (original project's)"),
    ):
        values = [100 * r[key] if r.get(key) is not None else 0.0 for r in rows]
        bars = ax.bar([i + offset for i in x], values, width, label=name)
        for bar, r in zip(bars, rows):
            why = r.get(key.split("_")[0] + "_why") or NOT_DEFINED
            text = f"{100 * r[key]:.1f}" if r.get(key) is not None else why.split(":")[0]
            ax.annotate(
                text,
                (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                ha="center",
                va="bottom",
                fontsize=8,
                xytext=(0, 2),
                textcoords="offset points",
            )
    ax.set_xticks(x)
    ax.set_xticklabels(labels, fontsize=8)
    ax.set_ylabel("test split (%)")
    ax.set_ylim(0, 118)  # headroom for the legend above the 100% bars
    ax.set_title("Recall@1 and MAP@R per run")
    ax.legend(fontsize=8, loc="upper center", ncol=3, frameon=False)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def plot_training_curves(histories: dict[str, list[dict]], path: Path) -> None:
    """One panel per CURVES column, one line per run (label -> metrics.csv rows). Columns a run
    does not have (e.g. triplet counts of a loss without triplets) are left out of its panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    cols = 3
    nrows = math.ceil(len(CURVES) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(5 * cols, 3.4 * nrows), squeeze=False)
    for ax, (key, title) in zip(axes.flat, CURVES):
        drawn = False
        for label, history in histories.items():
            points = [(r["epoch"], r[key]) for r in history if r.get(key) is not None and math.isfinite(r[key])]
            if not points:
                continue
            xs, ys = zip(*points)
            if key == "val_recall@1":
                ys = [100 * y for y in ys]
            ax.plot(xs, ys, marker="o", markersize=3, label=label.replace("\n", " "))
            drawn = True
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if key == "lr" and drawn:
            ax.set_yscale("log")
        if not drawn:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(CURVES) :]:
        ax.axis("off")
    handles, names = axes.flat[0].get_legend_handles_labels()
    if not handles:  # the first panel may be empty (epoch 0 has no training loss only)
        for ax in axes.flat:
            handles, names = ax.get_legend_handles_labels()
            if handles:
                break
    if handles:
        fig.legend(handles, names, loc="lower center", ncol=min(len(names), 4), fontsize=8)
    fig.tight_layout(rect=(0, 0.08 if handles else 0, 1, 1))
    save_figure(fig, path)
    plt.close(fig)


def save_figure(fig, path: Path, dpi: int = 120) -> None:
    """Save a matplotlib figure atomically, in the format its suffix names (png default)."""
    fileio.atomic_write(path, lambda f: fig.savefig(f, dpi=dpi, format=Path(path).suffix.lstrip(".") or "png"))


def write_report(
    rows: list[dict], histories: dict[str, list[dict]], output: Path, title: str = "Comparison", notes: str = ""
) -> dict[str, Path]:
    """comparison.md, comparison.csv, recall_at_1.png and training_curves.png under ``output``."""
    output.mkdir(parents=True, exist_ok=True)
    files = {
        "md": output / "comparison.md",
        "csv": output / "comparison.csv",
        "recall_plot": output / "recall_at_1.png",
        "curves_plot": output / "training_curves.png",
    }
    write_csv(rows, files["csv"])
    fileio.atomic_write_text(files["md"], format_markdown(rows, title, notes))
    plot_recall_bars(rows, files["recall_plot"])
    plot_training_curves(histories, files["curves_plot"])
    return files
