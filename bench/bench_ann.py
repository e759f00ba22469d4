"""Exact vs approximate gallery search (search.index.GalleryIndex) on one thread; prints JSON.

    python bench/bench_ann.py                                  # n = 60,502 and 1,000,000
    python bench/bench_ann.py --sizes 200000 --indexes exact,ivf
    python bench/bench_ann.py --embeddings gallery_test.npz    # a real gallery (npz / npy)
    python bench/bench_ann.py --sizes 1000000 --indexes hnsw --ef_sweep 128,256,512  # one build

Gallery: clustered synthetic 128-d unit vectors shaped like product embeddings (12
categories, products of ~5 images around a product centre, images around it); queries are
further images of gallery products, so each has close neighbours, as a shop photo does.
For every index type, one row: build_s (seconds to build; exact: the float16 copy),
bytes (the search structure: exact = float16 matrix; ivf / hnsw = the serialized faiss
index; the float32 matrix, kept for re-ranking, is n x 512 bytes besides), p50_ms / p95_ms
of single queries through GalleryIndex.search (top 10), recall@10 against the exact float32
top 10, and flat_p50_ms: faiss IndexFlatIP on the same queries in the same run. Single
queries of all indexes are interleaved (a busy neighbour slows them alike). Queries run on one
thread (faiss OpenMP and BLAS limited to 1); builds use every core (build_threads).
"""

import argparse
import json
import os
from pathlib import Path
import sys
import time

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import knn
from search import ann
from search.index import GalleryIndex

SOP_TEST_SIZE = 60_502
BUILD_THREADS = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def get_args_parser():
    parser = argparse.ArgumentParser(
        "bench_ann.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", default=f"{SOP_TEST_SIZE},1000000", help="comma-separated gallery sizes (synthetic)")
    parser.add_argument("--indexes", default="exact,ivf,hnsw", help="comma-separated index types")
    parser.add_argument("--dim", default=128, type=int)
    parser.add_argument("--queries", default=200, type=int, help="timed single queries per index")
    parser.add_argument("--k", default=10, type=int)
    parser.add_argument(
        "--embeddings", default=None, help="real embeddings: .npy [N, D] or a gallery index .npz; replaces --sizes"
    )
    parser.add_argument("--seed", default=0, type=int)
    parser.add_argument(
        "--ef_sweep",
        default="",
        help="comma-separated efSearch values: after the timed rows, the hnsw index is "
        "searched again at each (p50 and recall@10 per value, key ef_sweep; the "
        "same build, so one slow build answers which efSearch a size needs)",
    )
    parser.add_argument("--nprobe_sweep", default="", help="the same for ivf's nprobe")
    return parser


def clustered(n, dim, rng, num_products=None, product_spread=1.0, image_spread=0.5):
    """(gallery [n, dim], product id of each row, product centres): unit vectors."""
    num_products = num_products or max(1, n // 5)
    categories = rng.standard_normal((12, dim), dtype=np.float32)
    categories /= np.linalg.norm(categories, axis=1, keepdims=True)
    centres = categories[rng.integers(0, 12, num_products)]
    centres += rng.standard_normal((num_products, dim), dtype=np.float32) * np.float32(product_spread / np.sqrt(dim))
    product = rng.integers(0, num_products, n)
    x = centres[product] + rng.standard_normal((n, dim), dtype=np.float32) * np.float32(image_spread / np.sqrt(dim))
    return knn.l2_normalize(x), product, centres


def synthetic(n, dim, num_queries, seed):
    rng = np.random.default_rng(seed)
    gallery, _, centres = clustered(n, dim, rng)
    # queries: new photos of gallery products
    picks = rng.integers(0, len(centres), num_queries)
    q = centres[picks] + rng.standard_normal((num_queries, dim), dtype=np.float32) * np.float32(0.5 / np.sqrt(dim))
    return gallery, knn.l2_normalize(q)


def real(path, num_queries, seed):
    path = Path(path)
    if path.suffix == ".npz":
        gallery = GalleryIndex.load(path).embeddings
    else:
        gallery = np.load(path, mmap_mode="r")
    gallery = knn.l2_normalize(gallery)
    rng = np.random.default_rng(seed)
    rows = rng.choice(len(gallery), num_queries, replace=False)
    # a query is a gallery image moved a little: a neighbour of itself, not the image itself
    noise = rng.standard_normal(gallery[rows].shape, dtype=np.float32)
    q = gallery[rows] + noise * np.float32(0.1 / np.sqrt(gallery.shape[1]))
    return gallery, knn.l2_normalize(q)


def make_index(gallery, index_type):
    n = len(gallery)
    return GalleryIndex(
        embeddings=gallery,
        paths=[str(i) for i in range(n)],
        class_ids=np.zeros(n, np.int64),
        super_ids=np.ones(n, np.int64),
        image_list_hash="bench",
        index_type=index_type,
    )


def percentiles(times_s):
    ms = np.asarray(times_s) * 1e3
    return round(float(np.percentile(ms, 50)), 4), round(float(np.percentile(ms, 95)), 4)


def sweep(index, queries, truth, k, name, values):
    """[{name: v, p50_ms, p95_ms, recall@10}] for each search parameter value, one thread."""
    out = []
    for v in values:
        index.set_search_params(**{name: v})
        for q in queries[:10]:
            index.search(q, k)
        times, found = [], []
        for q in queries:
            t0 = time.perf_counter()
            found.append(index.search(q, k)[1][0])
            times.append(time.perf_counter() - t0)
        p50, p95 = percentiles(times)
        out.append(
            {name: v, "p50_ms": p50, "p95_ms": p95, "recall@10": round(ann.recall_at_k(np.stack(found), truth, k), 4)}
        )
    return out


def run_size(gallery, queries, index_types, k, sweeps=None):
    faiss = ann.require_faiss("bench_ann.py")
    n = len(gallery)
    _, truth = knn.knn(queries, gallery, k, normalize=False)
    flat = faiss.IndexFlatIP(gallery.shape[1])
    flat.add(gallery)
    indexes, build_s, nbytes = {}, {}, {}
    faiss.omp_set_num_threads(BUILD_THREADS)  # builds use every core; queries one thread
    for t in index_types:
        index = make_index(gallery, t)
        t0 = time.perf_counter()
        if t == "exact":
            index.search(queries[0], k)  # makes the float16 copy (and compiles the kernel once)
            nbytes[t] = int(index._subset(None)[3].nbytes)
        else:
            index.build_ann(progress=False)
            nbytes[t] = ann.index_bytes(index._ann)
        build_s[t] = time.perf_counter() - t0
        indexes[t] = index
    faiss.omp_set_num_threads(1)
    tasks = {"flat": lambda q: flat.search(q[None], k)}
    tasks.update({t: (lambda q, ix=ix: ix.search(q, k)) for t, ix in indexes.items()})
    for q in queries[:10]:  # warm-up: caches, page faults, the kernel's first call
        for fn in tasks.values():
            fn(q)
    times = {name: [] for name in tasks}
    found = {t: [] for t in indexes}
    for i, q in enumerate(queries):
        names = list(tasks)
        names = names[i % len(names) :] + names[: i % len(names)]
        for name in names:
            t0 = time.perf_counter()
            out = tasks[name](q)
            times[name].append(time.perf_counter() - t0)
            if name in found:
                found[name].append(out[1][0])
    flat_p50, _ = percentiles(times["flat"])
    rows = []
    for t, index in indexes.items():
        p50, p95 = percentiles(times[t])
        rows.append(
            {
                "n": n,
                "index": t,
                "build_s": round(build_s[t], 3),
                "bytes": nbytes[t],
                "p50_ms": p50,
                "p95_ms": p95,
                "recall@10": round(ann.recall_at_k(np.stack(found[t]), truth, k), 4),
                "flat_p50_ms": flat_p50,
                "vs_flat": round(p50 / flat_p50, 3),
                "float32_bytes": int(gallery.nbytes),
                "params": dict(index.ann_params),
            }
        )
    for r in rows:  # after the timed rows: a sweep leaves the index at other settings
        name, values = {
            "hnsw": ("efSearch", (sweeps or {}).get("hnsw")),
            "ivf": ("nprobe", (sweeps or {}).get("ivf")),
        }.get(r["index"], (None, None))
        if values:
            r[f"{name}_sweep"] = sweep(indexes[r["index"]], queries, truth, k, name, values)
            indexes[r["index"]].set_search_params(**{name: r["params"][name]})
    exact = next((r for r in rows if r["index"] == "exact"), None)
    for r in rows:
        if exact is not None:
            r["vs_exact"] = round(r["p50_ms"] / exact["p50_ms"], 4)
    return rows


def main(args):
    faiss = ann.require_faiss("bench_ann.py")
    faiss.omp_set_num_threads(1)
    from threadpoolctl import threadpool_limits

    threadpool_limits(1)
    index_types = [t for t in args.indexes.split(",") if t]
    for t in index_types:
        ann.check_index_type(t)
    sweeps = {
        "hnsw": [int(v) for v in args.ef_sweep.split(",") if v],
        "ivf": [int(v) for v in args.nprobe_sweep.split(",") if v],
    }
    load_before = os.getloadavg()
    results = []
    if args.embeddings:
        gallery, queries = real(args.embeddings, args.queries, args.seed)
        results += run_size(gallery, queries, index_types, args.k, sweeps)
    else:
        for n in (int(s) for s in args.sizes.split(",") if s):
            gallery, queries = synthetic(n, args.dim, args.queries, args.seed)
            results += run_size(gallery, queries, index_types, args.k, sweeps)
            del gallery
    out = {
        "results": results,
        "queries": args.queries,
        "k": args.k,
        "query_threads": 1,
        "build_threads": BUILD_THREADS,
        "data": args.embeddings or "synthetic clustered unit vectors",
        "loadavg_1min_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
        "targets": {
            "exact_vs_flat": 1.0,
            "ann_recall@10_at_1M": 0.95,
            "ann_vs_exact_at_1M": 0.1,
            "ann_bytes_vs_float32": 1.0,
        },
    }
    print(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main(get_args_parser().parse_args())
