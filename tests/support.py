"""Plain helpers shared by several test modules (their fixtures are conftest.py's): a tiny
train.py run and its files, the demo served in this process, the reference computations the
demo is checked against, and small photo files.
"""

import contextlib
import csv
from pathlib import Path

import numpy as np
from PIL import Image
import torch

# ============ a tiny train.py run ============

# The original project's training command, verbatim.
SEED_COMMAND = (
    "--dataset stanford --backbone efficientnet_b0 --batch_size 64 --epochs 10 "
    "--lr 0.0001 --margin 0.5 --embedding_size 128"
).split()
CHECKPOINT_KEYS = {
    "model",
    "model_args",
    "args",
    "epoch",
    "metrics",
    "optimizer",
    "scheduler",
    "scaler",
    "rng",
    "git_commit",
    "format_version",
}


# evaluate.py on the CPU in a test: no loader workers, no progress bars, no example figures
QUIET_EVAL = ["--workers", "0", "--device", "cpu", "--no-progress", "--num_examples", "0"]


def tiny_argv(root, out, *extra, run="t"):
    """Flags of a tiny CPU run writing under ``out``; ``extra`` flags override (argparse: last wins)."""
    return [
        "--dataset",
        "synthetic",
        "--data_root",
        str(root),
        "--backbone",
        "resnet18",
        "--weights",
        "none",
        "--image_size",
        "32",
        "--batch_size",
        "16",
        "--images_per_class",
        "4",
        "--epochs",
        "2",
        "--max_steps_per_epoch",
        "2",
        "--workers",
        "0",
        "--projector_samples",
        "8",
        "--lr",
        "1e-3",
        "--no-progress",
        "--checkpoint_dir",
        str(Path(out) / "checkpoints"),
        "--log_dir",
        str(Path(out) / "runs"),
        "--run_name",
        run,
        *map(str, extra),
    ]


def parse(argv):
    """train.py's arguments as its command line checks them (argparse errors exit 2)."""
    import train
    from training import arg_checks

    parser = train.get_args_parser()
    args = parser.parse_args(argv)
    arg_checks.validate_args(args, parser)
    return args


def read_rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def model_rows(path):
    """metrics.csv without the columns that measure the machine (they differ run to run)."""
    from training import runs

    return [{k: v for k, v in row.items() if k not in runs.TIMING_COLUMNS} for row in read_rows(path)]


def assert_checkpoint_loads(path):
    import checkpoints

    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    assert CHECKPOINT_KEYS <= set(ckpt), set(ckpt)
    checkpoints.load_checkpoint(path)
    return ckpt


# ============ the demo ============


@contextlib.contextmanager
def running_demo(data_root, checkpoint, max_upload_mb=10, port=None, **build_kw):
    """The demo as main() builds it, launched on loopback in this process; yields
    ``(demo, url)`` and closes the server afterwards."""
    import models
    from search import loading as search_loading
    from search import webapp
    from search.tiny_demo import free_port

    model = models.load_model(checkpoint)
    index, _ = search_loading.load_or_build_index(model, checkpoint, data_root, "test", progress=False)
    webapp.use_private_gradio_temp_dir()
    demo = webapp.build_app(model, index, data_root, max_upload_mb=max_upload_mb, **build_kw)
    port = port or free_port()
    webapp.launch_app(
        demo, index, data_root, port=port, max_upload_mb=max_upload_mb, prevent_thread_lock=True, quiet=True
    )
    try:
        yield demo, f"http://127.0.0.1:{port}/"
    finally:
        demo.close()


def search(client, path, k=5, category="All"):
    """The demo's /search endpoint through gradio_client, as the README calls it."""
    from gradio_client import handle_file

    return client.predict(handle_file(str(path)), k, category, api_name="/search")


def raw_get(url, path):
    """GET with the path sent byte for byte (no client-side ../ normalisation)."""
    import http.client
    from urllib.parse import urlparse

    u = urlparse(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=10)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


# ============ reference computations and files ============


def reference_embedding(model, path):
    """The query embedding the slow, obvious way: load_image + build_transform + forward."""
    from dataio import photos
    import preprocessing

    x = preprocessing.build_transform(model.model_args["image_size"])(photos.load_image(path))
    with torch.no_grad():
        return model(x[None])[0].numpy()


def jpeg(path, seed=0, size=(40, 30)):
    """A JPEG of random pixels at ``path`` (its folders made)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path, quality=90)
    return path
