"""A comparison grid of training runs: the grid (backbones x losses x samplers, one train.py run
each, ``<prefix>_<backbone>_<loss>_<sampler>``), the state of each run on disk (new, resume,
evaluate, done, conflict), the train.py / evaluate.py steps that bring it to done (in a child
process, or in this one), the zero-shot rows of pretrained backbones, and the comparison
written at the end (training.comparison). train_multiple.py is its command line.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
import json
from pathlib import Path
import sys
import time
import traceback

import checkpoints
from dataio import catalogue, synthetic_sop
import models
from training import arg_checks, comparison, evaluation, flags, tee
from training.comparison import ZERO_SHOT
from training.comparison_report import run_labels
from training.runs import RESULTS_NAME, RunPaths

REPO = Path(__file__).resolve().parents[1]
SEED_BACKBONES = ("efficientnet_b0", "resnet18", "resnet50")

# --quick: defaults for a CPU-only pass over a small synthetic SOP (flags given explicitly still
# win). Random weights need a larger lr than fine-tuning; 48 px crops, 8 x 4 batches and capped
# epochs keep ResNet50 to a few minutes on 2 cores.
QUICK_DATASET = {"root": "data/synthetic_quick", "num_products": 360, "image_size": 64}
QUICK_DEFAULTS = {
    "dataset": "synthetic",
    "data_root": QUICK_DATASET["root"],
    "weights": "none",
    "image_size": 48,
    "batch_size": 32,
    "epochs": 3,
    "max_steps_per_epoch": 12,
    "lr": 1e-3,
    "workers": 1,
    "projector_samples": 100,
    "progress": False,
    "prefix": "quick",
}


def check_args(args: argparse.Namespace) -> list[str]:
    """Messages for arguments that make no sense for a grid (empty: all fine)."""
    errors = []
    for single, plural in (("backbone", "backbones"), ("loss", "losses"), ("sampler", "samplers")):
        if getattr(args, single) is not None and getattr(args, plural) is not None:
            errors.append(f"pass either --{single} or --{plural}, not both")
    if args.run_name is not None:
        errors.append(
            f"--run_name {args.run_name}: run names come from the grid "
            f"(<prefix>_<backbone>_<loss>_<sampler>); use --prefix instead"
        )
    if args.resume not in (None, "auto"):
        errors.append(
            f"--resume {args.resume}: runs resume from their own last.pth "
            "automatically; rerun the same command (no --resume needed)"
        )
    if args.eval_examples < 0:
        errors.append(f"--eval_examples must be >= 0 (got {args.eval_examples})")
    if args.eval_batch_size is not None and args.eval_batch_size < 1:
        errors.append(f"--eval_batch_size must be >= 1 (got {args.eval_batch_size})")
    if not args.prefix or any(c in args.prefix for c in "/\\ "):
        errors.append(f"--prefix {args.prefix!r} must be a non-empty name without slashes or spaces")
    return errors


# ============ the grid ============


def train_parser() -> argparse.ArgumentParser:
    """train.py's flags (training.flags.add_train_args) on a parser of their own: what a grid
    point's train.py command line may carry."""
    parser = argparse.ArgumentParser("train.py", add_help=False)
    flags.add_train_args(parser)
    return parser


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
    dests = {a.dest for a in train_parser()._actions if a.dest != "help"}
    ns = argparse.Namespace(**{k: v for k, v in vars(args).items() if k in dests})
    ns.backbone, ns.loss, ns.sampler = point.backbone, point.loss, point.sampler
    ns.run_name = point.run_name(args.prefix)
    ns.resume = None if args.overwrite else "auto"
    # Resolved here, so that the command line names every recipe value and a run folder made
    # with another recipe is seen as a conflict.
    return flags.resolve_recipe(ns)


def namespace_to_argv(
    parser: argparse.ArgumentParser, ns: argparse.Namespace, always: tuple[str, ...] = ()
) -> list[str]:
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
            raise ValueError(
                f"cannot pass --{action.dest}={value!r} on a command line "
                f"({type(action).__name__}); extend namespace_to_argv"
            )
    return argv


# ============ state of a run on disk ============


def run_paths(ns: argparse.Namespace) -> RunPaths:
    return RunPaths.of(ns)


def settings_conflicts(old: dict, new: argparse.Namespace) -> dict:
    """Arguments (other than --epochs and those train.py lets a resumed run change) whose value
    in an existing checkpoint differs from this invocation's: {name: (old, new)}."""
    free = set(flags.RESUME_FREE_ARGS) | {"epochs", "overwrite", "resume"}
    return {k: (old[k], v) for k, v in sorted(vars(new).items()) if k in old and k not in free and old[k] != v}


def results_checkpoint_matches(results: dict, checkpoint: Path) -> bool:
    """Whether results.json was computed from ``checkpoint`` as it is now: by the sha256 that
    evaluate.py records (model.checkpoint_sha256), else by modification time."""
    recorded = (results.get("model") or {}).get("checkpoint_sha256")
    if isinstance(recorded, str) and recorded:
        return recorded == checkpoints.checkpoint_hash(checkpoint)
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
    ckpt = checkpoints.load_checkpoint(paths.last)  # CheckpointError for a damaged file: reported
    epoch = int(ckpt.get("epoch") or 0)
    conflicts = settings_conflicts(ckpt.get("args") or {}, ns)
    if conflicts:
        diff = ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in conflicts.items())
        return "conflict", (
            f"{paths.last} was trained with other settings ({diff}); use another "
            "--prefix, the original flags, or --overwrite"
        )
    if epoch > ns.epochs:
        return "conflict", (
            f"{paths.last} is at epoch {epoch} > --epochs {ns.epochs}; pass "
            f"--epochs {epoch}, another --prefix, or --overwrite"
        )
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
    argv = [
        "--data_root",
        options["data_root"],
        "--split",
        options["split"],
        "--output",
        options["output"],
        "--batch_size",
        str(options["batch_size"]),
    ]
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
    return [sys.executable, str(REPO / "evaluate.py"), "--checkpoint", options["checkpoint"], *_evaluate_argv(options)]


def train_command(ns: argparse.Namespace) -> list[str]:
    return [
        sys.executable,
        str(REPO / "train.py"),
        *namespace_to_argv(train_parser(), ns, always=("backbone", "loss", "sampler", "epochs")),
    ]


def launch(launcher: str, cmd: list[str], call, log_path: Path) -> str | None:
    """One step of the grid: ``cmd`` in its own process (output to ``log_path``), or ``call()``
    in this one (--launcher inprocess). None on success, else the error for the table; a
    failure never stops the other runs."""
    if launcher == "subprocess":
        code, tail = tee.run_command(cmd, log_path)
        return None if code == 0 else f"{Path(cmd[1]).name} exited with {code}: {tee.error_summary(tail)}"
    try:
        call()
    except Exception as e:  # reported in the table; the other runs go on
        traceback.print_exc()
        return f"{type(e).__name__}: {e}"
    return None


def run_training(ns: argparse.Namespace, launcher: str, log_path: Path, train_main) -> str | None:
    """Train one run (``train_main``: train.py's main, for --launcher inprocess); returns None on
    success, else the error message."""
    return launch(launcher, train_command(ns), lambda: train_main(ns), log_path)


def run_evaluation(options: dict, launcher: str, log_path: Path) -> str | None:
    """Evaluate one run's checkpoint on the test split; None on success, else the error."""
    return launch(launcher, evaluate_command(options), lambda: evaluation.evaluate_checkpoint(**options), log_path)


# ============ zero-shot rows: the pretrained backbone before any training ============


def zero_shot_paths(args: argparse.Namespace, backbone: str) -> RunPaths:
    """The zero-shot row's run: ``<prefix>_`` + models.zero_shot_name (the one name of a
    backbone's pretrained features at a size), e.g. cmp_zero_shot_resnet50_224px. The prefix keeps
    grids apart, as it does their trained runs: one grid's data cannot overwrite another's."""
    return RunPaths.of(args, f"{args.prefix}_{models.zero_shot_name(backbone, int(args.image_size))}")


def zero_shot_options(args: argparse.Namespace, backbone: str) -> dict:
    """Keyword arguments of evaluation.evaluate_zero_shot: the backbone's ImageNet features on
    the test split at the grid's image size, written to zero_shot_paths' eval folder."""
    return {
        "backbone": backbone,
        "data_root": str(args.data_root or catalogue.DATASET_ROOTS[args.dataset]),
        "image_size": int(args.image_size),
        "split": "test",
        "test_fraction": args.test_fraction,
        "output": str(zero_shot_paths(args, backbone).eval_dir),
        "batch_size": args.eval_batch_size or args.val_batch_size,
        "workers": args.workers,
        "device": None if args.device == "auto" else args.device,
        "progress": args.progress,
        "num_examples": 0,
    }


def zero_shot_command(options: dict) -> list[str]:
    return [
        sys.executable,
        str(REPO / "evaluate.py"),
        "--zero_shot",
        "--backbone",
        options["backbone"],
        "--image_size",
        str(options["image_size"]),
        *_evaluate_argv(options),
    ]


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
    return (
        model.get("backbone") == options["backbone"]
        and model.get("image_size") == options["image_size"]
        and Path(data.get("root", "")).resolve() == catalogue.detect_layout(options["data_root"])[0]
        and data.get("split") == options["split"]
        and data.get("test_fraction") in (None, options.get("test_fraction"))
    )


def run_zero_shot(options: dict, launcher: str, log_path: Path) -> str | None:
    """Evaluate one backbone zero-shot; None on success, else the error message."""
    return launch(launcher, zero_shot_command(options), lambda: evaluation.evaluate_zero_shot(**options), log_path)


# ============ main ============


def _banner(msg: str) -> None:
    print(f"\n============ {msg} ============", flush=True)


def _state_or_none(paths: RunPaths, ns: argparse.Namespace, eval_checkpoint: str) -> str | None:
    try:
        return run_state(paths, ns, eval_checkpoint)[0]
    except Exception:  # unreadable now: evaluate.py will say what is wrong
        return None


def process_run(
    args: argparse.Namespace, i: int, total: int, ns: argparse.Namespace, logs: Path, train_main
) -> tuple[str, str]:
    """Train and/or evaluate one grid point as its state on disk requires; (status, error) for
    the table. With --dry_run / --report_only only its state (and commands) are printed."""
    paths = run_paths(ns)
    try:
        state, detail = run_state(paths, ns, args.eval_checkpoint)
    except Exception as e:  # e.g. a truncated last.pth: say so, go on with the others
        state, detail = "failed", f"{paths.last}: {type(e).__name__}: {e}"
    if state in ("new", "resume"):
        bad = arg_checks.check_args(ns)
        if bad:
            state, detail = "failed", "bad arguments for this run: " + "; ".join(bad)
    header = f"[{i}/{total}] {paths.name}: {state}" + (f" ({detail})" if detail else "")
    if args.dry_run or args.report_only:
        print(header, flush=True)
        if args.dry_run and state in ("new", "resume"):
            print("  $ " + " ".join(train_command(ns)), flush=True)
        if args.dry_run and state in ("new", "resume", "evaluate"):
            print("  $ " + " ".join(evaluate_command(eval_options(args, ns, paths))), flush=True)
        return (
            {"done": "done", "new": "not run", "resume": "incomplete", "evaluate": "not evaluated"}.get(state, state),
            detail if state in ("conflict", "failed") else "",
        )
    _banner(header)
    if state in ("conflict", "failed"):
        print(f"skipped: {detail}", flush=True)
        return (state, detail)
    if state == "done":
        return ("skipped (done)", "")
    status = {"new": "trained", "resume": "resumed", "evaluate": "evaluated"}[state]
    if state in ("new", "resume"):
        err = run_training(ns, args.launcher, logs / f"{paths.name}.train.log", train_main)
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
            err = run_zero_shot(options, args.launcher, logs / f"{zero_shot_paths(args, backbone).name}.eval.log")
            zero_shot[backbone] = ("failed (evaluate)", err) if err else ("evaluated", "")
    return zero_shot


def output_folder(args: argparse.Namespace) -> Path:
    """--output, else <log_dir>/comparison (<log_dir>/comparison_quick with --quick)."""
    return Path(args.output or Path(args.log_dir) / ("comparison_quick" if args.quick else "comparison"))


def ensure_quick_data(args: argparse.Namespace) -> None:
    """--quick's own synthetic SOP (train.py would generate its default, larger one)."""
    if (
        args.quick
        and args.dataset == "synthetic"
        and not (args.dry_run or args.report_only)
        and Path(args.data_root or "") == Path(QUICK_DATASET["root"])
    ):
        _banner(f"synthetic SOP for --quick: {args.data_root}")
        synthetic_sop.ensure_synthetic_sop(
            args.data_root,
            num_products=QUICK_DATASET["num_products"],
            image_size=QUICK_DATASET["image_size"],
            replace=True,
        )  # --quick's own folder


def comparison_rows(
    args: argparse.Namespace, plan: list[tuple[GridPoint, argparse.Namespace]], statuses: dict, zero_shot: dict
) -> tuple[list[dict], dict[str, list[dict]]]:
    """(table rows: the zero-shot rows, then the runs, backbones in grid order; {label: metrics.csv
    rows} of the trained runs)."""
    rows = [
        comparison.safe_row(GridPoint(backbone, ZERO_SHOT, ""), zero_shot_paths(args, backbone), status, error)
        for backbone, (status, error) in zero_shot.items()
    ]
    grid = [point for point, _ in plan]
    labels = dict(
        zip(
            [p.run_name(args.prefix) for p in grid],
            run_labels([{"backbone": p.backbone, "loss": p.loss, "sampler": p.sampler} for p in grid]),
        )
    )
    for point, ns in plan:
        paths = run_paths(ns)
        rows.append(comparison.safe_row(point, paths, *statuses[paths.name], args.eval_checkpoint))
    curves = comparison.histories({labels[run_paths(ns).name]: run_paths(ns) for _, ns in plan})
    order = {b: i for i, b in enumerate(dict.fromkeys(p.backbone for p in grid))}
    rows.sort(key=lambda r: order.get(r["backbone"], len(order)))  # stable: zero-shot row first
    return rows, curves


def run_grid(args: argparse.Namespace, train_main) -> list[dict]:
    """Run the grid (or only report, with --report_only); returns the comparison rows.
    ``train_main``: train.py's main, called for each run with --launcher inprocess."""
    errors = check_args(args)
    if errors:
        raise ValueError("\n  ".join(errors))
    output = output_folder(args)
    logs = output / "logs"
    start = time.perf_counter()
    grid = build_grid(args)
    plan = [(point, train_namespace(args, point)) for point in grid]
    ensure_quick_data(args)
    statuses = {
        ns.run_name: process_run(args, i, len(plan), ns, logs, train_main) for i, (_, ns) in enumerate(plan, start=1)
    }
    zero_shot = process_zero_shot(args, grid, logs)
    if args.dry_run:
        return []
    rows, curves = comparison_rows(args, plan, statuses, zero_shot)
    elapsed = time.perf_counter() - start
    title = "Backbone comparison" + (" (--quick, synthetic data)" if args.quick else "")
    comparison.write_comparison(rows, curves, output, title, comparison.report_notes(args, elapsed), elapsed)
    return rows
