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
keeps the extracted embeddings (a `search.index.GalleryIndex` file, which the demo can load too)
and reuses them while the checkpoint and the image list are unchanged.

Held out: a checkpoint records the products it trained and validated on; a test split holding
any of them is refused (naming how many and a few) unless ``--allow_overlap``, and results.json
says ``"held_out"``: true, false (with ``held_out_why``) or null (a checkpoint without the
record).

Deploy gate: ``--baseline OLD.pth`` scores the deployed checkpoint on the same images, puts it in
the same tables, and exits with code 3 when ``--checkpoint`` is worse on the gate metric (the
run's --select_metric, MAP@R by default) by more than ``--tolerance`` percentage points.

Exit codes: 0 done (gate passed); 1 error (message says what to do; a test split that is not held
out is one); 2 bad arguments; 3 the gate failed (results are still written); 4 no held-out test
split (a catalogue trained with --test_fraction 0: evaluate on other data).

Same-product match: results.json's ``match`` reports the checkpoint's calibrated threshold (train.py fits
it on the validation products at --target_fmr; calibration.py) on this split: ``threshold``,
``target_fmr``, ``fmr``, ``tmr``, ``fitted_on``, and draws match_curve.png (FMR, log scale, against
TMR, with the operating point). ``--calibrate`` refits it on this split (any labelled catalogue) and
stores it in the checkpoint, or with --zero_shot in ``<output>/match.json``. ``--query_photos N``
adds ``query_photos``: MAP@R and Recall@1 of queries of 1..N photos of one product
(training.matching).

Zero-shot: ``--zero_shot`` evaluates the backbone's L2-normalised pooled features (ImageNet
weights, no head, nothing trained) the same way. A checkpoint trained from ImageNet weights is
shown beside its backbone's zero-shot row (``zero_shot`` in results.json, a row in results.md,
a line on the console), so every evaluation says whether training beat the pretrained features;
``--no-zero_shot_row`` skips that second extraction.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
import sys
import time

import backbones
import calibration
import checkpoints
from dataio import catalogue
import datasets
import inference
from search.index import build_gallery_index, load_fresh_index
from training import evaluation, matching, reporting

logger = logging.getLogger("evaluate")

EXIT_GATE_FAILED = 3  # --baseline: the checkpoint is worse than the baseline beyond --tolerance
EXIT_NO_TEST_SPLIT = 4  # the catalogue has no held-out test split (trained with --test_fraction 0)


def get_args_parser():
    p = argparse.ArgumentParser("evaluate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--checkpoint",
        default=None,
        help="checkpoints/<run>/best.pth (or last.pth); it holds model_args and the "
        "training args, so no other model flag is needed",
    )
    z = p.add_argument_group("zero-shot (a pretrained backbone, no checkpoint)")
    evaluation.add_zero_shot_args(
        z, "evaluate --backbone's pooled, L2-normalised features instead of a checkpoint (needs --data_root)"
    )
    z.add_argument(
        "--zero_shot_row",
        default=True,
        action=argparse.BooleanOptionalAction,
        help="with --checkpoint trained from ImageNet weights: also evaluate its "
        "backbone zero-shot at the same image size and report both",
    )
    p.add_argument(
        "--data_root",
        default=None,
        help="dataset folder (SOP's Ebay files, a catalogue.csv or a <category>/<product>/"
        "<image> tree); default: the one the checkpoint was trained on",
    )
    p.add_argument(
        "--test_fraction",
        type=float,
        default=None,
        help="a catalogue without a split: share of the products in the test split; "
        "default the checkpoint's training value (0.5 for --zero_shot)",
    )
    p.add_argument(
        "--allow_overlap",
        action="store_true",
        help="score a test split holding products the checkpoint trained or validated on "
        '(refused otherwise); results then say "held_out": false',
    )
    p.add_argument(
        "--baseline",
        default=None,
        metavar="OLD.pth",
        help="deploy gate: also score this checkpoint on the same images and exit with code 3 "
        "when --checkpoint is worse on the gate metric by more than --tolerance",
    )
    p.add_argument(
        "--tolerance",
        type=float,
        default=evaluation.DEFAULT_TOLERANCE,
        help="deploy gate: percentage points of the gate metric (the run's --select_metric, "
        "else MAP@R) the new checkpoint may lose to --baseline; default %(default)s",
    )
    p.add_argument("--verbose", action="store_true", help="list every skipped non-image file")
    p.add_argument(
        "--split",
        default="test",
        choices=datasets.SPLITS,
        help="split to evaluate; 'test' (60,502 images on SOP) is the reported one",
    )
    p.add_argument("--output", default=None, help="output folder; default runs/<run>/eval")
    p.add_argument("--batch_size", type=int, default=64, help="images per forward pass (64 fits any GPU)")
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help="DataLoader processes decoding JPEGs; default loaders.loader_settings "
        "(a quarter of the CPUs, at least 1, on CPU; every CPU up to 16 on CUDA)",
    )
    p.add_argument("--device", default=None, help="cuda, cpu, cuda:1, ...; default cuda when available")
    p.add_argument(
        "--embeddings_cache",
        default=None,
        metavar="FILE",
        help="save the embeddings here (.npz) and reuse them next time while the "
        "checkpoint (sha256) and the image list are unchanged",
    )
    p.add_argument(
        "--num_examples", type=int, default=6, help="queries shown in retrieval.png with their top 5 (0: no figure)"
    )
    p.add_argument(
        "--explain",
        action="store_true",
        help="draw the similarity maps (why each result matches: explain.py) over "
        "retrieval.png, and add retrieval_worst.png: the queries whose true match "
        "ranked lowest",
    )
    p.add_argument(
        "--chunk_size",
        type=int,
        default=1024,
        help="tile side of the exact similarity pass (memory ~ 5 bytes x tile^2 per thread)",
    )
    p.add_argument("--seed", type=int, default=0, help="picks the figure's queries")
    # --progress/--no-progress as in train.py; --no_progress (the first spelling) still works.
    p.add_argument("--progress", default=True, action=argparse.BooleanOptionalAction, help="tqdm progress bars")
    p.add_argument("--no_progress", dest="progress", action="store_false", help=argparse.SUPPRESS)
    m = p.add_argument_group("same-product match (calibration.py)")
    m.add_argument(
        "--calibrate",
        action="store_true",
        help="refit the same-product threshold on this split's photos (any labelled catalogue, "
        "--zero_shot too) at --target_fmr and store it: in the checkpoint (key match), or for "
        "--zero_shot in <output>/match.json; results.json's match is then in-sample",
    )
    m.add_argument(
        "--target_fmr",
        type=float,
        default=calibration.DEFAULT_TARGET_FMR,
        help="--calibrate: share of pairs of different products allowed at or above the threshold; default %(default)s",
    )
    m.add_argument(
        "--query_photos",
        type=int,
        default=0,
        metavar="N",
        help="also score queries of 1..N photos of one product (results.json query_photos)",
    )
    m.add_argument(
        "--fusion",
        default="mean",
        choices=matching.FUSIONS,
        help="--query_photos: mean = the unit mean of the photos' embeddings; max = each "
        "gallery photo's best score over the photos",
    )
    inference.add_runtime_arg(p)
    p.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the model for the extraction (1.5x measured on CPU for "
        "B0 at 224 px; compiling costs tens of seconds, so only for large splits)",
    )
    return p


def cached_embeddings(cache):
    """An ``embed`` for training.evaluation (the signature of evaluation.extract_embeddings)
    that keeps the embeddings in ``cache``, a search.index.GalleryIndex file the demo can load
    too, and reuses them while the model (its hash) and the image list are unchanged."""

    def embed(model, dataset, *, model_hash, meta, batch_size, workers, device, progress):
        if Path(cache).exists():
            index, why = load_fresh_index(cache, model_hash, dataset.rel_paths)
            if index is not None:
                logger.info("embeddings from cache %s (%d images)", cache, len(index))
                return index.embeddings, 0.0, True
            logger.info("embeddings cache %s: %s; extracting again", cache, why)
        t0 = time.perf_counter()
        index = build_gallery_index(
            model,
            dataset,
            batch_size=batch_size,
            workers=workers,
            device=device,
            checkpoint_hash=model_hash,
            meta=meta,
            progress=progress,
        )
        seconds = time.perf_counter() - t0
        index.save(cache)
        logger.info("embeddings saved to %s", cache)
        return index.embeddings, seconds, False

    return embed


def print_results(results: dict) -> None:
    print(
        f"{results['num_queries']:,} queries ({results['data']['split']} split of {results['data']['root']}), "
        "metrics in %"
    )
    rows = [(results["model"]["run"], results)]
    if results.get("baseline"):
        rows.append((f"baseline {results['baseline']['run']}", results["baseline"]))
    if results.get("zero_shot"):
        rows.append(("zero-shot backbone", results["zero_shot"]))
    for name, r in rows:
        p, c = r["product"], r["category"]
        print(
            f"{name}\n  product  R@1 {reporting.cell(p, 'recall@1')}  R@10 {reporting.cell(p, 'recall@10')}  "
            f"R@100 {reporting.cell(p, 'recall@100')}  R@1000 {reporting.cell(p, 'recall@1000')}  "
            f"MAP@R {reporting.cell(p, 'map@r')}  RP {reporting.cell(p, 'r_precision')}\n"
            f"  category R@1 {reporting.cell(c, 'recall@1')}  R@5 {reporting.cell(c, 'recall@5')}  "
            f"R@10 {reporting.cell(c, 'recall@10')}  R@20 {reporting.cell(c, 'recall@20')}  "
            f"P@10 {reporting.cell(c, 'precision@10')}  mAP@10 {reporting.cell(c, 'map@10')}"
        )
        for why in (p.get("why"), c.get("why")):
            if why:
                print(f"  {why}")
    for line in reporting.held_out_lines(results):
        if line:
            print(line.replace("**", ""))
    for line in match_lines(results):
        print(line)
    print(
        f"extract {results['timing']['extract_s']:.1f} s, metrics {results['timing']['eval_s']:.1f} s; "
        f"wrote {results['output_dir']}/results.json, results.md"
        + (", retrieval.png" if results.get("figure") else "")
        + (", retrieval_worst.png" if results.get("worst_figure") else "")
    )


def match_lines(results: dict) -> list[str]:
    """The same-product threshold's line (and where a refit was stored), the several-photo queries'."""
    lines = []
    m = results.get("match")
    if m:
        pct = lambda v: "n/a" if v is None else f"{100 * v:.2f}%"  # noqa: E731
        lines.append(
            f"match: threshold {m['threshold']:.4f} (target FMR {pct(m['target_fmr'])}, fitted on "
            f"{m['fitted_on'].get('split', '?')} {m['fitted_on'].get('products', '?')} products): "
            f"FMR {pct(m['fmr'])}, TMR {pct(m['tmr'])} here"
        )
    if results.get("calibrated"):
        lines.append(f"calibrated threshold stored in {results['calibrated']['stored_in']}")
    for n, q in (results.get("query_photos") or {}).items():
        lines.append(
            f"{n} photo(s) a query ({q['fusion']}, {q['queries']} queries): "
            f"MAP@R {reporting.cell(q, 'map@r')}  R@1 {reporting.cell(q, 'recall@1')}"
        )
    return lines


def check_args(parser, args) -> None:
    """argparse errors (exit 2): exactly one of --checkpoint / --zero_shot, and what each needs."""
    if args.zero_shot == (args.checkpoint is not None):
        parser.error("pass either --checkpoint CK, or --zero_shot --backbone NAME --data_root DIR")
    if args.zero_shot and (args.backbone is None or args.data_root is None):
        parser.error("--zero_shot needs --backbone NAME and --data_root DIR")
    if args.test_fraction is not None and not 0 <= args.test_fraction < 1:
        parser.error(f"--test_fraction must be in [0, 1) (got {args.test_fraction})")
    if args.baseline is not None and args.checkpoint is None:
        parser.error("--baseline compares two checkpoints: pass --checkpoint NEW --baseline OLD")
    if not args.tolerance >= 0:
        parser.error(f"--tolerance must be >= 0 percentage points (got {args.tolerance})")
    if not 0 < args.target_fmr < 1:
        parser.error(f"--target_fmr must be in (0, 1) (got {args.target_fmr})")
    if args.query_photos < 0:
        parser.error(f"--query_photos must be >= 0 (got {args.query_photos})")
    if args.image_size < 32:
        parser.error(f"--image_size must be >= 32 (got {args.image_size})")


def main(args):
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    common = dict(
        split=args.split,
        output=args.output,
        batch_size=args.batch_size,
        workers=args.workers,
        device=args.device,
        embed=cached_embeddings(args.embeddings_cache) if args.embeddings_cache else None,
        num_examples=args.num_examples,
        chunk_size=args.chunk_size,
        seed=args.seed,
        progress=args.progress,
        compile=args.compile,
        test_fraction=args.test_fraction,
        runtime=args.runtime,
        explain=args.explain,
        query_photos=args.query_photos,
        fusion=args.fusion,
        calibrate=args.target_fmr if args.calibrate else None,
    )
    catalogue.set_verbose(args.verbose)
    try:
        if args.zero_shot:
            results = evaluation.evaluate_zero_shot(
                args.backbone, args.data_root, weights=args.weights, image_size=args.image_size, **common
            )
        else:
            results = evaluation.evaluate_checkpoint(
                args.checkpoint,
                data_root=args.data_root,
                zero_shot_row=args.zero_shot_row,
                baseline=args.baseline,
                tolerance=args.tolerance,
                allow_overlap=args.allow_overlap,
                **common,
            )
    except datasets.NoTestSplitError as e:
        print(f"evaluate.py: {e}", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_NO_TEST_SPLIT) from None
    except (
        FileNotFoundError,
        IsADirectoryError,
        NotADirectoryError,
        checkpoints.CheckpointError,
        catalogue.DatasetError,
        backbones.WeightsUnavailableError,
        ValueError,
    ) as e:  # ValueError: a malformed catalogue (file:line)
        raise SystemExit(f"evaluate.py: {e}") from None
    print_results(results)
    if results.get("gate") and not results["gate"]["passed"]:
        raise SystemExit(EXIT_GATE_FAILED)
    return results


if __name__ == "__main__":
    parser = get_args_parser()
    arguments = parser.parse_args()
    check_args(parser, arguments)
    main(arguments)
