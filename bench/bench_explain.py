"""What "Show why" costs: the demo's plain query (search.engine.SearchEngine.search_file, an
uploaded file to ranked results) against the same query followed by the similarity maps of its
first K results (app_stanford.why_outputs, what the switch runs after the search), on CPU, for
the torch and the onnx runtime. Two settings of the switch's path: with the explanation store
(the demo's default: the results' projections are read, the query's grid is the one its search
computed) and without it (``--explain_store_gb 0``: the network runs over the K results).

    python bench/bench_explain.py [--backbone efficientnet_lite0] [--image_size 224] [--k 5]
                                  [--iters 20] [--output bench/explain.json]

Prints (and writes) JSON: per runtime and setting, p50 / p95 in ms of both and
``explain_vs_plain`` (the ratio of the p50s, measured in the same loop). Random weights cost what trained ones cost; the
gallery is the tiny synthetic demo's (its size does not matter: the maps are of K images).
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
import app_stanford  # noqa: E402
import datasets  # noqa: E402
from dataio import fileio  # noqa: E402
from search import engine as search_engine  # noqa: E402
from search.tiny_demo import make_tiny_demo  # noqa: E402


def percentiles(seconds):
    ms = np.array(seconds) * 1e3
    return {"p50_ms": round(float(np.percentile(ms, 50)), 2), "p95_ms": round(float(np.percentile(ms, 95)), 2)}


def measure(engine, queries, k, iters, warm=3):
    """p50 / p95 of the plain query and of the query plus the maps of its first k results."""
    plain, explained = [], []
    for n in range(iters + warm):
        q = queries[n % len(queries)]
        t0 = time.perf_counter()
        ranked = engine.search_file(q, k=10)
        t1 = time.perf_counter()
        app_stanford.why_outputs(engine, q, ranked, True, k=k)
        t2 = time.perf_counter()
        if n >= warm:  # the first ones load the torch twin and warm the explanation path
            plain.append(t1 - t0)
            explained.append(t2 - t0)
    pl, ex = percentiles(plain), percentiles(explained)
    return {"plain": pl, "query_plus_explain": ex, "explain_vs_plain": round(ex["p50_ms"] / pl["p50_ms"], 2)}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default="efficientnet_lite0")
    p.add_argument("--image_size", type=int, default=224)
    p.add_argument("--k", type=int, default=app_stanford.WHY_K, help="results explained")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--runtimes", nargs="+", default=["torch", "onnx"], choices=["torch", "onnx"])
    p.add_argument("--output", default=None, help="also write the JSON here")
    a = p.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="bench_explain-"))
    data_root, checkpoint = make_tiny_demo(folder, num_products=20, image_size=a.image_size, backbone=a.backbone)
    queries = datasets.SOPDataset(data_root, "test").paths
    out = {"backbone": a.backbone, "image_size": a.image_size, "k_explained": a.k, "iters": a.iters,
           "threads": torch.get_num_threads(), "runtimes": {}}
    for runtime in a.runtimes:
        loaded = search_engine.load_search_model(checkpoint, runtime=runtime, device="cpu")
        index, _ = search_engine.load_or_build_index(loaded.model, checkpoint, data_root, "test", progress=False,
                                                     index_path=folder / f"index_{runtime}.npz",
                                                     model_key=loaded.key)
        engine = search_engine.SearchEngine(loaded.model, index, data_root, explain_source=checkpoint)
        engine.warm_up()
        rows = out["runtimes"][runtime] = {}
        app_stanford.attach_store(engine, 1.0, progress=False)
        rows["store"] = measure(engine, queries, a.k, a.iters)
        app_stanford.attach_store(engine, 0)
        rows["no_store"] = measure(engine, queries, a.k, a.iters)
        out["gallery_size"] = len(index)
    text = json.dumps(out, indent=1)
    print(text)
    if a.output:
        fileio.atomic_write_text(a.output, text + "\n")


if __name__ == "__main__":
    main()
