"""Visual product search demo: a query photo in, the nearest catalogue photos out (Gradio).
The web UI and command line over `search.engine` (the search itself, no UI).

    python app_stanford.py                                       # newest checkpoints/*/best.pth
    python app_stanford.py --checkpoint checkpoints/<run>/best.pth [--data_root DIR] [--split test]
    python app_stanford.py --checkpoint CK --gallery my_photos/    # any folder, no labels needed
    python app_stanford.py --zero_shot --backbone efficientnet_lite0 --gallery my_photos/
    python app_stanford.py ... --host 0.0.0.0 --port 7860       # reachable from the network (opt-in)
    python app_stanford.py ... --build_index                     # build / refresh the index, then exit
    python app_stanford.py ... --gallery my_photos/ --watch 10  # live: rescan the folder every 10 s

The checkpoint is self-describing (models.load_model, weights_only=True): backbone, embedding
size and image size come from it, and the data root defaults to the one it was trained on.
The gallery (every image of ``--split`` of a dataset in any layout, 60,502 for the SOP test
split) is embedded once into a `search.index.GalleryIndex` saved next to the checkpoint
(``gallery_<split>.npz``); it is rebuilt, with a progress bar, when the checkpoint's sha256
or the image list changed. ``--gallery DIR`` indexes every image under DIR instead
(`search.gallery`): a rerun embeds only the files added or changed (path, size, mtime) and drops
the removed ones; with ``--watch [SECONDS]`` it does so while serving (`search.watch`).

API: the search is the Gradio endpoint ``/search`` (inputs: image, k, category="All"):

    from gradio_client import Client, handle_file
    gallery, ranked, timing = Client("http://127.0.0.1:7860/").predict(
        handle_file("query.jpg"), 10, "All", api_name="/search")

``gallery``: list of ``{"image": <file>, "caption": "0.912 · chair · #12345"}`` (similarity,
category, product id);
``ranked``: the JSON of `search.engine.SearchEngine.search_image` (``results`` ranked best
first, each with rank, index, catalogue_path (relative to the data root or gallery folder),
product_id (the data's, a string; null in a --gallery folder), category, score; ``timing_ms``);
``timing``: the same timings as a Markdown line.

Why a result matches: ``/explain`` (inputs: the query image, a result's ``catalogue_path`` from
``ranked["results"]``) returns the query and the result with their similarity maps drawn over
them (`explain.similarity_maps`) and a JSON of ``catalogue_path``, ``query_map``,
``result_map`` (grids of floats, each summing to ``score``), ``score``, ``exact`` and ``label``:

    query_overlay, result_overlay, why = client.predict(handle_file("query.jpg"),
                                                        "chair_final/111_0.JPG", api_name="/explain")

The UI's "Show why" switch draws the maps over the first five results. Its cost: the query's
feature grid is kept from its search, and the results' per-location projections are read from
an explanation store beside the gallery index (``gallery_<...>.why.npy``, made at start-up,
``--explain_store_gb``), so no network runs for them. A refused image (not an image, empty,
truncated, too many pixels, ...) raises ``gradio_client.exceptions.AppError`` with a message
saying why; the server keeps serving.

Security (`search.guard`, docs/reference.md "Safety"): binds 127.0.0.1 unless ``--host`` /
``--share`` say otherwise (with a warning when no ``--auth`` / ``--auth_file`` login is set);
queries open only this request's upload or data URL, never a server path or web address;
uploads are capped by size (``--max_upload_mb``) and by declared pixel count
(``--max_megapixels``) before any decoding; the file route serves exactly the photos of the
index being served and Gradio's upload folder, nothing else; pages of other origins (but
``--allow_origin``) cannot call the API.
"""
import argparse
import atexit
import base64
import binascii
import hashlib
import logging
import os
import shutil
import signal
import sys
import tempfile
import threading
import traceback
from pathlib import Path

import torch

import datasets
import inference
from dataio import catalogue
from search import engine as search_engine
from search import query as search_query
from search import loading as search_loading
from search import explain_store
from search import guard
from search import watch as gallery_watch
from search import vectordb
from search.gallery import CHECKPOINT_EVERY
from training import evaluation

logger = logging.getLogger("app_stanford")


# ============ Gradio app ============

def use_private_gradio_temp_dir():
    """Give this process its own Gradio upload / cache folder (``GRADIO_TEMP_DIR``, unless
    already set); removed at exit. Call before `build_app`.

    Why: Gradio stores uploads content-addressed (``<dir>/<sha256>/<name>``) in one folder
    shared by every Gradio process of the machine (``/tmp/gradio``), serves that folder
    through its file route, and deletes the files it created when it shuts down. Shared, one
    demo's shutdown deletes an identical upload another demo was just handed (seen under
    load: "file not found" for a good query), and each demo's file route serves the others'
    uploads.
    """
    if os.environ.get("GRADIO_TEMP_DIR"):
        return Path(os.environ["GRADIO_TEMP_DIR"])
    path = tempfile.mkdtemp(prefix="app_stanford-gradio-")
    os.environ["GRADIO_TEMP_DIR"] = path
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return Path(path)


def _query_image_class():
    import gradio as gr

    def refused():
        return gr.Error(guard.REFUSED_QUERY, title="Cannot search with this image", print_exception=False)

    class QueryImage(gr.Image):
        """gr.Image whose preprocessing hands the uploaded file's path over *undecoded*.

        gr.Image would open the upload itself (type="filepath" still calls PIL.Image.open),
        so a non-image or a decompression bomb would fail inside Gradio with a blank error.
        Here every byte is decoded by `search.query.load_query_image`, which refuses with a
        reason.
        ``is_template``: the browser renders it with gr.Image's own frontend.
        """

        is_template = True

        def preprocess(self, payload):
            if payload is None:
                return None
            if payload.url and payload.url.startswith("data:"):  # base64 through the API
                return self._save_data_url(payload.url)
            if payload.path is None:
                raise gr.Error("The upload carries no file; upload the photo again.")
            # a payload may name any path (without Gradio's "meta" marker Gradio passes it on
            # unchecked): only files in this process's upload folder are opened
            if not guard.is_uploaded_file(str(payload.path), guard.upload_roots()):
                raise refused()
            return str(payload.path)

        async def async_move_resource_to_block_cache(self, url_or_file_path):
            # Gradio would download a payload's web address here, unbounded, before any handler
            if url_or_file_path is not None and guard.is_web_address(str(url_or_file_path)):
                raise refused()
            return await super().async_move_resource_to_block_cache(url_or_file_path)

        def move_resource_to_block_cache(self, url_or_file_path):
            if url_or_file_path is not None and guard.is_web_address(str(url_or_file_path)):
                raise refused()
            return super().move_resource_to_block_cache(url_or_file_path)

        def _save_data_url(self, url):
            max_bytes = getattr(self, "max_data_url_bytes", 10 << 20)
            header, _, data = url.partition(",")
            if len(data) > max_bytes * 4 // 3 + 4:
                raise gr.Error(f"The image is larger than {max_bytes >> 20} MB.")
            try:
                raw = base64.b64decode(data, validate=True) if header.endswith(";base64") else b""
            except (binascii.Error, ValueError):
                raise gr.Error("The data URL is not valid base64.") from None
            folder = Path(self.GRADIO_CACHE) / hashlib.sha256(raw).hexdigest()[:32]
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / "query"
            path.write_bytes(raw)
            self.temp_files.add(str(path))  # deleted with Gradio's own files (delete_cache, shutdown)
            return str(path)

    return QueryImage


def _caption(r):
    product = f" · #{r['product_id']}" if r["product_id"] else ""
    return f"{r['score']:.3f} · {r['category']}{product}"


def _timing_text(out):
    t = out["timing_ms"]
    parts = []
    if "decode" in t:
        parts.append(f"decode {t['decode']:.1f} ms")
    parts.append("embedding: stored vector" if out.get("stored_vector") else f"embedding {t['embed']:.1f} ms")
    parts.append(f"search {t['search']:.1f} ms over {out['gallery_size']:,} images")
    parts.append(f"total {t['total']:.1f} ms")
    return " · ".join(parts)


def _result_gallery(engine, out):
    """(file, caption) of each result, the file from the result's own path (with --watch the
    gallery may change meanwhile). A photo deleted from the folder since the index was made
    (before --watch's next rescan) is dropped from ``out["results"]`` too: Gradio would hand
    the client a link that fails."""
    gallery = [(engine.result_path(r), _caption(r)) for r in out["results"]]
    if not all(os.path.exists(path) for path, _ in gallery):
        out["results"] = [r for r, (path, _) in zip(out["results"], gallery) if os.path.exists(path)]
        gallery = [(engine.result_path(r), _caption(r)) for r in out["results"]]
    return gallery


def _guarded(fn, *args):
    """Run a search (or an explanation); QueryError → its message in the page, anything else → a generic
    message (the traceback goes to the server log only, never to the user)."""
    import gradio as gr

    try:
        return fn(*args)
    except search_query.QueryError as e:
        raise gr.Error(str(e), title="Cannot search with this image", print_exception=False) from None
    except gr.Error:
        raise
    except Exception:
        logger.error("search failed:\n%s", traceback.format_exc())
        raise gr.Error("The search failed on the server (details are in the server log). "
                       "Try another photo.", print_exception=False) from None


def _explain_handlers(engine, search):
    """The /explain endpoint's, the \"Show why\" switch's and the UI search's handlers over
    ``engine`` (``search``: build_app's /search handler)."""
    import gradio as gr

    guarded = _guarded

    def explain(image, result):
        """Why one result matches the query photo: the query's and the result's similarity
        maps (overlays and raw grids), the score they sum to, and whether the split is exact.
        ``result``: the result's ``catalogue_path`` from the search's ranked JSON."""
        if not image:
            raise gr.Error("Upload a query photo first.", title="No query image", print_exception=False)
        e = guarded(engine.explain, image, result_reference(result))
        return e["query_overlay"], e["result_overlay"], explanation_json(e)

    def show_why(on, image, ranked):
        shown, queries, visible = guarded(why_outputs, engine, image, ranked, on)
        return shown, gr.update(value=queries, visible=visible)

    def search_why(image, k, category, on):
        """The page's search (upload, Search button, example): the results and, switch on, their
        maps in the same event: one round trip through Gradio's queue (~0.3 s here), not two."""
        gallery, ranked, timing = search(image, k, category)
        if not on:
            return gallery, ranked, timing, gr.update(value=[], visible=False)
        shown, queries = show_why(on, image, ranked)
        return shown, ranked, timing, queries

    return explain, show_why, search_why


WHY_K = 5  # results explained when "Show why" is on


def explanation_json(e):
    """The /explain endpoint's JSON of one `SearchEngine.explain` result (maps, score, exactness)."""
    return {k: e[k] for k in ("catalogue_path", "index", "query_map", "result_map", "score", "exact", "label")}


def result_reference(value):
    """/explain's result input → what `SearchEngine.explain` takes: a catalogue path (a string
    with a file name) as is; a bare integer (older clients) as a row of the current gallery."""
    import gradio as gr

    text = "" if value is None else str(value).strip()
    if not text:
        raise gr.Error("Name the result to explain: its catalogue_path from the search's results.",
                       print_exception=False)
    return int(text) if text.lstrip("-").isdigit() else text


def attach_store(engine, max_gb, progress=True, index=None):
    """Bring the explanation store of the gallery index (``index``, default ``engine``'s) up to
    date and let ``engine`` use it (`SearchEngine.attach_explain_store`, at
    `search.explain_store.store_path` of the index file), unless ``max_gb`` is 0 or the gallery
    has no index file (a database gallery)."""
    index = engine.index if index is None else index
    path = getattr(index, "path", None)
    return engine.attach_explain_store(None if path is None else explain_store.store_path(path),
                                       max_bytes=int(max_gb * 1e9), progress=progress, index=index)


def why_outputs(engine, query, ranked, on, k=WHY_K):
    """The results gallery and the query-overlay gallery for "Show why": off (or no results),
    the plain gallery and an empty, hidden second gallery; on, the first ``k`` results drawn
    with their similarity maps (caption + " · why") and, in the second gallery, the query's map
    against each of them."""
    results = (ranked or {}).get("results") or []
    plain = [(engine.result_path(r), _caption(r)) for r in results]
    if not on or not results or not query:
        return plain, [], False
    explained = engine.explain_results(query, [r["catalogue_path"] for r in results[:k]])
    shown = [(e["result_overlay"], _caption(r) + " · why") for e, r in zip(explained, results)]
    queries = [(e["query_overlay"], f"query vs #{r['rank']} · {e['score']:.3f}" + ("" if e["exact"] else " (approx.)"))
               for e, r in zip(explained, results)]
    return shown + plain[len(shown):], queries, True


def _api_components(gr):
    """The API-only components, hidden: (explain index input, explain button, explain outputs,
    the /search button: the page searches through its own event, which also draws the maps)."""
    with gr.Row(visible=False):
        explain_index = gr.Textbox(label="result (its catalogue_path)")
        outputs = [gr.Image(label="query map", type="pil"), gr.Image(label="result map", type="pil"),
                   gr.JSON(label="explanation")]
        button = gr.Button("Explain")
        search_button = gr.Button("Search (API)")
    return explain_index, button, outputs, search_button


def _info_line(margs, index):
    """The model and gallery line under the demo's title."""
    where = (f" ({index.meta['split']} split)" if index.meta.get("split") else
             f" (folder {Path(index.meta['gallery']['root']).name})" if index.meta.get("gallery") else "")
    return (f"{margs['backbone']}, {margs['embedding_size']}-d embeddings at {margs['image_size']} px · "
            f"gallery: {len(index):,} images{where}")


def build_app(model, index, data_root, title=None, max_pixels=40_000_000, max_upload_mb=10,
              concurrency_limit=1, max_examples=12, explain_source=None, explain_store_gb=1.0):
    """The demo as a `gr.Blocks` (not launched: see `launch_app`).

    ``explain_store_gb``: largest explanation store made for "Show why" (`attach_store`).

    Events: the public API endpoint ``/search`` (image, k, category → gallery, ranked-results
    JSON, timing text; on a hidden button); the Search button, a new upload / paste / webcam
    shot and a click on an example run the same search and, with "Show why" on, the maps in the
    same event; a click on a result searches with that gallery image's stored embedding. All share one concurrency slot: on CPU, one forward pass at a time is fastest.
    """
    import gradio as gr

    engine = search_engine.SearchEngine(model, index, data_root, max_pixels=max_pixels,
                                        explain_source=explain_source)
    engine.warm_up()
    attach_store(engine, explain_store_gb)
    QueryImage = _query_image_class()
    margs = model.model_args
    title = title or "Visual product search"

    def outputs_of(out):
        return _result_gallery(engine, out), out, _timing_text(out)

    guarded = _guarded

    def search(image, k=search_query.DEFAULT_K, category=search_query.CATEGORY_ALL):
        """Search the catalogue with a photo: the k most similar gallery images, optionally
        within one category."""
        if not image:
            raise gr.Error("Upload, paste or take a photo first.", title="No query image",
                           print_exception=False)
        return outputs_of(guarded(engine.search_file, image, k, category))

    def search_result(evt: gr.SelectData, ranked, k, category):
        try:
            clicked = ranked["results"][evt.index]
            i, path = int(clicked["index"]), clicked["catalogue_path"]
        except (TypeError, KeyError, IndexError, ValueError):
            raise gr.Error("Run a search first, then click one of its results.",
                           print_exception=False) from None
        out = guarded(engine.search_gallery_item, i, k, category, path)
        out["stored_vector"] = True
        return (engine.result_path(clicked), *outputs_of(out))

    explain, show_why, search_why = _explain_handlers(engine, search)
    examples = [[engine.abs_paths[i]] for i in engine.example_indices(max_examples)]
    info = _info_line(margs, index)

    with gr.Blocks(title=title, analytics_enabled=False, delete_cache=(3600, 3600)) as demo:
        gr.Markdown(f"# {title}\nUpload, paste or take a photo of a product; the nearest catalogue "
                    f"photos appear ranked by cosine similarity. Click a result to search with it.  \n"
                    f"<small>{info}</small>")
        with gr.Row():
            with gr.Column(scale=1, min_width=280):
                query = QueryImage(label="Query photo", type="filepath", image_mode=None,
                                   sources=["upload", "clipboard", "webcam"], height=300,
                                   elem_id="query")
                query.max_data_url_bytes = int(max_upload_mb * (1 << 20))
                k = gr.Slider(1, search_query.MAX_K, value=search_query.DEFAULT_K, step=1,
                              label="Results (K)", elem_id="k")
                category = gr.Dropdown(search_query.category_choices(index), value=search_query.CATEGORY_ALL,
                                       label="Category filter", elem_id="category")
                why = gr.Checkbox(False, label=f"Show why (similarity maps of the first {WHY_K} results)",
                                  elem_id="why")
                button = gr.Button("Search", variant="primary", elem_id="search")
                timing = gr.Markdown(elem_id="timing")
            with gr.Column(scale=2):
                # format: how the "Show why" overlays (PIL images) are served; JPEG encodes a
                # 224 px overlay in ~1.5 ms against ~5 ms for Gradio's default WebP
                results = gr.Gallery(label="Nearest products (click one to search with it)",
                                     columns=4, height=600, object_fit="contain", format="jpeg",
                                     allow_preview=False, elem_id="results")
                why_query = gr.Gallery(label="The query's side of each match", columns=5, height=220, format="jpeg",
                                       object_fit="contain", allow_preview=False, visible=False,
                                       elem_id="why_query")
                with gr.Accordion("Ranked results (JSON)", open=False):
                    ranked = gr.JSON(elem_id="ranked")
                api_io = _api_components(gr)
        if examples:
            ex = gr.Examples(examples=examples, inputs=[query], label="Example queries from the gallery",
                             examples_per_page=max_examples, elem_id="examples")
        outs = [results, ranked, timing]
        common = dict(concurrency_limit=concurrency_limit, concurrency_id="search")
        why_args = dict(fn=show_why, inputs=[why, query, ranked], outputs=[results, why_query],
                        api_visibility="private", **common)
        page_search = dict(fn=search_why, inputs=[query, k, category, why], outputs=[*outs, why_query],
                           api_visibility="private", **common)
        explain_index, explain_button, explain_outs, api_search = api_io
        api_search.click(search, [query, k, category], outs, api_name="search", **common)
        button.click(**page_search)
        query.upload(**page_search)
        results.select(search_result, [ranked, k, category], [query, *outs],
                       api_visibility="private", **common).then(**why_args)
        why.change(**why_args)
        if examples:
            ex.load_input_event.then(**page_search)
        explain_button.click(explain, [query, explain_index], explain_outs, api_name="explain", **common)
    demo.engine = engine  # for tests and benchmarks
    return demo


def exposure_warning(host, share, auth):
    """The warning for a demo reachable from the network without a login, else None."""
    if auth or (guard.is_loopback(host) and not share):
        return None
    return (f"The demo is reachable from the network (--host {host}{', --share' if share else ''}) without a "
            "login: anyone who reaches it can search the catalogue and view its photos. Pass --auth "
            "USER:PASSWORD or --auth_file FILE.")


def launch_app(demo, index, data_root, host="127.0.0.1", port=7860, share=False,
               max_upload_mb=10, max_queue=64, max_sessions=256, prevent_thread_lock=False,
               quiet=False, auth=None, allow_origins=()):
    """Launch ``demo`` with the demo's safety settings: loopback unless told otherwise, the
    upload size cap, a bounded queue, `search.guard.RequestGuard` in front of every route (the
    file route serves exactly the photos of the index being served, decided per request, and
    Gradio's own upload folder; pages of other origins than ``allow_origins`` and the server's
    own are refused), Gradio's login for ``auth`` (a list of (user, password)), and at most
    ``max_sessions`` sessions' state kept in memory.

    Why the session cap: Gradio keeps a per-session copy of the app's config (about 50 KB)
    for its 10,000 most recent sessions, and every API call without a session hash is a
    new session, so a busy API would grow the server by ~0.5 GB before plateauing. This app
    keeps nothing per session (no gr.State; a result click reads the ranked JSON from the
    page), so evicting old sessions loses nothing.
    """
    from starlette.middleware import Middleware

    warning = exposure_warning(host, share, auth)
    if warning:
        logger.warning(warning)
    engine = demo.engine
    middleware = Middleware(guard.RequestGuard, served=lambda: engine.served, upload_roots=guard.upload_roots,
                            allow_origins=tuple(allow_origins))
    demo.queue(max_size=max_queue)
    return demo.launch(
        server_name=host, server_port=port, share=share, prevent_thread_lock=prevent_thread_lock,
        # Gradio's own check passes the data root; the guard in front decides which of its files
        allowed_paths=[str(Path(data_root).resolve())], max_file_size=int(max_upload_mb * (1 << 20)),
        show_error=False, ssr_mode=False, quiet=quiet, footer_links=["api"],
        state_session_capacity=max_sessions, auth=auth or None, app_kwargs={"middleware": [middleware]},
    )


# ============ command line ============

def get_args_parser(add_help=True):
    parser = argparse.ArgumentParser(
        "app_stanford.py", add_help=add_help, formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Gradio demo: search the product gallery with a photo.")
    group = parser.add_argument_group("model and gallery")
    group.add_argument("--checkpoint", default=None,
                       help="a checkpoint of train.py (e.g. checkpoints/<run>/best.pth); default: the "
                            "newest <checkpoint_dir>/*/best.pth")
    group.add_argument("--checkpoint_dir", default="checkpoints",
                       help="where to look for best.pth when --checkpoint is not given")
    evaluation.add_zero_shot_args(group, "search with --backbone's pretrained features instead of a "
                                         "checkpoint (before any training); needs --gallery or --data_root")
    group.add_argument("--gallery", default=None, metavar="DIR",
                       help="search every image under DIR (recursive, no labels; category = first "
                            "folder level); a rerun embeds only added or changed files")
    group.add_argument("--data_root", default=None,
                       help="labelled dataset (SOP's Ebay files, a catalogue.csv or a <category>/"
                            "<product>/<image> tree) whose --split is the gallery; default: the one "
                            "the checkpoint was trained on (its saved args)")
    group.add_argument("--split", default=None, choices=datasets.SPLITS,
                       help="which images of --data_root form the gallery (SOP test: 60,502); default "
                            "test, or trainval (the whole catalogue) for a run trained with --test_fraction 0")
    group.add_argument("--test_fraction", type=float, default=None,
                       help="--data_root without a split: share of its products in test; default "
                            "the checkpoint's training value, else 0.5")
    group.add_argument("--index", default=None,
                       help="gallery index file; default beside the checkpoint (runs/<zero-shot "
                            "model>/ with --zero_shot): gallery_<split>.npz, or "
                            "gallery_<folder>_<hash>.npz for --gallery")
    group.add_argument("--index_type", default="exact", choices=["exact", "ivf", "hnsw"],
                       help="gallery search: exact (SOP-sized galleries), or approximate faiss ivf / "
                            "hnsw for millions of images (needs pip install faiss-cpu; see bench/README.md)")
    vectordb.add_backend_args(group)
    group.add_argument("--checkpoint_every", default=CHECKPOINT_EVERY, type=int, metavar="N",
                       help="--gallery indexing saves its progress every N images: a killed run, run "
                            "again, embeds at most the last N again")
    group.add_argument("--rebuild_index", action="store_true",
                       help="rebuild the gallery index even when it is up to date")
    group.add_argument("--build_index", action="store_true",
                       help="build / refresh the gallery index, then exit without serving")
    group.add_argument("--watch", nargs="?", type=float, const=gallery_watch.DEFAULT_INTERVAL, default=None,
                       metavar="SECONDS",
                       help="with --gallery: rescan DIR every SECONDS (%(const)g without a value) while "
                            "serving; photos added or changed are embedded and become searchable, "
                            "removed ones disappear, without a restart (a query sees the old gallery or "
                            "the new one; a photo appears after at most SECONDS plus its embedding)")
    group.add_argument("--explain_store_gb", default=1.0, type=float, metavar="GB",
                       help="\"Show why\" reads each result's similarity-map projections from a store beside "
                            "the index (12.5 KB an image at 224 px and 128-d; made at start-up, kept in "
                            "memory) when it fits in GB; 0: no store, the switch runs the network over "
                            "the results (slower)")
    group.add_argument("--batch_size", default=64, type=int, help="batch size for embedding the gallery")
    group.add_argument("--workers", default=None, type=int,
                       help="DataLoader workers for embedding the gallery; default "
                            "loaders.loader_settings for the device and CPU count")
    group.add_argument("--threads", default=None, type=int,
                       help="torch CPU threads (default: torch's choice, one per core)")
    group.add_argument("--verbose", action="store_true",
                       help="list every skipped file (not an image, unreadable)")
    group.add_argument("--device", default="auto",
                       help="where the model embeds the gallery and the queries: auto (cuda when "
                            "available, with float16 autocast for the gallery), cpu, cuda, cuda:N")
    inference.add_runtime_arg(group)
    group = parser.add_argument_group("server")
    group.add_argument("--host", default="127.0.0.1",
                       help="interface to bind; 0.0.0.0 makes the demo reachable from the network")
    group.add_argument("--port", default=7860, type=int, help="port to listen on")
    group.add_argument("--share", action="store_true",
                       help="also open a public *.gradio.live link (needs internet; opt-in)")
    group.add_argument("--max_upload_mb", default=10.0, type=float, help="largest upload accepted, in MB")
    group.add_argument("--max_megapixels", default=40.0, type=float,
                       help="largest query accepted, in declared megapixels (decompression bombs)")
    group.add_argument("--max_queue", default=64, type=int,
                       help="requests that may wait in the queue; more are refused ('queue full')")
    group.add_argument("--auth", default=None, metavar="USER:PASSWORD",
                       help="require this login (Gradio's auth) for the page and the API; recommended "
                            "whenever --host or --share exposes the demo")
    group.add_argument("--auth_file", default=None, metavar="FILE",
                       help="require a login from FILE: one USER:PASSWORD a line (# comments)")
    group.add_argument("--allow_origin", action="append", default=[], metavar="ORIGIN",
                       help="a web origin (https://shop.example) whose pages may call the API besides the "
                            "demo's own page (repeatable); any other origin is refused")
    return parser


def check_args(parser, args):
    if args.zero_shot and (args.backbone is None or args.checkpoint):
        parser.error("--zero_shot needs --backbone NAME and no --checkpoint")
    if args.zero_shot and not (args.gallery or args.data_root):
        parser.error("--zero_shot needs --gallery DIR or --data_root DIR (nothing to search otherwise)")
    if args.gallery and args.data_root:
        parser.error("pass --gallery DIR (any folder of photos) or --data_root DIR (a labelled "
                     "dataset's split), not both")
    if args.watch is not None and (not args.gallery or args.build_index or not args.watch > 0):
        parser.error("--watch [SECONDS] rescans a --gallery DIR while serving: it needs --gallery, "
                     "SECONDS > 0 and no --build_index")
    if args.index_backend == "file" and (args.db_uri or args.collection):
        parser.error("--db_uri and --collection go with --index_backend milvus")
    if args.index_backend == "milvus" and args.index:
        parser.error("--index names a file index; with --index_backend milvus use --db_uri / --collection")
    try:
        vectordb.apply_backend_args(args)  # --db_timeout: every database call of this process
    except ValueError as e:
        parser.error(str(e))
    if args.test_fraction is not None and not 0 <= args.test_fraction < 1:
        parser.error(f"--test_fraction must be in [0, 1), got {args.test_fraction}")
    if args.image_size < 32:
        parser.error(f"--image_size must be >= 32, got {args.image_size}")
    for name, low in (("port", 0), ("max_upload_mb", 0), ("max_megapixels", 0), ("max_queue", 0),
                      ("batch_size", 0), ("checkpoint_every", 0)):
        if getattr(args, name) <= low:
            parser.error(f"--{name} must be > {low}, got {getattr(args, name)}")
    if args.explain_store_gb < 0:
        parser.error(f"--explain_store_gb must be >= 0 (0: no store), got {args.explain_store_gb}")
    if args.port > 65535:
        parser.error(f"--port must be in 1..65535, got {args.port}")
    args.auth_pairs = auth_pairs(parser, args)
    device = str(args.device)
    if device not in ("auto", "cpu") and not (device == "cuda" or device.startswith("cuda:")):
        parser.error(f"--device must be auto, cpu, cuda or cuda:N, got {device!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {device}: CUDA is not available on this machine; use cpu or auto")


def auth_pairs(parser, args):
    """The (user, password) pairs of --auth / --auth_file (None: no login)."""
    pairs = []
    try:
        if args.auth:
            pairs.append(guard.parse_auth(args.auth))
        if args.auth_file:
            pairs.extend(guard.read_auth_file(args.auth_file))
    except ValueError as e:
        parser.error(f"--auth / --auth_file: {e}")
    except OSError as e:
        parser.error(f"--auth_file {args.auth_file}: {e.strerror or e}")
    return pairs or None


def main(args):
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    catalogue.set_verbose(args.verbose)
    if args.verbose:
        logger.setLevel(logging.DEBUG)
    if args.threads:
        torch.set_num_threads(args.threads)

    # ============ model ============
    try:
        loaded = search_loading.load_search_model(
            args.checkpoint, args.checkpoint_dir, args.device,
            zero_shot_backbone=args.backbone if args.zero_shot else None, weights=args.weights,
            image_size=args.image_size, runtime=args.runtime)
    except search_loading.SetupError as e:
        sys.exit(str(e))

    # ============ gallery index ============
    options = dict(index_path=args.index, batch_size=args.batch_size, workers=args.workers,
                   rebuild=args.rebuild_index, index_type=args.index_type, backend=args.index_backend,
                   db_uri=args.db_uri, collection=args.collection, checkpoint_every=args.checkpoint_every)
    try:
        if args.gallery:
            index, data_root = search_loading.folder_index(loaded, args.gallery, **options)
        else:
            index, data_root = search_loading.dataset_index(loaded, args.data_root, args.split,
                                                           test_fraction=args.test_fraction, **options)
    except search_loading.SetupError as e:
        sys.exit(str(e))
    except ImportError as e:  # --index_type ivf / hnsw without faiss
        sys.exit(f"Cannot build or load the {args.index_type} gallery index: {e}")
    except OSError as e:  # the index could not be written (full disk, permissions)
        sys.exit(f"Gallery index not saved: {e}\nPass --index PATH to write it somewhere else.")
    explain_from = loaded.checkpoint or (args.backbone, args.weights, args.image_size)
    if args.build_index:
        attach_store(search_engine.SearchEngine(loaded.model, index, data_root, explain_source=explain_from),
                     args.explain_store_gb)
        return index

    # ============ serving ============
    use_private_gradio_temp_dir()
    if threading.current_thread() is threading.main_thread():
        # SIGTERM (kill, docker stop, systemd) becomes a normal exit: Gradio shuts down and
        # the private upload folder is removed, as on Ctrl-C
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    demo = build_app(loaded.model, index, data_root, max_pixels=int(args.max_megapixels * 1e6),
                     max_upload_mb=args.max_upload_mb, explain_source=explain_from,
                     explain_store_gb=args.explain_store_gb)
    if args.watch:
        demo.watcher = start_watch(demo, folder_refresh(demo.engine, loaded, args), args.watch, data_root)
    launch_app(demo, index, data_root, host=args.host, port=args.port, share=args.share,
               max_upload_mb=args.max_upload_mb, max_queue=args.max_queue, auth=getattr(args, "auth_pairs", None),
               allow_origins=args.allow_origin)
    return demo


def folder_refresh(engine, loaded, args):
    """``--watch``'s ``refresh()`` for ``--gallery`` (`search.watch`): a new index when the
    folder changed, else None; with ``--index_backend milvus`` the database gallery itself."""
    workers = 0 if args.workers is None else args.workers
    if args.index_backend == "milvus":
        return gallery_watch.database_refresher(engine.index, loaded.model, batch_size=args.batch_size,
                                                workers=workers)
    return gallery_watch.folder_refresher(
        loaded, args.gallery, current=lambda: engine.index, index_path=args.index,
        index_type=args.index_type, batch_size=args.batch_size, workers=workers)


def start_watch(demo, refresh, interval, data_root):
    """Start ``--watch``: every ``interval`` s, ``refresh()``; a new index is swapped into the
    demo's engine (`SearchEngine.replace_index`, which also swaps the photos the file route
    serves). Returns the running `search.watch.GalleryWatcher` (``.stop()`` ends it)."""
    engine = demo.engine

    def refresh_and_serve():
        index = refresh()
        if index is not None and engine.explain_store is not None:  # new photos' projections too
            attach_store(engine, engine.explain_store_gb, progress=False, index=index)
        return index

    logger.info("Watching %s: rescanned every %g s", data_root, interval)
    return gallery_watch.GalleryWatcher(refresh_and_serve, engine.replace_index, interval).start()


if __name__ == "__main__":
    parser = get_args_parser()
    args = parser.parse_args()
    check_args(parser, args)
    main(args)
