"""losses.py against brute force and against pytorch-metric-learning."""

import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import losses
from losses import MINING_MODES, MultiSimilarityLoss, TripletLoss, build_loss, mine_triplets, pairwise_squared_distances

pml_losses = pytest.importorskip("pytorch_metric_learning.losses")
pml_miners = pytest.importorskip("pytorch_metric_learning.miners")
pml_distances = pytest.importorskip("pytorch_metric_learning.distances")
pml_reducers = pytest.importorskip("pytorch_metric_learning.reducers")

MARGINS = [0.05, 0.2, 0.5, 1.0, 2.0]


# ============ brute force reference ============


def brute_force_triplets(dist, labels, margin, mining):
    """Enumerate every (a, p, n), then apply the rule of each mode as written in the SPEC.
    Comparisons in float32, as torch does them, so boundaries compare the same way."""
    d = dist.numpy().astype(np.float32)
    y = labels.tolist()
    m = np.float32(margin)
    every = [
        (a, p, n) for a, p, n in itertools.product(range(len(y)), repeat=3) if p != a and y[p] == y[a] and y[n] != y[a]
    ]

    def semihard(a, p, n):
        return d[a, p] < d[a, n] < np.float32(d[a, p] + m)

    if mining == "batch_all":
        return every
    if mining == "batch_all_semihard":
        return [t for t in every if semihard(*t)]
    chosen = []
    for a in sorted({t[0] for t in every}):
        mine = [t for t in every if t[0] == a]
        # hardest positive: largest d_ap, lowest index on ties
        p = min({t[1] for t in mine}, key=lambda p: (-d[a, p], p))
        negatives = sorted({t[2] for t in mine})
        candidates = [n for n in negatives if mining == "semihard" and semihard(a, p, n)]
        n = min(candidates or negatives, key=lambda n: (d[a, n], n))
        chosen.append((a, p, n))
    return chosen


def reference_loss(dist, triplets, margin, mining):
    if not triplets:
        return 0.0
    values = [max(0.0, float(dist[a, p]) - float(dist[a, n]) + margin) for a, p, n in triplets]
    if mining.startswith("batch_all"):
        nonzero = [v for v in values if v > 0]
        return sum(nonzero) / max(len(nonzero), 1)
    return sum(values) / len(values)


def random_batch(seed, n=24, classes=6, dim=8):
    g = torch.Generator().manual_seed(seed)
    emb = F.normalize(torch.randn(n, dim, generator=g), dim=1)
    labels = torch.randint(0, classes, (n,), generator=g)
    labels[-1] = 99  # a class with a single image: anchor without positive
    return emb, labels


def tied_batch(seed):
    """Unit vectors from {+-e_i} in 4-D with duplicates: every distance is exactly 0, 2 or 4, so
    positives and negatives tie and d_an == d_ap + margin happens for margins 2 and 4."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.cat([torch.eye(4), -torch.eye(4)])
    emb = basis[torch.randint(0, 8, (20,), generator=g)]
    labels = torch.randint(0, 4, (20,), generator=g)
    return emb, labels


def as_list(triplets):
    return list(zip(*(t.tolist() for t in triplets)))


# ============ mining ============


def test_distances_are_squared_euclidean():
    emb, _ = random_batch(0)
    assert torch.allclose(pairwise_squared_distances(emb), torch.cdist(emb, emb) ** 2, atol=1e-5)
    assert torch.allclose(pairwise_squared_distances(emb), 2 - 2 * emb @ emb.T, atol=1e-5)


@pytest.mark.parametrize("mining", MINING_MODES)
@pytest.mark.parametrize("margin", MARGINS)
def test_mined_triplets_equal_brute_force(mining, margin):
    for seed in range(3):
        emb, labels = random_batch(seed)
        dist = pairwise_squared_distances(emb)
        got = as_list(mine_triplets(dist, labels, margin, mining))
        assert got == brute_force_triplets(dist, labels, margin, mining)


@pytest.mark.parametrize("mining", MINING_MODES)
@pytest.mark.parametrize("margin", [0.5, 1.0, 2.0, 2.5, 4.0])
def test_mined_triplets_with_ties_equal_brute_force(mining, margin):
    for seed in range(4):
        emb, labels = tied_batch(seed)
        dist = pairwise_squared_distances(emb)
        assert set(dist.unique().tolist()) <= {0.0, 2.0, 4.0}
        got = as_list(mine_triplets(dist, labels, margin, mining))
        assert got == brute_force_triplets(dist, labels, margin, mining)
        loss, stats = TripletLoss(margin, mining)(emb, labels)
        assert stats["valid_triplets"] == len(got)
        assert loss.item() == pytest.approx(reference_loss(dist, got, margin, mining), abs=1e-6)


def test_semihard_rule_by_hand():
    # 1-D points: d(i, j) = (x_i - x_j)^2, all exact in float32.
    emb = torch.tensor([[0.0], [0.5], [0.5], [-0.5], [1.0]])
    labels = torch.tensor([0, 0, 1, 1, 2])
    dist = pairwise_squared_distances(emb)
    # anchor 0: d_ap = 0.25 (p=1); negatives 2, 3 at 0.25 (tie), 4 at 1.0.
    # margin 1: semi-hard window (0.25, 1.25) holds only 4.
    # margin 0.5: window (0.25, 0.75) is empty -> hardest negative, tie 2/3 -> lowest index 2.
    # anchor 1: d_ap = 0.25; negatives 2 at 0, 4 at 0.25 (= d_ap: not semi-hard), 3 at 1.0.
    triplets = dict((a, (p, n)) for a, p, n in as_list(mine_triplets(dist, labels, 1.0, "semihard")))
    assert triplets[0] == (1, 4) and triplets[1] == (0, 3)
    triplets = dict((a, (p, n)) for a, p, n in as_list(mine_triplets(dist, labels, 0.5, "semihard")))
    assert triplets[0] == (1, 2) and triplets[1] == (0, 2)
    assert 4 not in triplets  # no positive: not an anchor


@pytest.mark.parametrize("mining", MINING_MODES)
@pytest.mark.parametrize(
    "labels", [torch.arange(8), torch.zeros(8, dtype=torch.long)], ids=["all-distinct", "one-class"]
)
def test_no_triplet_gives_zero_loss_that_backpropagates(mining, labels):
    emb = F.normalize(torch.randn(8, 16), dim=1).requires_grad_()
    loss, stats = TripletLoss(0.5, mining)(emb, labels)
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert emb.grad is not None and torch.all(emb.grad == 0)
    assert stats["valid_triplets"] == 0 and stats["active_triplets"] == 0
    assert all(isinstance(v, float) for v in stats.values())


@pytest.mark.parametrize("mining", MINING_MODES)
def test_loss_value_stats_and_gradient(mining):
    emb, labels = random_batch(3)
    emb.requires_grad_()
    loss, stats = TripletLoss(0.5, mining)(emb, labels)
    dist = pairwise_squared_distances(emb.detach())
    triplets = brute_force_triplets(dist, labels, 0.5, mining)
    assert loss.item() == pytest.approx(reference_loss(dist, triplets, 0.5, mining), rel=1e-5)
    assert stats["valid_triplets"] == len(triplets)
    assert stats["active_triplets"] == sum(float(dist[a, p]) - float(dist[a, n]) + 0.5 > 0 for a, p, n in triplets)
    assert stats["mean_d_ap"] == pytest.approx(np.mean([float(dist[a, p]) for a, p, _ in triplets]), rel=1e-5)
    assert stats["mean_d_an"] == pytest.approx(np.mean([float(dist[a, n]) for a, _, n in triplets]), rel=1e-5)
    assert stats["anchors"] == len({a for a, _, _ in brute_force_triplets(dist, labels, 0.5, "batch_all")})
    loss.backward()
    assert torch.isfinite(emb.grad).all() and emb.grad.abs().sum() > 0


# ============ against pytorch-metric-learning ============


def pml_sq_distance():
    return pml_distances.LpDistance(power=2)  # squared Euclidean on normalised embeddings


@pytest.mark.parametrize("margin", MARGINS)
def test_batch_all_semihard_matches_pml(margin):
    for seed in range(3):
        emb, labels = random_batch(seed, n=32, classes=8)
        miner = pml_miners.TripletMarginMiner(margin=margin, type_of_triplets="semihard", distance=pml_sq_distance())
        # Default reducer AvgNonZeroReducer, smooth_loss=False: same reduction as ours.
        loss_fn = pml_losses.TripletMarginLoss(margin=margin, distance=pml_sq_distance())
        mined = miner(emb, labels)
        expected = loss_fn(emb, labels, mined)
        loss, stats = TripletLoss(margin, "batch_all_semihard")(emb, labels)
        assert loss.item() == pytest.approx(expected.item(), abs=1e-5)
        # pml keeps d_an == d_ap + margin (a zero-loss triplet); random data never hits it.
        assert stats["valid_triplets"] == len(mined[0])
        assert set(
            as_list(mine_triplets(pairwise_squared_distances(emb), labels, margin, "batch_all_semihard"))
        ) == set(as_list(mined))


@pytest.mark.parametrize("margin", MARGINS)
def test_batch_all_matches_pml_all_triplets(margin):
    emb, labels = random_batch(5, n=32, classes=8)
    expected = pml_losses.TripletMarginLoss(margin=margin, distance=pml_sq_distance())(emb, labels)
    loss, _ = TripletLoss(margin, "batch_all")(emb, labels)
    assert loss.item() == pytest.approx(expected.item(), abs=1e-5)


@pytest.mark.parametrize("margin", MARGINS)
def test_batch_hard_matches_pml(margin):
    emb, labels = random_batch(6, n=32, classes=8)
    miner = pml_miners.BatchHardMiner(distance=pml_sq_distance())
    loss_fn = pml_losses.TripletMarginLoss(
        margin=margin, distance=pml_sq_distance(), reducer=pml_reducers.MeanReducer()
    )
    expected = loss_fn(emb, labels, miner(emb, labels))
    loss, _ = TripletLoss(margin, "batch_hard")(emb, labels)
    assert loss.item() == pytest.approx(expected.item(), abs=1e-5)


@pytest.mark.parametrize("seed", range(4))
def test_multi_similarity_matches_pml(seed):
    g = torch.Generator().manual_seed(seed)
    # Correlated embeddings so that both mining conditions keep and drop pairs.
    labels = torch.randint(0, 8, (32,), generator=g)
    centers = torch.randn(8, 16, generator=g)
    emb = F.normalize(centers[labels] + 0.8 * torch.randn(32, 16, generator=g), dim=1)
    ref_emb = emb.clone().requires_grad_()
    miner = pml_miners.MultiSimilarityMiner(epsilon=0.1)
    expected = pml_losses.MultiSimilarityLoss(alpha=2, beta=50, base=0.5)(ref_emb, labels, miner(ref_emb, labels))
    expected.backward()
    ours_emb = emb.clone().requires_grad_()
    loss, stats = MultiSimilarityLoss()(ours_emb, labels)
    loss.backward()
    assert loss.item() == pytest.approx(expected.item(), abs=1e-5)
    assert torch.allclose(ours_emb.grad, ref_emb.grad, atol=1e-5)
    a1, p, a2, n = miner(emb, labels)
    assert stats["pos_pairs"] == len(a1) and stats["neg_pairs"] == len(a2)
    assert 0 < stats["neg_pairs"] < ((labels[:, None] != labels[None]).sum())


def test_multi_similarity_without_pairs_is_zero_and_backpropagates():
    emb = F.normalize(torch.randn(6, 8), dim=1).requires_grad_()
    loss, stats = MultiSimilarityLoss()(emb, torch.arange(6))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.all(emb.grad == 0) and stats["valid_triplets"] == 0


# ============ Proxy-Anchor ============


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("margin,alpha", [(0.1, 32.0), (0.3, 16.0)])
def test_proxy_anchor_matches_pml(seed, margin, alpha):
    """Loss and gradients (embeddings and proxies) equal pytorch-metric-learning's
    ProxyAnchorLoss to 1e-5, with arbitrary class ids mapped onto proxies by value and batches
    that leave some proxies without positives."""
    g = torch.Generator().manual_seed(seed)
    classes = torch.tensor([3, 7, 10, 42, 99, 100, 512, 1000])
    labels = classes[torch.randint(0, 6, (24,), generator=g)]  # proxies 6 and 7: no positive
    emb = torch.randn(24, 16, generator=g)
    ours = build_loss("proxy_anchor", margin=margin, alpha=alpha, classes=classes, embedding_size=16)
    ref = pml_losses.ProxyAnchorLoss(len(classes), 16, margin=margin, alpha=alpha)
    with torch.no_grad():
        ref.proxies.copy_(ours.proxies)
    e1, e2 = emb.clone().requires_grad_(), emb.clone().requires_grad_()
    loss, stats = ours(e1, labels)
    expected = ref(e2, torch.searchsorted(classes, labels))
    loss.backward()
    expected.backward()
    assert loss.item() == pytest.approx(expected.item(), abs=1e-5)
    assert torch.allclose(e1.grad, e2.grad, atol=1e-5)
    assert torch.allclose(ours.proxies.grad, ref.proxies.grad, atol=1e-5)
    assert stats["pos_proxies"] == len(torch.unique(labels))


def test_proxy_anchor_refuses_labels_without_a_proxy():
    crit = build_loss("proxy_anchor", classes=[1, 2, 3], embedding_size=4)
    assert crit.needs_training_classes
    with pytest.raises(ValueError, match=r"\[7\].*not training classes"):
        crit(torch.randn(3, 4), torch.tensor([1, 7, 2]))
    with pytest.raises(ValueError, match="2 classes"):
        build_loss("proxy_anchor", classes=[5], embedding_size=4)


# ============ registry and arguments ============


def test_build_loss_registry():
    assert set(losses.LOSSES) == {"triplet", "multi_similarity", "proxy_anchor"}
    # margin=None: each loss's own default margin
    assert build_loss("triplet", margin=None).margin == 0.5
    assert build_loss("proxy_anchor", margin=None, classes=[1, 2], embedding_size=4).margin == 0.1
    crit = build_loss("triplet", margin=0.3, mining="batch_hard")
    assert isinstance(crit, TripletLoss) and crit.margin == 0.3 and crit.mining == "batch_hard"
    assert build_loss("triplet").mining == "semihard"
    # A script may pass its --margin / --mining flags to any loss.
    ms = build_loss("multi_similarity", margin=0.5, mining="semihard", beta=40)
    assert isinstance(ms, MultiSimilarityLoss) and ms.beta == 40


def test_unknown_names_and_bad_values_raise():
    with pytest.raises(ValueError, match="multi_similarity.*triplet|triplet.*multi_similarity"):
        build_loss("contrastive")
    with pytest.raises(ValueError, match="batch_hard"):
        TripletLoss(mining="hardest")
    with pytest.raises(ValueError, match="margin"):
        TripletLoss(margin=0)
    with pytest.raises(ValueError, match="does not take"):
        build_loss("triplet", alpha=2)
    with pytest.raises(ValueError, match="labels"):
        TripletLoss()(torch.randn(4, 8), torch.arange(3))
