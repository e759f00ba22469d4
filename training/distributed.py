"""The processes of a training run (one, or one per GPU under torchrun with DDP): joining the
process group, this process's device and what it allows there (Process), determinism, seeding
(every epoch's randomness follows from (seed, epoch) alone, which makes resumes exact), the
barrier between ranks, rank 0's console lines, and TrainingStopped, the error that ends a run
(exit code 1).
"""
from __future__ import annotations

import argparse
import os
import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

import models


class TrainingStopped(RuntimeError):
    """The run cannot go on; the message says why and what to do. The CLI exits with code 1."""


@dataclass(frozen=True)
class Process:
    """This process's place in the run: its rank among ``world`` processes, its device, and
    what it uses there (AMP and channels-last on CUDA only, progress bars on rank 0 only)."""
    rank: int
    world: int
    device: torch.device
    amp: bool
    channels_last: bool
    progress: bool

    @classmethod
    def of(cls, args: argparse.Namespace, rank: int, world: int, local_rank: int) -> "Process":
        device = models.resolve_device(args.device, local_rank)
        cuda = device.type == "cuda"
        return cls(rank, world, device, amp=bool(args.amp) and cuda,
                   channels_last=bool(args.channels_last) and cuda,
                   progress=bool(args.progress) and rank == 0)


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


def barrier(world: int) -> None:
    """Wait for every rank (no-op in a single process)."""
    if world > 1:
        dist.barrier()


def rank0_print(rank: int, msg: str) -> None:
    """A console line, printed by rank 0 only."""
    if rank == 0:
        print(msg, flush=True)
