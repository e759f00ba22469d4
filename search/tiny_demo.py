"""A tiny, self-contained demo setup, made in seconds on a CPU with no data and no training:
a synthetic catalogue, an untrained checkpoint, and a free port to serve it on.

For whatever has to run the demo without a real model: the tests, ``bench/load_app.py``
(load test) and ``bench/gpu_check.py`` (search step without a trained run). The clients that
exercise it (query files of every kind, a headless browser) are bench/demo_clients.py's.
"""

from __future__ import annotations

from pathlib import Path
import socket

import torch

import checkpoints
from dataio import synthetic_sop
import models

IMAGE_SIZE = 48


def write_untrained_checkpoint(path, data_root, backbone="resnet18", image_size=IMAGE_SIZE, seed=0, head="mlp") -> Path:
    """A randomly initialised ``backbone`` with ``head`` saved at ``path`` as train.py saves a run
    (models.py checkpoint format, `checkpoints.atomic_save`), with ``data_root`` as its training data."""
    torch.manual_seed(seed)
    model = models.build_model(backbone, weights="none", image_size=image_size, head=head)
    checkpoints.atomic_save(
        checkpoints.make_checkpoint(
            model, args={"dataset": "synthetic", "data_root": str(data_root)}, epoch=0, metrics={}
        ),
        path,
    )
    return Path(path)


def make_tiny_demo(
    folder, num_products=40, image_size=IMAGE_SIZE, backbone="resnet18", seed=0, run="tiny", head="mlp"
) -> tuple[Path, Path]:
    """``(data_root, checkpoint)``: a synthetic SOP under ``folder/sop`` and an untrained
    checkpoint trained "on" it at ``folder/checkpoints/<run>/best.pth``."""
    folder = Path(folder)
    root = synthetic_sop.ensure_synthetic_sop(folder / "sop", num_products=num_products, image_size=image_size)
    path = write_untrained_checkpoint(folder / "checkpoints" / run / "best.pth", root, backbone, image_size, seed, head)
    return Path(root), path


def free_port() -> int:
    """A TCP port free on loopback now, for a demo server."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
