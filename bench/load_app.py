"""Load test of the demo: N concurrent clients for a fixed time, good queries mixed with bad
uploads, against `python app_stanford.py` running on loopback in its own process; prints JSON.

    python bench/load_app.py                        # 20 clients, 60 s, tiny synthetic demo in a temp dir
    python bench/load_app.py --duration 10          # shorter, while developing
    python bench/load_app.py --backbone efficientnet_b0 --image_size 224   # the real model's cost
    python bench/load_app.py --checkpoint checkpoints/<run>/best.pth --data_root data/synthetic_sop

Each client loops until the deadline (bounded: one request at a time, each with a timeout)
over Gradio's plain HTTP API: POST /gradio_api/upload, POST /gradio_api/call/search, then the
result stream GET /gradio_api/call/search/<event_id>. Requests are good queries (gallery
photos and odd-but-valid files: RGBA, palette, LA, CMYK, 16-bit grey, 1×1, WebP, EXIF-rotated)
or bad uploads (text named .jpg, 0 bytes, truncated JPEG, PNGs declaring 50,000² and 9,000²
pixels, a file over the upload cap). Reported: good_ok, good_failed (must be 0),
bad_errors_returned, bad_not_refused (must be 0), latency p50/p95 (upload + queue + search,
as a client sees it), and the server's RSS after warm-up ("start"), at the end and at peak
(growth must stay within 10%).
"""

import argparse
import json
import os
from pathlib import Path
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def get_args_parser():
    parser = argparse.ArgumentParser(
        "load_app.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clients", default=20, type=int)
    parser.add_argument("--duration", default=60.0, type=float, help="seconds of load")
    parser.add_argument("--bad_fraction", default=0.3, type=float, help="share of bad uploads")
    parser.add_argument("--k", default=10, type=int)
    parser.add_argument("--checkpoint", default=None, help="default: a tiny untrained one in a temp dir")
    parser.add_argument("--data_root", default=None, help="default: a tiny synthetic SOP in a temp dir")
    parser.add_argument("--backbone", default="resnet18", help="for the generated checkpoint")
    parser.add_argument("--image_size", default=48, type=int, help="for the generated checkpoint")
    parser.add_argument("--max_upload_mb", default=2.0, type=float, help="the server's upload cap")
    parser.add_argument("--timeout", default=120.0, type=float, help="per request, seconds")
    parser.add_argument("--seed", default=0, type=int)
    return parser


def rss_mb(pid):
    """Resident set size of ``pid`` in MB, from /proc (no psutil needed)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


class DemoClient:
    """Gradio's documented REST API for one endpoint, over one httpx connection pool."""

    def __init__(self, url, timeout):
        import httpx

        self.url = url.rstrip("/")
        self.http = httpx.Client(timeout=timeout)

    def search(self, path, k, category="All"):
        """``("ok", ranked)``, ``("error", message)`` (the app refused it), or raises for
        anything else (HTTP failure, timeout, malformed stream)."""
        with open(path, "rb") as f:
            r = self.http.post(
                f"{self.url}/gradio_api/upload", files=[("files", (Path(path).name, f, "application/octet-stream"))]
            )
        if r.status_code == 413:  # over --max_upload_mb: refused before it is stored
            return "error", f"HTTP 413: {r.text.strip()[:200]}"
        r.raise_for_status()
        server_path = r.json()[0]
        # /search's inputs: image, k, category, more photos of the item (none here)
        payload = {"data": [{"path": server_path, "meta": {"_type": "gradio.FileData"}}, k, category, None]}
        r = self.http.post(f"{self.url}/gradio_api/call/search", json=payload)
        r.raise_for_status()
        event_id = r.json()["event_id"]
        event = None
        with self.http.stream("GET", f"{self.url}/gradio_api/call/search/{event_id}") as stream:
            for line in stream.iter_lines():
                if line.startswith("event:"):
                    event = line.split(":", 1)[1].strip()
                elif line.startswith("data:") and event in ("complete", "error"):
                    data = json.loads(line.split(":", 1)[1])
                    if event == "complete":
                        return "ok", data[1]
                    message = data.get("error") if isinstance(data, dict) else data
                    return "error", message
        raise RuntimeError(f"result stream of event {event_id} ended without a result")

    def close(self):
        self.http.close()


def start_server(checkpoint, data_root, port, max_upload_mb, log_path):
    cmd = [
        sys.executable,
        str(REPO / "app_stanford.py"),
        "--checkpoint",
        str(checkpoint),
        "--data_root",
        str(data_root),
        "--port",
        str(port),
        "--max_upload_mb",
        str(max_upload_mb),
    ]
    log = open(log_path, "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=str(REPO))
    return proc, log


def wait_ready(url, proc, timeout=300):
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the demo exited with code {proc.returncode} before serving")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"the demo did not answer at {url} within {timeout} s")


def prepare_queries(args, work):
    """``(checkpoint, data_root, gallery paths, good, bad)``: the demo to serve (given, or
    `search.tiny_demo`'s) and the queries, as (path, name) pairs."""
    from bench.demo_clients import write_query_files
    import datasets
    from search.tiny_demo import make_tiny_demo

    if args.checkpoint and args.data_root:
        checkpoint, data_root = Path(args.checkpoint), Path(args.data_root)
    else:
        data_root, checkpoint = make_tiny_demo(work, backbone=args.backbone, image_size=args.image_size)
    gallery = datasets.SOPDataset(data_root, "test").paths
    queries = write_query_files(work / "queries", gallery[0])
    oversize = work / "queries" / "oversize.png"
    oversize.write_bytes(os.urandom(int((args.max_upload_mb + 1) * (1 << 20))))
    good = [(p, "gallery") for p in gallery] + [(p, n) for n, (p, ok) in queries.items() if ok]
    bad = [(p, n) for n, (p, ok) in queries.items() if not ok] + [(oversize, "oversize.png")]
    return checkpoint, data_root, gallery, good, bad


class RssSampler:
    """The server's RSS every second while in the block: ``peak`` (from ``start_mb``) and a
    ``timeline`` of one reading every 10 s."""

    def __init__(self, pid, start_mb):
        self.pid, self.peak, self.timeline = pid, start_mb, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self):
        t0 = time.monotonic()
        while not self._stop.wait(1.0):
            try:
                now = rss_mb(self.pid)
            except (OSError, RuntimeError):
                return
            self.peak = max(self.peak, now)
            if not self.timeline or time.monotonic() - t0 >= 10 * len(self.timeline):
                self.timeline.append(round(now, 1))

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        return False


def run_load(url, args, good, bad):
    """``args.clients`` clients, each looping until ``args.duration`` is over; returns (one
    record per request, seconds the load took)."""
    records, lock = [], threading.Lock()
    deadline = time.monotonic() + args.duration

    def run_client(cid):
        rng = random.Random(args.seed * 1000 + cid)
        c = DemoClient(url, args.timeout)
        try:
            while time.monotonic() < deadline:
                is_bad = rng.random() < args.bad_fraction
                path, name = rng.choice(bad if is_bad else good)
                t0 = time.perf_counter()
                try:
                    status, data = c.search(path, args.k)
                except Exception as e:  # HTTP error, timeout, broken stream: all count as failures
                    status, data = "exception", f"{type(e).__name__}: {e}"
                dt = time.perf_counter() - t0
                ok = status == "ok" and len(data["results"]) == args.k if not is_bad else status == "error"
                with lock:
                    records.append(
                        {
                            "bad": is_bad,
                            "name": name,
                            "status": status,
                            "ok": ok,
                            "latency": dt,
                            "detail": None if status == "ok" else str(data)[:200],
                        }
                    )
        finally:
            c.close()

    threads = [threading.Thread(target=run_client, args=(i,)) for i in range(args.clients)]
    t_load = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return records, time.monotonic() - t_load


def summary(records, load_s, args):
    """The request counts and latency percentiles of the module docstring."""
    good_rec = [r for r in records if not r["bad"]]
    bad_rec = [r for r in records if r["bad"]]

    def pct(rs):
        if not rs:
            return None, None
        ms = np.array([r["latency"] for r in rs]) * 1e3
        return round(float(np.percentile(ms, 50)), 1), round(float(np.percentile(ms, 95)), 1)

    return {
        "clients": args.clients,
        "duration_s": round(load_s, 1),
        "requests": len(records),
        "requests_per_s": round(len(records) / load_s, 2),
        "good_ok": sum(r["ok"] for r in good_rec),
        "good_failed": sum(not r["ok"] for r in good_rec),
        "bad_errors_returned": sum(r["ok"] for r in bad_rec),
        "bad_not_refused": sum(not r["ok"] for r in bad_rec),
        "good_latency_p50_ms": pct(good_rec)[0],
        "good_latency_p95_ms": pct(good_rec)[1],
        "bad_latency_p50_ms": pct(bad_rec)[0],
        "bad_latency_p95_ms": pct(bad_rec)[1],
        "latency_p50_ms": pct(records)[0],
        "latency_p95_ms": pct(records)[1],
        "bad_upload_messages": sorted({r["detail"] for r in bad_rec if r["ok"]}),
        "failures": sorted({f"{r['name']}: {r['status']}: {r['detail']}" for r in records if not r["ok"]})[:20],
    }


def main(args):
    from search.tiny_demo import free_port

    work = Path(tempfile.mkdtemp(prefix="load_app_"))
    checkpoint, data_root, gallery, good, bad = prepare_queries(args, work)
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    proc, log = start_server(checkpoint, data_root, port, args.max_upload_mb, work / "server.log")
    try:
        t_start = time.monotonic()
        wait_ready(url, proc)
        startup_s = time.monotonic() - t_start
        rss_before_warmup = rss_mb(proc.pid)

        # ============ warm-up: every query file once, sequentially ============
        client = DemoClient(url, args.timeout)
        for path, _ in good[:10] + [g for g in good if g[1] != "gallery"] + bad:
            client.search(path, args.k)
        client.close()
        rss_start = rss_mb(proc.pid)

        # ============ load ============
        with RssSampler(proc.pid, rss_start) as rss:
            records, load_s = run_load(url, args, good, bad)
        alive = proc.poll() is None
        # one more good query after the storm: the server must still answer
        final_ok = DemoClient(url, args.timeout).search(gallery[1], args.k)[0] == "ok" if alive else False
        rss_end = rss_mb(proc.pid) if alive else float("nan")
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()

    result = summary(records, load_s, args)
    result.update(
        {
            "server_rss_mb_before_warmup": round(rss_before_warmup, 1),
            "server_rss_mb_start": round(rss_start, 1),
            "server_rss_mb_end": round(rss_end, 1),
            "server_rss_mb_peak": round(rss.peak, 1),
            "server_rss_mb_every_10s": rss.timeline,
            "rss_growth_pct": round(100 * (rss_end - rss_start) / rss_start, 2),
            "server_alive_at_end": alive,
            "query_after_load_ok": final_ok,
            "server_startup_s": round(startup_s, 1),
            "model": {"checkpoint": str(checkpoint), "data_root": str(data_root), "gallery_size": len(gallery)},
            "loadavg_1min_end": round(os.getloadavg()[0], 2),
        }
    )
    print(json.dumps(result, indent=2))
    if not args.checkpoint:
        shutil.rmtree(work, ignore_errors=True)
    return result


if __name__ == "__main__":
    main(get_args_parser().parse_args())
