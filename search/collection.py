"""A database gallery's Milvus collection: its name, schema, vector index and properties.

One collection per model and catalogue (`collection_name`: the model key - the checkpoint's
sha256 or the zero-shot key -, the backbone and the image size, plus the catalogue folder);
its properties (`wanted_properties`) record them and are checked whenever it is opened
(`open_collection`), so a collection built by another model is refused with what to do. A row is
one photo: ``path`` (the catalogue path relative to the folder: the primary key, so an upsert
never doubles a row), ``vector`` (the unit embedding), ``product_id``, ``category``, ``size``
and ``mtime_ns`` (what `search.gallery.plan_update` compares to decide what to embed again).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from pathlib import Path

from search import ann
from search.milvus import DatabaseError, is_milvus_error, is_server_uri, message

logger = logging.getLogger("gallery")

FORMAT = "product-search-gallery/1"  # collection property: a collection made by this code
# what reads of the rows ask for: the rows as of the call, writes of any process included (a
# server's default, "Bounded", may answer without rows written a moment before)
CONSISTENCY = "Strong"
MAX_PATH_BYTES = 65535  # Milvus VARCHAR limit
MAX_NAME_BYTES = 4096
LITE_IVF_NLIST = 128  # milvus-lite 3.2.2
# Milvus Lite's HNSW needs a wider beam than faiss's for the same recall (bench/db.json, 1M rows:
# ef 256 -> recall@10 0.852, ef 1024 -> 0.982) and its latency does not move with ef (~1.25 s at
# every ef from 256 to 2048): its fixed per-query cost dominates.
LITE_HNSW_EF_FACTOR = 4
MILVUS_INDEX = {"exact": "FLAT", "ivf": "IVF_FLAT", "hnsw": "HNSW"}
MODEL_KEYS = ("model_key", "backbone", "image_size", "embedding_size")


def collection_name(model_key: str, model_args: dict, root, split=None) -> str:
    """``gallery_<model tag>_<folder tag>``: 16 hex digits of the sha256 of (model key,
    backbone, image size) and 8 of the catalogue folder's absolute path (and ``split``, for a
    dataset's split)."""
    model = json.dumps([model_key, model_args.get("backbone"), int(model_args.get("image_size", 0))])
    model_tag = hashlib.sha256(model.encode()).hexdigest()[:16]
    folder = str(Path(root).expanduser().resolve()) + (f"#{split}" if split else "")
    folder_tag = hashlib.sha256(folder.encode()).hexdigest()[:8]
    return f"gallery_{model_tag}_{folder_tag}"


def default_params(uri, index_type: str, n: int) -> dict:
    """`search.ann.default_params` for a new collection of about ``n`` rows, except on Milvus
    Lite: its IVF_FLAT has `LITE_IVF_NLIST` cells whatever nlist it is given (measured: its k-means
    log and its recall at each nprobe are the same for nlist 16 and 51), so nprobe scans the
    share of the cells that the defaults for ``n`` would (small galleries scan more of theirs);
    its HNSW searches with `LITE_HNSW_EF_FACTOR` times the faiss beam."""
    params = ann.default_params(index_type, max(int(n), 1))
    if index_type == "hnsw" and not is_server_uri(uri):
        params["efSearch"] *= LITE_HNSW_EF_FACTOR
    if index_type == "ivf" and not is_server_uri(uri):
        share = params["nprobe"] / params["nlist"]
        params.update(
            nlist=LITE_IVF_NLIST, nprobe=max(ann.ivf_nprobe(LITE_IVF_NLIST), math.ceil(share * LITE_IVF_NLIST))
        )
    return params


def wanted_properties(model_key, model_args: dict, root: Path, match=None) -> dict:
    """The properties a collection of ``root``'s gallery for this model holds (all strings);
    ``match``: the model's same-product threshold record (`calibration.match_record`), kept as JSON
    under "match" so that the gallery carries it as a file index does (not checked on opening)."""
    props = {
        "format": FORMAT,
        "model_key": str(model_key),
        "backbone": str(model_args.get("backbone")),
        "image_size": str(int(model_args.get("image_size", 0))),
        "embedding_size": str(int(model_args.get("embedding_size", 128))),
        "root": str(root),
    }
    if match:
        props["match"] = json.dumps(match, sort_keys=True, default=float)
    return props


def _schema(client, dim: int):
    from pymilvus import DataType

    schema = client.create_schema(
        auto_id=False, enable_dynamic_field=False, description="product photo gallery (search/vectordb.py)"
    )
    schema.add_field("path", DataType.VARCHAR, is_primary=True, max_length=MAX_PATH_BYTES)
    schema.add_field("vector", DataType.FLOAT_VECTOR, dim=int(dim))
    schema.add_field("product_id", DataType.VARCHAR, max_length=MAX_PATH_BYTES)
    schema.add_field("category", DataType.VARCHAR, max_length=MAX_NAME_BYTES)
    schema.add_field("size", DataType.INT64)
    schema.add_field("mtime_ns", DataType.INT64)
    return schema


def _index_params(client, index_type: str, params: dict):
    build = {
        "ivf": {"nlist": params.get("nlist")},
        "hnsw": {"M": params.get("M"), "efConstruction": params.get("efConstruction")},
    }.get(index_type, {})
    index_params = client.prepare_index_params()
    index_params.add_index(
        field_name="vector",
        index_type=MILVUS_INDEX[index_type],
        metric_type="IP",
        params={k: int(v) for k, v in build.items() if v is not None},
    )
    return index_params


def create_collection(client, uri, name, wanted, index_type, params, timeout) -> None:
    """Create the collection; another process creating it at the same moment is no error."""
    try:
        client.create_collection(
            name,
            schema=_schema(client, int(wanted["embedding_size"])),
            index_params=_index_params(client, index_type, params),
            consistency_level=CONSISTENCY,
            timeout=timeout,
            properties={**wanted, "index_type": index_type, "ann_params": json.dumps(params, sort_keys=True)},
        )
    except Exception as e:
        if not (is_milvus_error(e) and client.has_collection(name, timeout=timeout)):
            raise
        return
    logger.info("Created collection %s in %s (%s index)", name, uri, MILVUS_INDEX[index_type])


def check_collection(name, uri, found: dict, wanted: dict, index_type: str) -> None:
    """DatabaseError when collection ``name`` was made by other code, another model, for
    another folder or as another index type."""
    if found.get("format") != FORMAT:
        raise DatabaseError(
            f"collection {name} in {uri} was not made by this project's gallery "
            "indexing (no gallery format property); pass another --collection, or drop it"
        )
    if any(found.get(k) != wanted[k] for k in MODEL_KEYS):
        raise DatabaseError(
            f"collection {name} in {uri} was built by another model "
            f"({', '.join(f'{k} {found.get(k)!r}' for k in MODEL_KEYS)}), "
            f"not this one ({', '.join(f'{k} {wanted[k]!r}' for k in MODEL_KEYS)}): its vectors cannot be "
            "searched with this model's queries. Pass another --collection (or none: each model gets "
            "its own), or rebuild it with --rebuild_index"
        )
    if found.get("root") != wanted["root"]:
        raise DatabaseError(
            f"collection {name} in {uri} holds the gallery of folder {found.get('root')}, "
            f"not {wanted['root']}; pass another --collection (or none), or --rebuild_index"
        )
    if found.get("index_type") != index_type:
        raise DatabaseError(
            f"collection {name} in {uri} was built with a {found.get('index_type')!r} index, "
            f"not {index_type!r}: pass --index_type {found.get('index_type')}, or "
            "--rebuild_index to rebuild it as asked"
        )


def open_collection(client, uri, name, wanted, index_type, ann_params, expected_size, rebuild, timeout) -> dict:
    """Collection ``name``'s properties (strings), the collection created when missing (dropped
    first with ``rebuild``), checked against ``wanted`` (`check_collection`) and loaded. A new
    collection's parameters are `default_params` for ``expected_size`` rows, updated by
    ``ann_params``. DatabaseError naming the database when a call fails."""
    try:
        if rebuild and client.has_collection(name, timeout=timeout):
            logger.info("Dropping collection %s of %s (rebuild)", name, uri)
            client.drop_collection(name, timeout=timeout)
        if not client.has_collection(name, timeout=timeout):
            params = {**default_params(uri, index_type, expected_size), **(ann_params or {})}
            create_collection(client, uri, name, wanted, index_type, params, timeout)
        info = client.describe_collection(name, timeout=timeout)
        props = {k: str(v) for k, v in (info.get("properties") or {}).items()}
        check_collection(name, uri, props, wanted, index_type)
        client.load_collection(name, timeout=timeout)
    except Exception as e:
        if isinstance(e, DatabaseError) or not is_milvus_error(e):
            raise
        raise DatabaseError(
            f"Milvus database {uri}, collection {name}: {message(e)} (calls of at most {timeout:g} s, --db_timeout)"
        ) from e
    return props
