"""The demo's query engine, without any UI: a query photo in, the ranked gallery images out.

* query checks: `load_query_image` (decode an upload or refuse it with a `QueryError` whose
  message is for the user), `clamp_k`, `category_to_super_id`, `category_choices`;
* `SearchEngine`: decoded image -> model input -> embedding -> top-k of a
  `search.index.GalleryIndex`, on one worker thread;
* where indexes live (`default_index_path`, `default_gallery_index_path`), reusing or building
  one (`load_or_build_index`);
* loading what the demo serves from plain arguments: the model (`load_search_model`: a
  checkpoint, the newest ``best.pth`` or a zero-shot backbone) and its gallery
  (`folder_index` for any folder of photos, `dataset_index` for a labelled dataset's split);
  what cannot load raises `SetupError` with a message saying what to do.

``app_stanford.py`` is the Gradio UI and command line over it; ``bench/bench_search.py`` and
``bench/gpu_check.py`` time it directly.
"""
import concurrent.futures
import hashlib
import logging
import math
import os
import threading
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image

from dataio import catalogue
from dataio import photos
import datasets
import explain
import inference
import models
from search import gallery
from search import guard
from search import vectordb
from search.index import build_gallery_index, load_fresh_index

logger = logging.getLogger("app_stanford")  # the demo's log, whichever module writes to it

CATEGORY_ALL = "All"
DEFAULT_K = 10
MAX_K = 50
# Formats a query may have. Decoding others (EPS runs Ghostscript, ...) is refused up front.
QUERY_FORMATS = ("JPEG", "MPO", "PNG", "WEBP", "GIF", "BMP", "TIFF")
TRAIN_HINT = ("python train.py --dataset synthetic --backbone resnet18 --weights none "
              "--image_size 64 --epochs 3 --loss multi_similarity --lr 1e-3 --batch_size 32 "
              "--dropout 0   (offline, ~2 min on CPU; generates data/synthetic_sop)\n"
              "  or on real SOP: python train.py --dataset stanford --backbone efficientnet_b0")


EXACT_LABEL = "exact decomposition"
APPROX_LABEL = "approximation: MLP head linearised at the pooled feature"


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
    similarity (ties by lower gallery index, as `search.index.GalleryIndex.search`).

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

    def __init__(self, model, index, data_root, max_pixels=40_000_000, explain_source=None):
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
        # the file route serves exactly these photos (search.guard), swapped with the index
        self.served = guard.ServedFiles(self.data_root, index.paths)
        # explanations need the torch network (its feature grid): the model itself, or, for an
        # onnx runtime model, one loaded on first use from ``explain_source`` (a checkpoint path
        # or a zero-shot (backbone, weights, image_size)) and kept here
        self.explain_source = explain_source
        self._explain_model = model if isinstance(model, models.EmbeddingNet) else None
        self._last_query = None  # the last query's pixels and feature grid (`_embed`)
        self.explain_store = None  # search.explain_store.ExplainStore, `attach_explain_store`
        self.explain_store_gb = 0.0  # its size limit, kept for --watch's updates

    def _on_worker(self, fn, *args):
        """``fn(*args)`` on the worker thread (directly when already there)."""
        if threading.current_thread() is self._worker_thread:
            return fn(*args)
        return self._worker.submit(fn, *args).result()

    # ---- live updates (search.watch)
    def replace_index(self, index):
        """Serve ``index`` from now on (``--watch``: the gallery folder changed).

        Everything derived from the index (``abs_paths``, search caches) is made first, in the
        caller's thread; then ``index`` and ``abs_paths`` are swapped together on the worker
        thread. Every query runs there from start to end, so the swap falls between two
        queries: each sees the old gallery or the new one, never a mix, and none waits for
        more than the swap itself. Callers outside the worker should take a result's file
        from its own ``catalogue_path`` (`result_path`), not from ``abs_paths[index]``, which
        may belong to a newer gallery."""
        adopt = getattr(index, "adopt", None)
        if adopt is not None:  # a database gallery (search.vectordb) that updated itself in place:
            self._on_worker(adopt)  # its new rows become the searched ones between two queries
        abs_paths = [str(self.data_root / p) for p in index.paths]
        served = guard.ServedFiles(self.data_root, index.paths)
        if adopt is None and len(index):  # the first search makes its caches (float16 copy / faiss) here
            index.search(np.asarray(index.embeddings[0], dtype=np.float32), 1)
        self._on_worker(self._install_index, index, abs_paths, served)

    def _install_index(self, index, abs_paths, served):
        self.index, self.abs_paths, self.served = index, abs_paths, served
        self._rows_by_path = None

    def result_path(self, result):
        """The image file of a result dict (from its ``catalogue_path``: right whichever
        gallery answered the query)."""
        return str(self.data_root / result["catalogue_path"])

    # ---- model input
    def pixels(self, image):
        """The s x s x 3 uint8 crop of ``image`` (RGB PIL) that the model sees: the eval transform
        without normalisation (the resize is the same PIL call torchvision makes; the crop offset
        follows CenterCrop's rounding). Also what a similarity map is drawn over."""
        if image.mode != "RGB":
            image = image.convert("RGB")
        r, s, c = self.resize, self.image_size, self.crop
        return np.ascontiguousarray(np.asarray(image.resize((r, r), Image.BILINEAR))[c:c + s, c:c + s])

    def prepare(self, image):
        """Write the eval transform of ``image`` (RGB PIL, or its `pixels`) into the input buffer;
        returns it. Same numbers as ``datasets.build_transform(image_size, train=False)``."""
        arr = image if isinstance(image, np.ndarray) else self.pixels(image)
        x = torch.from_numpy(arr).to(self.device).permute(2, 0, 1)
        torch.addcmul(self._shift, x, self._scale, out=self._input[0])
        return self._input

    def _forward(self, x):
        """(embeddings [N, D], feature grid [N, C, H, W] or None) of a model input: the grid is
        caught on the way (torch: the pooling's input; onnx: the export's ``features`` output)
        and is None only for an ONNX export made without it."""
        if isinstance(self.model, models.EmbeddingNet):
            grid, embedding = explain.feature_grid(self.model, x)
            return embedding, grid
        if getattr(self.model, "has_features", False):
            return self.model.embed_with_features(x)
        with torch.inference_mode():
            return self.model(x), None

    def _projections(self, inputs):
        """`explain.projections` [N, H, W, D] of model inputs [N, 3, s, s]: the serving model's
        feature grids (`_forward`), the torch network's for an ONNX export without them."""
        net = self.explain_model()
        _, grids = self._forward(inputs)
        if grids is None:
            grids, _ = explain.feature_grid(net, inputs)
        return explain.projections(net, grids)

    def embed(self, image):
        """Unit embedding (float32 [D], numpy) of an RGB PIL image."""
        return self._on_worker(self._embed, image)

    def _embed(self, image):
        pixels = self.pixels(image)
        embedding, grid = self._forward(self.prepare(pixels))
        # kept for "Show why", which follows a search with the same query: its maps then need
        # no second forward pass over it
        self._last_query = None if grid is None else {"pixels": pixels, "grid": grid, "file": None}
        return embedding[0].cpu().numpy()

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
        if self._last_query is not None:
            self._last_query["file"] = _file_key(path)
        out["timing_ms"]["decode"] = round((t1 - t0) * 1e3, 2)
        out["timing_ms"]["total"] = round((time.perf_counter() - t0) * 1e3, 2)
        out["query_size"] = list(image.size)
        return out

    def search_gallery_item(self, i, k=DEFAULT_K, category=CATEGORY_ALL, catalogue_path=None):
        """Search with gallery image ``i``'s stored embedding (no forward pass); the image
        itself is left out of its results (excluded by index). ``catalogue_path``: the image
        that row ``i`` was when the caller saw it; if the gallery was replaced since
        (`replace_index`), that image's row now, or a QueryError when it was removed."""
        return self._on_worker(self._search_gallery_item, i, k, category, catalogue_path)

    def _row_of(self, i, catalogue_path):
        if catalogue_path is None or (0 <= int(i) < len(self.index) and self.index.paths[int(i)] == catalogue_path):
            return int(i)
        return self._row_of_path(catalogue_path)

    def _row_of_path(self, catalogue_path):
        """The current gallery's row of ``catalogue_path``; QueryError when it is gone."""
        if getattr(self, "_rows_by_path", None) is None:
            self._rows_by_path = {p: r for r, p in enumerate(self.index.paths)}
        row = self._rows_by_path.get(str(catalogue_path))
        if row is None:
            raise QueryError(f"{catalogue_path} is no longer in the gallery; search again.")
        return row

    def _result_row(self, result):
        """A result named by its ``catalogue_path`` (a string; right whichever gallery answered
        the search) or by its row in the current gallery (an int)."""
        if isinstance(result, str):
            return self._row_of_path(result)
        i = int(result)
        if not 0 <= i < len(self.index):
            raise QueryError(f"Gallery image {i} does not exist (the gallery has {len(self.index)}).")
        return i

    def _search_gallery_item(self, i, k, category, catalogue_path=None):
        t0 = time.perf_counter()
        k, super_id = clamp_k(k), category_to_super_id(category, self.index.categories)
        i = self._row_of(i, catalogue_path)
        if not 0 <= int(i) < len(self.index):
            raise QueryError(f"Gallery image {i} does not exist (the gallery has {len(self.index)}).")
        results = self._ranked(self.index.embeddings[int(i)], k, super_id, exclude=int(i))
        t1 = time.perf_counter()
        return self._response(results, k, category, {"embed": 0.0, "search": (t1 - t0) * 1e3,
                                                     "total": (t1 - t0) * 1e3})

    # ---- explanations (explain.similarity_maps)
    def explain_model(self):
        """The torch EmbeddingNet for similarity maps: the engine's model, or for an
        inference.OnnxEmbedder the network it was exported from, loaded once (`_torch_twin`)."""
        if self._explain_model is None:
            self._explain_model = _torch_twin(self.model, self.explain_source).to(self.device).eval()
        return self._explain_model

    def explain(self, query, result, alpha=0.5):
        """Why gallery image ``result`` (its catalogue path, or its row) matches ``query`` (an
        upload's path or an RGB PIL image): `explain_results` for one result."""
        return self.explain_results(query, [result], alpha=alpha)[0]

    def explain_results(self, query, results, alpha=0.5):
        """One dict per result in ``results`` (catalogue paths, or rows of the current gallery;
        all resolved in one gallery snapshot on the worker thread, a photo no longer in the
        gallery is a QueryError): {"index", "catalogue_path", "query_overlay",
        "result_overlay" (PIL, the model's s x s view with the map over it), "query_map",
        "result_map" (nested lists of floats, the feature grid's size), "score", "exact",
        "label"}, on the worker thread.

        score is e_q . e_r: e_q the query's embedding by the torch network (from the query's
        feature grid), e_r the gallery index's vector. The query map sums to it exactly; the
        result map sums to it within 1e-5 when computed from the image, within ~1e-3 when read
        from the explanation store (float16, `attach_explain_store`). Cost: the query's grid is
        the one its search just computed (same file, or same pixels), so no forward pass is run
        over the query or over stored results; only results missing from the store run the
        network (one batch)."""
        return self._on_worker(self._explain_results, query, list(results), alpha)

    def _query_side(self, query):
        """(pixels, projections [H, W, D]) of a query path or PIL image, from the last search's
        feature grid when it was the same file (size and mtime) or the same pixels, else from
        one forward pass."""
        last = self._last_query
        if last is not None and not isinstance(query, Image.Image) and last["file"] is not None \
                and last["file"] == _file_key(query):
            pixels, grid = last["pixels"], last["grid"]
        else:
            image = query if isinstance(query, Image.Image) else load_query_image(
                query, self.max_pixels, draft_size=self.resize)
            pixels = self.pixels(image)
            if last is None or not np.array_equal(pixels, last["pixels"]):
                return pixels, self._projections(self.prepare(pixels).clone())[0]
            grid = last["grid"]
        return pixels, explain.projections(self.explain_model(), grid)[0]

    def _explain_results(self, query, results, alpha):
        indices = [self._result_row(r) for r in results]
        query_pixels, p_q = self._query_side(query)                     # p_q: [H, W, D]
        e_q = p_q.sum((0, 1))                                           # the query's unit embedding
        vectors = torch.from_numpy(np.stack([np.asarray(self.index.embeddings[i], np.float32)
                                             for i in indices]))        # [K, D]
        views = [self.pixels(self._gallery_image(i)) for i in indices]
        store = self.explain_store
        stored = [None if store is None else store.get(v) for v in vectors.numpy()]
        missing = [n for n, p in enumerate(stored) if p is None]
        if missing:  # not in the store: the network over those results, in one batch
            computed = self._projections(torch.cat([self.prepare(views[n]).clone() for n in missing]))
            for n, p in zip(missing, computed):
                stored[n] = p
        exact, out = explain.is_exact(self.explain_model()), []
        for i, v, p_r, view in zip(indices, vectors, stored, views):
            q_map = torch.einsum("ijd,d->ij", p_q, v).numpy()
            r_map = torch.einsum("ijd,d->ij", torch.as_tensor(p_r), e_q).numpy()
            out.append({"index": i, "catalogue_path": self.index.paths[i], "score": float(e_q @ v), "exact": exact,
                        "label": EXACT_LABEL if exact else APPROX_LABEL,
                        "query_map": q_map.tolist(), "result_map": r_map.tolist(),
                        "query_overlay": explain.overlay(Image.fromarray(query_pixels), q_map, alpha),
                        "result_overlay": explain.overlay(Image.fromarray(view), r_map, alpha)})
        return out

    def _store_projections(self, files):
        """`_projections` of image files [N, H, W, D] (numpy); NaN for a file that no longer
        decodes (`search.explain_store.sync_store` counts and skips it)."""
        inputs, bad = [], []
        for n, f in enumerate(files):
            try:
                image = photos.load_image(f, size=self.resize)
            except (*photos.IMAGE_ERRORS, FileNotFoundError):
                bad.append(n)
                image = Image.new("RGB", (self.resize, self.resize))
            inputs.append(self.prepare(image).clone())
        proj = self._projections(torch.cat(inputs)).numpy()
        proj[bad] = np.nan
        return proj

    def _gallery_image(self, i):
        """Gallery image ``i`` decoded; QueryError when its file can no longer be read."""
        try:
            return photos.load_image(self.abs_paths[i], size=self.resize)
        except photos.IMAGE_ERRORS:
            raise QueryError(f"{self.index.paths[i]} can no longer be read from the gallery folder; "
                             "search again.") from None

    def attach_explain_store(self, path, max_bytes=1 << 30, batch_size=32, progress=True, index=None):
        """Read (and bring up to date) the explanation store at ``path``
        (`search.explain_store`) of ``index`` (default the engine's; --watch passes the next
        one before it is served), so that "Show why" reads the results' projections instead of
        running the network over them. Images missing from it are computed now, in batches of
        ``batch_size`` on the worker thread (between queries). None (no store; logged unless
        ``path`` is None or ``max_bytes`` 0, i.e. switched off) when it would exceed
        ``max_bytes``, for an empty gallery or a database gallery (no vector array to key it on).
        Returns the store."""
        from search import explain_store

        index = self.index if index is None else index
        self.explain_store_gb = max_bytes / 1e9
        store = None
        if path is None or max_bytes <= 0:
            pass
        elif not isinstance(getattr(index, "embeddings", None), np.ndarray):
            logger.info("No explanation store for a database gallery: \"Show why\" runs the network "
                        "over the results it explains")
        else:
            probe = self._on_worker(lambda: self.prepare(Image.new("RGB", (self.resize, self.resize))).clone())
            grid_shape = tuple(self._projections(probe).shape[1:3])
            size = explain_store.store_bytes(len(index), grid_shape, index.embeddings.shape[1])
            if len(index) and size <= max_bytes:
                def compute(files):
                    return self._store_projections(files)

                store = explain_store.sync_store(path, index.embeddings, [str(self.data_root / p) for p in index.paths],
                                                 lambda files: self._on_worker(compute, files),
                                                 grid_shape, batch_size=batch_size, progress=progress)
            else:
                logger.info("No explanation store for %d images (%.2f GB, limit --explain_store_gb %.2f): \"Show "
                            "why\" runs the network over the results it explains", len(index), size / 1e9,
                            max_bytes / 1e9)
        self._on_worker(setattr, self, "explain_store", store)
        return store

    def warm_up(self):
        """One forward pass and one search, so that the first user does not pay for lazy
        initialisation (allocator, BLAS threads, oneDNN kernels)."""
        self.search_image(Image.new("RGB", (self.resize, self.resize), (255, 255, 255)))

    def example_indices(self, n=12):
        """One gallery image from each category (its first photo still on disk), up to ``n``."""
        picks = []
        for sid in range(1, len(self.index.categories) + 1):
            rows = np.flatnonzero(self.index.super_ids == sid)
            present = next((int(r) for r in rows[:32] if os.path.isfile(self.abs_paths[r])), None)
            if present is not None:
                picks.append(present)
        return picks[:n]


def _file_key(path):
    """(path, size, mtime_ns) of a file, None when it cannot be read: the same upload again."""
    try:
        st = os.stat(path)
    except (OSError, TypeError, ValueError):
        return None
    return str(path), st.st_size, st.st_mtime_ns


def _torch_twin(model, source=None):
    """The EmbeddingNet behind an inference.OnnxEmbedder: from ``source`` (a checkpoint path, or
    a zero-shot (backbone, weights, image_size)), else the checkpoint with the export's sha256
    beside its file (ensure_onnx writes best.onnx next to best.pth). QueryError when none."""
    if isinstance(source, (tuple, list)):
        return models.zero_shot_model(*source)
    if source is not None:
        return models.load_model(source)
    meta, path = getattr(model, "metadata", {}) or {}, getattr(model, "path", None)
    digest = meta.get("checkpoint_sha256")
    if digest and path is not None:
        for candidate in sorted(Path(path).parent.glob("*.pth")):
            if models.checkpoint_hash(candidate) == digest:
                return models.load_model(candidate)
    raise QueryError("Explanations need the torch model this ONNX export was made from; it was "
                     "not found (start the demo with --runtime torch to use them).")


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
    ``index_type``: "exact", "ivf" or "hnsw" (search.index.GalleryIndex); an index of another
    type is rebuilt. ``splits``: SOPDataset's split settings (datasets.split_options).

    Returns ``(index, built: bool)``. A failed save raises OSError naming the path (the
    previous file is left intact by `search.index.GalleryIndex.save`).
    """
    index_path = Path(index_path) if index_path else default_index_path(checkpoint, split)
    image_size = int(model.model_args["image_size"])
    # check_files=False: a vanished photo is left out of the index (build_gallery_index's
    # skip_unreadable), not a reason for the demo not to start
    dataset = datasets.SOPDataset(data_root, split, **(splits or {}), check_files=False,
                                  transform=datasets.build_transform(image_size, train=False))
    ckpt_hash = model_key or models.checkpoint_hash(checkpoint)
    if index_path.exists() and not force:
        index, why = load_fresh_index(index_path, ckpt_hash, dataset.rel_paths, index_type=index_type)
        if index is not None:
            logger.info("Loaded gallery index %s (%d images)", index_path, len(index))
            return index, False
        logger.info("Gallery index %s: %s; rebuilding it", index_path, why)
    logger.info("Embedding %d gallery images of %s (split %s) with %s ...",
                len(dataset), dataset.root, split, checkpoint or model_key)
    index = build_gallery_index(
        model, dataset, batch_size=batch_size, workers=workers, checkpoint_hash=ckpt_hash,
        device=next(model.parameters()).device,
        meta={"split": split, "data_root": str(dataset.root), "model_args": dict(model.model_args),
              "checkpoint": str(checkpoint) if checkpoint else None}, progress=progress,
        index_type=index_type, skip_unreadable=True)
    index.save(index_path)
    logger.info("Saved gallery index %s", index_path)
    return index, True


def find_checkpoint(checkpoint_dir="checkpoints"):
    """The newest ``<checkpoint_dir>/*/best.pth`` (by modification time), or None."""
    found = sorted(Path(checkpoint_dir).glob("*/best.pth"), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


# ============ what the demo serves, from plain arguments ============

class SetupError(RuntimeError):
    """The model or the gallery cannot be loaded; the message says why and what to do."""


class SearchModel(NamedTuple):
    """A model ready to embed queries, and what names it: ``checkpoint`` (None for a zero-shot
    backbone), ``key`` (the checkpoint's sha256, or the zero-shot model key: what an index
    records as its checkpoint hash) and ``name`` (the run folder, or the zero-shot name)."""
    model: torch.nn.Module
    checkpoint: Path | None
    key: str
    name: str


def load_search_model(checkpoint=None, checkpoint_dir="checkpoints", device="auto",
                      zero_shot_backbone=None, weights="imagenet", image_size=224,
                      runtime=None) -> SearchModel:
    """The checkpoint (``checkpoint``, else the newest ``<checkpoint_dir>/*/best.pth``), or
    with ``zero_shot_backbone`` that pretrained backbone alone (``weights``, ``image_size``),
    on ``device`` (`models.resolve_device`) and ``runtime`` (inference.load_embedder; default
    inference.default_runtime). SetupError when neither loads."""
    device = models.resolve_device(device)
    runtime = inference.resolve_runtime(runtime, device)
    if zero_shot_backbone:
        try:
            model = inference.load_embedder(zero_shot=(zero_shot_backbone, weights, image_size),
                                            runtime=runtime, device=device)
        except (models.WeightsUnavailableError, OSError, ValueError) as e:
            raise SetupError(f"Cannot load {zero_shot_backbone} with weights {weights!r}: {e}") from e
        logger.info("Zero-shot %s (%s weights, %d px)", zero_shot_backbone, weights, image_size)
        return SearchModel(model, None, models.zero_shot_model_key(zero_shot_backbone, str(weights), image_size),
                           models.zero_shot_name(zero_shot_backbone, image_size, str(weights)))
    checkpoint = Path(checkpoint) if checkpoint else find_checkpoint(checkpoint_dir)
    if checkpoint is None:
        raise SetupError(
            f"No checkpoint given and none found under {Path(checkpoint_dir) / '*' / 'best.pth'}. "
            f"Train one first, e.g.:\n  {TRAIN_HINT}\nthen run: python app_stanford.py "
            "--checkpoint checkpoints/<run>/best.pth, or search with pretrained features: "
            "python app_stanford.py --zero_shot --backbone efficientnet_lite0 --gallery DIR")
    try:
        model = inference.load_embedder(checkpoint, runtime=runtime, device=device)
    except (OSError, models.CheckpointError, inference.OnnxModelError, ValueError) as e:
        raise SetupError(f"Cannot load checkpoint {checkpoint}: {e}") from e
    logger.info("Loaded %s (%s, runtime %s)", checkpoint, model.model_args, runtime)
    return SearchModel(model, checkpoint, models.checkpoint_hash(checkpoint), checkpoint.parent.name)


def folder_index(loaded: SearchModel, folder, index_path=None, batch_size=64, workers=None,
                 rebuild=False, index_type="exact", backend="file", db_uri=None, collection=None,
                 checkpoint_every=gallery.CHECKPOINT_EVERY):
    """``(index, folder)``: the index of every image under ``folder`` (`search.gallery`),
    updated incrementally (and resumably: checkpoints every ``checkpoint_every`` images), at
    ``index_path`` (default `default_gallery_index_path`); with ``backend="milvus"`` a
    `search.vectordb.MilvusGallery` in the database ``db_uri`` (default
    `search.vectordb.default_db_path`). SetupError for a missing folder, one without a readable
    image, or a database that cannot be used."""
    model, checkpoint = loaded.model, loaded.checkpoint
    options = dict(batch_size=batch_size, workers=workers, device=next(model.parameters()).device,
                   index_type=index_type, checkpoint_every=checkpoint_every)
    try:
        if backend == "milvus":
            db_uri = db_uri or vectordb.default_db_path(checkpoint, loaded.name)
            index, report = vectordb.folder_gallery(model, loaded.key, folder, db_uri, collection=collection,
                                                    rebuild=rebuild, **options)
            where = f"{db_uri}, collection {index.name}"
        else:
            where = Path(index_path) if index_path else default_gallery_index_path(folder, checkpoint, loaded.name)
            index, report = gallery.update_gallery_index(
                model, folder, where, loaded.key, force=rebuild, **options,
                meta={"model_args": dict(model.model_args), "checkpoint": str(checkpoint) if checkpoint else None})
    except (FileNotFoundError, NotADirectoryError, ValueError, vectordb.DatabaseError) as e:
        raise SetupError(f"Cannot index the gallery {folder}: {e}") from e
    logger.info("Gallery %s: %d images (%d added, %d changed, %d removed, %d unchanged, %d embedded, %d "
                "resumed; %d files skipped as not images, %d unreadable) in %.1f s; index %s", folder,
                len(index), report["added"], report["changed"], report["removed"], report["unchanged"],
                report["embedded"], report["resumed"], report["skipped_non_images"], report["unreadable"],
                report["seconds"], where)
    for rel in report["skipped"]:
        logger.debug("skipped (not an image) %s", rel)
    for rel in report["unreadable_paths"]:
        logger.debug("skipped (unreadable) %s", rel)
    return index, Path(folder).expanduser().resolve()


def dataset_index(loaded: SearchModel, data_root=None, split=None, index_path=None, batch_size=64,
                  workers=None, rebuild=False, index_type="exact", test_fraction=None, backend="file",
                  db_uri=None, collection=None, checkpoint_every=None):
    """``(index, data_root)``: the index of ``split`` (default `datasets.serving_split`: the test
    split, the whole catalogue for a run trained on every product) of a labelled dataset (any layout;
    default ``data_root``: the checkpoint's, `catalogue.default_data_root`), reused or built
    by `load_or_build_index` at ``index_path`` (default beside the checkpoint, or under
    ``runs/<zero-shot name>/``); with ``backend="milvus"`` the split's collection in ``db_uri``
    (`search.vectordb.split_gallery`: served as it is when complete, e.g. from ``shards.py``).
    SetupError when the dataset or the database cannot be read. (``checkpoint_every``: unused,
    a split is embedded in one pass or by ``shards.py``.)"""
    train_args = (getattr(loaded.model, "checkpoint_info", None) or {}).get("args")
    try:
        data_root = catalogue.detect_layout(data_root or catalogue.default_data_root(train_args))[0]
        split = split or datasets.serving_split(train_args, data_root)
        index_path = index_path or (
            default_index_path(loaded.checkpoint, split) if loaded.checkpoint else
            Path("runs") / loaded.name / f"gallery_{split}_{_path_tag(data_root)}.npz")
        splits = datasets.split_options(train_args, test_fraction)

        def build():
            return load_or_build_index(loaded.model, loaded.checkpoint, data_root, split, index_path,
                                       batch_size=batch_size, workers=workers, force=rebuild,
                                       index_type=index_type, model_key=loaded.key, splits=splits)[0]

        if backend == "milvus":
            index = vectordb.split_gallery(
                db_uri or vectordb.default_db_path(loaded.checkpoint, loaded.name), data_root, split,
                loaded.key, dict(loaded.model.model_args), datasets.SOPDataset(data_root, split, **splits).rel_paths,
                build, collection=collection, index_type=index_type, rebuild=rebuild)
        else:
            index = build()
    except (FileNotFoundError, NotADirectoryError, ValueError, catalogue.DatasetError, vectordb.DatabaseError) as e:
        raise SetupError(f"Cannot build the gallery from {data_root}: {e}\nPass --data_root DIR (a dataset: "
                         "Ebay files, a catalogue.csv or a <category>/<product>/<image> tree), or "
                         "--gallery DIR to search any folder of photos.") from e
    return index, data_root
