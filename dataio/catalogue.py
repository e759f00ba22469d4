"""Where a catalogue's labels come from: the three layouts ``--data_root`` accepts.

* ``sop``: SOP's ``Ebay_train.txt`` / ``Ebay_test.txt`` (header ``image_id class_id
  super_class_id path``, one image a line) with the images under ``<category>_final/``;
  ``class_id`` is the product, ``super_class_id`` (1..12) the category, named after its
  ``<category>_final/`` folder (`sop_category_names`);
* ``csv``: a ``catalogue.csv`` with header ``path,product_id,category[,split]``: paths relative
  to the folder, ``product_id`` and ``category`` free strings, ``split`` train / test;
* ``folder``: a tree ``<category>/<product>/<image>``, or ``<product>/<image>`` without
  categories (every image then in category `NO_CATEGORY`). The product id is the product
  folder's path relative to the root (``chair/sku123``), unique by construction.

Without a split (a CSV without the column, a folder tree) the test split is a seeded
product-disjoint draw (`splits.split_products`, seed `TEST_SPLIT_SEED`): each product is in it
when the hash of (purpose, seed, its id) falls below ``test_fraction``, so a product's split
depends on its id alone and adding or removing products moves no other one. ``test_fraction`` 0
draws none.

Paths from a label file or a walk are untrusted: `path_guard.PathGuard` (the one check, every
reader) refuses absolute paths, ``..`` and symbolic links that lead out of the data root.

`detect_layout` tells the layouts apart from what the folder holds (SOP first, then the CSV,
then a tree); `read_catalogue` reads one into a `CatalogueTable`, the form every script uses.
Category names come from the data: the ``_final`` folders for SOP (SOP's 12 names), the
sorted distinct names otherwise.
"""

import csv
import io
import logging
import os
from pathlib import Path
from typing import NamedTuple

import numpy as np

from dataio.fileio import COMPLETE_MARKER, atomic_write_text
from dataio.path_guard import PathGuard
from dataio.splits import split_products

logger = logging.getLogger("catalogue")

# ============ constants ============

SOP_CATEGORIES = [
    "bicycle",
    "cabinet",
    "chair",
    "coffee_maker",
    "fan",
    "kettle",
    "lamp",
    "mug",
    "sofa",
    "stapler",
    "table",
    "toaster",
]
EBAY_HEADER = ["image_id", "class_id", "super_class_id", "path"]
SOP_DIRNAME = "Stanford_Online_Products"
CSV_NAME = "catalogue.csv"
CSV_COLUMNS = ("path", "product_id", "category")  # required; "split" optional
CSV_SPLITS = ("train", "test")
LAYOUTS = ("sop", "csv", "folder")
NO_CATEGORY = "uncategorised"  # the one category of a <product>/<image> tree
TEST_SPLIT_SEED = 0
DEFAULT_TEST_FRACTION = 0.5  # SOP's own split is about half of the products
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")
# --dataset name -> its default folder (the one table; --data_root overrides it)
DATASET_ROOTS = {"stanford": "data/Stanford_Online_Products", "synthetic": "data/synthetic_sop"}
DOWNLOAD_HINT = (
    "python datasets.py download --root data/  (real SOP, about 2.9 GB), "
    "python datasets.py synthetic --root data/synthetic_sop  (offline stand-in), or "
    "your own photos as <category>/<product>/<image> or a catalogue.csv "
    "(README, 'Bring your own photos')"
)


class DatasetError(RuntimeError):
    """A dataset on disk is missing, malformed or incomplete; the message says what to do."""


def default_data_root(train_args: dict | None) -> str:
    """The data root a run was trained on: its ``data_root``, else its ``dataset``'s folder in
    `DATASET_ROOTS` (a run of ``--dataset synthetic`` without ``--data_root`` stores null)."""
    train_args = train_args or {}
    if train_args.get("data_root"):
        return str(train_args["data_root"])
    dataset = train_args.get("dataset") or "stanford"
    if dataset not in DATASET_ROOTS:
        raise ValueError(
            f"the checkpoint was trained on dataset {dataset!r}, which has no default "
            f"folder (known: {sorted(DATASET_ROOTS)}): pass --data_root"
        )
    return DATASET_ROOTS[dataset]


def is_image_name(name) -> bool:
    """True for a file name with an image extension (case-insensitive) that is not hidden
    (macOS ``._x.jpg`` resource forks and ``.DS_Store`` are not photos)."""
    base = str(name).replace("\\", "/").rsplit("/", 1)[-1]
    return not base.startswith(".") and base.lower().endswith(IMAGE_EXTENSIONS)


def safe_name(text) -> str:
    """``text`` as one file or folder name: path separators and characters unsafe in file
    names become ``_`` (``chair/sku 1`` → ``chair_sku 1``)."""
    out = "".join("_" if c in '/\\:*?"<>|' or ord(c) < 32 else c for c in str(text)).strip(" .")
    return out or "_"


def format_paths(paths, limit=5):
    """``a, b, c ... and N more``: the first ``limit`` of ``paths`` for an error message."""
    paths = [str(p) for p in paths]
    more = f" ... and {len(paths) - limit} more" if len(paths) > limit else ""
    return ", ".join(paths[:limit]) + more


# ============ the common form ============


class CatalogueTable(NamedTuple):
    """Every image of a catalogue (or one split of it), row order kept.

    ``class_ids`` number the products (SOP's own ids on SOP; otherwise 1..P in the sorted
    order of ``product_ids`` over the whole catalogue), ``super_ids`` the categories:
    ``categories[super_id - 1]`` is the name. ``product_ids`` are the users' strings.
    ``skipped``: files of a folder tree that are not images (or lie outside product folders).
    ``drawn_split``: the test split was drawn (`split_products`), the data holds none.
    """

    image_ids: np.ndarray  # int64
    class_ids: np.ndarray  # int64
    super_ids: np.ndarray  # int64, 1..len(categories)
    rel_paths: list  # relative to the catalogue root
    product_ids: list  # str, one per image
    categories: list  # str, the catalogue's category names
    is_test: np.ndarray  # bool, one per image
    layout: str = "sop"
    skipped: tuple = ()
    drawn_split: bool = False

    def take(self, rows):
        """The table of ``rows`` (indices or a boolean mask), categories kept whole."""
        rows = np.flatnonzero(rows) if np.asarray(rows).dtype == bool else np.asarray(rows, np.int64)
        return self._replace(
            image_ids=self.image_ids[rows],
            class_ids=self.class_ids[rows],
            super_ids=self.super_ids[rows],
            is_test=self.is_test[rows],
            rel_paths=[self.rel_paths[i] for i in rows],
            product_ids=[self.product_ids[i] for i in rows],
        )


def table_from_labels(
    rel_paths, product_ids, category_names, splits, test_fraction, layout, skipped=(), source="the catalogue"
):
    """The `CatalogueTable` of labelled rows (strings); ``splits`` None → a
    `split_products` draw of ``test_fraction``. Products are numbered 1..P by sorted id and
    categories by sorted name."""
    product_ids = [str(p) for p in product_ids]
    categories = sorted(set(category_names))
    cat_index = {c: i + 1 for i, c in enumerate(categories)}
    products = {p: i + 1 for i, p in enumerate(sorted(set(product_ids)))}
    if splits is None:
        if not 0.0 <= test_fraction < 1.0:
            raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction}")
        if test_fraction > 0 and len(products) < 2:
            raise ValueError(
                f"{source}: a catalogue needs at least 2 products to split into train and test, got {len(products)}"
            )
        is_test = split_products(product_ids, test_fraction, TEST_SPLIT_SEED)
    else:
        is_test = np.asarray([s == "test" for s in splits], dtype=bool)
    n = len(rel_paths)
    return CatalogueTable(
        image_ids=np.arange(1, n + 1, dtype=np.int64),
        class_ids=np.asarray([products[p] for p in product_ids], np.int64).reshape(n),
        super_ids=np.asarray([cat_index[c] for c in category_names], np.int64).reshape(n),
        rel_paths=list(rel_paths),
        product_ids=product_ids,
        categories=categories,
        is_test=is_test,
        layout=layout,
        skipped=tuple(skipped),
        drawn_split=splits is None,
    )


def _first_duplicate(values):
    """(value, first position, second position) of the first repeated value, or None."""
    seen = {}
    for i, v in enumerate(values):
        if v in seen:
            return v, seen[v], i
        seen[v] = i
    return None


# ============ SOP ============


class EbayTable(NamedTuple):
    """One parsed ``Ebay_*.txt`` file, row order kept."""

    image_ids: np.ndarray  # int64
    class_ids: np.ndarray  # int64, SOP product ids
    super_ids: np.ndarray  # int64, 1..12 (index into SOP_CATEGORIES + 1)
    rel_paths: list  # as written in the file, relative to the dataset root


def read_text(path) -> str:
    """The whole of a label file as text (UTF-8, a BOM allowed). Bytes that are not UTF-8 raise
    ValueError naming the file, the line, the byte offset and what to do: Excel's "CSV" is
    often Windows-1252 or Latin-1, while "CSV UTF-8" is what is read here."""
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise ValueError(
            f"{path}:{line}: not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}); "
            f"save the file as UTF-8 (in Excel: 'CSV UTF-8'), or convert it, e.g. "
            f"iconv -f cp1252 -t utf-8 OLD > NEW"
        ) from None


def read_ebay_file(path):
    """Parse an ``Ebay_train.txt`` / ``Ebay_test.txt`` / ``Ebay_info.txt`` file.

    Raises FileNotFoundError when it does not exist and ValueError naming the file and the
    line number for a wrong header, a line without 4 fields, a non-integer id, a
    super_class_id outside 1..12, a path leaving the file's folder (`PathGuard`) or a path
    listed twice. Blank lines are skipped.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found. Get SOP with: {DOWNLOAD_HINT}")
    image_ids, class_ids, super_ids, rel_paths = [], [], [], []
    guard = PathGuard(path.parent)
    with io.StringIO(read_text(path)) as f:
        header = f.readline()
        if header.split() != EBAY_HEADER:
            raise ValueError(f"{path}:1: expected the header '{' '.join(EBAY_HEADER)}', got {header.strip()!r}")
        for lineno, line in enumerate(f, start=2):
            fields = line.split()
            if not fields:
                continue
            if len(fields) != 4:
                raise ValueError(
                    f"{path}:{lineno}: expected 4 fields 'image_id class_id super_class_id path', got {line.strip()!r}"
                )
            try:
                image_id, class_id, super_id = (int(x) for x in fields[:3])
            except ValueError:
                raise ValueError(
                    f"{path}:{lineno}: image_id, class_id and super_class_id must be integers, got {line.strip()!r}"
                ) from None
            if not 1 <= super_id <= len(SOP_CATEGORIES):
                raise ValueError(
                    f"{path}:{lineno}: super_class_id {super_id} is outside "
                    f"1..{len(SOP_CATEGORIES)} (SOP's categories; for your own, "
                    f"use a {CSV_NAME} or a folder tree)"
                )
            image_ids.append(image_id)
            class_ids.append(class_id)
            super_ids.append(super_id)
            rel_paths.append(guard(fields[3], f"{path}:{lineno}"))
    dup = _first_duplicate(rel_paths)
    if dup:
        raise ValueError(f"{path}: image {dup[0]} is listed more than once")
    return EbayTable(
        np.asarray(image_ids, np.int64), np.asarray(class_ids, np.int64), np.asarray(super_ids, np.int64), rel_paths
    )


def _find_sop(root):
    """The folder holding the Ebay files: ``root`` itself, or ``root/Stanford_Online_Products``
    (so ``--root data/`` after ``python datasets.py download --root data/`` works too); None
    when neither holds them."""
    if (root / "Ebay_train.txt").is_file() or (root / "Ebay_test.txt").is_file():
        return root.resolve()
    if (root / SOP_DIRNAME / "Ebay_train.txt").is_file():
        return (root / SOP_DIRNAME).resolve()
    return None


def sop_category_names(super_ids, rel_paths):
    """The 12 category names of an SOP-layout folder: category k is named after the
    ``<name>_final/`` folder holding all of its images (SOP's own names on SOP; ``grocery``
    for a folder of groceries laid out the same way), else SOP's k-th name."""
    names = list(SOP_CATEGORIES)
    folders = {}
    for sid, rel in zip(np.asarray(super_ids).tolist(), rel_paths):
        top = rel.split("/", 1)[0] if "/" in rel else ""
        folders.setdefault(sid, set()).add(top[: -len("_final")] if top.endswith("_final") else None)
    for sid, found in folders.items():
        (name,) = found if len(found) == 1 else (None,)
        if name and name not in names[: sid - 1] + names[sid:]:
            names[sid - 1] = name
    return names


def read_sop(root, parts=("train", "test")):
    """The Ebay files of ``parts`` (train, test) of the SOP folder ``root`` as one
    `CatalogueTable`, in that order; a missing file raises FileNotFoundError."""
    parts = [(read_ebay_file(Path(root) / f"Ebay_{p}.txt"), p == "test") for p in parts]
    parts = [(t, np.full(len(t.rel_paths), test)) for t, test in parts]
    return CatalogueTable(
        image_ids=np.concatenate([t.image_ids for t, _ in parts]),
        class_ids=np.concatenate([t.class_ids for t, _ in parts]),
        super_ids=np.concatenate([t.super_ids for t, _ in parts]),
        rel_paths=[p for t, _ in parts for p in t.rel_paths],
        product_ids=[str(c) for t, _ in parts for c in t.class_ids.tolist()],
        categories=sop_category_names(
            np.concatenate([t.super_ids for t, _ in parts]), [p for t, _ in parts for p in t.rel_paths]
        ),
        is_test=np.concatenate([m for _, m in parts]),
        layout="sop",
    )


# ============ catalogue.csv ============


def read_csv_catalogue(path, test_fraction=DEFAULT_TEST_FRACTION):
    """Parse a ``catalogue.csv`` (header ``path,product_id,category[,split]``, any extra
    columns ignored, UTF-8 with or without a BOM) into a `CatalogueTable`.

    ValueError naming the file and line for: a missing column, an empty field, a split other
    than train / test, a path that leaves the folder or is listed twice, a product listed
    under two categories or in both splits, and a file without rows."""
    path = Path(path)
    reader = csv.DictReader(io.StringIO(read_text(path), newline=""))
    try:
        rows, lines, has_split = _csv_rows(path, reader)
    except csv.Error as e:  # a NUL byte, an unclosed quote, a field over csv's size limit
        raise ValueError(
            f"{path}:{reader.line_num}: not readable as CSV ({e}); check the quoting and that the file is text"
        ) from None
    return _csv_table(path, rows, lines, has_split, test_fraction)


def _csv_rows(path, reader):
    """The non-blank rows of a catalogue.csv, each checked, with their line numbers."""
    header = [h.strip() for h in (reader.fieldnames or [])]
    missing = [c for c in CSV_COLUMNS if c not in header]
    if missing:
        raise ValueError(
            f"{path}:1: missing column(s) {', '.join(missing)}; the header must be "
            f"{','.join(CSV_COLUMNS)}[,split] (got {','.join(header) or 'nothing'})"
        )
    reader.fieldnames = header
    has_split = "split" in header
    guard = PathGuard(Path(path).parent)
    rows, lines = [], []
    for row in reader:
        lineno = reader.line_num
        values = {k: (row.get(k) or "").strip() for k in CSV_COLUMNS + (("split",) if has_split else ())}
        if not any(values.values()):
            continue  # a blank line
        for column, value in values.items():
            if not value:
                raise ValueError(f"{path}:{lineno}: empty {column}")
        if has_split and values["split"] not in CSV_SPLITS:
            raise ValueError(f"{path}:{lineno}: split {values['split']!r} must be train or test")
        values["path"] = guard(values["path"], f"{path}:{lineno}")
        rows.append(values)
        lines.append(lineno)
    return rows, lines, has_split


def _csv_table(path, rows, lines, has_split, test_fraction):
    """The `CatalogueTable` of checked rows, after the checks across rows."""
    if not rows:
        raise ValueError(f"{path}: no images listed (only a header)")
    dup = _first_duplicate([r["path"] for r in rows])
    if dup:
        raise ValueError(f"{path}:{lines[dup[2]]}: image {dup[0]} is listed again (first on line {lines[dup[1]]})")
    for key in ("category",) + (("split",) if has_split else ()):
        first = {}
        for r, lineno in zip(rows, lines):
            seen = first.setdefault(r["product_id"], (r[key], lineno))
            if seen[0] != r[key]:
                raise ValueError(
                    f"{path}:{lineno}: product {r['product_id']!r} has {key} {r[key]!r} "
                    f"here but {seen[0]!r} on line {seen[1]}; a product has one {key}"
                )
    return table_from_labels(
        [r["path"] for r in rows],
        [r["product_id"] for r in rows],
        [r["category"] for r in rows],
        [r["split"] for r in rows] if has_split else None,
        test_fraction,
        "csv",
        source=str(path),
    )


def write_csv_catalogue(table, path, write_split=True):
    """Write ``table`` as a ``catalogue.csv`` atomically (with the split column unless told
    otherwise); its paths stay relative, so the CSV belongs in the catalogue's folder."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(CSV_COLUMNS + (("split",) if write_split else ()))
    for rel, product, sid, test in zip(
        table.rel_paths, table.product_ids, table.super_ids.tolist(), table.is_test.tolist()
    ):
        writer.writerow(
            [rel, product, table.categories[sid - 1]] + (["test" if test else "train"] if write_split else [])
        )
    return atomic_write_text(path, buf.getvalue())


# ============ folder tree ============


def _walk_files(root):
    """Every file under ``root`` as a posix path relative to it, sorted; hidden folders and
    ``__MACOSX`` are not entered, nor are symbolic links to folders (os.walk's default).
    ValueError (`PathGuard`) for a file, or a linked folder, that leads out of ``root``."""
    found = []
    guard = PathGuard(root)
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d != "__MACOSX")
        rel_dir = Path(dirpath).relative_to(root).as_posix()
        names = [n for n in filenames if not (rel_dir == "." and n == COMPLETE_MARKER)]
        for name in names + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
            rel = name if rel_dir == "." else f"{rel_dir}/{name}"
            guard(rel, os.path.join(root, rel))
            if name in names:
                found.append(rel)
    return sorted(found)


def scan_folder_tree(root, test_fraction=DEFAULT_TEST_FRACTION):
    """The `CatalogueTable` of a tree ``<category>/<product>/<image>`` or ``<product>/<image>``.

    Depth is read from the images: all at depth 3 → with categories, all at depth 2 →
    without (category `NO_CATEGORY`); images at both depths or deeper is a ValueError naming
    an example of each. Non-image files, and images directly in ``root``, are skipped
    (``table.skipped``). ValueError when the tree holds no image."""
    root = Path(root)
    files = _walk_files(root)
    images = [f for f in files if is_image_name(f)]
    skipped = [f for f in files if not is_image_name(f)]
    by_depth = {}
    for f in images:
        by_depth.setdefault(f.count("/") + 1, []).append(f)
    skipped += by_depth.pop(1, [])
    if not by_depth:
        what = (
            f"{len(files)} files, none an image in a product folder ({', '.join(IMAGE_EXTENSIONS)})"
            if files
            else "nothing"
        )
        raise ValueError(
            f"{root} holds no catalogue: {what}. Lay the photos out as "
            "<category>/<product>/<image> or <product>/<image>, or list them in a "
            f"{CSV_NAME}. Or get a dataset with: {DOWNLOAD_HINT}"
        )
    if len(by_depth) > 1 or max(by_depth) > 3:
        examples = "; ".join(f"{d} levels: {v[0]}" for d, v in sorted(by_depth.items()))
        raise ValueError(
            f"{root}: images lie at different depths ({examples}); a catalogue tree is "
            "<category>/<product>/<image> or <product>/<image> throughout"
        )
    depth, images = next(iter(by_depth.items()))
    products = [f.rsplit("/", 1)[0] for f in images]
    cats = [f.split("/", 1)[0] if depth == 3 else NO_CATEGORY for f in images]
    return table_from_labels(
        images, products, cats, None, test_fraction, "folder", skipped=sorted(skipped), source=str(root)
    )


# ============ detection and reading ============


def detect_layout(root):
    """``(folder, layout)``: the folder holding the catalogue (``root``, or
    ``root/Stanford_Online_Products``) and which layout it is, "sop" (Ebay files), "csv"
    (``catalogue.csv``) or "folder" (anything else: read as a tree)."""
    root = Path(root).expanduser()
    if not root.exists():
        raise FileNotFoundError(f"Dataset root {root} does not exist. Get a dataset with: {DOWNLOAD_HINT}")
    if not root.is_dir():
        raise NotADirectoryError(f"Dataset root {root} is not a folder")
    sop = _find_sop(root)
    if sop is not None:
        return sop, "sop"
    if (root / CSV_NAME).is_file():
        return root.resolve(), "csv"
    return root.resolve(), "folder"


def read_catalogue(root, test_fraction=DEFAULT_TEST_FRACTION, sop_parts=("train", "test")):
    """The whole catalogue under ``root`` (any layout, `detect_layout`) as a `CatalogueTable`;
    on SOP only the Ebay files of ``sop_parts``."""
    folder, layout = detect_layout(root)
    if layout == "sop":
        return read_sop(folder, sop_parts)
    if layout == "csv":
        return read_csv_catalogue(folder / CSV_NAME, test_fraction)
    return scan_folder_tree(folder, test_fraction)


_warned = set()  # (root, skipped count) already reported by this process


def log_skipped(table, root):
    """A warning counting a tree's skipped files (the first few named), once per folder and
    process (each split reads the same tree); each one at DEBUG (shown by ``--verbose``)."""
    key = (str(root), len(table.skipped), logger.isEnabledFor(logging.DEBUG))
    if table.skipped and key not in _warned:
        _warned.add(key)
        logger.warning(
            "%s: skipped %d files that are not images in product folders: %s (--verbose lists them all)",
            root,
            len(table.skipped),
            format_paths(table.skipped, 3),
        )
        for rel in table.skipped:
            logger.debug("skipped %s", rel)


def set_verbose(on=True):
    """The scripts' ``--verbose``: every skipped file is logged (DEBUG of logger "catalogue"),
    on stderr when logging is not configured otherwise."""
    log = logging.getLogger("catalogue")
    log.setLevel(logging.DEBUG if on else logging.NOTSET)
    if on and not log.handlers and not logging.getLogger().handlers:
        log.addHandler(logging.StreamHandler())
