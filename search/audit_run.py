"""One catalogue audit from start to end: which photos, their embeddings, the thresholds, the
findings (`search.audit`) and the report (`search.audit_report`).

* the photos: a labelled catalogue (``data_root``, any layout: `dataio.catalogue.read_catalogue`,
  every split) or a folder of photos (``gallery``: `search.gallery`, product folders
  ``<category>/<product>/`` give the ids; other photos are counted, not judged);
* the embeddings: `search.gallery.update_gallery_index` over the catalogue's folder, with the
  index file in the output folder: incremental and checkpointed, so an interrupted audit run
  again resumes, and an audit after a few edits embeds only the changed photos;
* nothing is written under the catalogue's folder: the output folder may not lie inside it.
"""

import dataclasses
import json
import logging
from pathlib import Path
import random
import time

import numpy as np

from dataio import catalogue, fileio, photos
import extraction
import preprocessing
from search import audit, audit_report, gallery, near_copy

logger = logging.getLogger("audit")

INDEX_NAME = "embeddings.npz"  # in the output folder
EDITED_COPIES = 200  # photos drawn to measure the model's edited-copy scores
# quantile of the edited copies' coarse pixel scores below which a candidate is not aligned at all:
# a loose first check (1% of copies would fail it) that spares the alignment most look-alike pairs
PREFILTER_QUANTILE = 0.01
CACHED_PHOTOS = 4096  # decoded candidates kept for their other pairs (`near_copy.load_grey`: ~0.1 MB each)


class AuditError(ValueError):
    """The audit cannot run on these arguments; the message says why and what to do."""


@dataclasses.dataclass
class Catalogue:
    """The photos an audit judges: ``root`` (resolved), ``paths`` (relative to it) and
    ``product_ids`` ("" for a photo with no product), in catalogue order."""

    root: Path
    paths: list
    product_ids: list


def inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def read_photos(data_root=None, gallery_dir=None) -> Catalogue:
    """The `Catalogue` of a labelled dataset (``data_root``) or of a photo folder (``gallery_dir``)."""
    if gallery_dir is not None:
        scan = gallery.scan_gallery(gallery_dir)
        return Catalogue(scan.root, scan.paths, [gallery.product_of(p) for p in scan.paths])
    folder, _ = catalogue.detect_layout(data_root)
    table = catalogue.read_catalogue(folder)
    return Catalogue(Path(folder).resolve(), list(table.rel_paths), [str(p) for p in table.product_ids])


def check_output(output, root: Path) -> Path:
    """The output folder, resolved; AuditError when it lies inside the audited folder."""
    out = Path(output).expanduser().resolve()
    if inside(out, root):
        raise AuditError(
            f"--output {out} lies inside the audited folder {root}; the audit never writes "
            "there: pass an output folder outside it"
        )
    return out


def embed_catalogue(loaded, photos_, out: Path, batch_size=64, workers=None, index_type="exact", progress=True):
    """``(index, report)`` of `search.gallery.update_gallery_index` over the catalogue's folder, the
    index at ``out / INDEX_NAME`` (resumed / updated when it is there)."""
    device = next(loaded.model.parameters()).device
    return gallery.update_gallery_index(
        loaded.model,
        photos_.root,
        out / INDEX_NAME,
        loaded.key,
        batch_size=batch_size,
        workers=workers,
        device=device,
        progress=progress,
        index_type=index_type,
        meta={"model_args": dict(loaded.model.model_args), "audit": True},
    )


def edited_copy_scores(model, files, vectors, n=EDITED_COPIES, seed=0, progress=True):
    """``(embedding scores, pixel scores, coarse pixel scores)``: for each of up to ``n`` drawn photos
    (``files``, their index ``vectors``) and an `search.audit.edited_copy` of it, the cosine
    similarity of their embeddings by ``model``, their `search.near_copy.similarity` and
    `search.near_copy.coarse_similarity`."""
    import torch

    rng = random.Random(seed)
    picks = sorted(rng.sample(range(len(files)), min(n, len(files))))
    size = int(model.model_args["image_size"])
    transform = preprocessing.build_transform(size, train=False)
    tensors, kept, pixel, coarse = [], [], [], []
    for i in picks:
        try:
            copy = audit.edited_copy(photos.load_image(files[i]), rng)
            original = near_copy.load_grey(files[i])
        except (*photos.IMAGE_ERRORS, FileNotFoundError):
            continue  # changed since it was embedded: one draw fewer
        pixel.append(near_copy.similarity(original, copy))
        coarse.append(near_copy.coarse_similarity(near_copy.signature(original), near_copy.signature(copy)))
        tensors.append(transform(copy))
        kept.append(i)
    if not kept:
        return np.zeros(0, np.float32), np.zeros(0, np.float32), np.zeros(0, np.float32)
    batches = [
        (torch.stack(tensors[s : s + 32]), torch.zeros(len(tensors[s : s + 32]), dtype=torch.long))
        for s in range(0, len(tensors), 32)
    ]
    copies, _ = extraction.extract_embeddings(
        model, batches, device=next(model.parameters()).device, progress=progress, desc="edited copies"
    )
    scores = np.einsum("nd,nd->n", copies, vectors[kept])
    return scores, np.asarray(pixel, np.float32), np.asarray(coarse, np.float32)


def confirm_duplicates(candidates, files, threshold, coarse_threshold=-1.0, progress=True):
    """``(kept, aligned)``: the candidates whose two photos are near copies in pixels,
    `search.near_copy.coarse_similarity` >= ``coarse_threshold`` first (cheap), then
    `search.near_copy.similarity` >= ``threshold``, and how many pairs were aligned (passed the
    first check). Photos that no longer decode are left out."""
    from functools import lru_cache

    from tqdm.auto import tqdm

    @lru_cache(maxsize=CACHED_PHOTOS)  # a candidate's photos are often another candidate's too
    def grey(row):
        try:
            return near_copy.load_grey(files[row])
        except (*photos.IMAGE_ERRORS, FileNotFoundError):
            return None

    @lru_cache(maxsize=CACHED_PHOTOS)
    def signature(row):
        image = grey(row)
        return None if image is None else near_copy.signature(image)

    kept, aligned = [], 0
    for f in tqdm(candidates, desc="near copies", unit="pair", disable=not progress, dynamic_ncols=True, leave=False):
        a, b = signature(f.row), signature(f.other_row)
        if a is None or b is None or near_copy.coarse_similarity(a, b) < coarse_threshold:
            continue
        aligned += 1
        if near_copy.similarity(grey(f.row), grey(f.other_row)) >= threshold:
            kept.append(f)
    return kept, aligned


def judged_rows(photos_, index, report):
    """``(rows of index, catalogue positions, unreadable catalogue paths)``: each catalogue photo
    with a product and an embedding, and the catalogue's photos without an embedding."""
    row_of = {p: r for r, p in enumerate(index.paths)}
    rows, positions, unreadable = [], [], []
    for pos, (path, pid) in enumerate(zip(photos_.paths, photos_.product_ids)):
        row = row_of.get(path)
        if row is None:
            unreadable.append(pos)
        elif pid:
            rows.append(row)
            positions.append(pos)
    return np.asarray(rows, np.int64), np.asarray(positions, np.int64), unreadable


def find_all(
    vectors,
    product_ids,
    files,
    copies,
    index_type="exact",
    progress=True,
    duplicate_threshold=None,
    margin_threshold=None,
):
    """``(findings, info)``: duplicate then mislabelled findings over ``vectors``, their
    ``product_ids`` and image ``files``, with the thresholds derived from ``copies``
    (`edited_copy_scores`) unless given, and the timings in ``info``."""
    t0 = time.perf_counter()
    k = audit.neighbour_count(product_ids)
    scores, idx = audit.neighbours(vectors, k, index_type=index_type, progress=progress)
    t1 = time.perf_counter()
    dup_t = audit.duplicate_threshold(copies[0]) if duplicate_threshold is None else float(duplicate_threshold)
    pixel_t = audit.duplicate_threshold(copies[1])
    coarse_t = audit.duplicate_threshold(copies[2], PREFILTER_QUANTILE)
    candidates = audit.find_duplicates(product_ids, scores, idx, dup_t)
    confirmed, aligned = confirm_duplicates(candidates, files, pixel_t, coarse_t, progress)
    duplicates = audit.mutual_best(confirmed)
    t2 = time.perf_counter()
    mislabelled, info = audit.find_mislabelled(vectors, product_ids, scores, idx, margin_threshold, duplicates)
    info.update(
        duplicate_threshold=dup_t,
        pixel_threshold=pixel_t,
        coarse_pixel_threshold=coarse_t,
        duplicate_candidates=len(candidates),
        aligned_pairs=aligned,
        neighbours_k=k,
        neighbour_seconds=round(t1 - t0, 3),
        near_copy_seconds=round(t2 - t1, 3),
        findings_seconds=round(time.perf_counter() - t1, 3),
    )
    for name, values in zip(("edited_copy_scores", "edited_copy_pixel_scores", "edited_copy_coarse_scores"), copies):
        info[name] = {"n": int(len(values)), "min": float(np.min(values)), "median": float(np.median(values))}
    return duplicates + mislabelled, info


def _audit_summary(loaded, photos_, rows, product_ids, unreadable, report) -> dict:
    """The summary's counts of the catalogue: photos, those judged (embedded), products,
    unreadable and unlabelled photos, and the embedding's ``report``."""
    return {
        "root": str(photos_.root),
        "model": loaded.key,
        "photos": len(photos_.paths),
        "judged": len(rows),
        "products": len(set(product_ids)),
        "unreadable": len(unreadable),
        "unlabelled": sum(not p for p in photos_.product_ids),
        "embed": report,
    }


def _compare_products(loaded, vectors, files, product_ids, index_type, thresholds, seed, progress):
    """`find_all` over the judged photos (``vectors`` of ``files``), its duplicate threshold derived
    from edited copies (`edited_copy_scores`) unless ``thresholds`` (duplicate, margin) give it.
    AuditError when no edited copy could be made to derive a threshold from."""
    copies = edited_copy_scores(loaded.model, files, vectors, seed=seed, progress=progress)
    try:
        return find_all(vectors, product_ids, files, copies, index_type, progress, *thresholds)
    except ValueError as e:
        raise AuditError(str(e)) from e


def run_audit(
    loaded,
    output,
    data_root=None,
    gallery_dir=None,
    batch_size=64,
    workers=None,
    index_type="exact",
    html_limit=50,
    duplicate_threshold=None,
    margin_threshold=None,
    seed=0,
    progress=True,
) -> dict:
    """Audit a catalogue with ``loaded`` (`search.loading.SearchModel`, torch runtime): write
    ``output``/audit.csv, audit.html and summary.json; returns the summary. AuditError for
    arguments it cannot run on (an output folder inside the catalogue, no readable photo)."""
    t0 = time.perf_counter()
    photos_ = read_photos(data_root, gallery_dir)
    out = check_output(output, photos_.root)
    out.mkdir(parents=True, exist_ok=True)
    try:
        index, report = embed_catalogue(loaded, photos_, out, batch_size, workers, index_type, progress)
    except ValueError as e:
        raise AuditError(f"cannot embed {photos_.root}: {e}") from e
    rows, positions, unreadable = judged_rows(photos_, index, report)
    product_ids = [photos_.product_ids[p] for p in positions]
    summary = _audit_summary(loaded, photos_, rows, product_ids, unreadable, report)
    rel = [index.paths[r] for r in rows]
    findings = [audit.Finding("unreadable", int(p)) for p in unreadable]
    if summary["products"] < 2:
        summary["message"] = (
            f"nothing to compare: {summary['products']} product(s) with a readable "
            f"photo in {photos_.root}; an audit compares products with each other"
        )
        logger.warning(summary["message"])
        findings_rows = []
    else:
        vectors, files = index.embeddings[rows], [photos_.root / p for p in rel]
        thresholds = (duplicate_threshold, margin_threshold)
        findings_rows, info = _compare_products(
            loaded, vectors, files, product_ids, index_type, thresholds, seed, progress
        )
        summary.update(info)
    table = audit_report.finding_table(findings_rows, rel, product_ids, findings, photos_)
    audit_report.write_csv(out / "audit.csv", table)
    summary["counts"] = {kind: sum(r["kind"] == kind for r in table) for kind in audit.KINDS}
    audit_report.write_html(
        out / "audit.html", table, summary, loaded, index, photos_.root, limit=html_limit, progress=progress
    )
    summary["seconds"] = round(time.perf_counter() - t0, 2)
    summary["embed"] = {k: v for k, v in report.items() if k not in ("skipped", "unreadable_paths")}
    fileio.atomic_write_text(out / "summary.json", json.dumps(summary, indent=1, default=float) + "\n")
    return summary
