"""The dataset table and figure of ``python datasets.py stats``: images, products and categories
per split, images per category and per product. Inputs are splits with ``class_ids``,
``super_ids`` and ``categories`` (``datasets.SOPDataset``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dataio import fileio


def split_rows(sets: dict) -> dict:
    """Rows of the original project's dataset table: ``{split: {images, products, categories,
    images_per_product}}`` for train, val, test (the keys of ``sets``) and total."""
    rows = {}
    for name, parts in (
        ("train", ["train"]),
        ("val", ["val"]),
        ("test", ["test"]),
        ("total", ["train", "val", "test"]),
    ):
        cls = np.concatenate([sets[p].class_ids for p in parts])  # product ids are unique across splits
        sup = np.concatenate([sets[p].super_ids for p in parts])
        n_products = len(np.unique(cls))
        rows[name] = {
            "images": int(len(cls)),
            "products": n_products,
            "categories": int(len(np.unique(sup))),
            "images_per_product": float(len(cls) / n_products),
        }
    return rows


def format_stats_table(rows):
    lines = [
        "| Split | Images | Products | Categories | Avg. Images/Product |",
        "|-------|--------|----------|------------|---------------------|",
    ]
    for name, label in (("train", "Train"), ("val", "Validation"), ("test", "Test"), ("total", "**Total**")):
        r = rows[name]
        lines.append(
            f"| {label} | {r['images']:,} | {r['products']:,} | {r['categories']} | {r['images_per_product']:.1f} |"
        )
    return "\n".join(lines)


def plot_stats(sets, output):
    """Figure: images per category for each split, and the images-per-product histogram."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    names = next(iter(sets.values())).categories  # the catalogue's, the same in every split
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(max(8, min(40, 0.6 * len(names) + 7)), 4.5))
    x = np.arange(len(names))
    for j, (name, ds) in enumerate(sets.items()):
        counts = np.bincount(ds.super_ids - 1, minlength=len(names))
        ax1.bar(x + (j - 1) * 0.27, counts, width=0.27, label=name)
        _, per_product = np.unique(ds.class_ids, return_counts=True)
        hist = np.bincount(per_product, minlength=13)
        ax2.bar(np.arange(len(hist)) + (j - 1) * 0.27, hist, width=0.27, label=name)
    ax1.set_xticks(x, names, rotation=40, ha="right")
    ax1.set_ylabel("images")
    ax1.set_title("Images per category")
    ax1.legend()
    ax2.set_xticks(range(1, 13))
    ax2.set_xlabel("images per product")
    ax2.set_ylabel("products")
    ax2.set_title("Images per product")
    ax2.legend()
    fig.tight_layout()
    fileio.atomic_write(output, lambda f: fig.savefig(f, dpi=120, format=output.suffix.lstrip(".") or "png"))
    plt.close(fig)
    return output
