"""Indexing a folder of your own photos (gallery.update_gallery_index); prints JSON.

    python bench/bench_gallery_index.py --images 10000 --add 100 \\
        --backbone efficientnet_lite0 --image_size 224 --output bench/gallery_index.json

Gallery: ``--images`` synthetic JPEGs (random sides 300-600 px, gradients and shapes drawn
with PIL, seeded) in ``--categories`` folders under ``--workdir`` (default /tmp; generated
once, reused when the settings match, never timed). Model: the backbone's zero-shot
ImageNet features (models.zero_shot_model); without the weights, random ones (noted in the
JSON: the timing is the same). Passes, each a call of update_gallery_index:

* ``full``: from scratch (force=True), every image embedded;
* ``incremental``: after ``--add`` new images are written, only they are embedded;
* ``no_change``: the same folder again: scan, compare, nothing embedded, nothing written.

Per pass: seconds (the whole call: scan, load, embed, save), embed_seconds, images embedded
and images/s (embedded / seconds). ``incremental_vs_full`` = incremental seconds / full
seconds; ``new_share`` = add / images; ``overhead_vs_share`` = their ratio (1.0: the update
costs exactly its share of new images; more: the fixed cost of scanning, loading and saving).
"""

import argparse
import datetime
import json
import multiprocessing
import os
from pathlib import Path
import platform
import shutil
import sys
import time

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import backbones
from dataio.fileio import atomic_write_text
import inference
import models
from search import gallery

MARKER = ".bench_generated.json"  # hidden: the scan skips it (counted as a non-image)


def get_args_parser():
    parser = argparse.ArgumentParser(
        "bench_gallery_index.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", default=10_000, type=int, help="images in the gallery")
    parser.add_argument("--add", default=100, type=int, help="images added before the incremental pass")
    parser.add_argument("--backbone", default="efficientnet_lite0", choices=sorted(backbones.BACKBONES))
    parser.add_argument("--image_size", default=224, type=int)
    parser.add_argument("--categories", default=8, type=int, help="first-level folders")
    parser.add_argument("--batch_size", default=64, type=int)
    parser.add_argument(
        "--workers", default=None, type=int, help="loader workers (default: loaders.loader_settings for this machine)"
    )
    parser.add_argument(
        "--workdir", default="/tmp/bench_gallery_index", help="where the images and the index go (not the repository)"
    )
    parser.add_argument("--output", default=None, help="also write the JSON here (e.g. bench/gallery_index.json)")
    parser.add_argument("--seed", default=0, type=int)
    inference.add_runtime_arg(parser)
    return parser


# ============ synthetic photos ============


def draw_photo(seed: int):
    """A PIL image of random size 300-600 px: a two-colour gradient plus a few shapes."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    w, h = (int(v) for v in rng.integers(300, 601, size=2))
    a, b = rng.integers(0, 256, size=(2, 3))
    t = np.linspace(0.0, 1.0, w, dtype=np.float32)[None, :, None]
    pixels = np.broadcast_to(a + (b - a) * t, (h, w, 3)).astype(np.uint8)
    image = Image.fromarray(pixels)
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(2, 7))):
        x0, x1 = np.sort(rng.integers(0, w, size=2))
        y0, y1 = np.sort(rng.integers(0, h, size=2))
        colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
        shape = (draw.ellipse, draw.rectangle)[int(rng.integers(0, 2))]
        shape([int(x0), int(y0), int(x1) + 1, int(y1) + 1], fill=colour)
    return image


def _write_photo(job):
    path, seed = job
    draw_photo(seed).save(path, format="JPEG", quality=90)


def write_photos(root: Path, names, seeds, categories: int, workers: int) -> None:
    """``root/cat_<k>/<name>.jpg`` for each name (category = seed mod categories)."""
    jobs = []
    for name, seed in zip(names, seeds):
        folder = root / f"cat_{seed % categories:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        jobs.append((str(folder / f"{name}.jpg"), int(seed)))
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        pool.map(_write_photo, jobs, chunksize=64)


def prepare_gallery(root: Path, images: int, categories: int, seed: int, workers: int) -> float:
    """The base gallery (reused when its marker matches); returns generation seconds (0 if reused)."""
    settings = {"images": images, "categories": categories, "seed": seed, "version": 1}
    marker = root / MARKER
    if marker.is_file() and json.loads(marker.read_text()) == settings:
        for extra in root.glob("cat_*/new_*.jpg"):  # the previous run's added images
            extra.unlink()
        return 0.0
    shutil.rmtree(root, ignore_errors=True)
    t0 = time.perf_counter()
    base = seed * 10_000_000
    write_photos(root, [f"img_{i:06d}" for i in range(images)], [base + i for i in range(images)], categories, workers)
    atomic_write_text(marker, json.dumps(settings))
    return time.perf_counter() - t0


# ============ the passes ============


def machine_info() -> dict:
    import torch

    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    model_name = ""
    try:
        with open("/proc/cpuinfo") as f:
            model_name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {
        "cpu_count": os.cpu_count(),
        "cpus_available": cpus,
        "cpu_model": model_name,
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "nice": os.nice(0) if hasattr(os, "nice") else None,
    }


def pass_summary(report: dict) -> dict:
    keys = (
        "seconds",
        "embed_seconds",
        "embedded",
        "images_per_s",
        "added",
        "changed",
        "removed",
        "unchanged",
        "unreadable",
        "skipped_non_images",
        "written",
    )
    out = {k: report[k] for k in keys}
    out["embed_images_per_s"] = round(report["embedded"] / report["embed_seconds"], 2) if report["embedded"] else 0.0
    return out


def load_model(backbone: str, image_size: int, runtime: str):
    """(zero-shot model on ``runtime``, weights name, note): ImageNet weights, else random ones."""
    try:
        return inference.load_embedder(zero_shot=(backbone, "imagenet", image_size), runtime=runtime), "imagenet", None
    except backbones.WeightsUnavailableError as e:
        note = f"ImageNet weights unavailable ({e}); random weights, same cost per image"
        return inference.load_embedder(zero_shot=(backbone, "none", image_size), runtime=runtime), "none", note


def main(args) -> dict:
    workdir = Path(args.workdir)
    root = workdir / "gallery"
    index_path = workdir / "gallery_index.npz"
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    loadavg_start = [round(x, 2) for x in os.getloadavg()]
    generation_s = prepare_gallery(root, args.images, args.categories, args.seed, cpus)
    index_path.unlink(missing_ok=True)

    runtime = inference.resolve_runtime(args.runtime)
    model, weights, note = load_model(args.backbone, args.image_size, runtime)
    key = models.zero_shot_model_key(args.backbone, weights, args.image_size)
    run = {
        "model": model,
        "root": root,
        "index_path": index_path,
        "model_key": key,
        "batch_size": args.batch_size,
        "workers": args.workers,
        "progress": sys.stderr.isatty(),
    }

    t0 = time.perf_counter()
    scan = gallery.scan_gallery(root, exclude=[index_path])
    scan_s = time.perf_counter() - t0

    _, full = gallery.update_gallery_index(force=True, **run)
    index_bytes = index_path.stat().st_size
    base = (args.seed + 1) * 10_000_000  # seeds apart from the base images'
    write_photos(
        root, [f"new_{i:06d}" for i in range(args.add)], [base + i for i in range(args.add)], args.categories, cpus
    )
    _, incremental = gallery.update_gallery_index(**run)
    index, no_change = gallery.update_gallery_index(**run)

    share = args.add / args.images
    ratio = incremental["seconds"] / full["seconds"]
    return {
        "images": args.images,
        "add": args.add,
        "backbone": args.backbone,
        "weights": weights,
        "runtime": runtime,
        "weights_note": note,
        "image_size": args.image_size,
        "batch_size": args.batch_size,
        "workers": args.workers,
        "categories": len(index.categories),
        "date": datetime.date.today().isoformat(),
        "generation_s": round(generation_s, 1),
        "scan_s": round(scan_s, 3),
        "scanned_files": len(scan.files),
        "index_bytes": index_bytes,
        "index_bytes_after_add": index_path.stat().st_size,
        "passes": {
            "full": pass_summary(full),
            "incremental": pass_summary(incremental),
            "no_change": pass_summary(no_change),
        },
        "incremental_vs_full": round(ratio, 4),
        "new_share": round(share, 4),
        "overhead_vs_share": round(ratio / share, 2) if share else None,
        "machine": machine_info(),
        "loadavg_start": loadavg_start,
        "loadavg_end": [round(x, 2) for x in os.getloadavg()],
    }


if __name__ == "__main__":
    arguments = get_args_parser().parse_args()
    text = json.dumps(main(arguments), indent=2)
    print(text)
    if arguments.output:
        atomic_write_text(arguments.output, text + "\n")
