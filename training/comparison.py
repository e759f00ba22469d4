"""The comparison of a grid's runs: one table row per run, every value read from the run's own
files (results.json, metrics.csv, the evaluated checkpoint), and the report written from those
rows (training.comparison_report's tables and plots).
"""

from __future__ import annotations

import argparse
import json
import shlex

import checkpoints
from dataio import catalogue
import models
from training import runs
from training.comparison_report import CSV_COLUMNS, format_markdown, write_report
from training.reporting import CATEGORY_KEYS, PRODUCT_KEYS
from training.runs import RunPaths, read_metrics_csv

ZERO_SHOT = "zero-shot"  # the loss column of a zero-shot row


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


def collect_row(point, paths: RunPaths, status: str = "", error: str = "", eval_checkpoint: str = "best") -> dict:
    """One comparison row of ``point`` (a grid point: backbone, loss, sampler), every value read
    from the run's files: results.json (metrics,
    evaluation time, parameters), metrics.csv (training time, best epoch, epochs) and the
    evaluated checkpoint (size, and parameters when results.json lacks them). Missing files
    leave their columns empty (None)."""
    row = empty_row(point, paths.name, status, error)
    checkpoint = paths.checkpoint(eval_checkpoint)
    state = checkpoints.load_checkpoint(checkpoint) if checkpoint.is_file() else None
    # a checkpoint that does not record --select_metric kept best.pth on Recall@1
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
        row["best_epoch"] = runs.best_epoch(history, metric)
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


def empty_row(point, name: str, status: str = "", error: str = "") -> dict:
    row = {c: None for c in CSV_COLUMNS}
    row.update(
        run=name, backbone=point.backbone, loss=point.loss, sampler=point.sampler, status=status, error=error or ""
    )
    return row


def eval_time(results: dict) -> float | None:
    """Seconds evaluate.py spent on the split: embedding extraction plus the exact metrics of
    both protocols (the ``*_s`` entries of results.json's ``timing``)."""
    timing = results.get("timing") or {}
    parts = [
        float(v)
        for k, v in timing.items()
        if k.endswith("_s") and isinstance(v, (int, float)) and not isinstance(v, bool)
    ]
    return sum(parts) if parts else None


def safe_row(point, paths: RunPaths, status: str = "", error: str = "", eval_checkpoint: str = "best") -> dict:
    """collect_row; a run whose files cannot be read gets an empty row naming the error, so that
    a damaged file in one run does not hide the others."""
    try:
        return collect_row(point, paths, status, error, eval_checkpoint)
    except Exception as e:
        return empty_row(point, paths.name, "failed (report)", f"{type(e).__name__}: {e}")


def histories(labelled: dict[str, RunPaths]) -> dict[str, list[dict]]:
    """{label: metrics.csv rows} of the runs that have a metrics.csv (the training curves)."""
    return {
        label: read_metrics_csv(paths.metrics_csv) for label, paths in labelled.items() if paths.metrics_csv.is_file()
    }


def report_notes(args: argparse.Namespace, elapsed: float) -> str:
    """The report's preamble: the command, the data, the shared settings and the time taken."""
    command = getattr(args, "command_line", None)
    return (
        f"Command: `python train_multiple.py {shlex.join(command) if command is not None else '(API call)'}`"
        f"  \nDataset: {args.dataset} ({args.data_root or catalogue.DATASET_ROOTS[args.dataset]}), "
        f"image size {args.image_size}, epochs {args.epochs}, weights {args.weights}; "
        f"evaluated checkpoint: {args.eval_checkpoint}.pth. This invocation took "
        f"{elapsed / 60:.1f} min."
    )


def write_comparison(
    rows: list[dict], curves: dict[str, list[dict]], output, title: str, notes: str, elapsed: float
) -> dict:
    """comparison.md / .csv and the plots under ``output``; prints the summary table. Returns
    write_report's {kind: path}."""
    files = write_report(rows, curves, output, title=title, notes=notes)
    print("\n" + format_markdown(rows).split("## Product protocol")[0].strip(), flush=True)
    print(f"\nwrote {', '.join(str(p) for p in files.values())} ({elapsed / 60:.1f} min)", flush=True)
    return files
