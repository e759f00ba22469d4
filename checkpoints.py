"""The checkpoint format: a plain dict that ``torch.load(path, weights_only=True)`` opens.

    format_version  CHECKPOINT_FORMAT_VERSION
    model           state dict of the EmbeddingNet
    model_args      {"backbone", "embedding_size", "dropout", "image_size", "head"}: enough to
                    rebuild it (checkpoints without "head" have the mlp head)
    args            the run's arguments as a plain dict
    epoch, metrics  last finished epoch (int) and its metrics (dict of floats)
    optimizer, scheduler, scaler   their state dicts (None when absent)
    rng             capture_rng_state()
    git_commit      short hash of the code that wrote it, or "unknown"
    products        {"train": [...], "val": [...]}: the product ids trained and validated on
                    (train.py; training.heldout reads it)

``make_checkpoint`` assembles that dict, ``atomic_save`` writes it, ``load_checkpoint`` reads and
validates it (``safe_load``: no code in a file can run); ``models.load_model`` rebuilds the
network from it alone.
"""

from __future__ import annotations

import argparse
import errno
import hashlib
import os
import pickle
import random
import re
import subprocess
from typing import Any
import zipfile

import numpy as np
import torch
import torch.nn as nn

from dataio import fileio

CHECKPOINT_FORMAT_VERSION = 1
CHECKPOINT_KEYS = (
    "format_version",
    "model",
    "model_args",
    "args",
    "epoch",
    "metrics",
    "optimizer",
    "scheduler",
    "scaler",
    "rng",
    "git_commit",
)
REQUIRED_CHECKPOINT_KEYS = ("format_version", "model", "model_args")
MODEL_ARG_KEYS = ("backbone", "embedding_size", "dropout", "image_size", "head")


class CheckpointError(RuntimeError):
    """A checkpoint or weights file exists but is refused: corrupt, unsafe, foreign or mismatched."""


# ============ writing ============


def git_commit() -> str:
    """Short hash of HEAD of the repository holding this file, or "unknown"."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            cwd=os.path.dirname(os.path.abspath(__file__)),
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "unknown"


def _plain(obj: Any) -> Any:
    """Convert to types weights_only loading accepts (numpy scalars/arrays, paths, Namespaces)."""
    if isinstance(obj, argparse.Namespace):
        obj = vars(obj)
    if isinstance(obj, dict):
        return {str(k) if not isinstance(k, (int, float, bool)) else k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_plain(v) for v in obj)
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(obj.copy())
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if obj is None or torch.is_tensor(obj) or isinstance(obj, (str, int, float, bool)):
        return obj
    return str(obj)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The EmbeddingNet inside DistributedDataParallel (.module) / torch.compile (._orig_mod)."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def _state(obj: Any) -> Any:
    return obj.state_dict() if hasattr(obj, "state_dict") else obj


def make_checkpoint(
    model: nn.Module,
    *,
    args: Any = None,
    epoch: int | None = None,
    metrics: dict | None = None,
    optimizer: Any = None,
    scheduler: Any = None,
    scaler: Any = None,
    rng: dict | None = None,
    **extra: Any,
) -> dict:
    """The checkpoint dict of the module docstring. optimizer/scheduler/scaler may be objects or
    their state dicts; args may be an argparse.Namespace; numpy values and paths are converted so
    that the result loads with weights_only=True; ``extra`` fields are stored after the same
    conversion."""
    model = unwrap_model(model)
    return {
        "format_version": CHECKPOINT_FORMAT_VERSION,
        "model": model.state_dict(),
        "model_args": dict(model.model_args),
        "args": _plain(args if args is not None else {}),
        "epoch": epoch,
        "metrics": _plain(metrics if metrics is not None else {}),
        "optimizer": _state(optimizer),
        "scheduler": _plain(_state(scheduler)),
        "scaler": _plain(_state(scaler)),
        "rng": _plain(rng),
        "git_commit": git_commit(),
        **{k: _plain(v) for k, v in extra.items()},
    }


def capture_rng_state() -> dict:
    """Python, numpy, torch CPU and CUDA generator states, in weights_only-loadable types."""
    py_version, py_state, py_gauss = random.getstate()
    np_state = np.random.get_state()
    return {
        "python": [py_version, list(py_state), py_gauss],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *map(_plain, np_state[2:])],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_rng_state(state: dict) -> None:
    """Inverse of capture_rng_state."""
    version, py_state, gauss = state["python"]
    random.setstate((version, tuple(py_state), gauss))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """torch.save ``obj`` to ``path`` atomically (fileio.atomic_write: temporary file, fsync,
    os.replace). Readers see the old file or the new one, never half a file. On failure the
    temporary file is removed, the previous ``path`` is untouched, and OSError (disk,
    permissions; errno kept) or RuntimeError (anything else) names ``path``."""
    fileio.atomic_write(path, lambda f: torch.save(obj, f))


def checkpoint_hash(path: str | os.PathLike) -> str:
    """sha256 hex digest of the file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# ============ reading ============


def safe_load(path: str | os.PathLike, what: str = "checkpoint", map_location: Any = "cpu") -> Any:
    """torch.load(weights_only=True) whose failures say what is wrong with the file."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(
            errno.ENOENT,
            f"{what} not found: {path}. Check the path "
            "(checkpoints are written to checkpoints/<run>/best.pth and last.pth)",
            path,
        )
    if os.path.isdir(path):
        raise IsADirectoryError(
            errno.EISDIR, f"{what} {path} is a folder; pass the .pth file inside it (e.g. best.pth or last.pth)", path
        )
    if os.path.getsize(path) == 0:
        raise CheckpointError(
            f"{what} {path} is empty (0 bytes), probably from an interrupted "
            "copy; use another checkpoint (last.pth / best.pth) or retrain"
        )
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights only load failed" not in str(e).lower():
            raise CheckpointError(
                f"{what} {path} is corrupt or truncated ({e}); use another checkpoint or retrain"
            ) from e
        found = re.search(r"WeightsUnpickler error: ([^\n]*?)(?: was not an allowed|\. Please|$)", str(e), re.MULTILINE)
        raise CheckpointError(
            f"refused to load {what} {path}: it contains Python objects that safe "
            f"(weights_only=True) loading does not allow ({found.group(1) if found else 'unknown'})"
            ". Nothing in it was executed. Loading it unsafely could run arbitrary code; only if "
            "you trust its origin, convert it in a separate step with "
            "torch.load(..., weights_only=False) and re-save the plain tensors."
        ) from None
    except PermissionError as e:
        raise CheckpointError(f"{what} {path} cannot be read: {e}; check its permissions") from e
    except (OSError, RuntimeError, EOFError, zipfile.BadZipFile, ValueError, KeyError) as e:
        raise CheckpointError(
            f"{what} {path} cannot be read: truncated or not a PyTorch file "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'unexpected end of file'}). "
            "It may come from an interrupted write or copy; use another checkpoint "
            "(last.pth / best.pth) or retrain"
        ) from e


def validate_checkpoint(obj: Any, path: str) -> dict:
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a checkpoint dict")
    if "format_version" not in obj and obj and all(torch.is_tensor(v) for v in obj.values()):
        raise CheckpointError(
            f"{path} is a plain state dict, not a checkpoint: it has no model_args to rebuild the "
            "network from. Use it as initial weights instead: build_model(backbone, "
            f"weights={path!r}) / --weights {path}"
        )
    missing = [k for k in REQUIRED_CHECKPOINT_KEYS if k not in obj]
    if missing:
        raise CheckpointError(
            f"{path} is not a checkpoint of this project: missing keys {missing} (has {sorted(map(str, obj))[:10]})"
        )
    version = obj["format_version"]
    if version != CHECKPOINT_FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format_version {version!r}; this code reads version "
            f"{CHECKPOINT_FORMAT_VERSION}. Use the code version that wrote it (its git_commit: "
            f"{obj.get('git_commit', 'unknown')}) or retrain"
        )
    args = obj["model_args"]
    if not isinstance(args, dict) or "backbone" not in args or "embedding_size" not in args:
        raise CheckpointError(f"{path}: model_args must be a dict with backbone and embedding_size, got {args!r}")
    if not isinstance(obj["model"], dict):
        raise CheckpointError(f"{path}: 'model' must be a state dict, got {type(obj['model']).__name__}")
    return obj


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict:
    """Read and validate a checkpoint (weights_only=True: no code in the file can run).

    Raises FileNotFoundError / IsADirectoryError for a wrong path and CheckpointError for an empty,
    truncated, unsafe, other-format-version or incomplete file. Whether its backbone is known here
    is the registry's to say (``backbones.check_known``)."""
    return validate_checkpoint(safe_load(path, "checkpoint", map_location), os.fspath(path))
