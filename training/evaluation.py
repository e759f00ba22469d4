"""Evaluating a checkpoint, or a pretrained backbone alone (zero-shot), on a split with both
retrieval protocols: the results dict (metrics, per-category metrics, embedding statistics,
timing) and its results.json / results.md / retrieval.png. evaluate.py is its command line
(and adds the embeddings cache, a search-half gallery index file); train_multiple.py calls it
for each run of a grid.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
import time

import numpy as np
import torch
from torch.utils.data import DataLoader

import backbones
import checkpoints
from dataio import catalogue, fileio
import datasets
import devices
import explain
import extraction
import inference
import loaders
import models
import preprocessing
import retrieval
from training import heldout, matching, reporting, runs

logger = logging.getLogger("evaluate")

# evaluate.py --baseline: how many percentage points of the gate metric a new checkpoint may lose
# to its baseline and still pass (evaluation noise on a few thousand queries is about that size).
DEFAULT_TOLERANCE = 0.5


def add_zero_shot_args(group, what: str) -> None:
    """--zero_shot (help ``what``), --backbone, --weights, --image_size: the pretrained backbone
    alone, as evaluate.py and the demo take it (`zero_shot_model`)."""
    group.add_argument("--zero_shot", action="store_true", help=what)
    group.add_argument("--backbone", default=None, choices=sorted(backbones.BACKBONES), help="backbone for --zero_shot")
    group.add_argument(
        "--weights",
        default="imagenet",
        help="backbone weights for --zero_shot: imagenet, none, or a PATH to a plain "
        "state dict of the ImageNet classifier",
    )
    group.add_argument(
        "--image_size", type=int, default=224, help="crop size for --zero_shot (images resized to 256/224 of it first)"
    )


def default_output(checkpoint, args: dict) -> Path:
    """runs/<run>/eval, <run> = the checkpoint's folder (under the run's own --log_dir)."""
    return runs.RunPaths.of_checkpoint(checkpoint, args.get("log_dir")).eval_dir


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
    return {
        "mean": float(e.mean()),
        "std": float(e.std()),
        "norm_mean": float(norms.mean()),
        "dim_std_mean": float(e.std(axis=0).mean()),
        "mean_cosine": float(np.square(unit.mean(axis=0)).sum()),
    }


# ============ embeddings ============


def extract_embeddings(
    model, dataset, *, model_hash="", meta=None, batch_size=64, workers=None, device="cpu", progress=True
):
    """The default ``embed`` of evaluate_model: every image of ``dataset`` embedded, in order.
    Returns (N x D embeddings, seconds spent, False: not from a cache). An ``embed`` of another
    kind (evaluate.py's embeddings cache) takes the same arguments; ``model_hash`` and ``meta``
    are what a cache records, unused here."""
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,  # one pass: no persistent workers
        **loaders.loader_settings(device, workers=workers, persistent_workers=False),
    )
    t0 = time.perf_counter()
    embeddings, labels = extraction.extract_embeddings(
        model, loader, device=device, progress=progress, desc="embedding"
    )
    if not np.array_equal(labels, np.asarray(dataset.class_ids)):
        raise RuntimeError("the loader's labels do not match dataset.class_ids")
    return embeddings, time.perf_counter() - t0, False


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


def evaluate_model(
    model,
    dataset,
    *,
    model_info: dict,
    output=None,
    model_hash="",
    batch_size=64,
    workers=None,
    device="cpu",
    embed=None,
    num_examples=6,
    chunk_size=1024,
    seed=0,
    progress=True,
    compile=False,
    write=True,
    explain_model=None,
    num_worst=3,
    match=None,
    calibrate=None,
    query_photos=0,
    fusion="mean",
) -> dict:
    """Both protocols' metrics of ``model`` (an EmbeddingNet) on ``dataset``; the results dict
    (retrieval.evaluate_embeddings shape plus ``model`` = ``model_info`` and parameters, ``embedding_stats``,
    ``timing``, ``per_category``, ``data``). ``write``: results.json / results.md /
    retrieval.png to ``output``. ``embed``: how the embeddings are obtained (default
    extract_embeddings; evaluate.py passes its embeddings cache), ``model_hash`` keys a cache.
    ``explain_model`` (a torch EmbeddingNet, the one evaluated): retrieval.png draws the similarity
    maps (explain.py) over each image, and retrieval_worst.png shows the ``num_worst`` queries whose
    true match ranked lowest. ``match``, ``calibrate``, ``query_photos``, ``fusion``: the same-product
    threshold's report and the several-photo queries (matching.results_extras)."""
    loading = dict(model_hash=model_hash, batch_size=batch_size, workers=workers, device=device, progress=progress)
    embeddings, extract_s, cached = (embed or extract_embeddings)(
        torch.compile(model) if compile else model, dataset, meta=embedding_meta(model, dataset, model_info), **loading
    )
    details, metrics, eval_s = score_embeddings(embeddings, dataset, chunk_size)
    timing = {"extract_s": round(extract_s, 3), "eval_s": round(eval_s, 3), "cached": cached, "device": str(device)}
    results = results_entries(model, dataset, model_info, embeddings, details, metrics, timing)
    results.update(
        matching.results_extras(
            embeddings,
            np.asarray(dataset.class_ids),
            match=match,
            calibrate=calibrate,
            query_photos=query_photos,
            fusion=fusion,
            fitted_on={"split": dataset.split, "root": str(dataset.root)},
            output=output if write else None,
            seed=seed,
        )
    )
    if write:
        figures = dict(explain_model=explain_model, device=device, num_worst=num_worst, seed=seed)
        rank = details["best_relevant_rank"]
        results.update(write_figures(Path(output), dataset, embeddings, rank, num_examples=num_examples, **figures))
    return results


def score_embeddings(embeddings, dataset, chunk_size: int) -> tuple[dict, dict, float]:
    """Both protocols on ``embeddings`` of ``dataset``: (retrieval.retrieval_details, their
    metrics, seconds spent)."""
    t0 = time.perf_counter()
    class_ids, super_ids = np.asarray(dataset.class_ids), np.asarray(dataset.super_ids)
    details = retrieval.retrieval_details(embeddings, class_ids, super_ids, chunk_size=chunk_size)
    metrics = retrieval.metrics_from_details(details)
    return details, metrics, time.perf_counter() - t0


def embedding_meta(model, dataset, model_info: dict) -> dict:
    """What an embeddings cache records next to the embeddings of ``dataset`` by ``model``."""
    return {
        "split": dataset.split,
        "data_root": str(dataset.root),
        "model_args": dict(model.model_args),
        "checkpoint": model_info.get("checkpoint"),
    }


def model_entry(model, model_info: dict) -> dict:
    """``results["model"]``: ``model_info`` with the model's architecture and parameter count."""
    model_args = model.model_args
    return {
        **model_info,
        "backbone": model_args["backbone"],
        "embedding_size": int(model_args["embedding_size"]),
        "image_size": int(model_args["image_size"]),
        "head": model_args.get("head", "mlp"),
        # an onnxruntime embedder holds no torch parameters: it carries the count
        "parameters": int(getattr(model, "num_parameters", None) or models.count_parameters(model)),
    }


def data_entry(dataset) -> dict:
    """``results["data"]``: the evaluated split, its sizes and how it was drawn."""
    return {
        "root": str(dataset.root),
        "split": dataset.split,
        "num_images": len(dataset),
        "num_products": int(len(np.unique(np.asarray(dataset.class_ids)))),
        "num_categories": int(len(np.unique(np.asarray(dataset.super_ids)))),
        "layout": dataset.layout,
        # the drawn test split's share (a catalogue without a split), else None
        "test_fraction": None if dataset.layout == "sop" else dataset.test_fraction,
        "single_image_products": dataset.num_single_image_products,
    }


def results_entries(model, dataset, model_info: dict, embeddings, details: dict, metrics: dict, timing: dict) -> dict:
    """The results dict before the matching extras and figures: both protocols' ``metrics``,
    ``model``, ``data``, ``embedding_stats``, ``timing``,
    ``per_category`` and ``num_product_queries`` (images with another image of their product)."""
    return {
        **metrics,
        "model": model_entry(model, model_info),
        "data": data_entry(dataset),
        "embedding_stats": embedding_stats(embeddings),
        "timing": timing,
        "per_category": per_category(details, np.asarray(dataset.super_ids), dataset.categories),
        "num_product_queries": int((details["num_relevant"] > 0).sum()),
    }


def write_figures(
    output: Path,
    dataset,
    embeddings,
    best_relevant_rank,
    *,
    explain_model,
    device,
    num_examples: int,
    num_worst: int,
    seed: int,
) -> dict:
    """retrieval.png (``num_examples`` queries; 0: none) and, with ``explain_model``,
    retrieval_worst.png (the ``num_worst`` queries whose true match ranked lowest) in ``output``,
    similarity maps drawn over each image; returns results.json's figure entries and output_dir."""
    output.mkdir(parents=True, exist_ok=True)
    entries = {}
    explainer = None if explain_model is None else explain.dataset_explainer(explain_model, dataset, device)
    if num_examples > 0:
        reporting.retrieval_figure(
            output / "retrieval.png", dataset, embeddings, num_examples=num_examples, seed=seed, explainer=explainer
        )
        entries["figure"] = "retrieval.png"
    if explainer is not None and num_worst > 0 and len(reporting.worst_queries(best_relevant_rank, num_worst)):
        reporting.worst_queries_figure(
            output / "retrieval_worst.png", dataset, embeddings, best_relevant_rank, num=num_worst, explainer=explainer
        )
        entries["worst_figure"] = "retrieval_worst.png"
    entries["output_dir"] = str(output)
    return entries


def write_results(results: dict, output) -> None:
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    fileio.atomic_write_text(output / runs.RESULTS_NAME, json.dumps(results, indent=2) + "\n")
    fileio.atomic_write_text(output / "results.md", reporting.results_markdown(results))


def eval_dataset(root, split, image_size, train_args=None, test_fraction=None):
    """``split`` of ``root`` with the eval transform and the splits of the run that trained
    on it (datasets.split_options)."""
    return datasets.SOPDataset(
        root,
        split,
        transform=preprocessing.build_transform(int(image_size), train=False),
        **datasets.split_options(train_args, test_fraction),
    )


def _torch_model(model, wanted, checkpoint=None, zero_shot=None):
    """The torch EmbeddingNet behind ``model`` for similarity maps when ``wanted``: the model
    itself, or for an onnxruntime embedder the checkpoint's / zero-shot network; else None."""
    if not wanted:
        return None
    if isinstance(model, models.EmbeddingNet):
        return model
    return models.load_model(checkpoint) if checkpoint is not None else models.zero_shot_model(*zero_shot)


def evaluate_zero_shot(
    backbone,
    data_root,
    weights="imagenet",
    image_size=224,
    split="test",
    output=None,
    device=None,
    write=True,
    test_fraction=None,
    runtime=None,
    explain=False,
    **kwargs,
) -> dict:
    """evaluate_model of models.zero_shot_model(backbone, weights, image_size) on ``runtime``
    (inference.load_embedder); output default runs/zero_shot_<backbone>_<size>px/eval.
    ``explain``: the figures with similarity maps (evaluate_model's explain_model).
    ``kwargs`` as for evaluate_model."""
    device = devices.resolve_device(str(device or "auto"))
    runtime = "torch" if kwargs.get("compile") else inference.resolve_runtime(runtime, device)
    model = inference.load_embedder(zero_shot=(backbone, weights, image_size), runtime=runtime, device=device)
    name = models.zero_shot_name(backbone, int(image_size), str(weights))
    output = Path(output) if output else runs.RunPaths.named(name).eval_dir
    info = {
        "run": name,
        "checkpoint": None,
        "zero_shot": True,
        "weights": str(weights),
        "checkpoint_size_mb": None,
        "epoch": None,
        "runtime": runtime,
    }
    zero_shot = (backbone, weights, image_size)
    results = evaluate_model(
        model,
        eval_dataset(data_root, split, image_size, test_fraction=test_fraction),
        model_info=info,
        explain_model=_torch_model(model, explain, zero_shot=zero_shot),
        output=output,
        device=device,
        write=write,
        model_hash=models.zero_shot_model_key(backbone, str(weights), int(image_size)),
        **kwargs,
    )
    results.update(held_out=True, held_out_why=None)  # nothing was trained on any catalogue
    if write and "calibrated" in results:
        results["calibrated"]["stored_in"] = str(output / matching.MATCH_NAME)
        fileio.atomic_write_text(output / matching.MATCH_NAME, json.dumps(results["calibrated"], indent=2) + "\n")
    if write:
        write_results(results, output)
    return results


def checkpoint_run(checkpoint, runtime, device) -> dict:
    """A checkpoint ready to score: its embedder on ``runtime``, its training args, its
    ``products`` record (None when it has none) and its run's name."""
    checkpoint = Path(checkpoint)
    model = inference.load_embedder(checkpoint, runtime=runtime, device=device)
    info = getattr(model, "checkpoint_info", None) or {}
    ckpt = checkpoints.load_checkpoint(checkpoint)
    return {
        "checkpoint": checkpoint,
        "model": model,
        "info": info,
        "args": info.get("args") or {},
        "record": ckpt.get("products"),
        "match": ckpt.get("match"),
        "name": checkpoint.resolve().parent.name,
    }


def score_baseline(baseline, dataset, runtime, common, allow_overlap=False) -> dict:
    """``results["baseline"]``: the checkpoint ``baseline`` scored on ``dataset`` (held out
    like the evaluated one: heldout.check)."""
    base = checkpoint_run(baseline, runtime, common["device"])
    status = heldout.check(base["record"], base["args"], dataset, f"baseline {base['name']}", allow_overlap)
    scored = evaluate_model(
        base["model"], dataset, model_info={"run": base["name"]}, write=False, num_examples=0, **common
    )
    return {
        "run": base["name"],
        "checkpoint": str(baseline),
        "epoch": base["info"].get("epoch"),
        "held_out": status["held_out"],
        "held_out_why": status["why"],
        **{k: scored[k] for k in ("product", "category", "num_queries")},
    }


def gate_metric(train_args: dict) -> str:
    """The deploy gate's metric: the run's --select_metric when it is a product metric, else MAP@R."""
    metric = (train_args or {}).get("select_metric")
    return metric if metric in retrieval.PRODUCT_METRICS else "map@r"


def deploy_gate(results: dict, metric: str, tolerance: float) -> dict:
    """``results["gate"]``: passed unless the evaluated checkpoint is worse than the baseline on the
    product ``metric`` by more than ``tolerance`` percentage points; an undefined metric fails."""
    new, old = results["product"].get(metric), results["baseline"]["product"].get(metric)
    gate = {"metric": metric, "new": new, "baseline": old, "tolerance_points": float(tolerance)}
    if new is None or old is None:
        return {**gate, "difference_points": None, "passed": False}
    difference = round(100 * (new - old), 6)
    return {**gate, "difference_points": difference, "passed": difference >= -tolerance}


def zero_shot_metrics(model_args: dict, dataset, runtime: str, device, common: dict) -> dict | None:
    """The checkpoint's backbone with its ImageNet weights, no head, on the same images: product,
    category, num_queries and extract_s; None (with a warning) when the weights are unavailable."""
    try:
        backbone = inference.load_embedder(
            zero_shot=(model_args["backbone"], "imagenet", model_args["image_size"]), runtime=runtime, device=device
        )
    except backbones.WeightsUnavailableError as e:
        # the checkpoint's own evaluation stands without it (e.g. offline, weights not cached)
        logger.warning("zero-shot row skipped: %s", e)
        return None
    zs = evaluate_model(backbone, dataset, model_info={"run": "zero-shot"}, write=False, num_examples=0, **common)
    return {**{k: zs[k] for k in ("product", "category", "num_queries")}, "extract_s": zs["timing"]["extract_s"]}


def evaluate_checkpoint(
    checkpoint,
    data_root=None,
    split="test",
    output=None,
    batch_size=64,
    workers=None,
    device=None,
    embed=None,
    num_examples=6,
    chunk_size=1024,
    seed=0,
    progress=True,
    compile=False,
    zero_shot_row=True,
    test_fraction=None,
    runtime=None,
    explain=False,
    allow_overlap=False,
    baseline=None,
    tolerance=None,
    calibrate=None,
    query_photos=0,
    fusion="mean",
) -> dict:
    """Evaluate ``checkpoint`` on ``split``; write results.json / results.md / retrieval.png to
    ``output`` (default runs/<run>/eval) and return the results dict (evaluate_model).
    ``compile``: extract the embeddings with ``torch.compile(model)`` (1.5x on a 2-core CPU for
    EfficientNet-B0 at 224 px, after a compilation of tens of seconds; PyTorch only).
    ``runtime``: torch or onnx (inference.load_embedder; default inference.default_runtime).
    ``explain``: the figures with similarity maps (evaluate_model's explain_model).
    ``zero_shot_row`` and a checkpoint trained from ImageNet weights: ``results["zero_shot"]``
    holds its backbone's zero-shot metrics (product, category) on the same images.
    ``allow_overlap``: `checkpoint_setup`. ``baseline``, ``tolerance``: `add_baseline`.
    ``results["match"]``: the checkpoint's threshold on this split; ``calibrate`` (a target FMR):
    refitted on this split and stored in the checkpoint (matching.store_calibrated);
    ``query_photos``, ``fusion``: matching.results_extras."""
    run = checkpoint_setup(checkpoint, data_root, split, output, device, runtime, compile, test_fraction, allow_overlap)
    common = dict(
        batch_size=batch_size, workers=workers, device=run["device"], chunk_size=chunk_size, progress=progress
    )
    results = score_checkpoint(
        run,
        common,
        explain=explain,
        embed=embed,
        num_examples=num_examples,
        seed=seed,
        compile=compile,
        calibrate=calibrate,
        query_photos=query_photos,
        fusion=fusion,
    )
    if zero_shot_row and run["args"].get("weights") == "imagenet":
        add_zero_shot_row(results, run, common)
    if baseline is not None:
        add_baseline(results, run, baseline, common, tolerance, allow_overlap)
    write_results(results, run["output"])
    return results


def checkpoint_setup(
    checkpoint, data_root, split, output, device, runtime, compile, test_fraction, allow_overlap
) -> dict:
    """checkpoint_run on the resolved ``device`` and ``runtime``, with the ``dataset`` to score it
    on (``data_root`` default: the run's), its ``output`` folder and its held-out ``status``:
    heldout.check (OverlapError for a test split holding products the run trained or validated on,
    unless ``allow_overlap``)."""
    device = devices.resolve_device(str(device or "auto"))
    runtime = "torch" if compile else inference.resolve_runtime(runtime, device)
    run = checkpoint_run(checkpoint, runtime, device)
    train_args = run["args"]
    root = data_root or catalogue.default_data_root(train_args)
    dataset = eval_dataset(root, split, run["model"].model_args["image_size"], train_args, test_fraction)
    return {
        **run,
        "device": device,
        "runtime": runtime,
        "dataset": dataset,
        "output": Path(output) if output else default_output(run["checkpoint"], train_args),
        "status": heldout.check(run["record"], train_args, dataset, run["name"], allow_overlap),
    }


def score_checkpoint(run: dict, common: dict, *, explain, **options) -> dict:
    """evaluate_model of the `checkpoint_setup` ``run`` (``options``, ``common``: evaluate_model's),
    with its held-out status and its threshold; a recalibrated threshold stored in the checkpoint."""
    checkpoint, model = run["checkpoint"], run["model"]
    ckpt_hash = checkpoints.checkpoint_hash(checkpoint)  # once: it reads the whole file
    results = evaluate_model(
        model,
        run["dataset"],
        output=run["output"],
        model_hash=ckpt_hash,
        explain_model=_torch_model(model, explain, checkpoint=checkpoint),
        model_info={
            "run": run["name"],
            "checkpoint": str(checkpoint),
            "checkpoint_sha256": ckpt_hash,
            "checkpoint_size_mb": round(checkpoint.stat().st_size / 2**20, 2),
            "epoch": run["info"].get("epoch"),
            "runtime": run["runtime"],
        },
        match=run["match"],
        **options,
        **common,
    )
    results.update(held_out=run["status"]["held_out"], held_out_why=run["status"]["why"])
    matching.store_calibrated(results, checkpoint)
    return results


def add_zero_shot_row(results: dict, run: dict, common: dict) -> None:
    """``results["zero_shot"]``: `zero_shot_metrics` of the `checkpoint_setup` ``run``, when available."""
    row = zero_shot_metrics(run["model"].model_args, run["dataset"], run["runtime"], run["device"], common)
    if row is not None:
        results["zero_shot"] = row


def add_baseline(results: dict, run: dict, baseline, common: dict, tolerance, allow_overlap) -> None:
    """``results["baseline"]``: the checkpoint ``baseline`` scored on the same images, and
    ``results["gate"]``: `deploy_gate` with ``tolerance`` points (default DEFAULT_TOLERANCE) on
    `gate_metric`."""
    results["baseline"] = score_baseline(baseline, run["dataset"], run["runtime"], common, allow_overlap)
    tolerance = DEFAULT_TOLERANCE if tolerance is None else tolerance
    results["gate"] = deploy_gate(results, gate_metric(run["args"]), tolerance)
