"""Stanford Online Products (SOP): parsing, validation split, transforms, P×K batches,
a synthetic SOP generator, download, verification, statistics and a pre-resized copy.

On disk SOP is a folder holding ``Ebay_train.txt`` and ``Ebay_test.txt`` (header
``image_id class_id super_class_id path``, one image a line) and the images under
``<category>_final/``. ``class_id`` is the product, ``super_class_id`` (1..12) the category.

Command line (``python datasets.py <command> --help`` for every flag)::

    python datasets.py synthetic --root data/synthetic_sop          # offline stand-in for SOP
    python datasets.py download  --root data/                       # real SOP, about 2.9 GB
    python datasets.py verify    --root data/Stanford_Online_Products
    python datasets.py stats     --root data/synthetic_sop --output runs/dataset_stats.png
    python datasets.py resize    --root data/Stanford_Online_Products --output data/sop_256 --size 256
"""
import argparse
import io
import json
import logging
import math
import multiprocessing
import os
import shutil
import socket
import sys
import tempfile
import threading
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torchvision.transforms as T
from PIL import Image, ImageDraw, ImageFilter, ImageOps, UnidentifiedImageError
from tqdm import tqdm

logger = logging.getLogger("datasets")

# ============ constants ============

SOP_CATEGORIES = ["bicycle", "cabinet", "chair", "coffee_maker", "fan", "kettle",
                  "lamp", "mug", "sofa", "stapler", "table", "toaster"]
EBAY_HEADER = ["image_id", "class_id", "super_class_id", "path"]
SPLITS = ("train", "val", "test", "trainval")
SOP_URL = "http://ftp.cs.stanford.edu/cs/cvgl/Stanford_Online_Products.zip"
SOP_DIRNAME = "Stanford_Online_Products"
SOP_ZIPNAME = SOP_DIRNAME + ".zip"
# Official counts; `check_sop_counts` compares a download against them.
SOP_EXPECTED = {"images": 120_053, "train_rows": 59_551, "test_rows": 60_502}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Written last into a generated / extracted / resized dataset, after every other file:
# a folder without it was interrupted and never passes for complete.
COMPLETE_MARKER = ".complete"
SYNTHETIC_VERSION = 2
DOWNLOAD_HINT = ("python datasets.py download --root data/  (real SOP, about 2.9 GB), or "
                 "python datasets.py synthetic --root data/synthetic_sop  (offline stand-in)")
# Errors that mean "this file is not a readable image" (PIL raises all of these in practice).
IMAGE_ERRORS = (OSError, UnidentifiedImageError, SyntaxError, ValueError, Image.DecompressionBombError)


class DatasetError(RuntimeError):
    """A dataset on disk is missing, malformed or incomplete; the message says what to do."""


class CorruptImagesError(DatasetError):
    """More than the allowed share of a split is unreadable. ``.bad_paths`` lists them."""

    def __init__(self, message, bad_paths=()):
        super().__init__(message)
        self.bad_paths = list(bad_paths)


class DownloadError(DatasetError):
    """The SOP archive could not be fetched or is damaged; the message says how to fix it."""


def _format_paths(paths, limit=5):
    paths = [str(p) for p in paths]
    more = f" ... and {len(paths) - limit} more" if len(paths) > limit else ""
    return ", ".join(paths[:limit]) + more


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


# ============ parsing SOP ============

class EbayTable(NamedTuple):
    """One parsed ``Ebay_*.txt`` file, row order kept."""
    image_ids: np.ndarray   # int64
    class_ids: np.ndarray   # int64, SOP product ids
    super_ids: np.ndarray   # int64, 1..12 (index into SOP_CATEGORIES + 1)
    rel_paths: list         # as written in the file, relative to the dataset root


def read_ebay_file(path):
    """Parse an ``Ebay_train.txt`` / ``Ebay_test.txt`` / ``Ebay_info.txt`` file.

    Raises FileNotFoundError when it does not exist and ValueError naming the file and the
    line number for a wrong header, a line without 4 fields, a non-integer id, a
    super_class_id outside 1..12 or a path listed twice. Blank lines are skipped.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found. Get SOP with: {DOWNLOAD_HINT}")
    image_ids, class_ids, super_ids, rel_paths = [], [], [], []
    with open(path, encoding="utf-8") as f:
        header = f.readline()
        if header.split() != EBAY_HEADER:
            raise ValueError(f"{path}:1: expected the header '{' '.join(EBAY_HEADER)}', "
                             f"got {header.strip()!r}")
        for lineno, line in enumerate(f, start=2):
            fields = line.split()
            if not fields:
                continue
            if len(fields) != 4:
                raise ValueError(f"{path}:{lineno}: expected 4 fields "
                                 f"'image_id class_id super_class_id path', got {line.strip()!r}")
            try:
                image_id, class_id, super_id = (int(x) for x in fields[:3])
            except ValueError:
                raise ValueError(f"{path}:{lineno}: image_id, class_id and super_class_id must "
                                 f"be integers, got {line.strip()!r}") from None
            if not 1 <= super_id <= len(SOP_CATEGORIES):
                raise ValueError(f"{path}:{lineno}: super_class_id {super_id} is outside "
                                 f"1..{len(SOP_CATEGORIES)}")
            image_ids.append(image_id)
            class_ids.append(class_id)
            super_ids.append(super_id)
            rel_paths.append(fields[3])
    if len(set(rel_paths)) != len(rel_paths):
        seen, dup = set(), None
        for p in rel_paths:
            if p in seen:
                dup = p
                break
            seen.add(p)
        raise ValueError(f"{path}: image {dup} is listed more than once")
    return EbayTable(np.asarray(image_ids, np.int64), np.asarray(class_ids, np.int64),
                     np.asarray(super_ids, np.int64), rel_paths)


def resolve_sop_root(root):
    """The folder holding the Ebay files: ``root`` itself, or ``root/Stanford_Online_Products``
    (so ``--root data/`` after ``python datasets.py download --root data/`` works too)."""
    root = Path(root).expanduser()
    if (root / "Ebay_train.txt").is_file() or (root / "Ebay_test.txt").is_file():
        return root.resolve()
    nested = root / SOP_DIRNAME
    if (nested / "Ebay_train.txt").is_file():
        return nested.resolve()
    if not root.exists():
        raise FileNotFoundError(f"Dataset root {root} does not exist. Get SOP with: {DOWNLOAD_HINT}")
    raise FileNotFoundError(f"{root} holds no SOP dataset ({root / 'Ebay_train.txt'} not found). "
                            f"Get it with: {DOWNLOAD_HINT}")


def split_validation(class_ids, val_fraction=0.1, seed=0):
    """Boolean mask over ``class_ids``: True for the validation products.

    The validation set is ``round(val_fraction * n_products)`` products drawn by a
    permutation seeded with ``seed`` (at least one when val_fraction > 0): every image of a
    chosen product goes to validation, so train and validation share no product.
    On SOP: 1,132 of 11,318 products, about 6.0k of 59.6k images.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    class_ids = np.asarray(class_ids)
    products = np.unique(class_ids)
    n_val = int(round(len(products) * val_fraction))
    if val_fraction > 0:
        n_val = min(max(n_val, 1), len(products) - 1)
    rng = np.random.default_rng(seed)
    val_products = products[rng.permutation(len(products))[:n_val]]
    return np.isin(class_ids, val_products)


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
    """Side of the square resize before the crop: 256 for 224, as in the seeds."""
    return int(round(image_size * 256 / 224))


def build_transform(image_size=224, train=False):
    """SPEC.md augmentations at ``image_size`` (the seeds' numbers at 224).

    train: Resize((r, r)) → RandomResizedCrop(image_size, scale=(0.8, 1)) → horizontal flip
    → ColorJitter(0.2, 0.2, 0.2) → RandomRotation(15) → ToTensor → ImageNet normalisation;
    eval: Resize((r, r)) → CenterCrop(image_size) → ToTensor → normalisation;
    r = round(image_size * 256 / 224). The square resize keeps the whole product in view.
    """
    r = resize_size(image_size)
    normalize = T.Normalize(IMAGENET_MEAN, IMAGENET_STD)
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
    """Stanford Online Products (or the synthetic stand-in) for one split.

    Splits: ``trainval`` = every line of Ebay_train.txt; ``val`` = the products picked by
    ``split_validation(val_fraction, split_seed)``; ``train`` = trainval minus val;
    ``test`` = Ebay_test.txt. ``root`` may be the folder with the Ebay files or its parent
    holding ``Stanford_Online_Products/``.

    Attributes: ``root`` (Path), ``split``, ``paths`` (absolute str), ``rel_paths``,
    ``image_ids``, ``class_ids`` (int64 SOP product ids), ``super_ids`` (int64, 1..12).
    ``dataset[i]`` is ``(transform(image) or the PIL image, class_id: int)``.

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
                 check_files=True, check_images=False, max_bad_fraction=0.01, load_size=None):
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
        self.root = resolve_sop_root(root)
        self.split = split
        self.transform = transform
        self.val_fraction = val_fraction
        self.split_seed = split_seed
        self.max_bad_fraction = max_bad_fraction
        self.load_size = load_size if load_size is not None else (
            draft_size(transform) if transform is not None else None)

        table = read_ebay_file(self.root / ("Ebay_test.txt" if split == "test" else "Ebay_train.txt"))
        keep = np.ones(len(table.class_ids), dtype=bool)
        if split in ("train", "val"):
            is_val = split_validation(table.class_ids, val_fraction, split_seed)
            keep = is_val if split == "val" else ~is_val
        idx = np.flatnonzero(keep)
        self.image_ids = table.image_ids[idx]
        self.class_ids = table.class_ids[idx]
        self.super_ids = table.super_ids[idx]
        self.rel_paths = [table.rel_paths[i] for i in idx]
        self.paths = [str(self.root / p) for p in self.rel_paths]
        if not self.paths:
            raise DatasetError(f"split {split!r} of {self.root} is empty "
                               f"(val_fraction={val_fraction})")
        if check_files:
            missing = [p for p in self.paths if not os.path.isfile(p)]
            if missing:
                raise FileNotFoundError(
                    f"{len(missing)} of {len(self.paths)} images listed for split {split!r} are "
                    f"missing under {self.root}: {_format_paths(missing)}. The dataset is "
                    f"incomplete: extract or generate it again ({DOWNLOAD_HINT}).")
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
                f"unreadable (more than {self.max_bad_fraction:.0%}): {_format_paths(bad, 20)}. "
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
            f"(first: {path}); remove its lines from the Ebay file or restore the images "
            f"(`python datasets.py verify --root {self.root}` lists them)", self.bad_paths)

    def __getitem__(self, index):
        image = self._load(index)
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.class_ids[index])

    def __repr__(self):
        return (f"SOPDataset(root={str(self.root)!r}, split={self.split!r}, images={len(self)}, "
                f"products={len(np.unique(self.class_ids))})")


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
    """The seeds' batches: a seeded shuffle of all ``n`` indices cut into batches of
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
    """``"pk"``: PKSampler with P = batch_size // images_per_class; ``"random"``: the seeds'
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


# ============ synthetic SOP ============
# Each product is a fixed identity: a drawing from its category's shape family (geometry
# drawn per product), body/accent colours from a small per-category palette (shared by many
# products, so colour alone does not identify one), a surface pattern and optional parts.
# Each photo of it is a new view: scale, aspect (viewpoint), mirror, rotation, offset and
# crop, background, shadow, lighting, occlusion, noise and JPEG quality.

_COLOURS = {
    "white": (236, 236, 230), "cream": (232, 218, 186), "beige": (208, 192, 164),
    "black": (34, 34, 38), "grey": (126, 128, 134), "silver": (188, 192, 200),
    "red": (188, 40, 42), "orange": (222, 118, 40), "yellow": (228, 196, 58),
    "green": (58, 138, 70), "teal": (38, 136, 138), "blue": (44, 80, 168),
    "navy": (32, 42, 92), "purple": (108, 60, 138), "pink": (224, 140, 168),
    "brown": (116, 78, 48), "tan": (188, 148, 100), "wood": (160, 110, 62),
}
_BODY_PALETTES = {
    "bicycle": ["red", "blue", "black", "white", "green", "yellow", "orange", "silver"],
    "cabinet": ["white", "wood", "brown", "black", "grey", "cream", "navy", "teal"],
    "chair": ["wood", "black", "white", "red", "grey", "blue", "tan", "green"],
    "coffee_maker": ["black", "silver", "white", "red", "grey", "cream"],
    "fan": ["white", "black", "grey", "silver", "blue", "teal"],
    "kettle": ["silver", "white", "black", "red", "cream", "blue", "green"],
    "lamp": ["white", "black", "cream", "beige", "blue", "green", "yellow", "silver"],
    "mug": ["white", "black", "red", "blue", "yellow", "green", "pink", "navy"],
    "sofa": ["grey", "beige", "navy", "brown", "green", "tan", "red", "black"],
    "stapler": ["black", "red", "blue", "silver", "grey", "orange"],
    "table": ["wood", "white", "black", "brown", "tan", "grey"],
    "toaster": ["silver", "black", "red", "white", "cream", "blue"],
}
_PATTERNS = ["solid", "solid", "hstripes", "vstripes", "diagonal", "dots", "checker", "bands", "grid"]
_SIZE_WEIGHTS = np.array([.13, .14, .15, .14, .12, .10, .07, .05, .04, .03, .03])  # 2..12 images


class _Sketch:
    """Drawing operations in unit coordinates (x right, y down, object inside [0, 1]²).
    Layers are drawn back → body → front; the body layer is filled with the product's
    surface pattern, the others with a plain colour role."""

    def __init__(self, rng):
        self.rng = rng
        self.ops = []

    def u(self, lo, hi):
        return float(self.rng.uniform(lo, hi))

    def pick(self, options):
        return options[int(self.rng.integers(len(options)))]

    def chance(self, p):
        return bool(self.rng.random() < p)

    def add(self, layer, kind, xy, role="body", **kw):
        self.ops.append((layer, kind, xy, role, kw))


def _box(x0, y0, x1, y1):
    return (min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1))


def _bicycle(s):
    r, wb, cy = s.u(.15, .21), s.u(.5, .62), .68
    h1, h2 = .5 - wb / 2, .5 + wb / 2
    tyre, spokes = s.u(.02, .045), s.pick([0, 6, 8, 12, 16])
    for hx in (h1, h2):
        s.add("back", "ring", (hx - r, cy - r, hx + r, cy + r), "dark", width=tyre)
        for j in range(spokes):
            a = math.pi * j / max(spokes, 1) * 2
            s.add("back", "line", [(hx, cy), (hx + .9 * r * math.cos(a), cy + .9 * r * math.sin(a))],
                  "metal", width=.006)
        s.add("back", "ellipse", (hx - .02, cy - .02, hx + .02, cy + .02), "metal")
    bb = (.5 + s.u(-.06, .04), cy + s.u(-.02, .04))
    seat = (bb[0] - s.u(.02, .1), cy - s.u(.3, .4))
    head = (h2 - s.u(.06, .12), cy - s.u(.26, .38))
    fw = s.u(.022, .045)
    top = (seat[0] + .01, seat[1] + (s.u(.12, .2) if s.chance(.25) else .03))   # step-through
    for a, b in [((h1, cy), bb), ((h1, cy), seat), (bb, seat), (top, head), (bb, head), (head, (h2, cy))]:
        s.add("body", "line", [a, b], width=fw)
    s.add("front", "poly", [(seat[0] - .07, seat[1] - .02), (seat[0] + .05, seat[1] - .03),
                            (seat[0] + .04, seat[1] + .01), (seat[0] - .06, seat[1] + .01)], "dark")
    bar = (head[0] - s.u(-.02, .05), head[1] - s.u(.05, .1))
    s.add("front", "line", [head, bar, (bar[0] + s.u(-.08, .08), bar[1] + s.u(-.02, .05))],
          s.pick(["dark", "metal"]), width=.015)
    if s.chance(.35):   # rear rack
        s.add("front", "rect", (h1 - .05, seat[1] + .06, h1 + .12, seat[1] + .09), "accent")
    if s.chance(.3):    # front basket
        s.add("front", "rect", (bar[0] - .02, bar[1] + .02, bar[0] + .14, bar[1] + .12), "accent")
    if s.chance(.3):    # mudguards
        for hx in (h1, h2):
            s.add("front", "arc", (hx - r - .02, cy - r - .02, hx + r + .02, cy + r + .02), "accent",
                  start=200, end=340, width=.015)


def _cabinet(s):
    w, h = s.u(.4, .7), s.u(.5, .78)
    x0, y0 = .5 - w / 2, .46 - h / 2
    legs = s.chance(.5)
    if legs:
        for lx in (x0 + .03, x0 + w - .06):
            s.add("back", "rect", (lx, y0 + h - .02, lx + .03, y0 + h + .08), "dark")
    s.add("body", "rect", (x0, y0, x0 + w, y0 + h), radius=s.u(0, .03))
    if s.chance(.6):
        s.add("front", "rect", (x0 - .02, y0 - .03, x0 + w + .02, y0 + .01), s.pick(["accent", "dark"]))
    n_col, n_dr = int(s.rng.integers(1, 4)), int(s.rng.integers(0, 4))
    dh = h * s.u(.12, .2)
    knob, glass = s.chance(.5), s.chance(.25)
    handle_role = s.pick(["metal", "dark", "accent"])
    for j in range(n_dr):
        y = y0 + .02 + j * dh
        s.add("front", "rectline", (x0 + .02, y, x0 + w - .02, y + dh - .01), "dark", width=.008)
        s.add("front", "rect", (.5 - .05, y + dh / 2 - .01, .5 + .05, y + dh / 2 + .01), handle_role)
    top = y0 + .02 + n_dr * dh
    cw = (w - .04) / n_col
    for c in range(n_col):
        cx0 = x0 + .02 + c * cw
        s.add("front", "rectline", (cx0, top, cx0 + cw - .01, y0 + h - .02), "dark", width=.008)
        if glass:
            s.add("front", "rect", (cx0 + .03, top + .03, cx0 + cw - .04, y0 + h - .05), "light")
        hx = cx0 + (cw - .05 if c % 2 == 0 else .04)
        if knob:
            s.add("front", "ellipse", (hx - .015, top + .1, hx + .015, top + .13), handle_role)
        else:
            s.add("front", "rect", (hx - .008, top + .06, hx + .008, top + .16), handle_role)


def _chair(s):
    seat_y, sw, st = s.u(.5, .6), s.u(.34, .5), s.u(.04, .08)
    x0 = .5 - sw / 2
    lw, splay = s.u(.02, .045), s.u(0, .06)
    leg = s.pick(["dark", "accent", "metal", "body"])
    for lx, d in ((x0 + .06, -1), (x0 + sw - .06, 1)):
        s.add("back", "line", [(lx, seat_y), (lx + d * splay * .5, .86)], leg, width=lw)
    bh, style = s.u(.25, .4), int(s.rng.integers(4))
    by0 = seat_y - bh
    if style == 0:
        s.add("body", "rect", (x0, by0, x0 + sw, seat_y), radius=s.u(0, .06))
    elif style == 1:   # vertical slats
        s.add("body", "rect", (x0, by0, x0 + sw, by0 + .06), radius=.01)
        n = int(s.rng.integers(3, 6))
        for j in range(n):
            sx = x0 + .02 + j * (sw - .06) / max(n - 1, 1)
            s.add("body", "rect", (sx, by0, sx + .03, seat_y))
    elif style == 2:   # rounded top
        s.add("body", "ellipse", (x0, by0 - .08, x0 + sw, by0 + .14))
        s.add("body", "rect", (x0 + .03, by0 + .03, x0 + sw - .03, seat_y))
    else:              # ladder back
        for lx in (x0, x0 + sw - .03):
            s.add("body", "rect", (lx, by0, lx + .03, seat_y))
        n = int(s.rng.integers(2, 5))
        for j in range(n):
            y = by0 + .02 + j * (bh - .08) / max(n - 1, 1)
            s.add("body", "rect", (x0, y, x0 + sw, y + .035))
    s.add("body", "rect", (x0 - .02, seat_y, x0 + sw + .02, seat_y + st), radius=.01)
    for lx, d in ((x0 + .01, -1), (x0 + sw - .01, 1)):
        s.add("front", "line", [(lx, seat_y + st), (lx + d * splay, .93)], leg, width=lw)
    if s.chance(.35):
        for lx in (x0 - .03, x0 + sw + .03):
            s.add("front", "line", [(lx, seat_y - .12), (lx, seat_y)], "accent", width=.025)
        s.add("front", "line", [(x0 - .05, seat_y - .12), (x0 + .08, seat_y - .12)], "accent", width=.025)
    if s.chance(.3):
        s.add("front", "rect", (x0, seat_y - .03, x0 + sw, seat_y + .01), "accent", radius=.015)


def _coffee_maker(s):
    bw, left = s.u(.45, .6), s.chance(.5)
    x0, x1, base_y = .5 - bw / 2, .5 + bw / 2, .82
    tw, top_y = s.u(.16, .26), s.u(.14, .28)
    tx0, tx1 = (x0, x0 + tw) if left else (x1 - tw, x1)
    s.add("body", "rect", (x0, base_y - .07, x1, base_y), radius=.015)
    s.add("body", "rect", (tx0, top_y, tx1, base_y - .05), radius=s.u(0, .04))
    hh = s.u(.1, .16)
    s.add("body", "rect", (x0, top_y, x1, top_y + hh), radius=s.u(.01, .05))
    cx0, cx1 = (tx1 + .03, x1 - .03) if left else (x0 + .03, tx0 - .03)
    cy0 = top_y + hh + .03
    s.add("front", "poly", [(cx0 + .03, cy0), (cx1 - .03, cy0), (cx1, base_y - .08), (cx0, base_y - .08)],
          "light")
    level = s.u(.3, .8)
    ly = base_y - .08 - level * (base_y - .08 - cy0)
    s.add("front", "poly", [(cx0 + .01, ly), (cx1 - .01, ly), (cx1, base_y - .08), (cx0, base_y - .08)], "dark")
    hx = cx1 if left else cx0
    s.add("front", "ring", (hx - .04, cy0 + .04, hx + .04, cy0 + .16), "accent", width=.018)
    for j in range(int(s.rng.integers(1, 5))):
        bx = (tx0 + tx1) / 2
        by = top_y + hh + .06 + j * .06
        s.add("front", "ellipse", (bx - .018, by - .018, bx + .018, by + .018), "accent")
    if s.chance(.5):
        s.add("front", "rect", (tx0 + .02, top_y + .03, tx1 - .02, top_y + .08), "dark")


def _fan(s):
    if s.chance(.25):   # tower fan
        w, h = s.u(.18, .28), s.u(.6, .75)
        x0, y0 = .5 - w / 2, .86 - h
        s.add("back", "ellipse", (.5 - w * .9, .84, .5 + w * .9, .92), "dark")
        s.add("body", "rect", (x0, y0, x0 + w, .87), radius=s.u(.02, .09))
        n = int(s.rng.integers(3, 8))
        for j in range(n):
            sx = x0 + .04 + j * (w - .08) / max(n - 1, 1)
            s.add("front", "line", [(sx, y0 + .15), (sx, .8)], "dark", width=.01)
        s.add("front", "rect", (x0 + .03, y0 + .03, x0 + w - .03, y0 + .1), "accent", radius=.02)
        return
    bw = s.u(.3, .45)
    cy, rh = s.u(.3, .4), s.u(.2, .28)
    s.add("back", "ellipse", (.5 - bw / 2, .86, .5 + bw / 2, .94), "dark")
    s.add("back", "line", [(.5, .9), (.5, cy)], s.pick(["metal", "dark"]), width=s.u(.02, .04))
    nb, off, bwid = s.pick([3, 4, 5]), s.u(0, math.pi), s.u(.3, .5)
    for j in range(nb):
        a = off + 2 * math.pi * j / nb
        pts = []
        for t in np.linspace(0, 2 * math.pi, 16, endpoint=False):
            along, across = .45 * rh * (1 + math.cos(t)), bwid * rh * .5 * math.sin(t)
            pts.append((.5 + along * math.cos(a) - across * math.sin(a),
                        cy + along * math.sin(a) + across * math.cos(a)))
        s.add("body", "poly", pts)
    for j in range(int(s.rng.integers(2, 5))):
        rr = rh * (j + 1) / 4.5
        s.add("front", "ring", (.5 - rr, cy - rr, .5 + rr, cy + rr), "metal", width=.006)
    for j in range(s.pick([8, 12, 16])):
        a = 2 * math.pi * j / 16
        s.add("front", "line", [(.5, cy), (.5 + rh * math.cos(a), cy + rh * math.sin(a))], "metal", width=.005)
    s.add("front", "ring", (.5 - rh, cy - rh, .5 + rh, cy + rh), "accent", width=.018)
    hub = s.u(.03, .06)
    s.add("front", "ellipse", (.5 - hub, cy - hub, .5 + hub, cy + hub), "accent")


def _kettle(s):
    w, h, bottom = s.u(.38, .52), s.u(.38, .55), .82
    x0, top = .5 - w / 2, bottom - h
    d = s.pick([-1, 1])   # spout side
    sx = .5 + d * w / 2
    s.add("back", "poly", [(sx - d * .03, top + h * .45), (sx - d * .03, top + h * .7),
                           (sx + d * s.u(.1, .16), top + h * s.u(.05, .3))], "body")
    if s.chance(.5):   # handle over the top
        s.add("back", "arc", (x0 + .06, top - h * .35, x0 + w - .06, top + h * .3), "accent",
              start=180, end=360, width=s.u(.025, .045))
    else:
        hx = .5 - d * w / 2
        s.add("back", "ring", (hx - .1, top + h * .15, hx + .1, top + h * .75), "accent",
              width=s.u(.025, .045))
    shape = int(s.rng.integers(3))
    if shape == 0:
        s.add("body", "ellipse", (x0, top, x0 + w, bottom + .03))
    elif shape == 1:
        s.add("body", "poly", [(x0 + w * .22, top), (x0 + w * .78, top), (x0 + w, bottom), (x0, bottom)])
    else:
        s.add("body", "rect", (x0, top, x0 + w, bottom), radius=s.u(.02, .08))
    s.add("front", "ellipse", (.5 - w * .25, top - .025, .5 + w * .25, top + .025), "accent")
    s.add("front", "ellipse", (.5 - .02, top - .05, .5 + .02, top - .01), "dark")
    if s.chance(.6):
        s.add("front", "ellipse", (x0 - .02, bottom - .02, x0 + w + .02, bottom + .04), "dark")
    if s.chance(.3):
        s.add("front", "rect", (.5 - .025, top + h * .25, .5 + .025, top + h * .8), "light", radius=.02)


def _lamp(s):
    bw = s.u(.2, .34)
    base = s.pick(["dark", "metal", "accent"])
    if s.chance(.5):
        s.add("back", "ellipse", (.5 - bw / 2, .87, .5 + bw / 2, .94), base)
    else:
        s.add("back", "rect", (.5 - bw / 2, .86, .5 + bw / 2, .93), base, radius=.01)
    top_y, sh = s.u(.08, .2), s.u(.18, .3)
    stem, sw = s.pick(["metal", "dark", "accent"]), s.u(.015, .03)
    if s.chance(.4):   # angled arm with a joint
        jx, jy = .5 + s.pick([-1, 1]) * s.u(.08, .18), s.u(.45, .6)
        s.add("back", "line", [(.5, .88), (jx, jy), (.5, top_y + sh)], stem, width=sw)
        s.add("back", "ellipse", (jx - .025, jy - .025, jx + .025, jy + .025), "dark")
    else:
        s.add("back", "line", [(.5, .88), (.5, top_y + sh)], stem, width=sw)
    if s.chance(.4):
        s.add("back", "ellipse", (.5 - .05, top_y + sh - .04, .5 + .05, top_y + sh + .06), "light")
    if s.chance(.35):   # dome
        dw = s.u(.3, .48)
        s.add("body", "pie", (.5 - dw / 2, top_y, .5 + dw / 2, top_y + 2 * sh), start=180, end=360)
        y_trim, half = top_y + sh, dw / 2
    else:
        tw, bw2 = s.u(.14, .3), s.u(.3, .5)
        s.add("body", "poly", [(.5 - tw / 2, top_y), (.5 + tw / 2, top_y),
                               (.5 + bw2 / 2, top_y + sh), (.5 - bw2 / 2, top_y + sh)])
        y_trim, half = top_y + sh, bw2 / 2
    if s.chance(.4):
        s.add("front", "line", [(.5 - half, y_trim), (.5 + half, y_trim)], "accent", width=.02)


def _mug(s):
    w, h = s.u(.34, .48), s.u(.38, .55)
    x0, top = .46 - w / 2, .52 - h / 2
    right = s.chance(.8)
    hw, hh = s.u(.1, .18), h * s.u(.4, .65)
    hx0 = x0 + w - .05 if right else x0 - hw + .05
    s.add("back", "ring", (hx0, top + h * .15, hx0 + hw, top + h * .15 + hh),
          s.pick(["body", "accent"]), width=s.u(.03, .06))
    if s.chance(.3):
        s.add("back", "ellipse", (x0 - .1, top + h - .03, x0 + w + .1, top + h + .06), s.pick(["accent", "light"]))
    s.add("body", "rect", (x0, top, x0 + w, top + h), radius=s.u(.01, .06))
    s.add("front", "ellipse", (x0, top - .03, x0 + w, top + .03), "dark")
    if s.chance(.4):
        s.add("front", "line", [(x0, top + .005), (x0 + w, top + .005)], "accent", width=.012)


def _sofa(s):
    w, seat_y, bh = s.u(.66, .86), s.u(.48, .56), s.u(.16, .24)
    x0, x1 = .5 - w / 2, .5 + w / 2
    back_h, aw = s.u(.14, .28), s.u(.06, .12)
    leg = s.pick(["dark", "metal", None])
    if leg:
        for lx in (x0 + .04, .5, x1 - .06)[:: 1 if s.chance(.5) else 2]:
            s.add("back", "rect", (lx, seat_y + bh - .02, lx + .025, seat_y + bh + .06), leg)
    s.add("body", "rect", (x0 + aw * .5, seat_y - back_h, x1 - aw * .5, seat_y + .02), radius=s.u(.01, .05))
    s.add("body", "rect", (x0, seat_y, x1, seat_y + bh), radius=.02)
    arm_top = seat_y - s.u(.03, .12)
    for ax in (x0, x1 - aw):
        s.add("body", "rect", (ax, arm_top, ax + aw, seat_y + bh), radius=s.u(.01, .04))
    n = int(s.rng.integers(1, 5))
    inner = (x1 - aw) - (x0 + aw)
    for j in range(1, n):
        cx = x0 + aw + inner * j / n
        s.add("front", "line", [(cx, seat_y - back_h + .03), (cx, seat_y + .06)], "dark", width=.008)
    s.add("front", "line", [(x0 + aw, seat_y + .06), (x1 - aw, seat_y + .06)], "dark", width=.008)
    if s.chance(.5):
        for px in ([x0 + aw + .02] + ([x1 - aw - .14] if s.chance(.6) else [])):
            s.add("front", "rect", (px, seat_y - .12, px + .12, seat_y + .01), "accent", radius=.02)


def _stapler(s):
    length = s.u(.6, .8)
    x0, base_y = .5 - length / 2, s.u(.6, .66)
    s.add("back", "rect", (x0, base_y, x0 + length, base_y + .05), s.pick(["dark", "metal"]), radius=.01)
    back_h, front_h = s.u(.1, .2), s.u(.04, .09)
    front_x, bump = x0 + length * s.u(.9, 1.0), s.u(0, .04)
    s.add("body", "poly", [(x0, base_y), (x0, base_y - back_h), ((x0 + front_x) / 2, base_y - back_h * .7 - bump),
                           (front_x, base_y - front_h), (front_x, base_y - .005)])
    s.add("front", "ellipse", (x0 + .01, base_y - .05, x0 + .06, base_y), "accent")
    if s.chance(.5):
        s.add("front", "line", [(x0 + .05, base_y - back_h * .6), (front_x - .04, base_y - front_h * .6)],
              "accent", width=.015)
    s.add("front", "rect", (front_x - .05, base_y - front_h, front_x, base_y - .005), "metal", radius=.01)


def _table(s):
    w, th, top_y = s.u(.6, .86), s.u(.03, .07), s.u(.32, .45)
    x0, x1 = .5 - w / 2, .5 + w / 2
    leg, style, lw = s.pick(["accent", "dark", "metal", "body"]), int(s.rng.integers(4)), s.u(.025, .05)
    if style == 0:   # four straight legs
        for lx in (x0 + .06, x1 - .06 - lw):
            s.add("back", "rect", (lx + .04, top_y, lx + lw + .04, .86), leg)
        for lx in (x0 + .02, x1 - .02 - lw):
            s.add("front", "rect", (lx, top_y + th, lx + lw, .9), leg)
    elif style == 1:   # splayed
        for lx, d in ((x0 + .06, -1), (x1 - .06, 1)):
            s.add("front", "line", [(lx, top_y + th), (lx + d * .06, .9)], leg, width=lw)
    elif style == 2:   # pedestal
        s.add("back", "rect", (.5 - lw, top_y, .5 + lw, .88), leg)
        s.add("back", "ellipse", (.5 - w * .3, .85, .5 + w * .3, .92), leg)
    else:              # trestle
        for cx in (x0 + .12, x1 - .12):
            s.add("front", "line", [(cx - .07, .9), (cx, top_y + th), (cx + .07, .9)], leg, width=lw)
    if s.chance(.35):
        s.add("body", "ellipse", (x0, top_y - th, x1, top_y + th))
    else:
        s.add("body", "rect", (x0, top_y, x1, top_y + th), radius=s.u(0, .02))
    if s.chance(.5):
        s.add("body", "rect", (x0 + .04, top_y + th, x1 - .04, top_y + th + s.u(.03, .07)))
    if s.chance(.3):
        s.add("front", "rect", (x0 + .05, .72, x1 - .05, .75), leg)


def _toaster(s):
    w, h, bottom = s.u(.5, .7), s.u(.32, .46), .78
    x0, top = .5 - w / 2, bottom - h
    depth = s.u(.05, .1)
    s.add("back", "poly", [(x0 + depth, top - depth), (x0 + w + depth, top - depth), (x0 + w, top), (x0, top)], "metal")
    n_slots = s.pick([1, 2, 2, 4])
    for j in range(n_slots):
        sx = x0 + w * (j + 1) / (n_slots + 1)
        s.add("back", "line", [(sx - .06 + depth * .6, top - depth * .55), (sx + .06 + depth * .4, top - depth * .45)],
              "dark", width=.018)
    s.add("body", "rect", (x0, top, x0 + w, bottom), radius=s.u(.03, .12))
    s.add("front", "rect", (x0 + w - .07, top + h * .2, x0 + w - .03, top + h * .28), "accent", radius=.01)
    for j in range(int(s.rng.integers(1, 4))):
        cx = x0 + w - .05
        cy = top + h * .45 + j * .07
        s.add("front", "ellipse", (cx - .022, cy - .022, cx + .022, cy + .022), s.pick(["accent", "dark"]))
    if s.chance(.4):
        s.add("front", "rect", (x0, top + h * .55, x0 + w - .1, top + h * .62), "metal")
    for fx in (x0 + .05, x0 + w - .09):
        s.add("front", "rect", (fx, bottom - .005, fx + .04, bottom + .02), "dark")


_FAMILIES = {
    "bicycle": _bicycle, "cabinet": _cabinet, "chair": _chair, "coffee_maker": _coffee_maker,
    "fan": _fan, "kettle": _kettle, "lamp": _lamp, "mug": _mug, "sofa": _sofa,
    "stapler": _stapler, "table": _table, "toaster": _toaster,
}


def _jitter(rng, rgb, amount=12):
    return tuple(int(np.clip(c + rng.integers(-amount, amount + 1), 0, 255)) for c in rgb)


def _pattern_texture(rng, size, body, second):
    """The product's surface: a size×size RGB image in the product's own frame."""
    kind = _PATTERNS[int(rng.integers(len(_PATTERNS)))]
    # 1-D coordinates that broadcast to size×size: no full grids for stripes
    xx = (np.arange(size, dtype=np.float32) / size)[None, :]
    yy = (np.arange(size, dtype=np.float32) / size)[:, None]
    freq, duty, phase = rng.uniform(4, 12), rng.uniform(.3, .6), rng.uniform(0, 1)
    if kind == "solid":
        mask = np.zeros((1, 1), dtype=bool)
    elif kind == "hstripes":
        mask = (yy * freq + phase) % 1 < duty
    elif kind == "vstripes":
        mask = (xx * freq + phase) % 1 < duty
    elif kind == "diagonal":
        mask = ((xx + rng.choice([-1, 1]) * yy) * freq * .7 + phase) % 1 < duty
    elif kind == "dots":
        fx, fy = (xx * freq + phase) % 1 - .5, (yy * freq + phase) % 1 - .5
        mask = fx * fx + fy * fy < (duty * .6) ** 2
    elif kind == "checker":
        f = freq * .6
        mask = ((np.floor(xx * f + phase) + np.floor(yy * f + phase)) % 2) == 1
    elif kind == "bands":
        centres = rng.uniform(.2, .8, int(rng.integers(1, 4)))
        width = rng.uniform(.03, .08)
        mask = np.zeros_like(yy, dtype=bool)
        for c in centres:
            mask |= np.abs(yy - c) < width
    else:  # grid
        mask = ((xx * freq + phase) % 1 < duty * .35) | ((yy * freq + phase) % 1 < duty * .35)
    mask = np.broadcast_to(mask, (size, size))
    arr = np.where(mask[..., None], np.asarray(second, np.uint8), np.asarray(body, np.uint8))
    return Image.fromarray(np.ascontiguousarray(arr, dtype=np.uint8), "RGB")


def _render_product(category, rng, size):
    """The product's identity: an RGBA sprite of ``size``×``size`` pixels."""
    names = list(_COLOURS)
    body = _jitter(rng, _COLOURS[_BODY_PALETTES[category][int(rng.integers(len(_BODY_PALETTES[category])))]])
    accent = _jitter(rng, _COLOURS[names[int(rng.integers(len(names)))]])
    second = _jitter(rng, _COLOURS[names[int(rng.integers(len(names)))]])
    roles = {
        "body": body, "accent": accent,
        "dark": _jitter(rng, [(30, 30, 32), (58, 46, 40), (70, 72, 78)][int(rng.integers(3))], 6),
        "metal": _jitter(rng, [(180, 184, 192), (150, 152, 158), (205, 185, 130)][int(rng.integers(3))], 8),
        "light": _jitter(rng, [(222, 236, 244), (246, 236, 196)][int(rng.integers(2))], 6),
    }
    sketch = _Sketch(rng)
    _FAMILIES[category](sketch)
    texture = _pattern_texture(rng, size, body, second)

    sprite = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    body_mask = Image.new("L", (size, size), 0)
    px = lambda pts: [(x * size, y * size) for x, y in pts]  # noqa: E731

    def draw_op(draw, kind, xy, fill, kw):
        width = max(1, int(round(kw.get("width", 0) * size)))
        if kind in ("rect", "rectline", "ellipse", "ring", "arc", "pie"):
            box = [v * size for v in _box(*xy)]
            if kind == "rect":
                radius = kw.get("radius", 0) * size
                if radius >= 1:
                    draw.rounded_rectangle(box, radius=radius, fill=fill)
                else:
                    draw.rectangle(box, fill=fill)
            elif kind == "rectline":
                draw.rectangle(box, outline=fill, width=width)
            elif kind == "ellipse":
                draw.ellipse(box, fill=fill)
            elif kind == "ring":
                draw.ellipse(box, outline=fill, width=width)
            elif kind == "arc":
                draw.arc(box, kw["start"], kw["end"], fill=fill, width=width)
            else:
                draw.pieslice(box, kw["start"], kw["end"], fill=fill)
        elif kind == "poly":
            draw.polygon(px(xy), fill=fill)
        elif kind == "line":
            draw.line(px(xy), fill=fill, width=width, joint="curve")
        else:
            raise ValueError(f"unknown drawing op {kind!r}")

    sprite_draw, mask_draw = ImageDraw.Draw(sprite), ImageDraw.Draw(body_mask)
    for layer in ("back", "body", "front"):
        for op_layer, kind, xy, role, kw in sketch.ops:
            if op_layer != layer:
                continue
            if layer == "body":
                draw_op(mask_draw, kind, xy, 255, kw)
            else:
                draw_op(sprite_draw, kind, xy, roles[role] + (255,), kw)
        if layer == "body":
            # Pattern over the whole body layer, then a darker outline so parts stay distinct.
            sprite.paste(texture, (0, 0), body_mask)
            edge = body_mask.filter(ImageFilter.FIND_EDGES)
            outline = tuple(int(c * .55) for c in body) + (255,)
            sprite.paste(Image.new("RGBA", (size, size), outline), (0, 0), edge)
    return sprite


def _background(rng, w, h):
    """A random scene for one photo (independent of the product)."""
    # Product photos are mostly shot on light, plain backgrounds; the rest are scenes.
    kind = rng.choice(["plain", "gradient", "texture", "room", "clutter"], p=[.45, .15, .1, .18, .12])

    def colour(light=False):
        if light:
            g = rng.uniform(200, 255)
            return np.clip(g + rng.uniform(-12, 12, 3), 0, 255)
        return rng.uniform(0, 255, 3)
    if kind in ("plain", "clutter"):
        arr = np.broadcast_to(colour(rng.random() < .7), (h, w, 3)).astype(np.float32)
        arr = arr * (1 + rng.uniform(-.08, .08) * np.linspace(-1, 1, h, dtype=np.float32)[:, None, None])
    elif kind == "gradient":
        a, b = colour(), colour()
        t = rng.uniform(0, 2 * np.pi)
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        ramp = (xx / w - .5) * np.cos(t) + (yy / h - .5) * np.sin(t) + .5
        arr = a + (b - a) * np.clip(ramp, 0, 1)[..., None]
    elif kind == "texture":
        cells = int(rng.integers(2, 9))
        low = (rng.random((cells, cells, 3)) * 255).astype(np.uint8)
        arr = np.asarray(Image.fromarray(low, "RGB").resize((w, h), Image.BICUBIC), np.float32)
        arr = arr * rng.uniform(.3, .7) + colour() * rng.uniform(.3, .6)
    else:  # room: wall above, floor (maybe planks) below
        horizon = int(h * rng.uniform(.45, .8))
        arr = np.empty((h, w, 3), np.float32)
        arr[:horizon] = colour(rng.random() < .5)
        floor = colour()
        arr[horizon:] = floor
        if rng.random() < .5:
            period = max(2, int(w * rng.uniform(.05, .15)))
            arr[horizon:, ::period] = floor * .7
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")
    if kind == "clutter":
        draw = ImageDraw.Draw(img)
        for _ in range(int(rng.integers(2, 6))):
            x, y = rng.uniform(0, w), rng.uniform(0, h)
            rw, rh = rng.uniform(.1, .35) * w, rng.uniform(.1, .35) * h
            fill = tuple(int(c) for c in colour())
            (draw.ellipse if rng.random() < .5 else draw.rectangle)(
                [x - rw / 2, y - rh / 2, x + rw / 2, y + rh / 2], fill=fill)
    return img


def _render_view(sprite, rng, w, h):
    """One photo of the product: returns JPEG bytes."""
    img = _background(rng, w, h)
    base = min(w, h)
    scale = rng.uniform(.6, .98) * base
    aspect = math.exp(rng.uniform(-.15, .15))           # viewpoint: wider or narrower
    ow, oh = max(2, int(round(scale * aspect))), max(2, int(round(scale / aspect)))
    obj = sprite.resize((ow, oh), Image.BILINEAR, reducing_gap=2.0)
    if rng.random() < .5:
        obj = obj.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    # rotate premultiplied, so the transparent border does not bleed black into the edges
    obj = obj.convert("RGBa").rotate(rng.uniform(-25, 25), Image.BILINEAR, expand=True).convert("RGBA")
    cx = w / 2 + rng.uniform(-.15, .15) * w
    cy = h / 2 + rng.uniform(-.15, .15) * h
    left, top = int(round(cx - obj.width / 2)), int(round(cy - obj.height / 2))
    if rng.random() < .4:   # soft contact shadow, blurred at quarter resolution (cheap at 600 px)
        q = 4 if base >= 128 else 1
        shadow = Image.new("L", (max(1, w // q), max(1, h // q)), 0)
        sw = obj.width * rng.uniform(.5, .9)
        bottom = top + obj.height * .9
        ImageDraw.Draw(shadow).ellipse([(cx - sw / 2) / q, (bottom - .06 * base) / q,
                                        (cx + sw / 2) / q, (bottom + .04 * base) / q],
                                       fill=int(rng.uniform(60, 140)))
        shadow = shadow.filter(ImageFilter.GaussianBlur(base * .03 / q)).resize((w, h), Image.BILINEAR)
        img.paste(Image.new("RGB", (w, h), (0, 0, 0)), (0, 0), shadow)
    img.paste(obj, (left, top), obj)
    if rng.random() < .3:  # occluder: something in front of the product
        draw = ImageDraw.Draw(img)
        ow2, oh2 = rng.uniform(.12, .32) * base, rng.uniform(.12, .32) * base
        ox = cx + rng.uniform(-.5, .5) * obj.width
        oy = cy + rng.uniform(-.5, .5) * obj.height
        fill = tuple(int(c) for c in rng.uniform(0, 255, 3))
        (draw.ellipse if rng.random() < .5 else draw.rectangle)(
            [ox - ow2 / 2, oy - oh2 / 2, ox + ow2 / 2, oy + oh2 / 2], fill=fill)
    # lighting: exposure and white balance, light falling off across the scene, sensor
    # noise, then gamma (a lookup table: cheap at 600 px)
    gain = (rng.uniform(.75, 1.2) * rng.uniform(.9, 1.1, 3)).astype(np.float32)
    t = rng.uniform(0, 2 * np.pi)
    ramp = rng.uniform(0, .4) * (np.linspace(-.5, .5, w, dtype=np.float32)[None, :] * np.float32(np.cos(t))
                                 + np.linspace(-.5, .5, h, dtype=np.float32)[:, None] * np.float32(np.sin(t)))
    arr = np.asarray(img, np.float32) * (1 + ramp)[..., None]
    arr *= gain
    sigma = rng.uniform(0, 5)
    arr += rng.standard_normal(arr.shape, dtype=np.float32) * np.float32(sigma)
    np.clip(arr, 0, 255, out=arr)
    lut = np.round(255 * (np.arange(256) / 255.0) ** rng.uniform(.75, 1.3)).astype(np.uint8)
    img = Image.fromarray(lut[(arr + .5).astype(np.uint8)], "RGB")
    if rng.random() < .2:
        img = img.filter(ImageFilter.GaussianBlur(rng.uniform(.3, 1.0) * base / 96))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=int(rng.integers(55, 96)))
    return buf.getvalue()


def _parse_image_size(image_size):
    """96 → (96, 96); "300-600" or (300, 600) → sides drawn per photo in [300, 600]."""
    if isinstance(image_size, str):
        lo, _, hi = image_size.partition("-")
        image_size = (int(lo), int(hi or lo))
    if isinstance(image_size, (int, np.integer)):
        image_size = (int(image_size), int(image_size))
    lo, hi = (int(v) for v in image_size)
    if not 16 <= lo <= hi <= 4096:
        raise ValueError(f"image_size must be a side in 16..4096 or a range 'MIN-MAX', got {image_size}")
    return lo, hi


def _product_plan(num_products, seed):
    """(class_id, category, n_images, split) for every product. Train gets class ids
    1..n_train, test n_train+1..num_products, as in SOP; every split cycles through all
    12 categories (shuffled) so each holds every category once it has 12 products."""
    rng = np.random.default_rng([seed, 0xC0FFEE])
    n_train = (num_products + 1) // 2
    plan = []
    for split, first, count in (("train", 1, n_train), ("test", n_train + 1, num_products - n_train)):
        cats = rng.permutation(np.arange(count) % len(SOP_CATEGORIES))
        sizes = 2 + rng.choice(len(_SIZE_WEIGHTS), count, p=_SIZE_WEIGHTS)
        plan += [(first + j, SOP_CATEGORIES[c], int(n), split) for j, (c, n) in enumerate(zip(cats, sizes))]
    return plan


def _product_stem(class_id):
    """An eBay-like 12-digit product id for file names ``<id>_<n>.JPG``."""
    return f"{111_000_000_000 + 7919 * class_id}"


def _write_product(job):
    tmp_root, class_id, category, n_images, seed, (lo, hi) = job
    rng = np.random.default_rng([seed, class_id])
    sprite = _render_product(category, rng, size=min(2 * hi, 768))
    rel = []
    for n in range(n_images):
        w, h = (int(rng.integers(lo, hi + 1)), int(rng.integers(lo, hi + 1))) if hi > lo else (lo, lo)
        path = f"{category}_final/{_product_stem(class_id)}_{n}.JPG"
        with open(os.path.join(tmp_root, path), "wb") as f:
            f.write(_render_view(sprite, rng, w, h))
        rel.append(path)
    return rel


def make_synthetic_sop(root, num_products=1200, image_size=96, seed=0, workers=None, progress=False):
    """Write a synthetic SOP to ``root`` and return ``root`` as a Path.

    Layout as SOP: ``Ebay_train.txt``, ``Ebay_test.txt``, ``Ebay_info.txt`` (header
    ``image_id class_id super_class_id path``) and ``<category>_final/<id>_<n>.JPG`` for the
    12 categories; products split about 50/50 into train (class ids 1..n_train) and test
    (the rest), 2–12 photos each (mean ≈ 5.5). ``image_size``: an int for square photos, or
    ``(min, max)`` / ``"min-max"`` for sides drawn per photo (e.g. "300-600" for SOP-like
    JPEGs). Byte-identical output for the same arguments, whatever ``workers``.

    Atomic: everything goes to a sibling ``.<name>.tmp-*`` folder, ``.complete`` is written
    last and the folder is renamed onto ``root``, so an interrupted run never leaves a
    dataset at ``root``. An existing ``root`` must be empty or a dataset made by this
    function (it is replaced); anything else raises FileExistsError.
    """
    root = Path(root).expanduser()
    lo, hi = _parse_image_size(image_size)
    if num_products < 2:
        raise ValueError(f"num_products must be >= 2 (train and test), got {num_products}")
    if root.exists() and any(root.iterdir()) and (read_marker(root) or {}).get("source") != "synthetic":
        raise FileExistsError(f"{root} exists and is not a synthetic SOP made by datasets.py; "
                              f"choose another --root or remove it")
    plan = _product_plan(num_products, seed)
    workers = _default_workers() if workers is None else workers
    tmp = _make_tmp_dir(root)
    try:
        for cat in SOP_CATEGORIES:
            (tmp / f"{cat}_final").mkdir()
        jobs = [(str(tmp), cid, cat, n, seed, (lo, hi)) for cid, cat, n, _ in plan]
        bar = dict(total=len(jobs), desc="synthetic SOP", unit="product", disable=not progress)
        if workers > 1 and len(jobs) > 4 * workers:
            with _mp_context().Pool(workers) as pool:
                rels = list(tqdm(pool.imap(_write_product, jobs, chunksize=8), **bar))
        else:
            rels = [_write_product(job) for job in tqdm(jobs, **bar)]
        info_lines, counts = [], {}
        for split, name in (("train", "Ebay_train.txt"), ("test", "Ebay_test.txt")):
            lines = [" ".join(EBAY_HEADER)]
            for (cid, cat, _, s), rel in zip(plan, rels):
                if s != split:
                    continue
                for path in rel:
                    image_id = len(lines)
                    lines.append(f"{image_id} {cid} {SOP_CATEGORIES.index(cat) + 1} {path}")
                    info_lines.append((cid, SOP_CATEGORIES.index(cat) + 1, path))
            counts[split] = len(lines) - 1
            (tmp / name).write_text("\n".join(lines) + "\n")
        (tmp / "Ebay_info.txt").write_text(
            "\n".join([" ".join(EBAY_HEADER)] + [f"{i} {c} {s} {p}" for i, (c, s, p)
                                                 in enumerate(info_lines, start=1)]) + "\n")
        _write_marker(tmp, {"source": "synthetic", "version": SYNTHETIC_VERSION,
                            "num_products": num_products, "image_size": [lo, hi], "seed": seed,
                            "train_images": counts["train"], "test_images": counts["test"]})
        _publish_dir(tmp, root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root


def ensure_synthetic_sop(root, num_products=1200, image_size=96, seed=0, workers=None, progress=False,
                         replace=False):
    """``root`` as a Path, generated by ``make_synthetic_sop`` when absent (or empty).

    A complete synthetic SOP already there is returned as is when it was made with the same
    arguments and generator version. One made otherwise is replaced only with
    ``replace=True`` (for caches a tool owns); else FileExistsError names what differs, so a
    dataset someone pointed us at is never regenerated behind their back."""
    root = Path(root).expanduser()
    lo, hi = _parse_image_size(image_size)
    marker = read_marker(root) or {}
    wanted = {"source": "synthetic", "version": SYNTHETIC_VERSION, "num_products": num_products,
              "image_size": [lo, hi], "seed": seed}
    differs = {k: (marker.get(k), v) for k, v in wanted.items() if marker.get(k) != v}
    if not differs:
        return root
    if marker.get("source") == "synthetic" and not replace:
        detail = ", ".join(f"{k} {have!r} (wanted {want!r})" for k, (have, want) in differs.items())
        raise FileExistsError(
            f"{root} holds a synthetic SOP made with other settings: {detail}. Use it with those "
            f"settings, pass another --root, or regenerate it (`python datasets.py synthetic "
            f"--root {root} --force` with the settings you want)")
    return make_synthetic_sop(root, num_products, (lo, hi), seed, workers, progress)


# ============ download ============

def _offline_message(url, zip_path, root, reason):
    return (f"Could not download {url} ({reason}). This machine seems to be offline or the "
            f"server is unreachable. Download the archive by hand (about 2.9 GB) and put it at "
            f"{zip_path}, then rerun `python datasets.py download --root {root}`: it skips the "
            f"download and extracts. Without SOP, use the synthetic stand-in: "
            f"`python datasets.py synthetic --root data/synthetic_sop`.")


def _resolve_host(url, timeout):
    """Name lookup bounded by ``timeout``: urlopen's timeout covers the socket, not DNS, and
    a machine without a network can hang in getaddrinfo for half a minute."""
    parts = urllib.parse.urlsplit(url)
    result = {}

    def lookup():
        try:
            result["addr"] = socket.getaddrinfo(parts.hostname, parts.port or 80)
        except OSError as e:
            result["error"] = e

    thread = threading.Thread(target=lookup, daemon=True)   # daemon: never blocks exit
    thread.start()
    thread.join(timeout)
    if "error" in result:
        raise result["error"]
    if "addr" not in result:
        raise TimeoutError(f"no answer for {parts.hostname} within {timeout:g} s")


def _http_download(url, dest, timeout=10.0, progress=True, chunk_size=1 << 20):
    """Fetch ``url`` into ``dest`` through ``dest.part``; a rerun resumes the ``.part`` with
    an HTTP Range request. Raises DownloadError (with the manual-download hint) on failure."""
    dest = Path(dest)
    part = dest.with_name(dest.name + ".part")
    start = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": "datasets.py"}
    if start:
        headers["Range"] = f"bytes={start}-"
    root = dest.parent
    try:
        _resolve_host(url, timeout)
        response = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and start:   # the .part already holds the whole file
            os.replace(part, dest)
            return dest
        raise DownloadError(_offline_message(url, dest, root, f"HTTP {e.code} {e.reason}")) from e
    except OSError as e:   # URLError, timeouts, DNS and connection errors
        raise DownloadError(_offline_message(url, dest, root, getattr(e, "reason", e))) from e
    with response:
        if start and getattr(response, "status", 200) != 206:
            start = 0   # the server ignored the Range header: start over
        length = response.headers.get("Content-Length")
        total = start + int(length) if length is not None else None
        with open(part, "ab" if start else "wb") as f, \
                tqdm(total=total, initial=start, unit="B", unit_scale=True, unit_divisor=1024,
                     desc=dest.name, disable=not progress) as bar:
            while True:
                try:
                    buf = response.read(chunk_size)
                except OSError as e:
                    raise DownloadError(f"Download of {url} broke off after {f.tell()} bytes ({e}); "
                                        f"rerun the same command to resume from {part}") from e
                if not buf:
                    break
                f.write(buf)
                bar.update(len(buf))
    size = part.stat().st_size
    if total is not None and size != total:
        raise DownloadError(f"Download of {url} stopped at {size} of {total} bytes; rerun the same "
                            f"command to resume from {part}")
    os.replace(part, dest)
    return dest


def check_sop_counts(root, expected=SOP_EXPECTED):
    """Problems found comparing the dataset at ``root`` with ``expected`` counts
    (``images`` on disk under ``*_final/``, ``train_rows``, ``test_rows``) and with its own
    listings (listed but missing images); an empty list when all is in place."""
    root = Path(root)
    problems = []
    listed = []
    for key, name in (("train_rows", "Ebay_train.txt"), ("test_rows", "Ebay_test.txt")):
        try:
            table = read_ebay_file(root / name)
        except (FileNotFoundError, ValueError) as e:
            problems.append(str(e))
            continue
        listed += table.rel_paths
        if expected and len(table.rel_paths) != expected[key]:
            problems.append(f"{name} has {len(table.rel_paths):,} rows, expected {expected[key]:,}")
    missing = [p for p in listed if not (root / p).is_file()]
    if missing:
        problems.append(f"{len(missing):,} listed images are missing: {_format_paths(missing)}")
    on_disk = sum(1 for d in root.glob("*_final") for f in d.iterdir() if f.is_file())
    if expected and on_disk != expected["images"]:
        problems.append(f"{on_disk:,} images on disk under *_final/, expected {expected['images']:,}")
    return problems


def _extract_zip(zip_path, dest_parent, progress=True):
    """Test and extract the archive into a temporary folder next to the final one; returns
    (tmp_folder, folder holding the Ebay files)."""
    try:
        with zipfile.ZipFile(zip_path) as zf:
            logger.info("Testing %s (reads the whole archive once)", zip_path)
            bad = zf.testzip()
            if bad is not None:
                raise DownloadError(f"{zip_path} is damaged (CRC error in {bad}); delete it and "
                                    f"download it again")
            tmp = _make_tmp_dir(Path(dest_parent) / SOP_DIRNAME)
            try:
                for member in tqdm(zf.infolist(), desc="extract", unit="file", disable=not progress):
                    zf.extract(member, tmp)   # extract() strips absolute paths and '..'
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
    except zipfile.BadZipFile as e:
        raise DownloadError(f"{zip_path} is not a valid zip archive ({e}); it is probably "
                            f"incomplete: delete it and download it again") from e
    for candidate in (tmp / SOP_DIRNAME, tmp):
        if (candidate / "Ebay_train.txt").is_file():
            return tmp, candidate
    shutil.rmtree(tmp, ignore_errors=True)
    raise DownloadError(f"{zip_path} holds no Ebay_train.txt (neither at the top nor under "
                        f"{SOP_DIRNAME}/); is it the SOP archive?")


def download_sop(root="data", url=SOP_URL, timeout=10.0, expected=SOP_EXPECTED, progress=True,
                 keep_zip=True):
    """Fetch, test and extract SOP into ``root/Stanford_Online_Products`` and return that path.

    Steps: skip everything if the folder is already complete; download
    ``root/Stanford_Online_Products.zip`` (resumable ``.part``) unless it is already there
    (e.g. copied in by hand); ``zipfile.testzip``; extract into a temporary folder; check
    ``expected`` counts (DatasetError listing what is missing, nothing published); mark
    complete and rename into place. Offline, fails after ``timeout`` seconds with a
    DownloadError telling where to put a hand-downloaded archive.
    """
    root = Path(root).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    target = root / SOP_DIRNAME
    if is_complete(target):
        logger.info("%s is already complete", target)
        return target
    if (target / "Ebay_train.txt").is_file():   # extracted by hand: check it, then accept it
        problems = check_sop_counts(target, expected)
        if problems:
            raise DatasetError(f"{target} exists but is incomplete: " + "; ".join(problems)
                               + f". Move it away and rerun to extract {root / SOP_ZIPNAME} again.")
        _write_marker(target, {"source": "download", "url": url, "checked": "existing folder"})
        return target
    if target.exists() and any(target.iterdir()):
        raise DatasetError(f"{target} exists but holds no Ebay_train.txt; move it away (or "
                           f"delete it) and rerun")
    zip_path = root / SOP_ZIPNAME
    if zip_path.is_file():
        logger.info("Using the archive already at %s", zip_path)
    else:
        _http_download(url, zip_path, timeout=timeout, progress=progress)
    tmp, extracted = _extract_zip(zip_path, root, progress)
    try:
        problems = check_sop_counts(extracted, expected)
        if problems:
            raise DatasetError(f"The archive {zip_path} does not hold the full SOP dataset: "
                               + "; ".join(problems) + ". Delete the archive and download it again.")
        table_rows = {k: len(read_ebay_file(extracted / n).rel_paths)
                      for k, n in (("train_rows", "Ebay_train.txt"), ("test_rows", "Ebay_test.txt"))}
        _write_marker(extracted, {"source": "download", "url": url, **table_rows})
        _publish_dir(extracted, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if not keep_zip:
        zip_path.unlink()
    return target


# ============ resize ============

def _resize_one(job):
    src, dst, size, quality = job
    try:
        img = load_image(src, size).resize((size, size), Image.BILINEAR)
    except IMAGE_ERRORS:
        # keep a bad file bad: the copy must fail in the same places as the original
        shutil.copyfile(src, dst)
        return src
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    with open(dst, "wb") as f:
        f.write(buf.getvalue())
    return None


def resize_dataset(src, dst, size=256, quality=95, workers=None, progress=True):
    """Pre-resized copy of a dataset: same Ebay files and layout, every image stored as a
    ``size``×``size`` JPEG — the square ``Resize((size, size))`` that ``build_transform``
    does first (size = round(image_size * 256 / 224): 256 for 224 px), so repeated epochs
    skip decoding full-size JPEGs. Unreadable originals are copied unchanged. Atomic
    (temporary folder, ``.complete``, rename). Returns ``dst``."""
    src, dst = resolve_sop_root(src), Path(dst).expanduser()
    if dst.exists() and any(dst.iterdir()) and (read_marker(dst) or {}).get("source") != "resize":
        raise FileExistsError(f"{dst} exists and is not a resized copy made by datasets.py; "
                              f"choose another --output or remove it")
    rel = []
    names = [n for n in ("Ebay_train.txt", "Ebay_test.txt", "Ebay_info.txt") if (src / n).is_file()]
    for name in names:
        rel += read_ebay_file(src / name).rel_paths
    rel = list(dict.fromkeys(rel))
    tmp = _make_tmp_dir(dst)
    try:
        for name in names:
            shutil.copyfile(src / name, tmp / name)
        for folder in sorted({os.path.dirname(p) for p in rel}):
            (tmp / folder).mkdir(parents=True, exist_ok=True)
        jobs = [(str(src / p), str(tmp / p), int(size), int(quality)) for p in rel]
        workers = _default_workers() if workers is None else workers
        bar = dict(total=len(jobs), desc=f"resize to {size}", unit="img", disable=not progress)
        if workers > 1 and len(jobs) >= 256:
            with _mp_context().Pool(workers) as pool:
                bad = [b for b in tqdm(pool.imap(_resize_one, jobs, chunksize=32), **bar) if b]
        else:
            bad = [b for b in tqdm(map(_resize_one, jobs), **bar) if b]
        for path in bad:
            logger.warning("Unreadable image copied unchanged: %s", path)
        _write_marker(tmp, {"source": "resize", "from": str(src), "size": int(size),
                            "quality": int(quality), "images": len(rel), "unreadable": len(bad)})
        _publish_dir(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst


# ============ statistics ============

def dataset_stats(root, val_fraction=0.1, split_seed=0):
    """Rows of the seeds' dataset table: ``{split: {images, products, categories,
    images_per_product}}`` for train, val, test and total (total = trainval + test)."""
    sets = {s: SOPDataset(root, s, val_fraction=val_fraction, split_seed=split_seed, check_files=False)
            for s in ("train", "val", "test")}
    rows = {}
    for name, parts in (("train", ["train"]), ("val", ["val"]), ("test", ["test"]),
                        ("total", ["train", "val", "test"])):
        cls = np.concatenate([sets[p].class_ids for p in parts])   # SOP ids are unique across splits
        sup = np.concatenate([sets[p].super_ids for p in parts])
        n_products = len(np.unique(cls))
        rows[name] = {"images": int(len(cls)), "products": n_products,
                      "categories": int(len(np.unique(sup))),
                      "images_per_product": float(len(cls) / n_products)}
    return rows, sets


def format_stats_table(rows):
    lines = ["| Split | Images | Products | Categories | Avg. Images/Product |",
             "|-------|--------|----------|------------|---------------------|"]
    for name, label in (("train", "Train"), ("val", "Validation"), ("test", "Test"), ("total", "**Total**")):
        r = rows[name]
        lines.append(f"| {label} | {r['images']:,} | {r['products']:,} | {r['categories']} | "
                     f"{r['images_per_product']:.1f} |")
    return "\n".join(lines)


def plot_stats(sets, output):
    """Figure: images per category for each split, and the images-per-product histogram."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(14, 4.5))
    x = np.arange(len(SOP_CATEGORIES))
    for j, (name, ds) in enumerate(sets.items()):
        counts = np.bincount(ds.super_ids - 1, minlength=len(SOP_CATEGORIES))
        ax1.bar(x + (j - 1) * 0.27, counts, width=0.27, label=name)
        _, per_product = np.unique(ds.class_ids, return_counts=True)
        hist = np.bincount(per_product, minlength=13)
        ax2.bar(np.arange(len(hist)) + (j - 1) * 0.27, hist, width=0.27, label=name)
    ax1.set_xticks(x, SOP_CATEGORIES, rotation=40, ha="right")
    ax1.set_ylabel("images")
    ax1.set_title("Images per category")
    ax1.legend()
    ax2.set_xticks(range(1, 13))
    ax2.set_xlabel("images per product")
    ax2.set_ylabel("products")
    ax2.set_title("Images per product")
    ax2.legend()
    fig.tight_layout()
    tmp = output.with_name(f".{output.stem}.tmp{output.suffix}")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, output)
    return output


# ============ command line ============

def get_args_parser():
    parser = argparse.ArgumentParser(
        "datasets.py", description="Stanford Online Products: synthetic stand-in, download, "
        "verification, statistics and a pre-resized copy.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    fmt = argparse.ArgumentDefaultsHelpFormatter

    p = sub.add_parser("synthetic", formatter_class=fmt,
                       help="generate a synthetic SOP (offline stand-in, deterministic)",
                       description="Generate a synthetic SOP with the real layout; skipped when "
                       "--root already holds one made with the same arguments.")
    p.add_argument("--root", default="data/synthetic_sop", help="output folder")
    p.add_argument("--num_products", type=int, default=1200,
                   help="products (half train, half test); 1200 gives about 6.6k images")
    p.add_argument("--image_size", default="96",
                   help="side in pixels, or MIN-MAX for SOP-like photo sizes (e.g. 300-600 "
                   "for the throughput benchmark)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=None, help="processes (default: CPU count, max 8)")
    p.add_argument("--force", action="store_true",
                   help="regenerate even if complete; also needed to replace a synthetic SOP "
                        "made with other settings (refused without it)")

    p = sub.add_parser("download", formatter_class=fmt,
                       help="download and extract the real SOP (about 2.9 GB)",
                       description="Download Stanford_Online_Products.zip into --root (resumable), "
                       "test it, extract to --root/Stanford_Online_Products and check the counts. "
                       "If the archive is already at --root/Stanford_Online_Products.zip it is used.")
    p.add_argument("--root", default="data", help="parent folder for the archive and the dataset")
    p.add_argument("--url", default=SOP_URL)
    p.add_argument("--timeout", type=float, default=10.0, help="seconds before giving up on the server")
    p.add_argument("--delete_zip", action="store_true", help="delete the archive after extraction")

    p = sub.add_parser("verify", formatter_class=fmt, help="decode every image and list bad files",
                       description="Decode every listed image; exit code 1 if any is missing, "
                       "empty, truncated or not an image.")
    p.add_argument("--root", required=True, help="dataset folder (with Ebay_train.txt)")
    p.add_argument("--split", default="all", choices=["all", *SPLITS])
    p.add_argument("--workers", type=int, default=None, help="processes (default: CPU count, max 8)")

    p = sub.add_parser("stats", formatter_class=fmt, help="print the dataset table and save a figure",
                       description="Print images / products / categories / images per product for "
                       "train, val, test and total, and save a distribution figure.")
    p.add_argument("--root", required=True, help="dataset folder (with Ebay_train.txt)")
    p.add_argument("--output", default="runs/dataset_stats.png", help="figure path ('' for none)")
    p.add_argument("--val_fraction", type=float, default=0.1)
    p.add_argument("--split_seed", type=int, default=0)

    p = sub.add_parser("resize", formatter_class=fmt, help="write a pre-resized copy of a dataset",
                       description="Copy a dataset with every image resized to SIZE×SIZE (the "
                       "first step of the transforms: use round(image_size*256/224), 256 for 224 px).")
    p.add_argument("--root", required=True, help="source dataset folder")
    p.add_argument("--output", required=True, help="destination folder")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--quality", type=int, default=95, help="JPEG quality of the copies")
    p.add_argument("--workers", type=int, default=None, help="processes (default: CPU count, max 8)")
    return parser


def main(args):
    """Run one command; returns the exit code (0 ok, 1 bad data found or an error)."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "synthetic":
            import time
            t0 = time.perf_counter()
            make = make_synthetic_sop if args.force else ensure_synthetic_sop
            root = make(args.root, args.num_products, args.image_size, args.seed, args.workers, progress=True)
            marker = read_marker(root)
            print(f"{root}: {marker['train_images']} train + {marker['test_images']} test images, "
                  f"{args.num_products} products ({time.perf_counter() - t0:.1f} s)")
        elif args.command == "download":
            target = download_sop(args.root, args.url, args.timeout, keep_zip=not args.delete_zip)
            print(f"SOP ready at {target}")
        elif args.command == "verify":
            root = resolve_sop_root(args.root)
            splits = ["trainval", "test"] if args.split == "all" else [args.split]
            paths = []
            for s in splits:
                paths += SOPDataset(root, s, check_files=False).paths
            bad = scan_bad_images(paths, workers=args.workers, progress=True)
            for path, reason in bad:
                print(f"BAD {path}: {reason}")
            print(f"{len(paths) - len(bad)} of {len(paths)} images OK, {len(bad)} bad")
            return 1 if bad else 0
        elif args.command == "stats":
            rows, sets = dataset_stats(args.root, args.val_fraction, args.split_seed)
            print(format_stats_table(rows))
            if args.output:
                print(f"figure: {plot_stats(sets, args.output)}")
        elif args.command == "resize":
            print(f"resized copy at {resize_dataset(args.root, args.output, args.size, args.quality, args.workers)}")
        else:
            raise ValueError(f"unknown command {args.command!r}")
    except (DatasetError, FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
