"""The gallery index: a catalogue's embeddings with their paths, labels and provenance, saved
as one ``.npz`` file, and its top-k search (exact, or through an approximate faiss index).

What the demo (`search.engine`), folder galleries (`search.gallery`), sharded embedding
(`search.shards`) and ``evaluate.py``'s embeddings cache load and save. Ranking follows
`retrieval`'s rule (higher score first, ties by the lower gallery index) with its sort keys.

File format (``GALLERY_FORMAT_VERSION``): plain arrays (``np.savez``, read with
``allow_pickle=False``: no pickled objects, so no class paths to keep importable) plus a JSON
``meta`` string; an approximate index is stored as faiss's serialised bytes beside its build
record.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from pathlib import Path
import time
import zipfile

import numpy as np

from dataio.fileio import atomic_write
import extraction
import knn
from search import ann, fastscan

logger = logging.getLogger("app_stanford")  # the demo's log, whichever module writes to it

# torch (and datasets, torchvision) are imported by build_gallery_index only: loading and
# searching an index needs numpy alone

GALLERY_FORMAT_VERSION = 1


def hash_paths(paths) -> str:
    """sha256 of the image list (relative paths, in order), to tell stale indexes apart."""
    h = hashlib.sha256()
    for p in paths:
        h.update(str(p).encode("utf-8"))
        h.update(b"\n")
    return h.hexdigest()


def embeddings_fingerprint(embeddings: np.ndarray) -> str:
    """sha256 of the float32 embedding matrix: ties a saved approximate index to its vectors."""
    return hashlib.sha256(np.ascontiguousarray(embeddings, dtype=np.float32).data).hexdigest()


def rerank(q: np.ndarray, emb: np.ndarray, candidates: np.ndarray, k: int):
    """Exact float32 top-k among ``candidates`` [Q, C] (rows of ``emb``, -1 = none), ranked
    by score descending then lower index. Undoes float16 rounding and faiss's tie order."""
    valid = candidates >= 0
    safe = np.maximum(candidates, 0)
    scores = np.einsum("qcd,qd->qc", emb[safe], q, optimize=False).astype(np.float32, copy=False)
    keys = np.where(valid, knn.score_key(scores, safe), knn.KEY_NONE)
    keys.sort(axis=1)
    keys = keys[:, :k]
    found = keys != knn.KEY_NONE
    return (np.where(found, knn.key_score(keys), -np.inf).astype(np.float32), np.where(found, knn.key_index(keys), -1))


# candidates fetched per query, beyond k, from the float16 scan / the approximate index:
# re-ranked in float32, they make the result the exact float32 ranking unless more than
# 2k + 16 items score within fastscan.ORDER_MARGIN of the k-th best (see GalleryIndex.search)
def num_candidates(k: int, n: int) -> int:
    return min(n, 2 * k + 16)


@dataclasses.dataclass(eq=False)
class GalleryIndex:
    """Embeddings of a catalogue of images plus what is needed to show and trust them.

    ``paths`` are relative to the data root; ``categories`` names the categories
    (``super_ids`` k is ``categories[k - 1]``; default SOP's 12); ``product_ids`` the product of
    each image as a string users can join on (default ``str(class_id)``; None entries are
    written as "" for an unlabelled gallery). ``checkpoint_hash`` is the sha256 of the
    checkpoint that produced the embeddings and ``image_list_hash`` that of ``paths``: a
    demo compares both before reusing an index. ``meta`` holds any JSON-serialisable extras
    (model_args, split, data_root, ...). ``file_stats``: optional int64 [N, 2], the (size in
    bytes, mtime in ns) of each image file when it was embedded, so that an index of a folder
    can be updated incrementally (`search.gallery`); None for catalogues that do not need it.

    ``index_type``: "exact" (default; right for SOP's 60,502 images and up to ~1M), or an
    approximate faiss index, "ivf" or "hnsw" (`search.ann`: what they are, their
    defaults from the gallery size, and when to pick which). ``ann_params`` overrides those
    defaults (nlist, nprobe, train_points_per_cell, kmeans_iters / M, efConstruction,
    efSearch). The approximate index is built by `build_ann` (or on first search / save)
    and saved inside the same file with a record of how it was built.
    """

    embeddings: np.ndarray
    paths: list
    class_ids: np.ndarray
    super_ids: np.ndarray
    checkpoint_hash: str = ""
    image_list_hash: str = ""
    categories: list | None = None
    product_ids: list | None = None
    meta: dict = dataclasses.field(default_factory=dict)
    kernel: str = "auto"
    index_type: str = "exact"
    ann_params: dict | None = None
    file_stats: np.ndarray | None = None

    def __post_init__(self):
        self.embeddings = np.ascontiguousarray(self.embeddings, dtype=np.float32)
        self.paths = [str(p) for p in self.paths]
        self.class_ids = np.asarray(self.class_ids, dtype=np.int64).reshape(-1)
        self.super_ids = np.asarray(self.super_ids, dtype=np.int64).reshape(-1)
        n = len(self.embeddings)
        if self.embeddings.ndim != 2 or not (len(self.paths) == len(self.class_ids) == len(self.super_ids) == n):
            raise ValueError(
                f"gallery index parts disagree: embeddings {self.embeddings.shape}, {len(self.paths)} paths, "
                f"{len(self.class_ids)} class ids, {len(self.super_ids)} super ids"
            )
        if not self.image_list_hash:
            self.image_list_hash = hash_paths(self.paths)
        if self.categories is None:
            from dataio import catalogue  # SOP's names, for indexes built before categories were stored

            self.categories = list(catalogue.SOP_CATEGORIES)
        self.categories = [str(c) for c in self.categories]
        if n and (self.super_ids.min() < 1 or self.super_ids.max() > len(self.categories)):
            raise ValueError(
                f"gallery index super ids span {self.super_ids.min()}..{self.super_ids.max()}, "
                f"outside 1..{len(self.categories)} (its {len(self.categories)} categories)"
            )
        if self.product_ids is None:
            self.product_ids = [str(c) for c in self.class_ids.tolist()]
        self.product_ids = ["" if p is None else str(p) for p in self.product_ids]
        if len(self.product_ids) != n:
            raise ValueError(f"gallery index has {len(self.product_ids)} product ids for {n} images")
        if self.file_stats is not None:
            self.file_stats = np.asarray(self.file_stats, dtype=np.int64)
            if self.file_stats.shape != (n, 2):
                raise ValueError(
                    f"gallery index file_stats must be [{n}, 2] (size, mtime_ns), got shape {self.file_stats.shape}"
                )
        if self.kernel not in ("auto", "numpy", "faiss"):
            raise ValueError(f"kernel must be 'auto', 'numpy' or 'faiss', got {self.kernel!r}")
        ann.check_index_type(self.index_type)
        self.ann_params = {**ann.default_params(self.index_type, n), **(self.ann_params or {})}
        self._ann = None  # the faiss index of an approximate index_type, once built / loaded
        self._ann_record = None  # how it was built (saved beside it)
        self._subsets = {}
        self.path = None  # the file it was loaded from or last saved to (save / load)

    def __len__(self):
        return len(self.embeddings)

    # ---- approximate index
    def build_ann(self, progress=True) -> None:
        """Build the faiss index of ``index_type`` (no-op for "exact" or when built)."""
        if self.index_type == "exact" or self._ann is not None:
            return
        faiss_index, seconds = ann.timed_build(self.embeddings, self.index_type, self.ann_params, progress=progress)
        faiss = ann.require_faiss()
        self._ann = faiss_index
        self._ann_record = {
            "index_type": self.index_type,
            "params": dict(self.ann_params),
            "build_s": round(seconds, 3),
            "faiss_version": faiss.__version__,
            "ntotal": int(faiss_index.ntotal),
            "dim": int(self.embeddings.shape[1]),
            "embeddings_sha256": embeddings_fingerprint(self.embeddings),
        }

    def set_search_params(self, **params) -> None:
        """Change nprobe (ivf) / efSearch (hnsw) for later searches; no rebuild needed."""
        allowed = {"ivf": {"nprobe"}, "hnsw": {"efSearch"}}.get(self.index_type, set())
        unknown = set(params) - allowed
        if unknown:
            raise ValueError(
                f"index type {self.index_type!r} takes search parameters "
                f"{sorted(allowed) or 'none'}, not {sorted(unknown)}"
            )
        self.ann_params.update({name: int(v) for name, v in params.items()})
        if self._ann is not None:
            ann.set_search_params(self._ann, self.index_type, self.ann_params)

    # ---- persistence
    def save(self, path) -> Path:
        """Write the index to one ``.npz`` file atomically (see `atomic_write`); an
        approximate index is built first if needed and saved with its build record."""
        meta = dict(self.meta)
        meta.update(
            format_version=GALLERY_FORMAT_VERSION,
            checkpoint_hash=self.checkpoint_hash,
            image_list_hash=self.image_list_hash,
            index_type=self.index_type,
        )
        arrays = {
            "embeddings": self.embeddings,
            "class_ids": self.class_ids,
            "super_ids": self.super_ids,
            "paths": np.array(self.paths, dtype=np.str_),
            "categories": np.array(self.categories, dtype=np.str_),
            "product_ids": np.array(self.product_ids, dtype=np.str_),
        }
        if self.file_stats is not None:
            arrays["file_stats"] = self.file_stats
        if self.index_type != "exact":
            self.build_ann()
            meta["ann"] = self._ann_record
            arrays["ann"] = ann.serialize(self._ann)
        arrays["meta"] = np.array(json.dumps(meta, sort_keys=True))
        self.path = atomic_write(path, lambda f: np.savez(f, **arrays))
        return self.path

    @classmethod
    def load(cls, path, kernel="auto") -> GalleryIndex:
        """Read an index written by `save`; a missing, truncated or foreign file raises a
        ValueError (FileNotFoundError when absent) that names it and says how to rebuild.
        An approximate index needs faiss (ImportError naming `pip install faiss-cpu`)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(
                f"gallery index {path} does not exist: build it with "
                "`python app_stanford.py --build_index` or evaluate.py --embeddings_cache"
            )
        try:
            with np.load(path, allow_pickle=False) as data:
                meta = json.loads(str(data["meta"]))
                parts = {name: data[name] for name in ("embeddings", "class_ids", "super_ids", "paths")}
                # absent from files written before free category names: SOP's defaults
                extra = {name: data[name].tolist() for name in ("categories", "product_ids") if name in data.files}
                if "file_stats" in data.files:
                    extra["file_stats"] = data["file_stats"]
                blob = data["ann"] if "ann" in data.files else None
        except (zipfile.BadZipFile, KeyError, ValueError, EOFError, OSError, json.JSONDecodeError) as exc:
            raise ValueError(
                f"gallery index {path} is corrupt or not a gallery index ({type(exc).__name__}: "
                f"{exc}); delete it and rebuild it"
            ) from exc
        version = meta.pop("format_version", None)
        if version != GALLERY_FORMAT_VERSION:
            raise ValueError(
                f"gallery index {path} has format version {version}, this code reads "
                f"{GALLERY_FORMAT_VERSION}: rebuild it"
            )
        index_type = meta.pop("index_type", "exact")  # files from before approximate indexes
        record = meta.pop("ann", None)
        if index_type not in ann.INDEX_TYPES or (index_type != "exact") != (blob is not None and record is not None):
            raise ValueError(
                f"gallery index {path} is corrupt: index type {index_type!r} without its "
                "approximate index or build record; delete it and rebuild it"
            )
        index = cls(
            embeddings=parts["embeddings"],
            paths=parts["paths"].tolist(),
            class_ids=parts["class_ids"],
            super_ids=parts["super_ids"],
            checkpoint_hash=meta.pop("checkpoint_hash", ""),
            image_list_hash=meta.pop("image_list_hash", ""),
            meta=meta,
            kernel=kernel,
            index_type=index_type,
            ann_params=(record or {}).get("params"),
            **extra,
        )
        if index.image_list_hash != hash_paths(index.paths):
            raise ValueError(f"gallery index {path} is corrupt: its image list does not match its hash; rebuild it")
        if record is not None:
            index._attach_ann(path, blob, record)
        index.path = path
        return index

    def _attach_ann(self, path, blob, record) -> None:
        """Adopt a saved faiss index after checking that it was built from these vectors."""
        faiss_index = ann.deserialize(blob)
        n, d = self.embeddings.shape
        if (
            record.get("index_type") != self.index_type
            or int(faiss_index.ntotal) != n
            or int(faiss_index.d) != d
            or record.get("ntotal") != n
            or record.get("embeddings_sha256") != embeddings_fingerprint(self.embeddings)
        ):
            raise ValueError(
                f"gallery index {path}: its {self.index_type} index was built from other vectors "
                f"({faiss_index.ntotal} x {faiss_index.d}, recorded {record.get('ntotal')}; this file holds "
                f"{n} x {d}) - a foreign or stale approximate index; delete the file and rebuild it"
            )
        ann.set_search_params(faiss_index, self.index_type, self.ann_params)
        self._ann, self._ann_record = faiss_index, dict(record)

    def stale_reason(self, checkpoint_hash=None, paths=None, index_type=None):
        """Why this index cannot serve the given checkpoint / image list / index type (None
        if it can)."""
        if checkpoint_hash is not None and checkpoint_hash != self.checkpoint_hash:
            return f"built from checkpoint {self.checkpoint_hash[:12] or '?'}, not {checkpoint_hash[:12]}"
        if paths is not None:
            unreadable = set(self.meta.get(UNREADABLE_KEY) or [])
            if hash_paths([p for p in paths if p not in unreadable]) != self.image_list_hash:
                return "built from a different image list"
        if index_type is not None and index_type != self.index_type:
            return f"built as a {self.index_type!r} index, not {index_type!r}"
        return None

    # ---- search
    def _subset(self, super_id):
        """[row indices, float32 embeddings, faiss flat index, float16 copy] of one
        category (all of them for None), cached; the last two are made when first needed."""
        if super_id not in self._subsets:
            if super_id is None:
                rows = np.arange(len(self))
                emb = self.embeddings
            else:
                rows = np.flatnonzero(self.super_ids == int(super_id))
                emb = np.ascontiguousarray(self.embeddings[rows])
            self._subsets[super_id] = [rows, emb, None, None]
        return self._subsets[super_id]

    def _use_faiss(self):
        # "auto" means numpy / the float16 kernel (see search); importing faiss for it would
        # only load a second OpenBLAS into the process.
        if self.kernel != "faiss":
            return False
        ann.require_faiss("kernel='faiss'")
        return True

    def search(self, queries, k=10, super_id=None):
        """Top-k gallery images for each query vector.

        ``queries``: [D] or [Q, D] (normalised here). ``super_id``: search one category only.
        Returns ``(scores float32 [Q, k], indices int64 [Q, k])`` into this index (padded with
        -inf / -1 when the gallery holds fewer than k images); scores are float32 inner
        products, ties broken by the lower index.

        Exact search (``index_type="exact"``, and every category-filtered search: a category
        is searched exhaustively, its vectors being a fraction of the gallery): with
        ``kernel="auto"`` and up to 32 queries, a float16 copy of the gallery is scanned by
        `fastscan` (half the bytes of float32; ~0.75x faiss IndexFlatIP on one thread) for
        2k + 16 candidates, re-ranked in float32. The result is today's float32 ranking
        exactly unless more than 2k + 16 items score >= (k-th best - fastscan.ORDER_MARGIN);
        even then, any two items whose float32 scores differ by more than ORDER_MARGIN
        (1.1e-3) keep their order. More queries, or ``kernel="numpy"``: one float32 matrix
        product. ``kernel="faiss"``: faiss IndexFlatIP, faiss's tie order.

        Approximate search (``index_type`` "ivf" / "hnsw", no category): the faiss index
        proposes 2k + 16 candidates, re-ranked in float32 with the same tie rule; at
        exhaustive settings (`ann.exhaustive_params`) it equals exact search.
        """
        q = knn.l2_normalize(np.atleast_2d(np.asarray(queries, dtype=np.float32)))
        if q.shape[1] != self.embeddings.shape[1]:
            raise ValueError(f"query dimension {q.shape[1]} != gallery dimension {self.embeddings.shape[1]}")
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        entry = self._subset(super_id)
        rows, emb = entry[0], entry[1]
        kk = min(k, len(rows))
        if self.index_type != "exact" and super_id is None:
            self.build_ann()
            _, cand = ann.search(self._ann, q, num_candidates(kk, len(rows)))
            scores, idx = rerank(q, emb, cand, kk)
        elif self._use_faiss():
            import faiss

            if entry[2] is None:
                entry[2] = faiss.IndexFlatIP(emb.shape[1])
                entry[2].add(emb)
            scores, idx = entry[2].search(q, kk)
            scores = scores.astype(np.float32)
        elif self.kernel == "auto" and len(q) <= 32 and len(rows) and fastscan.available():
            if entry[3] is None:
                entry[3] = emb.astype(np.float16)
            nc = num_candidates(kk, len(rows))
            cand = np.stack([fastscan.topk_f16(entry[3], qi, nc)[1] for qi in q])
            scores, idx = rerank(q, emb, cand, kk)
        else:
            with knn.SingleThreadBLAS(len(q) <= 32):
                block = q @ emb.T
            scores, idx = knn.topk_dense(block, kk)
        out_s = np.full((len(q), k), -np.inf, dtype=np.float32)
        out_i = np.full((len(q), k), -1, dtype=np.int64)
        found = idx >= 0
        out_s[:, : idx.shape[1]] = np.where(found, scores, -np.inf)
        out_i[:, : idx.shape[1]] = np.where(found, rows[np.maximum(idx, 0)], -1)
        return out_s, out_i


def load_fresh_index(path, checkpoint_hash, paths, kernel="auto", index_type=None):
    """``(index, None)`` when ``path`` holds a GalleryIndex that loads and was built from
    ``checkpoint_hash`` over exactly ``paths`` (and as ``index_type``, when given); else
    ``(None, why)``, ``why`` a phrase for the log ("missing", the load error, or "stale
    (...)"). An approximate index without faiss installed raises the ImportError."""
    path = Path(path)
    if not path.exists():
        return None, "missing"
    try:
        index = GalleryIndex.load(path, kernel=kernel)
    except ValueError as e:  # damaged / other format / foreign approximate index: rebuild
        return None, str(e)
    reason = index.stale_reason(checkpoint_hash, paths, index_type)
    return (index, None) if reason is None else (None, f"stale ({reason})")


UNREADABLE_KEY = "unreadable"  # meta: the dataset's images left out because they did not decode


class GalleryImages:
    """Map-style dataset over image files: ``(transformed image, i)``, or ``(zeros, -1)`` for
    a file that does not decode, so one bad photo does not stop the loader (its row is
    dropped afterwards)."""

    def __init__(self, paths, transform, image_size):
        import preprocessing  # here: scanning and planning need no torchvision

        self.paths = [str(p) for p in paths]
        self.transform = transform
        self.load_size = preprocessing.draft_size(transform)
        self.shape = (3, int(image_size), int(image_size))

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        import torch

        from dataio import photos

        try:
            return self.transform(photos.load_image(self.paths[i], self.load_size)), i
        except (*photos.IMAGE_ERRORS, FileNotFoundError):  # corrupt, vanished, unreadable
            return torch.zeros(self.shape), -1


def build_gallery_index(
    model,
    dataset,
    batch_size=64,
    workers=None,
    device="cpu",
    amp=None,
    checkpoint_hash="",
    meta=None,
    progress=True,
    index_type="exact",
    ann_params=None,
    skip_unreadable=False,
) -> GalleryIndex:
    """Embed every image of ``dataset`` (an SOPDataset with an eval transform) into a
    `GalleryIndex`; paths are stored relative to the data root (``dataset.rel_paths``).
    ``workers=None``: loaders.loader_settings for the device and this machine's CPUs.
    ``index_type`` "ivf" / "hnsw" also builds that approximate index (progress bars).
    ``skip_unreadable``: an image that does not decode is left out (listed in
    ``meta["unreadable"]``, logged) instead of stopping the build (a served gallery; an
    evaluation keeps the error: its metrics need every image)."""
    ann.check_index_type(index_type)
    if index_type != "exact":
        ann.require_faiss(f"index type {index_type!r}")  # before minutes of embedding
    t0 = time.perf_counter()
    embeddings, rows = _embed_dataset(model, dataset, batch_size, workers, device, amp, progress, skip_unreadable)
    good, unreadable = _readable_rows(rows, dataset.rel_paths)
    info = {
        "num_images": int(good.sum()),
        "extract_s": round(time.perf_counter() - t0, 3),
        UNREADABLE_KEY: unreadable,
        # the model's same-product threshold (calibration.match_record), served with the index
        "match": (getattr(model, "checkpoint_info", None) or {}).get("match"),
    }
    info.update(meta or {})
    keep = np.flatnonzero(good)
    index = GalleryIndex(
        embeddings=np.ascontiguousarray(embeddings[good]),
        paths=[dataset.rel_paths[i] for i in keep],
        class_ids=np.asarray(dataset.class_ids, dtype=np.int64)[keep],
        super_ids=np.asarray(dataset.super_ids, dtype=np.int64)[keep],
        categories=dataset.categories,
        product_ids=[dataset.product_ids[i] for i in keep],
        checkpoint_hash=checkpoint_hash,
        meta=info,
        index_type=index_type,
        ann_params=ann_params,
    )
    index.build_ann(progress=progress)
    return index


def _embed_dataset(model, dataset, batch_size, workers, device, amp, progress, skip_unreadable):
    """``(embeddings, rows)``: every image of ``dataset`` embedded in order, ``rows`` the
    dataset row of each embedding (-1 for an unreadable image with ``skip_unreadable``; without
    it, an image that does not decode raises). RuntimeError when the loader's labels are not
    the dataset's class ids in index order."""
    import torch

    import loaders  # here, not at import time: the demo's search path needs no torchvision

    images = GalleryImages(dataset.paths, dataset.transform, int(model.model_args["image_size"]))
    loader = torch.utils.data.DataLoader(
        images if skip_unreadable else dataset,
        batch_size=batch_size,
        shuffle=False,
        # one pass: persistent workers would only outlive it
        **loaders.loader_settings(device, workers=workers, persistent_workers=False),
    )
    embeddings, second = extraction.extract_embeddings(
        model, loader, device=device, amp=amp, progress=progress, desc="gallery"
    )
    if skip_unreadable:
        return embeddings, second  # the dataset's row, -1 for an unreadable image
    if np.array_equal(second, np.asarray(dataset.class_ids, dtype=np.int64)):
        return embeddings, np.arange(len(second))
    raise RuntimeError(
        "the loader's labels do not match dataset.class_ids: the dataset must return (image, class_id) in index order"
    )


def _readable_rows(rows, rel_paths):
    """``(good, unreadable)``: the mask of the embeddings of readable images and the paths of
    the unreadable ones (logged). RuntimeError when ``rows`` are out of order."""
    good = rows >= 0
    if not np.array_equal(rows[good], np.flatnonzero(good)):
        raise RuntimeError("the loader returned the images out of order")
    unreadable = [rel_paths[i] for i in np.flatnonzero(~good)]
    if unreadable:
        logger.warning(
            "%d gallery images could not be read and are left out of the index (first: %s); "
            "replace them and pass --rebuild_index",
            len(unreadable),
            ", ".join(unreadable[:3]),
        )
    return good, unreadable
