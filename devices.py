"""The one device rule of every script (``--device``)."""

from __future__ import annotations

import torch


def resolve_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    """The one device rule of every script. ``auto``: CUDA when available, else the CPU (MPS is
    taken only when asked for). ``cuda``: ``cuda:<local_rank>``, one GPU per torchrun process.
    Any other name (``cpu``, ``mps``, ``cuda:1``) as given; an unavailable CUDA or MPS device is
    an error that says so."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        name = f"cuda:{local_rank}"
    device = torch.device(name)
    available = {"cuda": torch.cuda.is_available, "mps": torch.backends.mps.is_available}
    if device.type in available and not available[device.type]():
        raise ValueError(f"--device {name}: {device.type.upper()} is not available here; use --device cpu or auto")
    return device
