"""End-to-end latency of a plain query (SearchEngine.search_file) against a query plus the
similarity maps of its first K results (SearchEngine.explain_results), on CPU.

    python bench/bench_explain.py [--backbone efficientnet_lite0] [--image_size 224] [--iters 20]

Prints JSON: p50 / p95 in ms of both and ``explain_vs_plain`` (the p50 ratio). Weights "none":
random weights cost the same as trained ones. The gallery is the tiny synthetic demo's.
"""
import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import datasets  # noqa: E402
import models  # noqa: E402
from search import engine as search_engine  # noqa: E402
from search.tiny_demo import make_tiny_demo  # noqa: E402


def percentiles(times):
    ms = np.array(times) * 1e3
    return {"p50_ms": round(float(np.percentile(ms, 50)), 2), "p95_ms": round(float(np.percentile(ms, 95)), 2)}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--backbone", default="efficientnet_lite0")
    p.add_argument("--image_size", type=int, default=224)
    p.add_argument("--k", type=int, default=5)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--threads", type=int, default=None)
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    folder = Path(tempfile.mkdtemp(prefix="bench_explain-"))
    data_root, checkpoint = make_tiny_demo(folder, num_products=20, image_size=a.image_size)
    model = models.build_model(a.backbone, weights="none", image_size=a.image_size)
    index, _ = search_engine.load_or_build_index(model, checkpoint, data_root, "test", progress=False,
                                                 index_path=folder / "index.npz", model_key="bench")
    engine = search_engine.SearchEngine(model, index, data_root)
    queries = datasets.SOPDataset(data_root, "test").paths
    engine.warm_up()
    plain, explained = [], []
    for n in range(a.iters + 2):
        q = queries[n % len(queries)]
        t0 = time.perf_counter()
        out = engine.search_file(q, k=10)
        t1 = time.perf_counter()
        engine.explain_results(q, [r["index"] for r in out["results"][:a.k]])
        t2 = time.perf_counter()
        if n >= 2:  # the first two warm the explanation path
            plain.append(t1 - t0)
            explained.append(t2 - t0)
    pl, ex = percentiles(plain), percentiles(explained)
    print(json.dumps({"backbone": a.backbone, "image_size": a.image_size, "k_explained": a.k,
                      "threads": torch.get_num_threads(), "iters": a.iters, "gallery_size": len(index),
                      "plain": pl, "query_plus_explain": ex,
                      "explain_vs_plain": round(ex["p50_ms"] / pl["p50_ms"], 2)}, indent=1))


if __name__ == "__main__":
    main()
