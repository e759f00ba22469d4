"""The processes of a training run (one, or one per GPU under torchrun with DDP): joining the
process group, this process's device and what it allows there (Process), the network as the
ranks step it (Replicas: DDP over the parameters that train in the current phase), every
collective of the run (all_reduce_sum, broadcast, average_gradients, gather_rows, barrier: each
runs on the process's device, the one NCCL accepts), determinism, seeding (every epoch's
randomness follows from (seed, epoch) alone, which makes resumes exact), rank 0's console lines,
and TrainingStopped, the error that ends a run (exit code 1).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
import os
import random

import numpy as np
import torch
import torch.distributed as dist

import devices


class TrainingStopped(RuntimeError):
    """The run cannot go on; the message says why and what to do. The CLI exits with code 1."""


def device_switch(flag: bool | None, device: torch.device) -> bool:
    """A CUDA-first switch (--amp, --channels_last) on ``device``: None (not given) = on CUDA
    only; True / False as given, on any device (AMP then autocasts to loop.autocast_dtype)."""
    return device.type == "cuda" if flag is None else bool(flag)


@dataclass(frozen=True)
class Process:
    """This process's place in the run: its rank among ``world`` processes, its device, and
    what it uses there (AMP and channels-last: device_switch; progress bars on rank 0 only)."""

    rank: int
    world: int
    device: torch.device
    amp: bool
    channels_last: bool
    progress: bool

    @classmethod
    def of(cls, args: argparse.Namespace, rank: int, world: int, local_rank: int) -> Process:
        device = devices.resolve_device(args.device, local_rank)
        # MPS autocast is not exercised by any test here: AMP stays off there.
        return cls(
            rank,
            world,
            device,
            amp=device_switch(args.amp, device) and device.type in ("cuda", "cpu"),
            channels_last=device_switch(args.channels_last, device),
            progress=bool(args.progress) and rank == 0,
        )


def process_group_backend(use_cuda: bool) -> str:
    """The backend string of the run's process group. NCCL takes CUDA tensors only; a group
    made with ``nccl`` alone fails on the first CPU tensor a collective gets, so CUDA runs map
    CPU tensors to gloo and CUDA tensors to NCCL."""
    return "cpu:gloo,cuda:nccl" if use_cuda else "gloo"


def init_distributed(device_arg: str) -> tuple[int, int, int]:
    """(rank, world_size, local_rank). Under torchrun (WORLD_SIZE > 1) joins the process group
    (process_group_backend)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, 0
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and device_arg != "cpu"
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend=process_group_backend(use_cuda))
    return rank, world, local_rank


def leave_process_group(world: int) -> None:
    """Destroy the process group init_distributed joined (no-op in a single process)."""
    if world > 1 and dist.is_initialized():
        dist.destroy_process_group()


# ============ the network as the ranks step it ============


class Replicas:
    """The network the optimizer steps, as its forward must be called: the bare model in a
    single process; under DDP a DistributedDataParallel built over the parameters that require
    gradients when it is built, rebuilt when that set changes (head-only warm-up -> the whole
    network). Each DDP then waits for exactly the gradients its phase produces, so
    find_unused_parameters (a graph walk every step) is never needed; a rebuild also
    broadcasts rank 0's weights and buffers (DDP's construction does)."""

    def __init__(self, model: torch.nn.Module, world: int, device: torch.device):
        self.model, self.world, self.device = model, world, device
        self._ddp, self._trained = None, None

    def module(self) -> torch.nn.Module:
        """The module to call for this step's forward (after the phase's requires_grad is set)."""
        if self.world <= 1:
            return self.model
        trained = tuple(p.requires_grad for p in self.model.parameters())
        if trained != self._trained:
            self._ddp = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )
            self._trained = trained
        return self._ddp


# ============ collectives: every one of the run goes through these ============
# Each moves its tensor to the process's device first: NCCL accepts CUDA tensors only, and on a
# CPU run the move is a no-op. Results come back on that device.


def all_reduce_sum(tensor: torch.Tensor, device: torch.device, world: int) -> torch.Tensor:
    """The element-wise sum over the ranks of ``tensor``, as a new tensor on ``device``."""
    work = tensor.to(device, copy=True)  # the collective works in place: leave the caller's alone
    if world > 1:
        dist.all_reduce(work)
    return work


def broadcast(tensor: torch.Tensor, device: torch.device, world: int, src: int = 0) -> torch.Tensor:
    """Rank ``src``'s ``tensor`` on every rank, as a new tensor on ``device``."""
    work = tensor.to(device, copy=True)
    if world > 1:
        dist.broadcast(work, src=src)
    return work


def average_gradients(params: list[torch.Tensor], device: torch.device, world: int, scale: float = 1.0) -> None:
    """Replace the gradients of ``params`` (parameters outside DDP, e.g. a loss's proxies) by
    their mean over the ranks times ``scale``, in one collective. Every rank must pass the same
    parameters, each with a gradient (set_to_none leaves a parameter the loss did not use
    without one: it counts as zeros)."""
    if world <= 1 and scale == 1.0:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = all_reduce_sum(torch.cat([g.reshape(-1) for g in grads]), device, world) * (scale / world)
    offset = 0
    for p in params:
        p.grad = flat[offset : offset + p.numel()].view_as(p).to(p.device, p.dtype)
        offset += p.numel()


def gather_rows(local: torch.Tensor, device: torch.device, world: int) -> torch.Tensor:
    """The rows of every rank's ``local`` concatenated in rank order (ranks may hold different
    row counts), on ``device``. This rank's rows are ``local`` itself, so gradients flow back to
    them; the other ranks' rows are constants (their gradients are their own ranks' to take),
    as in pytorch-metric-learning's DistributedLossWrapper."""
    local = local.to(device)
    if world <= 1:
        return local
    counts = torch.zeros(world, dtype=torch.int64, device=device)
    counts[dist.get_rank()] = local.shape[0]
    counts = all_reduce_sum(counts, device, world).tolist()
    padded = local.new_zeros((max(counts), *local.shape[1:]))
    padded[: local.shape[0]] = local.detach()
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    parts = [part[:n] for part, n in zip(parts, counts)]
    parts[dist.get_rank()] = local
    return torch.cat(parts)


def barrier(world: int) -> None:
    """Wait for every rank (no-op in a single process). Under NCCL it runs on the device
    torch.cuda.set_device chose in init_distributed."""
    if world > 1:
        dist.barrier()


def configure_determinism(args: argparse.Namespace, device: torch.device) -> None:
    """--deterministic: deterministic algorithms only (bit-exact reruns); else let cuDNN tune."""
    if args.deterministic:
        # cuBLAS needs this before its first call to be deterministic.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input size: let cuDNN pick the fastest


def epoch_seed(seed: int, epoch: int) -> int:
    """A well-mixed 32-bit seed for (seed, epoch): the only RNG input of an epoch."""
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])


def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's and torch's global generators."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def seed_worker(worker_id: int) -> None:
    """DataLoader worker_init_fn: numpy seeded from the worker's torch seed."""
    # torch seeds each worker's torch and `random` from the loader's generator; numpy it does not.
    np.random.seed(torch.initial_seed() % 2**32)


def rank0_print(rank: int, msg: str) -> None:
    """A console line, printed by rank 0 only."""
    if rank == 0:
        print(msg, flush=True)
