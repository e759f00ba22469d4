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
import logging
import signal
import sys
import threading

import torch

from dataio import catalogue
import datasets
import inference
from search import ann, guard, products, vectordb
from search import engine as search_engine
from search import loading as search_loading
from search import watch as gallery_watch
from search.gallery import CHECKPOINT_EVERY
from search.webapp import attach_store, build_app, launch_app, use_private_gradio_temp_dir
from training import evaluation

logger = logging.getLogger("app_stanford")


# ============ command line ============


def get_args_parser(add_help=True):
    parser = argparse.ArgumentParser(
        "app_stanford.py",
        add_help=add_help,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Gradio demo: search the product gallery with a photo.",
    )
    group = parser.add_argument_group("model and gallery")
    group.add_argument(
        "--checkpoint",
        default=None,
        help="a checkpoint of train.py (e.g. checkpoints/<run>/best.pth); default: the "
        "newest <checkpoint_dir>/*/best.pth",
    )
    group.add_argument(
        "--checkpoint_dir", default="checkpoints", help="where to look for best.pth when --checkpoint is not given"
    )
    evaluation.add_zero_shot_args(
        group,
        "search with --backbone's pretrained features instead of a "
        "checkpoint (before any training); needs --gallery or --data_root",
    )
    group.add_argument(
        "--gallery",
        default=None,
        metavar="DIR",
        help="search every image under DIR (recursive, no labels; category = first "
        "folder level); a rerun embeds only added or changed files",
    )
    group.add_argument(
        "--data_root",
        default=None,
        help="labelled dataset (SOP's Ebay files, a catalogue.csv or a <category>/"
        "<product>/<image> tree) whose --split is the gallery; default: the one "
        "the checkpoint was trained on (its saved args)",
    )
    group.add_argument(
        "--split",
        default=None,
        choices=datasets.SPLITS,
        help="which images of --data_root form the gallery (SOP test: 60,502); default "
        "test, or trainval (the whole catalogue) for a run trained with --test_fraction 0",
    )
    group.add_argument(
        "--test_fraction",
        type=float,
        default=None,
        help="--data_root without a split: share of its products in test; default "
        "the checkpoint's training value, else 0.5",
    )
    group.add_argument(
        "--index",
        default=None,
        help="gallery index file; default beside the checkpoint (runs/<zero-shot "
        "model>/ with --zero_shot): gallery_<split>.npz, or "
        "gallery_<folder>_<hash>.npz for --gallery",
    )
    group.add_argument(
        "--index_type",
        default="exact",
        choices=ann.INDEX_TYPES,
        help="gallery search: exact (SOP-sized galleries), or approximate faiss ivf / "
        "hnsw for millions of images (needs pip install faiss-cpu; see bench/README.md)",
    )
    vectordb.add_backend_args(group)
    group.add_argument(
        "--checkpoint_every",
        default=CHECKPOINT_EVERY,
        type=int,
        metavar="N",
        help="--gallery indexing saves its progress every N images: a killed run, run "
        "again, embeds at most the last N again",
    )
    group.add_argument(
        "--rebuild_index", action="store_true", help="rebuild the gallery index even when it is up to date"
    )
    group.add_argument(
        "--build_index", action="store_true", help="build / refresh the gallery index, then exit without serving"
    )
    group.add_argument(
        "--watch",
        nargs="?",
        type=float,
        const=gallery_watch.DEFAULT_INTERVAL,
        default=None,
        metavar="SECONDS",
        help="with --gallery: rescan DIR every SECONDS (%(const)g without a value) while "
        "serving; photos added or changed are embedded and become searchable, "
        "removed ones disappear, without a restart (a query sees the old gallery or "
        "the new one; a photo appears after at most SECONDS plus its embedding)",
    )
    group.add_argument(
        "--results",
        default="products",
        choices=products.RESULTS_MODES,
        help="products: one row per catalogue product (its best photo, how many of its photos "
        "match); photos: every photo hit (a gallery without product ids shows photos)",
    )
    group.add_argument(
        "--threshold",
        default=None,
        type=float,
        help="same-product threshold (a result matches when its score >= it); default the "
        "checkpoint's calibrated one (train.py, evaluate.py --calibrate), else the index's",
    )
    group.add_argument(
        "--explain_store_gb",
        default=1.0,
        type=float,
        metavar="GB",
        help='"Show why" reads each result\'s similarity-map projections from a store beside '
        "the index (12.5 KB an image at 224 px and 128-d; made at start-up, kept in "
        "memory) when it fits in GB; 0: no store, the switch runs the network over "
        "the results (slower)",
    )
    group.add_argument("--batch_size", default=64, type=int, help="batch size for embedding the gallery")
    group.add_argument(
        "--workers",
        default=None,
        type=int,
        help="DataLoader workers for embedding the gallery; default "
        "loaders.loader_settings for the device and CPU count",
    )
    group.add_argument(
        "--threads", default=None, type=int, help="torch CPU threads (default: torch's choice, one per core)"
    )
    group.add_argument("--verbose", action="store_true", help="list every skipped file (not an image, unreadable)")
    group.add_argument(
        "--device",
        default="auto",
        help="where the model embeds the gallery and the queries: auto (cuda when "
        "available, with float16 autocast for the gallery), cpu, cuda, cuda:N",
    )
    inference.add_runtime_arg(group)
    group = parser.add_argument_group("server")
    group.add_argument(
        "--host", default="127.0.0.1", help="interface to bind; 0.0.0.0 makes the demo reachable from the network"
    )
    group.add_argument("--port", default=7860, type=int, help="port to listen on")
    group.add_argument(
        "--share", action="store_true", help="also open a public *.gradio.live link (needs internet; opt-in)"
    )
    group.add_argument("--max_upload_mb", default=10.0, type=float, help="largest upload accepted, in MB")
    group.add_argument(
        "--max_megapixels",
        default=40.0,
        type=float,
        help="largest query accepted, in declared megapixels (decompression bombs)",
    )
    group.add_argument(
        "--max_queue", default=64, type=int, help="requests that may wait in the queue; more are refused ('queue full')"
    )
    group.add_argument(
        "--auth",
        default=None,
        metavar="USER:PASSWORD",
        help="require this login (Gradio's auth) for the page and the API; recommended "
        "whenever --host or --share exposes the demo",
    )
    group.add_argument(
        "--auth_file",
        default=None,
        metavar="FILE",
        help="require a login from FILE: one USER:PASSWORD a line (# comments)",
    )
    group.add_argument(
        "--allow_origin",
        action="append",
        default=[],
        metavar="ORIGIN",
        help="a web origin (https://shop.example) whose pages may call the API besides the "
        "demo's own page (repeatable); any other origin is refused",
    )
    return parser


def check_args(parser, args):
    if args.zero_shot and (args.backbone is None or args.checkpoint):
        parser.error("--zero_shot needs --backbone NAME and no --checkpoint")
    if args.zero_shot and not (args.gallery or args.data_root):
        parser.error("--zero_shot needs --gallery DIR or --data_root DIR (nothing to search otherwise)")
    if args.gallery and args.data_root:
        parser.error(
            "pass --gallery DIR (any folder of photos) or --data_root DIR (a labelled dataset's split), not both"
        )
    if args.watch is not None and (not args.gallery or args.build_index or not args.watch > 0):
        parser.error(
            "--watch [SECONDS] rescans a --gallery DIR while serving: it needs --gallery, "
            "SECONDS > 0 and no --build_index"
        )
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
    for name, low in (
        ("port", 0),
        ("max_upload_mb", 0),
        ("max_megapixels", 0),
        ("max_queue", 0),
        ("batch_size", 0),
        ("checkpoint_every", 0),
    ):
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
    """The demo of ``args`` (checked by check_args): the model, the gallery index, then the web
    app served (returned); with --build_index, the index only (returned), its explanation store
    filled."""
    configure_process(args)
    loaded = load_model(args)
    index, data_root = load_index(args, loaded)
    explain_from = loaded.checkpoint or (args.backbone, args.weights, args.image_size)
    if args.build_index:
        attach_store(
            search_engine.SearchEngine(loaded.model, index, data_root, explain_source=explain_from),
            args.explain_store_gb,
        )
        return index
    return serve(args, loaded, index, data_root, explain_from)


def configure_process(args) -> None:
    """Logging (--verbose: debug) and torch's thread count (--threads)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    catalogue.set_verbose(args.verbose)
    if args.verbose:
        logger.setLevel(logging.DEBUG)
    if args.threads:
        torch.set_num_threads(args.threads)


def load_model(args):
    """The search model (search.loading.load_search_model): --checkpoint, or --zero_shot's
    backbone; exits with the reason when it cannot be loaded."""
    try:
        return search_loading.load_search_model(
            args.checkpoint,
            args.checkpoint_dir,
            args.device,
            zero_shot_backbone=args.backbone if args.zero_shot else None,
            weights=args.weights,
            image_size=args.image_size,
            runtime=args.runtime,
        )
    except search_loading.SetupError as e:
        sys.exit(str(e))


def load_index(args, loaded):
    """(gallery index, its data root) of --gallery's folder or --data_root's split, loaded or
    built; exits with the reason when it cannot be."""
    options = dict(
        index_path=args.index,
        batch_size=args.batch_size,
        workers=args.workers,
        rebuild=args.rebuild_index,
        index_type=args.index_type,
        backend=args.index_backend,
        db_uri=args.db_uri,
        collection=args.collection,
        checkpoint_every=args.checkpoint_every,
    )
    try:
        if args.gallery:
            return search_loading.folder_index(loaded, args.gallery, **options)
        return search_loading.dataset_index(
            loaded, args.data_root, args.split, test_fraction=args.test_fraction, **options
        )
    except search_loading.SetupError as e:
        sys.exit(str(e))
    except ImportError as e:  # --index_type ivf / hnsw without faiss
        sys.exit(f"Cannot build or load the {args.index_type} gallery index: {e}")
    except OSError as e:  # the index could not be written (full disk, permissions)
        sys.exit(f"Gallery index not saved: {e}\nPass --index PATH to write it somewhere else.")


def serve(args, loaded, index, data_root, explain_from):
    """The web app over ``index`` built and launched (with --watch's rescans); returns it."""
    use_private_gradio_temp_dir()
    if threading.current_thread() is threading.main_thread():
        # SIGTERM (kill, docker stop, systemd) becomes a normal exit: Gradio shuts down and
        # the private upload folder is removed, as on Ctrl-C
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    demo = build_app(
        loaded.model,
        index,
        data_root,
        max_pixels=int(args.max_megapixels * 1e6),
        max_upload_mb=args.max_upload_mb,
        explain_source=explain_from,
        explain_store_gb=args.explain_store_gb,
        results_mode=args.results,
        threshold=args.threshold,
    )
    if args.watch:
        demo.watcher = start_watch(demo, folder_refresh(demo.engine, loaded, args), args.watch, data_root)
    launch_app(
        demo,
        index,
        data_root,
        host=args.host,
        port=args.port,
        share=args.share,
        max_upload_mb=args.max_upload_mb,
        max_queue=args.max_queue,
        auth=getattr(args, "auth_pairs", None),
        allow_origins=args.allow_origin,
    )
    return demo


def folder_refresh(engine, loaded, args):
    """``--watch``'s ``refresh()`` for ``--gallery`` (`search.watch`): a new index when the
    folder changed, else None; with ``--index_backend milvus`` the database gallery itself."""
    workers = 0 if args.workers is None else args.workers
    if args.index_backend == "milvus":
        return gallery_watch.database_refresher(engine.index, loaded.model, batch_size=args.batch_size, workers=workers)
    return gallery_watch.folder_refresher(
        loaded,
        args.gallery,
        current=lambda: engine.index,
        index_path=args.index,
        index_type=args.index_type,
        batch_size=args.batch_size,
        workers=workers,
    )


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
