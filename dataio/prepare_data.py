"""Preparing a dataset on disk: download the real SOP (and check its counts), write a
pre-resized copy, convert a catalogue between layouts. Each publishes a finished folder whole
(`fileio.publish_dir`). The command line is datasets.py's (``python datasets.py download``,
``resize``, ``convert``)."""

import io
import logging
import os
from pathlib import Path
import shutil
import socket
import threading
import urllib.error
import urllib.parse
import urllib.request
import zipfile

from PIL import Image
from tqdm import tqdm

from dataio import catalogue, photos
from dataio.catalogue import DEFAULT_TEST_FRACTION, SOP_DIRNAME, DatasetError, format_paths, read_ebay_file
from dataio.fileio import is_complete, make_tmp_dir, publish_dir, read_marker, write_marker

SOP_URL = "http://ftp.cs.stanford.edu/cs/cvgl/Stanford_Online_Products.zip"
SOP_ZIPNAME = SOP_DIRNAME + ".zip"
# Official counts; `check_sop_counts` compares a download against them.
SOP_EXPECTED = {"images": 120_053, "train_rows": 59_551, "test_rows": 60_502}

logger = logging.getLogger("prepare_data")


class DownloadError(DatasetError):
    """The SOP archive could not be fetched or is damaged; the message says how to fix it."""


# ============ download ============


def _offline_message(url, zip_path, root, reason):
    return (
        f"Could not download {url} ({reason}). This machine seems to be offline or the "
        f"server is unreachable. Download the archive by hand (about 2.9 GB) and put it at "
        f"{zip_path}, then rerun `python datasets.py download --root {root}`: it skips the "
        f"download and extracts. Without SOP, use the synthetic stand-in: "
        f"`python datasets.py synthetic --root data/synthetic_sop`."
    )


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

    thread = threading.Thread(target=lookup, daemon=True)  # daemon: never blocks exit
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
        if e.code == 416 and start:  # the .part already holds the whole file
            os.replace(part, dest)
            return dest
        raise DownloadError(_offline_message(url, dest, root, f"HTTP {e.code} {e.reason}")) from e
    except OSError as e:  # URLError, timeouts, DNS and connection errors
        raise DownloadError(_offline_message(url, dest, root, getattr(e, "reason", e))) from e
    with response:
        if start and getattr(response, "status", 200) != 206:
            start = 0  # the server ignored the Range header: start over
        length = response.headers.get("Content-Length")
        total = start + int(length) if length is not None else None
        with (
            open(part, "ab" if start else "wb") as f,
            tqdm(
                total=total,
                initial=start,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc=dest.name,
                disable=not progress,
            ) as bar,
        ):
            while True:
                try:
                    buf = response.read(chunk_size)
                except OSError as e:
                    raise DownloadError(
                        f"Download of {url} broke off after {f.tell()} bytes ({e}); "
                        f"rerun the same command to resume from {part}"
                    ) from e
                if not buf:
                    break
                f.write(buf)
                bar.update(len(buf))
    size = part.stat().st_size
    if total is not None and size != total:
        raise DownloadError(
            f"Download of {url} stopped at {size} of {total} bytes; rerun the same command to resume from {part}"
        )
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
        problems.append(f"{len(missing):,} listed images are missing: {format_paths(missing)}")
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
                raise DownloadError(f"{zip_path} is damaged (CRC error in {bad}); delete it and download it again")
            tmp = make_tmp_dir(Path(dest_parent) / SOP_DIRNAME)
            try:
                for member in tqdm(zf.infolist(), desc="extract", unit="file", disable=not progress):
                    zf.extract(member, tmp)  # extract() strips absolute paths and '..'
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
    except zipfile.BadZipFile as e:
        raise DownloadError(
            f"{zip_path} is not a valid zip archive ({e}); it is probably incomplete: delete it and download it again"
        ) from e
    for candidate in (tmp / SOP_DIRNAME, tmp):
        if (candidate / "Ebay_train.txt").is_file():
            return tmp, candidate
    shutil.rmtree(tmp, ignore_errors=True)
    raise DownloadError(
        f"{zip_path} holds no Ebay_train.txt (neither at the top nor under {SOP_DIRNAME}/); is it the SOP archive?"
    )


def download_sop(root="data", url=SOP_URL, timeout=10.0, expected=SOP_EXPECTED, progress=True, keep_zip=True):
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
    if (target / "Ebay_train.txt").is_file():  # extracted by hand: check it, then accept it
        problems = check_sop_counts(target, expected)
        if problems:
            raise DatasetError(
                f"{target} exists but is incomplete: "
                + "; ".join(problems)
                + f". Move it away and rerun to extract {root / SOP_ZIPNAME} again."
            )
        write_marker(target, {"source": "download", "url": url, "checked": "existing folder"})
        return target
    if target.exists() and any(target.iterdir()):
        raise DatasetError(f"{target} exists but holds no Ebay_train.txt; move it away (or delete it) and rerun")
    zip_path = root / SOP_ZIPNAME
    if zip_path.is_file():
        logger.info("Using the archive already at %s", zip_path)
    else:
        _http_download(url, zip_path, timeout=timeout, progress=progress)
    tmp, extracted = _extract_zip(zip_path, root, progress)
    try:
        problems = check_sop_counts(extracted, expected)
        if problems:
            raise DatasetError(
                f"The archive {zip_path} does not hold the full SOP dataset: "
                + "; ".join(problems)
                + ". Delete the archive and download it again."
            )
        table_rows = {
            k: len(read_ebay_file(extracted / n).rel_paths)
            for k, n in (("train_rows", "Ebay_train.txt"), ("test_rows", "Ebay_test.txt"))
        }
        write_marker(extracted, {"source": "download", "url": url, **table_rows})
        publish_dir(extracted, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if not keep_zip:
        zip_path.unlink()
    return target


# ============ resize ============


def _resize_one(job):
    src, dst, size, quality = job
    try:
        img = photos.load_image(src, size).resize((size, size), Image.BILINEAR)
    except photos.IMAGE_ERRORS:
        # keep a bad file bad: the copy must fail in the same places as the original
        shutil.copyfile(src, dst)
        return src
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    with open(dst, "wb") as f:
        f.write(buf.getvalue())
    return None


def resize_dataset(src, dst, size=256, quality=95, workers=None, progress=True):
    """Pre-resized copy of a dataset of any layout: the same listing files (Ebay files or
    catalogue.csv) and relative paths, every image stored as a ``size``×``size`` JPEG (its
    name kept) — the square ``Resize((size, size))`` that ``build_transform`` does first
    (size = round(image_size * 256 / 224): 256 for 224 px), so repeated epochs skip decoding
    full-size photos. Unreadable originals are copied unchanged. Atomic (temporary folder,
    ``.complete``, rename). Returns ``dst``."""
    (src, layout), dst = catalogue.detect_layout(src), Path(dst).expanduser()
    if dst.exists() and any(dst.iterdir()) and (read_marker(dst) or {}).get("source") != "resize":
        raise FileExistsError(
            f"{dst} exists and is not a resized copy made by datasets.py; choose another --output or remove it"
        )
    if layout == "sop":
        names = [n for n in ("Ebay_train.txt", "Ebay_test.txt", "Ebay_info.txt") if (src / n).is_file()]
        rel = [p for name in names for p in read_ebay_file(src / name).rel_paths]
    else:
        names = [catalogue.CSV_NAME] if layout == "csv" else []
        rel = catalogue.read_catalogue(src).rel_paths
    rel = list(dict.fromkeys(rel))
    tmp = make_tmp_dir(dst)
    try:
        for name in names:
            shutil.copyfile(src / name, tmp / name)
        for folder in sorted({os.path.dirname(p) for p in rel}):
            (tmp / folder).mkdir(parents=True, exist_ok=True)
        jobs = [(str(src / p), str(tmp / p), int(size), int(quality)) for p in rel]
        workers = photos.default_workers() if workers is None else workers
        bar = dict(total=len(jobs), desc=f"resize to {size}", unit="img", disable=not progress)
        if workers > 1 and len(jobs) >= 256:
            with photos.mp_context().Pool(workers) as pool:
                bad = [b for b in tqdm(pool.imap(_resize_one, jobs, chunksize=32), **bar) if b]
        else:
            bad = [b for b in tqdm(map(_resize_one, jobs), **bar) if b]
        for path in bad:
            logger.warning("Unreadable image copied unchanged: %s", path)
        write_marker(
            tmp,
            {
                "source": "resize",
                "from": str(src),
                "size": int(size),
                "quality": int(quality),
                "images": len(rel),
                "unreadable": len(bad),
            },
        )
        publish_dir(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst


# ============ converting between layouts ============


def tree_paths(table):
    """Where each image of ``table`` goes in a ``<category>/<product>/<image>`` tree (no
    category level when the catalogue has only `catalogue.NO_CATEGORY`); a file name taken
    twice in one product folder gets its row number in front."""
    flat = table.categories == [catalogue.NO_CATEGORY]
    out, taken = [], set()
    safe = catalogue.safe_name
    for i, (rel, product, sid) in enumerate(zip(table.rel_paths, table.product_ids, table.super_ids.tolist())):
        category = table.categories[sid - 1]
        # a tree's product id already starts with its category folder: not twice
        product = product.removeprefix(f"{category}/")
        folder = safe(product) if flat else f"{safe(category)}/{safe(product)}"
        name = f"{folder}/{Path(rel).name}"
        if name in taken:
            name = f"{folder}/{i}_{Path(rel).name}"
        taken.add(name)
        out.append(name)
    return out


def convert_catalogue(
    root, output, to, from_layout=None, test_fraction=DEFAULT_TEST_FRACTION, write_split=True, progress=True
):
    """Write the catalogue under ``root`` (any layout) in layout ``to``:

    * ``csv``: a ``catalogue.csv`` (with the split column unless ``write_split`` is False).
      With ``output`` = the catalogue's own folder only the CSV is written (atomically),
      next to the images; otherwise the images are linked (hard links, copies across
      filesystems) into ``output`` under their own relative paths.
    * ``folder``: the images linked into ``output/<category>/<product>/<image>``. A tree has no
      split column: its test split is drawn again from ``test_fraction`` (a warning says so).

    ``from_layout`` given: the catalogue must be of that layout. A new ``output`` folder is
    written in a temporary sibling and renamed when complete; an existing, non-empty one is
    refused. Returns the path written (the CSV or the folder)."""
    src, layout = catalogue.detect_layout(root)
    if from_layout and layout != from_layout:
        raise ValueError(f"{src} holds a {layout} catalogue, not {from_layout} (--from)")
    if to not in ("csv", "folder"):
        raise ValueError(f"cannot convert to {to!r}: choose csv or folder")
    table = catalogue.read_catalogue(src, test_fraction)
    output = Path(output).expanduser()
    if to == "csv" and output.resolve() == src:
        if layout == "csv":
            raise ValueError(f"{src} already holds {catalogue.CSV_NAME}; convert to another --output")
        return catalogue.write_csv_catalogue(table, src / catalogue.CSV_NAME, write_split)
    if output.exists() and any(output.iterdir()):
        raise FileExistsError(f"{output} exists and is not empty; choose another --output or remove it")
    if to == "folder" and layout != "folder":
        logger.warning(
            "a folder tree has no split column: its test split is drawn again "
            "(--test_fraction %s); convert to csv to keep the split",
            test_fraction,
        )
    dest = tree_paths(table) if to == "folder" else list(table.rel_paths)
    tmp = make_tmp_dir(output)
    try:
        for rel, new in tqdm(
            list(zip(table.rel_paths, dest)), desc=f"convert to {to}", unit="img", disable=not progress
        ):
            source, target = src / rel, tmp / new
            if not source.is_file():
                raise FileNotFoundError(f"{source} is listed in {src} but missing; restore it or remove its row first")
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(source, target)
            except OSError:  # another filesystem, or links not supported
                shutil.copy2(source, target)
        if to == "csv":
            catalogue.write_csv_catalogue(table, tmp / catalogue.CSV_NAME, write_split)
        write_marker(tmp, {"source": "convert", "from": str(src), "from_layout": layout, "to": to, "images": len(dest)})
        publish_dir(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return output


# ============ statistics ============
