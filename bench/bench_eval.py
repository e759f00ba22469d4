"""Benchmark: exact evaluation of both protocols on SOP-sized embeddings vs faiss.

Generates 60,502 x 128 float32 unit vectors with the structure of the SOP test split
(11,316 products of 2-12 images, 12 categories, listed by category and product as in
Ebay_test.txt), clustered so that the metrics are neither 0 nor 1, then times in one run on
this machine:

* ``retrieval.evaluate_embeddings`` (both protocols, every metric), in a fresh
  subprocess so that its peak RSS is its own;
* faiss-cpu ``IndexFlatIP.search`` with k=32 and k=1001 on the same vectors (self-search:
  what a faiss-based evaluator would need for Recall@32 / Recall@1000 alone).

Prints one JSON object; ``ratio_vs_faiss_k32`` = ours / faiss k=32 (target <= 1.0) and
``peak_rss_mb`` = peak resident memory of the process that ran ours (target <= 2048).

    python bench/bench_eval.py [--num_images 60502] [--num_products 11316] [--repeats 1]
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
import platform
import resource
import subprocess
import sys
import tempfile
import time
import tracemalloc

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def get_args_parser():
    p = argparse.ArgumentParser("bench_eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num_images", type=int, default=60502, help="SOP test split: 60502")
    p.add_argument("--num_products", type=int, default=11316, help="SOP test split: 11316")
    p.add_argument("--num_categories", type=int, default=12)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--spread", type=float, default=1.2, help="spread of product centres around their category direction"
    )
    p.add_argument(
        "--noise", type=float, default=1.3, help="per-image noise around its product centre (higher = harder)"
    )
    p.add_argument(
        "--shuffle", action="store_true", help="random image order instead of SOP's by-category/by-product order"
    )
    p.add_argument("--chunk_size", type=int, default=1024)
    p.add_argument("--threads", type=int, default=None, help="default: the CPUs available")
    p.add_argument("--repeats", type=int, default=1, help="timed runs of each method (the minimum is kept)")
    p.add_argument("--skip_faiss", action="store_true")
    p.add_argument("--no_check", action="store_true", help="skip the faiss cross-check of Recall@1")
    # internal: run only our evaluation on a saved .npz and print its timing as JSON
    p.add_argument("--_ours", default=None, help=argparse.SUPPRESS)
    return p


def make_sop_like(num_images, num_products, num_categories, dim, noise, seed, shuffle=False, spread=1.0):
    """Embeddings with SOP's structure: product sizes 2-12 (mean as in SOP), products
    spread over categories, each image = its product centre + noise, L2-normalised.
    Product centres of one category share a category direction, so category retrieval is
    easier than product retrieval, as on SOP."""
    rng = np.random.default_rng(seed)
    if not 2 * num_products <= num_images <= 12 * num_products:
        raise ValueError("need 2..12 images per product")
    # sizes: start at the mean, then move single images between products within [2, 12]
    sizes = np.full(num_products, num_images // num_products)
    sizes[: num_images - sizes.sum()] += 1
    for _ in range(4):
        donors = rng.integers(0, num_products, size=num_products)
        takers = rng.integers(0, num_products, size=num_products)
        for d, t in zip(donors, takers):
            if sizes[d] > 2 and sizes[t] < 12 and d != t:
                sizes[d] -= 1
                sizes[t] += 1
    category = np.sort(rng.integers(0, num_categories, size=num_products))
    cat_dir = rng.standard_normal((num_categories, dim)).astype(np.float32)
    cat_dir /= np.linalg.norm(cat_dir, axis=1, keepdims=True)
    centres = cat_dir[category] + spread * rng.standard_normal((num_products, dim)).astype(np.float32) / np.sqrt(dim)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    class_ids = np.repeat(np.arange(num_products), sizes)
    x = centres[class_ids] + noise * rng.standard_normal((num_images, dim)).astype(np.float32) / np.sqrt(dim)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    super_ids = category[class_ids] + 1
    if shuffle:
        perm = rng.permutation(num_images)
        x, class_ids, super_ids = x[perm], class_ids[perm], super_ids[perm]
    return np.ascontiguousarray(x, dtype=np.float32), class_ids.astype(np.int64), super_ids.astype(np.int64)


def cpu_name():
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def run_ours(npz, chunk_size, threads, repeats):
    sys.path.insert(0, str(REPO))
    import retrieval

    data = np.load(npz)
    x, c, s = data["x"], data["class_ids"], data["super_ids"]
    times, cpu = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        metrics = retrieval.evaluate_embeddings(x, c, s, chunk_size=chunk_size, num_threads=threads)
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    # one more, untimed run under tracemalloc: the peak of the arrays it allocates itself
    tracemalloc.start()
    retrieval.evaluate_embeddings(x, c, s, chunk_size=chunk_size, num_threads=threads)
    traced_mb = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    print(
        json.dumps(
            {
                "seconds": min(times),
                "all_seconds": times,
                "cpu_seconds": min(cpu),
                "peak_rss_mb": rss_mb,
                "peak_traced_mb": traced_mb,
                "metrics": metrics,
                "torch_loaded": "torch" in sys.modules,
            }
        )
    )


def main(args):
    if args._ours:
        return run_ours(args._ours, args.chunk_size, args.threads, args.repeats)
    x, class_ids, super_ids = make_sop_like(
        args.num_images,
        args.num_products,
        args.num_categories,
        args.dim,
        args.noise,
        args.seed,
        args.shuffle,
        args.spread,
    )
    result = {
        "num_images": len(x),
        "num_products": int(len(np.unique(class_ids))),
        "num_categories": int(len(np.unique(super_ids))),
        "dim": x.shape[1],
        "order": "shuffled" if args.shuffle else "by category and product (as Ebay_test.txt)",
        "cpu": cpu_name(),
        "cpus_available": len(os.sched_getaffinity(0)),
        "OPENBLAS_CORETYPE": os.environ.get("OPENBLAS_CORETYPE"),
        "load_average_at_start": os.getloadavg()[0],
    }
    with tempfile.TemporaryDirectory() as tmp:
        npz = os.path.join(tmp, "emb.npz")
        np.savez(npz, x=x, class_ids=class_ids, super_ids=super_ids)
        # ours first, in its own process: its peak RSS is then ours alone
        cmd = [
            sys.executable,
            os.path.abspath(__file__),
            "--_ours",
            npz,
            "--chunk_size",
            str(args.chunk_size),
            "--repeats",
            str(args.repeats),
        ]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        stdout = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        ours = json.loads(stdout.strip().splitlines()[-1])
    result["ours_s"] = round(ours["seconds"], 3)
    result["ours_cpu_s"] = round(ours["cpu_seconds"], 3)
    result["ours_all_s"] = [round(t, 3) for t in ours["all_seconds"]]
    result["peak_rss_mb"] = round(ours["peak_rss_mb"], 1)
    result["peak_traced_mb"] = round(ours["peak_traced_mb"], 1)
    result["torch_loaded_in_ours"] = ours["torch_loaded"]
    result["metrics"] = ours["metrics"]
    if not args.skip_faiss:
        import faiss

        index = faiss.IndexFlatIP(x.shape[1])
        index.add(x)
        for k in (32, 1001):
            times, cpu = [], []
            for _ in range(args.repeats):
                t0, c0 = time.perf_counter(), time.process_time()
                _, idx = index.search(x, k)
                times.append(time.perf_counter() - t0)
                cpu.append(time.process_time() - c0)
            result[f"faiss_k{k}_s"] = round(min(times), 3)
            result[f"faiss_k{k}_cpu_s"] = round(min(cpu), 3)
            if k == 32 and not args.no_check:
                # sanity: faiss's own Recall@1 (self dropped by index) agrees with ours up to
                # float rounding between two BLAS builds
                first = np.where(idx[:, 0] == np.arange(len(x)), idx[:, 1], idx[:, 0])
                result["faiss_recall@1_check"] = round(float(np.mean(class_ids[first] == class_ids)), 5)
            del idx
        result["faiss_threads"] = faiss.omp_get_max_threads()
        result["ratio_vs_faiss_k32"] = round(result["ours_s"] / result["faiss_k32_s"], 3)
        result["ratio_vs_faiss_k1001"] = round(result["ours_s"] / result["faiss_k1001_s"], 3)
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main(get_args_parser().parse_args())
