"""The demo's web page and API (Gradio) over a `search.engine.SearchEngine`: the page's layout
and events (`build_app`), the public endpoints ``/search`` and ``/explain`` (the query components:
`search.query_components`), and the launch with the demo's safety settings (`launch_app`:
`search.guard` in front of every route, an optional login). ``app_stanford.py`` is the command line over it.
"""

import atexit
import logging
import os
from pathlib import Path
import shutil
import tempfile
import traceback
import types

from search import engine as search_engine
from search import explain_store, guard, products, vectordb
from search import query as search_query
from search.query_components import query_files_class, query_image_class

logger = logging.getLogger("app_stanford")  # the demo's log, whichever module writes to it


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


def _caption(r):
    product = f" · #{r['product_id']}" if r["product_id"] else ""
    photos = (
        f" · {r['matched_photos']}/{r['photos']} photos match" if r.get("photos") and r.get("match") is not None else ""
    )
    mark = "✓ match · " if r.get("match") else ""
    return f"{mark}{r['score']:.3f} · {r['category']}{product}{photos}"


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
    except vectordb.DatabaseError as e:  # the database is down or slow: say so, it reconnects by itself
        logger.error("search failed: %s", e)
        raise gr.Error(
            "The catalogue database is not answering right now; try again in a few seconds.",
            title="Database unavailable",
            print_exception=False,
        ) from None
    except gr.Error:
        raise
    except Exception:
        logger.error("search failed:\n%s", traceback.format_exc())
        raise gr.Error(
            "The search failed on the server (details are in the server log). Try another photo.", print_exception=False
        ) from None


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

    def search_why(image, k, category, on, more_photos=None):
        """The page's search (upload, Search button, example): the results and, switch on, their
        maps in the same event: one round trip through Gradio's queue (~0.3 s here), not two."""
        gallery, ranked, timing = search(image, k, category, more_photos)
        if not on or more_photos:
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
        raise gr.Error(
            "Name the result to explain: its catalogue_path from the search's results.", print_exception=False
        )
    return int(text) if text.lstrip("-").isdigit() else text


def attach_store(engine, max_gb, progress=True, index=None):
    """Bring the explanation store of the gallery index (``index``, default ``engine``'s) up to
    date and let ``engine`` use it (`SearchEngine.attach_explain_store`, at
    `search.explain_store.store_path` of the index file), unless ``max_gb`` is 0 or the gallery
    has no index file (a database gallery)."""
    index = engine.index if index is None else index
    path = getattr(index, "path", None)
    return engine.attach_explain_store(
        None if path is None else explain_store.store_path(path),
        max_bytes=int(max_gb * 1e9),
        progress=progress,
        index=index,
    )


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
    queries = [
        (e["query_overlay"], f"query vs #{r['rank']} · {e['score']:.3f}" + ("" if e["exact"] else " (approx.)"))
        for e, r in zip(explained, results)
    ]
    return shown + plain[len(shown) :], queries, True


def _api_components(gr):
    """The API-only components, hidden: (explain index input, explain button, explain outputs,
    the /search button: the page searches through its own event, which also draws the maps)."""
    with gr.Row(visible=False):
        explain_index = gr.Textbox(label="result (its catalogue_path)")
        outputs = [
            gr.Image(label="query map", type="pil"),
            gr.Image(label="result map", type="pil"),
            gr.JSON(label="explanation"),
        ]
        button = gr.Button("Explain")
        search_button = gr.Button("Search (API)")
    return explain_index, button, outputs, search_button


def _info_line(margs, index):
    """The model and gallery line under the demo's title."""
    where = (
        f" ({index.meta['split']} split)"
        if index.meta.get("split")
        else f" (folder {Path(index.meta['gallery']['root']).name})"
        if index.meta.get("gallery")
        else ""
    )
    return (
        f"{margs['backbone']}, {margs['embedding_size']}-d embeddings at {margs['image_size']} px · "
        f"gallery: {len(index):,} images{where}"
    )


def _search_handlers(engine):
    """(search, search_result): the /search endpoint's handler (a photo, K, category and more photos
    of the same item) and the handler of a click on a result (a search with that gallery image's
    stored embedding)."""
    import gradio as gr

    def outputs_of(out):
        gallery = _result_gallery(engine, out)
        return gallery, out, products.verdict(out["results"], out.get("threshold")) + "  \n" + _timing_text(out)

    def search(image, k=search_query.DEFAULT_K, category=search_query.CATEGORY_ALL, more_photos=None):
        """Search the catalogue with a photo (and optionally ``more_photos`` of the same item, fused
        into one query): the k most similar gallery products or images, optionally within one category."""
        photos = [p for p in [image, *(more_photos or [])] if p]
        if not photos:
            raise gr.Error("Upload, paste or take a photo first.", title="No query image", print_exception=False)
        return outputs_of(_guarded(engine.search_files, photos, k, category))

    def search_result(evt: gr.SelectData, ranked, k, category):
        try:
            clicked = ranked["results"][evt.index]
            i, path = int(clicked["index"]), clicked["catalogue_path"]
        except (TypeError, KeyError, IndexError, ValueError):
            raise gr.Error("Run a search first, then click one of its results.", print_exception=False) from None
        out = _guarded(engine.search_gallery_item, i, k, category, path)
        out["stored_vector"] = True
        return (engine.result_path(clicked), *outputs_of(out))

    return search, search_result


def _query_column(gr, index, max_upload_mb):
    """The left column: query photo, K, category filter, "Show why", Search button, timings."""
    query = query_image_class()(
        label="Query photo",
        type="filepath",
        image_mode=None,
        sources=["upload", "clipboard", "webcam"],
        height=300,
        elem_id="query",
    )
    query.max_data_url_bytes = int(max_upload_mb * (1 << 20))
    return types.SimpleNamespace(
        query=query,
        k=gr.Slider(1, search_query.MAX_K, value=search_query.DEFAULT_K, step=1, label="Results (K)", elem_id="k"),
        category=gr.Dropdown(
            search_query.category_choices(index),
            value=search_query.CATEGORY_ALL,
            label="Category filter",
            elem_id="category",
        ),
        more=query_files_class()(
            label="More photos of the same item (optional: one query)",
            file_count="multiple",
            file_types=["image"],
            height=120,
            elem_id="more_photos",
        ),
        why=gr.Checkbox(False, label=f"Show why (similarity maps of the first {WHY_K} results)", elem_id="why"),
        button=gr.Button("Search", variant="primary", elem_id="search"),
        timing=gr.Markdown(elem_id="timing"),
    )


def _results_column(gr):
    """The right column: the results gallery, the query's side of "Show why", the ranked JSON
    and the hidden API-only components."""
    # format: how the "Show why" overlays (PIL images) are served; JPEG encodes a 224 px
    # overlay in ~1.5 ms against ~5 ms for Gradio's default WebP
    results = gr.Gallery(
        label="Nearest products (click one to search with it)",
        columns=4,
        height=600,
        object_fit="contain",
        format="jpeg",
        allow_preview=False,
        elem_id="results",
    )
    why_query = gr.Gallery(
        label="The query's side of each match",
        columns=5,
        height=220,
        format="jpeg",
        object_fit="contain",
        allow_preview=False,
        visible=False,
        elem_id="why_query",
    )
    with gr.Accordion("Ranked results (JSON)", open=False):
        ranked = gr.JSON(elem_id="ranked")
    explain_result, explain_button, explain_outs, api_search = _api_components(gr)
    return types.SimpleNamespace(
        results=results,
        why_query=why_query,
        ranked=ranked,
        explain_result=explain_result,
        explain_button=explain_button,
        explain_outs=explain_outs,
        api_search=api_search,
    )


def _wire(c, r, engine, examples, concurrency_limit):
    """The events of the page (query column ``c``, results column ``r``): the public /search and
    /explain endpoints, and the page's own search (button, upload, example, result click) with
    "Show why" in the same event. All share one concurrency slot: on CPU, one forward pass at a
    time is fastest."""
    search, search_result = _search_handlers(engine)
    explain, show_why, search_why = _explain_handlers(engine, search)
    outs = [r.results, r.ranked, c.timing]
    common = dict(concurrency_limit=concurrency_limit, concurrency_id="search")
    why_args = dict(
        fn=show_why,
        inputs=[c.why, c.query, r.ranked],
        outputs=[r.results, r.why_query],
        api_visibility="private",
        **common,
    )
    page_search = dict(
        fn=search_why,
        inputs=[c.query, c.k, c.category, c.why, c.more],
        outputs=[*outs, r.why_query],
        api_visibility="private",
        **common,
    )
    r.api_search.click(search, [c.query, c.k, c.category, c.more], outs, api_name="search", **common)
    c.button.click(**page_search)
    c.query.upload(**page_search)
    r.results.select(
        search_result, [r.ranked, c.k, c.category], [c.query, *outs], api_visibility="private", **common
    ).then(**why_args)
    c.why.change(**why_args)
    if examples is not None:
        examples.load_input_event.then(**page_search)
    r.explain_button.click(explain, [c.query, r.explain_result], r.explain_outs, api_name="explain", **common)


def build_app(
    model,
    index,
    data_root,
    title=None,
    max_pixels=40_000_000,
    max_upload_mb=10,
    concurrency_limit=1,
    max_examples=12,
    explain_source=None,
    explain_store_gb=1.0,
    results_mode="products",
    threshold=None,
):
    """The demo as a `gr.Blocks` (not launched: see `launch_app`), its engine at ``.engine``.

    ``explain_store_gb``: largest explanation store made for "Show why" (`attach_store`).
    ``results_mode``, ``threshold``: products (one row each) or photos, and the same-product threshold
    (default the model's or the index's), as `search.engine.SearchEngine` takes them.
    Events: the public API endpoint ``/search`` (image, k, category, more photos of the same item
    → gallery, ranked-results JSON, timing text; on a hidden button) and ``/explain`` (image, a
    result's catalogue path);
    the Search button, a new upload / paste / webcam shot and a click on an example run the same
    search and, with "Show why" on, the maps in the same event; a click on a result searches
    with that gallery image's stored embedding (`_wire`).
    """
    import gradio as gr

    engine = search_engine.SearchEngine(
        model,
        index,
        data_root,
        max_pixels=max_pixels,
        explain_source=explain_source,
        results_mode=results_mode,
        threshold=threshold,
    )
    engine.warm_up()
    attach_store(engine, explain_store_gb)
    title = title or "Visual product search"
    with gr.Blocks(title=title, analytics_enabled=False, delete_cache=(3600, 3600)) as demo:
        gr.Markdown(
            f"# {title}\nUpload, paste or take a photo of a product; the nearest catalogue "
            f"photos appear ranked by cosine similarity. Click a result to search with it.  \n"
            f"<small>{_info_line(model.model_args, index)}</small>"
        )
        with gr.Row():
            with gr.Column(scale=1, min_width=280):
                c = _query_column(gr, index, max_upload_mb)
            with gr.Column(scale=2):
                r = _results_column(gr)
        examples = _example_queries(gr, engine, c.query, max_examples)
        _wire(c, r, engine, examples, concurrency_limit)
    demo.engine = engine  # for tests and benchmarks
    return demo


def _example_queries(gr, engine, query, max_examples):
    """The gallery photos offered as example queries (``query``'s input; up to ``max_examples``,
    `SearchEngine.example_indices`), or None for a gallery without any."""
    example_files = [[engine.abs_paths[i]] for i in engine.example_indices(max_examples)]
    if not example_files:
        return None
    return gr.Examples(
        examples=example_files,
        inputs=[query],
        label="Example queries from the gallery",
        examples_per_page=max_examples,
        elem_id="examples",
    )


def exposure_warning(host, share, auth):
    """The warning for a demo reachable from the network without a login, else None."""
    if auth or (guard.is_loopback(host) and not share):
        return None
    return (
        f"The demo is reachable from the network (--host {host}{', --share' if share else ''}) without a "
        "login: anyone who reaches it can search the catalogue and view its photos. Pass --auth "
        "USER:PASSWORD or --auth_file FILE."
    )


def launch_app(
    demo,
    index,
    data_root,
    host="127.0.0.1",
    port=7860,
    share=False,
    max_upload_mb=10,
    max_queue=64,
    max_sessions=256,
    prevent_thread_lock=False,
    quiet=False,
    auth=None,
    allow_origins=(),
):
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
    middleware = Middleware(
        guard.RequestGuard,
        served=lambda: engine.served,
        upload_roots=guard.upload_roots,
        allow_origins=tuple(allow_origins),
    )
    demo.queue(max_size=max_queue)
    return demo.launch(
        server_name=host,
        server_port=port,
        share=share,
        prevent_thread_lock=prevent_thread_lock,
        # Gradio's own check passes the data root; the guard in front decides which of its files
        allowed_paths=[str(Path(data_root).resolve())],
        max_file_size=int(max_upload_mb * (1 << 20)),
        show_error=False,
        ssr_mode=False,
        quiet=quiet,
        footer_links=["api"],
        state_session_capacity=max_sessions,
        auth=auth or None,
        app_kwargs={"middleware": [middleware]},
    )
