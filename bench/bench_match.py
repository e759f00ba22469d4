"""Does the calibrated same-product threshold hold on unseen products, and do several photos a query help?
Prints JSON.

    python bench/bench_match.py --checkpoint CK --data_root DIR [--targets 0.01 0.001] [--max_n 3]

Embeds the checkpoint's validation, training and test splits of ``DIR`` once (eval transform),
then, per target false-match rate, fits the threshold three ways and measures each on the test
split's pairs (products never trained or validated on):

* ``train_products``: the plain quantile of the training products' impostor pairs;
* ``val_plain``: the plain quantile of the validation products' pairs (no carry-over, no bootstrap);
* ``carry_over_point``: the plain quantile of the validation pairs plus the carry-over pairs (no bootstrap);
* ``calibrated``: calibration.fit_threshold as train.py runs it (validation products, carry-over
  pairs against the training photos when they are few, product bootstrap); with ``--confidences``,
  also ``calibrated_confidence_C`` at other bootstrap confidences C.

and the several-photo queries of training.matching on the test split, per fusion.

``subsets``: how each fit holds with few fitting products, on the real photos: ``--draws`` times,
``P`` test products drawn at random are the fitting set (the training photos give the carry-over
pairs) and the other test products measure it; per target and P: the median test FMR and TMR, the
share of draws whose FMR exceeds twice the target and the share within 2x of it (either way).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
import sys
import time

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import numpy as np

import calibration
import datasets
import models
import preprocessing
from training import matching


def embed_split(model, root, split, train_args, workers):
    """(embeddings, labels) of ``split`` under the eval transform."""
    size = int(model.model_args["image_size"])
    data = datasets.SOPDataset(
        root, split, transform=preprocessing.build_transform(size, train=False), **datasets.split_options(train_args)
    )
    emb = matching.embed_subset(model, data, range(len(data)), workers=workers, progress=False)
    return emb, data.class_ids


def thresholds(val, train, target, confidences, seed=0) -> dict:
    """The fits of the module docstring at ``target``: ``calibrated`` at each bootstrap confidence."""
    _, train_impostor = calibration.pair_scores(*train, seed=seed)
    _, val_impostor = calibration.pair_scores(*val, seed=seed)
    fits = {"train_products": calibration.threshold_at_fmr(train_impostor, target)}
    fits["val_plain"] = calibration.threshold_at_fmr(val_impostor, target)
    fitted_on = {}
    for c in confidences:
        fit = calibration.fit_threshold(val[0], val[1], target_fmr=target, other_embeddings=train[0], confidence=c)
        fits["carry_over_point"] = fit["fitted_on"]["point_threshold"]
        fits[calibrated_name(c)] = fit["threshold"]
        if not fitted_on or c == calibration.CONFIDENCE:
            fitted_on = fit["fitted_on"]  # train.py's fit when it is among them
    return fits, fitted_on


def calibrated_name(confidence) -> str:
    return "calibrated" if confidence == calibration.CONFIDENCE else f"calibrated_confidence_{confidence:g}"


def subset_study(test, train, target, size, draws, confidences, seed=0) -> dict:
    """The ``subsets`` entry of one target and fitting-set ``size`` (module docstring)."""
    rng = np.random.default_rng(seed)
    emb, labels = np.asarray(test[0]), np.asarray(test[1])
    found = {}
    for d in range(draws):
        fit = np.isin(labels, rng.choice(np.unique(labels), size, replace=False))
        _, fit_impostor = calibration.pair_scores(emb[fit], labels[fit])
        genuine, impostor = calibration.pair_scores(emb[~fit], labels[~fit])
        fits = {"val_plain": calibration.threshold_at_fmr(fit_impostor, target)}
        for c in confidences:
            record = calibration.fit_threshold(
                emb[fit], labels[fit], target_fmr=target, other_embeddings=train[0], confidence=c, seed=d
            )
            fits["carry_over_point"] = record["fitted_on"]["point_threshold"]
            fits[calibrated_name(c)] = record["threshold"]
        for name, t in fits.items():
            found.setdefault(name, []).append(calibration.rates(genuine, impostor, t))
    return {
        name: {
            "median_fmr": float(np.median([r["fmr"] for r in rows])),
            "median_tmr": float(np.median([r["tmr"] for r in rows])),
            "share_fmr_over_2x": float(np.mean([r["fmr"] > 2 * target for r in rows])),
            "share_fmr_within_2x": float(np.mean([target / 2 <= r["fmr"] <= 2 * target for r in rows])),
        }
        for name, rows in found.items()
    }


def cached_splits(model, root, train_args, workers, cache):
    """{split: (embeddings, labels)} of val, train, test; kept in ``cache`` (.npz) when given."""
    if cache and Path(cache).exists():
        data = np.load(cache)
        return {s: (data[f"{s}_e"], data[f"{s}_l"]) for s in ("val", "train", "test")}
    splits = {s: embed_split(model, root, s, train_args, workers) for s in ("val", "train", "test")}
    if cache:
        np.savez(
            cache,
            **{f"{s}_e": v[0] for s, v in splits.items()},
            **{f"{s}_l": np.asarray(v[1]) for s, v in splits.items()},
        )
    return splits


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data_root", default=None, help="default: the checkpoint's")
    p.add_argument("--targets", type=float, nargs="+", default=[0.01, 0.001])
    p.add_argument("--max_n", type=int, default=3)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--subset_sizes", type=int, nargs="*", default=[4, 11])
    p.add_argument("--draws", type=int, default=30)
    p.add_argument("--cache", default=None, help="keep the embeddings here (.npz) and reuse them")
    p.add_argument(
        "--confidences",
        type=float,
        nargs="+",
        default=[calibration.CONFIDENCE],
        help="bootstrap confidences of the calibrated fit to compare (default: train.py's)",
    )
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    model = models.load_model(args.checkpoint)
    train_args = model.checkpoint_info.get("args") or {}
    root = args.data_root or train_args["data_root"]
    splits = cached_splits(model, root, train_args, args.workers, args.cache)
    genuine, impostor = calibration.pair_scores(*splits["test"])
    out = {
        "checkpoint": str(args.checkpoint),
        "data_root": str(root),
        "photos": {s: len(v[1]) for s, v in splits.items()},
        "products": {s: int(len(set(v[1]))) for s, v in splits.items()},
        "test_pairs": {"genuine": len(genuine), "impostor": len(impostor)},
        "targets": {},
    }
    for target in args.targets:
        fits, fitted_on = thresholds(splits["val"], splits["train"], target, args.confidences)
        out["targets"][str(target)] = {
            "fitted_on": fitted_on,
            **{name: {"threshold": t, **calibration.rates(genuine, impostor, t)} for name, t in fits.items()},
        }
    out["subsets"] = {
        str(target): {
            str(size): subset_study(splits["test"], splits["train"], target, size, args.draws, args.confidences)
            for size in args.subset_sizes
        }
        for target in args.targets
    }
    out["query_photos"] = {
        f: matching.query_photo_metrics(*splits["test"], max_n=args.max_n, fusion=f) for f in matching.FUSIONS
    }
    out["seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
