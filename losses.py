"""Metric-learning losses: triplet loss with in-batch mining, Multi-Similarity and Proxy-Anchor.

Definitions used throughout (B embeddings, labels y):
  d(i, j)   squared Euclidean distance ||e_i - e_j||^2 (= 2 - 2 cos on unit vectors), computed
            in fp32 from the Gram matrix and clamped at 0.
  positive  of anchor a: p != a with y_p == y_a.   negative: n with y_n != y_a.
  triplet   (a, p, n); loss max(0, d(a, p) - d(a, n) + margin).
  semi-hard negative of (a, p): d(a, p) < d(a, n) < d(a, p) + margin (both strict: a negative
            exactly at either bound is not semi-hard; at the upper bound its loss is 0 anyway).

Everything works on the B x B distance matrix with masks: no Python loop over anchors, and the
same code runs on any device.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn as nn
import torch.nn.functional as F

MINING_MODES = ("semihard", "batch_hard", "batch_all", "batch_all_semihard")


def pairwise_squared_distances(embeddings: torch.Tensor) -> torch.Tensor:
    """B x B matrix of squared Euclidean distances, fp32, clamped at 0."""
    x = embeddings.float()
    sq = (x * x).sum(dim=1)
    # ||a||^2 + ||b||^2 - 2ab: one matmul instead of a B x B x D difference tensor; rounding can
    # push it a little below 0 for (near-)identical vectors, hence the clamp.
    return (sq[:, None] + sq[None, :] - 2.0 * (x @ x.T)).clamp_min(0.0)


def _check_inputs(embeddings: torch.Tensor, labels) -> torch.Tensor:
    if embeddings.dim() != 2:
        raise ValueError(f"embeddings must be (batch, dim), got shape {tuple(embeddings.shape)}")
    labels = torch.as_tensor(labels, device=embeddings.device)
    if labels.dim() != 1 or labels.numel() != embeddings.shape[0]:
        raise ValueError(
            f"labels must be 1-D with one label per embedding: got shape "
            f"{tuple(labels.shape)} for {embeddings.shape[0]} embeddings"
        )
    return labels


def _pair_masks(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(labels.numel(), dtype=torch.bool, device=labels.device)
    return same & ~eye, ~same


def mine_triplets(
    dist: torch.Tensor, labels: torch.Tensor, margin: float, mining: str = "semihard"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Indices (a, p, n) of the triplets a mining mode uses, from the distance matrix ``dist``.

    semihard           one triplet per anchor that has a positive and a negative (the original project's
                       rule): p = hardest positive (largest d_ap); n = the semi-hard negative of
                       (a, p) with the smallest d_an, or, when there is none, the hardest
                       negative overall (smallest d_an).
    batch_hard         one triplet per such anchor: hardest positive, hardest negative
                       (Hermans et al. 2017).
    batch_all          every triplet (a, p, n).
    batch_all_semihard every triplet whose negative is semi-hard for (a, p) (as
                       pytorch-metric-learning's TripletMarginMiner(type_of_triplets="semihard"),
                       except that d_an = d_ap + margin exactly is excluded here).
    Ties: among equal distances the lowest index is chosen; anchors come out in increasing order;
    batch_all modes list triplets in (a, p, n) lexicographic order.
    """
    if mining not in MINING_MODES:
        raise ValueError(f"unknown mining {mining!r}; choose one of {list(MINING_MODES)}")
    pos, neg = _pair_masks(labels)
    if mining in ("batch_all", "batch_all_semihard"):
        keep = pos[:, :, None] & neg[:, None, :]
        if mining == "batch_all_semihard":
            d_ap, d_an = dist[:, :, None], dist[:, None, :]
            keep &= (d_an > d_ap) & (d_an < d_ap + margin)
        a, p, n = keep.nonzero(as_tuple=True)
        return a, p, n
    inf = torch.tensor(float("inf"), dtype=dist.dtype, device=dist.device)
    anchors = (pos.any(dim=1) & neg.any(dim=1)).nonzero(as_tuple=True)[0]
    # argmax/argmin return the first extreme index: that is the tie rule.
    p = torch.where(pos, dist, -inf).argmax(dim=1)
    neg_dist = torch.where(neg, dist, inf)
    n = neg_dist.argmin(dim=1)
    if mining == "semihard":
        d_ap = dist.gather(1, p[:, None])
        semi = neg & (dist > d_ap) & (dist < d_ap + margin)
        n = torch.where(semi.any(dim=1), torch.where(semi, dist, inf).argmin(dim=1), n)
    return anchors, p[anchors], n[anchors]


class TripletLoss(nn.Module):
    """Triplet loss on squared Euclidean distances with in-batch mining (see mine_triplets).

    Reduction: "semihard" and "batch_hard" average over their triplets (one per valid anchor,
    zero-loss ones included, as the original project did); "batch_all" and "batch_all_semihard" average over
    the triplets with non-zero loss (pytorch-metric-learning's AvgNonZeroReducer), since most of
    the B^3 triplets are easy and would dilute the gradient.
    A batch without any triplet gives a zero loss that still backpropagates (to zero gradients).

    forward(embeddings (B, D), labels (B,)) -> (loss, stats) with python-float stats:
      valid_triplets   triplets the mode uses (per-anchor modes: anchors with a positive and a negative)
      active_triplets  of those, the ones with loss > 0
      anchors          anchors with at least one positive and one negative
      semihard_triplets of the used triplets, those whose negative is semi-hard
      mean_d_ap, mean_d_an  mean distances over the used triplets (0.0 when there are none;
                       weight by valid_triplets when averaging over batches)
    """

    def __init__(self, margin: float = 0.5, mining: str = "semihard"):
        super().__init__()
        if not margin > 0:
            raise ValueError(f"margin must be > 0, got {margin!r}")
        if mining not in MINING_MODES:
            raise ValueError(f"unknown mining {mining!r}; choose one of {list(MINING_MODES)}")
        self.margin = float(margin)
        self.mining = mining

    def extra_repr(self) -> str:
        return f"margin={self.margin}, mining={self.mining!r}"

    def forward(self, embeddings: torch.Tensor, labels) -> tuple[torch.Tensor, dict]:
        labels = _check_inputs(embeddings, labels)
        dist = pairwise_squared_distances(embeddings)
        a, p, n = mine_triplets(dist.detach(), labels, self.margin, self.mining)
        d_ap, d_an = dist[a, p], dist[a, n]
        losses = F.relu(d_ap - d_an + self.margin)
        active = losses > 0
        if a.numel() == 0:
            loss = embeddings.sum() * 0.0
        elif self.mining.startswith("batch_all"):
            loss = losses.sum() / active.sum().clamp_min(1)
        else:
            loss = losses.mean()
        pos, neg = _pair_masks(labels)
        with torch.no_grad():
            count = max(a.numel(), 1)
            semihard = (d_an > d_ap) & (d_an < d_ap + self.margin)
            values = torch.stack(
                [
                    torch.tensor(float(a.numel()), device=dist.device),
                    active.sum().float(),
                    (pos.any(dim=1) & neg.any(dim=1)).sum().float(),
                    semihard.sum().float(),
                    d_ap.sum() / count,
                    d_an.sum() / count,
                ]
            ).tolist()  # one device->host transfer for all statistics
        names = ("valid_triplets", "active_triplets", "anchors", "semihard_triplets", "mean_d_ap", "mean_d_an")
        return loss, dict(zip(names, values))


class MultiSimilarityLoss(nn.Module):
    """Multi-Similarity loss with its pair mining (Wang et al., CVPR 2019).

    On cosine similarities S of the L2-normalised embeddings, for each anchor i:
      mining: keep positive j if S_ij - epsilon < max_{k negative} S_ik,
              keep negative k if S_ik + epsilon > min_{j positive} S_ij;
      loss_i = 1/alpha * log(1 + sum_{kept j} exp(-alpha (S_ij - base)))
             + 1/beta  * log(1 + sum_{kept k} exp( beta (S_ik - base)));
      loss = mean over all B anchors (anchors with nothing kept contribute 0).
    Defaults alpha=2, beta=50, base (lambda)=0.5, epsilon=0.1 are pytorch-metric-learning's
    MultiSimilarityLoss + MultiSimilarityMiner defaults, which this reproduces; the authors' code
    uses beta=40 with the same alpha, base and epsilon.

    Stats (python floats): valid_triplets = anchors with a positive and a negative in the batch;
    active_triplets = anchors with at least one mined pair; pos_pairs / neg_pairs = mined pairs;
    mean_d_ap / mean_d_an = mean squared distance (2 - 2S) over all positive / negative pairs.
    """

    def __init__(self, alpha: float = 2.0, beta: float = 50.0, base: float = 0.5, epsilon: float = 0.1):
        super().__init__()
        if not (alpha > 0 and beta > 0 and epsilon >= 0):
            raise ValueError(
                f"need alpha > 0, beta > 0, epsilon >= 0; got alpha={alpha}, beta={beta}, epsilon={epsilon}"
            )
        self.alpha, self.beta, self.base, self.epsilon = float(alpha), float(beta), float(base), float(epsilon)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, beta={self.beta}, base={self.base}, epsilon={self.epsilon}"

    @staticmethod
    def _log1p_sum_exp(z: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        # log(1 + sum_keep exp(z)) per row, stable: logsumexp over the kept entries and a 0.
        z = z.masked_fill(~keep, float("-inf"))
        return torch.logsumexp(torch.cat([z, z.new_zeros(z.shape[0], 1)], dim=1), dim=1)

    def forward(self, embeddings: torch.Tensor, labels) -> tuple[torch.Tensor, dict]:
        labels = _check_inputs(embeddings, labels)
        x = F.normalize(embeddings.float(), dim=1)
        sim = x @ x.T
        pos, neg = _pair_masks(labels)
        with torch.no_grad():
            s = sim.detach()
            max_neg = torch.where(neg, s, float("-inf")).max(dim=1, keepdim=True).values
            min_pos = torch.where(pos, s, float("inf")).min(dim=1, keepdim=True).values
            pos_keep = pos & (s - self.epsilon < max_neg)
            neg_keep = neg & (s + self.epsilon > min_pos)
        pos_loss = self._log1p_sum_exp(-self.alpha * (sim - self.base), pos_keep) / self.alpha
        neg_loss = self._log1p_sum_exp(self.beta * (sim - self.base), neg_keep) / self.beta
        loss = (pos_loss + neg_loss).mean()
        with torch.no_grad():
            dist = 2.0 - 2.0 * s
            values = torch.stack(
                [
                    (pos.any(dim=1) & neg.any(dim=1)).sum().float(),
                    (pos_keep.any(dim=1) | neg_keep.any(dim=1)).sum().float(),
                    pos_keep.sum().float(),
                    neg_keep.sum().float(),
                    (dist * pos).sum() / pos.sum().clamp_min(1),
                    (dist * neg).sum() / neg.sum().clamp_min(1),
                ]
            ).tolist()
        names = ("valid_triplets", "active_triplets", "pos_pairs", "neg_pairs", "mean_d_ap", "mean_d_an")
        return loss, dict(zip(names, values))


class ProxyAnchorLoss(nn.Module):
    """Proxy-Anchor loss (Kim, Kim, Cho & Kwak, CVPR 2020): one learnable proxy per training
    product, every proxy an anchor.

    With s(x, p) the cosine similarity between embedding x and proxy p, P the proxies of all
    ``classes``, P+ those with at least one embedding of their class in the batch, X_p+ the batch
    embeddings of p's class and X_p- the others:

      loss = 1/|P+| sum_{p in P+} log(1 + sum_{x in X_p+} exp(-alpha (s(x, p) - margin)))
           + 1/|P|  sum_{p in P}  log(1 + sum_{x in X_p-} exp( alpha (s(x, p) + margin)))

    Defaults margin 0.1, alpha 32 and the kaiming-normal (fan_out) proxy initialisation are the
    paper's and pytorch-metric-learning's ``ProxyAnchorLoss``, which this reproduces. The paper
    trains the proxies with a learning rate 100x the network's (train.py: ``--proxy_lr_mult``).

    ``classes``: the training class ids (any integers); labels are mapped onto proxies by value, so
    a label outside ``classes`` (e.g. a validation product) raises ValueError: the loss is defined
    on training classes only (``needs_training_classes``).
    Stats: valid_triplets = anchors of P+ (proxies with a positive in the batch), pos_proxies (the
    same), mean_d_ap / mean_d_an = mean squared distance 2 - 2s to the own / other proxies.
    """

    needs_training_classes = True

    def __init__(self, classes, embedding_size: int, margin: float = 0.1, alpha: float = 32.0):
        super().__init__()
        classes = torch.as_tensor(classes).long().unique()  # sorted
        if classes.numel() < 2 or embedding_size < 1 or not alpha > 0:
            raise ValueError(
                f"Proxy-Anchor needs >= 2 classes, embedding_size >= 1 and alpha > 0; "
                f"got {classes.numel()} classes, embedding_size {embedding_size}, "
                f"alpha {alpha}"
            )
        self.register_buffer("classes", classes)
        self.proxies = nn.Parameter(torch.empty(classes.numel(), embedding_size))
        nn.init.kaiming_normal_(self.proxies, mode="fan_out")
        self.margin, self.alpha = float(margin), float(alpha)

    def extra_repr(self) -> str:
        return f"classes={self.classes.numel()}, margin={self.margin}, alpha={self.alpha}"

    def proxy_index(self, labels: torch.Tensor) -> torch.Tensor:
        """Row of ``proxies`` for each label (ValueError for a label that has no proxy)."""
        idx = torch.searchsorted(self.classes, labels.long()).clamp_max(self.classes.numel() - 1)
        unknown = self.classes[idx] != labels
        if unknown.any():
            raise ValueError(
                f"labels {labels[unknown][:5].tolist()} are not training classes of "
                "this Proxy-Anchor loss (it has a proxy per training class only)"
            )
        return idx

    def forward(self, embeddings: torch.Tensor, labels) -> tuple[torch.Tensor, dict]:
        labels = _check_inputs(embeddings, labels)
        sim = F.normalize(embeddings.float(), dim=1) @ F.normalize(self.proxies.float(), dim=1).T
        pos = F.one_hot(self.proxy_index(labels), self.classes.numel()).bool()  # B x C
        with_pos = pos.any(dim=0)

        def log1p_sum_exp(z, keep):  # log(1 + sum over the kept rows of exp(z)), per proxy
            z = z.masked_fill(~keep, float("-inf"))
            return torch.logsumexp(torch.cat([z, z.new_zeros(1, z.shape[1])], dim=0), dim=0)

        pos_term = log1p_sum_exp(-self.alpha * (sim - self.margin), pos)
        neg_term = log1p_sum_exp(self.alpha * (sim + self.margin), ~pos)
        loss = pos_term.sum() / with_pos.sum().clamp_min(1) + neg_term.sum() / pos.shape[1]
        with torch.no_grad():
            dist = 2.0 - 2.0 * sim.detach()
            values = torch.stack(
                [
                    with_pos.sum().float(),
                    (dist * pos).sum() / pos.sum().clamp_min(1),
                    (dist * ~pos).sum() / (~pos).sum().clamp_min(1),
                ]
            ).tolist()
        return loss, {
            "valid_triplets": values[0],
            "pos_proxies": values[0],
            "mean_d_ap": values[1],
            "mean_d_an": values[2],
        }


LOSSES = {
    "triplet": TripletLoss,
    "multi_similarity": MultiSimilarityLoss,
    "proxy_anchor": ProxyAnchorLoss,
}
# Arguments a training script passes for every loss; a loss that has no such parameter ignores
# them (Multi-Similarity has base/epsilon instead of a margin and does its own mining; only
# proxy losses need the training classes and the embedding size). margin=None: the loss's own
# default margin (triplet 0.5, Proxy-Anchor 0.1).
SHARED_LOSS_ARGS = ("margin", "mining", "classes", "embedding_size")


def build_loss(name: str, margin: float | None = None, **kwargs) -> nn.Module:
    """LOSSES[name] built with ``margin`` and ``kwargs``. The SHARED_LOSS_ARGS are only passed to
    losses that take them (margin only when not None); any other unknown keyword raises
    ValueError."""
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; choose one of {sorted(LOSSES)}")
    cls = LOSSES[name]
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self"}
    kwargs = {**({"margin": margin} if margin is not None else {}), **kwargs}
    unknown = sorted(k for k in kwargs if k not in accepted and k not in SHARED_LOSS_ARGS)
    if unknown:
        raise ValueError(f"loss {name!r} does not take {unknown}; it takes {sorted(accepted)}")
    return cls(**{k: v for k, v in kwargs.items() if k in accepted})
