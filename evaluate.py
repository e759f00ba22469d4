"""Evaluate a checkpoint with both retrieval protocols of SPEC.md.

    python evaluate.py --checkpoint checkpoints/<run>/best.pth [--data_root DIR] [--split test]

The checkpoint describes its model (backbone, embedding size, image size) and the data it was
trained on, so nothing else is needed. Every image of the split is a query:

* product protocol (standard SOP): gallery = every other image, relevant = same product;
  Recall@1/10/100/1000, MAP@R, R-Precision;
* category protocol (the seeds'): gallery = images of other products, relevant = same
  category; Recall@1/5/10/20, Precision@1/5/10/20, mAP@10.

Writes ``results.json``, ``results.md`` and ``retrieval.png`` to ``runs/<run>/eval/`` (``<run>``
= the checkpoint's folder name) unless ``--output`` says otherwise. ``--embeddings_cache FILE``
keeps the extracted embeddings (a `retrieval.GalleryIndex` file, which the demo can load too)
and reuses them while the checkpoint and the image list are unchanged.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch

import datasets
import models
import retrieval

logger = logging.getLogger("evaluate")


def get_args_parser():
    p = argparse.ArgumentParser("evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True,
                   help="checkpoints/<run>/best.pth (or last.pth); it holds model_args and the "
                        "training args, so no other model flag is needed")
    p.add_argument("--data_root", default=None,
                   help="SOP folder (with Ebay_test.txt); default: the one the checkpoint was trained on")
    p.add_argument("--split", default="test", choices=["test", "val", "train", "trainval"],
                   help="split to evaluate; 'test' (60,502 images on SOP) is the reported one")
    p.add_argument("--output", default=None, help="output folder; default runs/<run>/eval")
    p.add_argument("--batch_size", type=int, default=64, help="images per forward pass (64 fits any GPU)")
    p.add_argument("--workers", type=int, default=None,
                   help="DataLoader processes decoding JPEGs; default datasets.loader_settings "
                        "(a quarter of the CPUs, at least 1, on CPU; every CPU up to 16 on CUDA)")
    p.add_argument("--device", default=None, help="cuda, cpu, cuda:1, ...; default cuda when available")
    p.add_argument("--embeddings_cache", default=None, metavar="FILE",
                   help="save the embeddings here (.npz) and reuse them next time while the "
                        "checkpoint (sha256) and the image list are unchanged")
    p.add_argument("--num_examples", type=int, default=6,
                   help="queries shown in retrieval.png with their top 5 (0: no figure)")
    p.add_argument("--chunk_size", type=int, default=1024,
                   help="tile side of the exact similarity pass (memory ~ 5 bytes x tile^2 per thread)")
    p.add_argument("--seed", type=int, default=0, help="picks the figure's queries")
    # --progress/--no-progress as in train.py; --no_progress (the first spelling) still works.
    p.add_argument("--progress", default=True, action=argparse.BooleanOptionalAction,
                   help="tqdm progress bars")
    p.add_argument("--no_progress", dest="progress", action="store_false", help=argparse.SUPPRESS)
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the model for the extraction (1.5x measured on CPU for "
                        "B0 at 224 px; compiling costs tens of seconds, so only for large splits)")
    return p


# ============ helpers ============


def default_data_root(args: dict) -> str:
    """The data root a checkpoint was trained on: its --data_root, else its --dataset's folder."""
    if args.get("data_root"):
        return str(args["data_root"])
    import train  # its dataset -> folder table; imported late, only when needed

    dataset = args.get("dataset", "stanford")
    if dataset not in train.DATASET_ROOTS:
        raise ValueError(f"the checkpoint was trained on dataset {dataset!r}, which has no default "
                         f"folder (known: {sorted(train.DATASET_ROOTS)}): pass --data_root")
    return train.DATASET_ROOTS[dataset]


def default_output(checkpoint, args: dict) -> Path:
    """runs/<run>/eval, <run> = the checkpoint's folder (under the run's own --log_dir)."""
    return Path(args.get("log_dir") or "runs") / Path(checkpoint).resolve().parent.name / "eval"


def category_name(super_id: int) -> str:
    sid = int(super_id)
    return datasets.SOP_CATEGORIES[sid - 1] if 1 <= sid <= len(datasets.SOP_CATEGORIES) else str(sid)


def _pct(v) -> str:
    return "n/a" if v is None or not np.isfinite(v) else f"{100 * v:.2f}%"


def embedding_stats(embeddings: np.ndarray) -> dict:
    """Summary of the N x D embeddings:

    mean, std      over all N*D coordinates;
    norm_mean      mean L2 norm (1.0 for unit vectors);
    dim_std_mean   std of each coordinate across the N images, averaged over the D coordinates:
                   0 when the embeddings have collapsed to one point (``std`` cannot show that:
                   one repeated unit vector still has spread-out coordinates);
    mean_cosine    mean cosine over all N^2 ordered pairs, self-pairs included, = ||mean of the
                   unit vectors||^2: 1 when collapsed, near 0 when spread over the sphere.
    """
    e = embeddings.astype(np.float64)
    norms = np.linalg.norm(e, axis=1, keepdims=True)
    unit = e / np.maximum(norms, 1e-12)
    return {"mean": float(e.mean()), "std": float(e.std()), "norm_mean": float(norms.mean()),
            "dim_std_mean": float(e.std(axis=0).mean()),
            "mean_cosine": float(np.square(unit.mean(axis=0)).sum())}


def _write_text(path: Path, text: str) -> None:
    retrieval.atomic_write(path, lambda f: f.write(text.encode("utf-8")))


# ============ embeddings (with cache) ============


def get_embeddings(model, dataset, checkpoint_hash, batch_size=64, workers=None, device="cpu",
                   cache=None, progress=True, meta=None):
    """(GalleryIndex of the dataset, seconds spent extracting, whether the cache served it)."""
    if cache is not None and Path(cache).exists():
        index, why = retrieval.load_fresh_index(cache, checkpoint_hash, dataset.rel_paths)
        if index is not None:
            logger.info("embeddings from cache %s (%d images)", cache, len(index))
            return index, 0.0, True
        logger.info("embeddings cache %s: %s; extracting again", cache, why)
    t0 = time.perf_counter()
    index = retrieval.build_gallery_index(model, dataset, batch_size=batch_size, workers=workers,
                                          device=device, checkpoint_hash=checkpoint_hash,
                                          meta=meta, progress=progress)
    seconds = time.perf_counter() - t0
    if cache is not None:
        index.save(cache)
        logger.info("embeddings saved to %s", cache)
    return index, seconds, False


# ============ report ============


def per_category(details, super_ids) -> dict:
    """Both protocols' metrics over the queries of each category."""
    out = {}
    for sid in np.unique(super_ids):
        m = retrieval.metrics_from_details(details, mask=super_ids == sid)
        out[category_name(sid)] = {"super_id": int(sid), **m}
    return out


def results_markdown(results: dict) -> str:
    name = results["model"]["run"]
    prod, cat, model = results["product"], results["category"], results["model"]
    params = f"{model['parameters'] / 1e6:.1f}M"
    lines = [
        f"# Evaluation of `{model['checkpoint']}`",
        "",
        f"Split `{results['data']['split']}` of `{results['data']['root']}`: "
        f"{results['num_queries']:,} queries (every image), {results['data']['num_products']:,} products, "
        f"{results['data']['num_categories']} categories. Backbone `{model['backbone']}`, "
        f"{model['embedding_size']}-d embeddings, {model['image_size']} px, {params} parameters, "
        f"checkpoint {model['checkpoint_size_mb']:.1f} MB (epoch {model.get('epoch')}).",
        "",
        "## Category protocol (the seeds' protocol)",
        "",
        "Gallery: images of *other* products; relevant: same category. "
        "mAP@10 divides by the relevant items found in the top 10 (0 when none).",
        "",
        "| Model | Recall@1 | Recall@5 | Recall@10 | Recall@20 | mAP@10 | Parameters |",
        "|---|---|---|---|---|---|---|",
        f"| {name} | {_pct(cat['recall@1'])} | {_pct(cat['recall@5'])} | {_pct(cat['recall@10'])} | "
        f"{_pct(cat['recall@20'])} | {_pct(cat['map@10'])} | {params} |",
        "",
        "### Precision@K",
        "",
        "| Model | P@1 | P@5 | P@10 | P@20 |",
        "|---|---|---|---|---|",
        f"| {name} | {_pct(cat['precision@1'])} | {_pct(cat['precision@5'])} | {_pct(cat['precision@10'])} | "
        f"{_pct(cat['precision@20'])} |",
        "",
        "## Product protocol (standard SOP: Song et al. 2016, Musgrave et al. 2020)",
        "",
        "Gallery: every other image; relevant: the other images of the same product.",
        "",
        "| Model | Recall@1 | Recall@10 | Recall@100 | Recall@1000 | MAP@R | R-Precision |",
        "|---|---|---|---|---|---|---|",
        f"| {name} | {_pct(prod['recall@1'])} | {_pct(prod['recall@10'])} | {_pct(prod['recall@100'])} | "
        f"{_pct(prod['recall@1000'])} | {_pct(prod['map@r'])} | {_pct(prod['r_precision'])} |",
        "",
        "## Per category",
        "",
        "| Category | Queries | Product R@1 | Product MAP@R | Category R@1 | Category P@10 | Category mAP@10 |",
        "|---|---|---|---|---|---|---|",
    ]
    for cname, m in results["per_category"].items():
        lines.append(f"| {cname} | {m['num_queries']:,} | {_pct(m['product']['recall@1'])} | "
                     f"{_pct(m['product']['map@r'])} | {_pct(m['category']['recall@1'])} | "
                     f"{_pct(m['category']['precision@10'])} | {_pct(m['category']['map@10'])} |")
    st, tm = results["embedding_stats"], results["timing"]
    lines += [
        "",
        "## Embeddings and timing",
        "",
        f"- Embedding mean {st['mean']:.4f}, std {st['std']:.4f}, mean L2 norm {st['norm_mean']:.4f}; "
        f"per-coordinate std across images {st['dim_std_mean']:.4f} and mean pairwise cosine "
        f"{st['mean_cosine']:.4f} (0 and 1 when the embeddings have collapsed).",
        f"- Extraction {tm['extract_s']:.1f} s" + (" (from the embeddings cache)" if tm.get("cached") else "")
        + f" on {tm['device']}; exact metrics of both protocols {tm['eval_s']:.1f} s.",
        "",
    ]
    if results.get("figure"):
        lines += [f"![retrieval examples]({results['figure']})", "",
                  "Query (blue) and its top 5 among all other images: green = same product, red = another.", ""]
    return "\n".join(lines)


def retrieval_figure(path, dataset, embeddings, num_examples=6, top=5, seed=0, thumb=128):
    """Queries (one per category first, seeded) with their top ``top`` over every other image;
    green borders for the same product, red for another. Returns the query indices."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rng = np.random.default_rng(seed)
    super_ids, class_ids = np.asarray(dataset.super_ids), np.asarray(dataset.class_ids)
    cats = rng.permutation(np.unique(super_ids))
    queries = [int(rng.choice(np.flatnonzero(super_ids == c))) for c in cats[:num_examples]]
    while len(queries) < min(num_examples, len(dataset)):
        queries.append(int(rng.integers(len(dataset))))
    queries = np.asarray(queries)
    scores, idx = retrieval.knn(embeddings[queries], embeddings, top, self_indices=queries)

    fig, axes = plt.subplots(len(queries), top + 1, figsize=(1.9 * (top + 1), 2.35 * len(queries)),
                             squeeze=False)

    def show(ax, i, colour, title):
        ax.imshow(datasets.load_image(dataset.paths[i], size=thumb).resize((thumb, thumb)))
        ax.set_xticks([])
        ax.set_yticks([])
        for side in ax.spines.values():
            side.set_edgecolor(colour)
            side.set_linewidth(4)
        ax.set_title(title, fontsize=7)

    for row, q in enumerate(queries):
        show(axes[row, 0], q, "tab:blue", f"query\n{category_name(super_ids[q])} #{class_ids[q]}")
        for col in range(top):
            g = int(idx[row, col])
            if g < 0:
                axes[row, col + 1].axis("off")
                continue
            same = class_ids[g] == class_ids[q]
            show(axes[row, col + 1], g, "tab:green" if same else "tab:red",
                 f"{col + 1}. {scores[row, col]:.3f}\n{category_name(super_ids[g])} #{class_ids[g]}")
    fig.suptitle("Top 5 over all other images (green: same product, red: another product)", fontsize=9)
    fig.tight_layout()
    retrieval.atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=90))
    plt.close(fig)
    return queries


# ============ evaluation ============


def evaluate_checkpoint(checkpoint, data_root=None, split="test", output=None, batch_size=64, workers=None,
                        device=None, embeddings_cache=None, num_examples=6, chunk_size=1024, seed=0,
                        progress=True, compile=False) -> dict:
    """Evaluate ``checkpoint`` on ``split``; write results.json / results.md / retrieval.png to
    ``output`` (default runs/<run>/eval) and return the results dict (SPEC.md shape plus
    ``model``, ``embedding_stats``, ``timing``, ``per_category``, ``data``). ``compile``:
    extract the embeddings with ``torch.compile(model)`` (1.5x on a 2-core CPU for
    EfficientNet-B0 at 224 px, after a compilation of tens of seconds; README, throughput)."""
    checkpoint = Path(checkpoint)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))

    # ============ model and data ============
    model = models.load_model(checkpoint, device=device)
    info = getattr(model, "checkpoint_info", None) or {}
    train_args = info.get("args") or {}
    model_args = dict(model.model_args)
    root = data_root or default_data_root(train_args)
    output = Path(output) if output else default_output(checkpoint, train_args)
    dataset = datasets.SOPDataset(root, split, transform=datasets.build_transform(int(model_args["image_size"]),
                                                                                 train=False))
    ckpt_hash = models.checkpoint_hash(checkpoint)

    # ============ embeddings ============
    index, extract_s, cached = get_embeddings(
        torch.compile(model) if compile else model, dataset, ckpt_hash, batch_size=batch_size,
        workers=workers, device=device, cache=embeddings_cache, progress=progress,
        meta={"split": split, "data_root": str(dataset.root), "model_args": model_args,
              "checkpoint": str(checkpoint)})
    embeddings = index.embeddings
    class_ids, super_ids = np.asarray(dataset.class_ids), np.asarray(dataset.super_ids)

    # ============ metrics ============
    t0 = time.perf_counter()
    details = retrieval.retrieval_details(embeddings, class_ids, super_ids, chunk_size=chunk_size)
    metrics = retrieval.metrics_from_details(details)
    eval_s = time.perf_counter() - t0

    results = {
        **metrics,
        "model": {
            "run": checkpoint.resolve().parent.name,
            "checkpoint": str(checkpoint),
            "checkpoint_sha256": ckpt_hash,
            "backbone": model_args["backbone"],
            "embedding_size": int(model_args["embedding_size"]),
            "image_size": int(model_args["image_size"]),
            "parameters": int(models.count_parameters(model)),
            "checkpoint_size_mb": round(checkpoint.stat().st_size / 2 ** 20, 2),
            "epoch": info.get("epoch"),
        },
        "data": {"root": str(dataset.root), "split": split, "num_images": len(dataset),
                 "num_products": int(len(np.unique(class_ids))),
                 "num_categories": int(len(np.unique(super_ids)))},
        "embedding_stats": embedding_stats(embeddings),
        "timing": {"extract_s": round(extract_s, 3), "eval_s": round(eval_s, 3), "cached": cached,
                   "device": str(device)},
        "per_category": per_category(details, super_ids),
    }

    # ============ outputs ============
    output.mkdir(parents=True, exist_ok=True)
    if num_examples > 0:
        retrieval_figure(output / "retrieval.png", dataset, embeddings, num_examples=num_examples, seed=seed)
        results["figure"] = "retrieval.png"
    _write_text(output / "results.json", json.dumps(results, indent=2) + "\n")
    _write_text(output / "results.md", results_markdown(results))
    results["output_dir"] = str(output)
    return results


def main(args):
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        results = evaluate_checkpoint(
            args.checkpoint, data_root=args.data_root, split=args.split, output=args.output,
            batch_size=args.batch_size, workers=args.workers, device=args.device,
            embeddings_cache=args.embeddings_cache, num_examples=args.num_examples,
            chunk_size=args.chunk_size, seed=args.seed, progress=args.progress,
            compile=args.compile)
    except (FileNotFoundError, IsADirectoryError, models.CheckpointError, datasets.DatasetError) as e:
        raise SystemExit(f"evaluate.py: {e}") from None
    p, c = results["product"], results["category"]
    print(f"{results['num_queries']:,} queries ({results['data']['split']} split of {results['data']['root']})")
    print(f"product  R@1 {_pct(p['recall@1'])}  R@10 {_pct(p['recall@10'])}  R@100 {_pct(p['recall@100'])}  "
          f"R@1000 {_pct(p['recall@1000'])}  MAP@R {_pct(p['map@r'])}  RP {_pct(p['r_precision'])}")
    print(f"category R@1 {_pct(c['recall@1'])}  R@5 {_pct(c['recall@5'])}  R@10 {_pct(c['recall@10'])}  "
          f"R@20 {_pct(c['recall@20'])}  P@10 {_pct(c['precision@10'])}  mAP@10 {_pct(c['map@10'])}")
    print(f"extract {results['timing']['extract_s']:.1f} s, metrics {results['timing']['eval_s']:.1f} s; "
          f"wrote {results['output_dir']}/results.json, results.md"
          + (", retrieval.png" if results.get("figure") else ""))
    return results


if __name__ == "__main__":
    main(get_args_parser().parse_args())
