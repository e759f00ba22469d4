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

Both maps are dot products with per-location projections (`projections`): M_q[i, j] = P_q[i, j] . e_r
with P_q[i, j] = (g(f̄_q) + J_g(f̄_q)(f^q_ij - f̄_q)) / (HW ||g(f̄_q)||), which depend on one image
only; the demo stores them for every gallery image (search.explain_store).

Maps are computed in float32 with the model in eval mode (dropout off, BatchNorm statistics
fixed), as the embeddings the search uses.
"""

from __future__ import annotations

from contextlib import contextmanager
import functools

import numpy as np
from PIL import Image
import torch
import torch.nn as nn

from models import EmbeddingNet
from preprocessing import IMAGENET_MEAN, IMAGENET_STD

# Heads that are affine in the pooled feature: their maps are an exact decomposition.
EXACT_HEADS = ("linear", "none")
NORMALIZE_EPS = 1e-12  # F.normalize's default, which EmbeddingNet.forward uses


@contextmanager
def _eval_mode(model: nn.Module):
    """``model`` in eval mode inside, as it was after. A model already in eval mode (``training``
    False: what .eval() leaves on every submodule) is not walked again: toggling the ~560 modules of
    EfficientNet-Lite0 costs ~3 ms, a tenth of a CPU query."""
    was_training = model.training
    if was_training:
        model.eval()
    try:
        yield
    finally:
        if was_training:
            model.train(True)


def feature_grid(model: EmbeddingNet, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(grid [N, C, H, W], embedding [N, D]) of an ImageNet-normalised batch x [N, 3, h, w].

    grid is ``model.forward_features(x)``, the input of the backbone's global average pooling;
    embedding is ``model.forward_head(grid)``, which is ``model(x)`` itself. The model runs in eval
    mode without gradients, and is left in the mode it was in.
    """
    with torch.no_grad(), _eval_mode(model):
        grid = model.forward_features(x)
        embedding = model.forward_head(grid)
    return grid.float(), embedding.float()


def projections(model: EmbeddingNet, grids: torch.Tensor) -> torch.Tensor:
    """P [N, H, W, D] of feature grids [N, C, H, W]: what each location contributes to the unit
    embedding, so that a map against any other embedding e is one dot product, M[i, j] = P[i, j] . e
    (module docstring, with u . (f_ij - f̄) = e . J (f_ij - f̄)):

        P[i, j] = ( g(f̄) + J_g(f̄) (f_ij - f̄) ) / ( HW ||g(f̄)|| ).

    Summed over the locations P gives g(f̄) / ||g(f̄)||, the embedding itself (the deviations average
    to zero). Linear head: P[i, j] = (W f_ij + b) / (HW ||g||); no head: f_ij / (HW ||f̄||); MLP head:
    the Jacobian-vector products of its linearisation at f̄. One head pass plus HW batched
    forward-mode products (torch.func.jvp), whatever the head.
    """
    from torch.func import jvp, vmap

    n, c, h, w = grids.shape
    locations = grids.float().reshape(n, c, h * w)
    pooled = locations.mean(2)  # [N, C]
    deviations = (locations - pooled[..., None]).permute(2, 0, 1)  # [HW, N, C]

    def head(f):
        return model.head(f).float()

    with _eval_mode(model):
        g = head(pooled)  # [N, D]
        if is_exact(model):
            # affine head: g(f̄) + J (f_ij - f̄) = g(f_ij), the head at each location (one matmul;
            # the jvp below gives the same numbers ~4x slower for a 49-location grid)
            at = head(locations.permute(2, 0, 1).reshape(-1, c)).reshape(h * w, n, -1)  # [HW, N, D]
        else:
            # enable_grad: callers run under no_grad; forward-mode AD is what is used here
            with torch.enable_grad():
                at = g.detach()[None] + vmap(lambda d: jvp(head, (pooled,), (d,))[1])(deviations)
    g, at = g.detach(), at.detach()
    # The same denominator as F.normalize in EmbeddingNet.forward (its eps), so that the map sums
    # to the model's own score even for a degenerate, near-zero feature.
    norm = g.norm(dim=1).clamp_min(NORMALIZE_EPS)
    p = at / (h * w * norm[None, :, None])
    return p.permute(1, 0, 2).reshape(n, h, w, -1)


def _side_maps(model: EmbeddingNet, grids: torch.Tensor, others: torch.Tensor) -> torch.Tensor:
    """M[n, k, i, j] of image n's grid (``grids`` [N, C, H, W]) against embedding k of its own
    list of others (``others`` [N, K, D]): `projections` . others."""
    return torch.einsum("nijd,nkd->nkij", projections(model, grids), others.float())


def _one(x: torch.Tensor) -> torch.Tensor:
    if x.dim() == 3:
        x = x.unsqueeze(0)
    if x.dim() != 4 or x.shape[0] != 1:
        raise ValueError(f"expected one image [3, h, w] or [1, 3, h, w], got {tuple(x.shape)}")
    return x


def is_exact(model: EmbeddingNet) -> bool:
    """Whether ``model``'s maps are an exact decomposition (linear head or none), not a linearisation."""
    return model.model_args["head"] in EXACT_HEADS


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
    return {
        "query_map": _side_maps(model, grid_q, e_r[None])[0, 0],
        "result_map": _side_maps(model, grid_r, e_q[None])[0, 0],
        "score": float(e_q[0] @ e_r[0]),
        "exact": is_exact(model),
    }


def similarity_maps_many(model: EmbeddingNet, query_x: torch.Tensor, results_x: torch.Tensor) -> list:
    """`similarity_maps` of one query ([3, h, w] or [1, 3, h, w]) against K results of the same
    size ([K, 3, h, w]), with one forward pass over the K + 1 images: the list of K dicts, in the
    order of ``results_x``, each equal to ``similarity_maps(model, query_x, results_x[k])``."""
    query_x = _one(query_x)
    if results_x.dim() != 4 or results_x.shape[1:] != query_x.shape[1:]:
        raise ValueError(
            f"results must be [K, {', '.join(map(str, query_x.shape[1:]))}] like the "
            f"query, got {tuple(results_x.shape)}"
        )
    grids, embeddings = feature_grid(model, torch.cat([query_x, results_x]))
    e_q, e_r = embeddings[:1], embeddings[1:]
    query_maps = _side_maps(model, grids[:1], e_r[None])[0]  # [K, Hq, Wq]
    result_maps = _side_maps(model, grids[1:], e_q.expand(len(e_r), -1)[:, None])[:, 0]
    exact = is_exact(model)
    return [
        {"query_map": query_maps[k], "result_map": result_maps[k], "score": float(e_q[0] @ e_r[k]), "exact": exact}
        for k in range(len(e_r))
    ]


def view_of(x: torch.Tensor) -> Image.Image:
    """The RGB image an ImageNet-normalised [3, h, w] tensor shows (the model's view: what a
    map over its feature grid is drawn on)."""
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    rgb = (x.detach().float().cpu() * std + mean).clamp(0, 1)
    return Image.fromarray((rgb.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))


def dataset_explainer(model: EmbeddingNet, dataset, device="cpu"):
    """A function (query index, [result indices]) -> `similarity_maps_many`'s dicts, each with
    "query_view" and "result_view" (`view_of`) added, over the images of ``dataset`` (its
    transform must be the eval transform: the maps are then those of the embeddings evaluated)."""
    model = model.to(device).eval()

    def explainer(query, results):
        xs = torch.stack([dataset[i][0] for i in [query, *results]]).to(device)
        maps = similarity_maps_many(model, xs[:1], xs[1:])
        views = [view_of(x) for x in xs]
        return [
            {
                **m,
                "query_map": m["query_map"].cpu().numpy(),
                "result_map": m["result_map"].cpu().numpy(),
                "query_view": views[0],
                "result_view": views[k + 1],
            }
            for k, m in enumerate(maps)
        ]

    return explainer


@functools.lru_cache(maxsize=8)
def _colour_table(cmap: str) -> np.ndarray:
    """uint8 [256, 3]: matplotlib's ``cmap`` sampled at 256 levels (its own resolution), so that
    colouring a map is one table lookup instead of a colormap call per pixel."""
    from matplotlib import colormaps  # imported here: only display needs matplotlib

    return (colormaps[cmap](np.linspace(0.0, 1.0, 256))[:, :3] * 255).round().astype(np.uint8)


def overlay(image_pil: Image.Image, heat_map, alpha: float = 0.5, cmap: str = "jet") -> Image.Image:
    """The image with ``heat_map`` ([H, W] tensor or array) drawn over it, for display: the map is
    scaled min-max to [0, 1] (a constant map is drawn at 0), quantised to 256 levels, upsampled
    bilinearly to the image's size, coloured with the matplotlib colormap ``cmap`` and blended,
    ``alpha`` being the heat map's weight. Returns an RGB image of the input's size."""
    image = image_pil.convert("RGB")
    m = np.asarray(heat_map.detach().cpu() if torch.is_tensor(heat_map) else heat_map, dtype=np.float32)
    span = float(m.max() - m.min())
    m = (m - m.min()) / span if span > 0 else np.zeros_like(m)
    # 256 levels on the grid, upsampled as an 8-bit image, coloured through a palette: all in
    # Pillow's C loops (numpy per-pixel work was ~1 ms of the ~1.5 ms an overlay took at 224 px)
    heat = Image.fromarray(np.round(m * 255).astype(np.uint8), mode="L").resize(image.size, Image.BILINEAR)
    heat.putpalette(_colour_table(cmap).tobytes())  # L -> P with the colormap
    return Image.blend(image, heat.convert("RGB"), alpha)
