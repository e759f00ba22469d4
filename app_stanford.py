"""Visual product search demo: a query photo in, the nearest catalogue photos out (Gradio).

    python app_stanford.py                                       # newest checkpoints/*/best.pth
    python app_stanford.py --checkpoint checkpoints/<run>/best.pth [--data_root DIR] [--split test]
    python app_stanford.py --checkpoint CK --gallery my_photos/    # any folder, no labels needed
    python app_stanford.py --zero_shot --backbone efficientnet_lite0 --gallery my_photos/
    python app_stanford.py ... --host 0.0.0.0 --port 7860       # reachable from the network (opt-in)
    python app_stanford.py ... --build_index                     # build / refresh the index, then exit

The checkpoint is self-describing (models.load_model, weights_only=True): backbone, embedding
size and image size come from it, and the data root defaults to the one it was trained on.
The gallery (every image of ``--split`` of a dataset in any layout, 60,502 for the SOP test
split) is embedded once into a `retrieval.GalleryIndex` saved next to the checkpoint
(``gallery_<split>.npz``); it is rebuilt, with a progress bar, when the checkpoint's sha256
or the image list changed. ``--gallery DIR`` indexes every image under DIR instead (module
``gallery``): a rerun embeds only the files added or changed (path, size, mtime) and drops
the removed ones.

API: the search is the Gradio endpoint ``/search`` (inputs: image, k, category="All"):

    from gradio_client import Client, handle_file
    gallery, ranked, timing = Client("http://127.0.0.1:7860/").predict(
        handle_file("query.jpg"), 10, "All", api_name="/search")

``gallery``: list of ``{"image": <file>, "caption": "0.912 · chair · #12345"}`` (similarity,
category, product id);
``ranked``: the JSON of `SearchEngine.search_image` (``results`` ranked best first, each with
rank, index, catalogue_path (relative to the data root or gallery folder), product_id (the
data's, a string; null in a --gallery folder), category, score; ``timing_ms``);
``timing``: the same timings as a Markdown line. A refused image (not an image, empty,
truncated, too many pixels, ...) raises ``gradio_client.exceptions.AppError`` with a message
saying why; the server keeps serving.

Security: binds 127.0.0.1 unless ``--host`` / ``--share`` say otherwise; uploads are capped by
size (``--max_upload_mb``) and by declared pixel count (``--max_megapixels``) before any
decoding; Gradio's file route serves the gallery's image folders (``<category>_final/``, a
gallery's first level) minus every non-image, hidden or foreign-symlinked file in them, and
its own upload cache, nothing else (not the checkpoints, not the Ebay lists, not /etc).
"""
import argparse
import atexit
import base64
import binascii
import concurrent.futures
import hashlib
import logging
import math
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dataio import catalogue
from dataio import photos
import datasets
import evaluate
from search import gallery
import models
import retrieval

logger = logging.getLogger("app_stanford")

CATEGORY_ALL = "All"
DEFAULT_K = 10
MAX_K = 50
# Formats a query may have. Decoding others (EPS runs Ghostscript, ...) is refused up front.
QUERY_FORMATS = ("JPEG", "MPO", "PNG", "WEBP", "GIF", "BMP", "TIFF")
TRAIN_HINT = ("python train.py --dataset synthetic --backbone resnet18 --weights none "
              "--image_size 64 --epochs 3 --loss multi_similarity --lr 1e-3 --batch_size 32 "
              "--dropout 0   (offline, ~2 min on CPU; generates data/synthetic_sop)\n"
              "  or on real SOP: python train.py --dataset stanford --backbone efficientnet_b0")


class QueryError(ValueError):
    """A query the demo refuses; the message is meant for the user and is shown as is."""


# ============ query decoding ============

def load_query_image(path, max_pixels=40_000_000, draft_size=None):
    """Decode an uploaded file into an upright RGB PIL image, or raise QueryError saying why.

    Checks, in order, before any pixel data is decoded: the file exists and is not empty;
    Pillow recognises it as one of QUERY_FORMATS; width × height <= ``max_pixels`` (a PNG
    can declare 50,000 × 50,000 in a 100-byte file). Decoding is `photos.load_image` — the
    gallery's own loader, so a gallery photo uploaded as a query embeds exactly as in the
    index: JPEG draft mode at ``draft_size``, EXIF orientation applied, palette / alpha /
    LA / CMYK / 16-bit grey converted to RGB (transparency onto white).
    """
    try:
        size = os.path.getsize(path)
    except OSError:
        raise QueryError("The uploaded file could not be found on the server; upload it again.") from None
    if size == 0:
        raise QueryError("The uploaded file is empty (0 bytes). Upload a JPEG, PNG or WebP photo.")
    try:
        with Image.open(path) as im:  # reads the header only
            fmt, (w, h) = im.format, im.size
    except Image.DecompressionBombError:
        raise QueryError(f"The image declares too many pixels (more than {max_pixels / 1e6:.0f} "
                         "megapixels); upload a smaller photo.") from None
    except Exception:  # UnidentifiedImageError, SyntaxError, struct errors of broken headers
        raise QueryError("This file is not an image Pillow can read. Upload a JPEG, PNG or WebP "
                         "photo.") from None
    if fmt not in QUERY_FORMATS:
        raise QueryError(f"{fmt} files are not accepted; upload a JPEG, PNG, WebP, GIF, BMP or "
                         "TIFF photo.")
    if w < 1 or h < 1:
        raise QueryError(f"The image has no pixels ({w}×{h}).")
    if w * h > max_pixels:
        raise QueryError(f"The image is {w}×{h} pixels ({w * h / 1e6:.0f} megapixels); the limit "
                         f"is {max_pixels / 1e6:.0f} megapixels. Upload a smaller photo.")
    try:
        return photos.load_image(path, size=draft_size)
    except Exception as e:  # whatever a broken file makes a Pillow plugin raise is the file's fault
        truncated = "truncated" in str(e).lower() or isinstance(e, (EOFError, SyntaxError))
        raise QueryError("The image file is truncated or corrupt: it could not be decoded completely. "
                         "Upload the photo again or use another one." if truncated else
                         f"The image could not be decoded ({type(e).__name__}). Upload another "
                         "photo.") from None


def category_choices(index):
    """The category filter's choices: "All", then the gallery's category names (the data's:
    SOP's 12, a catalogue's own, or a --gallery folder's first level) that hold an image."""
    present = set(np.unique(index.super_ids).tolist())
    return [CATEGORY_ALL] + [c for i, c in enumerate(index.categories, start=1) if i in present]


def category_to_super_id(category, categories):
    """"All" / None → None (whole gallery); a name among ``categories`` (the index's) → its
    1-based super id; anything else is a QueryError listing the choices."""
    if category in (None, "", CATEGORY_ALL):
        return None
    if category not in categories:
        shown = ", ".join([CATEGORY_ALL, *categories[:30]]) + (" ..." if len(categories) > 30 else "")
        raise QueryError(f"Unknown category {category!r}; choose one of: {shown}.")
    return categories.index(category) + 1


def clamp_k(k):
    """K as an int in 1..MAX_K (the slider's range); non-numbers are refused."""
    try:
        k = float(k)
    except (TypeError, ValueError):
        raise QueryError(f"K must be a number between 1 and {MAX_K}, got {k!r}.") from None
    if not math.isfinite(k):
        raise QueryError(f"K must be a number between 1 and {MAX_K}, got {k!r}.")
    return int(min(max(round(k), 1), MAX_K))


# ============ search engine ============

class SearchEngine:
    """The per-query path: decoded image → model input → embedding → exact top-k.

    ``search_image(pil_image, k, category)`` is the pure search (no Gradio): it returns
    ``{"results": [{"rank", "index", "catalogue_path", "product_id", "category", "score"}, ...],
    "timing_ms": {...}, "k", "category", "gallery_size"}``, results ranked by cosine
    similarity (ties by lower gallery index, as `retrieval.GalleryIndex.search`).

    Lean by construction: the eval transform (square resize to round(s·256/224), centre crop
    s, ImageNet normalisation) is computed as one PIL resize, a uint8 slice and one fused
    multiply-add written into a preallocated channels_last input tensor; the forward runs
    under ``torch.inference_mode``; the model's output is already unit-norm and goes to the
    index as a numpy view.

    Every search runs on one dedicated worker thread, whichever thread asks for it. Gradio
    calls handlers from a pool of up to 40 threads and glibc gives each allocating thread its
    own malloc arena: forwards spread over 20 pool threads kept ~200 MB more resident
    (EfficientNet-B0 at 224 px) than forwards on one thread. The worker also serialises the
    use of the shared input buffer.
    """

    def __init__(self, model, index, data_root, max_pixels=40_000_000):
        # channels_last: convolutions run ~15% faster on CPU at batch 1 (and on GPU); the
        # HWC uint8 pixels then land in the input buffer without a transposing copy.
        self.model = model.eval().to(memory_format=torch.channels_last)
        self.index = index
        self.data_root = Path(data_root)
        self.max_pixels = int(max_pixels)
        self.image_size = int(model.model_args["image_size"])
        self.resize = datasets.resize_size(self.image_size)
        self.crop = int(round((self.resize - self.image_size) / 2.0))  # as T.CenterCrop
        self.device = next(model.parameters()).device
        mean = torch.tensor(models.IMAGENET_MEAN, dtype=torch.float32).view(3, 1, 1)
        std = torch.tensor(models.IMAGENET_STD, dtype=torch.float32).view(3, 1, 1)
        # (u8 / 255 - mean) / std  ==  u8 * scale + shift
        self._scale = (1.0 / (255.0 * std)).to(self.device)
        self._shift = (-mean / std).to(self.device)
        self._input = torch.empty(1, 3, self.image_size, self.image_size, device=self.device
                                  ).contiguous(memory_format=torch.channels_last)
        self._worker = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="search")
        self._worker_thread = self._worker.submit(threading.current_thread).result()
        self.abs_paths = [str(self.data_root / p) for p in index.paths]

    def _on_worker(self, fn, *args):
        """``fn(*args)`` on the worker thread (directly when already there)."""
        if threading.current_thread() is self._worker_thread:
            return fn(*args)
        return self._worker.submit(fn, *args).result()

    # ---- model input
    def prepare(self, image):
        """Write the eval transform of ``image`` (RGB PIL) into the input buffer; returns it.
        Same numbers as ``datasets.build_transform(image_size, train=False)`` (the resize is
        the same PIL call torchvision makes; the crop offset follows CenterCrop's rounding)."""
        if image.mode != "RGB":
            image = image.convert("RGB")
        r, s, c = self.resize, self.image_size, self.crop
        arr = np.asarray(image.resize((r, r), Image.BILINEAR))[c:c + s, c:c + s]
        x = torch.from_numpy(np.ascontiguousarray(arr)).to(self.device).permute(2, 0, 1)
        torch.addcmul(self._shift, x, self._scale, out=self._input[0])
        return self._input

    def embed(self, image):
        """Unit embedding (float32 [D], numpy) of an RGB PIL image."""
        return self._on_worker(self._embed, image)

    def _embed(self, image):
        with torch.inference_mode():
            return self.model(self.prepare(image))[0].cpu().numpy()

    # ---- search
    def _ranked(self, vector, k, super_id, exclude=None):
        scores, idx = self.index.search(vector, k + (exclude is not None), super_id=super_id)
        results = []
        for score, i in zip(scores[0].tolist(), idx[0].tolist()):
            if i < 0 or i == exclude or len(results) == k:
                continue
            results.append({
                "rank": len(results) + 1,
                "index": i,
                # not "path": gradio_client takes any dict with a "path" for a file to download
                "catalogue_path": self.index.paths[i],
                # the data's product id (a string); None in an unlabelled --gallery folder
                "product_id": self.index.product_ids[i] or None,
                "category": self.index.categories[int(self.index.super_ids[i]) - 1],
                "score": round(float(score), 6),
            })
        return results

    def _response(self, results, k, category, timing):
        return {"k": k, "category": category or CATEGORY_ALL, "gallery_size": len(self.index),
                "results": results, "timing_ms": {n: round(v, 2) for n, v in timing.items()}}

    def search_image(self, image, k=DEFAULT_K, category=CATEGORY_ALL):
        """Top-``k`` gallery images for a decoded RGB PIL image (see the class docstring)."""
        return self._on_worker(self._search_image, image, k, category)

    def _search_image(self, image, k, category):
        t0 = time.perf_counter()
        k, super_id = clamp_k(k), category_to_super_id(category, self.index.categories)
        vector = self._embed(image)
        t1 = time.perf_counter()
        results = self._ranked(vector, k, super_id)
        t2 = time.perf_counter()
        return self._response(results, k, category, {
            "embed": (t1 - t0) * 1e3, "search": (t2 - t1) * 1e3, "total": (t2 - t0) * 1e3})

    def search_file(self, path, k=DEFAULT_K, category=CATEGORY_ALL):
        """`search_image` of an uploaded file; QueryError (a user-facing reason) when the file
        is refused. ``timing_ms["decode"]`` is the decoding, ``total`` includes it."""
        return self._on_worker(self._search_file, path, k, category)

    def _search_file(self, path, k, category):
        t0 = time.perf_counter()
        # the cheap checks first: a bad k or category raises before the image is decoded
        clamp_k(k)
        category_to_super_id(category, self.index.categories)
        image = load_query_image(path, self.max_pixels, draft_size=self.resize)
        t1 = time.perf_counter()
        out = self._search_image(image, k, category)
        out["timing_ms"]["decode"] = round((t1 - t0) * 1e3, 2)
        out["timing_ms"]["total"] = round((time.perf_counter() - t0) * 1e3, 2)
        out["query_size"] = list(image.size)
        return out

    def search_gallery_item(self, i, k=DEFAULT_K, category=CATEGORY_ALL):
        """Search with gallery image ``i``'s stored embedding (no forward pass); the image
        itself is left out of its results (excluded by index)."""
        return self._on_worker(self._search_gallery_item, i, k, category)

    def _search_gallery_item(self, i, k, category):
        t0 = time.perf_counter()
        k, super_id = clamp_k(k), category_to_super_id(category, self.index.categories)
        if not 0 <= int(i) < len(self.index):
            raise QueryError(f"Gallery image {i} does not exist (the gallery has {len(self.index)}).")
        results = self._ranked(self.index.embeddings[int(i)], k, super_id, exclude=int(i))
        t1 = time.perf_counter()
        return self._response(results, k, category, {"embed": 0.0, "search": (t1 - t0) * 1e3,
                                                     "total": (t1 - t0) * 1e3})

    def warm_up(self):
        """One forward pass and one search, so that the first user does not pay for lazy
        initialisation (allocator, BLAS threads, oneDNN kernels)."""
        self.search_image(Image.new("RGB", (self.resize, self.resize), (255, 255, 255)))

    def example_indices(self, n=12):
        """One gallery image from each category (the first product of each), up to ``n``."""
        picks = []
        for sid in range(1, len(self.index.categories) + 1):
            rows = np.flatnonzero(self.index.super_ids == sid)
            if len(rows):
                picks.append(int(rows[0]))
        return picks[:n]


# ============ gallery index ============

def default_index_path(checkpoint, split):
    """``gallery_<split>.npz`` beside the checkpoint: an index belongs to one set of weights."""
    return Path(checkpoint).parent / f"gallery_{split}.npz"


def _path_tag(folder) -> str:
    """8 hex digits of the sha256 of ``folder``'s absolute path: one index file per folder."""
    return hashlib.sha256(str(Path(folder).expanduser().resolve()).encode()).hexdigest()[:8]


def default_gallery_index_path(gallery_dir, checkpoint=None, model_name=None):
    """Where the index of a ``--gallery`` folder goes: ``gallery_<folder name>_<_path_tag>.npz``
    beside the checkpoint, or under ``runs/<model_name>/`` for a zero-shot model; never
    inside the gallery folder itself."""
    folder = Path(gallery_dir).expanduser().resolve()
    name = f"gallery_{folder.name or 'root'}_{_path_tag(folder)}.npz"
    return (Path(checkpoint).parent if checkpoint else Path("runs") / model_name) / name


def load_or_build_index(model, checkpoint, data_root, split="test", index_path=None,
                        batch_size=64, workers=None, progress=True, force=False, index_type="exact",
                        model_key=None, splits=None):
    """The gallery index of ``split`` under ``data_root`` (any layout) for ``checkpoint``:
    loaded from ``index_path`` when it was built from this checkpoint (sha256, or
    ``model_key`` when given: a zero-shot model has no checkpoint) and this image list,
    otherwise (or with ``force``) built with a progress bar and saved atomically.
    ``index_type``: "exact", "ivf" or "hnsw" (retrieval.GalleryIndex); an index of another
    type is rebuilt. ``splits``: SOPDataset's split settings (datasets.split_options).

    Returns ``(index, built: bool)``. A failed save raises OSError naming the path (the
    previous file is left intact by `retrieval.GalleryIndex.save`).
    """
    index_path = Path(index_path) if index_path else default_index_path(checkpoint, split)
    image_size = int(model.model_args["image_size"])
    dataset = datasets.SOPDataset(data_root, split, **(splits or {}),
                                  transform=datasets.build_transform(image_size, train=False))
    ckpt_hash = model_key or models.checkpoint_hash(checkpoint)
    if index_path.exists() and not force:
        index, why = retrieval.load_fresh_index(index_path, ckpt_hash, dataset.rel_paths,
                                                index_type=index_type)
        if index is not None:
            logger.info("Loaded gallery index %s (%d images)", index_path, len(index))
            return index, False
        logger.info("Gallery index %s: %s; rebuilding it", index_path, why)
    logger.info("Embedding %d gallery images of %s (split %s) with %s ...",
                len(dataset), dataset.root, split, checkpoint or model_key)
    index = retrieval.build_gallery_index(
        model, dataset, batch_size=batch_size, workers=workers, checkpoint_hash=ckpt_hash,
        device=next(model.parameters()).device,
        meta={"split": split, "data_root": str(dataset.root), "model_args": dict(model.model_args),
              "checkpoint": str(checkpoint) if checkpoint else None}, progress=progress,
        index_type=index_type)
    index.save(index_path)
    logger.info("Saved gallery index %s", index_path)
    return index, True


def find_checkpoint(checkpoint_dir="checkpoints"):
    """The newest ``<checkpoint_dir>/*/best.pth`` (by modification time), or None."""
    found = sorted(Path(checkpoint_dir).glob("*/best.pth"), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


def served_paths(index, data_root):
    """``(allowed, blocked)`` for Gradio's file route: the folders holding the gallery's images
    (``<category>_final/`` on SOP, a tree's first level) and its images lying directly in
    ``data_root`` are allowed; blocked, because Gradio checks them first, is every file under
    those folders that cannot be a gallery photo: not an image name (lists, notes, the index
    itself), hidden (hidden folders included), or a symbolic link the index does not hold."""
    root = Path(data_root).resolve()
    parts = [Path(p).parts for p in index.paths]
    tops = sorted({p[0] for p in parts if len(p) > 1})
    indexed = set(index.paths)
    allowed = [str(root / t) for t in tops] + sorted(str(root / p[0]) for p in parts if len(p) == 1)
    blocked = []
    for top in tops:
        for dirpath, dirnames, filenames in os.walk(root / top):
            rel_dir = Path(dirpath).relative_to(root)
            for d in [d for d in dirnames if d.startswith(".")]:
                blocked.append(str(Path(dirpath) / d))
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            for name in filenames:
                full, rel = Path(dirpath) / name, (rel_dir / name).as_posix()
                if not catalogue.is_image_name(name) or (full.is_symlink() and rel not in indexed):
                    blocked.append(str(full))
    return allowed, blocked


# ============ Gradio app ============

def use_private_gradio_temp_dir():
    """Give this process its own Gradio upload / cache folder (``GRADIO_TEMP_DIR``, unless
    already set); removed at exit. Call before `build_app`.

    Why: Gradio stores uploads content-addressed (``<dir>/<sha256>/<name>``) in one folder
    shared by every Gradio process of the machine (``/tmp/gradio``), serves that folder
    through its file route, and deletes the files it created when it shuts down. Shared, one
    demo's shutdown deletes an identical upload another demo was just handed (seen under
    load: "file not found" for a good query), and each demo's file route serves the others'
    uploads.
    """
    if os.environ.get("GRADIO_TEMP_DIR"):
        return Path(os.environ["GRADIO_TEMP_DIR"])
    path = tempfile.mkdtemp(prefix="app_stanford-gradio-")
    os.environ["GRADIO_TEMP_DIR"] = path
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return Path(path)


def _query_image_class():
    import gradio as gr

    class QueryImage(gr.Image):
        """gr.Image whose preprocessing hands the uploaded file's path over *undecoded*.

        gr.Image would open the upload itself (type="filepath" still calls PIL.Image.open),
        so a non-image or a decompression bomb would fail inside Gradio with a blank error.
        Here every byte is decoded by `load_query_image`, which refuses with a reason.
        ``is_template``: the browser renders it with gr.Image's own frontend.
        """

        is_template = True

        def preprocess(self, payload):
            if payload is None:
                return None
            if payload.url and payload.url.startswith("data:"):  # base64 through the API
                return self._save_data_url(payload.url)
            if payload.path is None:
                raise gr.Error("The upload carries no file; upload the photo again.")
            return str(payload.path)

        def _save_data_url(self, url):
            max_bytes = getattr(self, "max_data_url_bytes", 10 << 20)
            header, _, data = url.partition(",")
            if len(data) > max_bytes * 4 // 3 + 4:
                raise gr.Error(f"The image is larger than {max_bytes >> 20} MB.")
            try:
                raw = base64.b64decode(data, validate=True) if header.endswith(";base64") else b""
            except (binascii.Error, ValueError):
                raise gr.Error("The data URL is not valid base64.") from None
            folder = Path(self.GRADIO_CACHE) / hashlib.sha256(raw).hexdigest()[:32]
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / "query"
            path.write_bytes(raw)
            return str(path)

    return QueryImage


def _caption(r):
    product = f" · #{r['product_id']}" if r["product_id"] else ""
    return f"{r['score']:.3f} · {r['category']}{product}"


def _timing_text(out):
    t = out["timing_ms"]
    parts = []
    if "decode" in t:
        parts.append(f"decode {t['decode']:.1f} ms")
    parts.append("embedding: stored vector" if out.get("stored_vector") else f"embedding {t['embed']:.1f} ms")
    parts.append(f"search {t['search']:.1f} ms over {out['gallery_size']:,} images")
    parts.append(f"total {t['total']:.1f} ms")
    return " · ".join(parts)


def build_app(model, index, data_root, title=None, max_pixels=40_000_000, max_upload_mb=10,
              concurrency_limit=1, max_examples=12):
    """The demo as a `gr.Blocks` (not launched: see `launch_app`).

    Events: the Search button (the public API endpoint ``/search``: image, k, category →
    gallery, ranked-results JSON, timing text), a new upload / paste / webcam shot, a click
    on an example, and a click on a result (searches with that gallery image's stored
    embedding). All share one concurrency slot: on CPU, one forward pass at a time is fastest.
    """
    import gradio as gr

    engine = SearchEngine(model, index, data_root, max_pixels=max_pixels)
    engine.warm_up()
    QueryImage = _query_image_class()
    margs = model.model_args
    title = title or "Visual product search"

    def outputs_of(out):
        gallery = [(engine.abs_paths[r["index"]], _caption(r)) for r in out["results"]]
        return gallery, out, _timing_text(out)

    def guarded(fn, *args):
        """Run a search; QueryError → its message in the page, anything else → a generic
        message (the traceback goes to the server log only, never to the user)."""
        try:
            return fn(*args)
        except QueryError as e:
            raise gr.Error(str(e), title="Cannot search with this image", print_exception=False) from None
        except gr.Error:
            raise
        except Exception:
            logger.error("search failed:\n%s", traceback.format_exc())
            raise gr.Error("The search failed on the server (details are in the server log). "
                           "Try another photo.", print_exception=False) from None

    def search(image, k=DEFAULT_K, category=CATEGORY_ALL):
        """Search the catalogue with a photo: the k most similar gallery images, optionally
        within one category."""
        if not image:
            raise gr.Error("Upload, paste or take a photo first.", title="No query image",
                           print_exception=False)
        return outputs_of(guarded(engine.search_file, image, k, category))

    def search_result(evt: gr.SelectData, ranked, k, category):
        try:
            i = int(ranked["results"][evt.index]["index"])
        except (TypeError, KeyError, IndexError, ValueError):
            raise gr.Error("Run a search first, then click one of its results.",
                           print_exception=False) from None
        out = guarded(engine.search_gallery_item, i, k, category)
        out["stored_vector"] = True
        return (engine.abs_paths[i], *outputs_of(out))

    examples = [[engine.abs_paths[i]] for i in engine.example_indices(max_examples)]
    info = (f"{margs['backbone']}, {margs['embedding_size']}-d embeddings at {margs['image_size']} px · "
            f"gallery: {len(index):,} images" + (f" ({index.meta['split']} split)"
                                                   if index.meta.get("split") else
                                                   f" (folder {Path(index.meta['gallery']['root']).name})"
                                                   if index.meta.get("gallery") else ""))

    with gr.Blocks(title=title, analytics_enabled=False, delete_cache=(3600, 3600)) as demo:
        gr.Markdown(f"# {title}\nUpload, paste or take a photo of a product; the nearest catalogue "
                    f"photos appear ranked by cosine similarity. Click a result to search with it.  \n"
                    f"<small>{info}</small>")
        with gr.Row():
            with gr.Column(scale=1, min_width=280):
                query = QueryImage(label="Query photo", type="filepath", image_mode=None,
                                   sources=["upload", "clipboard", "webcam"], height=300,
                                   elem_id="query")
                query.max_data_url_bytes = int(max_upload_mb * (1 << 20))
                k = gr.Slider(1, MAX_K, value=DEFAULT_K, step=1, label="Results (K)", elem_id="k")
                category = gr.Dropdown(category_choices(index), value=CATEGORY_ALL, label="Category filter",
                                       elem_id="category")
                button = gr.Button("Search", variant="primary", elem_id="search")
                timing = gr.Markdown(elem_id="timing")
            with gr.Column(scale=2):
                results = gr.Gallery(label="Nearest products (click one to search with it)",
                                     columns=4, height=600, object_fit="contain",
                                     allow_preview=False, elem_id="results")
                with gr.Accordion("Ranked results (JSON)", open=False):
                    ranked = gr.JSON(elem_id="ranked")
        if examples:
            ex = gr.Examples(examples=examples, inputs=[query], label="Example queries from the gallery",
                             examples_per_page=max_examples, elem_id="examples")
        outs = [results, ranked, timing]
        common = dict(concurrency_limit=concurrency_limit, concurrency_id="search")
        button.click(search, [query, k, category], outs, api_name="search", **common)
        query.upload(search, [query, k, category], outs, api_visibility="private", **common)
        results.select(search_result, [ranked, k, category], [query, *outs],
                       api_visibility="private", **common)
        if examples:
            ex.load_input_event.then(search, [query, k, category], outs,
                                     api_visibility="private", **common)
    demo.engine = engine  # for tests and benchmarks
    return demo


def launch_app(demo, index, data_root, host="127.0.0.1", port=7860, share=False,
               max_upload_mb=10, max_queue=64, max_sessions=256, prevent_thread_lock=False,
               quiet=False):
    """Launch ``demo`` with the demo's safety settings: loopback unless told otherwise, the
    upload size cap, a bounded queue, a file route limited to the gallery's image folders,
    and at most ``max_sessions`` sessions' state kept in memory.

    Why the session cap: Gradio keeps a per-session copy of the app's config (about 50 KB)
    for its 10,000 most recent sessions, and every API call without a session hash is a
    new session, so a busy API would grow the server by ~0.5 GB before plateauing. This app
    keeps nothing per session (no gr.State; a result click reads the ranked JSON from the
    page), so evicting old sessions loses nothing.
    """
    demo.queue(max_size=max_queue)
    allowed, blocked = served_paths(index, data_root)
    return demo.launch(
        server_name=host, server_port=port, share=share, prevent_thread_lock=prevent_thread_lock,
        allowed_paths=allowed, blocked_paths=blocked, max_file_size=int(max_upload_mb * (1 << 20)),
        show_error=False, ssr_mode=False, quiet=quiet, footer_links=["api"],
        state_session_capacity=max_sessions,
    )


# ============ command line ============

def get_args_parser(add_help=True):
    parser = argparse.ArgumentParser(
        "app_stanford.py", add_help=add_help, formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Gradio demo: search the product gallery with a photo.")
    group = parser.add_argument_group("model and gallery")
    group.add_argument("--checkpoint", default=None,
                       help="a checkpoint of train.py (e.g. checkpoints/<run>/best.pth); default: the "
                            "newest <checkpoint_dir>/*/best.pth")
    group.add_argument("--checkpoint_dir", default="checkpoints",
                       help="where to look for best.pth when --checkpoint is not given")
    evaluate.add_zero_shot_args(group, "search with --backbone's pretrained features instead of a "
                                       "checkpoint (before any training); needs --gallery or --data_root")
    group.add_argument("--gallery", default=None, metavar="DIR",
                       help="search every image under DIR (recursive, no labels; category = first "
                            "folder level); a rerun embeds only added or changed files")
    group.add_argument("--data_root", default=None,
                       help="labelled dataset (SOP's Ebay files, a catalogue.csv or a <category>/"
                            "<product>/<image> tree) whose --split is the gallery; default: the one "
                            "the checkpoint was trained on (its saved args)")
    group.add_argument("--split", default="test", choices=["test", "val", "train", "trainval"],
                       help="which images of --data_root form the gallery (SOP test: 60,502)")
    group.add_argument("--test_fraction", type=float, default=None,
                       help="--data_root without a split: share of its products in test; default "
                            "the checkpoint's training value, else 0.5")
    group.add_argument("--index", default=None,
                       help="gallery index file; default beside the checkpoint (runs/<zero-shot "
                            "model>/ with --zero_shot): gallery_<split>.npz, or "
                            "gallery_<folder>_<hash>.npz for --gallery")
    group.add_argument("--index_type", default="exact", choices=["exact", "ivf", "hnsw"],
                       help="gallery search: exact (SOP-sized galleries), or approximate faiss ivf / "
                            "hnsw for millions of images (needs pip install faiss-cpu; see bench/README.md)")
    group.add_argument("--rebuild_index", action="store_true",
                       help="rebuild the gallery index even when it is up to date")
    group.add_argument("--build_index", action="store_true",
                       help="build / refresh the gallery index, then exit without serving")
    group.add_argument("--batch_size", default=64, type=int, help="batch size for embedding the gallery")
    group.add_argument("--workers", default=None, type=int,
                       help="DataLoader workers for embedding the gallery; default "
                            "datasets.loader_settings for the device and CPU count")
    group.add_argument("--threads", default=None, type=int,
                       help="torch CPU threads (default: torch's choice, one per core)")
    group.add_argument("--verbose", action="store_true",
                       help="list every skipped file (not an image, unreadable)")
    group.add_argument("--device", default="auto",
                       help="where the model embeds the gallery and the queries: auto (cuda when "
                            "available, with float16 autocast for the gallery), cpu, cuda, cuda:N")
    group = parser.add_argument_group("server")
    group.add_argument("--host", default="127.0.0.1",
                       help="interface to bind; 0.0.0.0 makes the demo reachable from the network")
    group.add_argument("--port", default=7860, type=int, help="port to listen on")
    group.add_argument("--share", action="store_true",
                       help="also open a public *.gradio.live link (needs internet; opt-in)")
    group.add_argument("--max_upload_mb", default=10.0, type=float, help="largest upload accepted, in MB")
    group.add_argument("--max_megapixels", default=40.0, type=float,
                       help="largest query accepted, in declared megapixels (decompression bombs)")
    group.add_argument("--max_queue", default=64, type=int,
                       help="requests that may wait in the queue; more are refused ('queue full')")
    return parser


def check_args(parser, args):
    if args.zero_shot and (args.backbone is None or args.checkpoint):
        parser.error("--zero_shot needs --backbone NAME and no --checkpoint")
    if args.zero_shot and not (args.gallery or args.data_root):
        parser.error("--zero_shot needs --gallery DIR or --data_root DIR (nothing to search otherwise)")
    if args.gallery and args.data_root:
        parser.error("pass --gallery DIR (any folder of photos) or --data_root DIR (a labelled "
                     "dataset's split), not both")
    if args.test_fraction is not None and not 0 < args.test_fraction < 1:
        parser.error(f"--test_fraction must be in (0, 1), got {args.test_fraction}")
    if args.image_size < 32:
        parser.error(f"--image_size must be >= 32, got {args.image_size}")
    for name, low in (("port", 0), ("max_upload_mb", 0), ("max_megapixels", 0), ("max_queue", 0),
                      ("batch_size", 0)):
        if getattr(args, name) <= low:
            parser.error(f"--{name} must be > {low}, got {getattr(args, name)}")
    if args.port > 65535:
        parser.error(f"--port must be in 1..65535, got {args.port}")
    device = str(args.device)
    if device not in ("auto", "cpu") and not (device == "cuda" or device.startswith("cuda:")):
        parser.error(f"--device must be auto, cpu, cuda or cuda:N, got {device!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {device}: CUDA is not available on this machine; use cpu or auto")


def load_search_model(args):
    """``(model, checkpoint or None, model_key, model_name)``: the checkpoint (``--checkpoint``,
    else the newest best.pth) keyed by its sha256, or with ``--zero_shot`` the pretrained
    backbone alone keyed by backbone, weights and size. Exits with a message when neither loads."""
    device = models.resolve_device(args.device)
    if args.zero_shot:
        try:
            model = models.zero_shot_model(args.backbone, args.weights, args.image_size, device)
        except (models.WeightsUnavailableError, OSError, ValueError) as e:
            sys.exit(f"Cannot load {args.backbone} with weights {args.weights!r}: {e}")
        name = models.zero_shot_name(args.backbone, args.image_size, str(args.weights))
        logger.info("Zero-shot %s (%s weights, %d px)", args.backbone, args.weights, args.image_size)
        return model, None, models.zero_shot_model_key(args.backbone, str(args.weights), args.image_size), name
    checkpoint = Path(args.checkpoint) if args.checkpoint else find_checkpoint(args.checkpoint_dir)
    if checkpoint is None:
        sys.exit(f"No checkpoint given and none found under {Path(args.checkpoint_dir) / '*' / 'best.pth'}. "
                 f"Train one first, e.g.:\n  {TRAIN_HINT}\nthen run: python app_stanford.py "
                 "--checkpoint checkpoints/<run>/best.pth, or search with pretrained features: "
                 "python app_stanford.py --zero_shot --backbone efficientnet_lite0 --gallery DIR")
    try:
        model = models.load_model(checkpoint, device=device)
    except (OSError, models.CheckpointError, ValueError) as e:
        sys.exit(f"Cannot load checkpoint {checkpoint}: {e}")
    logger.info("Loaded %s (%s)", checkpoint, model.model_args)
    return model, checkpoint, models.checkpoint_hash(checkpoint), checkpoint.parent.name


def gallery_index(model, checkpoint, model_key, model_name, args):
    """``--gallery DIR``: (the folder's index, updated incrementally, DIR). Exits with a message
    for a missing folder or one without a readable image."""
    index_path = Path(args.index) if args.index else default_gallery_index_path(args.gallery, checkpoint, model_name)
    try:
        index, report = gallery.update_gallery_index(
            model, args.gallery, index_path, model_key, batch_size=args.batch_size,
            workers=args.workers, device=next(model.parameters()).device, force=args.rebuild_index,
            index_type=args.index_type,
            meta={"model_args": dict(model.model_args), "checkpoint": str(checkpoint) if checkpoint else None})
    except (FileNotFoundError, NotADirectoryError, ValueError) as e:
        sys.exit(f"Cannot index the gallery {args.gallery}: {e}")
    logger.info("Gallery %s: %d images (%d added, %d changed, %d removed, %d unchanged; %d files "
                "skipped as not images, %d unreadable) in %.1f s; index %s", args.gallery, len(index),
                report["added"], report["changed"], report["removed"], report["unchanged"],
                report["skipped_non_images"], report["unreadable"], report["seconds"], index_path)
    for rel in report["skipped"]:
        logger.debug("skipped (not an image) %s", rel)
    for rel in report["unreadable_paths"]:
        logger.debug("skipped (unreadable) %s", rel)
    return index, Path(args.gallery).expanduser().resolve()


def dataset_index(model, checkpoint, model_key, model_name, args):
    """``--data_root`` (default: the checkpoint's): (the index of its ``--split``, the
    dataset folder). Exits with a message when the dataset cannot be read."""
    info = getattr(model, "checkpoint_info", None) or {}
    data_root = args.data_root
    try:
        data_root = catalogue.detect_layout(data_root or catalogue.default_data_root(((getattr(model, "checkpoint_info", None) or {}).get("args"))))[0]
        index_path = args.index or (default_index_path(checkpoint, args.split) if checkpoint else
                                    Path("runs") / model_name / f"gallery_{args.split}_{_path_tag(data_root)}.npz")
        index, _ = load_or_build_index(model, checkpoint, data_root, args.split, index_path,
                                       batch_size=args.batch_size, workers=args.workers,
                                       force=args.rebuild_index, index_type=args.index_type,
                                       model_key=model_key,
                                       splits=datasets.split_options(info.get("args"), args.test_fraction))
    except (FileNotFoundError, NotADirectoryError, ValueError, catalogue.DatasetError) as e:
        sys.exit(f"Cannot build the gallery from {data_root}: {e}\nPass --data_root DIR (a dataset: "
                 "Ebay files, a catalogue.csv or a <category>/<product>/<image> tree), or "
                 "--gallery DIR to search any folder of photos.")
    return index, data_root


def main(args):
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    catalogue.set_verbose(args.verbose)
    if args.verbose:
        logger.setLevel(logging.DEBUG)
    if args.threads:
        torch.set_num_threads(args.threads)

    # ============ model ============
    model, checkpoint, model_key, model_name = load_search_model(args)

    # ============ gallery index ============
    try:
        if args.gallery:
            index, data_root = gallery_index(model, checkpoint, model_key, model_name, args)
        else:
            index, data_root = dataset_index(model, checkpoint, model_key, model_name, args)
    except ImportError as e:  # --index_type ivf / hnsw without faiss
        sys.exit(f"Cannot build or load the {args.index_type} gallery index: {e}")
    except OSError as e:  # the index could not be written (full disk, permissions)
        sys.exit(f"Gallery index not saved: {e}\nPass --index PATH to write it somewhere else.")
    if args.build_index:
        return index

    # ============ serving ============
    use_private_gradio_temp_dir()
    if threading.current_thread() is threading.main_thread():
        # SIGTERM (kill, docker stop, systemd) becomes a normal exit: Gradio shuts down and
        # the private upload folder is removed, as on Ctrl-C
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    demo = build_app(model, index, data_root, max_pixels=int(args.max_megapixels * 1e6),
                     max_upload_mb=args.max_upload_mb)
    launch_app(demo, index, data_root, host=args.host, port=args.port, share=args.share,
               max_upload_mb=args.max_upload_mb, max_queue=args.max_queue)
    return demo


if __name__ == "__main__":
    parser = get_args_parser()
    args = parser.parse_args()
    check_args(parser, args)
    main(args)
