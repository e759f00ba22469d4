"""Similarity maps: which locations of a query and a result make their cosine score.

After Stylianou et al., "Visualizing Deep Similarity Networks" (WACV 2019). The network is
``EmbeddingNet``: backbone feature map f_ij (C x H x W) -> global average pooling
f̄ = (1/HW) sum_ij f_ij -> head g -> e = g(f̄) / ||g(f̄)||. The score of a query q and a result r is
the cosine s = e_q . e_r.

Definition (one formula for every head). With u = J_g(f̄_q)^T e_r, the gradient of g(f̄) . e_r at
the query's pooled feature, the query map is

    M_q[i, j] = ( g(f̄_q) . e_r  +  u . (f^q_ij - f̄_q) ) / ( HW ||g(f̄_q)|| )

and the result map M_r is the same with q and r swapped.

* Linear head, g(f) = W f + b: u = W^T e_r and M_q[i, j] = (W f^q_ij + b) . e_r / (HW ||W f̄_q + b||),
  the paper's decomposition with the **bias distributed uniformly over the locations** (each
  location carries b / HW of it, as the mean of W f_ij + b is W f̄ + b). sum_ij M_q = s exactly.
* No head (zero-shot), g(f) = f: M_q[i, j] = f^q_ij . e_r / (HW ||f̄_q||); sum_ij M_q = s exactly.
* MLP head (nonlinear): the formula is the first-order Taylor expansion of g at f̄_q applied to
  each location. The deviations f_ij - f̄ average to zero, so the map still sums to s (up to
  float rounding), but how much each location contributes is a linearisation, not an exact
  decomposition: ``exact`` is False.

Maps are computed in float32 with the model in eval mode (dropout off, BatchNorm statistics
fixed), as the embeddings the search uses.
"""
from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from models import EmbeddingNet

# Heads that are affine in the pooled feature: their maps are an exact decomposition.
EXACT_HEADS = ("linear", "none")
NORMALIZE_EPS = 1e-12  # F.normalize's default, which EmbeddingNet.forward uses


def _pooling_module(model: EmbeddingNet) -> nn.Module:
    """The backbone's global average pooling: torchvision resnets / efficientnet_b0 have
    ``avgpool``; our EfficientNetLite wraps a timm network whose pooling is ``net.global_pool``."""
    backbone = model.backbone
    pool = getattr(backbone, "avgpool", None)
    if pool is None:
        pool = getattr(getattr(backbone, "net", None), "global_pool", None)
    if not isinstance(pool, nn.Module):
        raise ValueError(f"no global pooling module found in backbone {type(backbone).__name__}: "
                         "explain.py knows torchvision's avgpool and timm's global_pool")
    return pool


@contextmanager
def _eval_mode(model: nn.Module):
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def feature_grid(model: EmbeddingNet, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(grid [N, C, H, W], embedding [N, D]) of an ImageNet-normalised batch x [N, 3, h, w].

    grid is the backbone's last feature map, the input of its global average pooling (caught by a
    forward pre-hook, so the backbone runs once, unchanged); embedding is ``model(x)`` itself.
    The model runs in eval mode without gradients, and is left in the mode it was in.
    """
    caught = []
    handle = _pooling_module(model).register_forward_pre_hook(
        lambda module, args: caught.append(args[0]))
    try:
        with torch.no_grad(), _eval_mode(model):
            embedding = model(x)
    finally:
        handle.remove()
    if len(caught) != 1 or caught[0].dim() != 4:
        raise RuntimeError(f"expected one 4-d pooling input, caught {[t.shape for t in caught]}")
    return caught[0].float(), embedding.float()


def _side_map(model: EmbeddingNet, grid: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """M[i, j] of one image's grid [C, H, W] against the other image's embedding [D] (module
    docstring): the constant term g(f̄) . e_other spread uniformly, plus u . (f_ij - f̄)."""
    c, h, w = grid.shape
    locations = grid.reshape(c, h * w).t()                  # [HW, C]
    pooled = locations.mean(0).detach().requires_grad_(True)
    with torch.enable_grad(), _eval_mode(model):
        g = model.head(pooled.unsqueeze(0)).squeeze(0).float()
        agreement = g @ other
        # u = J^T e_other: one vector-Jacobian product, whatever the head.
        (u,) = torch.autograd.grad(agreement, pooled)
    contributions = agreement.detach() + (locations - pooled.detach()) @ u
    # The same denominator as F.normalize in EmbeddingNet.forward (its eps), so that the map sums
    # to the model's own score even for a degenerate, near-zero feature.
    norm = g.detach().norm().clamp_min(NORMALIZE_EPS)
    return (contributions / (h * w * norm)).reshape(h, w)


def _one(x: torch.Tensor) -> torch.Tensor:
    if x.dim() == 3:
        x = x.unsqueeze(0)
    if x.dim() != 4 or x.shape[0] != 1:
        raise ValueError(f"expected one image [3, h, w] or [1, 3, h, w], got {tuple(x.shape)}")
    return x


def similarity_maps(model: EmbeddingNet, query_x: torch.Tensor, result_x: torch.Tensor) -> dict:
    """Where a query and a result agree, for one pair of ImageNet-normalised images
    ([3, h, w] or [1, 3, h, w]; the two sizes may differ).

    Returns {"query_map": [Hq, Wq] tensor, "result_map": [Hr, Wr] tensor, "score": float,
    "exact": bool}: query_map[i, j] is how much query location (i, j) agrees with the result's
    embedding, result_map the same the other way (definition in the module docstring; the grids
    are the backbone's feature map, e.g. h/32 x w/32). score is the cosine e_q . e_r. Each map
    sums to score: exactly (to float rounding) for the linear head and no head (exact=True); for
    the MLP head the per-location split is a first-order Taylor linearisation at the pooled
    feature (exact=False).
    """
    grid_q, e_q = feature_grid(model, _one(query_x))
    grid_r, e_r = feature_grid(model, _one(result_x))
    return {"query_map": _side_map(model, grid_q[0], e_r[0]),
            "result_map": _side_map(model, grid_r[0], e_q[0]),
            "score": float(e_q[0] @ e_r[0]),
            "exact": model.model_args["head"] in EXACT_HEADS}


def overlay(image_pil: Image.Image, heat_map, alpha: float = 0.5, cmap: str = "jet") -> Image.Image:
    """The image with ``heat_map`` ([H, W] tensor or array) drawn over it, for display: the map is
    upsampled bilinearly to the image's size, scaled min-max to [0, 1] (a constant map is drawn at
    0), coloured with the matplotlib colormap ``cmap`` and blended, ``alpha`` being the heat map's
    weight. Returns an RGB image of the input's size."""
    from matplotlib import colormaps  # imported here: only display needs matplotlib

    image = image_pil.convert("RGB")
    m = torch.as_tensor(np.asarray(heat_map, dtype=np.float32))[None, None]
    m = F.interpolate(m, size=(image.height, image.width), mode="bilinear", align_corners=False)[0, 0]
    span = float(m.max() - m.min())
    m = (m - m.min()) / span if span > 0 else torch.zeros_like(m)
    colours = colormaps[cmap](m.numpy())[..., :3]            # RGBA in [0, 1] -> RGB
    heat = Image.fromarray((colours * 255).round().astype(np.uint8))  # H x W x 3: RGB
    return Image.blend(image, heat, alpha)
