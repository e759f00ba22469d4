"""What "Show why" costs: the demo's plain query against the same query with the similarity maps
of its first K results, on CPU, for the torch and the onnx runtime and for the linear head (the
recommended recipe) and the MLP head (the original project's, whose maps take Jacobian-vector
products).

Server side (always): ``plain`` is search.engine.SearchEngine.search_file (an uploaded file to
ranked results); ``query_plus_explain`` adds webapp.why_outputs (what the switch runs after
the search: maps and overlays of the first K results). Two settings: ``store`` (the demo's
default: the results' projections come from the explanation store, the query's feature grid from
its search) and ``no_store`` (``--explain_store_gb 0``: the network runs over the K results).

End to end (``--browser``, needs chromium and chromium-driver): the demo served by Gradio on
loopback (with the store), driven by two headless Chromiums given the same queries in turn: the
time from handing the file to the page's upload input until the 10 result images are drawn
(switch off), or until the K query-side maps are drawn as well (switch on: the search, then the
switch's event), measured in the page (performance.now, polled every ~1 ms).

    python bench/bench_explain.py [--backbone efficientnet_lite0] [--image_size 224] [--k 5]
                                  [--iters 20] [--heads linear mlp] [--data_root DIR]
                                  [--browser] [--output bench/explain.json]

Prints (and writes) JSON: p50 / p95 in ms of both and ``explain_vs_plain`` (the ratio of the
p50s, measured in the same loop). Random weights cost what trained ones cost. The gallery is a
synthetic one (its size does not matter: the maps are of K images) or ``--data_root``'s test
split (real photos: their decoding is part of both paths).
"""

import argparse
import json
from pathlib import Path
import shutil
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench import demo_clients
from dataio import fileio
import datasets
from search import engine as search_engine
from search import loading as search_loading
from search import tiny_demo, webapp

# In the page: resolves when the gallery `id` shows `count` loaded images and its first one is not
# `previous` (the last iteration's); the elapsed time since the call is left in window.__elapsed.
WATCH_JS = """
const [id, count, previous] = arguments;
window.__elapsed = null;
const t0 = performance.now();
function shown() {
  return Array.from(document.querySelectorAll('#' + id + ' img'))
    .filter(im => im.complete && im.naturalWidth > 0).map(im => im.src);
}
function check() {
  const s = shown();
  if (s.length >= count && s[0] !== previous) { window.__elapsed = performance.now() - t0; window.__first = s[0]; }
  else setTimeout(check, 1);
}
check();
"""


def percentiles(seconds):
    ms = np.array(seconds) * 1e3
    return {"p50_ms": round(float(np.percentile(ms, 50)), 2), "p95_ms": round(float(np.percentile(ms, 95)), 2)}


def pair(plain, explained):
    pl, ex = percentiles(plain), percentiles(explained)
    return {"plain": pl, "query_plus_explain": ex, "explain_vs_plain": round(ex["p50_ms"] / pl["p50_ms"], 2)}


def measure(engine, queries, k, iters, warm=3):
    """p50 / p95 of the plain query and of the query plus the maps of its first k results."""
    plain, explained = [], []
    for n in range(iters + warm):
        q = queries[n % len(queries)]
        t0 = time.perf_counter()
        ranked = engine.search_file(q, k=10)
        t1 = time.perf_counter()
        webapp.why_outputs(engine, q, ranked, True, k=k)
        t2 = time.perf_counter()
        if n >= warm:  # the first ones load the torch twin and warm the explanation path
            plain.append(t1 - t0)
            explained.append(t2 - t0)
    return pair(plain, explained)


def wait_for_element(driver, css, timeout=30):
    """The first element matching ``css`` once the page shows it."""
    from selenium.webdriver.common.by import By

    deadline = time.time() + timeout
    while not (found := driver.find_elements(By.CSS_SELECTOR, css)):
        if time.time() > deadline:
            raise RuntimeError(f"the page did not show {css} within {timeout} s")
        time.sleep(0.01)
    return found[0]


def page_seconds(driver, query, gallery, count, previous):
    """Seconds from giving ``query`` to the upload input until ``gallery`` shows ``count`` new images."""
    from selenium.webdriver.common.by import By

    clear = driver.find_elements(By.CSS_SELECTOR, "#query button[aria-label='Clear']")
    if clear:
        clear[0].click()
    deadline = time.time() + 30
    wait_for_element(driver, "#query input[type=file]")
    driver.execute_script(WATCH_JS, gallery, count, previous)
    driver.find_element(By.CSS_SELECTOR, "#query input[type=file]").send_keys(str(query))
    while (elapsed := driver.execute_script("return window.__elapsed")) is None:
        if time.time() > deadline:
            raise RuntimeError(f"#{gallery} did not show {count} new images within 30 s")
        time.sleep(0.01)
    return elapsed / 1e3, driver.execute_script("return window.__first")


def measure_browser(url, queries, k, iters, warm=2):
    """End-to-end p50 / p95 in the page, pair by pair: two browsers on the demo, one with the
    switch off (10 results drawn), one with it on (k maps drawn), given the same query in turn."""
    modes = (("plain", "results", 10), ("why", "why_query", k))
    browsers, times, previous = {}, {m: [] for m, _, _ in modes}, {m: None for m, _, _ in modes}
    try:
        for mode, _, _ in modes:
            browsers[mode] = demo_clients.start_chromium()
            browsers[mode][0].get(url)
            if mode == "why":
                wait_for_element(browsers[mode][0], "#why input[type=checkbox]").click()
        for n in range(iters + warm):
            for mode, gallery, count in modes:
                s, previous[mode] = page_seconds(
                    browsers[mode][0], queries[n % len(queries)], gallery, count, previous[mode]
                )
                if n >= warm:
                    times[mode].append(s)
    finally:
        for driver, profile in browsers.values():
            driver.quit()
            shutil.rmtree(profile, ignore_errors=True)
    return pair(times["plain"], times["why"])


def make_setup(folder, head, a):
    """(data_root, checkpoint) of an untrained ``head`` network; the gallery is --data_root's, if given."""
    data_root, checkpoint = tiny_demo.make_tiny_demo(
        folder, num_products=20, image_size=a.image_size, backbone=a.backbone, head=head, run=head
    )
    return (Path(a.data_root) if a.data_root else data_root), checkpoint


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default="efficientnet_lite0")
    p.add_argument("--image_size", type=int, default=224)
    p.add_argument("--k", type=int, default=webapp.WHY_K, help="results explained")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--runtimes", nargs="+", default=["torch", "onnx"], choices=["torch", "onnx"])
    p.add_argument("--heads", nargs="+", default=["linear", "mlp"], choices=["linear", "mlp"])
    p.add_argument("--data_root", default=None, help="a dataset whose test split is the gallery (real photos)")
    p.add_argument("--browser", action="store_true", help="also time the demo end to end in headless Chromium")
    p.add_argument("--output", default=None, help="also write the JSON here")
    a = p.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="bench_explain-"))
    out = {
        "backbone": a.backbone,
        "image_size": a.image_size,
        "k_explained": a.k,
        "iters": a.iters,
        "threads": torch.get_num_threads(),
        "gallery": a.data_root or "synthetic",
        "server": {},
    }
    for head in a.heads:
        data_root, checkpoint = make_setup(folder / head, head, a)
        queries = datasets.SOPDataset(data_root, "test").paths
        for runtime in a.runtimes:
            loaded = search_loading.load_search_model(checkpoint, runtime=runtime, device="cpu")
            index, _ = search_loading.load_or_build_index(
                loaded.model,
                checkpoint,
                data_root,
                "test",
                progress=False,
                index_path=folder / head / f"index_{runtime}.npz",
                model_key=loaded.key,
            )
            engine = search_engine.SearchEngine(loaded.model, index, data_root, explain_source=checkpoint)
            engine.warm_up()
            rows = out["server"][f"{runtime}/{head}"] = {}
            webapp.attach_store(engine, 1.0, progress=False)
            rows["store"] = measure(engine, queries, a.k, a.iters)
            webapp.attach_store(engine, 0)
            rows["no_store"] = measure(engine, queries, a.k, a.iters)
            out["gallery_size"] = len(index)
            if a.browser:
                webapp.use_private_gradio_temp_dir()  # before build_app, as main() does
                demo = webapp.build_app(loaded.model, index, data_root, explain_source=checkpoint)
                port = tiny_demo.free_port()
                webapp.launch_app(demo, index, data_root, port=port, prevent_thread_lock=True, quiet=True)
                try:
                    out.setdefault("browser", {})[f"{runtime}/{head}"] = measure_browser(
                        f"http://127.0.0.1:{port}/", queries, a.k, a.iters
                    )
                finally:
                    demo.close()
            print(
                json.dumps(
                    {
                        f"{runtime}/{head}": rows,
                        **({"browser": out["browser"][f"{runtime}/{head}"]} if a.browser else {}),
                    }
                ),
                flush=True,
            )
    text = json.dumps(out, indent=1)
    print(text)
    if a.output:
        fileio.atomic_write_text(a.output, text + "\n")


if __name__ == "__main__":
    main()
