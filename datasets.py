"""Datasets for training and evaluation: transforms, the dataset over any catalogue layout,
P×K batches and DataLoader settings.

The layouts (SOP's ``Ebay_*.txt`` files, a ``catalogue.csv``, a ``<category>/<product>/<image>``
tree), their parsing and the splits live in catalogue.py (its names used here are re-exported:
``read_ebay_file``, ``split_validation``, ``SOP_CATEGORIES``, ...). Generating the synthetic
stand-in lives in synthetic_sop.py; downloading, verifying, resizing, converting and the
statistics of a dataset in prepare_data.py (``make_synthetic_sop`` and
``ensure_synthetic_sop`` are re-exported here, the stable API).

Command line (prepare_data.py's; ``python datasets.py <command> --help`` for every flag)::

    python datasets.py synthetic --root data/synthetic_sop          # offline stand-in for SOP
    python datasets.py download  --root data/                       # real SOP, about 2.9 GB
    python datasets.py verify    --root data/Stanford_Online_Products
    python datasets.py stats     --root data/synthetic_sop --output runs/dataset_stats.png
    python datasets.py resize    --root data/Stanford_Online_Products --output data/sop_256 --size 256
    python datasets.py convert   --root my_photos --to csv --output my_photos
"""
import json
import logging
import math
import multiprocessing
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms as T
from PIL import Image, ImageOps, UnidentifiedImageError
from tqdm import tqdm

import models

# the layouts' parsing lives in catalogue.py; these names are re-exported (the stable API)
from dataio.catalogue import (  # noqa: F401
    COMPLETE_MARKER,
    DEFAULT_TEST_FRACTION,
    DOWNLOAD_HINT,
    EBAY_HEADER,
    SOP_CATEGORIES,
    SOP_DIRNAME,
    EbayTable,
    detect_layout,
    format_paths,
    log_skipped,
    read_catalogue,
    read_ebay_file,
    safe_name,
    set_verbose,
    split_validation,
)

logger = logging.getLogger("datasets")

# ============ constants ============

SPLITS = ("train", "val", "test", "trainval")
SOP_URL = "http://ftp.cs.stanford.edu/cs/cvgl/Stanford_Online_Products.zip"
SOP_ZIPNAME = SOP_DIRNAME + ".zip"
# Official counts; `check_sop_counts` compares a download against them.
SOP_EXPECTED = {"images": 120_053, "train_rows": 59_551, "test_rows": 60_502}
SYNTHETIC_VERSION = 2
# Errors that mean "this file is not a readable image" (PIL raises all of these in practice).
IMAGE_ERRORS = (OSError, UnidentifiedImageError, SyntaxError, ValueError, Image.DecompressionBombError)


class DatasetError(RuntimeError):
    """A dataset on disk is missing, malformed or incomplete; the message says what to do."""


class CorruptImagesError(DatasetError):
    """More than the allowed share of a split is unreadable. ``.bad_paths`` lists them."""

    def __init__(self, message, bad_paths=()):
        super().__init__(message)
        self.bad_paths = list(bad_paths)


def _write_marker(folder, info):
    """Last file written into a finished dataset folder (see COMPLETE_MARKER)."""
    (Path(folder) / COMPLETE_MARKER).write_text(json.dumps(info, indent=1, sort_keys=True) + "\n")


def read_marker(root):
    """The dict stored in ``root/.complete``, or None when the folder is not complete."""
    marker = Path(root) / COMPLETE_MARKER
    if not marker.is_file():
        return None
    try:
        return json.loads(marker.read_text())
    except (OSError, ValueError):
        return None


def is_complete(root):
    """True when ``root`` was finished by this module (generation, download or resize)."""
    return read_marker(root) is not None


def _default_workers():
    return min(os.cpu_count() or 1, 8)


def _mp_context():
    # fork starts in milliseconds; spawn would re-import torch in every worker.
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("fork" if "fork" in methods else "spawn")


def _make_tmp_dir(final):
    """A fresh sibling of ``final`` (same filesystem, so a rename can publish it)."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))


def _publish_dir(tmp, final):
    """Move a finished ``tmp`` folder to ``final``; an empty ``final`` is replaced,
    an old complete dataset is swapped out and deleted only after the new one is in place."""
    tmp, final = Path(tmp), Path(final)
    old = None
    if final.exists() and any(final.iterdir()):
        old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
        os.rename(final, old / "data")
    elif final.exists():
        final.rmdir()
    os.rename(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# ============ image loading and transforms ============

def _to_rgb(im):
    """Any PIL mode → RGB: transparency goes onto white (product photos sit on white),
    16/32-bit and float grey is rescaled to 8 bits instead of being clipped."""
    if im.mode == "RGB":
        return im
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if im.mode.startswith("I") or im.mode == "F":
        arr = np.asarray(im).astype(np.float64)
        if im.mode.startswith("I;16"):
            arr = arr / 257.0
        elif arr.size and arr.max() > 255:
            arr = arr * (255.0 / arr.max())
        return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "L").convert("RGB")
    return im.convert("RGB")   # L, 1, CMYK, YCbCr, LAB, HSV


def load_image(path, size=None):
    """Open an image file as an RGB PIL image, decoded completely (errors surface here).

    ``size``: the side the caller will resize to. For a JPEG, ``Image.draft`` then lets
    libjpeg decode at 1/2, 1/4 or 1/8 scale whenever both sides stay >= ``size`` — the
    DCT scaling skips most of the decoding work, and no image ends up smaller than the
    resize asks for. The EXIF orientation is applied; palette, alpha, CMYK and 16-bit
    images become RGB (see ``_to_rgb``).
    """
    with Image.open(path) as im:
        if size is not None and im.format == "JPEG":
            im.draft("RGB", (int(size), int(size)))
        im.load()
        im = ImageOps.exif_transpose(im)
        return _to_rgb(im)


def resize_size(image_size):
    """Side of the square resize before the crop: 256 for 224, as in the original project."""
    return int(round(image_size * 256 / 224))


def build_transform(image_size=224, train=False):
    """The original project's augmentations, scaled to ``image_size`` (its numbers at 224).

    train: Resize((r, r)) → RandomResizedCrop(image_size, scale=(0.8, 1)) → horizontal flip
    → ColorJitter(0.2, 0.2, 0.2) → RandomRotation(15) → ToTensor → ImageNet normalisation;
    eval: Resize((r, r)) → CenterCrop(image_size) → ToTensor → normalisation;
    r = round(image_size * 256 / 224). The square resize keeps the whole product in view.
    """
    r = resize_size(image_size)
    normalize = T.Normalize(models.IMAGENET_MEAN, models.IMAGENET_STD)
    if train:
        return T.Compose([
            T.Resize((r, r)),
            T.RandomResizedCrop(image_size, scale=(0.8, 1.0)),
            T.RandomHorizontalFlip(),
            T.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2),
            T.RandomRotation(15),
            T.ToTensor(),
            normalize,
        ])
    return T.Compose([T.Resize((r, r)), T.CenterCrop(image_size), T.ToTensor(), normalize])


def draft_size(transform):
    """The decode size ``load_image`` may draft to for ``transform``: the size of a leading
    ``Resize`` (the larger side for a (h, w) size), None when the transform does not start
    with a resize (then the full image is needed)."""
    first = transform.transforms[0] if isinstance(transform, T.Compose) and transform.transforms \
        else transform
    if isinstance(first, T.Resize):
        size = first.size
        return int(max(size)) if isinstance(size, (list, tuple)) else int(size)
    return None


def check_image(path):
    """None when ``path`` decodes completely, else a short reason (missing, zero-byte, ...)."""
    try:
        if os.path.getsize(path) == 0:
            return "zero-byte file"
        load_image(path)
    except FileNotFoundError:
        return "missing"
    except IMAGE_ERRORS as e:
        return f"{type(e).__name__}: {e}"
    return None


def _check_image_item(path):
    return path, check_image(path)


def scan_bad_images(paths, workers=None, progress=True, desc="verify"):
    """Decode every image in ``paths``; returns ``[(path, reason), ...]`` for the bad ones
    (missing, zero-byte, truncated, not an image), in input order."""
    paths = [str(p) for p in paths]
    workers = _default_workers() if workers is None else workers
    bar = dict(total=len(paths), desc=desc, unit="img", disable=not progress, smoothing=0.05)
    if workers <= 1 or len(paths) < 256:
        results = (_check_image_item(p) for p in paths)
        return [(p, r) for p, r in tqdm(results, **bar) if r is not None]
    with _mp_context().Pool(workers) as pool:
        results = pool.imap(_check_image_item, paths, chunksize=64)
        return [(p, r) for p, r in tqdm(results, **bar) if r is not None]


# ============ SOPDataset ============

class SOPDataset(torch.utils.data.Dataset):
    """One split of a catalogue in any layout of catalogue.py: SOP's Ebay files (or the
    synthetic stand-in), a ``catalogue.csv`` or a ``<category>/<product>/<image>`` tree.

    Splits: ``trainval`` = the training images (Ebay_train.txt, or the CSV's / the drawn
    train split); ``val`` = the products picked by ``split_validation(val_fraction,
    split_seed)``; ``train`` = trainval minus val; ``test`` = Ebay_test.txt (or the test
    split: the CSV's ``split`` column, else ``test_fraction`` of the products, seeded, see
    catalogue.py). ``root`` may be the catalogue folder or the parent of
    ``Stanford_Online_Products/``.

    Attributes: ``root`` (Path), ``layout`` ("sop", "csv", "folder"), ``split``, ``paths``
    (absolute str), ``rel_paths``, ``image_ids``, ``class_ids`` (int64 product numbers),
    ``super_ids`` (int64, 1..len(categories)), ``product_ids`` (the data's product strings),
    ``categories`` (the catalogue's category names: ``categories[super_id - 1]``),
    ``num_single_image_products`` (products with one image here: kept in the gallery, never
    a query of the product metrics). ``dataset[i]`` is ``(transform(image) or the PIL
    image, class_id: int)``.

    Unreadable images (zero-byte, truncated, not an image): a warning names the file, the
    index is flagged in a shared-memory tensor, and the next readable image of the same
    product (in file order, cyclic) is returned instead, so a run goes on. Because the flags
    live in shared memory, DataLoader workers' findings are visible in the main process:
    read ``dataset.num_bad_images`` / ``dataset.bad_paths`` after an epoch (train.py logs
    the count as ``bad_images``). When more than ``max_bad_fraction`` (default 1%) of the
    split is bad, ``CorruptImagesError`` is raised listing them; run
    ``python datasets.py verify --root ...`` to find them all up front.

    ``check_files`` (default True) checks at construction that every listed file exists
    (one stat call each; about a second for SOP). ``check_images`` also decodes every image
    up front and flags the bad ones. ``load_size`` overrides the JPEG draft size, which by
    default is the size of the transform's leading Resize (see ``draft_size``).
    """

    def __init__(self, root, split, transform=None, val_fraction=0.1, split_seed=0,
                 check_files=True, check_images=False, max_bad_fraction=0.01, load_size=None,
                 test_fraction=DEFAULT_TEST_FRACTION):
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
        self.root, self.layout = detect_layout(root)
        self.split = split
        self.transform = transform
        self.val_fraction = val_fraction
        self.split_seed = split_seed
        self.test_fraction = test_fraction
        self.max_bad_fraction = max_bad_fraction
        self.load_size = load_size if load_size is not None else (
            draft_size(transform) if transform is not None else None)

        table = read_catalogue(self.root, test_fraction,
                               sop_parts=("test",) if split == "test" else ("train",))
        log_skipped(table, self.root)
        table = table.take(table.is_test if split == "test" else ~table.is_test)
        if split in ("train", "val"):
            is_val = split_validation(table.class_ids, val_fraction, split_seed)
            table = table.take(is_val if split == "val" else ~is_val)
        self.categories = list(table.categories)
        self.image_ids, self.class_ids, self.super_ids = table.image_ids, table.class_ids, table.super_ids
        self.product_ids = table.product_ids
        self.rel_paths = table.rel_paths
        self.paths = [str(self.root / p) for p in self.rel_paths]
        if not self.paths:
            why = ("no image is in the test split (the CSV's split column says train everywhere?)"
                   if split == "test" else "no image is in the training split"
                   if split == "trainval" else f"val_fraction={val_fraction}")
            raise DatasetError(f"split {split!r} of {self.root} ({self.layout}) is empty: {why}")
        counts = np.unique(self.class_ids, return_counts=True)[1]
        self.num_single_image_products = int((counts == 1).sum())
        if self.num_single_image_products:
            logger.warning("%s split %s: %d products have a single image; they stay in the gallery "
                           "but are never queries of the product metrics", self.root, split,
                           self.num_single_image_products)
        if check_files:
            missing = [p for p in self.paths if not os.path.isfile(p)]
            if missing:
                raise FileNotFoundError(
                    f"{len(missing)} of {len(self.paths)} images listed for split {split!r} are "
                    f"missing under {self.root}: {format_paths(missing)}. The dataset is "
                    f"incomplete: restore the files, remove their rows, extract or generate it "
                    f"again ({DOWNLOAD_HINT}).")
        # uint8 flags in shared memory: DataLoader workers (fork or spawn) write into the
        # same buffer, so the main process can count bad images after an epoch.
        self._bad = torch.zeros(len(self.paths), dtype=torch.uint8).share_memory_()
        self._siblings = None
        if check_images:
            position = {p: i for i, p in enumerate(self.paths)}
            for path, reason in scan_bad_images(self.paths, progress=False):
                logger.warning("Unreadable image %s (%s)", path, reason)
                self._bad[position[path]] = 1
            self._check_bad_fraction()

    def __len__(self):
        return len(self.paths)

    @property
    def num_bad_images(self):
        """How many images of this split were found unreadable so far (all workers)."""
        return int(self._bad.sum())

    @property
    def bad_paths(self):
        """Paths of the images found unreadable so far (all workers), in file order."""
        return [self.paths[i] for i in torch.nonzero(self._bad).flatten().tolist()]

    def mark_bad(self, paths):
        """Flag ``paths`` (absolute, as in ``bad_paths``) as unreadable, e.g. those a resumed
        run's checkpoint recorded; paths not in this split are ignored. Returns how many
        were flagged."""
        position = {p: i for i, p in enumerate(self.paths)}
        hits = [position[p] for p in paths if p in position]
        if hits:
            self._bad[torch.as_tensor(hits)] = 1
        return len(hits)

    def _check_bad_fraction(self):
        n_bad = self.num_bad_images
        if n_bad > self.max_bad_fraction * len(self):
            bad = self.bad_paths
            raise CorruptImagesError(
                f"{n_bad} of {len(self)} images of split {self.split!r} in {self.root} are "
                f"unreadable (more than {self.max_bad_fraction:.0%}): {format_paths(bad, 20)}. "
                f"Run `python datasets.py verify --root {self.root}` for the full list, then "
                f"replace them or download the dataset again.", bad)

    def _same_product(self, index):
        """Indices of the other images of ``index``'s product, next ones first (cyclic)."""
        if self._siblings is None:
            order = np.argsort(self.class_ids, kind="stable")
            bounds = np.flatnonzero(np.diff(self.class_ids[order])) + 1
            self._siblings = {int(self.class_ids[g[0]]): g for g in np.split(order, bounds)}
        group = self._siblings[int(self.class_ids[index])]
        pos = int(np.flatnonzero(group == index)[0])
        return [int(i) for i in np.roll(group, -pos)[1:]]

    def _load(self, index):
        path = self.paths[index]
        if not self._bad[index]:
            try:
                return load_image(path, self.load_size)
            except IMAGE_ERRORS as e:
                self._bad[index] = 1
                logger.warning("Unreadable image %s (%s: %s); using another image of product %d",
                               path, type(e).__name__, e, self.class_ids[index])
                self._check_bad_fraction()
        for other in self._same_product(index):
            if self._bad[other]:
                continue
            try:
                return load_image(self.paths[other], self.load_size)
            except IMAGE_ERRORS as e:
                self._bad[other] = 1
                logger.warning("Unreadable image %s (%s: %s)", self.paths[other], type(e).__name__, e)
                self._check_bad_fraction()
        raise CorruptImagesError(
            f"every image of product {self.class_ids[index]} in {self.root} is unreadable "
            f"(first: {path}); remove its rows from the catalogue (Ebay file, CSV) or restore the images "
            f"(`python datasets.py verify --root {self.root}` lists them)", self.bad_paths)

    def __getitem__(self, index):
        image = self._load(index)
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.class_ids[index])

    def __repr__(self):
        return (f"SOPDataset(root={str(self.root)!r}, layout={self.layout!r}, split={self.split!r}, images={len(self)}, "
                f"products={len(np.unique(self.class_ids))})")


def split_options(train_args: dict | None, test_fraction=None) -> dict:
    """SOPDataset's split settings of a run (its saved training args; older runs' defaults):
    evaluating or serving a checkpoint on its own data then sees the same splits.
    ``test_fraction`` given (not None) overrides the run's."""
    train_args = train_args or {}
    return {"val_fraction": float(train_args.get("val_fraction") or 0.1),
            "test_fraction": float(test_fraction if test_fraction is not None
                                   else train_args.get("test_fraction") or DEFAULT_TEST_FRACTION)}


# ============ batch samplers ============

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
        _, self._product, self._counts = np.unique(self.class_ids, return_inverse=True,
                                                   return_counts=True)
        self._starts = np.cumsum(self._counts) - self._counts
        if len(self._counts) < p:
            raise ValueError(f"P×K batches need at least p={p} products, the data has "
                             f"{len(self._counts)}; lower the batch size or images per class")
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
        keep = rank < self._counts[product] // k * k        # whole chunks of k only
        big_rows = order[keep].reshape(-1, k)
        big_products = product[keep][::k]
        # products with fewer than k images: all of them, then draws with replacement
        small = np.flatnonzero(self._counts < k)
        cnt = self._counts[small][:, None]
        slot = np.where(np.arange(k)[None, :] < cnt, np.arange(k)[None, :],
                        rng.integers(0, cnt, size=(len(small), k)))
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
                if i == len(products):   # out of chunks: cut a new round
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
        return out[self.rank::self.num_replicas]

    def __iter__(self):
        return iter(self.batches()[self.start_batch:])


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
        out = [perm[i:i + self.batch_size].tolist() for i in range(0, self.n, self.batch_size)]
        if self.drop_last and len(out) > 1 and len(out[-1]) < self.batch_size:
            out.pop()
        total = self.num_batches * self.num_replicas
        out = (out * math.ceil(total / len(out)))[:total]
        return out[self.rank::self.num_replicas]

    def __iter__(self):
        return iter(self.batches()[self.start_batch:])


BATCH_SAMPLERS = ("pk", "random")


# ============ DataLoader settings ============

def available_cpus() -> int:
    """CPUs this process may run on (the affinity mask; ``os.cpu_count`` where unknown)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def loader_settings(device, cpus: int | None = None, workers: int | None = None,
                    pin_memory: bool | None = None, persistent_workers: bool | None = None,
                    prefetch_factor: int | None = None) -> dict:
    """DataLoader keyword arguments for ``device`` on a machine with ``cpus`` CPUs; ``None``
    arguments take the defaults measured by bench/bench_throughput.py (README, throughput).

    CPU training/inference: the model itself uses every core (intra-op threads), so a loader
    worker competes with it. One worker beside the model's threads overlaps decoding with the
    forward pass: on 2 cores it measured as fast as 2 workers (within run-to-run noise) with one
    process fewer, while with 0 workers the model waits 7-10 % of the time for decoding. With
    more cores: about a quarter of them, at least one.
    CUDA: the GPU does the maths, so every CPU decodes (up to 16), with pinned memory for
    asynchronous copies, deeper prefetch and persistent workers (no respawn every pass).
    Several processes per machine (DDP ranks): pass ``cpus`` = the CPUs per process.
    """
    cpus = available_cpus() if cpus is None else int(cpus)
    cuda = torch.device(device).type == "cuda"
    if workers is None:
        workers = min(16, cpus) if cuda else max(1, cpus // 4)
    workers = int(workers)
    out = {"num_workers": workers,
           "pin_memory": cuda if pin_memory is None else bool(pin_memory and cuda)}
    if workers > 0:
        out["persistent_workers"] = cuda if persistent_workers is None else bool(persistent_workers)
        out["prefetch_factor"] = (4 if cuda else 2) if prefetch_factor is None else int(prefetch_factor)
    return out


def build_batch_sampler(name, class_ids, batch_size=64, images_per_class=4, seed=0,
                        num_replicas=1, rank=0):
    """``"pk"``: PKSampler with P = batch_size // images_per_class; ``"random"``: the original project's
    RandomBatchSampler. Raises ValueError (with the allowed values) for an unknown name, a
    batch size not divisible by images_per_class, or images_per_class outside
    2..(most images any product has)."""
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
        raise ValueError(f"images_per_class={images_per_class} is outside the allowed range "
                         f"2..{most} (2 to give every anchor a positive; {most} is the most "
                         f"images any product of this split has)")
    if batch_size % images_per_class:
        raise ValueError(f"batch_size={batch_size} must be divisible by images_per_class="
                         f"{images_per_class} (each batch is P products × K images); try "
                         f"{batch_size - batch_size % images_per_class or images_per_class}")
    p = batch_size // images_per_class
    if p > len(counts):
        raise ValueError(f"batch_size={batch_size} needs P={p} products per batch but the split "
                         f"has {len(counts)}; use batch_size <= {len(counts) * images_per_class}")
    return PKSampler(class_ids, p, images_per_class, seed, num_replicas, rank)



# ============ the synthetic SOP (synthetic_sop.py), re-exported ============

def make_synthetic_sop(root, num_products=1200, image_size=96, seed=0, workers=None, progress=False):
    """synthetic_sop.make_synthetic_sop: write a synthetic SOP to ``root``."""
    from dataio import synthetic_sop  # imported on use: training never needs the renderer
    return synthetic_sop.make_synthetic_sop(root, num_products, image_size, seed, workers, progress)


def ensure_synthetic_sop(root, num_products=1200, image_size=96, seed=0, workers=None, progress=False,
                         replace=False):
    """synthetic_sop.ensure_synthetic_sop: ``root``, generated when absent."""
    from dataio import synthetic_sop
    return synthetic_sop.ensure_synthetic_sop(root, num_products, image_size, seed, workers,
                                              progress, replace)


if __name__ == "__main__":
    from dataio import prepare_data  # the command line lives there

    sys.exit(prepare_data.main(prepare_data.get_args_parser().parse_args()))
