"""Assembling a training run: the data (splits, samplers, loaders, the fixed validation-loss
batches), the model, loss, optimizer (one parameter group each for backbone, head and loss),
plateau scheduler and gradient scaler, the head's PCA initialisation, and resuming: which
checkpoint (read_resume) and restoring all of it from there.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
import math
from pathlib import Path
import time

import numpy as np
import torch
from torch.utils.data import DataLoader

import checkpoints
from dataio import catalogue, synthetic_sop
import datasets
import extraction
import loaders
import losses
import models
import preprocessing
import samplers
from training import distributed, flags, runs


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
    steps: int  # optimizer steps per epoch
    val_loss_batches: list  # fixed P x K batches of the validation loss


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


def read_resume(args: argparse.Namespace, paths: runs.RunPaths, rank: int) -> tuple[dict | None, Path | None]:
    """(checkpoint, its path) to resume from, or (None, None) for a new run; refuses to start
    over an existing run without --resume auto or --overwrite."""
    resume_path = runs.resolve_resume(args, paths.checkpoint_dir)
    if resume_path is None:
        if args.resume == "auto":
            distributed.rank0_print(rank, f"--resume auto: no {paths.last} yet, starting a new run")
        elif paths.last.exists() and not args.overwrite:
            raise flags.ArgumentCheckError(
                f"{paths.last} exists: pass --resume auto to continue that run, --run_name NAME "
                "to start another, or --overwrite to replace it"
            )
        return None, None
    ckpt = checkpoints.load_checkpoint(resume_path)
    distributed.rank0_print(rank, f"resuming from {resume_path} (finished epoch {ckpt['epoch']})")
    old = ckpt.get("args") or {}
    changed = {
        k: (old[k], v) for k, v in vars(args).items() if k in old and old[k] != v and k not in flags.RESUME_FREE_ARGS
    }
    if changed:
        diff = ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in sorted(changed.items()))
        distributed.rank0_print(rank, f"warning: arguments differ from the checkpoint's run (now used: right): {diff}")
    return ckpt, resume_path


# Below these, validation R@1 saturates at epoch 0 on real photos (96.5% with 2 products, 99.7%
# with 4) and best.pth / the plateau follow the noise of a handful of queries.
MIN_VAL_PRODUCTS, MIN_VAL_QUERIES = 20, 100


def validation_size(class_ids) -> tuple[int, int]:
    """(products, queries) of a split: a query is an image whose product has another image."""
    counts = np.unique(np.asarray(class_ids), return_counts=True)[1]
    return len(counts), int(counts[counts >= 2].sum())


def check_validation_split(args: argparse.Namespace, class_ids, rank: int) -> None:
    """Warn (once, and in args.json as ``val_warning``) when the validation split can hardly
    select: fewer than MIN_VAL_PRODUCTS products or MIN_VAL_QUERIES queries. Without a single
    query it cannot select at all: --select_metric becomes 'last' (best.pth = the last epoch)."""
    products, queries = validation_size(class_ids)
    if queries == 0:
        warning = (
            f"the validation split ({products} products) has no query (no product with two "
            f"images): best.pth will be the last epoch (--select_metric {flags.SELECT_LAST}) "
            f"and the LR plateau is off; raise --val_fraction (now {args.val_fraction}) to "
            f"select on validation"
        )
        args.select_metric = flags.SELECT_LAST
    elif products < MIN_VAL_PRODUCTS or queries < MIN_VAL_QUERIES:
        warning = (
            f"the validation split has {products} products and {queries} queries (fewer than "
            f"{MIN_VAL_PRODUCTS} / {MIN_VAL_QUERIES}): its metrics can hardly choose best.pth "
            f"or drive the LR plateau. Raise --val_fraction (now {args.val_fraction}), or pass "
            f"--select_metric {flags.SELECT_LAST} to keep the last epoch"
        )
    else:
        return
    distributed.rank0_print(rank, f"warning: {warning}")
    args.val_warning = warning


def ensure_synthetic(args: argparse.Namespace, root: Path, rank: int, world: int) -> None:
    """--dataset synthetic: rank 0 generates the synthetic SOP at ``root`` when it is absent or
    empty; every rank waits for it."""
    if args.dataset != "synthetic":
        return
    # Generate only when absent or empty: anything there (a synthetic SOP made with other
    # settings, a catalogue of another layout) is the user's choice and is read as it is.
    if rank == 0 and not (root.is_dir() and any(root.iterdir())):
        distributed.rank0_print(rank, f"generating the synthetic SOP in {root} (once; a minute or two)")
        synthetic_sop.ensure_synthetic_sop(root)
    distributed.barrier(world)


def read_splits(
    args: argparse.Namespace, root: Path, image_size: int
) -> tuple[datasets.SOPDataset, datasets.SOPDataset]:
    """(train, val) datasets of --train_split / --val_split with their transforms; a data error
    stops the run (TrainingStopped) with what to do."""
    try:
        splits = datasets.split_options(vars(args))
        train_set = datasets.SOPDataset(
            root, args.train_split, **splits, transform=preprocessing.build_transform(image_size, train=True)
        )
        val_set = datasets.SOPDataset(
            root, args.val_split, **splits, transform=preprocessing.build_transform(image_size, train=False)
        )
    except (FileNotFoundError, NotADirectoryError, ValueError, catalogue.DatasetError) as e:
        hint = (
            " To try the pipeline offline, train on the synthetic stand-in: --dataset synthetic"
            if args.dataset == "stanford"
            else ""
        )
        raise distributed.TrainingStopped(f"{e}{hint}") from e
    return train_set, val_set


def train_batch_sampler(args: argparse.Namespace, train_set: datasets.SOPDataset, root: Path, rank: int, world: int):
    """--sampler's batch sampler over the train split, sharded over ``world`` ranks; records the
    K it uses (``args.images_per_class_used``, and ``args.pk_batches`` when K was fitted)."""
    try:  # K against the products' image counts, P against the number of products
        k, note = (
            samplers.fit_images_per_class(train_set.class_ids, args.batch_size, args.images_per_class)
            if args.sampler == "pk"
            else (args.images_per_class, None)
        )
        train_sampler = samplers.build_batch_sampler(
            args.sampler,
            train_set.class_ids,
            batch_size=args.batch_size,
            images_per_class=k,
            seed=args.seed,
            num_replicas=world,
            rank=rank,
        )
    except ValueError as e:
        raise flags.ArgumentCheckError(f"--sampler {args.sampler} on {root} ({args.train_split} split): {e}") from e
    if note:  # recorded in args.json and the checkpoint's args beside the flag as given
        distributed.rank0_print(rank, f"note: {note}")
        args.pk_batches = note
    args.images_per_class_used = k
    return train_sampler


def val_loss_batches(args: argparse.Namespace, val_set: datasets.SOPDataset) -> list[list[int]]:
    """Validation loss: the criterion on fixed P x K batches of the validation embeddings (the
    same batches every epoch, so the curve moves only with the model)."""
    val_counts = np.unique(val_set.class_ids, return_counts=True)[1]
    val_k = max(2, min(args.images_per_class, int(val_counts.max())))
    val_sampler = samplers.PKSampler(
        val_set.class_ids, k=val_k, seed=args.seed, p=max(1, min(args.batch_size // val_k, len(val_counts)))
    )
    return val_sampler.batches(epoch=0)


def build_data(args: argparse.Namespace, image_size: int, device: torch.device, rank: int, world: int) -> Data:
    """The run's splits (the synthetic SOP generated first when absent), its batch sampler
    (sharded over ``world`` ranks), loaders and the fixed batches of the validation loss."""
    root = Path(args.data_root or catalogue.DATASET_ROOTS[args.dataset])
    catalogue.set_verbose(args.verbose)
    ensure_synthetic(args, root, rank, world)
    train_set, val_set = read_splits(args, root, image_size)
    train_sampler = train_batch_sampler(args, train_set, root, rank, world)
    check_validation_split(args, val_set.class_ids, rank)
    # The loader's generator seeds the workers (torch + random; numpy in distributed.seed_worker). No
    # persistent workers: they would keep the first epoch's seeds.
    loader_gen = torch.Generator()
    cpus = max(1, loaders.available_cpus() // world)  # the ranks share the machine's CPUs
    train_loader = DataLoader(
        train_set,
        batch_sampler=train_sampler,
        worker_init_fn=distributed.seed_worker,
        generator=loader_gen,
        **loaders.loader_settings(device, cpus, workers=args.workers, persistent_workers=False),
    )
    val_loader = DataLoader(
        val_set,
        batch_size=args.val_batch_size,
        shuffle=False,
        **loaders.loader_settings(device, cpus, workers=args.workers),
    )
    steps = len(train_sampler)
    if args.max_steps_per_epoch:
        steps = min(steps, args.max_steps_per_epoch)
    if steps == 0:
        raise flags.ArgumentCheckError(
            f"the training split ({len(train_set)} images) yields no batch of {args.batch_size}; lower --batch_size"
        )
    loss_batches = val_loss_batches(args, val_set)
    distributed.rank0_print(
        rank,
        f"data: {root} train {len(train_set)} images / "
        f"{len(np.unique(train_set.class_ids))} products, {args.val_split} "
        f"{len(val_set)} images; {steps} steps of {args.batch_size} x "
        f"{world} process(es) per epoch",
    )
    return Data(root, train_set, val_set, train_sampler, train_loader, val_loader, loader_gen, steps, loss_batches)


def build_state(
    args: argparse.Namespace,
    model_args: dict,
    data: Data,
    device: torch.device,
    channels_last: bool,
    use_amp: bool,
    resume_path: Path | None,
    rank: int,
) -> TrainState:
    """Model (ImageNet/random/--weights for a new run, the checkpoint's weights for a resumed
    one), loss, --optimizer with its parameter groups, plateau scheduler, gradient scaler
    (float16 AMP on CUDA only: bfloat16 needs none)."""
    fresh = resume_path is None
    # A resumed run's weights go through models.build_model's own checkpoint loading (its key
    # conversion and fit checks); it reads the file a second time.
    model = models.build_model(
        model_args["backbone"],
        int(model_args["embedding_size"]),
        weights=args.weights if fresh else resume_path,
        dropout=float(model_args["dropout"]),
        image_size=int(model_args["image_size"]),
        head=model_args.get("head", "mlp"),
    )
    model = model.to(device, memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    if fresh and args.head_init.startswith("pca"):
        init_head_from_features(model, data.train_set, args, device, rank)
    # build_loss passes margin/mining/classes only to losses that take them
    # (losses.SHARED_LOSS_ARGS); proxy losses get a proxy per training product.
    criterion = losses.build_loss(
        args.loss,
        margin=args.margin,
        mining=args.mining,
        classes=np.unique(data.train_set.class_ids),
        embedding_size=int(model_args["embedding_size"]),
    ).to(device)
    optimizer = flags.OPTIMIZERS[args.optimizer](
        param_groups(model, criterion, args), lr=args.lr, weight_decay=args.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode="max", factor=args.lr_factor, patience=args.lr_patience
    )
    return TrainState(
        model,
        criterion,
        optimizer,
        scheduler,
        torch.amp.GradScaler(device.type, enabled=use_amp and device.type == "cuda"),
    )


def restore_state(state: TrainState, ckpt: dict, data: Data, resume_path: Path) -> None:
    """Load the rest of a checkpoint into ``state``, whose model build_state already took from
    it: optimizer, scheduler, scaler, loss, RNG, history, best score, bad-image lists; and set
    the epoch to continue from."""
    saved = [g.get("name") for g in ckpt["optimizer"]["param_groups"]]
    if saved != [g["name"] for g in state.optimizer.param_groups]:
        raise distributed.TrainingStopped(
            f"{resume_path} has the optimizer parameter groups {saved}, this run "
            f"{[g['name'] for g in state.optimizer.param_groups]}: it was written with another "
            "--optimizer (or by an older train.py); resume with the --optimizer it was trained "
            "with, or start a new run (--run_name or --overwrite). It still evaluates and loads as "
            "--weights"
        )
    state.optimizer.load_state_dict(ckpt["optimizer"])
    if ckpt.get("scheduler"):
        state.scheduler.load_state_dict(ckpt["scheduler"])
    if ckpt.get("scaler") and state.scaler.is_enabled():
        state.scaler.load_state_dict(ckpt["scaler"])
    if ckpt.get("criterion"):
        state.criterion.load_state_dict(ckpt["criterion"])
    if ckpt.get("rng"):
        checkpoints.restore_rng_state(ckpt["rng"])
    state.history = [dict(row) for row in ckpt.get("history", [])]
    for dset, key in ((data.train_set, "train"), (data.val_set, "val")):
        dset.mark_bad((ckpt.get("bad_paths") or {}).get(key, []))
    state.best_score = float(ckpt.get("best_score", ckpt.get("best_recall", -math.inf)))
    state.start_epoch = int(ckpt["epoch"]) + 1


def decays(name: str, param: torch.Tensor) -> bool:
    """Whether decoupled weight decay applies to a network parameter: weights of convolutions
    and linear layers only; norms' scales and shifts and biases (every parameter of one
    dimension or less, or named ``*.bias``) are not decayed (timm's convention)."""
    return param.ndim > 1 and not name.endswith(".bias")


def param_groups(model: models.EmbeddingNet, criterion: torch.nn.Module, args: argparse.Namespace) -> list[dict]:
    """Optimizer parameter groups: backbone at --lr, head at --lr x --head_lr_mult, the loss's
    own parameters (proxies) at --lr x --proxy_lr_mult; groups without parameters left out.
    With --optimizer adamw the backbone and head are split further into ``<part>`` (decayed by
    --weight_decay) and ``<part>_no_decay`` (see decays), and the loss's proxies are not decayed
    (pytorch-metric-learning's convention); with adam every group takes the optimizer's
    --weight_decay. ReduceLROnPlateau scales every group by the same factor."""
    parts = [
        ("backbone", list(model.backbone.named_parameters()), args.lr),
        ("head", list(model.head.named_parameters()), args.lr * args.head_lr_mult),
    ]
    loss = ("loss", list(criterion.parameters()), args.lr * args.proxy_lr_mult)
    if args.optimizer != "adamw":
        groups = [(name, [p for _, p in named], lr) for name, named, lr in parts] + [loss]
        return [{"name": name, "params": params, "lr": lr} for name, params, lr in groups if params]
    groups = []
    for name, named, lr in parts:
        groups.append(
            {"name": name, "params": [p for n, p in named if decays(n, p)], "lr": lr, "weight_decay": args.weight_decay}
        )
        groups.append(
            {
                "name": f"{name}_no_decay",
                "params": [p for n, p in named if not decays(n, p)],
                "lr": lr,
                "weight_decay": 0.0,
            }
        )
    groups.append({"name": loss[0], "params": loss[1], "lr": loss[2], "weight_decay": 0.0})
    return [g for g in groups if g["params"]]


def init_head_from_features(
    model: models.EmbeddingNet,
    train_set: datasets.SOPDataset,
    args: argparse.Namespace,
    device: torch.device,
    rank: int,
) -> None:
    """--head_init pca / pca_whiten: fit models.init_head_pca on the backbone's raw features of
    a seeded sample of --pca_images training images (eval transform, no augmentation). Every
    rank computes the same sample; DDP then broadcasts rank 0's weights anyway."""
    start = time.perf_counter()
    n = len(train_set)
    idx = np.sort(np.random.default_rng(args.seed).choice(n, size=min(args.pca_images, n), replace=False))
    view = datasets.SOPDataset(
        train_set.root,
        train_set.split,
        check_files=False,
        val_fraction=train_set.val_fraction,
        test_fraction=train_set.test_fraction,
        transform=preprocessing.build_transform(int(model.model_args["image_size"]), train=False),
    )
    loader = DataLoader(
        torch.utils.data.Subset(view, idx.tolist()),
        batch_size=args.val_batch_size,
        shuffle=False,
        **loaders.loader_settings(device, loaders.available_cpus(), workers=args.workers),
    )
    features, _ = extraction.extract_embeddings(
        model.backbone,
        loader,
        device=device,
        progress=bool(args.progress) and rank == 0,
        desc="PCA features",
        normalize=False,
    )
    if len(features) < model.embedding_size:
        raise flags.ArgumentCheckError(
            f"--head_init {args.head_init}: the training split has "
            f"{len(features)} images, fewer than --embedding_size "
            f"{model.embedding_size}; use --head_init random"
        )
    models.init_head_pca(model, torch.from_numpy(features).to(device), whiten=args.head_init == "pca_whiten")
    whitening = " whitening" if "whiten" in args.head_init else ""
    distributed.rank0_print(
        rank,
        f"head initialised with the PCA{whitening} of {len(features)} "
        f"training images' backbone features "
        f"({time.perf_counter() - start:.1f} s)",
    )


def bad_image_count(*dsets) -> int:
    """Unreadable images found so far (replaced by another image of their product); datasets.py
    counts them in shared memory, so DataLoader workers' findings are included."""
    return sum(d.num_bad_images for d in dsets)
