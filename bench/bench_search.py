"""Latency of the demo's per-query path on CPU, one query at a time; prints JSON.

    python bench/bench_search.py                                   # EfficientNet-B0, 224 px, 60,502 vectors
    python bench/bench_search.py --backbone resnet18 --iters 200 --query my_photo.jpg

Measured in one process, interleaved (each round times every task, in a rotating order, so
that a busy neighbour slows them alike), all on the engine's worker thread as in the app:
  * forward      : the bare model forward of one preprocessed 224 px image (inference_mode),
                   the same model object and input layout (channels_last) the app uses;
  * forward_nchw : the same weights in PyTorch's default layout (NCHW), for reference: the
                   app's channels_last forward is faster than this;
  * search       : search.index.GalleryIndex.search of one query vector, top-k over the gallery
                   (60,502 random unit vectors, the size of the SOP test split);
  * end_to_end   : search.engine.SearchEngine.search_file: the uploaded JPEG on disk → checks →
                   decode (draft mode) → resize / crop / normalise → forward → search →
                   ranked result dicts; what the demo does per request, minus HTTP;
  * end_to_end_onnx : the same with the network exported to ONNX and run by onnxruntime
                   (``--runtime onnx``); ``onnx_end_to_end_vs_torch`` = its p50 / end_to_end's.
``end_to_end_vs_forward`` = end_to_end_p50 / forward_p50 (target ≤ 1.3); search_p50 target
≤ 5 ms. Untrained weights (--weights none) time the same as trained ones.
The query defaults to a synthetic SOP-like JPEG with sides in 480..640 px.
"""

import argparse
import json
import os
from pathlib import Path
import sys
import tempfile
import time

import numpy as np
from PIL import Image
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import backbones
from dataio import catalogue, photos, synthetic_sop
import datasets
import inference
import models
import onnx_export
from search.engine import SearchEngine
from search.index import GalleryIndex

SOP_TEST_SIZE = 60_502


def get_args_parser():
    parser = argparse.ArgumentParser(
        "bench_search.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--backbone", default="efficientnet_b0", choices=sorted(backbones.BACKBONES))
    parser.add_argument("--image_size", default=224, type=int)
    parser.add_argument("--embedding_size", default=128, type=int)
    parser.add_argument("--gallery_size", default=SOP_TEST_SIZE, type=int)
    parser.add_argument("--k", default=10, type=int, help="results per query (the demo's default)")
    parser.add_argument("--iters", default=100, type=int, help="timed rounds")
    parser.add_argument("--warmup", default=10, type=int, help="untimed rounds first")
    parser.add_argument("--threads", default=None, type=int, help="torch threads (default: torch's)")
    parser.add_argument("--query", default=None, help="query image file (default: a synthetic JPEG)")
    return parser


def percentiles(times_s):
    ms = np.asarray(times_s) * 1e3
    return round(float(np.percentile(ms, 50)), 3), round(float(np.percentile(ms, 95)), 3)


def bench_query(args, tmp: Path):
    """--query, else a test photo of a two-product synthetic SOP (480-640 px, as photos are)."""
    if args.query is not None:
        return args.query
    root = synthetic_sop.make_synthetic_sop(tmp / "sop", num_products=2, image_size="480-640")
    return datasets.SOPDataset(root, "test").paths[0]


def random_index(args) -> GalleryIndex:
    """A gallery of --gallery_size random unit embeddings (5 photos a product)."""
    rng = np.random.default_rng(0)
    emb = rng.standard_normal((args.gallery_size, args.embedding_size), dtype=np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    return GalleryIndex(
        embeddings=emb,
        paths=[f"bicycle_final/{i}.JPG" for i in range(args.gallery_size)],
        class_ids=np.arange(args.gallery_size) // 5,
        super_ids=rng.integers(1, len(catalogue.SOP_CATEGORIES) + 1, args.gallery_size),
        checkpoint_hash="bench",
    )


def timed_tasks(args, index: GalleryIndex, query, tmp: Path) -> tuple[dict, SearchEngine]:
    """({name: callable} of the timed tasks, the torch engine): the app's forward, the same
    network in the default layout, the index search, and end to end with torch and with ONNX."""
    model = models.build_model(
        args.backbone, embedding_size=args.embedding_size, weights="none", image_size=args.image_size
    ).eval()
    # the default-layout twin of the model, for the reference forward time (26.5 ms on an idle machine of this kind)
    model_nchw = models.build_model(
        args.backbone, embedding_size=args.embedding_size, weights="none", image_size=args.image_size
    ).eval()
    model_nchw.load_state_dict(model.state_dict())
    engine = SearchEngine(model, index, tmp)  # converts `model` to channels_last
    engine.warm_up()
    # the same network exported to ONNX, served by onnxruntime (the demo's --runtime onnx)
    onnx_file = onnx_export.export_onnx(model, tmp / "model.onnx", model_key="bench")
    engine_onnx = SearchEngine(inference.OnnxEmbedder(onnx_file), index, tmp)
    engine_onnx.warm_up()
    x = engine.prepare(photos.load_image(query, engine.resize)).clone(memory_format=torch.channels_last)
    x_nchw = x.contiguous()
    q = engine.embed(photos.load_image(query, engine.resize))

    def forward():  # exactly the app's forward: same model object, same input layout
        with torch.inference_mode():
            model(x)

    def forward_nchw():
        with torch.inference_mode():
            model_nchw(x_nchw)

    def search():
        index.search(q, args.k)

    def end_to_end(on=engine):
        out = on.search_file(query, args.k)
        assert len(out["results"]) == args.k

    # Every task runs on the engine's worker thread, where the app runs all its searches:
    # torch's OpenMP team and threadpoolctl's BLAS limit belong to the calling thread, so
    # timing the baselines from the main thread would pit two spinning OpenMP teams
    # against each other and leave the search's one-BLAS-thread limit a no-op.
    tasks = {
        name: (lambda fn=fn: engine._on_worker(fn))
        for name, fn in {"forward": forward, "search": search, "forward_nchw": forward_nchw}.items()
    }
    tasks["end_to_end"] = end_to_end  # search_file hands itself to the worker
    tasks["end_to_end_onnx"] = lambda: end_to_end(engine_onnx)
    return tasks, engine


def time_tasks(tasks: dict, warmup: int, iters: int) -> dict[str, list[float]]:
    """Seconds of each task's timed iterations, the tasks interleaved in a rotating order."""
    times = {name: [] for name in tasks}
    for it in range(warmup + iters):
        names = list(tasks)
        names = names[it % len(names) :] + names[: it % len(names)]  # no task always goes first
        for name in names:
            t0 = time.perf_counter()
            tasks[name]()
            if it >= warmup:
                times[name].append(time.perf_counter() - t0)
    return times


def latency_figures(times: dict[str, list[float]]) -> dict:
    """p50 / p95 in ms of every task, and the ratios the targets are set on."""
    result = {}
    for name in ("search", "end_to_end", "end_to_end_onnx", "forward", "forward_nchw"):
        result[f"{name}_p50_ms"], result[f"{name}_p95_ms"] = percentiles(times[name])
    result["end_to_end_vs_forward"] = round(result["end_to_end_p50_ms"] / result["forward_p50_ms"], 3)
    result["onnx_end_to_end_vs_torch"] = round(result["end_to_end_onnx_p50_ms"] / result["end_to_end_p50_ms"], 3)
    result["end_to_end_vs_forward_nchw"] = round(result["end_to_end_p50_ms"] / result["forward_nchw_p50_ms"], 3)
    return result


def main(args):
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    tmp = Path(tempfile.mkdtemp(prefix="bench_search_"))
    query = bench_query(args, tmp)
    index = random_index(args)
    tasks, engine = timed_tasks(args, index, query, tmp)
    load_before = os.getloadavg()
    result = latency_figures(time_tasks(tasks, args.warmup, args.iters))
    probe = engine.search_file(query, args.k)
    with Image.open(query) as im:
        query_size = list(im.size)
    result.update(
        {
            "backbone": args.backbone,
            "image_size": args.image_size,
            "gallery_size": args.gallery_size,
            "embedding_size": args.embedding_size,
            "k": args.k,
            "iters": args.iters,
            "torch_threads": torch.get_num_threads(),
            "query_size": query_size,
            "query_bytes": os.path.getsize(query),
            "last_breakdown_ms": probe["timing_ms"],
            "loadavg_1min_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
            "targets": {"search_p50_ms": 5.0, "end_to_end_vs_forward": 1.3, "onnx_end_to_end_vs_torch": 0.5},
        }
    )
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main(get_args_parser().parse_args())
