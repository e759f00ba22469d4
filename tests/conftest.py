"""Shared pytest fixtures: tiny synthetic SOP datasets generated once per test session."""

from pathlib import Path
import shutil
import sys

import pytest
import torch

# Make the flat repo's modules (datasets, models, ...) importable however pytest is started.
REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from dataio import synthetic_sop


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory):
    """A synthetic SOP with 60 products (30 train / 30 test, ~330 images) at 48 px.
    Shared by the whole session: treat it as read-only (copy it before corrupting files)."""
    return synthetic_sop.make_synthetic_sop(
        tmp_path_factory.mktemp("sop") / "synthetic_sop", num_products=60, image_size=48, seed=0, workers=0
    )


@pytest.fixture(scope="session")
def tiny_synthetic_root(tmp_path_factory):
    """An even smaller synthetic SOP: 24 products (2 per category) at 32 px. Read-only."""
    return synthetic_sop.make_synthetic_sop(
        tmp_path_factory.mktemp("sop_tiny") / "synthetic_sop", num_products=24, image_size=32, seed=1, workers=0
    )


@pytest.fixture
def synthetic_copy(synthetic_root, tmp_path):
    """A private, writable copy of ``synthetic_root`` for tests that damage files."""
    import shutil

    dst = tmp_path / "sop_copy"
    shutil.copytree(synthetic_root, dst)
    return dst


@pytest.fixture
def one_torch_thread():
    """One intra-op thread for the test (2 shared cores: more threads only add contention);
    use with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def milvus_standalone(tmp_path_factory):
    """A real Milvus server (Milvus Standalone 2.3.5, `tests/milvus_server.py`) for the module,
    on free 127.0.0.1 ports with its own data folder; stopped with its child processes whatever
    happens. Skips, saying why, where the server cannot start on this machine."""
    from milvus_server import MilvusStandalone, executable

    if executable() is None:
        pytest.skip("no milvus-server (pip install milvus==2.3.5, a test requirement)")
    server = MilvusStandalone(tmp_path_factory.mktemp("milvus_standalone"))
    try:
        server.start()
    except RuntimeError as e:
        server.close()
        pytest.skip(f"Milvus Standalone cannot start on this machine: {e}")
    yield server
    server.close()
    shutil.rmtree(server.data_dir, ignore_errors=True)  # ~0.5 GB: its binaries, etcd and storage


@pytest.fixture(scope="session")
def tiny_sop(synthetic_root):
    """The tiny train.py runs' data (tests/support.py's tiny_argv): ``synthetic_root``'s 60
    products at 48 px: train 154 images / 28 products (2-12 images each), val 14 / 2 (the val
    draw, splits.split_validation), test 154 / 30."""
    return synthetic_root


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """The demo under test (search.tiny_demo): its folder, data, checkpoint, model, test-split
    index and gallery, the query files of every kind, and a SearchEngine over them."""
    from bench.demo_clients import write_query_files
    import datasets
    import models
    from search import engine as search_engine
    from search import loading as search_loading
    from search.tiny_demo import make_tiny_demo

    folder = tmp_path_factory.mktemp("app")
    data_root, checkpoint = make_tiny_demo(folder)
    model = models.load_model(checkpoint)
    index, built = search_loading.load_or_build_index(model, checkpoint, data_root, "test", progress=False)
    assert built
    gallery = datasets.SOPDataset(data_root, "test")
    queries = write_query_files(folder / "queries", gallery.paths[0])
    return {
        "folder": folder,
        "data_root": data_root,
        "checkpoint": checkpoint,
        "model": model,
        "index": index,
        "gallery": gallery,
        "queries": queries,
        "engine": search_engine.SearchEngine(model, index, data_root),
    }


@pytest.fixture(scope="session")
def server(tiny):
    """``tiny``'s demo served on loopback for the session, with a gradio_client Client at its
    defaults (as the README calls it: result images are downloaded). It serves photos (--results
    photos): the ranking tests compare every photo hit with a brute-force ranking; product rows are
    tests/test_match_demo.py's."""
    from gradio_client import Client
    from support import running_demo

    with running_demo(tiny["data_root"], tiny["checkpoint"], max_upload_mb=1, results_mode="photos") as (demo, url):
        yield {"demo": demo, "url": url, "client": Client(url, verbose=False)}
