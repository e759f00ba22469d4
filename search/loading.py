"""What the demo serves, from plain arguments: the model (`load_search_model`: a checkpoint, the
newest ``best.pth`` or a zero-shot backbone, PyTorch or ONNX) and its gallery (`folder_index` for
any folder of photos, `dataset_index` for a labelled dataset's split), where their indexes live
(`default_index_path`, `default_gallery_index_path`) and reusing or building one
(`load_or_build_index`); what cannot load raises `SetupError` with a message saying what to do."""

import hashlib
import logging
from pathlib import Path
from typing import NamedTuple

import torch

import backbones
import checkpoints
from dataio import catalogue
import datasets
import devices
import inference
import models
import onnx_export
import preprocessing
from search import gallery, vectordb
from search.index import build_gallery_index, load_fresh_index

logger = logging.getLogger("app_stanford")  # the demo's log, whichever module writes to it

TRAIN_HINT = (
    "python train.py --dataset synthetic --backbone resnet18 --weights none "
    "--image_size 64 --epochs 3 --loss multi_similarity --lr 1e-3 --batch_size 32 "
    "--dropout 0   (offline, ~2 min on CPU; generates data/synthetic_sop)\n"
    "  or on real SOP: python train.py --dataset stanford --backbone efficientnet_b0"
)


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


def load_or_build_index(
    model,
    checkpoint,
    data_root,
    split="test",
    index_path=None,
    batch_size=64,
    workers=None,
    progress=True,
    force=False,
    index_type="exact",
    model_key=None,
    splits=None,
):
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
    dataset = _gallery_dataset(model, data_root, split, splits)
    ckpt_hash = model_key or checkpoints.checkpoint_hash(checkpoint)
    if index_path.exists() and not force:
        index, why = load_fresh_index(index_path, ckpt_hash, dataset.rel_paths, index_type=index_type)
        if index is not None:
            logger.info("Loaded gallery index %s (%d images)", index_path, len(index))
            return index, False
        logger.info("Gallery index %s: %s; rebuilding it", index_path, why)
    logger.info(
        "Embedding %d gallery images of %s (split %s) with %s ...",
        len(dataset),
        dataset.root,
        split,
        checkpoint or model_key,
    )
    index = build_gallery_index(
        model,
        dataset,
        batch_size=batch_size,
        workers=workers,
        checkpoint_hash=ckpt_hash,
        device=next(model.parameters()).device,
        meta=_split_meta(model, checkpoint, dataset, split),
        progress=progress,
        index_type=index_type,
        skip_unreadable=True,
    )
    index.save(index_path)
    logger.info("Saved gallery index %s", index_path)
    return index, True


def _gallery_dataset(model, data_root, split, splits) -> datasets.SOPDataset:
    """``split`` of the dataset under ``data_root`` with the model's eval transform, its files
    not checked: a vanished photo is left out of the index (`build_gallery_index`'s
    ``skip_unreadable``), not a reason for the demo not to start."""
    return datasets.SOPDataset(
        data_root,
        split,
        **(splits or {}),
        check_files=False,
        transform=preprocessing.build_transform(int(model.model_args["image_size"]), train=False),
    )


def _split_meta(model, checkpoint, dataset, split) -> dict:
    """What a split's index records of where it comes from: split, data root, model, checkpoint."""
    return {
        "split": split,
        "data_root": str(dataset.root),
        "model_args": dict(model.model_args),
        "checkpoint": str(checkpoint) if checkpoint else None,
    }


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


def load_search_model(
    checkpoint=None,
    checkpoint_dir="checkpoints",
    device="auto",
    zero_shot_backbone=None,
    weights="imagenet",
    image_size=224,
    runtime=None,
) -> SearchModel:
    """The checkpoint (``checkpoint``, else the newest ``<checkpoint_dir>/*/best.pth``), or
    with ``zero_shot_backbone`` that pretrained backbone alone (``weights``, ``image_size``),
    on ``device`` (`devices.resolve_device`) and ``runtime`` (inference.load_embedder; default
    inference.default_runtime). SetupError when neither loads."""
    device = devices.resolve_device(device)
    runtime = inference.resolve_runtime(runtime, device)
    if zero_shot_backbone:
        try:
            model = inference.load_embedder(
                zero_shot=(zero_shot_backbone, weights, image_size), runtime=runtime, device=device
            )
        except (backbones.WeightsUnavailableError, OSError, ValueError) as e:
            raise SetupError(f"Cannot load {zero_shot_backbone} with weights {weights!r}: {e}") from e
        logger.info("Zero-shot %s (%s weights, %d px)", zero_shot_backbone, weights, image_size)
        return SearchModel(
            model,
            None,
            models.zero_shot_model_key(zero_shot_backbone, str(weights), image_size),
            models.zero_shot_name(zero_shot_backbone, image_size, str(weights)),
        )
    checkpoint = Path(checkpoint) if checkpoint else find_checkpoint(checkpoint_dir)
    if checkpoint is None:
        raise SetupError(
            f"No checkpoint given and none found under {Path(checkpoint_dir) / '*' / 'best.pth'}. "
            f"Train one first, e.g.:\n  {TRAIN_HINT}\nthen run: python app_stanford.py "
            "--checkpoint checkpoints/<run>/best.pth, or search with pretrained features: "
            "python app_stanford.py --zero_shot --backbone efficientnet_lite0 --gallery DIR"
        )
    try:
        model = inference.load_embedder(checkpoint, runtime=runtime, device=device)
    except (OSError, checkpoints.CheckpointError, onnx_export.OnnxModelError, ValueError) as e:
        raise SetupError(f"Cannot load checkpoint {checkpoint}: {e}") from e
    logger.info("Loaded %s (%s, runtime %s)", checkpoint, model.model_args, runtime)
    return SearchModel(model, checkpoint, checkpoints.checkpoint_hash(checkpoint), checkpoint.parent.name)


def folder_index(
    loaded: SearchModel,
    folder,
    index_path=None,
    batch_size=64,
    workers=None,
    rebuild=False,
    index_type="exact",
    backend="file",
    db_uri=None,
    collection=None,
    checkpoint_every=gallery.CHECKPOINT_EVERY,
):
    """``(index, folder)``: the index of every image under ``folder`` (`search.gallery`),
    updated incrementally (and resumably: checkpoints every ``checkpoint_every`` images), at
    ``index_path`` (default `default_gallery_index_path`); with ``backend="milvus"`` a
    `search.vectordb.MilvusGallery` in the database ``db_uri`` (default
    `search.vectordb.default_db_path`). SetupError for a missing folder, one without a readable
    image, or a database that cannot be used."""
    model, checkpoint = loaded.model, loaded.checkpoint
    options = dict(
        batch_size=batch_size,
        workers=workers,
        device=next(model.parameters()).device,
        index_type=index_type,
        checkpoint_every=checkpoint_every,
    )
    try:
        if backend == "milvus":
            db_uri = db_uri or vectordb.default_db_path(checkpoint, loaded.name)
            index, report = vectordb.folder_gallery(
                model, loaded.key, folder, db_uri, collection=collection, rebuild=rebuild, **options
            )
            where = f"{db_uri}, collection {index.name}"
        else:
            where = Path(index_path) if index_path else default_gallery_index_path(folder, checkpoint, loaded.name)
            index, report = gallery.update_gallery_index(
                model,
                folder,
                where,
                loaded.key,
                force=rebuild,
                **options,
                meta={
                    "model_args": dict(model.model_args),
                    "checkpoint": str(checkpoint) if checkpoint else None,
                    "match": (getattr(model, "checkpoint_info", None) or {}).get("match"),
                },
            )
    except (FileNotFoundError, NotADirectoryError, ValueError, vectordb.DatabaseError) as e:
        raise SetupError(f"Cannot index the gallery {folder}: {e}") from e
    _log_folder_report(folder, index, report, where)
    return index, Path(folder).expanduser().resolve()


def _log_folder_report(folder, index, report: dict, where) -> None:
    """Log what indexing ``folder`` did (`search.gallery.update_gallery_index`'s ``report``;
    the skipped files at debug level); ``where``: the index file or collection."""
    logger.info(
        "Gallery %s: %d images (%d added, %d changed, %d removed, %d unchanged, %d embedded, %d "
        "resumed; %d files skipped as not images, %d unreadable) in %.1f s; index %s",
        folder,
        len(index),
        report["added"],
        report["changed"],
        report["removed"],
        report["unchanged"],
        report["embedded"],
        report["resumed"],
        report["skipped_non_images"],
        report["unreadable"],
        report["seconds"],
        where,
    )
    for rel in report["skipped"]:
        logger.debug("skipped (not an image) %s", rel)
    for rel in report["unreadable_paths"]:
        logger.debug("skipped (unreadable) %s", rel)


def dataset_index(
    loaded: SearchModel,
    data_root=None,
    split=None,
    index_path=None,
    batch_size=64,
    workers=None,
    rebuild=False,
    index_type="exact",
    test_fraction=None,
    backend="file",
    db_uri=None,
    collection=None,
    checkpoint_every=None,
):
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
        index_path = index_path or _split_index_path(loaded, data_root, split)
        splits = datasets.split_options(train_args, test_fraction)

        def build():
            return load_or_build_index(
                loaded.model,
                loaded.checkpoint,
                data_root,
                split,
                index_path,
                batch_size=batch_size,
                workers=workers,
                force=rebuild,
                index_type=index_type,
                model_key=loaded.key,
                splits=splits,
            )[0]

        if backend == "milvus":
            rel_paths = datasets.SOPDataset(data_root, split, **splits).rel_paths
            index = _split_collection(
                loaded, data_root, split, rel_paths, build, db_uri, collection, index_type, rebuild
            )
        else:
            index = build()
    except (FileNotFoundError, NotADirectoryError, ValueError, catalogue.DatasetError, vectordb.DatabaseError) as e:
        raise SetupError(
            f"Cannot build the gallery from {data_root}: {e}\nPass --data_root DIR (a dataset: "
            "Ebay files, a catalogue.csv or a <category>/<product>/<image> tree), or "
            "--gallery DIR to search any folder of photos."
        ) from e
    return index, data_root


def _split_index_path(loaded: SearchModel, data_root, split) -> Path:
    """The default index file of a dataset's ``split``: beside the checkpoint, or under
    ``runs/<zero-shot name>/`` (one per data root)."""
    if loaded.checkpoint:
        return default_index_path(loaded.checkpoint, split)
    return Path("runs") / loaded.name / f"gallery_{split}_{_path_tag(data_root)}.npz"


def _split_collection(loaded: SearchModel, data_root, split, rel_paths, build, db_uri, collection, index_type, rebuild):
    """The collection of a dataset's ``split`` (`search.vectordb.split_gallery`) in ``db_uri``
    (default `search.vectordb.default_db_path`), filled from ``build()`` when incomplete."""
    return vectordb.split_gallery(
        db_uri or vectordb.default_db_path(loaded.checkpoint, loaded.name),
        data_root,
        split,
        loaded.key,
        dict(loaded.model.model_args),
        rel_paths,
        build,
        collection=collection,
        index_type=index_type,
        rebuild=rebuild,
        match=(getattr(loaded.model, "checkpoint_info", None) or {}).get("match"),
    )
