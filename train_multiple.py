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
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import datasets
from dataio import synthetic_sop

from dataio import catalogue
import losses
import models
import train  # its public parser (and main, for --launcher inprocess): the one entry script reused
from training import evaluation
from training import flags
from training.reporting import (CATEGORY_KEYS, CSV_COLUMNS, PRODUCT_KEYS, format_markdown, run_labels,
                                write_report)
from training.runs import RESULTS_NAME, RunPaths, read_metrics_csv

REPO = Path(__file__).resolve().parent
SEED_BACKBONES = ("efficientnet_b0", "resnet18", "resnet50")

# --quick: defaults for a CPU-only pass over a small synthetic SOP (flags given explicitly still
# win). Random weights need a larger lr than fine-tuning; 48 px crops, 8 x 4 batches and capped
# epochs keep ResNet50 to a few minutes on 2 cores.
QUICK_DATASET = {"root": "data/synthetic_quick", "num_products": 360, "image_size": 64}
QUICK_DEFAULTS = {
    "dataset": "synthetic", "data_root": QUICK_DATASET["root"], "weights": "none",
    "image_size": 48, "batch_size": 32, "epochs": 3, "max_steps_per_epoch": 12, "lr": 1e-3,
    "workers": 1, "projector_samples": 100, "progress": False, "prefix": "quick",
}

# ============ arguments ============

def get_args_parser(add_help: bool = True, train_help: bool = False) -> argparse.ArgumentParser:
    """train.py's parser plus the grid flags. ``train_help``: list train.py's flags in --help
    too (by default they are accepted but not repeated: `python train.py --help` has them)."""
    parent = train.get_args_parser(add_help=False)
    if not train_help:
        for action in parent._actions:
            action.help = argparse.SUPPRESS
    parser = argparse.ArgumentParser(
        "train_multiple.py", add_help=add_help, parents=[parent],
        formatter_class=flags.HelpFormatter, usage="%(prog)s [options] [any train.py option]",
        description="Train and evaluate a grid of backbones x losses x samplers with train.py and "
                    "evaluate.py, then write comparison tables and plots. Every train.py flag "
                    "(python train.py --help) applies to every run; the grid flags are below.")
    # None = "not given": then the plural grid flag (or the original project's three backbones) decides.
    parser.set_defaults(backbone=None, loss=None, sampler=None)

    group = parser.add_argument_group("comparison grid")
    group.add_argument(*flags.flag_names("backbones"), nargs="+", default=None, metavar="NAME",
                       choices=sorted(models.BACKBONES),
                       help=f"backbones to compare ({', '.join(sorted(models.BACKBONES))}); default: "
                            f"--backbone if given, else the original project's {' '.join(SEED_BACKBONES)}")
    group.add_argument(*flags.flag_names("losses"), nargs="+", default=None, metavar="NAME",
                       choices=sorted(losses.LOSSES),
                       help=f"losses to compare ({', '.join(sorted(losses.LOSSES))}); default: --loss, "
                            "else the recipe's")
    group.add_argument(*flags.flag_names("samplers"), nargs="+", default=None, metavar="NAME",
                       choices=list(datasets.BATCH_SAMPLERS),
                       help="batch samplers to compare (random = the original project's batches, pk = "
                            "P x K); default: --sampler, else the recipe's")
    group.add_argument(*flags.flag_names("prefix"), default="cmp",
                       help="run names are <prefix>_<backbone>_<loss>_<sampler> ('quick' with "
                            "--quick)")
    group.add_argument(*flags.flag_names("output"), default=None,
                       help="folder of comparison.md/.csv, plots and logs; default "
                            "<log_dir>/comparison (<log_dir>/comparison_quick with --quick)")

    group = parser.add_argument_group("evaluation and execution")
    group.add_argument(*flags.flag_names("eval_checkpoint"), default="best", choices=["best", "last"],
                       help="checkpoint of each run to evaluate on the test split: best (best "
                            "validation Recall@1, recommended) or last")
    group.add_argument(*flags.flag_names("eval_batch_size"), default=None, type=int,
                       help="batch size of the test-split embedding pass; default --val_batch_size")
    group.add_argument(*flags.flag_names("eval_examples"), default=6, type=int,
                       help="queries shown in each run's eval/retrieval.png (evaluate.py "
                            "--num_examples); 0 = no figure")
    group.add_argument(*flags.flag_names("launcher"), default="subprocess",
                       choices=["subprocess", "inprocess"],
                       help="subprocess: each training / evaluation in its own python process "
                            "(a crash or leak cannot take the others down; recommended for long "
                            "runs); inprocess: call train.main / evaluate in this process")
    group.add_argument("--quick", action="store_true",
                       help="the whole grid on a small synthetic SOP (generated once: "
                            f"{QUICK_DATASET['num_products']} products at "
                            f"{QUICK_DATASET['image_size']} px) on CPU in minutes: "
                            + ", ".join(f"--{k} {v}" for k, v in QUICK_DEFAULTS.items()
                                        if not isinstance(v, bool))
                            + ", --no-progress; explicit flags override these")
    group.add_argument(*flags.flag_names("report_only"), action="store_true",
                       help="train nothing: rebuild comparison.md/.csv and the plots from the "
                            "run folders as they are")
    group.add_argument(*flags.flag_names("dry_run"), action="store_true",
                       help="print each run's state and the commands that would run, then stop")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse ``argv``; with ``--quick`` the QUICK_DEFAULTS replace the parser's defaults, so
    flags given explicitly still win. Out-of-range train.py flags are argparse errors (exit 2)."""
    parser = get_args_parser()
    args = parser.parse_args(argv)
    if args.quick:
        parser.set_defaults(**QUICK_DEFAULTS)
        args = parser.parse_args(argv)
    errors = check_args(args)
    if not errors:
        # train.py's own range checks, per grid point: a mistake shared by every run stops here
        # (exit 2); one that only some runs have (e.g. a batch size P x K cannot split) is
        # reported as those runs' failure while the others run.
        per_point = [set(flags.check_args(train_namespace(args, p))) for p in build_grid(args)]
        errors = sorted(set.intersection(*per_point)) if per_point else []
    if errors:
        parser.error("\n  ".join(errors))
    return args


def check_args(args: argparse.Namespace) -> list[str]:
    """Messages for arguments that make no sense for a grid (empty: all fine)."""
    errors = []
    for single, plural in (("backbone", "backbones"), ("loss", "losses"), ("sampler", "samplers")):
        if getattr(args, single) is not None and getattr(args, plural) is not None:
            errors.append(f"pass either --{single} or --{plural}, not both")
    if args.run_name is not None:
        errors.append(f"--run_name {args.run_name}: run names come from the grid "
                      f"(<prefix>_<backbone>_<loss>_<sampler>); use --prefix instead")
    if args.resume not in (None, "auto"):
        errors.append(f"--resume {args.resume}: runs resume from their own last.pth "
                      "automatically; rerun the same command (no --resume needed)")
    if args.eval_examples < 0:
        errors.append(f"--eval_examples must be >= 0 (got {args.eval_examples})")
    if args.eval_batch_size is not None and args.eval_batch_size < 1:
        errors.append(f"--eval_batch_size must be >= 1 (got {args.eval_batch_size})")
    if not args.prefix or any(c in args.prefix for c in "/\\ "):
        errors.append(f"--prefix {args.prefix!r} must be a non-empty name without slashes or "
                      "spaces")
    return errors


# ============ the grid ============

@dataclass(frozen=True)
class GridPoint:
    backbone: str
    loss: str
    sampler: str

    def run_name(self, prefix: str) -> str:
        return f"{prefix}_{self.backbone}_{self.loss}_{self.sampler}"


def build_grid(args: argparse.Namespace) -> list[GridPoint]:
    """Every (backbone, loss, sampler) combination, backbones outermost, in the order given."""
    recipe = flags.resolve_recipe(args)  # the recipe's loss and sampler when none is given
    backbones = args.backbones or ([args.backbone] if args.backbone else list(SEED_BACKBONES))
    loss_names = args.losses or [recipe.loss]
    samplers = args.samplers or [recipe.sampler]
    grid = []
    for b in dict.fromkeys(backbones):  # dict: drop repeats, keep order
        for loss in dict.fromkeys(loss_names):
            for s in dict.fromkeys(samplers):
                grid.append(GridPoint(b, loss, s))
    return grid


def train_namespace(args: argparse.Namespace, point: GridPoint) -> argparse.Namespace:
    """train.py's arguments for one grid point: every train.py flag as given, the grid point's
    backbone / loss / sampler, its run name, and --resume auto (unless --overwrite)."""
    dests = {a.dest for a in train.get_args_parser(add_help=False)._actions if a.dest != "help"}
    ns = argparse.Namespace(**{k: v for k, v in vars(args).items() if k in dests})
    ns.backbone, ns.loss, ns.sampler = point.backbone, point.loss, point.sampler
    ns.run_name = point.run_name(args.prefix)
    ns.resume = None if args.overwrite else "auto"
    # Resolved here, so that the command line names every recipe value and a run folder made
    # with another recipe is seen as a conflict.
    return flags.resolve_recipe(ns)


def namespace_to_argv(parser: argparse.ArgumentParser, ns: argparse.Namespace,
                      always: tuple[str, ...] = ()) -> list[str]:
    """Command-line flags that make ``parser`` parse back to ``ns``; flags left at their default
    are omitted unless named in ``always``. Raises ValueError for an argument it cannot spell."""
    argv = []
    for action in parser._actions:
        if not action.option_strings or action.dest == "help" or not hasattr(ns, action.dest):
            continue
        value = getattr(ns, action.dest)
        if value == action.default and action.dest not in always:
            continue
        long_flags = [o for o in action.option_strings if o.startswith("--")]
        if isinstance(action, argparse.BooleanOptionalAction):
            argv.append(next(o for o in long_flags if o.startswith("--no-") == (not value)))
        elif isinstance(action, argparse._StoreTrueAction):
            argv.append(long_flags[0])  # value is True here: the default is False
        elif isinstance(action, argparse._StoreAction) and action.nargs is None and value is not None:
            argv += [long_flags[0], str(value)]  # str(float) round-trips exactly
        else:
            raise ValueError(f"cannot pass --{action.dest}={value!r} on a command line "
                             f"({type(action).__name__}); extend namespace_to_argv")
    return argv


# ============ state of a run on disk ============

def run_paths(ns: argparse.Namespace) -> RunPaths:
    return RunPaths.of(ns)


def settings_conflicts(old: dict, new: argparse.Namespace) -> dict:
    """Arguments (other than --epochs and those train.py lets a resumed run change) whose value
    in an existing checkpoint differs from this invocation's: {name: (old, new)}."""
    free = set(flags.RESUME_FREE_ARGS) | {"epochs", "overwrite", "resume"}
    return {k: (old[k], v) for k, v in sorted(vars(new).items())
            if k in old and k not in free and old[k] != v}


def results_checkpoint_matches(results: dict, checkpoint: Path) -> bool:
    """Whether results.json was computed from ``checkpoint`` as it is now: by the sha256 that
    evaluate.py records (model.checkpoint_sha256), else by modification time."""
    recorded = (results.get("model") or {}).get("checkpoint_sha256")
    if isinstance(recorded, str) and recorded:
        return recorded == models.checkpoint_hash(checkpoint)
    try:
        return Path(checkpoint).stat().st_mtime <= Path(results["_path"]).stat().st_mtime
    except (KeyError, OSError):
        return False


def run_state(paths: RunPaths, ns: argparse.Namespace, eval_checkpoint: str = "best") -> tuple[str, str]:
    """(state, detail) of a run on disk:

    new        no last.pth: train from scratch
    resume     last.pth at epoch < --epochs: continue it
    evaluate   trained to --epochs, but results.json is missing or stale: evaluate only
    done       trained to --epochs and evaluated (results.json matches the checkpoint)
    conflict   last.pth is from other settings (or more epochs): not reused
    """
    if getattr(ns, "overwrite", False) or not paths.last.exists():
        return "new", ""
    ckpt = models.load_checkpoint(paths.last)  # CheckpointError for a damaged file: reported
    epoch = int(ckpt.get("epoch") or 0)
    conflicts = settings_conflicts(ckpt.get("args") or {}, ns)
    if conflicts:
        diff = ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in conflicts.items())
        return "conflict", (f"{paths.last} was trained with other settings ({diff}); use another "
                            "--prefix, the original flags, or --overwrite")
    if epoch > ns.epochs:
        return "conflict", (f"{paths.last} is at epoch {epoch} > --epochs {ns.epochs}; pass "
                            f"--epochs {epoch}, another --prefix, or --overwrite")
    if epoch < ns.epochs:
        return "resume", f"at epoch {epoch}/{ns.epochs}"
    checkpoint = paths.checkpoint(eval_checkpoint)
    if not paths.results.is_file() or not checkpoint.is_file():
        return "evaluate", "trained, not evaluated"
    try:
        results = json.loads(paths.results.read_text())
    except (OSError, ValueError):
        return "evaluate", f"{paths.results} unreadable"
    if not results_checkpoint_matches({**results, "_path": str(paths.results)}, checkpoint):
        return "evaluate", f"{paths.results} is not from the current {checkpoint.name}"
    return "done", f"epoch {epoch}/{ns.epochs}, evaluated"


# ============ running train.py / evaluate.py ============

def _tee(src, sinks: list, tail: list, lock: threading.Lock, limit: int = 20000) -> None:
    """Copy a child's pipe to ``sinks`` chunk by chunk (progress bars redraw with \\r, so no
    line buffering) and keep its last ``limit`` characters in ``tail``. ``lock``: stdout's and
    stderr's threads share the log file."""
    for chunk in iter(lambda: src.read1(65536), b""):
        text = chunk.decode("utf-8", errors="replace")
        with lock:
            for sink in sinks:
                sink.write(text)
                sink.flush()
        tail.append(text)
        if sum(map(len, tail)) > 2 * limit:
            tail[:] = ["".join(tail)[-limit:]]


def run_command(cmd: list[str], log_path: Path, echo: bool = True) -> tuple[int, str]:
    """Run ``cmd``; its stdout and stderr go to ``log_path`` (and to ours when ``echo``).
    Returns (exit code, last part of its stderr)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with open(log_path, "w", encoding="utf-8") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
        out_tail: list[str] = []
        err_tail: list[str] = []
        lock = threading.Lock()
        threads = [threading.Thread(target=_tee, args=(proc.stdout, [log] + ([sys.stdout] if echo else []),
                                                       out_tail, lock)),
                   threading.Thread(target=_tee, args=(proc.stderr, [log] + ([sys.stderr] if echo else []),
                                                       err_tail, lock))]
        for t in threads:
            t.start()
        try:
            code = proc.wait()
        except BaseException:  # Ctrl-C: the child got it too; do not leave it behind
            proc.terminate()
            proc.wait()
            raise
        finally:
            for t in threads:
                t.join()
    return code, "".join(err_tail) or "".join(out_tail)


def error_summary(text: str, limit: int = 400) -> str:
    """The informative line of a failed child's output: the last line mentioning an error
    (train.py prints 'error: ...', Python a traceback's last line), else the last line."""
    lines = [seg.strip() for line in text.splitlines() for seg in line.split("\r")]
    lines = [line for line in lines if line]
    if not lines:
        return "no output"
    errorish = [i for i, line in enumerate(lines)
                if re.search(r"error|exception|^\w+\.py: ", line, re.IGNORECASE)]
    pick = lines[errorish[-1]] if errorish else lines[-1]
    return pick if len(pick) <= limit else pick[: limit - 3] + "..."


def eval_options(args: argparse.Namespace, ns: argparse.Namespace, paths: RunPaths) -> dict:
    """Keyword arguments of evaluation.evaluate_checkpoint for one run."""
    return {
        "checkpoint": str(paths.checkpoint(args.eval_checkpoint)),
        "data_root": str(ns.data_root or catalogue.DATASET_ROOTS[ns.dataset]),
        "split": "test",
        "output": str(paths.eval_dir),
        "batch_size": args.eval_batch_size or ns.val_batch_size,
        "workers": ns.workers,
        "device": None if ns.device == "auto" else ns.device,  # evaluate.py: None = auto
        "progress": ns.progress,
        "num_examples": args.eval_examples,
    }


def _evaluate_argv(options: dict) -> list[str]:
    """evaluate.py flags shared by both kinds of evaluation (data, output, loader, device)."""
    argv = ["--data_root", options["data_root"], "--split", options["split"],
            "--output", options["output"], "--batch_size", str(options["batch_size"])]
    if options["workers"] is not None:  # None: evaluate.py's own default (loader_settings)
        argv += ["--workers", str(options["workers"])]
    if options["num_examples"] != 6:  # evaluate.py's default
        argv += ["--num_examples", str(options["num_examples"])]
    if options["device"] is not None:
        argv += ["--device", str(options["device"])]
    if options.get("test_fraction") is not None:  # zero-shot: the grid's; a checkpoint has its own
        argv += ["--test_fraction", str(options["test_fraction"])]
    if not options["progress"]:
        argv.append("--no-progress")
    return argv


def evaluate_command(options: dict) -> list[str]:
    """The evaluate.py command line of ``eval_options``."""
    return [sys.executable, str(REPO / "evaluate.py"), "--checkpoint", options["checkpoint"],
            *_evaluate_argv(options)]


def train_command(ns: argparse.Namespace) -> list[str]:
    return [sys.executable, str(REPO / "train.py"),
            *namespace_to_argv(train.get_args_parser(add_help=False), ns,
                               always=("backbone", "loss", "sampler", "epochs"))]


def launch(launcher: str, cmd: list[str], call, log_path: Path) -> str | None:
    """One step of the grid: ``cmd`` in its own process (output to ``log_path``), or ``call()``
    in this one (--launcher inprocess). None on success, else the error for the table; a
    failure never stops the other runs."""
    if launcher == "subprocess":
        code, tail = run_command(cmd, log_path)
        return None if code == 0 else f"{Path(cmd[1]).name} exited with {code}: {error_summary(tail)}"
    try:
        call()
    except Exception as e:  # reported in the table; the other runs go on
        traceback.print_exc()
        return f"{type(e).__name__}: {e}"
    return None


def run_training(ns: argparse.Namespace, launcher: str, log_path: Path) -> str | None:
    """Train one run; returns None on success, else the error message."""
    return launch(launcher, train_command(ns), lambda: train.main(ns), log_path)


def run_evaluation(options: dict, launcher: str, log_path: Path) -> str | None:
    """Evaluate one run's checkpoint on the test split; None on success, else the error."""
    return launch(launcher, evaluate_command(options), lambda: evaluation.evaluate_checkpoint(**options),
                  log_path)


# ============ zero-shot rows: the pretrained backbone before any training ============

ZERO_SHOT = "zero-shot"  # the loss column of a zero-shot row


def zero_shot_paths(args: argparse.Namespace, backbone: str) -> RunPaths:
    """The zero-shot row's run: ``<prefix>_`` + models.zero_shot_name (the one name of a
    backbone's pretrained features at a size), e.g. cmp_zero_shot_resnet50_224px. The prefix keeps
    grids apart, as it does their trained runs: one grid's data cannot overwrite another's."""
    return RunPaths.of(args, f"{args.prefix}_{models.zero_shot_name(backbone, int(args.image_size))}")


def zero_shot_options(args: argparse.Namespace, backbone: str) -> dict:
    """Keyword arguments of evaluation.evaluate_zero_shot: the backbone's ImageNet features on
    the test split at the grid's image size, written to zero_shot_paths' eval folder."""
    return {"backbone": backbone, "data_root": str(args.data_root or catalogue.DATASET_ROOTS[args.dataset]),
            "image_size": int(args.image_size), "split": "test", "test_fraction": args.test_fraction,
            "output": str(zero_shot_paths(args, backbone).eval_dir),
            "batch_size": args.eval_batch_size or args.val_batch_size, "workers": args.workers,
            "device": None if args.device == "auto" else args.device, "progress": args.progress,
            "num_examples": 0}


def zero_shot_command(options: dict) -> list[str]:
    return [sys.executable, str(REPO / "evaluate.py"), "--zero_shot", "--backbone",
            options["backbone"], "--image_size", str(options["image_size"]), *_evaluate_argv(options)]


def zero_shot_done(options: dict) -> bool:
    """Whether the zero-shot results.json exists for this backbone, image size and data."""
    path = Path(options["output"]) / RESULTS_NAME
    if not path.is_file():
        return False
    try:
        results = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    model, data = results.get("model") or {}, results.get("data") or {}
    return (model.get("backbone") == options["backbone"]
            and model.get("image_size") == options["image_size"]
            and Path(data.get("root", "")).resolve() == catalogue.detect_layout(options["data_root"])[0]
            and data.get("split") == options["split"]
            and data.get("test_fraction") in (None, options.get("test_fraction")))


def run_zero_shot(options: dict, launcher: str, log_path: Path) -> str | None:
    """Evaluate one backbone zero-shot; None on success, else the error message."""
    return launch(launcher, zero_shot_command(options), lambda: evaluation.evaluate_zero_shot(**options),
                  log_path)


# ============ reading a run's files into a table row ============

def training_time(history: list[dict]) -> float | None:
    """Seconds of training as metrics.csv records it: every epoch's epoch_time (its training
    steps and validation) plus epoch 0's validation (val_time)."""
    if not history:
        return None
    total = 0.0
    for row in history:
        key = "val_time" if int(row.get("epoch") or 0) == 0 else "epoch_time"
        if row.get(key) is not None:
            total += float(row[key])
    return total


def best_epoch(history: list[dict], metric: str = "recall@1") -> int | None:
    """Epoch of the best validation ``metric`` (the run's --select_metric); the first of
    equals, as train.py keeps best.pth."""
    key = f"val_{metric}"
    rows = [r for r in history if r.get(key) is not None]
    if not rows:
        return None
    return int(max(rows, key=lambda r: (r[key], -r["epoch"]))["epoch"])


def collect_row(point: GridPoint, paths: RunPaths, status: str = "", error: str = "",
                eval_checkpoint: str = "best") -> dict:
    """One comparison row, every value read from the run's files: results.json (metrics,
    evaluation time, parameters), metrics.csv (training time, best epoch, epochs) and the
    evaluated checkpoint (size, and parameters when results.json lacks them). Missing files
    leave their columns empty (None)."""
    row = empty_row(point, paths.name, status, error)
    checkpoint = paths.checkpoint(eval_checkpoint)
    state = models.load_checkpoint(checkpoint) if checkpoint.is_file() else None
    # checkpoints from before --select_metric chose best.pth on Recall@1
    metric = (state or {}).get("select_metric") or "recall@1"
    if paths.results.is_file():
        results = json.loads(paths.results.read_text())
        for k in PRODUCT_KEYS:
            row[f"product_{k}"] = results.get("product", {}).get(k)
        for k in CATEGORY_KEYS:
            row[f"category_{k}"] = results.get("category", {}).get(k)
        row["num_queries"] = results.get("num_queries")
        for protocol in ("product", "category"):
            row[f"{protocol}_why"] = (results.get(protocol) or {}).get("why")
        row["parameters"] = (results.get("model") or {}).get("parameters")
        row["eval_time_s"] = eval_time(results)
    if paths.metrics_csv.is_file():
        history = read_metrics_csv(paths.metrics_csv)
        row["train_time_s"] = training_time(history)
        row["best_epoch"] = best_epoch(history, metric)
        epochs = [int(r["epoch"]) for r in history if r.get("epoch") is not None]
        row["epochs"] = max(epochs) if epochs else None
        recalls = [r["val_recall@1"] for r in history if r.get("val_recall@1") is not None]
        row["best_val_recall@1"] = max(recalls) if recalls else None
    if state is not None:
        row["checkpoint"] = str(checkpoint)
        row["checkpoint_bytes"] = checkpoint.stat().st_size
        row["checkpoint_epoch"] = state.get("epoch")
        row["weights_bytes"] = weights_bytes(state["model"])
        if row["parameters"] is None:
            row["parameters"] = models.count_parameters(models.load_model(checkpoint))
    return row


def weights_bytes(state_dict: dict) -> int:
    """Bytes of the network's tensors (parameters and buffers): what serving the model needs.
    The checkpoint file is larger once it holds Adam's two moments (every epoch after 0)."""
    return int(sum(t.numel() * t.element_size() for t in state_dict.values() if hasattr(t, "numel")))


def empty_row(point: GridPoint, name: str, status: str = "", error: str = "") -> dict:
    row = {c: None for c in CSV_COLUMNS}
    row.update(run=name, backbone=point.backbone, loss=point.loss, sampler=point.sampler,
               status=status, error=error or "")
    return row


def eval_time(results: dict) -> float | None:
    """Seconds evaluate.py spent on the split: embedding extraction plus the exact metrics of
    both protocols (the ``*_s`` entries of results.json's ``timing``)."""
    timing = results.get("timing") or {}
    parts = [float(v) for k, v in timing.items()
             if k.endswith("_s") and isinstance(v, (int, float)) and not isinstance(v, bool)]
    return sum(parts) if parts else None


# ============ main ============

def _banner(msg: str) -> None:
    print(f"\n============ {msg} ============", flush=True)


def _state_or_none(paths: RunPaths, ns: argparse.Namespace, eval_checkpoint: str) -> str | None:
    try:
        return run_state(paths, ns, eval_checkpoint)[0]
    except Exception:  # unreadable now: evaluate.py will say what is wrong
        return None


def process_run(args: argparse.Namespace, i: int, total: int, ns: argparse.Namespace,
                logs: Path) -> tuple[str, str]:
    """Train and/or evaluate one grid point as its state on disk requires; (status, error) for
    the table. With --dry_run / --report_only only its state (and commands) are printed."""
    paths = run_paths(ns)
    try:
        state, detail = run_state(paths, ns, args.eval_checkpoint)
    except Exception as e:  # e.g. a truncated last.pth: say so, go on with the others
        state, detail = "failed", f"{paths.last}: {type(e).__name__}: {e}"
    if state in ("new", "resume"):
        bad = flags.check_args(ns)
        if bad:
            state, detail = "failed", "bad arguments for this run: " + "; ".join(bad)
    header = f"[{i}/{total}] {paths.name}: {state}" + (f" ({detail})" if detail else "")
    if args.dry_run or args.report_only:
        print(header, flush=True)
        if args.dry_run and state in ("new", "resume"):
            print("  $ " + " ".join(train_command(ns)), flush=True)
        if args.dry_run and state in ("new", "resume", "evaluate"):
            print("  $ " + " ".join(evaluate_command(eval_options(args, ns, paths))), flush=True)
        return ({"done": "done", "new": "not run", "resume": "incomplete",
                 "evaluate": "not evaluated"}.get(state, state),
                detail if state in ("conflict", "failed") else "")
    _banner(header)
    if state in ("conflict", "failed"):
        print(f"skipped: {detail}", flush=True)
        return (state, detail)
    if state == "done":
        return ("skipped (done)", "")
    status = {"new": "trained", "resume": "resumed", "evaluate": "evaluated"}[state]
    if state in ("new", "resume"):
        err = run_training(ns, args.launcher, logs / f"{paths.name}.train.log")
        if err is not None:
            print(f"run {paths.name} failed: {err}", file=sys.stderr, flush=True)
            return ("failed (train)", err)
    if state != "evaluate" and _state_or_none(paths, ns, args.eval_checkpoint) == "done":
        # resumed, but the evaluated checkpoint did not change (results.json matches it)
        return (status, "")
    options = eval_options(args, ns, paths)
    err = run_evaluation(options, args.launcher, logs / f"{paths.name}.eval.log")
    if err is not None:
        print(f"evaluation of {paths.name} failed: {err}", file=sys.stderr, flush=True)
        return ("failed (evaluate)", err)
    return (status, "")


def process_zero_shot(args: argparse.Namespace, grid: list[GridPoint], logs: Path) -> dict:
    """With ImageNet weights, evaluate each backbone of the grid zero-shot (once: reused while
    its results.json matches); {backbone: (status, error)}."""
    zero_shot = {}
    if flags.resolve_recipe(args).weights == "imagenet":
        for backbone in dict.fromkeys(p.backbone for p in grid):
            options = zero_shot_options(args, backbone)
            done = zero_shot_done(options)
            if args.dry_run or args.report_only:
                print(f"{zero_shot_paths(args, backbone).name}: {'done' if done else 'new'}", flush=True)
                if args.dry_run and not done:
                    print("  $ " + " ".join(zero_shot_command(options)), flush=True)
                zero_shot[backbone] = ("done" if done else "not run", "")
                continue
            if done:
                zero_shot[backbone] = ("skipped (done)", "")
                continue
            _banner(f"{zero_shot_paths(args, backbone).name}: zero-shot evaluation")
            err = run_zero_shot(options, args.launcher,
                                logs / f"{zero_shot_paths(args, backbone).name}.eval.log")
            zero_shot[backbone] = ("failed (evaluate)", err) if err else ("evaluated", "")
    return zero_shot


def main(args: argparse.Namespace) -> list[dict]:
    """Run the grid (or only report, with --report_only); returns the comparison rows."""
    errors = check_args(args)
    if errors:
        raise ValueError("\n  ".join(errors))
    grid = build_grid(args)
    output = Path(args.output or Path(args.log_dir) / ("comparison_quick" if args.quick else "comparison"))
    logs = output / "logs"
    start = time.perf_counter()
    plan = [(point, train_namespace(args, point)) for point in grid]
    if (args.quick and args.dataset == "synthetic" and not (args.dry_run or args.report_only)
            and Path(args.data_root or "") == Path(QUICK_DATASET["root"])):
        # train.py would generate its default (larger) synthetic SOP here; the quick one is ours
        _banner(f"synthetic SOP for --quick: {args.data_root}")
        synthetic_sop.ensure_synthetic_sop(args.data_root, num_products=QUICK_DATASET["num_products"],
                                      image_size=QUICK_DATASET["image_size"],
                                      replace=True)  # --quick's own folder
    statuses = {ns.run_name: process_run(args, i, len(plan), ns, logs)
                for i, (_, ns) in enumerate(plan, start=1)}
    zero_shot = process_zero_shot(args, grid, logs)
    if args.dry_run:
        return []
    # ============ comparison tables and plots ============
    rows, histories = [], {}
    for backbone, (status, error) in zero_shot.items():
        point = GridPoint(backbone, ZERO_SHOT, "")
        try:
            rows.append(collect_row(point, zero_shot_paths(args, backbone), status, error))
        except Exception as e:
            rows.append(empty_row(point, zero_shot_paths(args, backbone).name, "failed (report)",
                                  f"{type(e).__name__}: {e}"))
    labels = dict(zip([p.run_name(args.prefix) for p in grid], run_labels(
        [{"backbone": p.backbone, "loss": p.loss, "sampler": p.sampler} for p in grid])))
    for point, ns in plan:
        paths = run_paths(ns)
        status, error = statuses[paths.name]
        try:
            row = collect_row(point, paths, status, error, args.eval_checkpoint)
        except Exception as e:  # a damaged file in one run must not hide the others
            row = empty_row(point, paths.name, "failed (report)", f"{type(e).__name__}: {e}")
        rows.append(row)
        if paths.metrics_csv.is_file():
            histories[labels[paths.name]] = read_metrics_csv(paths.metrics_csv)
    order = {b: i for i, b in enumerate(dict.fromkeys(p.backbone for p in grid))}
    rows.sort(key=lambda r: order.get(r["backbone"], len(order)))  # stable: zero-shot row first
    elapsed = time.perf_counter() - start
    command = getattr(args, "command_line", None)
    notes = (f"Command: `python train_multiple.py {shlex.join(command) if command is not None else '(API call)'}`"
             f"  \nDataset: {args.dataset} ({args.data_root or catalogue.DATASET_ROOTS[args.dataset]}), "
             f"image size {args.image_size}, epochs {args.epochs}, weights {args.weights}; "
             f"evaluated checkpoint: {args.eval_checkpoint}.pth. This invocation took "
             f"{elapsed / 60:.1f} min.")
    files = write_report(rows, histories, output,
                         title="Backbone comparison" + (" (--quick, synthetic data)" if args.quick else ""),
                         notes=notes)
    print("\n" + format_markdown(rows).split("## Product protocol")[0].strip(), flush=True)
    print(f"\nwrote {', '.join(str(p) for p in files.values())} ({elapsed / 60:.1f} min)", flush=True)
    return rows


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
        print(f"error: {len(failed)} run(s) failed: {', '.join(failed)} (see the Failures "
              "section of comparison.md and the logs folder)", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(cli())
