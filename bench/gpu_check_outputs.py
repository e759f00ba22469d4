"""Judging bench/gpu_check.py's training runs by their outputs: metrics.csv rows compared cell by
cell, finite losses, the optimizer steps a GradScaler let through, the issue's throughput targets,
and the report's strict JSON. Pure functions of rows, dicts and files already written.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

# The targets (the same numbers as bench_throughput.TARGETS); recorded, not asserted.
# They are defined for EfficientNet-B0 at 224 px with AMP on CUDA.
TARGET_EXTRACT_IMAGES_PER_S = 3000.0
TARGET_TRAIN_VS_CEILING = 0.8


def read_csv_rows(path) -> list[dict]:
    """metrics.csv as a list of {column: cell string} (cells compared as written: train.py
    writes floats with repr, so equal strings are equal floats)."""
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def metrics_differences(rows_a: list[dict], rows_b: list[dict], ignore=()) -> list[str]:
    """What differs between two metrics tables, leaving out the ``ignore`` columns (the timing
    columns); an empty list means equal."""
    ignore = set(ignore)
    diffs = []
    if len(rows_a) != len(rows_b):
        diffs.append(f"row count {len(rows_a)} vs {len(rows_b)}")
    cols_a = {c for row in rows_a for c in row} - ignore
    cols_b = {c for row in rows_b for c in row} - ignore
    if cols_a != cols_b:
        diffs.append(f"columns only in a: {sorted(cols_a - cols_b)}, only in b: {sorted(cols_b - cols_a)}")
    for i, (a, b) in enumerate(zip(rows_a, rows_b)):
        for col in sorted(cols_a & cols_b):
            if a.get(col) != b.get(col):
                diffs.append(f"row {i} (epoch {a.get('epoch')}) {col}: {a.get(col)!r} vs {b.get(col)!r}")
    return diffs


def finite(cell) -> bool:
    try:
        return math.isfinite(float(cell))
    except (TypeError, ValueError):
        return False


def loss_problems(rows: list[dict]) -> list[str]:
    """Loss cells that are not finite numbers: val_loss in every row, train_loss in every row
    after epoch 0 (epoch 0 is the validation before training: its training cells are empty).
    A table without a val_loss column (Proxy-Anchor: validation products have no proxy) is
    checked on train_loss alone."""
    problems = []
    if not rows:
        return ["metrics.csv has no rows"]
    val = ["val_loss"] if any("val_loss" in row for row in rows) else []
    for row in rows:
        wanted = val + (["train_loss"] if str(row.get("epoch")) not in ("0", "0.0") else [])
        for col in wanted:
            if not finite(row.get(col)):
                problems.append(f"epoch {row.get('epoch')} {col} = {row.get(col)!r}")
    return problems


def epochs_of(rows: list[dict]) -> list[int]:
    return [int(float(r["epoch"])) for r in rows]


def optimizer_steps(optimizer_state: dict | None) -> int | None:
    """Optimizer steps actually taken: Adam's per-parameter ``step`` count (GradScaler.step
    skips optimizer.step when the scaled gradients overflowed, so this counts what it let
    through); the maximum over parameters."""
    state = (optimizer_state or {}).get("state") or {}
    steps = [float(s["step"]) for s in state.values() if isinstance(s, dict) and "step" in s]
    return int(max(steps)) if steps else None


def scheduled_steps(rows: list[dict], batch_size: int, world_size: int = 1) -> int:
    """Training steps the epochs ran: the ``images`` column (all ranks) / (batch x ranks)."""
    images = sum(float(r["images"]) for r in rows if finite(r.get("images")))
    return int(round(images / (batch_size * world_size)))


def target_report(bench: dict, backbone: str, image_size: int, cuda: bool) -> dict:
    """The issue's targets against the bench figures; ``met`` is None where the target does not
    apply (another backbone or size, no CUDA) or the figure is missing."""
    applies = cuda and backbone == "efficientnet_b0" and image_size == 224

    def one(key, target, what):
        value = bench.get(key)
        met = (value >= target) if applies and isinstance(value, (int, float)) else None
        return {"what": what, "target": f">= {target:g}", "value": value, "met": met}

    out = {
        "extract_images_per_s": one(
            "extract_images_per_s",
            TARGET_EXTRACT_IMAGES_PER_S,
            "EfficientNet-B0 extraction, 224 px, AMP, JPEG files on disk",
        ),
        "train_vs_ceiling": one(
            "train_vs_ceiling",
            TARGET_TRAIN_VS_CEILING,
            "training fed by the real loader / training on an in-memory batch",
        ),
    }
    if not applies:
        out["note"] = (
            "targets are defined for efficientnet_b0 at 224 px on CUDA; "
            f"this run: {backbone} at {image_size} px, {'CUDA' if cuda else 'no CUDA'}"
        )
    return out


def json_safe(obj):
    """NaN / inf become None (JSON has no such numbers); Paths become strings."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj
