"""The range checks of train.py's arguments that need no data, on the recipe-resolved namespace
(training.flags): ``check_args`` lists what is out of range and ``validate_args`` turns that into
argparse errors (exit code 2).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch

import models
from training import flags


def failed(checks: list[tuple[bool, str]]) -> list[str]:
    """The messages of the (ok, message) checks that are not ok, in order."""
    return [msg for ok, msg in checks if not ok]


def check_optimisation(args: argparse.Namespace) -> list[str]:
    """Learning rates, margin, warm-up, weight decay and the plateau schedule."""
    errors = failed(
        [
            (
                args.lr > 0 and math.isfinite(args.lr),
                f"--lr must be a finite number > 0 (got {args.lr}); recommended 1e-4 (fine-tuning)",
            ),
            (
                args.margin is None or (args.margin > 0 and math.isfinite(args.margin)),
                f"--margin must be > 0 (got {args.margin}); leave it out for the loss's own default",
            ),
            (
                args.head_lr_mult > 0 and math.isfinite(args.head_lr_mult),
                f"--head_lr_mult must be a finite number > 0 (got {args.head_lr_mult}); 1 = the backbone's lr",
            ),
            (
                args.proxy_lr_mult > 0 and math.isfinite(args.proxy_lr_mult),
                f"--proxy_lr_mult must be a finite number > 0 (got {args.proxy_lr_mult}); recommended 100",
            ),
            (
                args.warmup_epochs >= 0 and math.isfinite(args.warmup_epochs),
                f"--warmup_epochs must be a finite number >= 0 (got {args.warmup_epochs}); 0 = no "
                "warm-up, 0.5 = half an epoch, 1 = one epoch",
            ),
        ]
    )
    return (
        errors
        + check_head_init(args)
        + failed(
            [
                (args.weight_decay >= 0, f"--weight_decay must be >= 0 (got {args.weight_decay}); recommended 1e-5"),
                (0 < args.lr_factor < 1, f"--lr_factor must be in (0, 1) (got {args.lr_factor}); recommended 0.5"),
                (args.lr_patience >= 0, f"--lr_patience must be >= 0 (got {args.lr_patience})"),
            ]
        )
    )


def check_head_init(args: argparse.Namespace) -> list[str]:
    """A PCA-initialised head: enough images, a head it can initialise, weights it may replace."""
    if not args.head_init.startswith("pca"):
        return []
    return failed(
        [
            (
                args.pca_images >= args.embedding_size,
                f"--pca_images must be >= --embedding_size ({args.embedding_size}) for --head_init "
                f"{args.head_init} (got {args.pca_images}); recommended 4096",
            ),
            (
                args.head != "mlp" or 2 * args.embedding_size <= models.HEAD_HIDDEN,
                f"--head_init {args.head_init} with the mlp head needs --embedding_size <= "
                f"{models.HEAD_HIDDEN // 2} (got {args.embedding_size}); or use --head linear",
            ),
            (
                args.weights in ("imagenet", "none"),
                f"--head_init {args.head_init} would replace the head of --weights {args.weights}; "
                "use --head_init random to keep it",
            ),
        ]
    )


def check_data_and_model(args: argparse.Namespace) -> list[str]:
    """Split fractions, epochs and the network's sizes."""
    return failed(
        [
            (
                0 < args.val_fraction < 1,
                f"--val_fraction must be in (0, 1) (got {args.val_fraction}); "
                "recommended 0.1, 0.2 for a catalogue of a few hundred products",
            ),
            (
                0 <= args.test_fraction < 1,
                f"--test_fraction must be in [0, 1) (got {args.test_fraction}); "
                "0 trains on every product (no test split)",
            ),
            (args.epochs >= 0, f"--epochs must be >= 0 (got {args.epochs}); 0 only validates"),
            (args.embedding_size >= 1, f"--embedding_size must be >= 1 (got {args.embedding_size}); recommended 128"),
            (0 <= args.dropout < 1, f"--dropout must be in [0, 1) (got {args.dropout})"),
            (0 <= args.target_fmr < 1, f"--target_fmr must be in [0, 1) (got {args.target_fmr}); 0: no threshold"),
            (args.image_size >= 32, f"--image_size must be >= 32 (got {args.image_size}); 224 for real runs"),
        ]
    )


def check_batches(args: argparse.Namespace) -> list[str]:
    """P x K batches, the loaders and the steps of an epoch."""
    pk_shape = (
        args.sampler != "pk"
        or args.images_per_class < 2
        or args.batch_size < 2
        or (args.batch_size % args.images_per_class == 0 and args.batch_size // args.images_per_class >= 2)
    )
    return failed(
        [
            (
                args.images_per_class >= 2,
                f"--images_per_class must be >= 2 (got "
                f"{args.images_per_class}): an anchor needs a positive of its own product",
            ),
            (args.batch_size >= 2, f"--batch_size must be >= 2 (got {args.batch_size})"),
            (
                pk_shape,
                f"--batch_size ({args.batch_size}) must be a multiple of --images_per_class "
                f"({args.images_per_class}) holding at least 2 products, e.g. "
                f"{16 * args.images_per_class} = 16 products x {args.images_per_class} images",
            ),
            (args.val_batch_size >= 1, f"--val_batch_size must be >= 1 (got {args.val_batch_size})"),
            (args.workers is None or args.workers >= 0, f"--workers must be >= 0 (got {args.workers})"),
            (args.projector_samples >= 0, f"--projector_samples must be >= 0 (got {args.projector_samples})"),
            (
                args.max_steps_per_epoch is None or args.max_steps_per_epoch >= 1,
                f"--max_steps_per_epoch must be >= 1 (got {args.max_steps_per_epoch})",
            ),
        ]
    )


def check_device_and_files(args: argparse.Namespace) -> list[str]:
    """The device exists on this machine; --resume and --weights name files that exist."""
    errors = []
    device = str(args.device)
    if device not in ("auto", "cpu", "mps") and not (device == "cuda" or device.startswith("cuda:")):
        errors.append(f"--device must be auto, cpu, cuda, cuda:N or mps (got {device!r})")
    elif device.startswith("cuda") and not torch.cuda.is_available():
        errors.append(f"--device {device}: CUDA is not available on this machine; use --device cpu or auto")
    if args.resume not in (None, "auto"):
        path = Path(args.resume)
        if not (path.is_file() or (path.is_dir() and (path / "last.pth").is_file())):
            errors.append(
                f"--resume {args.resume}: no such checkpoint (nor a run folder holding "
                "last.pth); pass a .pth file, a checkpoints/<run> folder, or 'auto'"
            )
    if args.weights not in ("imagenet", "none") and not Path(args.weights).is_file():
        errors.append(
            f"--weights {args.weights}: no such file; use imagenet, none or the path of a checkpoint / state dict"
        )
    return errors


def check_args(args: argparse.Namespace) -> list[str]:
    """Range checks that need no data (on the recipe-resolved arguments); returns one message
    per violation (empty: all fine)."""
    args = flags.resolve_recipe(args)
    return check_optimisation(args) + check_data_and_model(args) + check_batches(args) + check_device_and_files(args)


def validate_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """argparse-level errors (exit code 2) for every out-of-range argument."""
    errors = check_args(args)
    if errors:
        parser.error("\n  ".join(errors))
