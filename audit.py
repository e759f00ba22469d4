"""Catalogue audit: duplicate listings and mislabelled photos, found, ranked and shown.

    python audit.py --data_root DIR --zero_shot --backbone efficientnet_lite0 --output OUT
    python audit.py --data_root DIR --checkpoint checkpoints/<run>/best.pth --output OUT
    python audit.py --gallery PHOTOS --zero_shot --backbone efficientnet_lite0 --output OUT

Writes OUT/audit.csv (``kind,path,other_path,product_id,other_product_id,score``, most suspicious
first within each kind), OUT/audit.html (each finding's photos and similarity maps; opens offline)
and OUT/summary.json (counts, the thresholds and how they were derived, timings). The kinds and
thresholds are defined in docs/audit.md. Nothing under DIR is written: the audit proposes, you
decide. OUT also keeps the embeddings (OUT/embeddings.npz): run the audit again after an
interruption or an edit, and only the photos not embedded yet are embedded. The library is
`search.audit_run`.
"""

import argparse
import json
import logging
import sys

from dataio import catalogue
from search import audit_run, loading
from training import evaluation


def get_args_parser():
    parser = argparse.ArgumentParser(
        "audit.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    group = parser.add_argument_group("catalogue (one of)")
    where = group.add_mutually_exclusive_group(required=True)
    where.add_argument(
        "--data_root",
        help="a labelled catalogue: SOP's Ebay files, a catalogue.csv or a "
        "<category>/<product>/<image> tree (every split is audited)",
    )
    where.add_argument(
        "--gallery",
        help="a folder of photos; <category>/<product>/<image> folders give "
        "the product ids, other photos are counted but not judged",
    )
    group = parser.add_argument_group("model (one of)")
    group.add_argument("--checkpoint", default=None, help="a trained checkpoint (best.pth)")
    evaluation.add_zero_shot_args(group, "audit with --backbone's pretrained features (no training needed)")
    group = parser.add_argument_group("output and thresholds")
    group.add_argument("--output", required=True, help="output folder (outside the catalogue's folder)")
    group.add_argument(
        "--duplicate_threshold",
        type=float,
        default=None,
        help="cosine score from which two photos are the same photo; default: derived "
        "from the model's scores for edited copies (docs/audit.md)",
    )
    group.add_argument(
        "--margin_threshold",
        type=float,
        default=None,
        help="margin by which another product must beat a photo's own; default: the "
        "catalogue's outlier bound (docs/audit.md)",
    )
    group.add_argument("--html_limit", type=int, default=50, help="findings of each kind shown in audit.html")
    group.add_argument("--seed", type=int, default=0, help="draw of the photos whose edited copies are scored")
    group = parser.add_argument_group("runtime")
    group.add_argument(
        "--index_type",
        default="exact",
        choices=("exact", "ivf", "hnsw"),
        help="neighbour search: exact (default; measured for 60,502 photos in "
        "bench/README.md) or a faiss index with an exact re-rank",
    )
    group.add_argument("--batch_size", type=int, default=64)
    group.add_argument("--workers", type=int, default=None, help="DataLoader workers (default: by CPU count)")
    group.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    group.add_argument("--no_progress", action="store_true", help="no progress bars")
    return parser


def check_args(parser, args):
    if args.zero_shot and (args.backbone is None or args.checkpoint):
        parser.error("--zero_shot needs --backbone NAME and no --checkpoint")
    if not args.zero_shot and not args.checkpoint:
        parser.error("pass --checkpoint CK, or --zero_shot --backbone NAME")
    if args.html_limit < 0:
        parser.error(f"--html_limit must be >= 0, got {args.html_limit}")


def main(args):
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        loaded = loading.load_search_model(
            args.checkpoint,
            device=args.device,
            zero_shot_backbone=args.backbone if args.zero_shot else None,
            weights=args.weights,
            image_size=args.image_size,
            runtime="torch",
        )
        summary = audit_run.run_audit(
            loaded,
            args.output,
            data_root=args.data_root,
            gallery_dir=args.gallery,
            batch_size=args.batch_size,
            workers=args.workers,
            index_type=args.index_type,
            html_limit=args.html_limit,
            duplicate_threshold=args.duplicate_threshold,
            margin_threshold=args.margin_threshold,
            seed=args.seed,
            progress=not args.no_progress,
        )
    except (
        loading.SetupError,
        audit_run.AuditError,
        catalogue.DatasetError,
        FileNotFoundError,
        NotADirectoryError,
    ) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if "message" in summary:
        print(summary["message"])
    print(
        json.dumps(
            {
                k: summary.get(k)
                for k in (
                    "photos",
                    "judged",
                    "products",
                    "counts",
                    "duplicate_threshold",
                    "margin_threshold",
                    "seconds",
                )
            }
        )
    )
    return 0


if __name__ == "__main__":
    parser = get_args_parser()
    arguments = parser.parse_args()
    check_args(parser, arguments)
    sys.exit(main(arguments))
