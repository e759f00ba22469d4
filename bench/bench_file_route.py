"""Latency of the demo's file route (the result thumbnails) against the number of other files in
the gallery's folders; prints JSON.

    python bench/bench_file_route.py                        # 50,000 sidecar files, 300 requests
    python bench/bench_file_route.py --sidecars 5000 --requests 500 --output bench/file_route.json

The tiny demo (`search.tiny_demo`: a synthetic catalogue, an untrained checkpoint) is launched
on loopback as webapp.launch_app does; then, interleaved round by round, raw HTTP GETs
of indexed gallery photos through ``/gradio_api/file=`` are timed with no other file in the
folder, and with ``--sidecars`` non-image files (``.xmp``, as photo tools write) added to the
photo folders after start. ``ratio_p50`` = p50 with sidecars / p50 without (target <= 1.2: the
route's rule is one set lookup, `search.guard.ServedFiles`).
"""

import argparse
import http.client
import json
from pathlib import Path
import shutil
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import models
from search import loading as search_loading
from search import webapp
from search.tiny_demo import free_port, make_tiny_demo


def get_args_parser():
    parser = argparse.ArgumentParser(
        "bench_file_route.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sidecars", type=int, default=50_000, help="non-image files added to the photo folders")
    parser.add_argument("--requests", type=int, default=300, help="GETs per configuration")
    parser.add_argument("--rounds", type=int, default=5, help="alternations of the two configurations")
    parser.add_argument("--output", default=None, help="also write the JSON here")
    return parser


def timed_gets(port, paths, n):
    """Seconds of each of ``n`` GETs of ``paths`` (cycled) over one keep-alive connection."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    times = []
    try:
        for i in range(n):
            t0 = time.perf_counter()
            conn.request("GET", f"/gradio_api/file={paths[i % len(paths)]}")
            resp = conn.getresponse()
            resp.read()
            if resp.status != 200:
                raise RuntimeError(f"GET {paths[i % len(paths)]}: HTTP {resp.status}")
            times.append(time.perf_counter() - t0)
    finally:
        conn.close()
    return times


def add_sidecars(folders, n):
    made = []
    for i in range(n):
        path = folders[i % len(folders)] / f"sidecar_{i:06d}.xmp"
        path.write_text("<x:xmpmeta/>\n")
        made.append(path)
    return made


def main(args):
    work = Path(tempfile.mkdtemp(prefix="bench_file_route-"))
    try:
        data_root, checkpoint = make_tiny_demo(work)
        model = models.load_model(checkpoint)
        index, _ = search_loading.load_or_build_index(model, checkpoint, data_root, "test", progress=False)
        webapp.use_private_gradio_temp_dir()
        demo = webapp.build_app(model, index, data_root, explain_store_gb=0)
        port = free_port()
        webapp.launch_app(demo, index, data_root, port=port, prevent_thread_lock=True, quiet=True)
        paths = [str(data_root / p) for p in index.paths[:50]]
        folders = sorted({(data_root / p).parent for p in index.paths})
        timed_gets(port, paths, 50)  # warm-up
        without, with_sidecars, sidecars = [], [], []
        for _ in range(args.rounds):
            for f in sidecars:
                f.unlink()
            without += timed_gets(port, paths, args.requests // args.rounds)
            sidecars = add_sidecars(folders, args.sidecars)
            with_sidecars += timed_gets(port, paths, args.requests // args.rounds)
        demo.close()
        p50 = {k: float(np.median(v)) * 1e3 for k, v in (("none", without), ("sidecars", with_sidecars))}
        out = {
            "sidecars": args.sidecars,
            "requests_each": len(without),
            "gallery_images": len(index),
            "p50_ms_without": round(p50["none"], 3),
            "p50_ms_with_sidecars": round(p50["sidecars"], 3),
            "p90_ms_without": round(float(np.percentile(without, 90)) * 1e3, 3),
            "p90_ms_with_sidecars": round(float(np.percentile(with_sidecars, 90)) * 1e3, 3),
            "ratio_p50": round(p50["sidecars"] / p50["none"], 3),
            "target_ratio": 1.2,
        }
        out["meets_target"] = out["ratio_p50"] <= out["target_ratio"]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    text = json.dumps(out, indent=2)
    print(text)
    if args.output:
        Path(args.output).write_text(text + "\n")
    return out


if __name__ == "__main__":
    main(get_args_parser().parse_args())
