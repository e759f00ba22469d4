"""Live gallery updates: rescan a ``--gallery`` folder while the demo serves it.

``app_stanford.py --gallery DIR --watch [SECONDS]`` starts a `GalleryWatcher`: a daemon thread
that every SECONDS calls a ``refresh()`` and, when it returns a new index, hands it to an
``apply(index)`` (the demo's: `search.engine.SearchEngine.replace_index`, which swaps the served
index between two queries, so a query sees the old gallery or the new one, never a mix).

``refresh()`` is the one thing a storage backend provides: it returns a new searchable index
when the gallery changed, or None. `folder_refresher` is the one for a file index: a scan of
the folder (one ``stat`` per file, `search.gallery.scan_gallery`) compared with the served
index (`search.gallery.plan_update`); only when files were added, changed or removed does it
call `search.gallery.update_gallery_index`, which embeds just those files, reuses every other
row, saves the index file atomically (a restart then starts from it) and returns the new
index. A database backend plugs in the same way: its ``refresh()`` upserts / deletes the
changed rows and returns the collection's new searchable view (or None).

What a failure does: any exception of ``refresh()`` or ``apply()`` (the folder unmounted or
emptied, a full disk, an embedding error) is logged and counted; the old index keeps serving
and the next tick tries again. A photo that is unreadable when scanned (half-written by a
copy, truncated, not an image) is skipped and remembered with its size and mtime
(`update_gallery_index`): once the copy finishes its size or mtime changes and the next scan
embeds it; while it stays the same broken file it is not retried.

Delay: a photo copied into the folder is searchable after at most SECONDS (the next tick) plus
the time to embed the new photos and rebuild the search structure (exact index: a float16 copy,
milliseconds; ivf / hnsw: the whole faiss index again, seconds to minutes at a million).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
import threading
import time

from search import gallery
from search import loading as search_loading

logger = logging.getLogger("app_stanford")

DEFAULT_INTERVAL = 10.0  # seconds between two scans of --watch without a value
# niceness of the watcher thread (Linux: per thread) and of the OpenMP threads its forwards
# start (they inherit it): queries keep the CPU while a batch of new photos is embedded
WATCH_NICENESS = 10


class GalleryWatcher:
    """Every ``interval`` seconds on a daemon thread: ``index = refresh()``; when it is not
    None, ``apply(index)``. Exceptions of either are logged and counted (``errors``,
    ``last_error``), never raised: the thread keeps running and the next tick retries.

    ``check()`` runs one tick in the caller's thread (tests, a manual refresh). Counters:
    ``checks`` (ticks run), ``updates`` (indexes applied), ``errors``; ``last_update`` (time.time()
    of the last applied index, None before). `stop` ends the thread after its current tick.
    """

    def __init__(self, refresh, apply, interval=DEFAULT_INTERVAL, niceness=WATCH_NICENESS, name="gallery-watch"):
        if not interval > 0:
            raise ValueError(f"the watch interval must be > 0 seconds, got {interval}")
        self.refresh, self.apply = refresh, apply
        self.interval = float(interval)
        self.niceness = niceness
        self.name = name
        self.checks = self.updates = self.errors = 0
        self.last_error = None
        self.last_update = None
        self._stop = threading.Event()
        self._tick = threading.Lock()  # one tick at a time (thread and check() alike)
        self._thread = None

    def check(self) -> bool:
        """One tick: True when a new index was applied."""
        with self._tick:
            self.checks += 1
            try:
                index = self.refresh()
                if index is None:
                    return False
                self.apply(index)
            except Exception as e:  # keep serving the old index; the next tick retries
                self.errors += 1
                self.last_error = f"{type(e).__name__}: {e}"
                logger.warning(
                    "Gallery rescan failed (%s); still serving the previous index, retrying in %.0f s",
                    self.last_error,
                    self.interval,
                    exc_info=True,
                )
                return False
            self.updates += 1
            self.last_update = time.time()
            return True

    def start(self) -> GalleryWatcher:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout=None) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _run(self):
        if self.niceness:
            try:  # Linux: PRIO_PROCESS with a thread id renices that thread only
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), self.niceness)
            except (AttributeError, OSError):
                pass
        while not self._stop.wait(self.interval):
            self.check()


def folder_refresher(
    loaded: search_loading.SearchModel, folder, current, index_path=None, index_type="exact", batch_size=64, workers=0
):
    """``refresh()`` for a folder gallery with a file index (see the module docstring).

    ``current()``: the index being served (compared with the folder); ``index_path``: the
    index file (default `search.loading.default_gallery_index_path`, as `folder_index`).

    The new photos are embedded in the watcher's thread with the served model itself, not on
    the engine's worker thread: a batch there would hold every query behind it for its whole
    forward pass, while beside it (a read-only eval-mode forward is safe to run from two
    threads, for torch and onnxruntime alike) a query only shares the CPU, and the watcher
    thread is reniced so it yields. A second model copy would cost its memory for nothing.
    ``workers=0``: files are decoded in this thread too; no loader process forked from a
    threaded server at each tick.
    """
    folder = Path(folder).expanduser().resolve()
    index_path = (
        Path(index_path)
        if index_path
        else search_loading.default_gallery_index_path(folder, loaded.checkpoint, loaded.name)
    )
    device = next(loaded.model.parameters()).device

    def refresh():
        scan = gallery.scan_gallery(folder, exclude=[index_path])
        plan = gallery.plan_update(scan.files, current())
        if not (plan.embed or plan.removed):
            return None
        index, report = gallery.update_gallery_index(
            loaded.model,
            folder,
            index_path,
            loaded.key,
            batch_size=batch_size,
            workers=workers,
            device=device,
            progress=False,
            index_type=index_type,
            # folder_index's meta: the same folder gives the same index file either way
            meta={
                "model_args": dict(loaded.model.model_args),
                "checkpoint": str(loaded.checkpoint) if loaded.checkpoint else None,
            },
        )
        _log_rescan(folder, report, len(index))
        # also when nothing was written: the file then holds what the folder holds, and the
        # served index (whose plan differed) has to catch up with it, e.g. after a failed apply
        return index

    return refresh


def _log_rescan(folder, report: dict, size: int) -> None:
    """Log what a rescan of ``folder`` changed (`search.gallery.update_gallery_index`'s
    ``report``) and the index's ``size`` after it."""
    logger.info(
        "Gallery %s rescanned: %d added, %d changed, %d removed, %d unreadable; "
        "%d images embedded in %.1f s; now %d images",
        folder,
        report["added"],
        report["changed"],
        report["removed"],
        report["unreadable"],
        report["embedded"],
        report["seconds"],
        size,
    )


def database_refresher(store, model, batch_size=64, workers=0):
    """``refresh()`` for a folder gallery kept in a database (``--index_backend milvus``:
    `search.vectordb.MilvusGallery`): `MilvusGallery.update` deletes the rows of removed
    photos and upserts the added / changed ones (embedded as in `folder_refresher`, in this
    thread); returns ``store`` itself when its rows differ from those served (its new rows are
    made the searched ones between two queries by `search.engine.SearchEngine.replace_index`),
    else None. A database that fails mid-update (DatabaseError, naming it) fails the tick; the
    store reconnects at its next call, and the next tick that gets through serves what the
    failed one wrote, though there is nothing left to embed."""
    device = next(model.parameters()).device

    def refresh():
        report = store.update(model, batch_size=batch_size, workers=workers, device=device, progress=False)
        if not (report["added"] or report["changed"] or report["removed"] or store.differs()):
            return None
        logger.info(
            "Gallery %s rescanned (database %s): %d added, %d changed, %d removed, %d unreadable",
            store.root,
            store.uri,
            report["added"],
            report["changed"],
            report["removed"],
            report["unreadable"],
        )
        return store

    return refresh
