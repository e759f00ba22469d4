"""One epoch of training and one validation pass: the recipe's train mode (head-only warm-up,
frozen BatchNorm statistics), the optimizer steps with AMP and DDP, and the validation metrics
(product and category protocols, plus the training loss on fixed P x K batches), with the
loss statistics (triplet counts, ...) averaged over batches and ranks.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

import checkpoints
import datasets
import extraction
import models
import retrieval
from training import distributed


class NonFiniteLossError(distributed.TrainingStopped):
    """The loss became NaN or infinite; no optimizer step was taken with it."""


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
            sums[key] = sums.get(key, 0.0) + (float(stat) * weight if key.startswith("mean_") else float(stat))


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


def autocast_dtype(device: torch.device) -> torch.dtype:
    """The AMP dtype on ``device``: float16 on CUDA (with a gradient scaler), bfloat16 elsewhere
    (float32's exponent range: no scaler needed), as extraction.extract_embeddings uses."""
    return torch.float16 if device.type == "cuda" else torch.bfloat16


def train_step(
    forward,
    criterion: torch.nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    device: torch.device,
    *,
    amp: bool,
    world_size: int,
    gather_embeddings: bool,
    where: str,
) -> tuple[float, dict]:
    """One optimizer step on one batch through ``forward`` (the module of this phase); returns
    (the loss averaged over ranks, the criterion's stats). Raises NonFiniteLossError, naming
    ``where`` (epoch and step), before stepping on a NaN/inf loss."""
    params = [p for p in criterion.parameters() if p.requires_grad]
    with torch.autocast(device.type, dtype=autocast_dtype(device), enabled=amp):
        embeddings = forward(images)
    # The loss runs in fp32: squared distances of unit vectors near the margin lose too much
    # in fp16.
    embeddings = embeddings.float()
    if gather_embeddings:
        embeddings = distributed.gather_rows(embeddings, device, world_size)
        labels = distributed.gather_rows(labels, device, world_size)
    loss, stats = criterion(embeddings, labels)
    if not loss.requires_grad:  # no valid triplet in the batch: still a (zero) backward pass,
        loss = loss + 0.0 * embeddings.sum()  # which DDP needs on every rank at every step
    # Every rank must take the same decision, or the others would wait forever in backward.
    # .item() is a host sync; it is needed anyway for the check and the live loss.
    value = distributed.all_reduce_sum(loss.detach().float(), device, world_size).item() / world_size
    if not math.isfinite(value):
        raise NonFiniteLossError(
            f"non-finite loss ({value}) at {where}; no optimizer step was taken with it. Lower --lr, "
            "try --no-amp, or check the data"
        )
    optimizer.zero_grad(set_to_none=True)
    # Gathered, each rank's loss is that of the global batch but reaches only its own
    # images; DDP averages over the ranks, so x world gives the global batch's gradient
    # (pytorch-metric-learning's DistributedLossWrapper does the same).
    spread = world_size if gather_embeddings else 1
    scaler.scale(loss * spread).backward()
    if params:  # loss parameters (proxies) live outside DDP: average them over the ranks
        distributed.average_gradients(params, device, world_size, scale=1.0 / spread)
    scaler.step(optimizer)
    scaler.update()
    return value, stats


def rank_averages(sums: dict, batches: int, images_seen: int, device: torch.device, world_size: int) -> dict:
    """_averages over every rank's batches (per-rank stats differ: different batches), plus the
    images all ranks saw."""
    keys = sorted(sums)
    totals = torch.tensor([sums[k] for k in keys] + [batches, images_seen], dtype=torch.float64)
    totals = distributed.all_reduce_sum(totals, device, world_size).cpu()
    batches_all, images_all = totals[-2].item(), totals[-1].item()
    out = _averages({k: totals[i].item() for i, k in enumerate(keys)}, batches_all)
    out["images"] = images_all
    return out


def epoch_batches(loader: DataLoader, steps: int, device: torch.device, memory_format: torch.memory_format):
    """The first ``steps`` batches of ``loader`` as (step, images, labels), moved to ``device``
    (images in ``memory_format``)."""
    for step, (images, labels) in enumerate(loader):
        if step >= steps:
            break
        images = images.to(device, non_blocking=True, memory_format=memory_format)
        yield step, images, labels.to(device, non_blocking=True)


def show_progress(bar: tqdm, sums: dict, batches: int) -> None:
    """One step more on ``bar``, with the running means of the loss and the triplet counts."""
    bar.update(1)
    bar.set_postfix(
        loss=f"{sums['loss'] / batches:.4f}",
        valid=f"{sums.get('valid_triplets', 0.0) / batches:.1f}",
        active=f"{sums.get('active_triplets', 0.0) / batches:.1f}",
    )


def train_one_epoch(
    model: torch.nn.Module,
    criterion: torch.nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    device: torch.device,
    epoch: int,
    *,
    steps: int,
    amp: bool = False,
    channels_last: bool = False,
    world_size: int = 1,
    progress: bool = True,
    frozen_steps: int = 0,
    freeze_bn: bool = False,
    replicas: distributed.Replicas | None = None,
    gather_embeddings: bool = False,
) -> dict:
    """One pass over ``steps`` batches. The first ``frozen_steps`` of the run (counted over
    epochs: epoch e starts at step (e - 1) x steps) train the head alone (set_train_mode).
    ``model`` is the bare network; under DDP ``replicas`` gives the module each step calls.
    ``gather_embeddings``: the loss sees the batches of all ranks (distributed.gather_rows), the
    same loss on every rank, each rank's gradients flowing to its own images.
    Returns averages over batches (and ranks): loss and every stat the criterion reports
    (valid_triplets, active_triplets, ...), plus images, train_time and frozen_steps (this
    epoch's). Raises NonFiniteLossError before stepping on a NaN/inf loss."""
    replicas = replicas or distributed.Replicas(model, world_size, device)
    bare = checkpoints.unwrap_model(model)
    forward, frozen = None, None  # set at the first step, with its phase
    first_step = (epoch - 1) * steps
    sums: dict[str, float] = {}
    batches, images_seen, frozen_here = 0, 0, 0
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    step_args = dict(amp=amp, world_size=world_size, gather_embeddings=gather_embeddings)
    start = time.perf_counter()
    bar = tqdm(total=steps, desc=f"epoch {epoch} train", disable=not progress, leave=False, dynamic_ncols=True)
    with bar:
        for step, images, labels in epoch_batches(loader, steps, device, memory_format):
            if frozen != (first_step + step < frozen_steps):
                frozen = first_step + step < frozen_steps
                set_train_mode(bare, backbone_frozen=frozen, freeze_bn=freeze_bn)
                forward = replicas.module()  # DDP over this phase's trained parameters
            frozen_here += int(frozen)
            where = f"epoch {epoch}, step {step + 1}/{steps}"
            value, stats = train_step(
                forward, criterion, images, labels, optimizer, scaler, device, where=where, **step_args
            )
            batches += 1
            images_seen += images.shape[0]
            _accumulate(sums, value, stats)
            show_progress(bar, sums, batches)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    train_time = time.perf_counter() - start
    out = rank_averages(sums, batches, images_seen, device, world_size)
    out["train_time"] = train_time
    out["frozen_steps"] = float(frozen_here)
    return out


@torch.no_grad()
def validate(
    model: torch.nn.Module,
    criterion: torch.nn.Module,
    loader: DataLoader,
    dataset: datasets.SOPDataset,
    loss_batches: list[list[int]],
    device: torch.device,
    *,
    amp: bool = False,
    progress: bool = True,
    return_embeddings: bool = False,
):
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
    embeddings, labels = extraction.extract_embeddings(
        model, loader, device=device, amp=amp, progress=progress, desc="validation"
    )
    model.train(was_training)
    labels = np.asarray(labels)
    if not np.array_equal(labels, np.asarray(dataset.class_ids)):
        raise RuntimeError("validation loader order does not match dataset.class_ids")
    result = retrieval.evaluate_embeddings(embeddings, dataset.class_ids, dataset.super_ids)
    # an undefined protocol (retrieval.undefined: None values) is NaN in metrics.csv
    metrics = {k: np.nan if v is None else float(v) for k, v in result["product"].items() if k != "why"}
    metrics.update({f"cat_{k}": np.nan if v is None else float(v) for k, v in result["category"].items() if k != "why"})

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
