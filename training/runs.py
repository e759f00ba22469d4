"""A training run's files: where they live (RunPaths: checkpoints/<run>/{last,best}.pth,
runs/<run>/ with metrics.csv, args.json, TensorBoard events and eval/results.json), the
checkpoint writes (atomic; best.pth a hard link of last.pth), metrics.csv (written and read back
with pandas), the TensorBoard scalars and embedding projector, and which checkpoint a run
resumes from.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
import json
import math
import os
from pathlib import Path

import numpy as np
import pandas as pd
import torch

import checkpoints
from dataio import catalogue, fileio, photos
import datasets
from training import distributed

# Columns that measure the machine, not the model: they differ between two otherwise identical
# runs (a resumed run and an uninterrupted one agree on every other column).
TIMING_COLUMNS = ("images_per_sec", "epoch_time", "val_time")


class CheckpointWriteError(distributed.TrainingStopped):
    """A checkpoint (or metrics file) could not be written; the previous file is intact."""


_COLUMN_ORDER = (
    "epoch",
    "train_loss",
    "train_valid_triplets",
    "train_active_triplets",
    "val_loss",
    "val_valid_triplets",
    "val_active_triplets",
    "val_recall@1",
    "val_recall@10",
    "val_recall@100",
    "val_recall@1000",
    "val_map@r",
    "val_r_precision",
    "val_cat_recall@1",
    "val_zero_shot_recall@1",
    "val_zero_shot_map@r",
    "lr",
    "train_frozen_steps",
    "bad_images",
    "images",
    *TIMING_COLUMNS,
)


def _columns(history: list[dict]) -> list[str]:
    """metrics.csv's columns: the known ones in a fixed order, then any other sorted."""
    seen = {k for row in history for k in row}
    fixed = [c for c in _COLUMN_ORDER if c in seen]
    return fixed + sorted(seen - set(fixed))


def _atomic_write_text(path: Path, text: str) -> None:
    """fileio.atomic_write_text; a failure stops the run (CheckpointWriteError, exit code 1)."""
    try:
        fileio.atomic_write_text(path, text)
    except (OSError, RuntimeError) as e:
        raise CheckpointWriteError(str(e)) from e


# metrics.csv's line ends: CRLF, the csv module's dialect (RFC 4180).
CSV_LINE_END = "\r\n"


def write_metrics_csv(path: Path, history: list[dict]) -> None:
    """One row per epoch; floats in full precision (repr) so two runs compare exactly; empty
    cells where a value does not exist (the training columns of epoch 0) or is NaN."""
    # dtype object: every cell keeps its Python type, so an int stays "3" (not "3.0") in a
    # column where other rows have no value
    frame = pd.DataFrame(history, columns=_columns(history), dtype=object)
    _atomic_write_text(path, frame.to_csv(index=False, na_rep="", lineterminator=CSV_LINE_END))


def read_metrics_csv(path: str | os.PathLike) -> list[dict]:
    """metrics.csv back as a list of {column: float or None}, exactly (round-trip parsing) and
    whatever columns the file has: a column it lacks is absent from every row."""
    try:
        frame = pd.read_csv(path, dtype=float, float_precision="round_trip")
    except pd.errors.EmptyDataError:  # an empty file: no epoch recorded
        return []
    return [{k: None if math.isnan(v) else v for k, v in row.items()} for row in frame.to_dict("records")]


def log_tensorboard(writer, row: dict) -> None:
    """One metrics.csv row as TensorBoard scalars: train/*, val/*, misc/* (lr, counts, times)."""
    epoch = int(row["epoch"])
    for key, value in row.items():
        if key == "epoch" or value is None or not math.isfinite(value):
            continue
        group, _, name = key.partition("_")
        tag = f"{group}/{name}" if group in ("train", "val") else f"misc/{key}"
        writer.add_scalar(tag, value, epoch)
    writer.flush()


def save_checkpoint(state: dict, path: Path) -> None:
    """checkpoints.atomic_save; a failure stops the run (CheckpointWriteError, exit code 1)."""
    try:
        checkpoints.atomic_save(state, path)
    except (OSError, RuntimeError) as e:
        raise CheckpointWriteError(
            f"{e}\nTraining stopped; the previous {path.name} (if any) is intact: free space or "
            "fix permissions, then rerun with --resume auto"
        ) from e


def link_best(last: Path, best: Path) -> None:
    """best.pth := last.pth without writing the bytes again: a hard link under a temporary name,
    renamed over best.pth (atomic). last.pth is later replaced by a new file (os.replace), which
    leaves this one to best.pth. Falls back to a copy where hard links are not supported."""
    tmp = best.with_name(f".{best.name}.{os.getpid()}.link.tmp")
    try:
        tmp.unlink(missing_ok=True)
        os.link(last, tmp)
        os.replace(tmp, best)
    except OSError:
        tmp.unlink(missing_ok=True)
        save_checkpoint(checkpoints.load_checkpoint(last), best)


def add_projector(
    writer, dataset: datasets.SOPDataset, embeddings: np.ndarray, samples: int, seed: int, epoch: int, thumb: int = 32
) -> None:
    """TensorBoard embedding projector of a seeded sample of validation images: metadata
    (the data's product id and category name) and ``thumb``-pixel thumbnails."""
    n = len(dataset)
    if samples <= 0 or n == 0:
        return
    idx = np.sort(np.random.default_rng(seed).choice(n, size=min(samples, n), replace=False))
    thumbs = []
    for i in idx:
        try:
            img = photos.load_image(dataset.paths[i], size=thumb).resize((thumb, thumb))
            arr = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)
        except Exception:  # a bad image gets a grey tile; it was already counted in training
            arr = torch.full((3, thumb, thumb), 128, dtype=torch.uint8)
        thumbs.append(arr.float() / 255)
    metadata = [[dataset.product_ids[i], dataset.categories[int(dataset.super_ids[i]) - 1]] for i in idx]
    writer.add_embedding(
        torch.from_numpy(np.asarray(embeddings)[idx]),
        metadata=metadata,
        label_img=torch.stack(thumbs),
        global_step=epoch,
        tag="val_embeddings",
        metadata_header=["product_id", "category"],
    )
    writer.flush()


# --select_metric last: best.pth is the last epoch
SELECT_LAST = "last"


def selection_score(row: dict, select_metric: str) -> float:
    """The score best.pth and the LR plateau follow: the row's ``val_<select_metric>``, or the
    epoch number for ``last`` (every epoch beats the one before: best.pth = the last epoch)."""
    return float(row["epoch"]) if select_metric == SELECT_LAST else row[f"val_{select_metric}"]


def best_epoch(history: list[dict], select_metric: str) -> int | None:
    """The epoch best.pth holds after ``history`` (metrics.csv rows): the strictly best
    ``selection_score``, the first of equals (a tie keeps the earlier epoch); None when no row
    has the score."""
    scored = [
        (selection_score(r, select_metric), -int(r["epoch"]))
        for r in history
        if r.get("epoch") is not None and (select_metric == SELECT_LAST or r.get(f"val_{select_metric}") is not None)
    ]
    return -max(scored)[1] if scored else None


def default_run_name(args: argparse.Namespace) -> str:
    """``<data>_<backbone>_<loss>_<sampler>``; ``<data>`` is --dataset, or the folder's name for
    a catalogue of your own (a catalogue.csv or a folder tree at --data_root)."""
    data = args.dataset
    if args.data_root:
        try:
            folder, layout = catalogue.detect_layout(args.data_root)
        except OSError:  # missing: the data step says so with the commands to get it
            folder, layout = None, "sop"
        if layout != "sop":
            data = catalogue.safe_name(folder.name).replace(" ", "_")
    return f"{data}_{args.backbone}_{args.loss}_{args.sampler}"


def resolve_resume(args: argparse.Namespace, ckpt_dir: Path) -> Path | None:
    """The checkpoint --resume names (auto: ``ckpt_dir``/last.pth if it exists; a run folder:
    its last.pth), or None for a new run."""
    if args.resume is None:
        return None
    if args.resume == "auto":
        last = ckpt_dir / "last.pth"
        return last if last.is_file() else None
    path = Path(args.resume)
    return path / "last.pth" if path.is_dir() else path


# The folders that hold every run's folder (train.py --checkpoint_dir / --log_dir defaults).
CHECKPOINT_DIR = "checkpoints"
LOG_DIR = "runs"
# evaluate.py writes a checkpoint's evaluation to <log_dir>/<run>/eval/results.json by default.
EVAL_SUBDIR = "eval"
RESULTS_NAME = "results.json"


@dataclass
class RunPaths:
    """Where a run's files live: checkpoints/<run>/{last,best}.pth and runs/<run>/ (metrics.csv,
    eval/results.json)."""

    name: str
    checkpoint_dir: Path
    log_dir: Path

    @classmethod
    def named(
        cls, name: str, checkpoint_dir: str | os.PathLike = CHECKPOINT_DIR, log_dir: str | os.PathLike = LOG_DIR
    ) -> RunPaths:
        """The run ``name`` under ``checkpoint_dir`` and ``log_dir``."""
        return cls(name, Path(checkpoint_dir) / name, Path(log_dir) / name)

    @classmethod
    def of(cls, args: argparse.Namespace, name: str | None = None) -> RunPaths:
        """The run of train.py's arguments: ``name``, else --run_name, else default_run_name."""
        return cls.named(name or args.run_name or default_run_name(args), args.checkpoint_dir, args.log_dir)

    @classmethod
    def of_checkpoint(cls, checkpoint: str | os.PathLike, log_dir: str | os.PathLike | None = None) -> RunPaths:
        """The run a checkpoint belongs to: the name of its folder, its logs under ``log_dir``
        (the run's --log_dir; default runs)."""
        folder = Path(checkpoint).resolve().parent
        return cls(folder.name, folder, Path(log_dir or LOG_DIR) / folder.name)

    @property
    def last(self) -> Path:
        return self.checkpoint_dir / "last.pth"

    @property
    def best(self) -> Path:
        return self.checkpoint_dir / "best.pth"

    @property
    def metrics_csv(self) -> Path:
        return self.log_dir / "metrics.csv"

    @property
    def eval_dir(self) -> Path:
        return self.log_dir / EVAL_SUBDIR

    @property
    def results(self) -> Path:
        return self.eval_dir / RESULTS_NAME

    def checkpoint(self, which: str) -> Path:
        return self.best if which == "best" else self.last


def open_logs(args: argparse.Namespace, paths: RunPaths, info: dict, start_epoch: int):
    """rank 0: the TensorBoard writer (events after ``start_epoch`` purged), args.json, and
    the run folders, freed of temporary files a killed write left behind."""
    from torch.utils.tensorboard import SummaryWriter  # imported here: slow, rank 0 only

    paths.log_dir.mkdir(parents=True, exist_ok=True)
    # purge_step hides events logged after the checkpoint we start from: those of a killed
    # run's lost epoch, or of an older run this one --overwrite-s (start_epoch 0).
    writer = SummaryWriter(str(paths.log_dir), purge_step=start_epoch)
    text = json.dumps(info, indent=2, default=str)
    _atomic_write_text(paths.log_dir / "args.json", text + "\n")
    writer.add_text("args", "```\n" + text + "\n```", start_epoch)
    paths.checkpoint_dir.mkdir(parents=True, exist_ok=True)
    # A killed run can leave the temporary file of an unfinished atomic write (never a
    # half-written last.pth / best.pth): remove those leftovers, they can be large.
    for stale in paths.checkpoint_dir.glob(".*.pth.*.tmp"):
        print(f"removing {stale} (an interrupted checkpoint write)", flush=True)
        stale.unlink(missing_ok=True)
    return writer
