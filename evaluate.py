"""Evaluate a checkpoint, or a pretrained backbone alone, with both retrieval protocols.

    python evaluate.py --checkpoint checkpoints/<run>/best.pth [--data_root DIR] [--split test]
    python evaluate.py --zero_shot --backbone efficientnet_lite0 --data_root DIR [--image_size 224]

The checkpoint describes its model (backbone, embedding size, image size) and the data it was
trained on, so nothing else is needed. Every image of the split is a query:

* product protocol (standard SOP): gallery = every other image, relevant = same product;
  Recall@1/10/100/1000, MAP@R, R-Precision;
* category protocol (the original project's): gallery = images of other products, relevant = same
  category; Recall@1/5/10/20, Precision@1/5/10/20, mAP@10.

Writes ``results.json``, ``results.md`` and ``retrieval.png`` to ``runs/<run>/eval/`` (``<run>``
= the checkpoint's folder name) unless ``--output`` says otherwise. ``--embeddings_cache FILE``
keeps the extracted embeddings (a `retrieval.GalleryIndex` file, which the demo can load too)
and reuses them while the checkpoint and the image list are unchanged.

Zero-shot: ``--zero_shot`` evaluates the backbone's L2-normalised pooled features (ImageNet
weights, no head, nothing trained) the same way. A checkpoint trained from ImageNet weights is
shown beside its backbone's zero-shot row (``zero_shot`` in results.json, a row in results.md,
a line on the console), so every evaluation says whether training beat the pretrained features;
``--no-zero_shot_row`` skips that second extraction.
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

from dataio import catalogue
from dataio import fileio
import models
from training import reporting
import retrieval

logger = logging.getLogger("evaluate")


def add_zero_shot_args(group, what: str) -> None:
    """--zero_shot (help ``what``), --backbone, --weights, --image_size: the pretrained backbone
    alone, as evaluate.py and the demo take it (`zero_shot_model`)."""
    group.add_argument("--zero_shot", action="store_true", help=what)
    group.add_argument("--backbone", default=None, choices=sorted(models.BACKBONES),
                       help="backbone for --zero_shot")
    group.add_argument("--weights", default="imagenet",
                       help="backbone weights for --zero_shot: imagenet, none, or a PATH to a plain "
                            "state dict of the ImageNet classifier")
    group.add_argument("--image_size", type=int, default=224,
                       help="crop size for --zero_shot (images resized to 256/224 of it first)")


def get_args_parser():
    p = argparse.ArgumentParser("evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=None,
                   help="checkpoints/<run>/best.pth (or last.pth); it holds model_args and the "
                        "training args, so no other model flag is needed")
    z = p.add_argument_group("zero-shot (a pretrained backbone, no checkpoint)")
    add_zero_shot_args(z, "evaluate --backbone's pooled, L2-normalised features instead of a "
                          "checkpoint (needs --data_root)")
    z.add_argument("--zero_shot_row", default=True, action=argparse.BooleanOptionalAction,
                   help="with --checkpoint trained from ImageNet weights: also evaluate its "
                        "backbone zero-shot at the same image size and report both")
    p.add_argument("--data_root", default=None,
                   help="dataset folder (SOP's Ebay files, a catalogue.csv or a <category>/<product>/"
                        "<image> tree); default: the one the checkpoint was trained on")
    p.add_argument("--test_fraction", type=float, default=None,
                   help="a catalogue without a split: share of the products in the test split; "
                        "default the checkpoint's training value (0.5 for --zero_shot)")
    p.add_argument("--verbose", action="store_true", help="list every skipped non-image file")
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


def default_output(checkpoint, args: dict) -> Path:
    """runs/<run>/eval, <run> = the checkpoint's folder (under the run's own --log_dir)."""
    return Path(args.get("log_dir") or "runs") / Path(checkpoint).resolve().parent.name / "eval"


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


def per_category(details, super_ids, categories=None) -> dict:
    """Both protocols' metrics over the queries of each category, keyed by its name among
    ``categories`` (the dataset's; default SOP's)."""
    out = {}
    for sid in np.unique(super_ids):
        m = retrieval.metrics_from_details(details, mask=super_ids == sid)
        out[reporting.category_name(sid, categories)] = {"super_id": int(sid), **m}
    return out


# ============ evaluation ============


def evaluate_model(model, dataset, *, model_info: dict, output=None, model_hash="", batch_size=64,
                   workers=None, device="cpu", embeddings_cache=None, num_examples=6,
                   chunk_size=1024, seed=0, progress=True, compile=False, write=True) -> dict:
    """Both protocols' metrics of ``model`` (an EmbeddingNet) on ``dataset``; the results dict
    (retrieval.evaluate_embeddings shape plus ``model`` = ``model_info`` and parameters, ``embedding_stats``,
    ``timing``, ``per_category``, ``data``). ``write``: results.json / results.md /
    retrieval.png to ``output``. ``model_hash`` keys the embeddings cache."""
    model_args = dict(model.model_args)
    index, extract_s, cached = get_embeddings(
        torch.compile(model) if compile else model, dataset, model_hash, batch_size=batch_size,
        workers=workers, device=device, cache=embeddings_cache, progress=progress,
        meta={"split": dataset.split, "data_root": str(dataset.root), "model_args": model_args,
              "checkpoint": model_info.get("checkpoint")})
    embeddings = index.embeddings
    class_ids, super_ids = np.asarray(dataset.class_ids), np.asarray(dataset.super_ids)
    t0 = time.perf_counter()
    details = retrieval.retrieval_details(embeddings, class_ids, super_ids, chunk_size=chunk_size)
    metrics = retrieval.metrics_from_details(details)
    eval_s = time.perf_counter() - t0
    results = {
        **metrics,
        "model": {**model_info, "backbone": model_args["backbone"],
                  "embedding_size": int(model_args["embedding_size"]),
                  "image_size": int(model_args["image_size"]),
                  "head": model_args.get("head", "mlp"),
                  "parameters": int(models.count_parameters(model))},
        "data": {"root": str(dataset.root), "split": dataset.split, "num_images": len(dataset),
                 "num_products": int(len(np.unique(class_ids))),
                 "num_categories": int(len(np.unique(super_ids))), "layout": dataset.layout,
                 # the drawn test split's share (a catalogue without a split), else None
                 "test_fraction": None if dataset.layout == "sop" else dataset.test_fraction,
                 "single_image_products": dataset.num_single_image_products},
        "embedding_stats": embedding_stats(embeddings),
        "timing": {"extract_s": round(extract_s, 3), "eval_s": round(eval_s, 3), "cached": cached,
                   "device": str(device)},
        "per_category": per_category(details, super_ids, dataset.categories),
        # the product protocol's queries: images with another image of their product
        "num_product_queries": int((details["num_relevant"] > 0).sum()),
    }
    if write:
        output = Path(output)
        output.mkdir(parents=True, exist_ok=True)
        if num_examples > 0:
            reporting.retrieval_figure(output / "retrieval.png", dataset, embeddings,
                             num_examples=num_examples, seed=seed)
            results["figure"] = "retrieval.png"
        results["output_dir"] = str(output)
    return results


def write_results(results: dict, output) -> None:
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    fileio.atomic_write_text(output / "results.json", json.dumps(results, indent=2) + "\n")
    fileio.atomic_write_text(output / "results.md", reporting.results_markdown(results))


def _eval_dataset(root, split, image_size, train_args=None, test_fraction=None):
    """``split`` of ``root`` with the eval transform and the splits of the run that trained
    on it (datasets.split_options)."""
    return datasets.SOPDataset(root, split, transform=datasets.build_transform(int(image_size), train=False),
                               **datasets.split_options(train_args, test_fraction))


def evaluate_zero_shot(backbone, data_root, weights="imagenet", image_size=224, split="test",
                       output=None, device=None, write=True, test_fraction=None, **kwargs) -> dict:
    """evaluate_model of models.zero_shot_model(backbone, weights, image_size); output default
    runs/zero_shot_<backbone>_<size>px/eval. ``kwargs`` as for evaluate_model."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = models.zero_shot_model(backbone, weights, image_size, device)
    name = models.zero_shot_name(backbone, int(image_size), str(weights))
    output = Path(output) if output else Path("runs") / name / "eval"
    info = {"run": name, "checkpoint": None, "zero_shot": True, "weights": str(weights),
            "checkpoint_size_mb": None, "epoch": None}
    results = evaluate_model(model, _eval_dataset(data_root, split, image_size, test_fraction=test_fraction),
                             model_info=info,
                             output=output, model_hash=f"zero_shot:{backbone}:{weights}",
                             device=device, write=write, **kwargs)
    if write:
        write_results(results, output)
    return results


def evaluate_checkpoint(checkpoint, data_root=None, split="test", output=None, batch_size=64, workers=None,
                        device=None, embeddings_cache=None, num_examples=6, chunk_size=1024, seed=0,
                        progress=True, compile=False, zero_shot_row=True, test_fraction=None) -> dict:
    """Evaluate ``checkpoint`` on ``split``; write results.json / results.md / retrieval.png to
    ``output`` (default runs/<run>/eval) and return the results dict (evaluate_model).
    ``zero_shot_row`` and a checkpoint trained from ImageNet weights: ``results["zero_shot"]``
    holds its backbone's zero-shot metrics (product, category) on the same images.
    ``compile``: extract the embeddings with ``torch.compile(model)`` (1.5x on a 2-core CPU for
    EfficientNet-B0 at 224 px, after a compilation of tens of seconds)."""
    checkpoint = Path(checkpoint)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = models.load_model(checkpoint, device=device)
    info = getattr(model, "checkpoint_info", None) or {}
    train_args = info.get("args") or {}
    model_args = dict(model.model_args)
    root = data_root or catalogue.default_data_root(train_args)
    output = Path(output) if output else default_output(checkpoint, train_args)
    dataset = _eval_dataset(root, split, model_args["image_size"], train_args, test_fraction)
    common = dict(batch_size=batch_size, workers=workers, device=device, chunk_size=chunk_size,
                  progress=progress)
    ckpt_hash = models.checkpoint_hash(checkpoint)  # once: it reads the whole file
    results = evaluate_model(
        model, dataset, output=output, model_hash=ckpt_hash,
        embeddings_cache=embeddings_cache, num_examples=num_examples, seed=seed, compile=compile,
        model_info={"run": checkpoint.resolve().parent.name, "checkpoint": str(checkpoint),
                    "checkpoint_sha256": ckpt_hash,
                    "checkpoint_size_mb": round(checkpoint.stat().st_size / 2 ** 20, 2),
                    "epoch": info.get("epoch")}, **common)
    if zero_shot_row and train_args.get("weights") == "imagenet":
        try:
            backbone = models.zero_shot_model(model_args["backbone"], "imagenet", model_args["image_size"], device)
        except models.WeightsUnavailableError as e:
            # the checkpoint's own evaluation stands without it (e.g. offline, weights not cached)
            logger.warning("zero-shot row skipped: %s", e)
        else:
            zs = evaluate_model(backbone, dataset, model_info={"run": "zero-shot"}, write=False,
                                num_examples=0, **common)
            results["zero_shot"] = {k: zs[k] for k in ("product", "category", "num_queries")}
            results["zero_shot"]["extract_s"] = zs["timing"]["extract_s"]
    write_results(results, output)
    return results


def print_results(results: dict) -> None:
    print(f"{results['num_queries']:,} queries ({results['data']['split']} split of {results['data']['root']}), "
          "metrics in %")
    rows = [(results["model"]["run"], results)]
    if results.get("zero_shot"):
        rows.append(("zero-shot backbone", results["zero_shot"]))
    for name, r in rows:
        p, c = r["product"], r["category"]
        print(f"{name}\n  product  R@1 {reporting.pct(p['recall@1'])}  R@10 {reporting.pct(p['recall@10'])}  "
              f"R@100 {reporting.pct(p['recall@100'])}  R@1000 {reporting.pct(p['recall@1000'])}  "
              f"MAP@R {reporting.pct(p['map@r'])}  RP {reporting.pct(p['r_precision'])}\n"
              f"  category R@1 {reporting.pct(c['recall@1'])}  R@5 {reporting.pct(c['recall@5'])}  "
              f"R@10 {reporting.pct(c['recall@10'])}  R@20 {reporting.pct(c['recall@20'])}  "
              f"P@10 {reporting.pct(c['precision@10'])}  mAP@10 {reporting.pct(c['map@10'])}")
    print(f"extract {results['timing']['extract_s']:.1f} s, metrics {results['timing']['eval_s']:.1f} s; "
          f"wrote {results['output_dir']}/results.json, results.md"
          + (", retrieval.png" if results.get("figure") else ""))


def check_args(parser, args) -> None:
    """argparse errors (exit 2): exactly one of --checkpoint / --zero_shot, and what each needs."""
    if args.zero_shot == (args.checkpoint is not None):
        parser.error("pass either --checkpoint CK, or --zero_shot --backbone NAME --data_root DIR")
    if args.zero_shot and (args.backbone is None or args.data_root is None):
        parser.error("--zero_shot needs --backbone NAME and --data_root DIR")
    if args.test_fraction is not None and not 0 < args.test_fraction < 1:
        parser.error(f"--test_fraction must be in (0, 1) (got {args.test_fraction})")
    if args.image_size < 32:
        parser.error(f"--image_size must be >= 32 (got {args.image_size})")


def main(args):
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    common = dict(split=args.split, output=args.output, batch_size=args.batch_size,
                  workers=args.workers, device=args.device, embeddings_cache=args.embeddings_cache,
                  num_examples=args.num_examples, chunk_size=args.chunk_size, seed=args.seed,
                  progress=args.progress, compile=args.compile, test_fraction=args.test_fraction)
    catalogue.set_verbose(args.verbose)
    try:
        if args.zero_shot:
            results = evaluate_zero_shot(args.backbone, args.data_root, weights=args.weights,
                                         image_size=args.image_size, **common)
        else:
            results = evaluate_checkpoint(args.checkpoint, data_root=args.data_root,
                                          zero_shot_row=args.zero_shot_row, **common)
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError, models.CheckpointError,
            catalogue.DatasetError, models.WeightsUnavailableError,
            ValueError) as e:  # ValueError: a malformed catalogue (file:line)
        raise SystemExit(f"evaluate.py: {e}") from None
    print_results(results)
    return results


if __name__ == "__main__":
    parser = get_args_parser()
    arguments = parser.parse_args()
    check_args(parser, arguments)
    main(arguments)
