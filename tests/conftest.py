"""Shared pytest fixtures: tiny synthetic SOP datasets generated once per test session."""
import sys
from pathlib import Path

import pytest
import torch

# Make the flat repo's modules (datasets, models, ...) importable however pytest is started.
REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from dataio import synthetic_sop  # noqa: E402


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory):
    """A synthetic SOP with 60 products (30 train / 30 test, ~330 images) at 48 px.
    Shared by the whole session: treat it as read-only (copy it before corrupting files)."""
    return synthetic_sop.make_synthetic_sop(tmp_path_factory.mktemp("sop") / "synthetic_sop",
                                       num_products=60, image_size=48, seed=0, workers=0)


@pytest.fixture(scope="session")
def tiny_synthetic_root(tmp_path_factory):
    """An even smaller synthetic SOP: 24 products (2 per category) at 32 px. Read-only."""
    return synthetic_sop.make_synthetic_sop(tmp_path_factory.mktemp("sop_tiny") / "synthetic_sop",
                                       num_products=24, image_size=32, seed=1, workers=0)


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
