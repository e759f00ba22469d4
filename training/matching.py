"""Same-product matching in an evaluation: fitting the calibrated threshold (calibration.py) on a
model's embeddings of held-out products, storing it in a checkpoint, its report on a test split
(``results["match"]``, the FMR-vs-TMR curve), and several-photo queries (``results["query_photos"]``).

Several photos of one item in one query (`query_photo_metrics`): among the products with at least
``max_n + 1`` photos, each takes ``n`` photos (the first ``n`` of one seeded shuffle, so the
n-photo query holds the (n-1)-photo one) as one query; relevant = its other photos; the gallery =
every photo of the split but the query's own. Fusions (`FUSIONS`): ``mean`` scores the gallery
against the unit mean of the query's unit embeddings; ``max`` takes each gallery photo's best
score over the query photos.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import numpy as np
from torch.utils.data import DataLoader, Subset

import calibration
import checkpoints
import extraction
import loaders
import models
import preprocessing

logger = logging.getLogger("evaluate")

CURVE_NAME = "match_curve.png"
MATCH_NAME = "match.json"  # evaluate.py --calibrate --zero_shot: the record, in the eval folder
MAX_OTHER_PHOTOS = 2000  # training photos embedded for the carry-over pairs (a seeded sample beyond)
FUSIONS = ("mean", "max")


def embed_subset(model, dataset, indices, *, batch_size=64, workers=None, device="cpu", progress=False):
    """Unit embeddings of ``dataset[indices]`` (in that order)."""
    loader = DataLoader(
        Subset(dataset, list(map(int, indices))),
        batch_size=batch_size,
        shuffle=False,
        **loaders.loader_settings(device, workers=workers, persistent_workers=False),
    )
    embeddings, _ = extraction.extract_embeddings(model, loader, device=device, progress=progress, desc="calibration")
    return embeddings


def fit_on_datasets(
    model, fit_set, other_set=None, *, target_fmr=calibration.DEFAULT_TARGET_FMR, fitted_on=None, seed=0, **embed_kwargs
) -> dict:
    """The match record of ``model`` fitted on every photo of ``fit_set`` (held-out products) by
    calibration.fit_threshold; ``other_set`` (the training split) gives the carry-over pairs when
    ``fit_set`` has few products (at most MAX_OTHER_PHOTOS of its photos, seeded). ``fitted_on``
    adds what the caller knows (split, root)."""
    labels = np.asarray(fit_set.class_ids)
    embeddings = embed_subset(model, fit_set, range(len(fit_set)), **embed_kwargs)
    other = None
    if other_set is not None and len(np.unique(labels)) < calibration.MIN_PRODUCTS:
        pick = np.random.default_rng(seed).permutation(len(other_set))[:MAX_OTHER_PHOTOS]
        other = embed_subset(model, other_set, np.sort(pick), **embed_kwargs)
    record = calibration.fit_threshold(embeddings, labels, target_fmr=target_fmr, other_embeddings=other, seed=seed)
    record["fitted_on"].update(fitted_on or {})
    return record


def store_match(checkpoint, record: dict) -> None:
    """Write ``record`` as the checkpoint's ``match`` (atomic: readers see the old file or the new)."""
    ckpt = checkpoints.load_checkpoint(checkpoint)
    ckpt["match"] = record
    checkpoints.atomic_save(ckpt, checkpoint)


def fit_checkpoint(
    checkpoint,
    val_set,
    train_set=None,
    *,
    target_fmr=calibration.DEFAULT_TARGET_FMR,
    device="cpu",
    batch_size=64,
    workers=None,
    seed=0,
) -> dict:
    """train.py's end: the checkpoint's network fitted on the validation products (``val_set``),
    with ``train_set``'s photos (under the eval transform) for the carry-over pairs, and stored in
    the checkpoint. Returns the record."""
    model = models.load_model(checkpoint, device=device)
    other = None
    if train_set is not None:
        other = copy.copy(train_set)
        other.transform = preprocessing.build_transform(int(model.model_args["image_size"]), train=False)
    record = fit_on_datasets(
        model,
        val_set,
        other,
        target_fmr=target_fmr,
        seed=seed,
        device=device,
        batch_size=batch_size,
        workers=workers,
        fitted_on={"split": val_set.split, "root": str(val_set.root)},
    )
    store_match(checkpoint, record)
    return record


def store_calibrated(results: dict, checkpoint) -> None:
    """A refit (``results["calibrated"]``, when there is one) written into ``checkpoint``."""
    if "calibrated" in results:
        store_match(checkpoint, results["calibrated"])
        results["calibrated"]["stored_in"] = str(checkpoint)


def match_report(embeddings, labels, record: dict, *, seed=0) -> tuple[dict, tuple]:
    """``results["match"]`` on these photos: the record's threshold, target_fmr and fitted_on with
    the FMR / TMR measured here and the pair counts; and (genuine, impostor) scores for the curve."""
    genuine, impostor = calibration.pair_scores(embeddings, labels, seed=seed)
    measured = calibration.rates(genuine, impostor, record["threshold"])
    report = {
        "threshold": record["threshold"],
        "target_fmr": record["target_fmr"],
        **measured,
        "genuine_pairs": int(len(genuine)),
        "impostor_pairs": int(len(impostor)),
        "fitted_on": record.get("fitted_on", {}),
    }
    return report, (genuine, impostor)


def match_figure(path, genuine, impostor, report: dict) -> None:
    """The false-match rate (log x) against the true-match rate, with the operating point."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fmr, tmr = calibration.roc_curve(genuine, impostor)
    floor = 0.5 / max(len(impostor), 1)
    fig, ax = plt.subplots(figsize=(5.5, 4.2))
    ax.plot(np.maximum(fmr, floor), tmr, lw=1.5, label="test pairs")
    if report.get("fmr") is not None:
        ax.plot(
            [max(report["fmr"], floor)],
            [report["tmr"]],
            "o",
            color="C3",
            label=f"threshold {report['threshold']:.3f}: FMR {100 * report['fmr']:.2f}%, "
            f"TMR {100 * report['tmr']:.1f}%",
        )
    ax.axvline(report["target_fmr"], color="0.6", ls="--", lw=1, label=f"target FMR {100 * report['target_fmr']:g}%")
    ax.set(
        xscale="log",
        xlabel="false-match rate (pairs of different products)",
        ylabel="true-match rate (pairs of one product)",
        ylim=(0, 1.01),
    )
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(Path(path), dpi=120)
    plt.close(fig)


def query_groups(labels, max_n: int, seed=0) -> list[np.ndarray]:
    """Per product with >= max_n + 1 photos: its photo indices in one seeded shuffle."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    groups = []
    for product in np.unique(labels):
        photos = np.flatnonzero(labels == product)
        if len(photos) > max_n:
            groups.append(rng.permutation(photos))
    return groups


def fused_scores(unit, query: np.ndarray, fusion: str) -> np.ndarray:
    """Scores of every photo against the query photos ``query`` fused by ``fusion`` (FUSIONS)."""
    if fusion == "mean":
        centre = unit[query].mean(axis=0)
        return unit @ (centre / max(np.linalg.norm(centre), 1e-12))
    if fusion == "max":
        return (unit @ unit[query].T).max(axis=1)
    raise ValueError(f"unknown fusion {fusion!r}; choose one of {', '.join(FUSIONS)}")


def ranked_metrics(scores: np.ndarray, relevant: np.ndarray, candidates: np.ndarray) -> tuple[float, float]:
    """(MAP@R, Recall@1) of one query over ``candidates`` (indices), ties to the lower index."""
    order = candidates[np.lexsort((candidates, -scores[candidates]))]
    hits = np.isin(order, relevant)
    r = len(relevant)
    top = hits[:r]
    precision = np.cumsum(top) / np.arange(1, r + 1)
    return float((precision * top).sum() / r), float(hits[0])


def query_photo_metrics(embeddings, labels, max_n=3, fusion="mean", seed=0) -> dict:
    """{"n": {"map@r", "recall@1", "queries"}} for n = 1..max_n photos a query (module docstring)."""
    unit = np.asarray(embeddings, dtype=np.float64)
    unit = unit / np.maximum(np.linalg.norm(unit, axis=1, keepdims=True), 1e-12)
    everything = np.arange(len(unit))
    groups = query_groups(labels, max_n, seed)
    out = {}
    for n in range(1, max_n + 1):
        rows = [
            ranked_metrics(fused_scores(unit, g[:n], fusion), g[n:], np.setdiff1d(everything, g[:n])) for g in groups
        ]
        out[str(n)] = {
            "map@r": float(np.mean([m for m, _ in rows])) if rows else None,
            "recall@1": float(np.mean([r for _, r in rows])) if rows else None,
            "queries": len(rows),
            "fusion": fusion,
        }
    return out


def results_extras(
    embeddings,
    labels,
    *,
    match=None,
    calibrate=None,
    query_photos=0,
    fusion="mean",
    fitted_on=None,
    output=None,
    seed=0,
) -> dict:
    """What matching adds to an evaluation's results: ``match`` (the record's report here, and its
    curve CURVE_NAME in ``output`` when given), ``calibrated`` (with ``calibrate`` = a target FMR:
    the record fitted on these photos, then also the one reported) and ``query_photos``
    (1..``query_photos`` photos a query)."""
    extras = {}
    if calibrate is not None:
        match = calibration.fit_threshold(embeddings, labels, target_fmr=calibrate, seed=seed)
        match["fitted_on"].update(fitted_on or {})
        extras["calibrated"] = match
    if match is not None:
        extras["match"], (genuine, impostor) = match_report(embeddings, labels, match, seed=seed)
        if output is not None:
            match_figure(Path(output) / CURVE_NAME, genuine, impostor, extras["match"])
            extras["match"]["figure"] = CURVE_NAME
    if query_photos:
        extras["query_photos"] = query_photo_metrics(embeddings, labels, query_photos, fusion, seed)
    return extras
