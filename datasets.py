"""The dataset over any catalogue layout (``SOPDataset``: one split, decoded and transformed), and
the data command line whose commands call the rooms that own them.

Beside it: the transforms (preprocessing.py), the batch samplers (samplers.py), DataLoader
settings (loaders.py) and the dataset table and figure (data_stats.py). Below it, in dataio/:
the layouts (catalogue.py), the split draw (splits.py), the path check (path_guard.py), photo
decoding (photos.py), the synthetic stand-in (synthetic_sop.py), download / resize / convert
(prepare_data.py) and the atomic writers (fileio.py). Nothing in dataio/ imports this module.

Command line (``python datasets.py <command> --help`` for every flag)::

    python datasets.py synthetic --root data/synthetic_sop          # offline stand-in for SOP
    python datasets.py download  --root data/                       # real SOP, about 2.9 GB
    python datasets.py verify    --root data/Stanford_Online_Products
    python datasets.py stats     --root data/synthetic_sop --output runs/dataset_stats.png
    python datasets.py resize    --root data/Stanford_Online_Products --output data/sop_256 --size 256
    python datasets.py convert   --root my_photos --to csv --output my_photos
"""

import argparse
import logging
import os
import sys
import time

import numpy as np
import torch

import data_stats
from dataio import catalogue
from dataio.catalogue import (
    DEFAULT_TEST_FRACTION,
    DOWNLOAD_HINT,
    DatasetError,
    detect_layout,
    format_paths,
    log_skipped,
    read_catalogue,
)
from dataio.fileio import read_marker
from dataio.photos import IMAGE_ERRORS, load_image, scan_bad_images
from dataio.prepare_data import SOP_URL, convert_catalogue, download_sop, resize_dataset
from dataio.splits import split_validation
from dataio.synthetic_sop import ensure_synthetic_sop, make_synthetic_sop
import preprocessing

logger = logging.getLogger("datasets")

# ============ constants ============

SPLITS = ("train", "val", "test", "trainval")


class NoTestSplitError(DatasetError):
    """The catalogue has no test split to evaluate: its split is drawn with test_fraction 0."""


class CorruptImagesError(DatasetError):
    """More than the allowed share of a split is unreadable. ``.bad_paths`` lists them."""

    def __init__(self, message, bad_paths=()):
        super().__init__(message)
        self.bad_paths = list(bad_paths)


# ============ SOPDataset ============


def _split_table(root, split, test_fraction, val_fraction, split_seed):
    """The catalogue table at ``root`` restricted to the images of ``split``."""
    table = read_catalogue(root, test_fraction, sop_parts=("test",) if split == "test" else ("train",))
    log_skipped(table, root)
    table = table.take(table.is_test if split == "test" else ~table.is_test)
    if split in ("train", "val"):
        is_val = split_validation(table.product_ids, val_fraction, split_seed)
        table = table.take(is_val if split == "val" else ~is_val)
    return table


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
    default is the size of the transform's leading Resize (see ``preprocessing.draft_size``).
    """

    def __init__(
        self,
        root,
        split,
        transform=None,
        val_fraction=0.1,
        split_seed=0,
        check_files=True,
        check_images=False,
        max_bad_fraction=0.01,
        load_size=None,
        test_fraction=DEFAULT_TEST_FRACTION,
    ):
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
        self.root, self.layout = detect_layout(root)
        self.split = split
        self.transform = transform
        self.val_fraction = val_fraction
        self.split_seed = split_seed
        self.test_fraction = test_fraction
        self.max_bad_fraction = max_bad_fraction
        self.load_size = (
            load_size
            if load_size is not None
            else (preprocessing.draft_size(transform) if transform is not None else None)
        )

        table = _split_table(self.root, split, test_fraction, val_fraction, split_seed)
        self.categories = list(table.categories)
        self.image_ids, self.class_ids, self.super_ids = table.image_ids, table.class_ids, table.super_ids
        self.product_ids = table.product_ids
        self.rel_paths = table.rel_paths
        self.paths = [str(self.root / p) for p in self.rel_paths]
        if not self.paths:
            self._raise_empty(table.drawn_split)
        self.num_single_image_products = self._count_single_image_products()
        if check_files:
            self._check_files_exist()
        # uint8 flags in shared memory: DataLoader workers (fork or spawn) write into the
        # same buffer, so the main process can count bad images after an epoch.
        self._bad = torch.zeros(len(self.paths), dtype=torch.uint8).share_memory_()
        self._siblings = None
        if check_images:
            self._scan_images()

    def _raise_empty(self, drawn_split):
        """Raise the error that says why this split holds no image."""
        split = self.split
        if split == "test" and drawn_split and self.test_fraction == 0:
            raise NoTestSplitError(
                f"{self.root} has no held-out test split: test_fraction 0 puts "
                "every product in training. Evaluate on another catalogue "
                "(--data_root), or use split trainval to serve the whole catalogue"
            )
        why = (
            "no image is in the test split (the CSV's split column says train everywhere?)"
            if split == "test"
            else "no image is in the training split"
            if split == "trainval"
            else f"val_fraction={self.val_fraction}"
        )
        raise DatasetError(f"split {split!r} of {self.root} ({self.layout}) is empty: {why}")

    def _count_single_image_products(self):
        """How many products have a single image in this split (logged as a warning when any)."""
        counts = np.unique(self.class_ids, return_counts=True)[1]
        single = int((counts == 1).sum())
        if single:
            logger.warning(
                "%s split %s: %d products have a single image; they stay in the gallery "
                "but are never queries of the product metrics",
                self.root,
                self.split,
                single,
            )
        return single

    def _check_files_exist(self):
        """Raise FileNotFoundError naming the listed images that are not files."""
        missing = [p for p in self.paths if not os.path.isfile(p)]
        if missing:
            raise FileNotFoundError(
                f"{len(missing)} of {len(self.paths)} images listed for split {self.split!r} are "
                f"missing under {self.root}: {format_paths(missing)}. The dataset is "
                f"incomplete: restore the files, remove their rows, extract or generate it "
                f"again ({DOWNLOAD_HINT})."
            )

    def _scan_images(self):
        """Decode every image up front, flag the unreadable ones and check their share."""
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
                f"replace them or download the dataset again.",
                bad,
            )

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
                logger.warning(
                    "Unreadable image %s (%s: %s); using another image of product %d",
                    path,
                    type(e).__name__,
                    e,
                    self.class_ids[index],
                )
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
            f"(`python datasets.py verify --root {self.root}` lists them)",
            self.bad_paths,
        )

    def __getitem__(self, index):
        image = self._load(index)
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.class_ids[index])

    def __repr__(self):
        return (
            f"SOPDataset(root={str(self.root)!r}, layout={self.layout!r}, split={self.split!r}, "
            f"images={len(self)}, products={len(np.unique(self.class_ids))})"
        )


def split_options(train_args: dict | None, test_fraction=None) -> dict:
    """SOPDataset's split settings of a run (its saved training args; older runs' defaults):
    evaluating or serving a checkpoint on its own data then sees the same splits.
    ``test_fraction`` given (not None) overrides the run's."""
    train_args = train_args or {}
    if test_fraction is None:  # 0 (trained on every product) is a value, not a missing one
        test_fraction = train_args.get("test_fraction")
    return {
        "val_fraction": float(train_args.get("val_fraction") or 0.1),
        "test_fraction": float(DEFAULT_TEST_FRACTION if test_fraction is None else test_fraction),
    }


def serving_split(train_args: dict | None, root) -> str:
    """The split of ``root`` a demo serves for a run by default: ``test``, or ``trainval`` (the
    whole catalogue) for a run trained with test_fraction 0 on a catalogue whose split is drawn
    (a folder tree, a CSV without the split column), which then has no test split."""
    if split_options(train_args)["test_fraction"] != 0:
        return "test"
    return "trainval" if read_catalogue(root, 0.0, sop_parts=("test",)).drawn_split else "test"


# ============ the command line: python datasets.py <command> ============


def dataset_stats(root, val_fraction=0.1, split_seed=0, test_fraction=DEFAULT_TEST_FRACTION):
    """Rows of the original project's dataset table: ``{split: {images, products, categories,
    images_per_product}}`` for train, val, test and total (total = trainval + test), on a
    catalogue of any layout."""
    sets = {
        s: SOPDataset(
            root, s, val_fraction=val_fraction, split_seed=split_seed, check_files=False, test_fraction=test_fraction
        )
        for s in ("train", "val", "test")
    }
    rows = data_stats.split_rows(sets)
    return rows, sets


# ============ command line ============


def get_args_parser():
    parser = argparse.ArgumentParser(
        "datasets.py",
        description="Stanford Online Products: synthetic stand-in, download, "
        "verification, statistics and a pre-resized copy.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    fmt = argparse.ArgumentDefaultsHelpFormatter

    p = sub.add_parser(
        "synthetic",
        formatter_class=fmt,
        help="generate a synthetic SOP (offline stand-in, deterministic)",
        description="Generate a synthetic SOP with the real layout; skipped when "
        "--root already holds one made with the same arguments.",
    )
    p.add_argument("--root", default="data/synthetic_sop", help="output folder")
    p.add_argument(
        "--num_products", type=int, default=1200, help="products (half train, half test); 1200 gives about 6.6k images"
    )
    p.add_argument(
        "--image_size",
        default="96",
        help="side in pixels, or MIN-MAX for SOP-like photo sizes (e.g. 300-600 for the throughput benchmark)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=None, help="processes (default: CPU count, max 8)")
    p.add_argument(
        "--force",
        action="store_true",
        help="regenerate even if complete; also needed to replace a synthetic SOP "
        "made with other settings (refused without it)",
    )

    p = sub.add_parser(
        "download",
        formatter_class=fmt,
        help="download and extract the real SOP (about 2.9 GB)",
        description="Download Stanford_Online_Products.zip into --root (resumable), "
        "test it, extract to --root/Stanford_Online_Products and check the counts. "
        "If the archive is already at --root/Stanford_Online_Products.zip it is used.",
    )
    p.add_argument("--root", default="data", help="parent folder for the archive and the dataset")
    p.add_argument("--url", default=SOP_URL)
    p.add_argument("--timeout", type=float, default=10.0, help="seconds before giving up on the server")
    p.add_argument("--delete_zip", action="store_true", help="delete the archive after extraction")

    p = sub.add_parser(
        "verify",
        formatter_class=fmt,
        help="decode every image and list bad files",
        description="Decode every listed image; exit code 1 if any is missing, empty, truncated or not an image.",
    )
    p.add_argument("--root", required=True, help="dataset folder (any layout: Ebay files, catalogue.csv, tree)")
    p.add_argument("--split", default="all", choices=["all", *SPLITS])
    p.add_argument(
        "--test_fraction",
        type=float,
        default=DEFAULT_TEST_FRACTION,
        help="a catalogue without a split: share of the products in test",
    )
    p.add_argument("--workers", type=int, default=None, help="processes (default: CPU count, max 8)")

    p = sub.add_parser(
        "stats",
        formatter_class=fmt,
        help="print the dataset table and save a figure",
        description="Print images / products / categories / images per product for "
        "train, val, test and total, and save a distribution figure.",
    )
    p.add_argument("--root", required=True, help="dataset folder (any layout: Ebay files, catalogue.csv, tree)")
    p.add_argument("--output", default="runs/dataset_stats.png", help="figure path ('' for none)")
    p.add_argument("--val_fraction", type=float, default=0.1)
    p.add_argument("--split_seed", type=int, default=0)
    p.add_argument(
        "--test_fraction",
        type=float,
        default=DEFAULT_TEST_FRACTION,
        help="a catalogue without a split: share of the products in test",
    )
    p.add_argument("--verbose", action="store_true", help="list every skipped non-image file")

    p = sub.add_parser(
        "convert",
        formatter_class=fmt,
        help="write a catalogue in another layout",
        description="Write the catalogue under --root (SOP's Ebay files, a catalogue.csv "
        "or a <category>/<product>/<image> tree) as a catalogue.csv (--to csv; with "
        "--output = --root only the CSV is written, beside the images) or as a tree "
        "(--to folder). Images are hard-linked (copied across filesystems) into a new "
        "--output, which must not exist or be empty.",
    )
    p.add_argument("--root", required=True, help="the catalogue to read")
    p.add_argument(
        "--from",
        dest="from_layout",
        default=None,
        choices=list(catalogue.LAYOUTS),
        help="the layout --root must hold (None: whatever it holds)",
    )
    p.add_argument("--to", required=True, choices=["csv", "folder"], help="layout to write")
    p.add_argument("--output", required=True, help="destination folder (or --root itself for --to csv)")
    p.add_argument(
        "--test_fraction",
        type=float,
        default=DEFAULT_TEST_FRACTION,
        help="a catalogue without a split: share of the products drawn into test",
    )
    p.add_argument(
        "--split",
        default=True,
        action=argparse.BooleanOptionalAction,
        help="--to csv: write the split column (--no-split: leave the split to --test_fraction when the CSV is read)",
    )
    p.add_argument("--verbose", action="store_true", help="list every skipped non-image file")

    p = sub.add_parser(
        "resize",
        formatter_class=fmt,
        help="write a pre-resized copy of a dataset",
        description="Copy a dataset with every image resized to SIZE×SIZE (the "
        "first step of the transforms: use round(image_size*256/224), 256 for 224 px).",
    )
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
            t0 = time.perf_counter()
            make = make_synthetic_sop if args.force else ensure_synthetic_sop
            root = make(args.root, args.num_products, args.image_size, args.seed, args.workers, progress=True)
            marker = read_marker(root)
            print(
                f"{root}: {marker['train_images']} train + {marker['test_images']} test images, "
                f"{args.num_products} products ({time.perf_counter() - t0:.1f} s)"
            )
        elif args.command == "download":
            target = download_sop(args.root, args.url, args.timeout, keep_zip=not args.delete_zip)
            print(f"SOP ready at {target}")
        elif args.command == "verify":
            root = catalogue.detect_layout(args.root)[0]
            splits = ["trainval", "test"] if args.split == "all" else [args.split]
            paths = []
            for s in splits:
                paths += SOPDataset(root, s, check_files=False, test_fraction=args.test_fraction).paths
            bad = scan_bad_images(paths, workers=args.workers, progress=True)
            for path, reason in bad:
                print(f"BAD {path}: {reason}")
            print(f"{len(paths) - len(bad)} of {len(paths)} images OK, {len(bad)} bad")
            return 1 if bad else 0
        elif args.command == "stats":
            catalogue.set_verbose(args.verbose)
            rows, sets = dataset_stats(args.root, args.val_fraction, args.split_seed, args.test_fraction)
            print(data_stats.format_stats_table(rows))
            if args.output:
                print(f"figure: {data_stats.plot_stats(sets, args.output)}")
        elif args.command == "convert":
            catalogue.set_verbose(args.verbose)
            out = convert_catalogue(
                args.root, args.output, args.to, args.from_layout, args.test_fraction, write_split=args.split
            )
            print(f"wrote {out}")
        elif args.command == "resize":
            print(f"resized copy at {resize_dataset(args.root, args.output, args.size, args.quality, args.workers)}")
        else:
            raise ValueError(f"unknown command {args.command!r}")
    except (DatasetError, FileNotFoundError, FileExistsError, NotADirectoryError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
