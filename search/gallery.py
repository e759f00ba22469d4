"""Search any folder: index every image under a directory, no labels needed, and keep the
index up to date incrementally.

A folder gallery is a `search.index.GalleryIndex` whose rows are the folder's images in sorted
order of their relative (posix) paths:

* ``paths``: relative to the folder; ``categories``: the sorted first-level folder names
  (an image directly in the folder: ``TOP_LEVEL``); ``super_ids``: 1-based into them;
* ``product_ids``: `product_of` each path: ``<category>/<product>`` for an image exactly two
  folders down (``<category>/<product>/<image>``, a training tree's layout and its product id),
  "" otherwise (unlabelled: the path is the identifier);
  ``class_ids``: ``arange(n)`` (each image its own item: no metric is computed on it);
* ``checkpoint_hash``: the model key (the checkpoint's sha256, or e.g.
  ``"zero_shot:<backbone>:<weights>:<size>px"``); ``file_stats``: each file's (size, mtime_ns)
  when embedded; ``meta["gallery"]``: the folder, the model key and the unreadable files.

`update_gallery_index` reuses the embedding of every file whose (path, size, mtime_ns) is
unchanged and embeds only the rest, so the same folder gives the same index (same rows, same
vectors) whether it was built in one go or updated many times.

What is indexed (`scan_gallery`): regular files named like an image (`catalogue.is_image_name`:
an image extension, not hidden). Hidden folders (``.git``, ``.thumbnails``) are not entered;
symlinked folders are not followed (no loops, no second copy of a folder); a symlinked file
is indexed only when it resolves inside the folder: nothing outside the gallery gets served.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import os
from pathlib import Path
import shutil
import stat
import time
import zipfile

import numpy as np

from dataio import catalogue, fileio, photos
import extraction
from search import ann
from search.index import GalleryImages, GalleryIndex

logger = logging.getLogger("gallery")

TOP_LEVEL = "(top level)"  # category of an image directly in the gallery folder
GALLERY_META_KEY = "gallery"  # meta entry that makes an index a folder gallery's


# ============ scanning the folder ============


@dataclasses.dataclass
class GalleryScan:
    """What `scan_gallery` found: ``root`` (resolved), ``files`` = sorted
    ``[(rel posix path, size in bytes, mtime_ns)]`` of the images to index, ``skipped`` = rel
    paths left out (non-image and hidden files; hidden and symlinked folders, as "name/";
    symlinks resolving outside root; broken links, devices, fifos)."""

    root: Path
    files: list
    skipped: list

    @property
    def paths(self) -> list:
        return [f[0] for f in self.files]


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def scan_gallery(root, exclude=()) -> GalleryScan:
    """Every image file under ``root`` (recursive), see the module docstring for the rule.

    ``exclude``: paths never listed, not even as skipped (the index file when it lies in the
    folder); nor is ``catalogue.COMPLETE_MARKER`` at the top (a dataset folder made by
    datasets.py). Raises FileNotFoundError / NotADirectoryError naming ``root`` when it is missing /
    not a folder, and ValueError when it holds no image (saying what it holds instead).
    """
    given = Path(root).expanduser()
    if not given.exists():
        raise FileNotFoundError(
            errno.ENOENT, f"gallery folder {given} does not exist: pass --gallery a folder of images", str(given)
        )
    if not given.is_dir():
        raise NotADirectoryError(
            errno.ENOTDIR,
            f"gallery {given} is not a folder: pass --gallery the folder that holds the images",
            str(given),
        )
    root = given.resolve()
    excluded = {Path(p).expanduser().resolve() for p in exclude}
    files, skipped, seen = [], [], 0
    for dirpath, dirnames, filenames in os.walk(root):
        folder = Path(dirpath)
        for name in list(dirnames):
            # os.walk lists symlinked folders as folders; descending into them could loop or
            # index a folder twice (or one outside root), and a hidden folder holds no photos
            if name.startswith(".") or (folder / name).is_symlink():
                dirnames.remove(name)
                skipped.append((folder / name).relative_to(root).as_posix() + "/")
        for name in filenames:
            full = folder / name
            if full in excluded or (folder == root and name == catalogue.COMPLETE_MARKER):
                continue  # the index itself; datasets.py's marker of a finished folder
            seen += 1
            rel = full.relative_to(root).as_posix()
            entry = _image_entry(full, rel, root)
            (files if entry else skipped).append(entry or rel)
    files.sort()
    skipped.sort()
    if not files:
        raise ValueError(_no_image_message(root, seen, skipped))
    return GalleryScan(root=root, files=files, skipped=skipped)


def _image_entry(full: Path, rel: str, root: Path):
    """``(rel, size, mtime_ns)`` when ``full`` is an image file to index, else None."""
    if not catalogue.is_image_name(rel):
        return None
    if full.is_symlink() and not _inside(full.resolve(), root):
        return None  # served by its path under root, it would expose a file outside it
    try:
        st = full.stat()  # follows a link: the target's content is what gets embedded
    except OSError:  # broken link, vanished, no permission
        return None
    if not stat.S_ISREG(st.st_mode):
        return None
    return rel, int(st.st_size), int(st.st_mtime_ns)


def _no_image_message(root: Path, seen: int, skipped: list) -> str:
    extensions = ", ".join(catalogue.IMAGE_EXTENSIONS)
    if not seen and not skipped:
        return f"gallery folder {root}: the folder is empty; put images ({extensions}) in it"
    folders = sum(s.endswith("/") for s in skipped)
    also = f" (and {folders} hidden or symlinked folders, not entered)" if folders else ""
    return (
        f"gallery folder {root}: no image to index: {seen} files{also}, none an image "
        f"({extensions}; hidden files and symlinks leading outside the folder do not count), "
        f"e.g. {', '.join(skipped[:3])}"
    )


# ============ the index contents ============


def category_of(rel_path: str) -> str:
    """The first folder of a relative path; `TOP_LEVEL` for a file directly in the root."""
    head, sep, _ = rel_path.partition("/")
    return head if sep else TOP_LEVEL


def product_of(rel_path: str) -> str:
    """The product id of an image at ``<category>/<product>/<image>``: its folder's relative
    path, as a training tree names it (catalogue.scan_folder_tree); "" at any other depth,
    where a folder level is not known to be a product."""
    parts = rel_path.split("/")
    return "/".join(parts[:2]) if len(parts) == 3 else ""


def categories_and_ids(paths) -> tuple[list, np.ndarray]:
    """(sorted unique categories of ``paths``, 1-based super id of each path)."""
    names = [category_of(p) for p in paths]
    categories = sorted(set(names))
    position = {c: i + 1 for i, c in enumerate(categories)}
    return categories, np.array([position[c] for c in names], dtype=np.int64)


def make_gallery_index(embeddings, files, model_key, meta=None, index_type="exact") -> GalleryIndex:
    """The GalleryIndex of a folder (module docstring) from embeddings in ``files`` order;
    ``files``: ``[(rel path, size, mtime_ns)]`` sorted by path."""
    paths = [f[0] for f in files]
    categories, super_ids = categories_and_ids(paths)
    return GalleryIndex(
        embeddings=embeddings,
        paths=paths,
        class_ids=np.arange(len(paths), dtype=np.int64),
        super_ids=super_ids,
        categories=categories,
        product_ids=[product_of(p) for p in paths],
        checkpoint_hash=model_key,
        meta=dict(meta or {}),
        index_type=index_type,
        file_stats=np.array([f[1:] for f in files], dtype=np.int64).reshape(-1, 2),
    )


# ============ what changed since the last index ============


def load_previous(index_path, root: Path, model_key: str):
    """``(index, None)`` when ``index_path`` holds a folder gallery built from ``root`` with
    ``model_key``; else ``(None, why)``, ``why`` a phrase for the log."""
    index_path = Path(index_path)
    if not index_path.exists():
        return None, "no index yet"
    try:
        index = GalleryIndex.load(index_path)
    except (ValueError, ImportError) as e:  # damaged, other format, ann index without faiss
        return None, f"the index could not be read ({e})"
    info = index.meta.get(GALLERY_META_KEY)
    if not isinstance(info, dict) or index.file_stats is None:
        return None, "it is not a folder-gallery index (no file sizes / times)"
    if info.get("root") != str(root):
        return None, f"it was built for folder {info.get('root')}, not {root}"
    if index.checkpoint_hash != model_key:
        return None, f"it was built with model {index.checkpoint_hash[:40] or '?'}, not {model_key[:40]}"
    return index, None


@dataclasses.dataclass
class UpdatePlan:
    """How each scanned file is handled: ``reuse`` maps rel path -> row of the previous index;
    ``embed`` lists the files to embed, ``known_bad`` the unchanged files that were unreadable
    last time (not retried); counts as in `update_gallery_index`'s report."""

    reuse: dict
    embed: list
    known_bad: list
    added: int
    changed: int
    removed: int


def plan_update(files, previous=None) -> UpdatePlan:
    """Compare the scanned ``files`` with the ``previous`` index (None: embed everything).

    A file is unchanged when its (rel path, size, mtime_ns) equals the recorded one. changed =
    indexed before with other stats; added = not indexed before (new, or unreadable last time
    and modified since); removed = indexed before, no longer among ``files``.
    """
    rows, bad = {}, {}
    if previous is not None:
        rows = {p: (i, tuple(s)) for i, (p, s) in enumerate(zip(previous.paths, previous.file_stats.tolist()))}
        bad = {p: (size, mtime) for p, size, mtime in previous.meta[GALLERY_META_KEY].get("unreadable", [])}
    reuse, embed, known_bad = {}, [], []
    added = changed = 0
    for rel, size, mtime in files:
        if rel in rows and rows[rel][1] == (size, mtime):
            reuse[rel] = rows[rel][0]
        elif bad.get(rel) == (size, mtime):
            known_bad.append((rel, size, mtime))
        else:
            embed.append((rel, size, mtime))
            changed += rel in rows
            added += rel not in rows
    present = {f[0] for f in files}
    return UpdatePlan(
        reuse=reuse,
        embed=embed,
        known_bad=known_bad,
        added=added,
        changed=changed,
        removed=sum(p not in present for p in rows),
    )


# ============ embedding ============


def embed_files(model, paths, batch_size=64, workers=None, device="cpu", progress=True):
    """Embed image files with ``model`` (an EmbeddingNet; eval transform at its image size).

    Returns ``(embeddings float32 [M, D] of the readable files in order, indices of the
    unreadable ones)``.
    """
    import torch

    import loaders
    import preprocessing

    size = int(model.model_args["image_size"])
    images = GalleryImages(paths, preprocessing.build_transform(size, train=False), size)
    loader = torch.utils.data.DataLoader(
        images,
        batch_size=batch_size,
        shuffle=False,
        # one pass: persistent workers would only outlive it
        **loaders.loader_settings(device, workers=workers, persistent_workers=False),
    )
    embeddings, ids = extraction.extract_embeddings(model, loader, device=device, progress=progress, desc="gallery")
    good = ids >= 0
    return np.ascontiguousarray(embeddings[good]), np.flatnonzero(~good)


# ============ resumable embedding: checkpoints every few hundred images ============

# images embedded between two checkpoints (rounded up to whole batches): what a kill can cost
CHECKPOINT_EVERY = 256


def embed_in_chunks(
    model,
    root: Path,
    files,
    on_chunk,
    chunk_size=CHECKPOINT_EVERY,
    batch_size=64,
    workers=None,
    device="cpu",
    progress=True,
) -> None:
    """Embed ``files`` (``[(rel, size, mtime_ns)]`` under ``root``) in order, handing each chunk
    of about ``chunk_size`` images to ``on_chunk(good_files, vectors, bad_files)`` as soon as it
    is embedded (the caller checkpoints it: `PartialEmbeddings`, a database upsert).

    A chunk is a whole number of batches, so the vectors equal those of one `embed_files` call
    over all ``files`` (same batches, same numbers). Unreadable files are logged per chunk.
    """
    step = max(1, -(-int(chunk_size) // batch_size)) * batch_size
    for start in range(0, len(files), step):
        part = files[start : start + step]
        vectors, failed = embed_files(
            model, [root / f[0] for f in part], batch_size=batch_size, workers=workers, device=device, progress=progress
        )
        failed = set(failed.tolist())
        _warn_unreadable(root, [part[i][0] for i in sorted(failed)])
        on_chunk([f for i, f in enumerate(part) if i not in failed], vectors, [part[i] for i in sorted(failed)])
        logger.info("embedded %d/%d images (checkpointed)", min(start + step, len(files)), len(files))


class PartialEmbeddings:
    """What an interrupted `update_gallery_index` had embedded, kept beside the index.

    A hidden folder ``.<index name>.partial/`` holds ``manifest.json`` (folder, model key) and
    one ``chunk_<n>.npz`` per checkpoint (paths, size and mtime, vectors, unreadable files), each
    written atomically (`fileio.atomic_write`): after a kill a chunk is whole or absent. The next
    run takes the rows whose file is unchanged instead of embedding them again; the folder is
    removed once the index is saved. Made only when a first chunk is written.
    """

    def __init__(self, index_path, root: Path, model_key: str):
        index_path = Path(index_path)
        self.folder = index_path.with_name(f".{index_path.name}.partial")
        self.manifest = {"root": str(root), "model_key": model_key}
        self._chunks = 0

    def load(self) -> dict:
        """rel -> ``((size, mtime_ns), vector or None for an unreadable file)`` of a previous
        interrupted run for the same folder and model; {} otherwise (a stale folder is removed)."""
        try:
            found = json.loads((self.folder / "manifest.json").read_text())
        except (OSError, ValueError):
            found = None
        if found != self.manifest:
            if self.folder.exists():
                logger.info("Discarding %s: it was left by a run for another folder or model", self.folder)
            self.clear()
            return {}
        rows = {}
        for chunk in sorted(self.folder.glob("chunk_*.npz")):
            try:
                with np.load(chunk, allow_pickle=False) as data:
                    stats, vectors = data["stats"].tolist(), data["vectors"]
                    for rel, st, vec in zip(data["paths"].tolist(), stats[: len(vectors)], vectors):
                        rows[rel] = (tuple(st), vec)
                    for rel, st in zip(data["paths"].tolist()[len(vectors) :], stats[len(vectors) :]):
                        rows[rel] = (tuple(st), None)
            except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
                logger.info("Ignoring the damaged checkpoint %s (%s)", chunk, e)
            self._chunks += 1
        if rows:
            logger.info("Resuming: %d images embedded by an interrupted run (%s)", len(rows), self.folder)
        return rows

    def add(self, good, vectors, bad) -> None:
        """Checkpoint one chunk: ``good`` files with their ``vectors``, then the ``bad`` ones."""
        if self._chunks == 0 and not self.folder.exists():
            fileio.atomic_write_text(self.folder / "manifest.json", json.dumps(self.manifest))
        files = list(good) + list(bad)
        arrays = {
            "paths": np.array([f[0] for f in files], dtype=np.str_),
            "stats": np.array([f[1:] for f in files], dtype=np.int64).reshape(-1, 2),
            "vectors": np.asarray(vectors, dtype=np.float32),
        }
        fileio.atomic_write(self.folder / f"chunk_{self._chunks:06d}.npz", lambda f: np.savez(f, **arrays))
        self._chunks += 1

    def clear(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
        self._chunks = 0


def resume_plan(embed, done: dict):
    """Split the files to embed into ``(new_rows rel -> vector, bad files, files still to
    embed)``, taking from ``done`` (`PartialEmbeddings.load`) every file whose stats are unchanged."""
    new_rows, bad, todo = {}, [], []
    for f in embed:
        stats, vector = done.get(f[0], (None, None))
        if stats != tuple(f[1:]):
            todo.append(f)
        elif vector is None:
            bad.append(f)
        else:
            new_rows[f[0]] = vector
    return new_rows, bad, todo


def _assemble(files, plan: UpdatePlan, previous, new_rows: dict):
    """Embedding matrix in ``files`` order from reused rows and ``new_rows`` (rel -> vector);
    files in neither (unreadable) are left out. Returns (embeddings, kept files)."""
    kept, vectors = [], []
    for f in files:
        rel = f[0]
        if rel in plan.reuse:
            vectors.append(previous.embeddings[plan.reuse[rel]])
        elif rel in new_rows:
            vectors.append(new_rows[rel])
        else:
            continue
        kept.append(f)
    return np.stack(vectors).astype(np.float32, copy=False), kept


def _same_content(previous, kept, meta, index_type) -> bool:
    """True when the new index would equal ``previous`` (then the file is not rewritten)."""
    return (
        previous is not None
        and previous.index_type == index_type
        and previous.paths == [f[0] for f in kept]
        and previous.file_stats.tolist() == [list(f[1:]) for f in kept]
        and previous.meta == json.loads(json.dumps(meta))
    )


def update_gallery_index(
    model,
    root,
    index_path,
    model_key,
    batch_size=64,
    workers=None,
    device="cpu",
    progress=True,
    index_type="exact",
    force=False,
    meta=None,
    checkpoint_every=CHECKPOINT_EVERY,
) -> tuple[GalleryIndex, dict]:
    """Index every image under ``root`` into ``index_path``, reusing what is still valid.

    The previous index is reused when it loads, was built for the same resolved ``root`` and
    ``model_key`` (else a full rebuild, with the reason logged); then only added or changed
    files are embedded and removed ones dropped (see `plan_update`); ``force``: embed all.
    Unreadable images are skipped with a warning naming them and remembered with their size
    and mtime, so an unchanged bad file is not retried next time. The index is saved
    atomically (a crash or Ctrl-C leaves the previous file intact), and not rewritten when
    nothing changed. ``meta``: extra JSON entries stored in ``index.meta``. Embedding is
    checkpointed every ``checkpoint_every`` images (`PartialEmbeddings`): a run killed midway,
    run again, embeds only what the last checkpoint had not covered.

    Returns ``(index, report)``. Report counts (ints): ``added``, ``changed``, ``removed``,
    ``unchanged`` (rows reused), ``skipped_non_images``, ``unreadable`` (all unreadable image
    files now, remembered ones included), ``embedded`` (images embedded by this call),
    ``resumed`` (images taken from an interrupted run's checkpoints);
    ``seconds`` (the whole call), ``embed_seconds``, ``images_per_s`` = embedded / seconds
    (0.0 when nothing was embedded), ``rebuild`` (why everything was embedded, or None),
    ``written`` (bool), and the lists ``skipped`` / ``unreadable_paths``.
    Raises ValueError, writing nothing, when no image of the folder is readable.
    """
    t0 = time.perf_counter()
    ann.check_index_type(index_type)
    if index_type != "exact":
        ann.require_faiss(f"index type {index_type!r}")  # before minutes of embedding
    index_path = Path(index_path)
    scan = scan_gallery(root, exclude=[index_path])
    previous, why = _previous_or_why(index_path, scan.root, model_key, force)
    plan = plan_update(scan.files, previous)
    t_embed = time.perf_counter()
    embed_kw = dict(batch_size=batch_size, workers=workers, device=device, progress=progress)
    new_rows, bad, resumed = _embed_planned(model, scan, plan, index_path, model_key, force, checkpoint_every, embed_kw)
    embed_seconds = time.perf_counter() - t_embed
    embeddings, kept = _assemble(scan.files, plan, previous, new_rows)
    info = _index_meta(meta, model, scan.root, model_key, kept, bad)
    index, written = _save_if_changed(previous, embeddings, kept, model_key, info, index_type, index_path, progress)
    PartialEmbeddings(index_path, scan.root, model_key).clear()
    embedded, seconds = len(new_rows) - resumed, time.perf_counter() - t0
    rebuild = None if previous is not None else why
    return index, _update_report(plan, scan, bad, (embedded, resumed), (seconds, embed_seconds), rebuild, written)


def _save_if_changed(previous, embeddings, kept, model_key, info, index_type, index_path: Path, progress):
    """``(index, written)``: a new index of ``kept`` rows saved at ``index_path`` (its ANN index
    built), or ``previous`` as it is when it already holds the same content."""
    if _same_content(previous, kept, info, index_type):
        return previous, False
    index = make_gallery_index(embeddings, kept, model_key, info, index_type)
    index.build_ann(progress=progress)
    index.save(index_path)
    return index, True


def _previous_or_why(index_path: Path, root: Path, model_key, force):
    """``(previous index, None)`` when the index at ``index_path`` can be updated, else
    ``(None, why not)`` (``force``, no index yet, or why it does not fit), a rebuild logged."""
    previous, why = (None, "force=True") if force else load_previous(index_path, root, model_key)
    if previous is None and why != "no index yet":
        logger.info("Rebuilding the gallery index %s from scratch: %s", index_path, why)
    return previous, why


def _index_meta(meta, model, root: Path, model_key, kept, bad) -> dict:
    """A folder index's ``meta``: the caller's entries, the model's arguments and the gallery's
    own (`GALLERY_META_KEY`: folder, model key, image count, unreadable files)."""
    return {
        **(meta or {}),
        "model_args": dict(model.model_args),
        GALLERY_META_KEY: {
            "root": str(root),
            "model_key": model_key,
            "num_images": len(kept),
            "unreadable": [list(b) for b in bad],
        },
    }


def _update_report(plan, scan, bad, counts, timings, rebuild, written) -> dict:
    """`update_gallery_index`'s report; ``counts`` is (embedded, resumed), ``timings`` (the
    call's seconds, the embedding's seconds)."""
    (embedded, resumed), (seconds, embed_seconds) = counts, timings
    return {
        "added": plan.added,
        "changed": plan.changed,
        "removed": plan.removed,
        "unchanged": len(plan.reuse),
        "skipped_non_images": len(scan.skipped),
        "unreadable": len(bad),
        "embedded": embedded,
        "resumed": resumed,
        "seconds": round(seconds, 3),
        "embed_seconds": round(embed_seconds, 3),
        "images_per_s": round(embedded / seconds, 2) if embedded > 0 else 0.0,
        "rebuild": rebuild,
        "written": written,
        "skipped": list(scan.skipped),
        "unreadable_paths": [b[0] for b in bad],
    }


def _embed_planned(model, scan, plan, index_path, model_key, force, checkpoint_every, embed_kw):
    """Embed the files ``plan`` says to, resuming from an interrupted run's checkpoints
    (`PartialEmbeddings`) and checkpointing every ``checkpoint_every`` images. Returns
    ``(new_rows rel -> vector, bad files sorted (rel, size, mtime), resumed count)``; ValueError
    (checkpoints cleared) when no image of the folder is readable."""
    partial = PartialEmbeddings(index_path, scan.root, model_key)
    if force:
        partial.clear()
    new_rows, bad, todo = resume_plan(plan.embed, partial.load())
    resumed = len(new_rows) + len(bad)
    bad += plan.known_bad

    def checkpoint(good, vectors, failed):
        partial.add(good, vectors, failed)
        new_rows.update((f[0], v) for f, v in zip(good, vectors))
        bad.extend(failed)

    embed_in_chunks(model, scan.root, todo, checkpoint, chunk_size=checkpoint_every, **embed_kw)
    bad.sort()
    if not plan.reuse and not new_rows:
        partial.clear()
        raise ValueError(
            f"gallery folder {scan.root}: none of its {len(scan.files)} images could be "
            f"read (e.g. {', '.join(b[0] for b in bad[:3])}); nothing was written to "
            f"{index_path}. Check that they are real, complete image files"
        )
    return new_rows, bad, resumed


def _warn_unreadable(root: Path, rels) -> None:
    """One warning naming the unreadable files and why (re-decoded here: they are few)."""
    if not rels:
        return
    reasons = [f"{rel} ({photos.check_image(root / rel) or 'unreadable'})" for rel in rels[:10]]
    more = f" ... and {len(rels) - 10} more" if len(rels) > 10 else ""
    logger.warning(
        "Skipped %d unreadable image(s) in %s: %s%s; they are not retried until they change",
        len(rels),
        root,
        "; ".join(reasons),
        more,
    )
