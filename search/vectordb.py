"""A gallery in a vector database: Milvus, embedded (Milvus Lite, a local ``.db``) or a server.

``--index_backend milvus`` keeps a catalogue's rows in a Milvus collection instead of a
``.npz`` file (`search.index`): Milvus Lite by default (``--db_uri gallery.db``: a local
database, no server; pymilvus starts it in-process), or the same code pointed at Milvus
Standalone / Distributed with ``--db_uri http://HOST:19530``.

One collection per model and catalogue, its rows one photo each (`search.collection`: its
name, schema, index and the properties checked whenever it is opened).

`MilvusGallery` offers what `search.engine.SearchEngine` reads from a
`search.index.GalleryIndex` (``search``, ``paths``, ``product_ids``, ``categories``,
``super_ids``, ``embeddings[i]``, ``meta``, ``len``) from a metadata mirror of the rows (no
vectors: those stay in the database). Its rows are in path order, as a folder gallery's file
index, and results are ranked the same way: Milvus proposes 2k + 16 candidates, which are
re-ranked in float32 with the file index's rule (`search.index.rerank`: higher score first,
ties by the lower row, i.e. the smaller path); so with an exact (FLAT) index both backends
return the same top-k. A category filter is the database's own boolean expression, the name
quoted by `quote` (any folder name is a literal, never expression syntax).

`MilvusGallery.update` indexes the folder: scan, compare with the rows' size / mtime, delete
the rows of removed files, embed the rest in checkpoints of `search.gallery.CHECKPOINT_EVERY`
images, each upserted as soon as it is embedded. A run killed midway, run again, embeds only
the photos of its last unfinished checkpoint; two processes indexing one folder into one server
cannot double a row (primary key), and a second process opening a Milvus Lite database that
another holds is refused by name (Milvus Lite admits one process per database).

The rows are read back in pages over ranges of the key (`search.row_view`), with "Strong"
consistency (every write acknowledged before the read is seen); searches ask for "Session" consistency
(`SEARCH_CONSISTENCY`). Every database call is bounded by ``--db_timeout`` seconds (`call_timeout`)
and fails with a DatabaseError naming the URI; the gallery then
reconnects and loads the collection again at its next call, so a database that comes back
(a restarted server's collections come back released) is searched and updated again without
restarting the demo. A search reads the primary key as the hit's id (what Milvus 2.3 to 2.6
servers and Milvus Lite all answer).
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
import threading
import time
import types

import numpy as np

import knn
from search import ann, gallery
from search.collection import CONSISTENCY, collection_name, open_collection, wanted_properties
from search.index import num_candidates, rerank
from search.milvus import (
    DEFAULT_TIMEOUT_S,
    SERVER_HINT,
    DatabaseError,
    call_timeout,
    connect,
    in_filter,
    is_milvus_error,
    is_released,
    keep_faiss_search_params,
    message,
    quote,
    set_call_timeout,
)
from search.row_view import RowView, count_rows, read_view

logger = logging.getLogger("gallery")

BACKENDS = ("file", "milvus")
# what searches ask for: this process's writes seen at once, without Strong's wait for the server's
# next time tick (Milvus Standalone 2.3.5, 2,000 rows: 201 ms a search "Strong", 1.9 ms "Session");
# another process's rows are searched once a view has read them (that Strong read waits for them)
SEARCH_CONSISTENCY = "Session"
MAX_FILTERED_EF = 4096  # the largest beam a filtered hnsw search is given (Milvus allows up to 32768)


def default_db_path(checkpoint=None, model_name=None) -> Path:
    """The default Milvus Lite database: ``gallery.db`` beside the checkpoint, or under
    ``runs/<model_name>/`` for a zero-shot model (as the default file indexes)."""
    return (Path(checkpoint).parent if checkpoint else Path("runs") / str(model_name)) / "gallery.db"


def add_backend_args(parser) -> None:
    """``--index_backend``, ``--db_uri``, ``--collection``: the flags of every script that
    writes or serves a gallery (app_stanford.py, shards.py)."""
    parser.add_argument(
        "--index_backend",
        default="file",
        choices=BACKENDS,
        help="where the gallery lives: file (a .npz index beside the checkpoint) or milvus "
        "(a vector database: Milvus Lite by default, or a server with --db_uri)",
    )
    parser.add_argument(
        "--db_uri",
        default=None,
        help="with --index_backend milvus: a Milvus Lite database path (default gallery.db "
        "beside the checkpoint, runs/<zero-shot model>/ with --zero_shot) or a "
        "server, http://HOST:19530 (Milvus Standalone / Distributed)",
    )
    parser.add_argument(
        "--collection",
        default=None,
        help="with --index_backend milvus: the collection; default one per model and "
        "catalogue, gallery_<model>_<folder>",
    )
    parser.add_argument(
        "--db_timeout",
        default=DEFAULT_TIMEOUT_S,
        type=float,
        help="with --index_backend milvus: seconds any one database call may take before it "
        "fails naming the database (the gallery reconnects at its next call)",
    )


def apply_backend_args(args) -> None:
    """Make ``--db_timeout`` the timeout of this process's database calls (those that do not
    pass their own). ValueError for a timeout that is not > 0."""
    set_call_timeout(getattr(args, "db_timeout", DEFAULT_TIMEOUT_S))


def folder_row(file, vector) -> dict:
    """The collection row of a folder's photo: ``file`` is its ``(path, size, mtime_ns)``."""
    return {
        "path": file[0],
        "vector": vector.tolist(),
        "product_id": gallery.product_of(file[0]),
        "category": gallery.category_of(file[0]),
        "size": int(file[1]),
        "mtime_ns": int(file[2]),
    }


class _RowVectors:
    """``gallery.embeddings[i]``: row i's vector, fetched from the database."""

    def __init__(self, owner):
        self.owner = owner

    def __len__(self):
        return len(self.owner)

    def __getitem__(self, i):
        return self.owner.vectors([self.owner.paths[int(i)]])[0]


class MilvusGallery:
    """One catalogue's gallery in a Milvus collection (module docstring); open it with `open`.

    Thread use: `update` may run on one thread (a folder watcher) while `search` runs on
    another; the new rows become visible to searches at the next `search` call after the
    update (the metadata mirror is swapped there, so one search never mixes two states).

    Failures: every database call is bounded by ``timeout`` seconds and fails with a
    DatabaseError naming the URI; the next call then first reconnects (a fresh client) and
    loads the collection again (a restarted server's collections come back released), so
    searches and `update` resume by themselves once the database is back.
    """

    def __init__(self, client, uri, name, root, properties, index_type="exact", ann_params=None, timeout=None):
        self.client, self.uri, self.name, self.root = client, str(uri), name, Path(root)
        self.timeout = call_timeout() if timeout is None else float(timeout)
        self._stale = False  # the last call failed: reconnect and load before the next one
        self._reconnecting = threading.Lock()
        self.properties = dict(properties)
        self.index_type = index_type
        self.ann_params = dict(ann_params or {})
        self.backend = "milvus"
        self.embeddings = _RowVectors(self)
        self._unreadable = {}  # rel -> (size, mtime_ns): unreadable last time, not retried until changed
        self._pending = None
        self.auto_adopt = True  # search() adopts rows read by update / refresh (False: only adopt() does)
        self._view = self._load_view()
        self.meta = {
            "gallery": {"root": str(self.root), "model_key": self.properties.get("model_key")},
            "database": {"uri": self.uri, "collection": name},
            "match": json.loads(self.properties["match"]) if self.properties.get("match") else None,
        }

    # ---- opening
    @classmethod
    def open(
        cls,
        uri,
        root,
        model_key,
        model_args,
        collection=None,
        index_type="exact",
        ann_params=None,
        rebuild=False,
        expected_size=0,
        timeout=None,
        match=None,
    ) -> MilvusGallery:
        """The collection of ``root`` for this model in the database at ``uri`` (created when
        missing; dropped and recreated with ``rebuild``). DatabaseError when the database cannot
        be reached or the collection was made by another model, for another folder, with other
        dimensions or by other code. ``expected_size``: the catalogue's size, for the IVF / HNSW
        parameters of a new collection (`search.ann.default_params`); ``timeout``: seconds per
        database call (default `call_timeout`); ``match``: the model's same-product threshold
        record, stored with a new collection (``meta["match"]``)."""
        ann.check_index_type(index_type)
        timeout = call_timeout() if timeout is None else float(timeout)
        client = connect(uri, timeout=timeout)
        root = Path(root).expanduser().resolve()
        name = collection or collection_name(model_key, model_args, root)
        wanted = wanted_properties(model_key, model_args, root, match)
        props = open_collection(client, uri, name, wanted, index_type, ann_params, expected_size, rebuild, timeout)
        params = {**json.loads(props.get("ann_params") or "{}"), **(ann_params or {})}
        return cls(client, uri, name, root, props, index_type=index_type, ann_params=params, timeout=timeout)

    # ---- calls: bounded, and recovering once the database is back
    def _call(self, method: str, *args, **kwargs):
        """``client.<method>(*args, **kwargs)`` within ``timeout`` seconds. After a failed call
        the next one first reconnects and loads the collection (`_recover`); a call that finds
        the collection released (a restarted server) loads it and runs once more."""
        if self._stale:
            self._recover()
        for attempt in (1, 2):
            try:
                return getattr(self.client, method)(*args, timeout=self.timeout, **kwargs)
            except Exception as e:
                if not is_milvus_error(e):
                    raise
                error = e
                if attempt == 2 or not is_released(e):
                    break
                self._recover()
        self._stale = True
        raise DatabaseError(
            f"Milvus database {self.uri}, collection {self.name}: {method} failed within {self.timeout:g} s "
            f"({message(error)}). Check that the database runs ({SERVER_HINT}); the gallery reconnects at "
            "its next call, and --db_timeout sets the wait"
        ) from error

    def _recover(self) -> None:
        """A fresh client, and the collection loaded (a restarted server's come back released).
        DatabaseError (naming the URI) while the database still does not answer."""
        with self._reconnecting:
            client = connect(self.uri, timeout=self.timeout)
            try:
                client.load_collection(self.name, timeout=self.timeout)
            except Exception as e:
                if not is_milvus_error(e):
                    raise
                raise DatabaseError(
                    f"Milvus database {self.uri} answers again but collection {self.name} "
                    f"cannot be loaded within {self.timeout:g} s ({message(e)})"
                ) from e
            # the old client is not closed: another thread may be in a call on it (it fails on its own)
            self.client, self._stale = client, False
            logger.info("Reconnected to %s, collection %s loaded", self.uri, self.name)

    # ---- the rows (metadata mirror)
    def _load_view(self) -> RowView:
        return read_view(self._call, self.name)

    def refresh(self) -> None:
        """Re-read the rows (e.g. written by another process); seen by the next search."""
        self._pending = self._load_view()

    def adopt(self) -> RowView:
        """Make the rows read by the last `update` / `refresh` those searched (done by `search`
        itself; call it directly before serving, or on the thread that searches)."""
        if self._pending is not None:
            self._view, self._pending = self._pending, None
        return self._view

    def differs(self) -> bool:
        """True when rows read by `update` / `refresh` wait to be searched (`adopt`) and are not
        those searched now."""
        pending, view = self._pending, self._view
        return pending is not None and (
            pending.paths != view.paths or not np.array_equal(pending.file_stats, view.file_stats)
        )

    def __len__(self):
        return len(self._view.paths)

    paths = property(lambda self: self._view.paths)
    product_ids = property(lambda self: self._view.product_ids)
    categories = property(lambda self: self._view.categories)
    super_ids = property(lambda self: self._view.super_ids)
    file_stats = property(lambda self: self._view.file_stats)

    def vectors(self, paths) -> np.ndarray:
        """float32 [len(paths), D]: the stored vectors of ``paths`` (KeyError for a missing one)."""
        paths = list(paths)
        got = {
            r["path"]: r["vector"]
            for r in self._call(
                "query",
                self.name,
                filter=in_filter("path", paths),
                output_fields=["path", "vector"],
                limit=len(paths),
                consistency_level=CONSISTENCY,
            )
        }
        return np.array([got[p] for p in paths], dtype=np.float32).reshape(len(paths), -1)

    def count(self) -> int:
        """Rows in the collection, as the database counts them."""
        return count_rows(self._call, self.name, "")

    # ---- search
    def _search_params(self, limit: int, kept: float = 1.0) -> dict:
        """Milvus search parameters for ``limit`` candidates when a filter keeps the fraction
        ``kept`` of the rows. The graph walk (hnsw) or the scanned cells (ivf) must then reach
        about 1 / kept times as many rows to meet as many that pass the filter, so ef / nprobe
        grow by that factor (ef at most `MAX_FILTERED_EF`, nprobe at most nlist)."""
        grow = 1.0 / max(kept, 1e-9)
        if self.index_type == "ivf":
            nprobe = int(self.ann_params.get("nprobe", 8))
            nlist = int(self.ann_params.get("nlist", nprobe))
            return {"metric_type": "IP", "params": {"nprobe": min(max(nlist, nprobe), math.ceil(nprobe * grow))}}
        if self.index_type == "hnsw":
            ef = int(self.ann_params.get("efSearch", 128))
            ef = ef if kept >= 1.0 else min(max(ef, MAX_FILTERED_EF), math.ceil(ef * grow))
            return {"metric_type": "IP", "params": {"ef": max(ef, limit)}}
        return {"metric_type": "IP", "params": {}}

    def search(self, queries, k=10, super_id=None):
        """Top-k rows for each query: ``(scores float32 [Q, k], rows int64 [Q, k])``, padded with
        -inf / -1, ranked as `search.index.GalleryIndex.search` (module docstring);
        ``super_id``: one category only (the database's filter)."""
        # a server (search.engine) adopts new rows itself, between two queries: a query then reads
        # one view from its category ids to its rows, whatever an update does meanwhile
        view = self.adopt() if self.auto_adopt else self._view
        q = knn.l2_normalize(np.atleast_2d(np.asarray(queries, dtype=np.float32)))
        dim = int(self.properties.get("embedding_size", q.shape[1]))
        if q.shape[1] != dim:
            raise ValueError(f"query dimension {q.shape[1]} != gallery dimension {dim}")
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        n = len(view.paths) if super_id is None else view.counts.get(int(super_id), 0)
        out_s = np.full((len(q), k), -np.inf, dtype=np.float32)
        out_i = np.full((len(q), k), -1, dtype=np.int64)
        if n == 0:
            return out_s, out_i
        kk, limit = min(k, n), num_candidates(min(k, n), n)
        expr = "" if super_id is None else f"category == {quote(view.categories[int(super_id) - 1])}"
        keep_faiss_search_params()
        hits = self._call(
            "search",
            self.name,
            data=q.tolist(),
            limit=limit,
            filter=expr,
            anns_field="vector",
            output_fields=["vector"],
            consistency_level=SEARCH_CONSISTENCY,
            search_params=self._search_params(limit, n / max(len(view.paths), 1)),
        )
        found = {}  # row -> vector, over every query's candidates
        cand = np.full((len(q), limit), -1, dtype=np.int64)
        for qi, row_hits in enumerate(hits):
            for j, hit in enumerate(list(row_hits)[:limit]):
                row = view.row_of.get(hit.id)  # the primary key: the hit id on every Milvus (2.3 names no field)
                if row is not None:  # else written after this view was taken
                    found[row] = hit["entity"]["vector"]
                    cand[qi, j] = row
        if not found:
            return out_s, out_i
        rows = np.array(sorted(found), dtype=np.int64)  # local positions keep the row order
        emb = np.array([found[r] for r in rows.tolist()], dtype=np.float32)
        local = np.where(cand >= 0, np.searchsorted(rows, np.maximum(cand, 0)), -1)
        scores, idx = rerank(q, emb, local, kk)
        ok = idx >= 0
        out_s[:, :kk] = np.where(ok, scores, -np.inf)
        out_i[:, :kk] = np.where(ok, rows[np.maximum(idx, 0)], -1)
        return out_s, out_i

    # ---- indexing
    def update(
        self,
        model,
        batch_size=64,
        workers=None,
        device="cpu",
        progress=True,
        force=False,
        checkpoint_every=gallery.CHECKPOINT_EVERY,
    ) -> dict:
        """Bring the collection up to date with the folder (module docstring); safe to call
        again and again, e.g. by a folder watcher while searches run. Returns a report with
        `search.gallery.update_gallery_index`'s counts. ValueError when no photo is readable."""
        t0 = time.perf_counter()
        scan = gallery.scan_gallery(self.root)
        now = self._load_view()
        plan = gallery.plan_update(scan.files, None if force else self._previous(now))
        present = set(scan.paths)
        gone = [p for p in now.paths if p not in present]
        self._delete(gone)
        bad = list(plan.known_bad)
        t_embed = time.perf_counter()
        embedded = self._embed_and_upsert(
            model,
            scan.root,
            plan.embed,
            bad,
            checkpoint_every=checkpoint_every,
            batch_size=batch_size,
            workers=workers,
            device=device,
            progress=progress,
        )
        embed_seconds = time.perf_counter() - t_embed
        if embedded or gone:
            self._seal()
        self._unreadable = {b[0]: tuple(b[1:]) for b in bad}
        self._pending = self._filled_view(scan, bad)
        seconds = time.perf_counter() - t0
        return {
            "added": plan.added,
            "changed": plan.changed,
            "removed": len(gone),
            "unchanged": len(plan.reuse),
            "skipped_non_images": len(scan.skipped),
            "unreadable": len(bad),
            "embedded": embedded,
            "resumed": 0,
            "seconds": round(seconds, 3),
            "embed_seconds": round(embed_seconds, 3),
            "images_per_s": round(embedded / seconds, 2) if embedded else 0.0,
            "rebuild": "force=True" if force else None,
            "written": bool(embedded or gone),
            "skipped": list(scan.skipped),
            "unreadable_paths": sorted(b[0] for b in bad),
        }

    def _previous(self, view: RowView) -> types.SimpleNamespace:
        """The rows of ``view`` and the photos unreadable last time, as
        `search.gallery.plan_update` reads a previous index."""
        return types.SimpleNamespace(
            paths=view.paths,
            file_stats=view.file_stats,
            meta={gallery.GALLERY_META_KEY: {"unreadable": [[p, *s] for p, s in self._unreadable.items()]}},
        )

    def _embed_and_upsert(self, model, root, files, bad: list, checkpoint_every, **embed_args) -> int:
        """Embed ``files`` (``(path, size, mtime_ns)``) under ``root`` in chunks of
        ``checkpoint_every``, upserting each chunk's rows as soon as it is embedded; the photos
        that could not be read are appended to ``bad``. Returns the count of rows upserted."""
        embedded = [0]

        def upsert(good, vectors, failed):
            rows = [folder_row(f, v) for f, v in zip(good, vectors)]
            if rows:
                self._call("upsert", self.name, rows)
            embedded[0] += len(rows)
            bad.extend(failed)

        gallery.embed_in_chunks(model, root, files, upsert, chunk_size=checkpoint_every, **embed_args)
        return embedded[0]

    def _filled_view(self, scan, bad) -> RowView:
        """The rows read back after an update of ``scan``'s folder; ValueError when none is left
        (no photo of the folder could be read: ``bad``)."""
        fresh = self._load_view()
        if not fresh.paths:
            raise ValueError(
                f"gallery folder {scan.root}: none of its {len(scan.files)} images could be "
                f"read (e.g. {', '.join(b[0] for b in sorted(bad)[:3])}); collection {self.name} "
                "is empty. Check that they are real, complete image files"
            )
        return fresh

    def _seal(self) -> None:
        """Flush the writes of an update: Milvus searches rows still in growing segments by brute
        force and without the index (measured on Milvus Lite at 100k: 2.7 s a query before, about
        0.2 s after), so a finished update seals them and lets the index be built."""
        self._call("flush", self.name)

    def _delete(self, paths) -> None:
        for start in range(0, len(paths), 1000):
            self._call("delete", self.name, filter=in_filter("path", paths[start : start + 1000]))

    def publish(self, index, chunk=4096) -> int:
        """Upsert every row of a `search.index.GalleryIndex` (``shards.py``, a dataset split),
        with its product ids and categories, and delete the rows it does not hold; returns the
        row count. Sizes / mtimes are the index's ``file_stats`` (0 when it has none)."""
        stats = index.file_stats if index.file_stats is not None else np.zeros((len(index), 2), np.int64)
        keep = set(index.paths)
        self._delete([p for p in self._load_view().paths if p not in keep])
        for start in range(0, len(index), chunk):
            stop = min(len(index), start + chunk)
            self._call(
                "upsert",
                self.name,
                [
                    {
                        "path": index.paths[i],
                        "vector": np.asarray(index.embeddings[i], np.float32).tolist(),
                        "product_id": index.product_ids[i],
                        "category": index.categories[int(index.super_ids[i]) - 1],
                        "size": int(stats[i][0]),
                        "mtime_ns": int(stats[i][1]),
                    }
                    for i in range(start, stop)
                ],
            )
        self._seal()
        self._pending = self._load_view()
        return len(self._pending.paths)


def folder_gallery(
    model,
    model_key,
    folder,
    uri,
    collection=None,
    index_type="exact",
    rebuild=False,
    batch_size=64,
    workers=None,
    device="cpu",
    progress=True,
    checkpoint_every=gallery.CHECKPOINT_EVERY,
):
    """``(MilvusGallery, report)``: the collection of ``folder`` for ``model`` in ``uri``,
    opened (`MilvusGallery.open`) and brought up to date (`MilvusGallery.update`)."""
    scan = gallery.scan_gallery(folder)  # a missing / empty folder fails before the database opens
    store = MilvusGallery.open(
        uri,
        scan.root,
        model_key,
        dict(model.model_args),
        collection=collection,
        index_type=index_type,
        rebuild=rebuild,
        expected_size=len(scan.files),
        match=(getattr(model, "checkpoint_info", None) or {}).get("match"),
    )
    report = store.update(
        model,
        batch_size=batch_size,
        workers=workers,
        device=device,
        progress=progress,
        checkpoint_every=checkpoint_every,
    )
    store.refresh()
    store.adopt()
    return store, report


def split_gallery(
    uri,
    root,
    split,
    model_key,
    model_args,
    rel_paths,
    build,
    collection=None,
    index_type="exact",
    rebuild=False,
    match=None,
) -> MilvusGallery:
    """The collection of a dataset's ``split`` (``rel_paths``, under ``root``): served as it is
    when it holds exactly those images (e.g. published by ``shards.py``), else filled from
    ``build()`` (a `search.index.GalleryIndex` of the split) with `MilvusGallery.publish`.
    ``match``: the model's same-product threshold record, kept with a new collection."""
    root = Path(root).expanduser().resolve()
    store = MilvusGallery.open(
        uri,
        root,
        model_key,
        model_args,
        index_type=index_type,
        rebuild=rebuild,
        collection=collection or collection_name(model_key, model_args, root, split),
        expected_size=len(rel_paths),
        match=match,
    )
    if sorted(store.paths) != sorted(str(p) for p in rel_paths):
        logger.info(
            "Collection %s holds %d of the split's %d images: filling it", store.name, len(store), len(rel_paths)
        )
        store.publish(build())
    store.refresh()
    store.adopt()
    return store
