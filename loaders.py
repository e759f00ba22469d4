"""DataLoader settings for a device: workers, pinned memory, prefetch (measured defaults)."""

from __future__ import annotations

import os

import torch


def available_cpus() -> int:
    """CPUs this process may run on (the affinity mask; ``os.cpu_count`` where unknown)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def loader_settings(
    device,
    cpus: int | None = None,
    workers: int | None = None,
    pin_memory: bool | None = None,
    persistent_workers: bool | None = None,
    prefetch_factor: int | None = None,
) -> dict:
    """DataLoader keyword arguments for ``device`` on a machine with ``cpus`` CPUs; ``None``
    arguments take the defaults measured by bench/bench_throughput.py (README, throughput).

    CPU training/inference: the model itself uses every core (intra-op threads), so a loader
    worker competes with it. One worker beside the model's threads overlaps decoding with the
    forward pass: on 2 cores it measured as fast as 2 workers (within run-to-run noise) with one
    process fewer, while with 0 workers the model waits 7-10 % of the time for decoding. With
    more cores: about a quarter of them, at least one.
    CUDA: the GPU does the maths, so every CPU decodes (up to 16), with pinned memory for
    asynchronous copies, deeper prefetch and persistent workers (no respawn every pass).
    Several processes per machine (DDP ranks): pass ``cpus`` = the CPUs per process.
    """
    cpus = available_cpus() if cpus is None else int(cpus)
    cuda = torch.device(device).type == "cuda"
    if workers is None:
        workers = min(16, cpus) if cuda else max(1, cpus // 4)
    workers = int(workers)
    out = {"num_workers": workers, "pin_memory": cuda if pin_memory is None else bool(pin_memory and cuda)}
    if workers > 0:
        out["persistent_workers"] = cuda if persistent_workers is None else bool(persistent_workers)
        out["prefetch_factor"] = (4 if cuda else 2) if prefetch_factor is None else int(prefetch_factor)
    return out
