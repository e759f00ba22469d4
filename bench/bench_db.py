"""The gallery in Milvus Lite and on a Milvus server (search.vectordb) against the file index
(search.index), in one run; prints JSON and writes it to --out.

    python bench/bench_db.py                                   # 10k, 100k and 1M vectors
    python bench/bench_db.py --sizes 10000,100000 --indexes exact,hnsw
    python bench/bench_db.py --sizes 1000000 --indexes hnsw --ef_sweep 512,1024   # beams, one build
    milvus-server --data /tmp/mv --proxy-port 19530 &          # Milvus Standalone 2.3.5 (pip: milvus)
    python bench/bench_db.py --sizes 10000,100000 --server http://127.0.0.1:19530 --out bench/db_server.json

Gallery: synthetic 128-d unit vectors in 12 categories (products of ~5 images around a product
centre, as bench_ann.py shapes them); queries are further images of gallery products. Per size,
one row per backend and index type:

* ``insert_per_s``: rows written per second (file: GalleryIndex built and saved as .npz;
  milvus: `MilvusGallery.publish`, upserts of 4,096 rows and the flush); ``index_ready_s``: the
  seconds after that until Milvus reports its index built over every row (queries are timed
  from then on); ``update_per_s``: changed rows written per second when 1% of the gallery
  changes (file: the index rebuilt and saved, as ``--watch`` does; milvus: their upsert and
  the flush, then the rows read back, as `MilvusGallery.update` does);
* ``p50_ms`` / ``p95_ms``: one query, top 10, through the search the demo calls
  (``GalleryIndex.search`` / ``MilvusGallery.search``, exact float32 re-rank included), on the
  whole gallery and (``filtered_*``) within one category of the 12;
* ``recall@10``: against the file index's exact top 10; ``disk_bytes``: the .npz file / the
  Milvus Lite database folder (a server's disk is not measured: null).

Backends: ``file``, ``milvus-lite`` (a local database, in this process's Milvus Lite) and, with
``--server URI``, ``milvus-server`` (its collection is made for the run and dropped after it).
"""

import argparse
import json
import os
from pathlib import Path
import shutil
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import knn
from search import collection, gallery, vectordb

MODEL_ARGS = {"backbone": "synthetic", "image_size": 0, "embedding_size": 128}
CATEGORIES = 12


def get_args_parser():
    parser = argparse.ArgumentParser(
        "bench_db.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", default="10000,100000,1000000", help="comma-separated gallery sizes")
    parser.add_argument("--indexes", default="exact,hnsw", help="Milvus index types (exact = FLAT, ivf, hnsw)")
    parser.add_argument("--queries", default=100, type=int, help="timed single queries per row")
    parser.add_argument("--k", default=10, type=int)
    parser.add_argument("--seed", default=0, type=int)
    parser.add_argument(
        "--ef_sweep",
        default="",
        help="comma-separated efSearch values: extra hnsw rows on the "
        "same build (filtered searches scale each as the defaults do)",
    )
    parser.add_argument("--server", default=None, help="a Milvus server URI (http://HOST:19530): its rows too")
    parser.add_argument("--workdir", default=None, help="where the files go (default: a temporary folder)")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "db.json"))
    return parser


def synthetic(n, dim, queries, seed):
    """(gallery [n, dim], queries [queries, dim]) unit vectors, products of ~5 images."""
    rng = np.random.default_rng(seed)
    products = max(1, n // 5)
    centres = rng.normal(size=(products, dim)).astype(np.float32)
    owner = rng.integers(0, products, size=n)
    emb = centres[owner] + 0.6 * rng.normal(size=(n, dim)).astype(np.float32)
    q = centres[owner[rng.integers(0, n, size=queries)]] + 0.6 * rng.normal(size=(queries, dim)).astype(np.float32)
    return knn.l2_normalize(emb), knn.l2_normalize(q)


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def timed(search, queries, k, super_id):
    times, found = [], []
    for q in queries:
        t0 = time.perf_counter()
        found.append(search(q, k, super_id=super_id)[1][0])
        times.append((time.perf_counter() - t0) * 1e3)
    return np.percentile(times, 50), np.percentile(times, 95), np.array(found)


def measure(name, search, queries, k, exact_all, exact_cat):
    p50, p95, found = timed(search, queries, k, None)
    fp50, fp95, found_cat = timed(search, queries, k, 1)
    recall = np.mean([len(set(a) & set(e)) / k for a, e in zip(found.tolist(), exact_all.tolist())])
    recall_cat = np.mean([len(set(a) & set(e)) / k for a, e in zip(found_cat.tolist(), exact_cat.tolist())])
    return {
        "p50_ms": round(p50, 3),
        "p95_ms": round(p95, 3),
        "filtered_p50_ms": round(fp50, 3),
        "filtered_p95_ms": round(fp95, 3),
        "recall@10": round(float(recall), 4),
        "filtered_recall@10": round(float(recall_cat), 4),
    }


def run_size(n, args, work: Path):
    emb, queries = synthetic(n, 128, args.queries, args.seed + n)
    files = sorted((f"c{i % CATEGORIES:02d}/p{i // 5}/{i:07d}.jpg", 1000 + i, i) for i in range(n))
    changed = np.random.default_rng(args.seed).choice(n, size=max(1, n // 100), replace=False)
    rows = []
    t0 = time.perf_counter()
    index = gallery.make_gallery_index(emb, files, "bench")
    path = index.save(work / f"gallery_{n}.npz")
    seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    gallery.make_gallery_index(changed_vectors(emb, changed), files, "bench").save(work / f"gallery_{n}_b.npz")
    update_s = time.perf_counter() - t0
    exact_all = np.array([index.search(q, args.k)[1][0] for q in queries])
    exact_cat = np.array([index.search(q, args.k, super_id=1)[1][0] for q in queries])
    row = {
        "n": n,
        "backend": "file",
        "index": "exact",
        "insert_per_s": round(n / seconds),
        "update_per_s": round(len(changed) / update_s),
        "disk_bytes": path.stat().st_size,
    }
    row.update(measure("file", index.search, queries, args.k, exact_all, exact_cat))
    rows.append(row)
    print(json.dumps(row), flush=True)
    backends = [("milvus-lite", None)] + ([("milvus-server", args.server)] if args.server else [])
    for backend, server in backends:
        for index_type in args.indexes.split(","):
            db = server or work / f"gallery_{n}_{index_type}.db"
            t0 = time.perf_counter()
            store = vectordb.MilvusGallery.open(
                str(db),
                work,
                "bench",
                MODEL_ARGS,
                collection=f"g_{n}_{index_type}",
                index_type=index_type,
                expected_size=n,
                rebuild=bool(server),
            )
            store.publish(index)
            store.adopt()
            seconds = time.perf_counter() - t0
            ready = wait_indexed(store)
            update_s = timed_update(store, emb, changed)
            base = {
                "n": n,
                "backend": backend,
                "index": collection.MILVUS_INDEX[index_type],
                "insert_per_s": round(n / seconds),
                "update_per_s": round(len(changed) / update_s),
                "index_ready_s": round(ready + wait_indexed(store), 1),
                "disk_bytes": None if server else folder_bytes(db),
            }
            sweep = [int(e) for e in args.ef_sweep.split(",") if e] if index_type == "hnsw" else []
            for ef in [None] + sweep:
                if ef is not None:
                    store.ann_params["efSearch"] = ef
                row = {**base, "params": dict(store.ann_params), "default": ef is None}
                row.update(measure(index_type, store.search, queries, args.k, exact_all, exact_cat))
                rows.append(row)
                print(json.dumps(row), flush=True)
            if server:
                store.client.drop_collection(store.name)
    return rows


def changed_vectors(emb, changed):
    """``emb`` with the rows ``changed`` moved a little (and unit again)."""
    out = emb.copy()
    moved = out[changed] + 0.05
    out[changed] = moved / np.linalg.norm(moved, axis=1, keepdims=True)
    return out


def timed_update(store, emb, changed) -> float:
    """Seconds to upsert the ``changed`` rows with new vectors, flush, and read the rows back;
    the vectors are written back as they were (the timed queries search the original gallery)."""
    paths = [store.paths[i] for i in changed.tolist()]
    meta = {p: (store.product_ids[i], store.categories[int(store.super_ids[i]) - 1]) for p, i in zip(paths, changed)}

    def write(vectors):
        store.client.upsert(
            store.name,
            [
                {
                    "path": p,
                    "vector": v.tolist(),
                    "product_id": meta[p][0],
                    "category": meta[p][1],
                    "size": 1,
                    "mtime_ns": 1,
                }
                for p, v in zip(paths, vectors)
            ],
        )
        store.client.flush(store.name)
        store.refresh()
        store.adopt()

    t0 = time.perf_counter()
    write(changed_vectors(emb, changed)[changed])
    seconds = time.perf_counter() - t0
    write(emb[changed])
    return seconds


def wait_indexed(store, timeout_s=3600) -> float:
    """Seconds until Milvus reports its index built over every row (it builds after the flush,
    in the background; searches meanwhile scan the rows not yet indexed)."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout_s:
        info = store.client.describe_index(store.name, "vector") or {}
        if int(info.get("pending_index_rows", 0)) == 0 and info.get("state", "Finished") == "Finished":
            break
        time.sleep(1.0)
    return time.perf_counter() - t0


def main(args):
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_db_"))
    work.mkdir(parents=True, exist_ok=True)
    out = {"machine": f"{os.cpu_count()} CPUs", "k": args.k, "queries": args.queries, "rows": []}
    try:
        for n in [int(s) for s in args.sizes.split(",") if s]:
            out["rows"] += run_size(n, args, work)
            Path(args.out).write_text(json.dumps(out, indent=1) + "\n")  # what finished, kept
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main(get_args_parser().parse_args())
