"""Approximate nearest-neighbour indexes (faiss) for galleries too large for exact search.

faiss is an optional dependency: only ``index_type`` "ivf" and "hnsw" need it, and
`require_faiss` says how to install it. Both indexes store the vectors as float16 (faiss's
scalar quantizer, QT_fp16): the index then takes at most the float32 matrix's memory, and
the float16 rounding is undone by re-ranking the candidates in float32 (`GalleryIndex`).

Index types and their parameters (defaults from the gallery size n, `default_params`):

* ``ivf``  - IndexIVFScalarQuantizer (IVF-Flat with float16 codes): k-means splits the
  gallery into ``nlist`` cells; a query scans the ``nprobe`` cells nearest to it.
  nlist = the power of two nearest 2 sqrt(n) (60,502 -> 512; 1M -> 2048; 10M -> 8192), at
  most n / 39 (faiss wants >= 39 training points per cell); nprobe = nlist / 24 (at least
  8), i.e. ~4 % of the gallery scanned: recall@10 0.97 at both 60,502 and 1M on clustered
  128-d embeddings (bench/bench_ann.py; nlist / 16: 0.999). k-means: 39 points per cell, 10
  iterations. Memory: n x (2 D + 8) bytes + the centroids (~0.52x the float32 matrix).
  Build: under a minute per million vectors on 2 cores.
* ``hnsw`` - IndexHNSWSQ (HNSW graph over float16 vectors, L2 on unit vectors = cosine
  order): ``M`` = 24 links per node (M = 32 would take more memory than the float32
  matrix at D = 128); both beams grow with the gallery: efConstruction = 200 sqrt(n / 1M)
  in [80, 400] (`hnsw_ef_construction`) and ``efSearch`` = 256 sqrt(n / 1M) in [128, 1024]
  (`hnsw_ef_search`; also the Milvus backend's ``ef``): 60,502 -> 80 / 128, 1M -> 200 / 256.
  recall@10 on clustered synthetic embeddings (bench/bench_ann.py): 0.99 at 60,502 and at 1M.
  The graph is what fails first as n grows: at 1M, built with efConstruction 80 (the former
  fixed default) recall@10 stays at 0.80-0.84 for any efSearch from 128 to 1024; built with
  200 it is 0.97 / 0.99 / 0.994 at efSearch 128 / 256 / 512. With M = 16 / efConstruction =
  40 recall stayed ~0.7 at 60,502. Memory: n x (2 D + 8 M) bytes plus upper levels (~0.9x
  float32). Build on 2 shared cores: 2.7 s at 60,502, 14 s at 200k (efConstruction 80),
  7-9 min at 1M (efConstruction 200; 3.5 min with 80) - ivf builds 1M in 7-77 s.

Recall is traded for speed with nprobe / efSearch at query time (`set_search_params`); with
nprobe = nlist, or efSearch >= n, the search is exhaustive and equals exact search.
"""

from __future__ import annotations

import math
import time

import numpy as np

INDEX_TYPES = ("exact", "ivf", "hnsw")
INSTALL_HINT = "pip install faiss-cpu"
# vectors added per faiss call: a progress-bar step, small enough to update every few seconds
_ADD_CHUNK = 65_536


def require_faiss(what="an approximate index"):
    """The faiss module, or an ImportError naming the install command."""
    try:
        import faiss
    except ImportError:
        raise ImportError(
            f"{what} needs faiss, which is not installed: {INSTALL_HINT} "
            "(or use --index_type exact, which needs nothing)"
        ) from None
    return faiss


def check_index_type(index_type: str) -> str:
    if index_type not in INDEX_TYPES:
        raise ValueError(f"index type must be one of {', '.join(INDEX_TYPES)}, got {index_type!r}")
    return index_type


def default_params(index_type: str, n: int) -> dict:
    """Build and search parameters for a gallery of ``n`` vectors (module docstring)."""
    check_index_type(index_type)
    if index_type == "ivf":
        nlist = 2 ** round(math.log2(max(1.0, 2 * math.sqrt(max(n, 1)))))
        nlist = int(max(1, min(nlist, n // 39 or 1)))
        return {"nlist": nlist, "nprobe": ivf_nprobe(nlist), "train_points_per_cell": 39, "kmeans_iters": 10}
    if index_type == "hnsw":
        return {"M": HNSW_M, "efConstruction": hnsw_ef_construction(n), "efSearch": hnsw_ef_search(n)}
    return {}


def ivf_nprobe(nlist: int) -> int:
    """Cells an ivf query scans by default: nlist / 24 (~4 % of the gallery), at least 8."""
    return int(max(min(nlist, 8), nlist // 24))


HNSW_M = 24  # links per node (module docstring: M = 32 takes more memory than float32 at D = 128)


def _scaled(n: int, at_1m: int, low: int, high: int) -> int:
    """``at_1m * sqrt(n / 1M)`` clamped to [low, high], a multiple of 8."""
    value = at_1m * math.sqrt(max(int(n), 1) / 1_000_000)
    return int(min(high, max(low, 8 * round(value / 8))))


def hnsw_ef_search(n: int) -> int:
    """HNSW search beam (faiss ``efSearch``, Milvus ``ef``) for a gallery of ``n`` vectors:
    256 sqrt(n / 1M), at least 128, at most 1024 (60,502 -> 128; 250k -> 128; 1M -> 256;
    4M -> 512). Measured on clustered 128-d embeddings (bench/bench_ann.py), with
    `hnsw_ef_construction`'s graph: recall@10 0.99 at 60,502 and 1M."""
    return _scaled(n, 256, 128, 1024)


def hnsw_ef_construction(n: int) -> int:
    """HNSW build beam (faiss ``efConstruction``, Milvus ``efConstruction``) for ``n`` vectors:
    200 sqrt(n / 1M), at least 80, at most 400 (60,502 -> 80; 160k -> 80; 1M -> 200; 4M -> 400).
    At 1M a graph built with 80 stays at recall@10 0.80-0.84 whatever efSearch (128-1024);
    built with 200 it reaches 0.97 at efSearch 128 and 0.99 at 256 (bench/README.md)."""
    return _scaled(n, 200, 80, 400)


def build(embeddings: np.ndarray, index_type: str, params: dict, progress=True, seed=0):
    """A faiss index of ``embeddings`` (unit float32 rows, inner product) with ``params``."""
    from tqdm.auto import tqdm

    faiss = require_faiss(f"--index_type {index_type}")
    x = np.ascontiguousarray(embeddings, dtype=np.float32)
    n, d = x.shape
    fp16 = faiss.ScalarQuantizer.QT_fp16
    if index_type == "ivf":
        quantizer = faiss.IndexFlatIP(d)
        index = faiss.IndexIVFScalarQuantizer(quantizer, d, params["nlist"], fp16, faiss.METRIC_INNER_PRODUCT)
        index.cp.niter = params["kmeans_iters"]
        index.cp.seed = seed
        index.cp.max_points_per_centroid = params["train_points_per_cell"]
        # a seeded sample, not faiss's own: the same gallery always gives the same index
        sample = min(n, params["nlist"] * params["train_points_per_cell"])
        rows = np.sort(np.random.default_rng(seed).choice(n, sample, replace=False))
        with tqdm(total=1, desc=f"ivf: k-means ({params['nlist']} cells)", disable=not progress, leave=False) as bar:
            index.train(x[rows])
            bar.update()
    elif index_type == "hnsw":
        # L2, not inner product: on unit vectors both rank alike (|q - g|^2 = 2 - 2 q.g), and
        # HNSW's graph heuristics assume a metric; with METRIC_INNER_PRODUCT recall@10 stays
        # ~0.7 on clustered embeddings. Scores are re-ranked in float32 anyway.
        index = faiss.IndexHNSWSQ(d, fp16, params["M"], faiss.METRIC_L2)
        index.hnsw.efConstruction = params["efConstruction"]
        index.train(x[: min(n, 1)])  # float16 needs no statistics; faiss wants the call
    else:
        raise ValueError(f"build() makes approximate indexes only, not {index_type!r}")
    for start in tqdm(
        range(0, n, _ADD_CHUNK), desc=f"{index_type}: adding", disable=not progress, unit="chunk", leave=False
    ):
        index.add(x[start : start + _ADD_CHUNK])
    set_search_params(index, index_type, params)
    return index


def set_search_params(index, index_type: str, params: dict) -> None:
    """Apply nprobe (ivf) / efSearch (hnsw) from ``params`` to a built faiss index."""
    if index_type == "ivf":
        index.nprobe = int(params["nprobe"])
    elif index_type == "hnsw":
        index.hnsw.efSearch = int(params["efSearch"])


def exhaustive_params(index_type: str, params: dict, n: int) -> dict:
    """``params`` with the search settings that visit the whole gallery (exact results)."""
    out = dict(params)
    if index_type == "ivf":
        out["nprobe"] = out["nlist"]
    elif index_type == "hnsw":
        out["efSearch"] = max(int(n), 1)
    return out


def serialize(index) -> np.ndarray:
    faiss = require_faiss()
    return faiss.serialize_index(index)


def deserialize(blob: np.ndarray):
    faiss = require_faiss("loading a saved approximate index")
    return faiss.deserialize_index(np.ascontiguousarray(blob, dtype=np.uint8))


def index_bytes(index) -> int:
    """Bytes the index occupies (its serialized size: codes, ids, centroids, graph)."""
    return int(serialize(index).nbytes)


def search(index, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """faiss search; (scores float32 [Q, k], indices int64 [Q, k], -1 where nothing found)."""
    scores, idx = index.search(np.ascontiguousarray(queries, dtype=np.float32), int(k))
    return scores.astype(np.float32, copy=False), idx.astype(np.int64, copy=False)


def recall_at_k(approx_idx: np.ndarray, exact_idx: np.ndarray, k: int = 10) -> float:
    """recall@k of an approximate search against the exact one: the mean over queries of
    |approx top k  intersect  exact top k| / |exact top k| (padding -1 ignored)."""
    a = np.asarray(approx_idx)[:, :k]
    e = np.asarray(exact_idx)[:, :k]
    if a.shape[0] != e.shape[0]:
        raise ValueError(f"{a.shape[0]} approximate result rows vs {e.shape[0]} exact ones")
    hits, total = 0, 0
    for row_a, row_e in zip(a, e):
        truth = set(row_e[row_e >= 0].tolist())
        hits += len(truth.intersection(row_a[row_a >= 0].tolist()))
        total += len(truth)
    return hits / total if total else float("nan")


def timed_build(embeddings, index_type, params, progress=True):
    """(faiss index, build seconds)."""
    t0 = time.perf_counter()
    index = build(embeddings, index_type, params, progress=progress)
    return index, time.perf_counter() - t0
