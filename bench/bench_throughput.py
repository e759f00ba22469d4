"""Benchmark: does the input pipeline keep up with the model? Prints one JSON object.

Measures, in one run on this machine, images per second of

  (a) ``forward``       the bare model on a random batch already in memory: eval mode,
                        ``torch.inference_mode``, channels_last (AMP on CUDA) -- the ceiling;
  (b) ``extract``       ``extraction.extract_embeddings`` over real JPEG files on disk (the test
                        split) through ``datasets.SOPDataset`` with the eval transform and a
                        DataLoader with the settings below;
  (c) ``train_step``    ``training.loop.train_one_epoch`` (forward + triplet loss + backward + Adam) on a
                        random P x K batch already in memory -- the training ceiling;
  (d) ``train_loader``  the same training step fed by the real loader (train split, train
                        augmentations, P x K batches);

and the ratios ``extract_vs_ceiling`` = b / a and ``train_vs_ceiling`` = d / c (1.0 = the
input pipeline costs nothing). Warm-up batches are excluded: the model is run once on a random
batch before each part, and each part's clock starts when its ``--warmup_batches``-th batch is
requested (worker start-up and the first batch's latency are reported separately as
``*_first_batch_s``). Files are read once before timing, so the page cache holds them (as it does
from the second epoch on) and disk speed is not what is measured.

Without ``--data_root`` a synthetic SOP with SOP-like photo sizes (``--synthetic_size 300-600``
px) is generated once into ``--cache_dir`` and reused.

    python bench/bench_throughput.py --backbone efficientnet_b0 --image_size 224
    python bench/bench_throughput.py --workers 0 --threads 2       # loading in the main process
    python bench/bench_throughput.py --no-draft                     # decode JPEGs at full size
    python bench/bench_throughput.py --resized_root data/sop_256    # a `datasets.py resize` copy
    python bench/bench_throughput.py --compile --repeats 3

Loader settings default to ``loaders.loader_settings()`` (``--workers auto``): what this benchmark
measured best for the device and CPU count (see the README's throughput section).
On CUDA: AMP (float16), pinned memory and ``non_blocking`` copies, cuDNN benchmark mode.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path
import platform
import statistics
import sys
import time

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import backbones
from dataio import fileio, prepare_data, synthetic_sop
import datasets
import extraction
import loaders
import losses
import models
import preprocessing
import samplers
from training import loop

PARTS = ("forward", "extract", "train_step", "train_loader")
TARGETS = {"extract_vs_ceiling": 0.8, "train_vs_ceiling": 0.8, "cuda_extract_images_per_s_b0": 3000}


# ============ timing ============


class TimedLoader:
    """Wraps an iterable of batches and stamps the moment each batch is requested.

    The consumer asks for batch k only after it has finished batch k - 1 (extract_embeddings
    copies every output to the CPU and train_one_epoch calls ``.item()``, which also wait for
    the GPU), so ``stamps[k]`` is when batch k - 1 was done and the last stamp (taken when the
    loader is exhausted or the consumer stops asking) is when the work ended."""

    def __init__(self, loader):
        self.loader = loader
        self.stamps: list[float] = []
        self.sizes: list[int] = []

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        self.stamps, self.sizes, self.waits = [time.perf_counter()], [], []
        it = iter(self.loader)
        while True:
            try:
                images, labels = next(it)
            except StopIteration:
                break
            # time the consumer sat waiting for this batch (decoding it, with 0 workers)
            self.waits.append(time.perf_counter() - self.stamps[-1])
            self.sizes.append(int(images.shape[0]))
            yield images, labels
            self.stamps.append(time.perf_counter())

    def rate(self, warmup: int) -> dict:
        """images/s over the batches after the first ``warmup`` ones."""
        if len(self.sizes) <= warmup:
            raise RuntimeError(f"only {len(self.sizes)} batches ran; need more than --warmup_batches={warmup}")
        seconds = self.stamps[len(self.sizes)] - self.stamps[warmup]
        images = sum(self.sizes[warmup:])
        return {
            "images_per_s": images / seconds,
            "timed_images": images,
            "timed_s": seconds,
            "data_wait_frac": sum(self.waits[warmup:]) / seconds,
            "first_batch_s": self.stamps[1] - self.stamps[0],
            "wall_s": self.stamps[len(self.sizes)] - self.stamps[0],
        }


class RepeatBatch:
    """``n`` times the same in-memory batch, as a loader would yield it."""

    def __init__(self, images, labels, n):
        self.images, self.labels, self.n = images, labels, n

    def __len__(self):
        return self.n

    def __iter__(self):
        for _ in range(self.n):
            yield self.images, self.labels


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _pk_labels(batch_size, k=4):
    return torch.arange(batch_size, dtype=torch.int64) // k


# ============ the four parts ============


def bench_forward(model, device, batch_size, image_size, warmup, batches, amp, channels_last):
    """(a) eval forward on one random batch in device memory."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(batch_size, 3, image_size, image_size, device=device).contiguous(memory_format=fmt)
    model.eval()
    with torch.inference_mode(), torch.autocast(device.type, dtype=torch.float16, enabled=amp):
        for _ in range(warmup):
            model(x)
        _sync(device)
        start = time.perf_counter()
        for _ in range(batches):
            model(x)
        _sync(device)
    seconds = time.perf_counter() - start
    return {"images_per_s": batches * batch_size / seconds, "timed_images": batches * batch_size, "timed_s": seconds}


def bench_extract(model, loader, device, warmup, amp, image_size, batch_size, channels_last):
    """(b) extraction.extract_embeddings over the real loader."""
    bench_forward(model, device, batch_size, image_size, 1, 0, amp, channels_last)  # warm the model
    timed = TimedLoader(loader)
    embeddings, _ = extraction.extract_embeddings(model, timed, device=device, amp=amp, progress=False)
    if not np.isfinite(embeddings).all():
        raise RuntimeError("extract_embeddings returned non-finite embeddings")
    return timed.rate(warmup)


def _train_parts(model, device, lr=1e-4):
    model.train()
    criterion = losses.TripletLoss(margin=0.5, mining="semihard").to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=1e-5)
    scaler = torch.amp.GradScaler(device.type, enabled=device.type == "cuda")
    return criterion, optimizer, scaler


def bench_train(model, loader, device, warmup, amp, channels_last):
    """(c)/(d) training.loop.train_one_epoch fed by ``loader`` (random batch or real loader)."""
    criterion, optimizer, scaler = _train_parts(model, device)
    timed = TimedLoader(loader)
    loop.train_one_epoch(
        model,
        criterion,
        timed,
        optimizer,
        scaler,
        device,
        0,
        steps=len(loader),
        amp=amp,
        channels_last=channels_last,
        progress=False,
    )
    return timed.rate(warmup)


# ============ data ============


def synthetic_root(cache_dir, num_images, size_range, workers=None):
    """A cached synthetic SOP whose test split and train split each hold >= num_images photos
    (about 2.75 test and 2.5 train images per product; rounded up to 100 products so one cache
    serves nearby --num_images)."""
    num_products = max(100, int(math.ceil(num_images / 2.2 / 100.0)) * 100)
    # the folder is named after --synthetic_size as given; synthetic_sop checks its range
    root = Path(cache_dir) / f"sop_{size_range}_p{num_products}"
    if not fileio.is_complete(root):
        print(
            f"bench_throughput: generating a synthetic SOP ({num_products} products, {size_range} px) in {root} (once)",
            file=sys.stderr,
        )
    return synthetic_sop.ensure_synthetic_sop(
        root, num_products=num_products, image_size=size_range, workers=workers, replace=True
    )  # our own cache


def resized_copy(src_root, dst_root, image_size):
    """``dst_root`` as a ``datasets.py resize`` copy of ``src_root`` at the transform's resize
    size; made once when it is not one already."""
    size = preprocessing.resize_size(image_size)
    marker = fileio.read_marker(dst_root) or {}
    if marker.get("source") == "resize" and marker.get("size") == size:
        return Path(dst_root)
    if marker.get("source") == "resize":
        raise ValueError(
            f"--resized_root {dst_root} is a resized copy at {marker.get('size')} px, "
            f"but --image_size {image_size} needs {size}: pass another folder"
        )
    print(f"bench_throughput: writing a {size}px copy of {src_root} to {dst_root} (once)", file=sys.stderr)
    return prepare_data.resize_dataset(src_root, dst_root, size=size, progress=False)


def _warm_page_cache(paths):
    for p in paths:
        with open(p, "rb") as f:
            while f.read(1 << 20):
                pass


def _loader(dataset, settings, **kw):
    return torch.utils.data.DataLoader(dataset, **settings, **kw)


# ============ main ============


def get_args_parser():
    p = argparse.ArgumentParser(
        "bench_throughput", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--backbone", default="efficientnet_b0", choices=sorted(backbones.BACKBONES))
    p.add_argument("--image_size", type=int, default=224)
    p.add_argument(
        "--batch_size",
        type=int,
        default=32,
        help="images per batch in every part (a multiple of 4: P x K with K = 4 for training)",
    )
    p.add_argument(
        "--num_images", type=int, default=256, help="images per part, warm-up included (rounded down to whole batches)"
    )
    p.add_argument("--warmup_batches", type=int, default=1, help="batches per part left out of the timing")
    p.add_argument(
        "--repeats", type=int, default=1, help="run all parts this many times, interleaved; medians are reported"
    )
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:1 ...")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch intra-op threads of the main process (default: torch's, = the CPUs)",
    )
    p.add_argument(
        "--amp",
        default=None,
        action=argparse.BooleanOptionalAction,
        help="float16 autocast (default: on CUDA only, as train.py and retrieval.py do)",
    )
    p.add_argument(
        "--channels_last",
        default=True,
        action=argparse.BooleanOptionalAction,
        help="model and inputs in channels_last (extract_embeddings always converts inputs)",
    )
    p.add_argument("--compile", action="store_true", help="torch.compile the model (default mode)")
    # loader
    p.add_argument(
        "--workers",
        default="auto",
        help="DataLoader workers; 'auto' = loaders.loader_settings() for the device and CPU count",
    )
    p.add_argument(
        "--pin_memory",
        default=None,
        action=argparse.BooleanOptionalAction,
        help="default: on CUDA only (no effect without an accelerator)",
    )
    p.add_argument("--persistent_workers", default=None, action=argparse.BooleanOptionalAction)
    p.add_argument("--prefetch_factor", type=int, default=None)
    p.add_argument(
        "--draft",
        default=True,
        action=argparse.BooleanOptionalAction,
        help="JPEG draft-mode decoding at reduced scale (photos.load_image); "
        "--no-draft decodes every JPEG at full size",
    )
    # data
    p.add_argument(
        "--data_root",
        default=None,
        help="an SOP-layout dataset (default: a cached synthetic one, see --synthetic_size)",
    )
    p.add_argument(
        "--resized_root",
        default=None,
        help="read images from this `datasets.py resize` copy of the data (made once if absent)",
    )
    p.add_argument(
        "--cache_dir",
        default=str(REPO / "data" / "bench_throughput"),
        help="where the synthetic dataset is generated and kept",
    )
    p.add_argument("--synthetic_size", default="300-600", help="photo sides of the synthetic dataset, MIN-MAX px")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default=None, help="also write the JSON here")
    return p


def _median_rate(results):
    return statistics.median(r["images_per_s"] for r in results)


def check_args(args) -> list[str]:
    """The parts to run; ValueError for a bad --parts / --batch_size / --num_images."""
    parts = [s.strip() for s in args.parts.split(",") if s.strip()]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown or not parts:
        raise ValueError(f"--parts: unknown {unknown or parts}; choose from {', '.join(PARTS)}")
    if args.batch_size < 4 or args.batch_size % 4:
        raise ValueError(f"--batch_size must be a multiple of 4 (P x K batches, K = 4), got {args.batch_size}")
    if args.num_images // args.batch_size <= args.warmup_batches:
        raise ValueError(
            f"--num_images {args.num_images} gives {args.num_images // args.batch_size} "
            f"batches of {args.batch_size}; need more than --warmup_batches={args.warmup_batches}"
        )
    return parts


def pick_device(args) -> tuple[torch.device, bool]:
    """(device, amp): AMP by default on CUDA only."""
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"--device {args.device}: CUDA is not available here; use --device cpu")
    return device, (device.type == "cuda") if args.amp is None else bool(args.amp and device.type == "cuda")


def build_datasets(args, parts) -> tuple[Path | None, dict, int | None]:
    """(data root, {part: SOPDataset}, JPEG decode size) for the parts that read images."""
    root = None
    if {"extract", "train_loader"} & set(parts):
        root = (
            Path(args.data_root)
            if args.data_root
            else synthetic_root(args.cache_dir, args.num_images, args.synthetic_size)
        )
        if args.resized_root:
            root = resized_copy(root, args.resized_root, args.image_size)
    data = {}
    if "extract" in parts:
        data["extract"] = datasets.SOPDataset(
            root, "test", transform=preprocessing.build_transform(args.image_size, train=False)
        )
    if "train_loader" in parts:
        data["train_loader"] = datasets.SOPDataset(
            root, "train", transform=preprocessing.build_transform(args.image_size, train=True)
        )
    decode_size = None
    for ds in data.values():
        if not args.draft:
            ds.load_size = None  # load_image then decodes at full size
        decode_size = ds.load_size
        if len(ds) < args.batch_size * (args.warmup_batches + 1):
            raise ValueError(f"{ds!r} has {len(ds)} images: too few for --batch_size {args.batch_size}")
    return root, data, decode_size


def build_loaders(args, data, settings, batches) -> dict:
    """Loaders built once and reused by every repeat, so --persistent_workers shows its effect
    (no worker start-up from the second pass on: see *_first_batch_s)."""
    loaders = {}
    if "extract" in data:
        ds = data["extract"]
        n = min(len(ds), batches * args.batch_size) // args.batch_size * args.batch_size
        _warm_page_cache(ds.paths[:n])
        loaders["extract"] = _loader(
            torch.utils.data.Subset(ds, range(n)), settings, batch_size=args.batch_size, shuffle=False
        )
    if "train_loader" in data:
        ds = data["train_loader"]
        plan = samplers.PKSampler(ds.class_ids, p=args.batch_size // 4, k=4, seed=args.seed).batches()[:batches]
        if len(plan) <= args.warmup_batches:
            raise ValueError(
                f"{ds!r} gives only {len(plan)} P x K batches of {args.batch_size}; "
                f"generate a bigger dataset or lower --batch_size"
            )
        _warm_page_cache(sorted({ds.paths[i] for b in plan for i in b}))
        loaders["train_loader"] = _loader(ds, settings, batch_sampler=plan)
    return loaders


def time_parts(args, parts, model, loaders, device, amp, batches) -> dict:
    """{part: [one result dict per repeat]}, the parts interleaved within each repeat."""
    results = {p: [] for p in parts}
    for _ in range(args.repeats):
        for part in parts:
            if part == "forward":
                r = bench_forward(
                    model,
                    device,
                    args.batch_size,
                    args.image_size,
                    max(1, args.warmup_batches),
                    batches - args.warmup_batches,
                    amp,
                    args.channels_last,
                )
            elif part == "extract":
                r = bench_extract(
                    model,
                    loaders["extract"],
                    device,
                    args.warmup_batches,
                    amp,
                    args.image_size,
                    args.batch_size,
                    args.channels_last,
                )
            elif part == "train_step":
                # already on the device: the ceiling leaves out the host-to-device copy too
                x = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=device)
                y = _pk_labels(args.batch_size).to(device)
                r = bench_train(model, RepeatBatch(x, y, batches), device, args.warmup_batches, amp, args.channels_last)
            else:
                r = bench_train(model, loaders["train_loader"], device, args.warmup_batches, amp, args.channels_last)
            results[part].append(r)
    return results


def _ratio(out, results, rates, key, num, den, repeats) -> None:
    if num in rates and den in rates:
        out[key] = round(rates[num] / rates[den], 4)
        if repeats > 1:
            out[key + "_runs"] = [
                round(b["images_per_s"] / a["images_per_s"], 4) for a, b in zip(results[den], results[num])
            ]


def report(args, parts, results, device, amp, settings, root, decode_size) -> dict:
    """The JSON object: settings, images/s per part, the two ratios, loader start-up and wait."""
    rates = {p: _median_rate(results[p]) for p in parts}
    out = {
        "backbone": args.backbone,
        "image_size": args.image_size,
        "batch_size": args.batch_size,
        "device": str(device),
        "device_name": (
            torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
        ),
        "cpu_count": os.cpu_count(),
        "cpus_available": loaders.available_cpus(),
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        # read by libgomp when torch loads: how idle OpenMP threads wait (see the README)
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "workers": settings["num_workers"],
        "pin_memory": settings["pin_memory"],
        "persistent_workers": settings.get("persistent_workers", False),
        "prefetch_factor": settings.get("prefetch_factor"),
        "amp": amp,
        "channels_last": bool(args.channels_last),
        "compile": bool(args.compile),
        "draft": bool(args.draft),
        "decode_size": decode_size,
        "data_root": str(root) if root else None,
        "resized": bool(args.resized_root),
        "warmup_batches": args.warmup_batches,
        "repeats": args.repeats,
        "timed_images": {p: results[p][0]["timed_images"] for p in parts},
    }
    names = {
        "forward": "forward_images_per_s",
        "extract": "extract_images_per_s",
        "train_step": "train_step_images_per_s",
        "train_loader": "train_loader_images_per_s",
    }
    for p in parts:
        out[names[p]] = round(rates[p], 3)
        if args.repeats > 1:
            out[names[p] + "_runs"] = [round(r["images_per_s"], 3) for r in results[p]]
    _ratio(out, results, rates, "extract_vs_ceiling", "extract", "forward", args.repeats)
    _ratio(out, results, rates, "train_vs_ceiling", "train_loader", "train_step", args.repeats)
    for p in ("extract", "train_loader"):
        if p in results:
            out[f"{p}_first_batch_s"] = round(statistics.median(r["first_batch_s"] for r in results[p]), 3)
            out[f"{p}_data_wait_frac"] = round(statistics.median(r["data_wait_frac"] for r in results[p]), 4)
            if args.repeats > 1:  # with --persistent_workers, runs after the first skip worker start-up
                out[f"{p}_first_batch_s_runs"] = [round(r["first_batch_s"], 3) for r in results[p]]
    out["targets"] = dict(TARGETS)
    if device.type != "cuda":
        out["cuda"] = (
            "not measured: no CUDA device here (targets there: >= 3000 images/s "
            "EfficientNet-B0 extraction with AMP, train_vs_ceiling >= 0.8)"
        )
    out["versions"] = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "pillow": __import__("PIL").__version__,
        "libjpeg_turbo": bool(__import__("PIL.features").features.check_feature("libjpeg_turbo")),
    }
    return out


def main(args) -> dict:
    parts = check_args(args)
    batches = args.num_images // args.batch_size
    device, amp = pick_device(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input size
    torch.manual_seed(args.seed)
    settings = loaders.loader_settings(
        device,
        workers=None if args.workers == "auto" else int(args.workers),
        pin_memory=args.pin_memory,
        persistent_workers=args.persistent_workers,
        prefetch_factor=args.prefetch_factor,
    )
    load_avg_before = os.getloadavg()
    root, data, decode_size = build_datasets(args, parts)
    model = models.build_model(args.backbone, image_size=args.image_size, weights="none")
    model = model.to(device, memory_format=torch.channels_last if args.channels_last else torch.contiguous_format)
    data_loaders = build_loaders(args, data, settings, batches)
    results = time_parts(
        args, parts, torch.compile(model) if args.compile else model, data_loaders, device, amp, batches
    )
    out = report(args, parts, results, device, amp, settings, root, decode_size)
    out["load_avg_before"] = [round(v, 2) for v in load_avg_before]
    out["load_avg_after"] = [round(v, 2) for v in os.getloadavg()]
    text = json.dumps(out, indent=1)
    print(text)
    if args.output:
        fileio.atomic_write_text(args.output, text + "\n")
    return out


if __name__ == "__main__":
    main(get_args_parser().parse_args())
