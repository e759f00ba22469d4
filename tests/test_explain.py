"""explain.py: similarity maps sum to the cosine score, have the feature grid's shape, and point
at the part of the image that matters; overlay draws them over the photo."""

from PIL import Image
import pytest
import torch
import torch.nn.functional as F

import backbones
import explain
import models
import preprocessing

pytestmark = pytest.mark.usefixtures("one_torch_thread")

MEAN = torch.tensor(preprocessing.IMAGENET_MEAN).view(3, 1, 1)
STD = torch.tensor(preprocessing.IMAGENET_STD).view(3, 1, 1)
BACKBONES = ["resnet18", "efficientnet_lite0"]


def random_pair(seed=0):
    g = torch.Generator().manual_seed(seed)
    # Different sizes on purpose: the two maps have their own grids.
    return torch.randn(3, 64, 64, generator=g), torch.randn(1, 3, 96, 64, generator=g)


@pytest.fixture(scope="module")
def lite_imagenet():
    return models.zero_shot_model("efficientnet_lite0", weights="imagenet", image_size=128)


def check_sums(model, query, result, tol):
    out = explain.similarity_maps(model, query, result)
    with torch.no_grad():
        e_q, e_r = model.eval()(query.reshape(1, *query.shape[-3:])), model(result)
    assert out["score"] == pytest.approx(float(e_q[0] @ e_r[0]), abs=1e-6)
    assert float(out["query_map"].sum()) == pytest.approx(out["score"], abs=tol)
    assert float(out["result_map"].sum()) == pytest.approx(out["score"], abs=tol)
    return out


@pytest.mark.parametrize("backbone", BACKBONES)
@pytest.mark.parametrize("head", ["linear", "none"])
def test_exact_maps_sum_to_the_score_and_have_the_grid_shape(backbone, head):
    torch.manual_seed(0)
    model = models.build_model(backbone, weights="none", head=head, embedding_size=128)
    query, result = random_pair()
    out = check_sums(model, query, result, tol=1e-5)
    assert out["exact"] is True
    assert out["query_map"].shape == explain.feature_grid(model, query[None])[0].shape[2:] == (2, 2)
    assert out["result_map"].shape == explain.feature_grid(model, result)[0].shape[2:] == (3, 2)
    assert out["query_map"].std() > 0  # not a uniform split of the score


def test_feature_grid_is_the_pooling_input_and_embedding_is_the_model_output():
    torch.manual_seed(0)
    for backbone in BACKBONES:
        model = models.build_model(backbone, weights="none", head="linear").train()
        x = random_pair()[1]
        grid, embedding = explain.feature_grid(model, x)
        assert model.training  # left in the mode it was in
        model.eval()
        assert torch.equal(embedding, model(x))
        assert torch.allclose(F.normalize(model.head(grid.mean((2, 3))), dim=1), embedding, atol=1e-6)


def test_feature_grid_ignores_forwards_of_other_threads_meanwhile():
    """The demo's model is shared with --watch's embedding thread: a forward of another thread in
    the middle of feature_grid's call (forced here, inside the pooling of this thread's call)
    changes neither its grid nor its embedding."""
    import threading

    torch.manual_seed(0)
    model = models.build_model("resnet18", weights="none", head="linear").eval()
    other = torch.randn(3, 3, 64, 64)
    done = []

    def other_thread_forward(module, args):
        if threading.current_thread() is threading.main_thread() and not done:
            t = threading.Thread(target=lambda: done.append(model(other).shape))
            t.start()
            t.join()

    handle = backbones.pooling_module(model.backbone, "resnet18").register_forward_pre_hook(other_thread_forward)
    try:
        x = random_pair()[1]
        grid, embedding = explain.feature_grid(model, x)
    finally:
        handle.remove()
    assert done == [torch.Size([3, model.embedding_size])]  # the other forward ran while the hook was registered
    assert grid.shape[0] == 1 and torch.allclose(embedding, model(x), atol=1e-6)


def test_linear_map_is_the_papers_decomposition_with_the_bias_spread_uniformly():
    torch.manual_seed(1)
    model = models.build_model("resnet18", weights="none", head="linear").eval()
    query, result = random_pair(1)
    out = explain.similarity_maps(model, query, result)
    grid, _ = explain.feature_grid(model, query[None])
    e_r = model(result)[0]
    linear = model.head[1]
    f = grid[0].flatten(1).t()  # [HW, C]
    g_bar = linear(f.mean(0))
    expected = (linear(f) @ e_r) / (f.shape[0] * g_bar.norm())  # (W f_ij + b) . e_r / (HW ||g||)
    assert torch.allclose(out["query_map"].flatten(), expected, atol=1e-6)


@pytest.mark.parametrize("head", ["mlp", "linear", "none"])
def test_projections_are_the_head_linearised_at_the_pooled_feature(head):
    """P[i, j] = (g(f̄) + J_g(f̄) (f_ij - f̄)) / (HW ||g(f̄)||), J from torch.autograd's full Jacobian
    (the mlp head's forward-mode products; the affine heads' one matmul), and P sums to the embedding."""
    torch.manual_seed(5)
    model = models.build_model("resnet18", weights="none", head=head, embedding_size=32).eval()
    x = random_pair(5)[1]
    grid, embedding = explain.feature_grid(model, x)
    p = explain.projections(model, grid)[0]  # [H, W, D]
    f = grid[0].flatten(1).t()  # [HW, C]
    pooled = f.mean(0)
    g = model.head(pooled[None])[0]
    jac = torch.autograd.functional.jacobian(lambda v: model.head(v[None])[0], pooled)  # [D, C]
    expected = (g + (f - pooled) @ jac.t()) / (f.shape[0] * g.norm())
    assert torch.allclose(p.reshape(-1, p.shape[-1]), expected.detach(), atol=1e-6)
    assert torch.allclose(p.sum((0, 1)), embedding[0], atol=1e-5)


@pytest.mark.parametrize("backbone", BACKBONES)
def test_mlp_head_is_a_linearisation_whose_maps_still_sum_to_the_score(backbone):
    torch.manual_seed(2)
    model = models.build_model(backbone, weights="none", head="mlp")
    query, result = random_pair(2)
    # The deviations from the pooled feature average to zero, so the first-order expansion sums to
    # the score exactly; observed |sum - score| <= 2e-7 (float32 rounding).
    out = check_sums(model, query, result, tol=1e-5)
    assert out["exact"] is False


def test_imagenet_lite0_zero_shot_maps_sum_to_the_score(lite_imagenet):
    query, result = random_pair(3)
    out = check_sums(lite_imagenet, query, result, tol=1e-5)
    assert out["exact"] is True


@pytest.mark.parametrize("head", ["linear", "mlp", "none"])
def test_many_results_in_one_pass_equal_the_pairwise_maps(head):
    torch.manual_seed(4)
    model = models.build_model("resnet18", weights="none", head=head, embedding_size=64)
    g = torch.Generator().manual_seed(4)
    query, results = torch.randn(3, 64, 64, generator=g), torch.randn(3, 3, 64, 64, generator=g)
    many = explain.similarity_maps_many(model, query, results)
    assert len(many) == 3
    for k, out in enumerate(many):
        pair = explain.similarity_maps(model, query, results[k])
        assert out["score"] == pytest.approx(pair["score"], abs=1e-5)
        assert out["exact"] is pair["exact"]
        for side in ("query_map", "result_map"):
            # batched convolutions round differently from single ones: 1e-5 of a cosine
            assert torch.allclose(out[side], pair[side], atol=1e-5), (k, side)
            assert float(out[side].sum()) == pytest.approx(out["score"], abs=1e-5)
    with pytest.raises(ValueError, match="like the query"):
        explain.similarity_maps_many(model, query, torch.randn(2, 3, 32, 32))


def patch_image(top, left, seed):
    """A 128 px grey image with a 32 px random-texture patch at (top, left), normalised."""
    img = torch.full((3, 128, 128), 0.5)
    img[:, top : top + 32, left : left + 32] = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(seed))
    return (img - MEAN) / STD


@pytest.mark.parametrize("top, left", [(0, 0), (96, 96), (0, 96)])
def test_self_similarity_map_peaks_at_the_pasted_patch(lite_imagenet, top, left):
    """Against itself, the 4 x 4 map of the image puts its weight in the quadrant of the patch:
    that quadrant's mean is > 3x each other quadrant's (observed 5-26x) and holds the peak."""
    x = patch_image(top, left, seed=top + left)
    qm = explain.similarity_maps(lite_imagenet, x, x)["query_map"]
    assert qm.shape == (4, 4)
    qi, qj = 2 * (top >= 64), 2 * (left >= 64)
    quadrants = {(i, j): qm[i : i + 2, j : j + 2].mean() for i in (0, 2) for j in (0, 2)}
    patch = quadrants.pop((qi, qj))
    assert all(patch > 3 * other for other in quadrants.values()), (qm, top, left)
    peak_i, peak_j = divmod(int(qm.argmax()), 4)
    assert (2 * (peak_i >= 2), 2 * (peak_j >= 2)) == (qi, qj)


def test_overlay_is_an_rgb_image_of_the_input_size():
    image = Image.new("L", (80, 50), 128)  # not RGB, not square
    heat = torch.tensor([[0.0, 1.0], [0.5, 0.2], [0.1, 0.3]])
    out = explain.overlay(image, heat, alpha=0.5)
    assert out.mode == "RGB" and out.size == (80, 50)
    assert explain.overlay(image, heat, alpha=0.0).tobytes() == image.convert("RGB").tobytes()
    hot = explain.overlay(image, heat, alpha=1.0)
    assert hot.getpixel((79, 0)) != hot.getpixel((0, 0))  # the map's values show
    assert explain.overlay(image, torch.ones(2, 2)).size == (80, 50)  # a constant map is fine
