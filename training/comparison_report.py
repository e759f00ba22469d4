"""train_multiple.py's comparison of a grid's runs: comparison.csv (written and read back),
comparison.md, and the recall bars and training curves plots. Pure functions of the comparison
rows and metrics.csv rows; every file goes through fileio.atomic_write.
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from dataio import fileio
from training.reporting import CATEGORY_KEYS, NOT_DEFINED, PRODUCT_KEYS, md_table, pct, save_figure
from training.runs import CSV_LINE_END  # comparison.csv ends its lines as metrics.csv does

# Comparison columns: (csv column, where it comes from).
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


def percent_cells(df: pd.DataFrame) -> tuple[pd.DataFrame, dict[str, list[str]]]:
    """The METRIC_COLUMNS of the comparison rows ``df`` in %, an undefined protocol's cells holding
    its marker instead; and per protocol, the notes saying why (one per run)."""
    percent = df[list(METRIC_COLUMNS)].apply(lambda column: column.map(pct))
    notes_of = {}
    for protocol in ("product", "category"):
        columns = [c for c in METRIC_COLUMNS if c.startswith(protocol + "_")]
        for i, why in enumerate(df[f"{protocol}_why"]):
            if isinstance(why, str) and why:
                percent.loc[i, columns] = why.split(":")[0]
                notes_of.setdefault(protocol, []).append(f"`{df['run'][i]}`: {why}.")
    return percent, notes_of


def summary_table(df: pd.DataFrame, percent: pd.DataFrame) -> pd.DataFrame:
    """comparison.md's summary: each run's identity, headline metrics (``percent``: `percent_cells`),
    size, times and best epoch."""
    best = [("" if e is None or pd.isna(e) else f"{e}/{n}") for e, n in zip(df["best_epoch"], df["epochs"])]
    return pd.DataFrame(
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


def format_markdown(rows: list[dict], title: str = "Comparison", notes: str = "") -> str:
    """comparison.md: a summary table, one table per protocol, and the failures. Metrics in %
    (two decimals), parameters in millions, sizes in MB (10^6 bytes: weights = the network's
    tensors, checkpoint = the evaluated .pth file with optimizer state), times in minutes
    (training) and seconds (evaluation)."""
    df = pd.DataFrame(rows, columns=list(CSV_COLUMNS), dtype=object)
    percent, notes_of = percent_cells(df)
    summary = summary_table(df, percent)
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
