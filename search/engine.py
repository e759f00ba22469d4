"""The demo's query engine, without any UI: a query photo in, the ranked gallery images out.

`SearchEngine`: decoded image (`search.query`) -> model input -> embedding -> top-k of a
`search.index.GalleryIndex` (or a `search.vectordb.MilvusGallery`), on one worker thread; the
similarity maps of its results ("Show why"); the photos the web server may serve
(`search.guard.ServedFiles`), swapped with the index under ``--watch``. What it serves is
loaded by `search.loading`; ``app_stanford.py`` is the Gradio UI and command line over it;
``bench/bench_search.py`` and ``bench/gpu_check.py`` time it directly.
"""

import concurrent.futures
import logging
import os
from pathlib import Path
import threading
import time

import numpy as np
from PIL import Image
import torch

import checkpoints
from dataio import photos
import explain
import models
import preprocessing
from search import guard, products
from search.query import CATEGORY_ALL, DEFAULT_K, QueryError, category_to_super_id, clamp_k, load_query_image

logger = logging.getLogger("app_stanford")  # the demo's log, whichever module writes to it

EXACT_LABEL = "exact decomposition"
APPROX_LABEL = "approximation: MLP head linearised at the pooled feature"


# ============ search engine ============

MAX_QUERY_PHOTOS = 8  # photos of one item in one query: each is a forward pass


class SearchEngine:
    """The per-query path: decoded image → model input → embedding → exact top-k.

    ``search_image(pil_image, k, category)`` is the pure search (no Gradio): it returns
    ``{"results": [{"rank", "index", "catalogue_path", "product_id", "category", "score", "match"}, ...],
    "timing_ms": {...}, "k", "category", "gallery_size", "results_mode", "threshold", "match_found"}``,
    results ranked by cosine similarity (ties by lower gallery index, as
    `search.index.GalleryIndex.search`). ``results_mode`` "products" (the demo's default; "photos"
    when the gallery has no product ids): one row per product, its best photo with ``photos`` / ``matched_photos``
    (search.products); "photos" (the default here): every photo hit. ``match``: score >= ``threshold``, the calibrated
    same-product threshold (given, else the model's, else the index's; None when unknown).

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

    def __init__(
        self, model, index, data_root, max_pixels=40_000_000, explain_source=None, results_mode="photos", threshold=None
    ):
        # channels_last: convolutions run ~15% faster on CPU at batch 1 (and on GPU); the
        # HWC uint8 pixels then land in the input buffer without a transposing copy.
        self.model = model.eval().to(memory_format=torch.channels_last)
        self.index = index
        self.data_root = Path(data_root)
        self.max_pixels = int(max_pixels)
        self.image_size = int(model.model_args["image_size"])
        self.resize = preprocessing.resize_size(self.image_size)
        self.crop = preprocessing.crop_offset(self.image_size)
        self.device = next(model.parameters()).device
        mean = torch.tensor(preprocessing.IMAGENET_MEAN, dtype=torch.float32).view(3, 1, 1)
        std = torch.tensor(preprocessing.IMAGENET_STD, dtype=torch.float32).view(3, 1, 1)
        # (u8 / 255 - mean) / std  ==  u8 * scale + shift
        self._scale = (1.0 / (255.0 * std)).to(self.device)
        self._shift = (-mean / std).to(self.device)
        self._input = torch.empty(1, 3, self.image_size, self.image_size, device=self.device).contiguous(
            memory_format=torch.channels_last
        )
        self._worker = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="search")
        self._worker_thread = self._worker.submit(threading.current_thread).result()
        _own_adoption(index)
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
        # the same-product threshold: given, else the model's (checkpoint / ONNX), else the index's
        self.threshold = products.threshold_of(
            threshold if threshold is None else {"threshold": threshold},
            getattr(model, "checkpoint_info", None),
            getattr(index, "meta", None),
        )
        self.requested_mode = results_mode
        self.results_mode = self.mode_for(index)

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
        _own_adoption(index)
        adopt = getattr(index, "adopt", None)
        if adopt is not None:  # a database gallery (search.vectordb) that updated itself in place:
            self._on_worker(adopt)  # its new rows become the searched ones between two queries
        abs_paths = [str(self.data_root / p) for p in index.paths]
        served = guard.ServedFiles(self.data_root, index.paths)
        if adopt is None and len(index):  # the first search makes its caches (float16 copy / faiss) here
            index.search(np.asarray(index.embeddings[0], dtype=np.float32), 1)
        self._on_worker(self._install_index, index, abs_paths, served, self.mode_for(index))

    def _install_index(self, index, abs_paths, served, mode):
        self.index, self.abs_paths, self.served, self.results_mode = index, abs_paths, served, mode
        self._rows_by_path = None

    def mode_for(self, index) -> str:
        """The results mode served over ``index``: the requested one, or "photos" when no gallery
        photo has a product id (nothing to group by): decided again whenever the gallery changes."""
        return self.requested_mode if any(index.product_ids) else "photos"

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
        return np.ascontiguousarray(np.asarray(image.resize((r, r), Image.BILINEAR))[c : c + s, c : c + s])

    def prepare(self, image):
        """Write the eval transform of ``image`` (RGB PIL, or its `pixels`) into the input buffer;
        returns it. Same numbers as ``preprocessing.build_transform(image_size, train=False)``."""
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
        wanted = products.candidate_count(k, self.results_mode, len(self.index))
        scores, idx = self.index.search(vector, wanted + (exclude is not None), super_id=super_id)
        results = []
        for score, i in zip(scores[0].tolist(), idx[0].tolist()):
            if i < 0 or i == exclude or len(results) == wanted:
                continue
            results.append(
                {
                    "rank": len(results) + 1,
                    "index": i,
                    # not "path": gradio_client takes any dict with a "path" for a file to download
                    "catalogue_path": self.index.paths[i],
                    # the data's product id (a string); None in an unlabelled --gallery folder
                    "product_id": self.index.product_ids[i] or None,
                    "category": self.index.categories[int(self.index.super_ids[i]) - 1],
                    "score": round(float(score), 6),
                }
            )
        return products.shape_results(results, k, self.results_mode, self.threshold)

    def _response(self, results, k, category, timing):
        return {
            "k": k,
            "category": category or CATEGORY_ALL,
            "gallery_size": len(self.index),
            "results_mode": self.results_mode,
            "threshold": self.threshold,
            "match_found": None if self.threshold is None else any(r["match"] for r in results),
            "results": results,
            "timing_ms": {n: round(v, 2) for n, v in timing.items()},
        }

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
        return self._response(
            results, k, category, {"embed": (t1 - t0) * 1e3, "search": (t2 - t1) * 1e3, "total": (t2 - t0) * 1e3}
        )

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

    def search_files(self, paths, k=DEFAULT_K, category=CATEGORY_ALL):
        """`search_file` of several photos of one item as one query: each decoded and embedded, the
        query = the unit mean of their unit embeddings (measured against max over the photos' scores:
        bench/bench_match.py); one photo is `search_file` itself. ``query_photos`` = their count."""
        paths = list(paths)
        if len(paths) == 1:
            return self.search_file(paths[0], k, category)
        if len(paths) > MAX_QUERY_PHOTOS:
            raise QueryError(f"At most {MAX_QUERY_PHOTOS} photos a query (got {len(paths)}).")
        return self._on_worker(self._search_files, paths, k, category)

    def _search_files(self, paths, k, category):
        t0 = time.perf_counter()
        k, super_id = clamp_k(k), category_to_super_id(category, self.index.categories)
        vectors = [self._embed(load_query_image(p, self.max_pixels, draft_size=self.resize)) for p in paths]
        self._last_query = None  # "Show why" explains one photo, not a fused query
        centre = np.mean(vectors, axis=0)
        vector = (centre / max(float(np.linalg.norm(centre)), 1e-12)).astype(np.float32)
        t1 = time.perf_counter()
        out = self._response(
            self._ranked(vector, k, super_id),
            k,
            category,
            {
                "embed": (t1 - t0) * 1e3,
                "search": (time.perf_counter() - t1) * 1e3,
                "total": (time.perf_counter() - t0) * 1e3,
            },
        )
        out["query_photos"] = len(paths)
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
        return self._response(results, k, category, {"embed": 0.0, "search": (t1 - t0) * 1e3, "total": (t1 - t0) * 1e3})

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
        if (
            last is not None
            and not isinstance(query, Image.Image)
            and last["file"] is not None
            and last["file"] == _file_key(query)
        ):
            pixels, grid = last["pixels"], last["grid"]
        else:
            image = (
                query
                if isinstance(query, Image.Image)
                else load_query_image(query, self.max_pixels, draft_size=self.resize)
            )
            pixels = self.pixels(image)
            if last is None or not np.array_equal(pixels, last["pixels"]):
                return pixels, self._projections(self.prepare(pixels).clone())[0]
            grid = last["grid"]
        return pixels, explain.projections(self.explain_model(), grid)[0]

    def _explain_results(self, query, results, alpha):
        indices = [self._result_row(r) for r in results]
        query_pixels, p_q = self._query_side(query)  # p_q: [H, W, D]
        e_q = p_q.sum((0, 1))  # the query's unit embedding
        vectors = torch.from_numpy(
            np.stack([np.asarray(self.index.embeddings[i], np.float32) for i in indices])
        )  # [K, D]
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
            out.append(
                {
                    "index": i,
                    "catalogue_path": self.index.paths[i],
                    "score": float(e_q @ v),
                    "exact": exact,
                    "label": EXACT_LABEL if exact else APPROX_LABEL,
                    "query_map": q_map.tolist(),
                    "result_map": r_map.tolist(),
                    "query_overlay": explain.overlay(Image.fromarray(query_pixels), q_map, alpha),
                    "result_overlay": explain.overlay(Image.fromarray(view), r_map, alpha),
                }
            )
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
            raise QueryError(
                f"{self.index.paths[i]} can no longer be read from the gallery folder; search again."
            ) from None

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
            logger.info(
                'No explanation store for a database gallery: "Show why" runs the network over the results it explains'
            )
        else:
            probe = self._on_worker(lambda: self.prepare(Image.new("RGB", (self.resize, self.resize))).clone())
            grid_shape = tuple(self._projections(probe).shape[1:3])
            size = explain_store.store_bytes(len(index), grid_shape, index.embeddings.shape[1])
            if len(index) and size <= max_bytes:

                def compute(files):
                    return self._store_projections(files)

                store = explain_store.sync_store(
                    path,
                    index.embeddings,
                    [str(self.data_root / p) for p in index.paths],
                    lambda files: self._on_worker(compute, files),
                    grid_shape,
                    batch_size=batch_size,
                    progress=progress,
                )
            else:
                logger.info(
                    'No explanation store for %d images (%.2f GB, limit --explain_store_gb %.2f): "Show '
                    'why" runs the network over the results it explains',
                    len(index),
                    size / 1e9,
                    max_bytes / 1e9,
                )
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


def _own_adoption(index):
    """A database gallery served by the engine adopts new rows only when the engine says so
    (`SearchEngine.replace_index`, on the worker between two queries), never in the middle of a
    query: its category ids, rows and paths then come from one view."""
    if hasattr(index, "auto_adopt"):
        index.auto_adopt = False


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
            if checkpoints.checkpoint_hash(candidate) == digest:
                return models.load_model(candidate)
    raise QueryError(
        "Explanations need the torch model this ONNX export was made from; it was "
        "not found (start the demo with --runtime torch to use them)."
    )
