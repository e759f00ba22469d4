"""Train and evaluate several backbones (and optionally losses / samplers) in turn, then compare.

    python train_multiple.py                       # the original project's comparison: efficientnet_b0,
                                                   # resnet18, resnet50 with train.py's defaults
    python train_multiple.py --quick               # the same grid on a small synthetic SOP
                                                   # (data/synthetic_quick), CPU, ~4 min
    python train_multiple.py --backbones resnet18 resnet50 --samplers random pk \\
        --losses triplet multi_similarity --epochs 20 --prefix sweep
    python train_multiple.py --report_only         # rebuild tables and plots from the run folders

Every train.py flag passes through unchanged (the parser extends ``train.get_args_parser()``);
``--backbone`` / ``--loss`` / ``--sampler`` give a one-value grid, ``--backbones`` / ``--losses``
/ ``--samplers`` a wider one. A grid point is the run ``<prefix>_<backbone>_<loss>_<sampler>``:
trained by train.py (``checkpoints/<run>/``, ``runs/<run>/``), then its ``best.pth`` is
evaluated on the test split by evaluate.py (``runs/<run>/eval/results.json``).

Resumable: rerun the same command after an interruption. A run whose last.pth has reached
``--epochs`` and whose results.json belongs to its best.pth is skipped; an interrupted run
continues from its last.pth (train.py ``--resume auto``); a trained but unevaluated run is only
evaluated. A run that fails is reported (status and error in the table) and the others still
run; the exit code is then 1. A run folder made with other settings (image size, lr, ...) is
not reused: it is reported as a conflict; pick another ``--prefix`` or pass ``--overwrite``.

Outputs under ``--output`` (default ``<log_dir>/comparison``, ``<log_dir>/comparison_quick``
with ``--quick``):
    comparison.md / comparison.csv   both protocols' metrics, parameters, checkpoint size,
                                     training and evaluation time, best epoch: every value read
                                     from the runs' results.json, metrics.csv and checkpoints
    recall_at_1.png                  Recall@1 per run, product and category protocol
    training_curves.png              train / val loss, val Recall@1, lr, triplets per batch
    logs/<run>.{train,eval}.log      each subprocess's output

The grid, its runs' states and steps live in training/grid.py; the tee of each child process in
training/tee.py; the comparison rows and report in training/comparison.py.
"""

from __future__ import annotations

import argparse
import sys

import backbones
from dataio import catalogue
import losses
import samplers
import train  # its public parser (and main, for --launcher inprocess): the one entry script reused
from training import arg_checks, flags, grid
from training.grid import QUICK_DATASET, QUICK_DEFAULTS, SEED_BACKBONES

# ============ arguments ============


def get_args_parser(add_help: bool = True, train_help: bool = False) -> argparse.ArgumentParser:
    """train.py's parser plus the grid flags. ``train_help``: list train.py's flags in --help
    too (by default they are accepted but not repeated: `python train.py --help` has them)."""
    parent = train.get_args_parser(add_help=False)
    if not train_help:
        for action in parent._actions:
            action.help = argparse.SUPPRESS
    parser = argparse.ArgumentParser(
        "train_multiple.py",
        add_help=add_help,
        parents=[parent],
        formatter_class=flags.HelpFormatter,
        usage="%(prog)s [options] [any train.py option]",
        description="Train and evaluate a grid of backbones x losses x samplers with train.py and "
        "evaluate.py, then write comparison tables and plots. Every train.py flag "
        "(python train.py --help) applies to every run; the grid flags are below.",
    )
    # None = "not given": then the plural grid flag (or the original project's three backbones) decides.
    parser.set_defaults(backbone=None, loss=None, sampler=None)

    group = parser.add_argument_group("comparison grid")
    group.add_argument(
        *flags.flag_names("backbones"),
        nargs="+",
        default=None,
        metavar="NAME",
        choices=sorted(backbones.BACKBONES),
        help=f"backbones to compare ({', '.join(sorted(backbones.BACKBONES))}); default: "
        f"--backbone if given, else the original project's {' '.join(SEED_BACKBONES)}",
    )
    group.add_argument(
        *flags.flag_names("losses"),
        nargs="+",
        default=None,
        metavar="NAME",
        choices=sorted(losses.LOSSES),
        help=f"losses to compare ({', '.join(sorted(losses.LOSSES))}); default: --loss, else the recipe's",
    )
    group.add_argument(
        *flags.flag_names("samplers"),
        nargs="+",
        default=None,
        metavar="NAME",
        choices=list(samplers.BATCH_SAMPLERS),
        help="batch samplers to compare (random = the original project's batches, pk = "
        "P x K); default: --sampler, else the recipe's",
    )
    group.add_argument(
        *flags.flag_names("prefix"),
        default="cmp",
        help="run names are <prefix>_<backbone>_<loss>_<sampler> ('quick' with --quick)",
    )
    group.add_argument(
        *flags.flag_names("output"),
        default=None,
        help="folder of comparison.md/.csv, plots and logs; default "
        "<log_dir>/comparison (<log_dir>/comparison_quick with --quick)",
    )

    group = parser.add_argument_group("evaluation and execution")
    group.add_argument(
        *flags.flag_names("eval_checkpoint"),
        default="best",
        choices=["best", "last"],
        help="checkpoint of each run to evaluate on the test split: best (best "
        "validation Recall@1, recommended) or last",
    )
    group.add_argument(
        *flags.flag_names("eval_batch_size"),
        default=None,
        type=int,
        help="batch size of the test-split embedding pass; default --val_batch_size",
    )
    group.add_argument(
        *flags.flag_names("eval_examples"),
        default=6,
        type=int,
        help="queries shown in each run's eval/retrieval.png (evaluate.py --num_examples); 0 = no figure",
    )
    group.add_argument(
        *flags.flag_names("launcher"),
        default="subprocess",
        choices=["subprocess", "inprocess"],
        help="subprocess: each training / evaluation in its own python process "
        "(a crash or leak cannot take the others down; recommended for long "
        "runs); inprocess: call train.main / evaluate in this process",
    )
    group.add_argument(
        "--quick",
        action="store_true",
        help="the whole grid on a small synthetic SOP (generated once: "
        f"{QUICK_DATASET['num_products']} products at "
        f"{QUICK_DATASET['image_size']} px) on CPU in minutes: "
        + ", ".join(f"--{k} {v}" for k, v in QUICK_DEFAULTS.items() if not isinstance(v, bool))
        + ", --no-progress; explicit flags override these",
    )
    group.add_argument(
        *flags.flag_names("report_only"),
        action="store_true",
        help="train nothing: rebuild comparison.md/.csv and the plots from the run folders as they are",
    )
    group.add_argument(
        *flags.flag_names("dry_run"),
        action="store_true",
        help="print each run's state and the commands that would run, then stop",
    )
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse ``argv``; with ``--quick`` the QUICK_DEFAULTS replace the parser's defaults, so
    flags given explicitly still win. Out-of-range train.py flags are argparse errors (exit 2)."""
    parser = get_args_parser()
    args = parser.parse_args(argv)
    if args.quick:
        parser.set_defaults(**QUICK_DEFAULTS)
        args = parser.parse_args(argv)
    errors = grid.check_args(args)
    if not errors:
        # train.py's own range checks, per grid point: a mistake shared by every run stops here
        # (exit 2); one that only some runs have (e.g. a batch size P x K cannot split) is
        # reported as those runs' failure while the others run.
        per_point = [set(arg_checks.check_args(grid.train_namespace(args, p))) for p in grid.build_grid(args)]
        errors = sorted(set.intersection(*per_point)) if per_point else []
    if errors:
        parser.error("\n  ".join(errors))
    return args


def main(args: argparse.Namespace) -> list[dict]:
    """Run the grid (or only report, with --report_only); returns the comparison rows."""
    return grid.run_grid(args, train_main=train.main)


def cli(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.command_line = list(sys.argv[1:] if argv is None else argv)  # quoted in comparison.md
    try:
        rows = main(args)
    except (OSError, catalogue.DatasetError) as e:  # e.g. the --quick data folder is taken
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 1
    failed = [r["run"] for r in rows if r.get("error")]
    if failed:
        print(
            f"error: {len(failed)} run(s) failed: {', '.join(failed)} (see the Failures "
            "section of comparison.md and the logs folder)",
            file=sys.stderr,
            flush=True,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(cli())
