"""Batch samplers of the training loader: P×K batches (``pk``, the default) and the original
project's random batches (``random``). ``BATCH_SAMPLERS`` is the table of ``--sampler`` choices.

With DDP, each of ``num_replicas`` processes takes every ``num_replicas``-th batch of the same
seeded sequence, starting at its ``rank``.
"""

from __future__ import annotations

import math

import numpy as np
import torch

BATCH_SAMPLERS = ("pk", "random")


class PKSampler(torch.utils.data.Sampler):
    """Batch sampler: every batch holds ``p`` distinct products × ``k`` images of each.

    Epoch: every product is cut into chunks of ``k`` of its images, shuffled — about
    ``n_images // k`` chunks of a product (at least one); a product with fewer than ``k``
    images gets all of them plus draws with replacement. The chunks of all products are
    shuffled and packed greedily into batches of ``p`` chunks of distinct products; a new
    round of chunks is cut whenever they run out. Over an epoch nearly every image is seen
    about once.

    Epoch length: ``len(sampler)`` = batches per epoch on each rank =
    ``max(1, len(class_ids) // (p * k) // num_replicas)``, i.e. about one pass over the
    images across all ranks. All ranks build the same global list of
    ``len(sampler) * num_replicas`` batches from (seed, epoch) and rank r takes batches
    r, r + num_replicas, ...: distinct batches, the same count on every rank.

    Deterministic for (seed, epoch): call ``set_epoch(epoch)`` before each epoch as with
    ``DistributedSampler``; ``set_epoch(epoch, start_batch=b)`` skips the first b batches of
    this rank (resuming mid-epoch), and ``len`` then counts the remaining ones.
    Indices are positions in ``class_ids`` (dataset indices).
    """

    def __init__(self, class_ids, p=16, k=4, seed=0, num_replicas=1, rank=0):
        self.class_ids = np.asarray(class_ids)
        if p < 1 or k < 1:
            raise ValueError(f"p and k must be >= 1, got p={p}, k={k}")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank must be in [0, {num_replicas}), got {rank}")
        # product index 0..C-1 of every image, images per product, first slot of each product
        # in the product-sorted order
        _, self._product, self._counts = np.unique(self.class_ids, return_inverse=True, return_counts=True)
        self._starts = np.cumsum(self._counts) - self._counts
        if len(self._counts) < p:
            raise ValueError(
                f"P×K batches need at least p={p} products, the data has "
                f"{len(self._counts)}; lower the batch size or images per class"
            )
        self.p, self.k, self.seed = p, k, seed
        self.num_replicas, self.rank = num_replicas, rank
        self.num_batches = max(1, len(self.class_ids) // (p * k) // num_replicas)
        self.epoch, self.start_batch = 0, 0

    def set_epoch(self, epoch, start_batch=0):
        self.epoch, self.start_batch = int(epoch), int(start_batch)

    def __len__(self):
        return max(0, self.num_batches - self.start_batch)

    def _chunks(self, rng):
        """One round: (product of each chunk, chunks as rows of k indices), shuffled."""
        k = self.k
        # images sorted by product, in random order within each product
        order = np.lexsort((rng.random(len(self._product)), self._product))
        product = self._product[order]
        rank = np.arange(len(order)) - self._starts[product]
        keep = rank < self._counts[product] // k * k  # whole chunks of k only
        big_rows = order[keep].reshape(-1, k)
        big_products = product[keep][::k]
        # products with fewer than k images: all of them, then draws with replacement
        small = np.flatnonzero(self._counts < k)
        cnt = self._counts[small][:, None]
        slot = np.where(np.arange(k)[None, :] < cnt, np.arange(k)[None, :], rng.integers(0, cnt, size=(len(small), k)))
        small_rows = order[self._starts[small][:, None] + slot]
        rows = np.concatenate([big_rows, small_rows])
        products = np.concatenate([big_products, small])
        perm = rng.permutation(len(rows))
        return products[perm].tolist(), rows[perm]

    def batches(self, epoch=None):
        """This rank's batches for ``epoch`` (default: the current one), as index lists."""
        epoch = self.epoch if epoch is None else epoch
        rng = np.random.default_rng([self.seed, epoch])
        total = self.num_batches * self.num_replicas
        products, rows, used, first_free, out = [], [], [], 0, []
        while len(out) < total:
            batch, taken, i = [], set(), first_free
            while len(batch) < self.p:
                if i == len(products):  # out of chunks: cut a new round
                    new_products, new_rows = self._chunks(rng)
                    products += new_products
                    rows += list(new_rows)
                    used += [False] * len(new_products)
                if not used[i] and products[i] not in taken:
                    taken.add(products[i])
                    batch.append(rows[i])
                    used[i] = True
                i += 1
            while first_free < len(products) and used[first_free]:
                first_free += 1
            out.append(np.concatenate(batch).tolist())
        return out[self.rank :: self.num_replicas]

    def __iter__(self):
        return iter(self.batches()[self.start_batch :])


class RandomBatchSampler(torch.utils.data.Sampler):
    """the original project's batches: a seeded shuffle of all ``n`` indices cut into batches of
    ``batch_size`` (the last one shorter unless ``drop_last``), as
    ``DataLoader(shuffle=True, batch_size=...)`` does. Same interface as ``PKSampler``:
    ``set_epoch(epoch, start_batch=0)``; rank r of ``num_replicas`` takes batches
    r, r + num_replicas, ...; when the batch count does not divide evenly, the first
    batches are repeated so every rank gets ``len(sampler)`` =
    ceil(n_batches / num_replicas) batches.
    """

    def __init__(self, n, batch_size, seed=0, num_replicas=1, rank=0, drop_last=False):
        if n < 1 or batch_size < 1:
            raise ValueError(f"need n >= 1 and batch_size >= 1, got n={n}, batch_size={batch_size}")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank must be in [0, {num_replicas}), got {rank}")
        self.n, self.batch_size, self.seed = int(n), int(batch_size), seed
        self.num_replicas, self.rank, self.drop_last = num_replicas, rank, drop_last
        global_batches = self.n // self.batch_size if drop_last else math.ceil(self.n / self.batch_size)
        self.num_batches = max(1, math.ceil(global_batches / num_replicas))
        self.epoch, self.start_batch = 0, 0

    def set_epoch(self, epoch, start_batch=0):
        self.epoch, self.start_batch = int(epoch), int(start_batch)

    def __len__(self):
        return max(0, self.num_batches - self.start_batch)

    def batches(self, epoch=None):
        epoch = self.epoch if epoch is None else epoch
        perm = np.random.default_rng([self.seed, epoch]).permutation(self.n)
        out = [perm[i : i + self.batch_size].tolist() for i in range(0, self.n, self.batch_size)]
        if self.drop_last and len(out) > 1 and len(out[-1]) < self.batch_size:
            out.pop()
        total = self.num_batches * self.num_replicas
        out = (out * math.ceil(total / len(out)))[:total]
        return out[self.rank :: self.num_replicas]

    def __iter__(self):
        return iter(self.batches()[self.start_batch :])


def fit_images_per_class(class_ids, batch_size=64, images_per_class=4):
    """(K, note): the images per product of P×K batches of ``batch_size`` on this split.

    K = ``images_per_class`` while the split has the P = batch_size / K products a batch needs.
    With fewer products (a catalogue of a few large classes), the batch size is kept and K
    raised: P = the largest divisor of ``batch_size`` that is at most the number of products
    (and >= 2), K = batch_size / P; ``note`` then says so (None when K is unchanged). Raises
    ValueError when no batch is possible: fewer than 2 products, no such divisor, or K above
    the most images any product has (every image of a batch would be a repeat)."""
    _, counts = np.unique(np.asarray(class_ids), return_counts=True)
    products, most = len(counts), int(counts.max()) if len(counts) else 0
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if products < 2:
        raise ValueError(
            f"P×K batches need at least 2 products (an anchor needs a negative); the "
            f"split has {products}. Add products, or use --sampler random"
        )
    if batch_size % images_per_class == 0 and batch_size // images_per_class <= products:
        return images_per_class, None
    p = next((p for p in range(min(products, batch_size // 2), 1, -1) if batch_size % p == 0), None)
    if p is None:
        raise ValueError(
            f"batch_size={batch_size} has no divisor P in 2..{products} (the split's "
            f"products): use an even batch size, e.g. {batch_size + batch_size % 2}"
        )
    k = batch_size // p
    if k > most:
        raise ValueError(
            f"the split has {products} products and at most {most} images of one, too "
            f"few for batches of {batch_size} (P={p} × K={k}); use batch_size <= "
            f"{products * most}"
        )
    return k, (
        f"the split has {products} products, fewer than the P={batch_size // images_per_class} "
        f"a batch of {batch_size} needs at K={images_per_class}: batches are P={p} × K={k} "
        f"(images_per_class raised to {k}, batch size kept)"
    )


def build_batch_sampler(name, class_ids, batch_size=64, images_per_class=4, seed=0, num_replicas=1, rank=0):
    """``"pk"``: PKSampler with P = batch_size // images_per_class; ``"random"``: the original project's
    RandomBatchSampler. Raises ValueError (with the allowed values) for an unknown name, a
    batch size not divisible by images_per_class, images_per_class outside 2..(most images any
    product has), or more products per batch than the split has (`fit_images_per_class` finds
    a K that fits)."""
    class_ids = np.asarray(class_ids)
    if name == "random":
        return RandomBatchSampler(len(class_ids), batch_size, seed, num_replicas, rank)
    if name != "pk":
        raise ValueError(f"unknown sampler {name!r}; choose one of {', '.join(BATCH_SAMPLERS)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    _, counts = np.unique(class_ids, return_counts=True)
    most = int(counts.max()) if len(counts) else 0
    if not 2 <= images_per_class <= most:
        raise ValueError(
            f"images_per_class={images_per_class} is outside the allowed range "
            f"2..{most} (2 to give every anchor a positive; {most} is the most "
            f"images any product of this split has)"
        )
    if batch_size % images_per_class:
        raise ValueError(
            f"batch_size={batch_size} must be divisible by images_per_class="
            f"{images_per_class} (each batch is P products × K images); try "
            f"{batch_size - batch_size % images_per_class or images_per_class}"
        )
    p = batch_size // images_per_class
    if p > len(counts):
        raise ValueError(
            f"batch_size={batch_size} needs P={p} products per batch but the split "
            f"has {len(counts)}; use batch_size <= {len(counts) * images_per_class}"
        )
    return PKSampler(class_ids, p, images_per_class, seed, num_replicas, rank)
