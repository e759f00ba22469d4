"""Train the product embedding network with metric learning on a product catalogue: Stanford
Online Products, the synthetic stand-in, or your own photos (a catalogue.csv or a folder tree).

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
the original project's exact recipe (random batches, best.pth on Recall@1). RECIPES in
training/flags.py holds the values; bench/README.md the measurements behind them.

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

This script is the run loop; its library is training/: flags (arguments, recipes, range checks),
setup (data, model, optimizer; restoring a checkpoint), loop (one epoch, one validation), runs
(the run's files: checkpoints, metrics.csv, TensorBoard) and distributed (processes, DDP, seeding).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
import sys
import time

import numpy as np
import torch

import backbones
import checkpoints
from dataio import catalogue
import models
import retrieval
from training import arg_checks, distributed, flags, heldout, loop, matching, runs, setup


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    """train.py's command line (train_multiple.py extends it)."""
    parser = argparse.ArgumentParser(
        "train.py",
        add_help=add_help,
        formatter_class=flags.HelpFormatter,
        usage="%(prog)s [options]",
        description="Metric learning on a product catalogue (Stanford Online Products, a catalogue.csv "
        "or a <category>/<product>/<image> tree). "
        "Every --snake_case flag also accepts --kebab-case.",
    )
    flags.add_train_args(parser)
    return parser


@dataclass
class Run:
    """What the epochs of one run share: its arguments and files, this process, the data, the
    training state, the network as the ranks step it (distributed.Replicas: DDP on several
    ranks), the head-only warm-up's length in steps, and rank 0's TensorBoard writer."""

    args: argparse.Namespace
    paths: runs.RunPaths
    proc: distributed.Process
    data: setup.Data
    state: setup.TrainState
    replicas: distributed.Replicas
    frozen_steps: int
    writer: object = None


# ============ one epoch's validation, row, checkpoint and log line ============


def run_validation(run: Run, zero_shot: bool = False) -> tuple[dict, np.ndarray]:
    """(``val_*`` metrics with ``val_time``, embeddings) of the network on the validation split;
    ``zero_shot`` adds the backbone alone's product metrics as ``val_zero_shot_*``."""
    state, data, proc = run.state, run.data, run.proc
    metrics, emb = loop.validate(
        state.model,
        state.criterion,
        data.val_loader,
        data.val_set,
        data.val_loss_batches,
        proc.device,
        amp=proc.amp,
        progress=proc.progress,
        return_embeddings=True,
    )
    row = {f"val_{k}": v for k, v in metrics.items() if k != "time"}
    row["val_time"] = metrics["time"]
    if zero_shot:
        alone = loop.validate(
            state.model.zero_shot(),
            None,
            data.val_loader,
            data.val_set,
            [],
            proc.device,
            amp=proc.amp,
            progress=proc.progress,
        )
        row.update({f"val_zero_shot_{k}": v for k, v in alone.items() if k in retrieval.PRODUCT_METRICS})
        row["val_time"] += alone["time"]
    return row, emb


def epoch_line(row: dict, args: argparse.Namespace, best_score: float, is_best: bool) -> str:
    """The console summary of one metrics.csv row."""
    parts = [f"epoch {row['epoch']}/{args.epochs}"]
    if row.get("train_loss") is not None:
        part = f"train loss {row['train_loss']:.4f}"
        if row.get("train_active_triplets") is not None:  # triplet-style losses only
            part += (
                f" (valid {row.get('train_valid_triplets', float('nan')):.1f}, "
                f"active {row['train_active_triplets']:.1f} triplets/batch)"
            )
        parts.append(part)
    loss = f"val loss {row['val_loss']:.4f} " if "val_loss" in row else "val "
    best = (
        "best.pth = last epoch"
        if args.select_metric == flags.SELECT_LAST
        else f"best {args.select_metric} {100 * best_score:.2f}%"
    )
    parts.append(f"{loss}R@1 {100 * row['val_recall@1']:.2f}% MAP@R {100 * row['val_map@r']:.2f}% ({best})")
    if "val_zero_shot_map@r" in row:
        parts.append(
            f"backbone alone (zero-shot) R@1 {100 * row['val_zero_shot_recall@1']:.2f}% "
            f"MAP@R {100 * row['val_zero_shot_map@r']:.2f}%"
        )
    if row.get("images_per_sec"):
        parts.append(f"{row['images_per_sec']:.1f} img/s, {row['epoch_time']:.1f}s")
    return " | ".join(parts) + (" *" if is_best else "")


def finish_epoch(run: Run, row: dict) -> None:
    """rank 0: history and best score, checkpoint (last; best when strictly better on
    --select_metric, a tie keeps the earlier epoch), metrics.csv, TensorBoard, the log line."""
    state, data, args, paths = run.state, run.data, run.args, run.paths
    state.history.append(row)
    score = runs.selection_score(row, args.select_metric)
    is_best = score > state.best_score
    if is_best:
        state.best_score = score
    ckpt = checkpoints.make_checkpoint(
        state.model,
        args=args,
        epoch=row["epoch"],
        metrics=row,
        optimizer=state.optimizer,
        scheduler=state.scheduler,
        scaler=state.scaler,
        rng=checkpoints.capture_rng_state(),
        history=[dict(r) for r in state.history],
        best_score=float(state.best_score),
        select_metric=args.select_metric,
        criterion=state.criterion.state_dict() if list(state.criterion.parameters()) else None,
        # so that a resumed run keeps counting them (the flags live in this process only)
        bad_paths={"train": data.train_set.bad_paths, "val": data.val_set.bad_paths},
        # evaluate.py refuses a test split holding any of these (held out means held out)
        products=heldout.product_record(data.train_set, data.val_set),
    )
    runs.save_checkpoint(ckpt, paths.last)
    if is_best:
        runs.link_best(paths.last, paths.best)
    runs.write_metrics_csv(paths.metrics_csv, state.history)
    runs.log_tensorboard(run.writer, row)
    print(epoch_line(row, args, state.best_score, is_best), flush=True)


# ============ main ============


def main(args: argparse.Namespace) -> dict:
    """Train; returns the last epoch's metrics row (as written to metrics.csv)."""
    args = flags.resolve_recipe(args)
    errors = arg_checks.check_args(args)
    if errors:
        raise flags.ArgumentCheckError("\n  ".join(errors))
    previous_deterministic = torch.are_deterministic_algorithms_enabled()
    rank, world, local_rank = distributed.init_distributed(args.device)
    try:
        return _run(args, distributed.Process.of(args, rank, world, local_rank))
    finally:
        torch.use_deterministic_algorithms(previous_deterministic)
        distributed.leave_process_group(world)


def _run(args: argparse.Namespace, proc: distributed.Process) -> dict:
    run = _prepare(args, proc)
    val_embeddings = None
    if run.state.start_epoch == 0:
        val_embeddings = _epoch_zero(run)
    for epoch in range(run.state.start_epoch, args.epochs + 1):
        val_embeddings = _train_epoch(run, epoch)
    return _finish(run, val_embeddings)


def _prepare(args: argparse.Namespace, proc: distributed.Process) -> Run:
    """Runtime, resume checkpoint, data, model and optimizer, DDP, and (rank 0) the logs."""
    rank, world, device = proc.rank, proc.world, proc.device
    distributed.configure_determinism(args, device)
    distributed.seed_everything(args.seed)  # initial head weights (for --weights imagenet/none)
    paths = runs.RunPaths.of(args)

    # ============ resume: read the checkpoint first (it fixes the model's shape) ============
    ckpt, resume_path = setup.read_resume(args, paths, rank)
    model_args = (
        dict(ckpt["model_args"])
        if ckpt is not None
        else {
            "backbone": args.backbone,
            "embedding_size": args.embedding_size,
            "dropout": args.dropout,
            "image_size": args.image_size,
            "head": args.head,
        }
    )

    # ============ preparing data ============
    data = setup.build_data(args, int(model_args["image_size"]), device, rank, world)

    # ============ building model, loss, optimizer ============
    state = setup.build_state(
        args, model_args, data, device, proc.channels_last, proc.amp, resume_path=resume_path, rank=rank
    )
    if ckpt is not None:
        setup.restore_state(state, ckpt, data, resume_path)
        del ckpt  # the optimizer state is now in place: free the copy
    frozen_steps = loop.warmup_steps(args.warmup_epochs, data.steps)
    run = Run(args, paths, proc, data, state, distributed.Replicas(state.model, world, device), frozen_steps)
    if rank == 0:
        run.writer = runs.open_logs(
            args,
            paths,
            {
                **vars(args),
                "run_name": paths.name,
                "resolved_device": str(device),
                "world_size": world,
                "amp_used": proc.amp,
                "resumed_from": str(resume_path) if resume_path else None,
                "git_commit": checkpoints.git_commit(),
                "model_args": model_args,
            },
            state.start_epoch,
        )
        distributed.rank0_print(
            rank,
            f"run {paths.name}: {models.count_parameters(state.model) / 1e6:.2f}M "
            f"parameters, device {device}, amp {proc.amp}; checkpoints "
            f"{paths.checkpoint_dir}, logs {paths.log_dir}",
        )
    return run


def _epoch_zero(run: Run) -> np.ndarray | None:
    """Epoch 0: the untrained network, and its backbone alone; rank 0's validation embeddings."""
    val_embeddings = None
    if run.proc.rank == 0:
        val_row, val_embeddings = run_validation(run, zero_shot=True)
        finish_epoch(
            run,
            {
                "epoch": 0,
                **val_row,
                "lr": run.state.optimizer.param_groups[0]["lr"],
                "bad_images": float(setup.bad_image_count(run.data.train_set, run.data.val_set)),
            },
        )
    distributed.barrier(run.proc.world)
    run.state.start_epoch = 1
    return val_embeddings


def _train_epoch(run: Run, epoch: int) -> np.ndarray | None:
    """One epoch of training, its validation, the LR schedule's step, and (rank 0) its row and
    checkpoint; rank 0's validation embeddings."""
    args, proc, data, state = run.args, run.proc, run.data, run.state
    epoch_start = time.perf_counter()
    # Everything random in this epoch follows from (seed, epoch) alone: exact resumes.
    distributed.seed_everything(distributed.epoch_seed(args.seed, epoch))
    data.loader_gen.manual_seed(distributed.epoch_seed(args.seed, epoch))
    data.train_sampler.set_epoch(epoch)
    lr = state.optimizer.param_groups[0]["lr"]
    stats = loop.train_one_epoch(
        state.model,
        state.criterion,
        data.train_loader,
        state.optimizer,
        state.scaler,
        proc.device,
        epoch,
        steps=data.steps,
        amp=proc.amp,
        channels_last=proc.channels_last,
        world_size=proc.world,
        progress=proc.progress,
        frozen_steps=run.frozen_steps,
        freeze_bn=bool(args.freeze_bn),
        replicas=run.replicas,
        gather_embeddings=bool(args.gather_embeddings),
    )
    score = torch.zeros(1, dtype=torch.float64)
    val_embeddings = None
    if proc.rank == 0:
        val_row, val_embeddings = run_validation(run)
        score[0] = runs.selection_score({"epoch": epoch, **val_row}, args.select_metric)
    # every rank steps its scheduler on rank 0's validation
    score = distributed.broadcast(score, proc.device, proc.world, src=0).cpu()
    # The plateau schedule counts fine-tuning epochs only: an epoch that ends inside the
    # head-only warm-up measures the head, and must not spend the backbone's patience.
    if epoch * data.steps > run.frozen_steps:
        state.scheduler.step(float(score[0]))
    if proc.rank == 0:
        finish_epoch(
            run,
            {
                "epoch": epoch,
                **{f"train_{k}": v for k, v in stats.items() if k not in ("images", "train_time")},
                **val_row,
                "lr": lr,
                "bad_images": float(setup.bad_image_count(data.train_set, data.val_set)),
                "images": stats["images"],
                "images_per_sec": stats["images"] / max(stats["train_time"], 1e-9),
                "epoch_time": time.perf_counter() - epoch_start,
            },
        )
    distributed.barrier(proc.world)
    return val_embeddings


def _fit_match(run: Run) -> None:
    """best.pth's same-product threshold at --target_fmr on the validation products (training's
    photos for the carry-over pairs); a validation split with fewer than two products has none."""
    args = run.args
    if not getattr(args, "target_fmr", 0) or not run.paths.best.exists():
        return
    if len(set(run.data.val_set.class_ids)) < 2:
        distributed.rank0_print(0, "no same-product threshold: the validation split has fewer than 2 products")
        return
    record = matching.fit_checkpoint(
        run.paths.best,
        run.data.val_set,
        run.data.train_set,
        target_fmr=args.target_fmr,
        device=run.proc.device,
        batch_size=args.val_batch_size,
        seed=args.seed,
    )
    distributed.rank0_print(
        0,
        f"same-product threshold {record['threshold']:.4f} at FMR {args.target_fmr:g} "
        f"(validation, {record['fitted_on']['products']} products) stored in {run.paths.best}",
    )


def _finish(run: Run, val_embeddings: np.ndarray | None) -> dict:
    """rank 0: the embedding projector, the writer closed, the summary line; the last row."""
    args, state = run.args, run.state
    final = dict(state.history[-1]) if state.history else {}
    if run.proc.rank == 0:
        if args.projector_samples > 0:
            if val_embeddings is None:  # resumed after the last epoch had finished
                _, val_embeddings = run_validation(run)
            runs.add_projector(
                run.writer,
                run.data.val_set,
                val_embeddings,
                args.projector_samples,
                args.seed,
                int(final.get("epoch", 0)),
            )
        run.writer.close()
        _fit_match(run)
        best = (
            "best.pth = the last epoch"
            if args.select_metric == flags.SELECT_LAST
            else f"best val {args.select_metric} {100 * state.best_score:.2f}%"
        )
        distributed.rank0_print(run.proc.rank, f"done: {best}; {run.paths.best}, {run.paths.metrics_csv}")
    distributed.barrier(run.proc.world)
    return final


def cli(argv: list[str] | None = None) -> int:
    """Command line entry point; returns the exit code (argparse errors exit 2 themselves)."""
    parser = get_args_parser()
    args = parser.parse_args(argv)
    arg_checks.validate_args(args, parser)
    try:
        main(args)
    except flags.ArgumentCheckError as e:
        parser.error(str(e))
    except (
        distributed.TrainingStopped,
        backbones.WeightsUnavailableError,
        checkpoints.CheckpointError,
        catalogue.DatasetError,
        FileNotFoundError,
    ) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(cli())
