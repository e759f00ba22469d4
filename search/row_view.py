"""The metadata mirror of a database gallery's rows (`search.vectordb.MilvusGallery`): every
row but its vector, read back from the collection in pages and held in path order.

No query answers more than `PAGE` rows, nor in key order on Milvus Lite, so the rows are read
in pages over ranges of the key (`read_rows`), with "Strong" consistency
(`search.collection.CONSISTENCY`: every write acknowledged before the read is seen).
"""

from __future__ import annotations

import types

import numpy as np

from search.collection import CONSISTENCY
from search.milvus import key_range

PAGE = 16384  # rows per query when reading the rows back (Milvus's largest query window)
VIEW_FIELDS = ["path", "product_id", "category", "size", "mtime_ns"]


class RowView(types.SimpleNamespace):
    """The rows' metadata, in path order: ``paths``, ``product_ids``, ``categories`` (sorted
    names), ``super_ids`` (1-based into them), ``file_stats`` [N, 2], ``row_of`` (path -> row),
    ``counts`` (super id -> rows)."""


def make_view(rows) -> RowView:
    """The `RowView` of ``rows`` (dicts of `VIEW_FIELDS`, in any order)."""
    rows = sorted(rows, key=lambda r: r["path"])
    paths = [r["path"] for r in rows]
    categories = sorted({r["category"] for r in rows})
    position = {c: i + 1 for i, c in enumerate(categories)}
    super_ids = np.array([position[r["category"]] for r in rows], dtype=np.int64)
    return RowView(
        paths=paths,
        product_ids=[r["product_id"] for r in rows],
        categories=categories,
        super_ids=super_ids,
        row_of={p: i for i, p in enumerate(paths)},
        file_stats=np.array([[r["size"], r["mtime_ns"]] for r in rows], dtype=np.int64).reshape(-1, 2),
        counts={i + 1: int(n) for i, n in enumerate(np.bincount(super_ids, minlength=len(categories) + 1)[1:])},
    )


def read_view(call, name) -> RowView:
    """The `RowView` of collection ``name``'s rows, as they are now."""
    return make_view(read_rows(call, name, VIEW_FIELDS))


def read_rows(call, name, fields) -> list:
    """Every row's ``fields`` of collection ``name``, through ``call(method, *args, **kwargs)``
    (a client call), in pages of at most `PAGE` rows over ranges of the key (`key_range`). A
    query answers at most `PAGE` rows of a range, and not necessarily the first ones (Milvus
    Lite answers in segment order): a full page is kept only when the range up to its largest
    key counts no more rows than it holds, else the range is split at the page's median key
    (each half then holds at least half of the page's rows, so the split ends). pymilvus's
    query_iterator is not used: it pages with an unescaped key."""
    rows, ranges = [], [(None, None)]
    while ranges:
        low, high = ranges.pop()
        page = call(
            "query",
            name,
            filter=key_range(low, high),
            output_fields=fields,
            limit=PAGE,
            consistency_level=CONSISTENCY,
        )
        keys = sorted(r["path"] for r in page)
        if len(page) < PAGE or count_rows(call, name, key_range(low, keys[-1])) <= len(page):
            rows.extend(page)
            if len(page) == PAGE:
                ranges.append((keys[-1], high))
            continue
        middle = keys[len(keys) // 2 - 1]
        ranges += [(middle, high), (low, middle)]
    return rows


def count_rows(call, name, expr: str) -> int:
    """The rows of collection ``name`` that match ``expr`` ("" for all), as the database counts them."""
    rows = call("query", name, filter=expr, output_fields=["count(*)"], consistency_level=CONSISTENCY)
    return int(rows[0]["count(*)"])
